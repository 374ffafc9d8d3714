"""What an adapter folder holds, and whether its updates look sane: `lorakit inspect`.

Each layer's update norm ||s·B·A||_F is computed without forming B·A (which is out × in):

    ||s·B·A||_F² = s² · tr(Aᵀ Bᵀ B A) = s² · Σ_ij (BᵀB)_ij (A Aᵀ)_ij

two r × r Gram matrices, in float64. Flags:

* ``all-zero``: the update is exactly zero (B or A all zeros). A freshly initialised adapter looks like
  this, and so does the output of a broken distributed save (every shard but one written as zeros).
* ``non-finite``: NaN or inf anywhere in A, B or the DoRA magnitude.
* ``large``: the norm is above ``LARGE_NORM`` or more than ``LARGE_RATIO`` times the median layer norm:
  an update that dwarfs the others usually comes from a diverged run or a scale folded in twice.
"""

from __future__ import annotations

import math
import os
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from lorakit.ship.folder import AdapterFolder, LoraModule, read_adapter_folder

LARGE_NORM = 1.0e4
LARGE_RATIO = 100.0


@dataclass(frozen=True)
class LayerReport:
    module: str
    kind: str
    shape: tuple[int, int]  # the update's (out, in); (num_embeddings, dim) for an embedding
    rank: int
    alpha: float
    scaling: float
    norm: float  # ||s·B·A||_F (nan when A or B is not finite)
    flags: tuple[str, ...] = ()


@dataclass
class AdapterReport:
    path: str
    base_model: str | None
    task_type: str | None
    targets: Any
    rank: int
    alpha: float
    scaling_rule: str
    use_dora: bool
    modules_to_save: list[str]
    bias: str
    lora_bias: bool
    parameters: int
    file_size: int
    dtypes: dict[str, int]
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    layers: list[LayerReport] = field(default_factory=list)
    saved_tensors: list[str] = field(default_factory=list)
    bias_tensors: list[str] = field(default_factory=list)

    @property
    def flagged(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.flags]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (a non-finite norm becomes null: JSON has no NaN)."""
        out = asdict(self)
        for layer in out["layers"]:
            layer["norm"] = layer["norm"] if math.isfinite(layer["norm"]) else None
        out["flagged"] = [layer.module for layer in self.flagged]
        return out


def update_norm(module: LoraModule) -> float:
    """||s·B·A||_F via the r × r Gram matrices (never forms B·A); nan if A or B is not finite."""
    lora_A, lora_B = module.lora_A.to(torch.float64), module.lora_B.to(torch.float64)
    if not (torch.isfinite(lora_A).all() and torch.isfinite(lora_B).all()):
        return float("nan")
    gram_B = lora_B.T @ lora_B  # (r, r)
    gram_A = lora_A @ lora_A.T  # (r, r)
    squared = float((gram_B * gram_A).sum().clamp_min(0.0))
    return abs(module.scaling) * squared**0.5


def inspect_adapter(path: str | os.PathLike[str]) -> AdapterReport:
    """Read an adapter folder and report its configuration, size and per-layer update norms."""
    folder = read_adapter_folder(path)
    config = folder.config
    parameters = sum(t.numel() for m in folder.modules.values()
                     for t in (m.lora_A, m.lora_B, m.magnitude) if t is not None)
    parameters += sum(t.numel() for box in (folder.saved, folder.biases, folder.lora_biases)
                      for t in box.values())
    report = AdapterReport(
        path=str(folder.path),
        base_model=config.get("base_model_name_or_path"),
        task_type=config.get("task_type"),
        targets=config.get("target_modules"),
        rank=int(config.get("r", 8)),
        alpha=float(config.get("lora_alpha", 8)),
        scaling_rule=folder.scaling_rule(),
        use_dora=folder.use_dora,
        modules_to_save=list(config.get("modules_to_save") or []),
        bias=str(config.get("bias", "none")),
        lora_bias=bool(config.get("lora_bias", False)) or bool(folder.lora_biases),
        parameters=parameters,
        file_size=folder.file_size,
        dtypes=dict(folder.dtypes),
        rank_pattern=dict(config.get("rank_pattern") or {}),
        alpha_pattern=dict(config.get("alpha_pattern") or {}),
        saved_tensors=sorted(folder.saved),
        bias_tensors=sorted([*folder.biases, *folder.lora_biases]),
    )
    report.layers = _layer_reports(folder)
    return report


def _layer_reports(folder: AdapterFolder) -> list[LayerReport]:
    norms = {path: update_norm(module) for path, module in folder.modules.items()}
    finite = [n for n in norms.values() if n == n and n > 0]  # n == n: not nan
    median = statistics.median(finite) if finite else 0.0
    layers = []
    for path, module in folder.modules.items():
        norm = norms[path]
        flags = []
        parts = [module.lora_A, module.lora_B] + ([module.magnitude] if module.magnitude is not None else [])
        if not all(bool(torch.isfinite(t).all()) for t in parts):
            flags.append("non-finite")
        elif norm == 0.0:
            flags.append("all-zero")
        elif norm > LARGE_NORM or (len(finite) >= 3 and median > 0 and norm > LARGE_RATIO * median):
            flags.append("large")
        out_features, in_features = int(module.lora_B.shape[0]), int(module.lora_A.shape[1])
        shape = (in_features, out_features) if module.kind == "embedding" else (out_features, in_features)
        layers.append(LayerReport(module=path, kind=module.kind, shape=shape, rank=module.rank,
                                  alpha=module.alpha, scaling=module.scaling, norm=norm, flags=tuple(flags)))
    return layers
