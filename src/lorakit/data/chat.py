"""Render a conversation with the tokenizer's chat template and find the assistant turns in it.

The loss should cover what the assistant says (its content and the template's end-of-turn marker,
so the model learns to stop) and nothing else. Templates differ wildly, so instead of parsing the
rendered text we let the template tell us where each assistant turn lies: for turn ``i``,

    prompt  = render(messages[:i], add_generation_prompt=True)   # everything up to the reply
    through = render(messages[:i+1])                             # ... and the reply itself

If both are prefixes of the full rendering, the turn occupies ``[len(prompt), len(through))``.
Templates that rewrite earlier turns (e.g. drop old reasoning) break this; then we fall back to
finding the content itself after the previous turn, plus the eos token if it follows directly.
The character spans are turned into token labels with the tokenizer's offsets (``tokenize.py``),
which is robust to merges at the boundaries, unlike counting tokens of separately encoded pieces.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # only for annotations: importing lorakit.data does not load transformers
    from transformers import PreTrainedTokenizerBase

Span = tuple[int, int]


class ChatTemplateError(ValueError):
    """The chat template failed on, or could not locate the assistant turns of, a conversation."""


def render_chat(
    messages: Sequence[dict[str, Any]], tokenizer: PreTrainedTokenizerBase
) -> tuple[str, list[Span]]:
    """The conversation rendered by the chat template, and the character span of each assistant turn.

    Spans are ``(start, end)`` offsets into the returned text, in order and non-overlapping.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "the tokenizer has no chat template, needed for chat data; set tokenizer.chat_template or use "
            "format='text'"
        )
    full = _render(tokenizer, messages, add_generation_prompt=False)
    spans: list[Span] = []
    cursor = 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        span = _span_from_prefixes(tokenizer, messages, index, full)
        if span is None or span[0] < cursor:
            span = _span_from_content(message["content"], full, cursor, tokenizer.eos_token)
        if span is None:
            raise ChatTemplateError(
                f"cannot locate assistant turn {index} in the rendered conversation: the chat template "
                "neither renders prefixes stably nor keeps the content verbatim"
            )
        spans.append(span)
        cursor = span[1]
    return full, spans


def _render(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool
) -> str:
    try:
        text = tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as error:  # jinja raises TemplateError, and templates call raise_exception(...)
        raise ChatTemplateError(f"the chat template rejected the conversation: {error}") from None
    return str(text)


def _span_from_prefixes(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, Any]], index: int, full: str
) -> Span | None:
    try:
        through = _render(tokenizer, messages[: index + 1], add_generation_prompt=False)
        if index:
            prompt = _render(tokenizer, messages[:index], add_generation_prompt=True)
        else:
            # A conversation that opens with the assistant has no prompt to render: the turn
            # starts where its content does.
            content = messages[0]["content"]
            start = through.find(content) if content else -1
            if start < 0:
                return None
            prompt = through[:start]
    except ChatTemplateError:
        return None  # e.g. a template that refuses a conversation ending in a user turn
    # A trailer that a template writes only after the last turn of a conversation makes `through`
    # no prefix of `full` (the content fallback takes over), except for the last turn, which then
    # counts the trailer with its reply.
    if not full.startswith(through) or not through.startswith(prompt) or len(through) <= len(prompt):
        return None
    return len(prompt), len(through)


def _span_from_content(content: str, full: str, cursor: int, eos_token: str | None) -> Span | None:
    if not content:
        return None
    start = full.find(content, cursor)
    if start < 0:
        return None
    end = start + len(content)
    if eos_token and full.startswith(eos_token, end):
        end += len(eos_token)
    return start, end
