"""lorakit: LoRA, rsLoRA and DoRA for PyTorch models, in place, with PEFT-exact adapter files.

The public names below load on first use (PEP 562 module ``__getattr__``): ``import lorakit`` alone
imports no torch, so the command line (``lorakit.cli``, a sub-package) prints its help without paying
for torch's start-up; ``from lorakit import inject`` works as usual.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    "load_adapter": "lorakit.adapter_files",
    "save_adapter": "lorakit.adapter_files",
    "combine_adapters": "lorakit.combine",
    "LoraConfig": "lorakit.config",
    "adapter_per_row": "lorakit.mixed",
    "active_adapters": "lorakit.model",
    "adapter_configs": "lorakit.model",
    "add_adapter": "lorakit.model",
    "delete_adapter": "lorakit.model",
    "disable_adapters": "lorakit.model",
    "inject": "lorakit.model",
    "merge": "lorakit.model",
    "merge_and_unload": "lorakit.model",
    "set_adapter": "lorakit.model",
    "trainable_parameters": "lorakit.model",
    "unload": "lorakit.model",
    "unmerge": "lorakit.model",
}

__all__ = [
    "LoraConfig",
    "active_adapters",
    "adapter_configs",
    "adapter_per_row",
    "add_adapter",
    "combine_adapters",
    "delete_adapter",
    "disable_adapters",
    "inject",
    "load_adapter",
    "merge",
    "merge_and_unload",
    "save_adapter",
    "set_adapter",
    "trainable_parameters",
    "unload",
    "unmerge",
]

if TYPE_CHECKING:  # the names as static tools see them
    from lorakit.adapter_files import load_adapter, save_adapter
    from lorakit.combine import combine_adapters
    from lorakit.config import LoraConfig
    from lorakit.mixed import adapter_per_row
    from lorakit.model import (
        active_adapters,
        adapter_configs,
        add_adapter,
        delete_adapter,
        disable_adapters,
        inject,
        merge,
        merge_and_unload,
        set_adapter,
        trainable_parameters,
        unload,
        unmerge,
    )


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'lorakit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
