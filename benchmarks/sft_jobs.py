"""The SFT jobs of `bench_sft.py` and the one judge of their adapters.

Two jobs, generated deterministically from a seed (no download):

- ``short``: the demo's task (`lorakit.demo.task`): an English date to rewrite as ISO 8601; answers of
  ~6 tokens, prompts of 20-40 tokens.
- ``long``: an inventory to rewrite line by line (``- COUNT ITEM`` for every ``ITEM: COUNT``), after a
  preamble of 0 to 14 filler sentences; answers of ~10-150 tokens, prompts of ~40-400 tokens, so that a
  padded batch is mostly padding (where length-aware batching matters).

Each job is written twice with the same conversations: ``*.chat.jsonl`` (``messages``, what
``lorakit train`` reads) and ``*.pc.jsonl`` (TRL's conversational prompt-completion format: ``prompt`` the
user turn, ``completion`` the assistant turn; TRL then computes the loss on the completion only, as
lorakit does on the assistant turn). Both are rendered by the model's chat template.

`judge` scores an adapter folder the same way whoever trained it: peft loads it on the fp32 base,
generates greedily from each held-out prompt (the chat template's generation prompt) and compares the
decoded reply with the reference after `normalise` (exact match).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Message = dict[str, str]

ITEMS = (
    "apples",
    "bolts",
    "candles",
    "drills",
    "envelopes",
    "feathers",
    "gloves",
    "hammers",
    "ink pots",
    "jars",
    "kettles",
    "ladders",
    "magnets",
    "nails",
    "oranges",
    "pencils",
    "quilts",
    "ropes",
    "saws",
    "tiles",
    "umbrellas",
    "valves",
    "wires",
    "yarn balls",
    "zippers",
    "buckets",
    "chisels",
    "lamps",
    "mirrors",
    "needles",
    "paint cans",
    "rivets",
    "screws",
    "towels",
    "wrenches",
    "brushes",
)
FILLER = (
    "The warehouse on the east side was repainted last spring.",
    "Deliveries usually arrive on Tuesday mornings before nine.",
    "Our supplier changed its packaging twice this year, which confused the night shift.",
    "Please ignore the handwritten notes on the back of the previous sheet.",
    "Some shelves near the loading dock are still waiting for new labels.",
    "The audit team asked for a cleaner format so that totals can be checked quickly.",
    "A few boxes were moved to the overflow room during the storm.",
    "Counts were taken by two people and compared at the end of the day.",
    "The manager wants the list in the new style before the end of the week.",
    "Nothing in this list has been reserved for the holiday orders yet.",
)
INSTRUCTION = "Rewrite every line of the inventory below as '- COUNT ITEM', in the same order."


@dataclass(frozen=True)
class Job:
    """One SFT job: training and held-out conversations (user turn, assistant turn)."""

    name: str
    train: tuple[tuple[str, str], ...]
    heldout: tuple[tuple[str, str], ...]
    max_new_tokens: int  # judge's generation budget: room for the longest reference

    def prompts(self) -> list[str]:
        return [prompt for prompt, _ in self.heldout]

    def references(self) -> list[str]:
        return [answer for _, answer in self.heldout]


def short_job(n_train: int, n_heldout: int, seed: int = 0) -> Job:
    """The demo's date task: disjoint training and held-out dates (`lorakit.demo.task.make_split`)."""
    from lorakit.demo.task import make_split

    split = make_split(n_train=n_train, n_heldout=n_heldout, seed=seed)

    def pairs(examples: Sequence[Any]) -> tuple[tuple[str, str], ...]:
        return tuple((example.messages()[0]["content"], example.answer) for example in examples)

    return Job("short", pairs(split.train), pairs(split.heldout), max_new_tokens=16)


def inventory_example(rng: random.Random) -> tuple[str, str]:
    """One long-job conversation: ``(prompt, answer)``; the answer has 2-24 lines, the preamble 0-14
    sentences, each chosen independently so that prompt and answer lengths vary widely."""
    lines = rng.randint(2, 24)
    items = rng.sample(ITEMS, lines)
    counts = [rng.randint(1, 999) for _ in items]
    preamble = " ".join(rng.choice(FILLER) for _ in range(rng.randint(0, 14)))
    inventory = "\n".join(f"{item}: {count}" for item, count in zip(items, counts, strict=True))
    prompt = (f"{preamble}\n\n" if preamble else "") + f"{INSTRUCTION}\n\nInventory:\n{inventory}"
    answer = "\n".join(f"- {count} {item}" for item, count in zip(items, counts, strict=True))
    return prompt, answer


def long_job(n_train: int, n_heldout: int, seed: int = 0) -> Job:
    """The inventory task: ``n_train + n_heldout`` distinct conversations from one seeded generator."""
    rng = random.Random(seed)
    seen: set[str] = set()
    examples: list[tuple[str, str]] = []
    while len(examples) < n_train + n_heldout:
        prompt, answer = inventory_example(rng)
        if prompt not in seen:  # held-out prompts never appear in training
            seen.add(prompt)
            examples.append((prompt, answer))
    return Job("long", tuple(examples[:n_train]), tuple(examples[n_train:]), max_new_tokens=200)


def chat_rows(pairs: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
    """``lorakit train``'s chat rows: ``{"messages": [user, assistant]}``."""
    return [
        {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]} for p, a in pairs
    ]


def prompt_completion_rows(pairs: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
    """TRL's conversational prompt-completion rows: loss on the completion only."""
    return [
        {"prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": a}]}
        for p, a in pairs
    ]


def write_jsonl(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_job(job: Job, folder: Path) -> dict[str, Path]:
    """The job's four files: ``{train,heldout}.{chat,pc}.jsonl`` under ``folder / job.name``."""
    base = folder / job.name
    return {
        "train_chat": write_jsonl(chat_rows(job.train), base / "train.chat.jsonl"),
        "heldout_chat": write_jsonl(chat_rows(job.heldout), base / "heldout.chat.jsonl"),
        "train_pc": write_jsonl(prompt_completion_rows(job.train), base / "train.pc.jsonl"),
        "heldout_pc": write_jsonl(prompt_completion_rows(job.heldout), base / "heldout.pc.jsonl"),
    }


# --- the judge ---------------------------------------------------------------------------------------------

_END_MARKERS = ("<|im_end|>", "<|endoftext|>", "</s>")


def normalise(text: str) -> str:
    """A reply as compared: end-of-turn markers cut, surrounding whitespace and quotes removed, inner
    lines stripped of trailing spaces."""
    for marker in _END_MARKERS:
        text = text.split(marker, 1)[0]
    lines = [line.rstrip() for line in text.strip().strip("'\"`").strip().splitlines()]
    return "\n".join(lines)


def exact_match_rate(replies: Sequence[str], references: Sequence[str]) -> float:
    """Share of replies equal to their reference after `normalise`; in [0, 1].

    Raises:
        ValueError: the two lists differ in length, or are empty.
    """
    if len(replies) != len(references) or not references:
        raise ValueError(f"{len(replies)} replies for {len(references)} references")
    hits = sum(normalise(reply) == normalise(reference) for reply, reference in zip(replies, references))
    return hits / len(references)


def greedy_replies(
    model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 16
) -> list[str]:
    """Greedy replies to single-turn user ``prompts`` (chat template with its generation prompt), batched
    with left padding; only the generated tokens are decoded."""
    import torch

    rendered = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        for prompt in prompts
    ]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    replies: list[str] = []
    try:
        for start in range(0, len(rendered), batch_size):
            batch = tokenizer(
                rendered[start : start + batch_size],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            )
            with torch.inference_mode():
                output = model.generate(
                    **batch,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )
            new = output[:, batch["input_ids"].shape[1] :]
            replies += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return replies


def judge(
    base_folder: str | Path,
    adapter_folder: str | Path | None,
    prompts: Sequence[str],
    references: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Exact match of the greedy replies of ``base_folder`` + the adapter (None: the base alone), peft as
    the neutral loader; the first three replies are kept for the report."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_folder)
    model = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    if adapter_folder is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_folder)).merge_and_unload()
    model.eval()
    replies = greedy_replies(model, tokenizer, prompts, max_new_tokens, batch_size)
    return {
        "exact_match": exact_match_rate(replies, references),
        "examples": len(references),
        "sample_replies": replies[:3],
    }
