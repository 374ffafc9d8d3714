"""Adapters on disk and a per-request oracle for the serving tests (tiny models, no download)."""

from __future__ import annotations

from pathlib import Path

import torch

import lorakit
from lorakit import LoraConfig
from lorakit.models.tiny import tiny_llama, tiny_tokenizer

# Different ranks and targets, an rsLoRA adapter over every linear layer, and a DoRA adapter.
CONFIGS = {
    "a": LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    "b": LoraConfig(r=8, lora_alpha=4, target_modules="all-linear", use_rslora=True, init_lora_weights=False),
    "c": LoraConfig(r=2, target_modules=["down_proj"], layers_to_transform=[1], init_lora_weights=False),
    "d": LoraConfig(r=4, target_modules=["q_proj", "o_proj"], use_dora=True, init_lora_weights=False),
}


def write_adapters(folder: Path, names: list[str] | None = None, seed: int = 0) -> Path:
    """Save adapters ``names`` (default: all of CONFIGS) under ``folder/<name>`` in PEFT format."""
    for index, name in enumerate(names or list(CONFIGS)):
        write_adapter(folder / name, CONFIGS[name], seed + index)
    return folder


def write_adapter(path: Path, config: LoraConfig, seed: int) -> Path:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = lorakit.inject(tiny_llama(), config, "x")
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.mul_(3.0)  # big enough that every adapter changes the greedy tokens
                if "lora_magnitude_vector" in name:
                    parameter.mul_(torch.linspace(0.6, 1.4, parameter.numel()))
    lorakit.save_adapter(model, path, adapter_name="x")
    return path


def merged_greedy(prompt_ids: list[int], max_tokens: int,
                  adapters: dict[Path, float] | None = None) -> list[int]:
    """The oracle: a fresh tiny Llama with the adapter(s) merged (fp32), ``generate`` alone, greedy.

    ``adapters`` maps folders to weights; several are combined with ``combine_adapters(method="cat")``.
    """
    model = tiny_llama()
    if adapters:
        names = []
        for index, path in enumerate(adapters):
            names.append(f"s{index}")
            lorakit.load_adapter(model, path, adapter_name=names[-1])
        if len(names) == 1 and next(iter(adapters.values())) == 1.0:
            lorakit.set_adapter(model, names[0])
        else:
            lorakit.combine_adapters(model, dict(zip(names, adapters.values())), "sum", method="cat")
            lorakit.set_adapter(model, "sum")
        lorakit.merge(model)
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                             do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def tokenizer():
    return tiny_tokenizer()
