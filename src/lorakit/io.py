"""Kept so that ``lorakit.io`` imports keep working; the code lives in `lorakit.adapter_files` (saving and
loading a model's adapters) and `lorakit.peft_format` (the on-disk format)."""

from lorakit.adapter_files import (
    adapter_state_dict,
    load_adapter,
    load_adapter_state_dict,
    peft_config_dict,
    save_adapter,
)
from lorakit.peft_format import CONFIG_NAME, PEFT_PREFIX, WEIGHTS_NAME, lora_config_from_peft

__all__ = [
    "CONFIG_NAME", "PEFT_PREFIX", "WEIGHTS_NAME", "adapter_state_dict", "load_adapter",
    "load_adapter_state_dict", "lora_config_from_peft", "peft_config_dict", "save_adapter",
]
