"""The base model as the ship tools need it: its config, and single weights read lazily from safetensors.

``base`` is what ``--base`` takes everywhere in lorakit: a built-in name, a Hugging Face folder or a
``.gguf`` file (converted once into lorakit's cache, see `lorakit.models.gguf_cache`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lorakit.models.folder import ModelFolder, resolve_base_name
from lorakit.models.loading import model_folder


def base_folder(base: str | Path) -> Path:
    """The local HF folder of ``base`` (raises `ModelNotFoundError`, a FileNotFoundError, if none)."""
    return model_folder(base)


def base_config(base: str | Path) -> dict[str, Any]:
    """The base's full config (defaults included: config.json leaves out values equal to the class's
    defaults, e.g. ``tie_word_embeddings``), as a dict."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(base_folder(base), local_files_only=True).to_dict()


def architecture_of(config: dict[str, Any]) -> str | None:
    architectures = config.get("architectures") or []
    return str(architectures[0]) if architectures else None


class BaseWeights:
    """Read ``<module>.weight`` tensors of a base model one at a time (context manager)."""

    def __init__(self, base: str | Path) -> None:
        self._folder = ModelFolder(base_folder(base))

    def __enter__(self) -> BaseWeights:
        self._folder.__enter__()
        self._names = set(self._folder.names())
        return self

    def __exit__(self, *exc: object) -> None:
        self._folder.__exit__(*exc)

    def weight(self, module: str) -> torch.Tensor:
        """(out, in) weight of ``module`` (an embedding's is (num_embeddings, dim)); KeyError if absent."""
        return self._folder.get(resolve_base_name(module, self._names))
