"""Prompts and reference answers for generation-based exact match, derived from chat/instruction rows.

The prompt must be token for token what the model saw before its answer in training, so it is rendered
the way `lorakit.data` renders the row: the chat template (with its generation prompt) for chat rows and
for instruction rows when the tokenizer has a template; otherwise the plain or Alpaca prompt text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lorakit.data.formats import chat_messages, detect_format, instruction_fields
from lorakit.data.load import ALPACA_PROMPT, ALPACA_PROMPT_WITH_INPUT
from lorakit.data.readers import Row


def prompts_and_references(
    rows: Sequence[Row], tokenizer: Any, format: str = "auto", limit: int | None = None
) -> tuple[list[list[int]], list[str]]:
    """``(prompt token ids, reference answers)`` for the first ``limit`` rows: the last reply is the answer.

    Raises:
        ValueError: the rows are not chat or instruction rows (text and classify have no answer to match).
    """
    choice = detect_format(rows, format)
    if choice.format not in ("chat", "instruction"):
        raise ValueError(
            f"exact match needs chat or instruction data with a reference answer, got {choice.description}"
        )
    prompt_ids: list[list[int]] = []
    references: list[str] = []
    for row in rows[:limit]:
        if choice.format == "chat":
            messages = chat_messages(row)
            last = max(i for i, message in enumerate(messages) if message["role"] == "assistant")
            ids = _chat_prompt_ids(tokenizer, messages[:last])
            answer = messages[last]["content"]
        else:
            item = instruction_fields(row)
            if getattr(tokenizer, "chat_template", None):
                content = f"{item.instruction}\n\n{item.input}" if item.input else item.instruction
                ids = _chat_prompt_ids(tokenizer, [{"role": "user", "content": content}])
            else:
                prompt = item.instruction
                if item.alpaca:
                    template = ALPACA_PROMPT_WITH_INPUT if item.input else ALPACA_PROMPT
                    prompt = template.format(instruction=item.instruction, input=item.input)
                ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
            answer = item.response
        prompt_ids.append(list(ids))
        references.append(answer)
    return prompt_ids, references


def _chat_prompt_ids(tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    # As lorakit.data does: render to text, then tokenise without adding special tokens (the template
    # writes BOS itself where the model wants one).
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
