"""Helpers shared by the training tests (no tests here): tiny data, tiny adapted models.

The tiny models come from `lorakit.models.tiny`; the data are counting sequences (each token is the
previous one plus a step), which a tiny model learns within a few steps, with a masked prompt of varying
length so that micro-batches carry different numbers of label tokens.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lorakit
from lorakit.data import IGNORE_INDEX, PadCollator
from lorakit.models import tiny_llama, tiny_tokenizer

IGNORE = IGNORE_INDEX
COLLATE = PadCollator(pad_token_id=0)


def counting_examples(count: int = 32, seed: int = 0, vocab: int = 128) -> list[dict[str, list[int]]]:
    """Token sequences ``s, s+k, s+2k, ...`` (mod the vocabulary, ids >= 6), labels only after a prompt."""
    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        length = rng.randint(6, 16)
        start, step = rng.randrange(6, vocab), rng.choice((1, 2))
        ids = [6 + (start + step * i) % (vocab - 6) for i in range(length)]
        prompt = rng.randint(1, length - 2)
        examples.append(
            {"input_ids": ids, "attention_mask": [1] * length, "labels": [IGNORE] * prompt + ids[prompt:]}
        )
    return examples


def adapted_llama(
    seed: int = 0,
    dropout: float = 0.0,
    dtype: torch.dtype = torch.float32,
    r: int = 4,
    init: bool = True,
    **llama: Any,
) -> nn.Module:
    """A tiny Llama with a LoRA on every linear layer; the adapter init is seeded by ``seed``.

    ``init=False`` gives B random values too (PEFT's test init), so every factor gets a gradient at once.
    """
    model = tiny_llama(seed=0, **llama).to(dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lorakit.inject(
            model,
            lorakit.LoraConfig(
                r=r,
                lora_alpha=2 * r,
                lora_dropout=dropout,
                target_modules="all-linear",
                init_lora_weights=init,
            ),
        )
    return model


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def write_tiny_model(folder: Path, seed: int = 0) -> Path:
    """A tiny Llama and its character tokenizer saved as an HF folder (what --model accepts)."""
    tiny_llama(seed=seed).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def write_chat_jsonl(path: Path, count: int = 16, seed: int = 0) -> Path:
    """Chat examples whose answer is the question's word reversed (short: the tokenizer is per character)."""
    rng = random.Random(seed)
    words = ["cat", "dog", "sun", "map", "pen", "cup", "box", "hat", "key", "bus", "fox", "owl"]
    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(count):
            word = rng.choice(words)
            messages = [
                {"role": "user", "content": f"rev {word}"},
                {"role": "assistant", "content": word[::-1]},
            ]
            handle.write(json.dumps({"messages": messages}) + "\n")
    return path


def train_losses(output: Path) -> list[float]:
    from lorakit.train.metrics import read_metrics

    return [r["loss"] for r in read_metrics(output) if r["kind"] == "train"]
