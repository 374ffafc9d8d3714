"""lorakit: LoRA, rsLoRA and DoRA for PyTorch models, in place, with PEFT-exact adapter files."""

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

__version__ = "0.1.0"

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
