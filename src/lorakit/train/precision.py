"""The training precision a run asks for (``dtype``: ``auto``, ``bf16``, ``fp32``) made concrete for a device.

``auto`` picks bf16 autocast where bf16 matrix products run natively, fp32 elsewhere:

- CPU: native bf16 dot-product instructions -- AMX-BF16 or AVX512-BF16 on x86 (``amx_bf16`` /
  ``avx512_bf16`` in ``/proc/cpuinfo``), the BF16 extension on Arm (``bf16`` in the ``Features`` line).
  Without them (an AVX2-only or plain AVX-512 x86 CPU) oneDNN emulates bf16 through fp32 conversions and a
  bf16 step runs several times *slower* than fp32, so ``auto`` keeps fp32 there.
- CUDA: ``torch.cuda.is_bf16_supported(including_emulation=False)`` (compute capability 8.0+: Ampere on).
- anything else (MPS, XPU, an unreadable CPU description): fp32, the safe answer.

Adapters and the optimizer stay fp32 in every case; bf16 only changes the autocast region of the step,
and the frozen linear weights are then stored in bf16 (`store_frozen_linears_in`: the bits autocast would
compute with, without casting them at every step).
"""

from __future__ import annotations

import logging
import platform
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lorakit.layers import LoraLinear
from lorakit.modules_to_save import ModulesToSave

DTYPES = ("auto", "bf16", "fp32")
_CPUINFO = Path("/proc/cpuinfo")
# x86 flag -> the name users know, most capable first.
_X86_BF16_FLAGS = (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16"))

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrecisionChoice:
    """What a run computes in and why: ``bf16`` (autocast on) or not, and a one-line reason."""

    bf16: bool
    reason: str

    @property
    def dtype(self) -> str:
        return "bf16" if self.bf16 else "fp32"


def cpu_flags(cpuinfo: Path = _CPUINFO) -> set[str]:
    """The feature flags of the first CPU in ``/proc/cpuinfo`` (x86 ``flags``, Arm ``Features``); empty
    when the file is missing or unreadable (not Linux)."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return set(value.split())
    return set()


def cpu_bf16_instructions(flags: set[str] | None = None) -> str | None:
    """The name of this CPU's native bf16 matrix instructions (``"AMX-BF16"``, ``"AVX512-BF16"``,
    ``"Arm BF16"``), or None when it has none (bf16 would be emulated, slowly)."""
    flags = cpu_flags() if flags is None else flags
    for flag, name in _X86_BF16_FLAGS:
        if flag in flags:
            return name
    if "bf16" in flags and platform.machine().lower() in ("aarch64", "arm64"):
        return "Arm BF16"
    return None


def cuda_bf16_native(device: torch.device) -> bool:
    """Whether the CUDA device computes bf16 natively (Ampere, compute capability 8.0, and later)."""
    if not torch.cuda.is_available():
        return False
    with torch.cuda.device(device):
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))


def choose_precision(dtype: str, device: torch.device) -> PrecisionChoice:
    """``dtype`` (``auto``, ``bf16``, ``fp32``) made concrete for ``device``, with the reason.

    Raises:
        ValueError: ``dtype`` is not one of `DTYPES`.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if dtype == "bf16":
        return PrecisionChoice(True, "bf16 autocast, as asked (dtype bf16)")
    if dtype == "fp32":
        return PrecisionChoice(False, "fp32, as asked (dtype fp32)")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device) if torch.cuda.is_available() else str(device)
        if cuda_bf16_native(device):
            return PrecisionChoice(True, f"bf16 autocast: {name} computes bf16 natively (dtype auto)")
        return PrecisionChoice(False, f"fp32: {name} has no native bf16 (dtype auto)")
    if device.type == "cpu":
        instructions = cpu_bf16_instructions()
        if instructions is not None:
            return PrecisionChoice(
                True, f"bf16 autocast: this CPU has {instructions} instructions (dtype auto)"
            )
        return PrecisionChoice(
            False,
            "fp32: this CPU has no native bf16 matrix instructions (AVX512-BF16, AMX, Arm BF16), on which "
            "bf16 would run several times slower (dtype auto; --dtype bf16 forces it)",
        )
    return PrecisionChoice(False, f"fp32: no bf16 rule for device type {device.type!r} (dtype auto)")


def log_precision(choice: PrecisionChoice) -> None:
    """Say at start-up what the run computes in and why (logger ``lorakit.train.precision``)."""
    logger.info("precision: %s", choice.reason)


def store_frozen_linears_in(model: nn.Module, dtype: torch.dtype) -> list[str]:
    """Store the frozen weights and biases of ``model``'s plain linear layers in ``dtype`` (bf16 for bf16
    autocast); returns the qualified names of the layers changed (for `restore_linears_from`).

    Under autocast every matmul casts an fp32 weight to bf16 at each forward, and lean activations rebuild
    that copy again in backward; a weight stored in bf16 is used as it is. The bits are the same (autocast
    rounds to nearest, as ``Tensor.to``), the casts are gone (3 to 4 % of a SmolLM2-135M step on a CPU) and
    the weights take half the memory. Left as they are: layers with a trainable tensor, tensors another
    module shares (an output head tied to the input embedding, whose lookup stays fp32), the base layers of
    DoRA adapters (their row norm reads the weight in the adapter's precision) and the frozen originals kept
    by ``modules_to_save`` (saved with some adapters).
    """
    skipped: set[int] = set()
    for module in model.modules():
        if isinstance(module, LoraLinear) and len(module.lora_magnitude_vector):
            skipped.add(id(module.base_layer))
        elif isinstance(module, ModulesToSave):
            skipped.update(id(inner) for inner in module.original_module.modules())
    uses: dict[int, int] = {}
    for _, parameter in model.named_parameters(remove_duplicate=False):
        uses[id(parameter)] = uses.get(id(parameter), 0) + 1
    changed: list[str] = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or id(module) in skipped:
            continue
        tensors = [t for t in (module.weight, module.bias) if t is not None]
        frozen = all(not t.requires_grad and uses[id(t)] == 1 for t in tensors)
        if not frozen or module.weight.dtype != torch.float32:
            continue
        for tensor in tensors:
            tensor.data = tensor.data.to(dtype)
        changed.append(name)
    # transformers maps a safetensors file and hands out views of it: one frozen tensor left there (the
    # embedding) keeps the whole file mapped, and every fp32 weight read once stays resident beside its
    # bf16 copy (0.5 GB of RSS for SmolLM2-135M). Their own copies let the mapping go.
    for parameter in model.parameters():
        if not parameter.requires_grad and parameter.dtype != dtype:
            parameter.data = parameter.data.clone()
    return changed


def restore_linears_from(model: nn.Module, names: list[str], source: nn.Module) -> None:
    """Give the layers ``names`` of ``model`` (from `store_frozen_linears_in`) the weights and biases of the
    same layers of ``source``, the model as loaded (without adapters: ``…q_proj.base_layer`` is ``…q_proj``
    there), on ``model``'s device."""
    for name in names:
        layer = model.get_submodule(name)
        original = source.get_submodule(".".join(part for part in name.split(".") if part != "base_layer"))
        layer.weight.data = original.weight.data.to(layer.weight.device)
        if layer.bias is not None:
            layer.bias.data = original.bias.data.to(layer.bias.device)
