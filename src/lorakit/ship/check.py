"""`check_adapter`: run one engine's rule table (`lorakit.ship.rules`) against an adapter folder."""

from __future__ import annotations

import os
from pathlib import Path

from lorakit.ship.base import architecture_of, base_config
from lorakit.ship.folder import read_adapter_folder
from lorakit.ship.rules import ENGINES, CheckResult, Facts, run_rules


def check_adapter(
    adapter: str | os.PathLike[str],
    target: str,
    *,
    max_lora_rank: int | None = None,
    base: str | Path | None = None,
) -> CheckResult:
    """Will ``target`` load ``adapter`` and compute what PEFT computes? (``result.ok``)

    Args:
        adapter: a PEFT adapter folder.
        target: one of ``vllm``, ``llama.cpp``, ``sglang``, ``lorax``.
        max_lora_rank: the server's ``--max-lora-rank`` (vLLM; default: vLLM's default, 16).
        base: the base model (built-in name, HF folder, .gguf); rules that need it become notes without it.

    Raises:
        ValueError: unknown target, a bad max_lora_rank, or an unreadable adapter.
        FileNotFoundError: the adapter or the base is missing.
    """
    if target not in ENGINES:
        raise ValueError(f"unknown target {target!r}; lorakit knows {', '.join(ENGINES)}")
    if max_lora_rank is not None and max_lora_rank < 1:
        raise ValueError(f"--max-lora-rank must be >= 1, got {max_lora_rank}")
    folder = read_adapter_folder(adapter)
    architecture = tied = None
    if base is not None:
        config = base_config(base)
        architecture = architecture_of(config)
        tied = bool(config.get("tie_word_embeddings", False))
    facts = Facts(folder, max_lora_rank=max_lora_rank, architecture=architecture, tied_embeddings=tied)
    return run_rules(target, facts)
