"""Generation-based exact match: prompts derived from the data format, answers scored after normalising."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from train_support import IGNORE, write_chat_jsonl

from lorakit.data import load_examples, read_rows, rows_from_records
from lorakit.models import tiny_tokenizer
from lorakit.train.evaluate import exact_match_scorer, normalise_answer
from lorakit.train.prompts import prompts_and_references


def test_prompts_are_exactly_the_training_tokens_before_the_answer(tmp_path: Path) -> None:
    tokenizer = tiny_tokenizer()
    path = write_chat_jsonl(tmp_path / "chat.jsonl", 5)
    examples, _ = load_examples(path, tokenizer, max_length=128)
    prompt_ids, references = prompts_and_references(read_rows(path), tokenizer, limit=3)
    assert len(prompt_ids) == len(references) == 3
    for ids, reference, example in zip(prompt_ids, references, examples):
        first_label = next(i for i, label in enumerate(example["labels"]) if label != IGNORE)
        assert ids == example["input_ids"][:first_label]
        assert (
            tokenizer.decode(example["input_ids"][first_label:], skip_special_tokens=True).strip()
            == reference
        )


def test_instruction_rows_without_a_chat_template_use_the_same_prompt_as_training() -> None:
    tokenizer = tiny_tokenizer(chat_template=None)
    rows = rows_from_records([{"instruction": "Add", "input": "2 and 3", "output": "5"}])
    prompt_ids, references = prompts_and_references(rows, tokenizer)
    from lorakit.data import prepare_examples

    (example,), _ = prepare_examples(rows, tokenizer)
    first_label = next(i for i, label in enumerate(example["labels"]) if label != IGNORE)
    assert prompt_ids[0] == example["input_ids"][:first_label] and references == ["5"]


class _Parrot(nn.Module):
    """Generates a fixed continuation per prompt (keyed by prompt length): a stand-in for a trained model."""

    def __init__(self, replies: dict[int, list[int]]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.replies = replies

    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: object
    ) -> torch.Tensor:
        assert not self.training and not torch.is_grad_enabled()
        lengths = attention_mask.sum(-1).tolist()
        assert all(attention_mask[i, -1] == 1 for i in range(len(lengths)))  # left padding
        width = max(len(self.replies[n]) for n in lengths)
        tails = [self.replies[n] + [0] * (width - len(self.replies[n])) for n in lengths]
        return torch.cat([input_ids, torch.tensor(tails)], dim=1)


def test_exact_match_scores_normalised_answers() -> None:
    tokenizer = tiny_tokenizer()
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompts = [encode("a?"), encode("bb?"), encode("ccc?"), encode("dddd?")]
    replies = {
        2: encode(" Paris. "),
        3: encode("rome"),
        4: encode("Oslo"),
        5: encode("Lima!"),
    }  # by prompt length
    scorer = exact_match_scorer(prompts, ["paris", "Rome", "Bergen", "Lima"], tokenizer, batch_size=3)
    # "Paris." and "rome" match after normalising; "Oslo" is wrong; "Lima!" keeps its "!".
    assert scorer(_Parrot(replies)) == {"eval_exact_match": 0.5}
    assert normalise_answer("  The\n answer.  ") == "the answer"
