"""Helpers for the ship tests (no tests here): adapter folders written by peft itself, peft oracles."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import peft
import safetensors.torch
import torch
from conftest import tiny_llama, token_ids
from torch import nn

IDS = token_ids()


def peft_adapter(folder: Path, base: nn.Module | None = None, *, seed: int = 0, **lora: Any) -> Path:
    """Save a peft LoRA adapter with random (non-zero) A and B for ``base`` (default: tiny LLaMA)."""
    base = copy.deepcopy(base) if base is not None else tiny_llama()
    lora.setdefault("target_modules", ["q_proj", "k_proj", "v_proj", "o_proj"])
    lora.setdefault("init_lora_weights", False)
    torch.manual_seed(seed)
    model = peft.get_peft_model(base, peft.LoraConfig(**lora))
    if lora.get("use_dora"):
        # Move the magnitudes off ||W + sBA|| so that DoRA changes more than LoRA would.
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_magnitude_vector" in name:
                    parameter.mul_(1 + 0.3 * torch.rand_like(parameter))
    model.save_pretrained(str(folder))
    return folder


def raw_adapter(folder: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """An adapter folder written by hand (for files peft cannot produce for the tiny model)."""
    folder.mkdir(parents=True)
    full = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": [], **config}
    (folder / "adapter_config.json").write_text(json.dumps(full))
    safetensors.torch.save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def base_folder(folder: Path, **overrides: Any) -> Path:
    """tiny LLaMA saved as a Hugging Face folder (what --base takes)."""
    tiny_llama(**overrides).save_pretrained(str(folder))
    return folder


def peft_logits(adapter: Path, base: nn.Module | None = None) -> torch.Tensor:
    base = copy.deepcopy(base) if base is not None else tiny_llama()
    model = peft.PeftModel.from_pretrained(base, str(adapter)).eval()
    with torch.no_grad():
        return model(IDS).logits


def peft_merged_deltas(adapter: Path, base: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Module path -> W' − W from peft's own merge (the oracle for what an adapter computes)."""
    base = copy.deepcopy(base) if base is not None else tiny_llama()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merged = peft.PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    after = merged.state_dict()
    return {key.removesuffix(".weight"): (after[key] - before[key]).double()
            for key in before if key.endswith(".weight") and not torch.equal(after[key], before[key])}
