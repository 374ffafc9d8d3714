"""An adapter folder as the deployment tools see it: every tensor of the file sorted by what it is.

The engines care about more than A and B: a ``modules_to_save`` copy, a trained bias or a DoRA magnitude
decides whether they load the file at all. So the folder is read whole and each tensor is put in one box:

    modules      A (r, in) and B (out, r) per adapted module (embeddings: A (r, num), B (dim, r)),
                 with the module's rank, alpha, PEFT scaling and DoRA magnitude (out,)
    saved        ``modules_to_save`` copies (full tensors that replace the base module's)
    biases       trained biases (``bias="all"`` / ``"lora_only"``)
    lora_biases  biases of lora_B (PEFT's ``lora_bias``)
    embeddings   base weights of targeted embedding layers (PEFT writes them, the base has them too)

Writing goes through `write_adapter_folder`: atomic, and refuses to touch a folder that has content.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import safetensors.torch
import torch

from lorakit.atomic import write_folder
from lorakit.config import lora_scaling
from lorakit.matching import name_matches
from lorakit.peft_format import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    file_key,
    module_rank_alpha,
    read_adapter_config,
    read_adapter_tensors,
    split_file_key,
    strip_prefix,
)

# LORA_PARTS name -> (module kind, role)
_PARTS = {
    "lora_A": ("linear", "A"),
    "lora_B": ("linear", "B"),
    "lora_embedding_A": ("embedding", "A"),
    "lora_embedding_B": ("embedding", "B"),
    "lora_magnitude_vector": ("linear", "magnitude"),
}


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: update = scaling · B @ A in (out, in) orientation (embeddings: its transpose)."""

    path: str
    kind: Literal["linear", "embedding"]
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    rank: int
    alpha: float
    scaling: float
    magnitude: torch.Tensor | None = None

    @property
    def leaf(self) -> str:
        return self.path.rsplit(".", 1)[-1]


@dataclass
class AdapterFolder:
    """A PEFT adapter folder read whole (see the module docstring for the boxes)."""

    path: Path
    config: dict[str, Any]
    modules: dict[str, LoraModule]
    saved: dict[str, torch.Tensor] = field(default_factory=dict)
    biases: dict[str, torch.Tensor] = field(default_factory=dict)
    lora_biases: dict[str, torch.Tensor] = field(default_factory=dict)
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)
    file_size: int = 0
    dtypes: dict[str, int] = field(default_factory=dict)

    @property
    def use_rslora(self) -> bool:
        return bool(self.config.get("use_rslora", False))

    @property
    def use_dora(self) -> bool:
        return bool(self.config.get("use_dora", False)) or any(
            m.magnitude is not None for m in self.modules.values())

    @property
    def max_rank(self) -> int:
        return max((m.rank for m in self.modules.values()), default=0)

    def scaling_rule(self) -> str:
        return "lora_alpha / sqrt(r) (rsLoRA)" if self.use_rslora else "lora_alpha / r"

    def patterned_modules(self) -> list[str]:
        """Modules whose rank or alpha comes from ``rank_pattern`` / ``alpha_pattern``, not r / lora_alpha."""
        r, alpha = self.config.get("r", 8), self.config.get("lora_alpha", 8)
        return [m.path for m in self.modules.values() if m.rank != r or m.alpha != alpha]


def read_adapter_folder(path: str | os.PathLike[str]) -> AdapterFolder:
    """Read ``path`` (adapter_config.json + adapter_model.safetensors) and sort its tensors.

    Raises:
        FileNotFoundError: the folder or one of the two files is missing.
        ValueError: unreadable JSON / safetensors, a non-LORA config, a module with A but no B (or the
            reverse), or tensors whose rank disagrees with the config.
    """
    path = Path(path)
    config = read_adapter_config(path)
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path / CONFIG_NAME}: not a LoRA adapter config (peft_type must be 'LORA')")
    tensors = read_adapter_tensors(path)
    size = (path / WEIGHTS_NAME).stat().st_size
    folder = AdapterFolder(path=path, config=config, modules={}, file_size=size)
    for tensor in tensors.values():
        name = str(tensor.dtype).removeprefix("torch.")
        folder.dtypes[name] = folder.dtypes.get(name, 0) + 1
    _sort_tensors(folder, tensors)
    return folder


def _sort_tensors(folder: AdapterFolder, tensors: dict[str, torch.Tensor]) -> None:
    parts: dict[str, dict[str, torch.Tensor]] = {}
    kinds: dict[str, str] = {}
    saved_entries = [str(entry) for entry in folder.config.get("modules_to_save") or []]
    for key, tensor in tensors.items():
        name = strip_prefix(key)
        split = split_file_key(key)
        if split is not None:
            module, part_name = split
            kind, part = _PARTS[part_name]
            parts.setdefault(module, {})[part] = tensor
            if part != "magnitude":
                kinds[module] = kind
        else:
            if name.endswith((".lora_A.bias", ".lora_B.bias")):
                folder.lora_biases[name] = tensor
            elif name.endswith(".base_layer.weight"):
                folder.embeddings[name] = tensor
            elif name_matches(name.rsplit(".", 1)[0], saved_entries) or ".modules_to_save." in name:
                folder.saved[name] = tensor
            elif name.endswith(".bias"):
                folder.biases[name] = tensor
            else:
                folder.saved[name] = tensor  # a full tensor the config does not explain: a saved module
    for module, found in sorted(parts.items()):
        if "A" not in found or "B" not in found:
            raise ValueError(f"{folder.path}: module {module!r} has {sorted(found)} but needs both A and B")
        lora_A, lora_B = found["A"], found["B"]
        rank, alpha = module_rank_alpha(folder.config, module)
        if rank <= 0:
            raise ValueError(f"{folder.path}: rank of {module!r} must be positive, got r={rank}")
        if lora_A.shape[0] != rank or lora_B.shape[1] != rank:
            raise ValueError(f"{folder.path}: {module!r} has A {tuple(lora_A.shape)} and B "
                             f"{tuple(lora_B.shape)} but adapter_config.json gives r={rank}")
        folder.modules[module] = LoraModule(
            path=module, kind=kinds[module], lora_A=lora_A, lora_B=lora_B,  # type: ignore[arg-type]
            rank=rank, alpha=alpha,
            scaling=lora_scaling(alpha, rank, bool(folder.config.get("use_rslora", False))),
            magnitude=found.get("magnitude"))
    if not folder.modules:
        raise ValueError(f"{folder.path}: {WEIGHTS_NAME} holds no LoRA A/B tensors")


def module_tensors(module: LoraModule) -> dict[str, torch.Tensor]:
    """The file keys and tensors of one module (PEFT's layout)."""
    names = ("lora_embedding_A", "lora_embedding_B") if module.kind == "embedding" else ("lora_A", "lora_B")
    out = {file_key(module.path, names[0]): module.lora_A, file_key(module.path, names[1]): module.lora_B}
    if module.magnitude is not None:
        out[file_key(module.path, "lora_magnitude_vector")] = module.magnitude
    return out


def write_adapter_folder(target: str | os.PathLike[str], config: dict[str, Any],
                         tensors: dict[str, torch.Tensor]) -> Path:
    """Write a PEFT adapter folder atomically (a reader sees nothing or the complete folder).

    Raises:
        ValueError: ``target`` is a file or a folder with content (it is never replaced: lorakit does not
            destroy what it did not create).
    """
    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ValueError(f"{target} exists and is not an empty folder; choose a new output folder")
    payload = {key: tensor.detach().to("cpu").contiguous().clone() for key, tensor in tensors.items()}
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"

    def write(folder: Path) -> None:
        (folder / CONFIG_NAME).write_text(text, encoding="utf-8")
        safetensors.torch.save_file(payload, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})

    return write_folder(target, write)
