"""A generation request as the engine tracks it, and the events it reports back.

The engine calls ``request.on_event`` from its own thread for every piece of output; a server hands these
on to its clients (the engine knows nothing of HTTP).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lorakit.serve.errors import ServeError
from lorakit.serve.sampling import SamplingParams, new_generator

_IDS = itertools.count()


@dataclass
class Event:
    """Output of one request since its previous event.

    Attributes:
        text: new text (held back while it could still turn into a stop string).
        token_ids: new token ids.
        finish_reason: None while running; ``"stop"`` (eos or a stop string), ``"length"``, ``"cancelled"``
            or ``"error"`` at the end.
        error: the refusal when ``finish_reason == "error"``.
    """

    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: ServeError | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(eq=False)
class Request:
    """One prompt (token ids), the model it names (adapter, combination or None: base) and its sampling."""

    prompt_ids: list[int]
    model: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    on_event: Callable[[Event], None] | None = None
    request_id: str = field(default_factory=lambda: f"req-{next(_IDS)}")
    # Engine state.
    generated: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    slot: int = 0
    arrival: float = field(default_factory=time.perf_counter)
    last_token_time: float | None = None
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ServeError("the prompt is empty", param="prompt")
        self.generator = new_generator(self.params.seed)

    def emit(self, event: Event) -> None:
        if self.on_event is not None:
            self.on_event(event)


def collector(summary: Event) -> Callable[[Event], None]:
    """An ``on_event`` that accumulates a request's events into ``summary`` (text, tokens, the ending)."""
    def collect(event: Event) -> None:
        summary.text += event.text
        summary.token_ids.extend(event.token_ids)
        if event.finished:
            summary.finish_reason, summary.error = event.finish_reason, event.error
            summary.prompt_tokens, summary.completion_tokens = event.prompt_tokens, event.completion_tokens
    return collect
