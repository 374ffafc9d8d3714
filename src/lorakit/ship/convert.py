"""Rewrite an adapter into plain LoRA that an engine computes exactly as PEFT computes the original.

The output is the one form every engine reads the same way: every module has the same rank R, the config
says ``r = lora_alpha = R`` (scale 1 under ``alpha / r``, no ``use_rslora``, no patterns) and each
module's PEFT scale s is folded into its B:

* plain / rsLoRA / ``rank_pattern`` / ``alpha_pattern`` modules: A' = A, B' = s·B, zero-padded to rank R
  (padding adds nothing to B·A): exact up to one float rounding per entry of B;
* DoRA modules (needs the base weight W): the effective update D = m·(W + s·BA)/||W + s·BA||_row − W,
  truncated to the chosen rank by SVD: B' = U_k·S_k, A' = V_kᵀ;
* modules above ``max_lora_rank``: s·B·A truncated by SVD, computed from two thin QR factorisations and an
  r × r SVD (never forming the out × in product).

For each truncated layer the report gives the relative error ||D − D_k||_F / ||D||_F (the dropped singular
values), and overall sqrt(Σ dropped²) / sqrt(Σ all²) over those layers. ``modules_to_save`` copies and
biases are kept unless the target's rules flag them; then they are dropped only when asked, with a warning
naming what is lost. The result is re-checked against the target's rule table before anything is written.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorakit.peft_format import PEFT_PREFIX
from lorakit.ship.base import BaseWeights, architecture_of, base_config
from lorakit.ship.folder import (
    AdapterFolder,
    LoraModule,
    module_tensors,
    read_adapter_folder,
    write_adapter_folder,
)
from lorakit.ship.rules import ENGINES, Facts, run_rules


@dataclass(frozen=True)
class LayerConversion:
    module: str
    method: str  # "fold" (exact), "svd" (rank cap) or "dora-svd"
    rank_before: int
    rank_after: int
    relative_error: float  # 0.0 for "fold"


@dataclass
class ConversionReport:
    output: str
    target: str
    rank: int
    layers: list[LayerConversion] = field(default_factory=list)
    overall_error: float = 0.0  # over the SVD-truncated layers
    dropped: list[str] = field(default_factory=list)
    losses: list[str] = field(default_factory=list)  # what dropping lost, in words (also warned)

    @property
    def truncated(self) -> list[LayerConversion]:
        return [layer for layer in self.layers if layer.method != "fold"]


def convert_adapter(
    adapter: str | os.PathLike[str],
    output: str | os.PathLike[str],
    target: str,
    *,
    base: str | Path | None = None,
    rank: int | None = None,
    max_lora_rank: int | None = None,
    drop_modules_to_save: bool = False,
    drop_bias: bool = False,
) -> ConversionReport:
    """Write ``adapter`` converted for ``target`` to the new folder ``output`` (see the module docstring).

    Args:
        rank: the rank of DoRA modules after conversion (default: their own rank).
        max_lora_rank: cap every module's rank by truncated SVD.
        base: the base model; needed for DoRA (its weights) and used for the target's rules.

    Raises:
        ValueError: bad arguments, DoRA without ``base``, something the target still rejects after the
            conversion (named, with the flag that would fix it), or a non-empty ``output``.
    """
    if target not in ENGINES:
        raise ValueError(f"unknown target {target!r}; lorakit knows {', '.join(ENGINES)}")
    for name, value in (("--rank", rank), ("--max-lora-rank", max_lora_rank)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ValueError(f"{output} exists and is not an empty folder; choose a new output folder")
    folder = read_adapter_folder(adapter)
    if folder.use_dora and base is None:
        raise ValueError("the adapter uses DoRA: converting it to plain LoRA needs the base model's weights "
                         "(--base)")
    report = ConversionReport(output=str(output), target=target, rank=0)
    modules = _converted_modules(folder, base, rank, max_lora_rank, report)
    uniform = max(int(m.lora_A.shape[0]) for m in modules.values())
    report.rank = uniform
    modules = {path: _padded(module, uniform) for path, module in modules.items()}
    converted = _converted_folder(folder, modules, uniform, drop_modules_to_save, drop_bias, report)
    _verify(converted, target, base, max_lora_rank)
    for loss in report.losses:  # only once the conversion is known to go through
        warnings.warn(loss, stacklevel=2)
    tensors: dict[str, torch.Tensor] = {}
    for module in converted.modules.values():
        tensors.update(module_tensors(module))
    for box in (converted.saved, converted.biases, converted.lora_biases, converted.embeddings):
        tensors.update({PEFT_PREFIX + key: value for key, value in box.items()})
    write_adapter_folder(output, converted.config, tensors)
    return report


# --- per module ------------------------------------------------------------------------------------------


def _converted_modules(folder: AdapterFolder, base: str | Path | None, rank: int | None,
                       cap: int | None, report: ConversionReport) -> dict[str, LoraModule]:
    out: dict[str, LoraModule] = {}
    dropped_sq = total_sq = 0.0
    weights = BaseWeights(base) if folder.use_dora else None
    try:
        if weights is not None:
            weights.__enter__()
        for path, module in folder.modules.items():
            if module.magnitude is not None:
                if module.kind == "embedding":
                    raise ValueError(f"{path}: DoRA on an embedding layer is not supported")
                assert weights is not None
                wanted = min(rank or module.rank, cap or rank or module.rank)
                delta = _dora_delta(folder, module, weights.weight(path))
                u, s, vh = torch.linalg.svd(delta, full_matrices=False)
                method = "dora-svd"
            else:
                wanted = min(module.rank, cap) if cap is not None else module.rank
                if wanted >= module.rank:
                    out[path] = _folded(module, module.lora_A, module.scaling * module.lora_B.double())
                    report.layers.append(LayerConversion(path, "fold", module.rank, module.rank, 0.0))
                    continue
                u, s, vh = _low_rank_svd(module.lora_A.double(), module.scaling * module.lora_B.double())
                method = "svd"
            k = min(wanted, int(s.shape[0]))
            kept, dropped = float((s[:k] ** 2).sum()), float((s[k:] ** 2).sum())
            error = math.sqrt(dropped / (kept + dropped)) if kept + dropped > 0 else 0.0
            dropped_sq, total_sq = dropped_sq + dropped, total_sq + kept + dropped
            out[path] = _folded(module, vh[:k], u[:, :k] * s[:k])
            report.layers.append(LayerConversion(path, method, module.rank, k, error))
    finally:
        if weights is not None:
            weights.__exit__(None, None, None)
    report.overall_error = math.sqrt(dropped_sq / total_sq) if total_sq > 0 else 0.0
    return out


def _dora_delta(folder: AdapterFolder, module: LoraModule, weight: torch.Tensor) -> torch.Tensor:
    """m·(W + s·BA)/||W + s·BA||_row − W in float64: (out, in)."""
    weight = weight.double()
    if folder.config.get("fan_in_fan_out", False):
        weight = weight.T  # Conv1D stores (in, out)
    lora = module.scaling * (module.lora_B.double() @ module.lora_A.double())
    if weight.shape != lora.shape:
        raise ValueError(f"{module.path}: base weight {tuple(weight.shape)} does not fit the adapter's "
                         f"update {tuple(lora.shape)}; wrong --base?")
    adapted = weight + lora
    norm = torch.linalg.vector_norm(adapted, dim=1, keepdim=True)
    assert module.magnitude is not None
    return module.magnitude.double().unsqueeze(1) * adapted / norm - weight


def _low_rank_svd(lora_A: torch.Tensor, lora_B: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """SVD of B·A ((out, r) @ (r, in)) via thin QRs: B = Q_B R_B, Aᵀ = Q_A R_A, B·A = Q_B (R_B R_Aᵀ) Q_Aᵀ.

    Returns U (out, k), S (k,), Vh (k, in) with k = min(r, out, in).
    """
    q_b, r_b = torch.linalg.qr(lora_B)
    q_a, r_a = torch.linalg.qr(lora_A.T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    return q_b @ u, s, vh @ q_a.T


def _folded(module: LoraModule, lora_A: torch.Tensor, lora_B: torch.Tensor) -> LoraModule:
    """A module with scale 1 (so r = alpha), in the source dtype (SVD/fold ran in float64)."""
    dtype = module.lora_A.dtype
    rank = int(lora_A.shape[0])
    return LoraModule(path=module.path, kind=module.kind, lora_A=lora_A.to(dtype).contiguous(),
                      lora_B=lora_B.to(dtype).contiguous(), rank=rank, alpha=float(rank), scaling=1.0)


def _padded(module: LoraModule, rank: int) -> LoraModule:
    missing = rank - module.rank
    if missing <= 0:
        return module
    lora_A = torch.cat([module.lora_A, module.lora_A.new_zeros(missing, module.lora_A.shape[1])], dim=0)
    lora_B = torch.cat([module.lora_B, module.lora_B.new_zeros(module.lora_B.shape[0], missing)], dim=1)
    return LoraModule(path=module.path, kind=module.kind, lora_A=lora_A, lora_B=lora_B, rank=rank,
                      alpha=float(rank), scaling=1.0)


# --- the folder ------------------------------------------------------------------------------------------


def _converted_folder(folder: AdapterFolder, modules: dict[str, LoraModule], rank: int, drop_saved: bool,
                      drop_bias: bool, report: ConversionReport) -> AdapterFolder:
    config: dict[str, Any] = copy.deepcopy(folder.config)
    config.update(r=rank, lora_alpha=rank, rank_pattern={}, alpha_pattern={}, use_rslora=False,
                  use_dora=False)
    saved, biases, lora_biases = dict(folder.saved), dict(folder.biases), dict(folder.lora_biases)
    if drop_saved and (saved or config.get("modules_to_save")):
        lost = sorted(saved) or list(config.get("modules_to_save") or [])
        report.losses.append(f"dropping modules_to_save ({', '.join(lost)}): the engine will use the base "
                             "model's modules there, not the trained copies")
        report.dropped += lost
        saved, config["modules_to_save"] = {}, None
    trained_bias = config.get("bias", "none") != "none" or config.get("lora_bias")
    if drop_bias and (biases or lora_biases or trained_bias):
        lost = sorted([*biases, *lora_biases]) or [f"bias={config.get('bias')}"]
        report.losses.append(f"dropping trained biases ({', '.join(lost)}): the base model's biases are used")
        report.dropped += lost
        biases, lora_biases, config["bias"], config["lora_bias"] = {}, {}, "none", False
    return AdapterFolder(path=Path(report.output), config=config, modules=modules, saved=saved,
                         biases=biases, lora_biases=lora_biases, embeddings=dict(folder.embeddings),
                         file_size=0, dtypes=dict(folder.dtypes))


def _verify(converted: AdapterFolder, target: str, base: str | Path | None, cap: int | None) -> None:
    architecture = tied = None
    if base is not None:
        config = base_config(base)
        architecture, tied = architecture_of(config), bool(config.get("tie_word_embeddings", False))
    result = run_rules(target, Facts(converted, max_lora_rank=cap, architecture=architecture,
                                     tied_embeddings=tied))
    if result.findings:
        problems = "; ".join(f"{f.rule.id}: {f.rule.what} [{', '.join(f.items[:4])}] -> {f.rule.fix}"
                             for f in result.findings)
        raise ValueError(f"after conversion {target} would still not compute what PEFT computes: {problems}")
