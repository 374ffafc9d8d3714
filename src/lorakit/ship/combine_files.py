"""Adapter arithmetic on files: `lorakit combine A B ... OUT` without loading a base model.

`lorakit.combine.combine_adapters` works on a model. The adapters alone say everything the arithmetic
needs (each module's path and shape), so the model here is a skeleton built from the files: the adapted
modules at their paths, as ``nn.Linear`` / ``nn.Embedding`` with storage-free (expanded zero) weights —
LoRA never reads the base weight to combine (embed_tokens / lm_head get real zeros: see `_skeleton`).
The sources are loaded into it with lorakit's own loader (validated like any load), combined, and the
result is written as a PEFT adapter folder (atomically, into a new folder).

Not supported on files: DoRA (no linear combination exists, as in `combine_adapters`), modules_to_save
copies and trained biases (their base values are not in the adapter, so the skeleton cannot hold them).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.adapter_files import adapter_state_dict, load_adapter, peft_config_dict
from lorakit.combine import combine_adapters
from lorakit.peft_format import EMBEDDING_LAYER_NAMES
from lorakit.ship.folder import AdapterFolder, read_adapter_folder, write_adapter_folder

RESULT = "combined"


class _Skeleton(nn.Module):
    """The adapted modules of a base model at their paths, nothing else."""

    def __init__(self) -> None:
        super().__init__()
        self._embedding_paths: dict[str, str] = {}

    def get_input_embeddings(self) -> nn.Module | None:
        path = self._embedding_paths.get("embed_tokens")
        return self.get_submodule(path) if path else None

    def get_output_embeddings(self) -> nn.Module | None:
        path = self._embedding_paths.get("lm_head")
        return self.get_submodule(path) if path else None


def combine_adapter_folders(
    adapters: Sequence[str | os.PathLike[str]],
    weights: Sequence[float],
    output: str | os.PathLike[str],
    *,
    method: str = "linear",
    density: float | None = None,
    svd_rank: int | None = None,
    majority_sign_method: str = "total",
    seed: int | None = None,
) -> Path:
    """Combine adapter folders with ``combine_adapters``'s methods and write the result to ``output``.

    Raises:
        ValueError: a different number of weights and adapters, adapters that disagree on a module's
            shape, DoRA / modules_to_save / trained biases, anything `combine_adapters` refuses, or a
            non-empty ``output``.
    """
    if len(adapters) != len(weights):
        raise ValueError(f"{len(adapters)} adapters but {len(weights)} weights; give one weight per adapter")
    if not adapters:
        raise ValueError("combine needs at least one adapter")
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ValueError(f"{output} exists and is not an empty folder; choose a new output folder")
    folders = [read_adapter_folder(path) for path in adapters]
    for folder in folders:
        _refuse_unsupported(folder)
    skeleton = _skeleton(folders)
    names = [f"source{index}" for index in range(len(folders))]
    for name, folder in zip(names, folders):
        load_adapter(skeleton, folder.path, name)
    combine_adapters(skeleton, dict(zip(names, (float(w) for w in weights))), RESULT, method,  # type: ignore[arg-type]
                     svd_rank=svd_rank, density=density, majority_sign_method=majority_sign_method, seed=seed)
    tensors = adapter_state_dict(skeleton, RESULT, save_embedding_layers=False)
    config = _result_config(skeleton, folders[0].config)
    return write_adapter_folder(output, config, tensors)


def _refuse_unsupported(folder: AdapterFolder) -> None:
    if folder.use_dora:
        raise ValueError(f"{folder.path} uses DoRA: its magnitude vector has no linear combination")
    if folder.saved or folder.config.get("modules_to_save") or folder.config.get("task_type") == "SEQ_CLS":
        raise ValueError(f"{folder.path} has modules_to_save copies: combining them needs the base model; "
                         "drop them first (lorakit convert --drop-modules-to-save) or combine in Python")
    if folder.biases or folder.lora_biases or folder.config.get("bias", "none") != "none":
        raise ValueError(f"{folder.path} trains biases: combining them needs the base model; drop them "
                         "first (lorakit convert --drop-bias)")


def _skeleton(folders: list[AdapterFolder]) -> _Skeleton:
    """A module tree holding every adapted module of ``folders`` with its (in, out) shape."""
    shapes: dict[str, tuple[str, int, int]] = {}
    for folder in folders:
        for path, module in folder.modules.items():
            shape = (module.kind, int(module.lora_A.shape[1]), int(module.lora_B.shape[0]))
            if shapes.setdefault(path, shape) != shape:
                raise ValueError(f"the adapters disagree on {path}: {shapes[path]} and {shape} "
                                 "(kind, in, out); they were trained on different base models")
    skeleton = _Skeleton()
    for path, (kind, fan_in, fan_out) in sorted(shapes.items()):
        parent = skeleton
        *parents, leaf = path.split(".")
        for part in parents:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        # PEFT writes the base weights of a targeted embed_tokens / lm_head into the adapter and loading
        # copies them in: those two get real (zero) storage, every other weight is an expanded zero.
        parent.add_module(leaf, _storage_free(kind, fan_in, fan_out, real=leaf in EMBEDDING_LAYER_NAMES))
        if leaf in EMBEDDING_LAYER_NAMES:
            skeleton._embedding_paths[leaf] = path
    return skeleton


def _storage_free(kind: str, fan_in: int, fan_out: int, *, real: bool = False) -> nn.Module:
    """nn.Linear(fan_in, fan_out) / nn.Embedding(fan_in, fan_out) whose weight is an expanded zero
    (``real``: a zero tensor with storage)."""
    if kind == "embedding":
        layer: nn.Module = nn.Embedding(fan_in, fan_out, device="meta")
        shape = (fan_in, fan_out)
    else:
        layer = nn.Linear(fan_in, fan_out, bias=False, device="meta")
        shape = (fan_out, fan_in)
    weight = torch.zeros(shape) if real else torch.zeros(()).expand(shape)
    layer.weight = nn.Parameter(weight, requires_grad=False)
    return layer


def _result_config(skeleton: _Skeleton, first: dict[str, Any]) -> dict[str, Any]:
    """PEFT's config for the result, with the first source's base model and model-class mapping."""
    config = peft_config_dict(skeleton, RESULT, base_model_name_or_path=first.get("base_model_name_or_path"))
    config["task_type"] = first.get("task_type")
    config["auto_mapping"] = first.get("auto_mapping")
    return config
