"""Per-request sampling: greedy at temperature 0, else temperature and nucleus (top-p) sampling.

Each request owns a ``torch.Generator`` seeded from its ``seed``, so its tokens do not depend on which
other requests share the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """What one request asks of generation.

    Attributes:
        max_tokens: new tokens at most (>= 1).
        temperature: 0 is greedy; otherwise logits are divided by it before sampling.
        top_p: keep the smallest set of tokens whose probability reaches ``top_p`` (1: all).
        stop: strings that end the output (not included in it).
        seed: seed of this request's generator (None: a random one).
        ignore_eos: keep going past the end-of-sequence token (benchmarks).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")


def new_generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token id from ``logits`` (vocab,)."""
    if params.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        sorted_probs[before >= params.top_p] = 0  # the top token always stays (before = 0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def find_stop(text: str, stops: list[str], start: int = 0) -> int | None:
    """Index of the earliest stop string in ``text[start:]`` (as an index into ``text``), or None."""
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(found) if found else None


def held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of ``text`` could begin a stop string (not safe to stream yet)."""
    keep = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), keep, -1):
            if stop.startswith(text[-length:]):
                keep = length
                break
    return keep


def cut_at_stop(text: str, stops: list[str], emitted: int) -> tuple[str, bool]:
    """(``text`` cut before its earliest stop string, True) or (``text``, False) when none occurs.

    Only text from ``emitted`` (already streamed, so stop-free) minus the longest stop's overlap is searched.
    """
    if not stops:
        return text, False
    longest = max(len(s) for s in stops)
    cut = find_stop(text, stops, max(0, emitted - longest + 1))
    return (text, False) if cut is None else (text[:cut], True)


def safe_prefix(text: str, stops: list[str], emitted: int) -> int:
    """How much of ``text`` a running request may have streamed: nothing that could begin a stop string,
    no trailing incomplete UTF-8 sequence, and never less than ``emitted``."""
    safe = len(text) - held_back(text, stops)
    if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next byte
        safe = min(safe, len(text) - 1)
    return max(safe, emitted)
