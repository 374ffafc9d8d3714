"""Built-in models (from PyPI packages), GGUF conversion cache, NF4 loading, and tiny test models.

Heavy imports (transformers) happen on first use of a function, not on ``import lorakit.models``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lorakit.models.registry import (
    BUILTIN_MODELS,
    DEFAULT_CAUSAL_LM,
    DEFAULT_CLASSIFIER,
    BuiltinModel,
    ModelNotFoundError,
    ModelSource,
    locate,
)

if TYPE_CHECKING:
    from lorakit.models.gguf_cache import converted_folder, default_cache_dir
    from lorakit.models.loading import load_causal_lm, load_classifier, model_folder, parse_dtype
    from lorakit.models.tiny import tiny_bert, tiny_llama, tiny_tokenizer
    from lorakit.models.tiny_gguf import write_tiny_llama_gguf

_LAZY = {
    "load_causal_lm": "lorakit.models.loading",
    "load_classifier": "lorakit.models.loading",
    "model_folder": "lorakit.models.loading",
    "parse_dtype": "lorakit.models.loading",
    "converted_folder": "lorakit.models.gguf_cache",
    "default_cache_dir": "lorakit.models.gguf_cache",
    "tiny_llama": "lorakit.models.tiny",
    "tiny_bert": "lorakit.models.tiny",
    "tiny_tokenizer": "lorakit.models.tiny",
    "write_tiny_llama_gguf": "lorakit.models.tiny_gguf",
}

__all__ = [
    "BUILTIN_MODELS",
    "DEFAULT_CAUSAL_LM",
    "DEFAULT_CLASSIFIER",
    "BuiltinModel",
    "ModelNotFoundError",
    "ModelSource",
    "converted_folder",
    "default_cache_dir",
    "load_causal_lm",
    "load_classifier",
    "locate",
    "model_folder",
    "parse_dtype",
    "tiny_bert",
    "tiny_llama",
    "tiny_tokenizer",
    "write_tiny_llama_gguf",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lorakit.models' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
