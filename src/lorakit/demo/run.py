"""`lorakit demo`: teach SmolLM2-135M-Instruct a skill it lacks, and measure the gain on held-out examples.

The task (`lorakit.demo.task`) is rewriting an English date as ISO 8601. The run loads the model once,
scores the base model's greedy answers on the held-out prompts, injects a LoRA adapter, trains it with
the lorakit trainer on the generated training conversations, and scores the same held-out prompts again.
The held-out dates never appear in training (`task.make_split` checks it).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lorakit.config import LoraConfig
from lorakit.demo.task import exact_match_rate, make_split
from lorakit.model import inject
from lorakit.train.progress import TrainCallback


@dataclass(frozen=True)
class DemoRecipe:
    """The run's fixed settings; chosen by benchmarks/demo_recipe_search.py (see docs/demo.md)."""

    n_train: int = 2000
    n_heldout: int = 200
    seed: int = 0
    r: int = 16
    lora_alpha: float = 32
    lora_dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    lr: float = 2e-3
    steps: int = 80
    batch_size: int = 8
    warmup_steps: int = 10
    max_length: int = 96
    max_new_tokens: int = 12
    eval_batch_size: int = 50


@dataclass
class DemoResult:
    before: float
    after: float
    prompt: str
    reference: str
    answer_before: str
    answer_after: str
    adapter_dir: Path
    train_seconds: float
    total_seconds: float
    recipe: DemoRecipe = field(default_factory=DemoRecipe)


def run_demo(
    output: str | Path = "runs/demo",
    *,
    model_name: str = "smollm2-135m-instruct",
    recipe: DemoRecipe | None = None,
    progress: TrainCallback | None = None,
) -> DemoResult:
    """Run the demo; the adapter, data, metrics and a summary land in ``output``."""
    from lorakit.data import pad_collator, prepare_examples, rows_from_records
    from lorakit.models import load_causal_lm
    from lorakit.train import TrainConfig, fit
    from lorakit.train.evaluate import generate_answers
    from lorakit.train.prompts import prompts_and_references

    recipe = recipe or DemoRecipe()
    started = time.perf_counter()
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    split = make_split(recipe.n_train, recipe.n_heldout, recipe.seed)
    train_records = [{"messages": example.messages()} for example in split.train]
    heldout_records = [{"messages": example.messages()} for example in split.heldout]
    for name, records in (("train.jsonl", train_records), ("heldout.jsonl", heldout_records)):
        (output / name).write_text("".join(json.dumps(record) + "\n" for record in records))

    torch.manual_seed(recipe.seed)
    model, tokenizer = load_causal_lm(model_name)
    heldout_rows = rows_from_records(heldout_records, source=str(output / "heldout.jsonl"))
    prompt_ids, references = prompts_and_references(heldout_rows, tokenizer, "chat")

    def answers() -> list[str]:
        return generate_answers(model, tokenizer, prompt_ids, recipe.max_new_tokens, recipe.eval_batch_size)

    answers_before = answers()
    inject(model, LoraConfig(r=recipe.r, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
                             target_modules=list(recipe.targets), base_model_name_or_path=model_name))
    examples, _ = prepare_examples(
        rows_from_records(train_records, source=str(output / "train.jsonl")), tokenizer,
        format="chat", max_length=recipe.max_length,
    )
    config = TrainConfig(
        model=model_name, task="causal", lr=recipe.lr, steps=recipe.steps, batch_size=recipe.batch_size,
        warmup_steps=recipe.warmup_steps, scheduler="cosine", max_length=recipe.max_length,
        r=recipe.r, alpha=recipe.lora_alpha, dropout=recipe.lora_dropout, targets=list(recipe.targets),
        seed=recipe.seed, output=str(output), device="cpu",
        # The recipe was chosen and measured in fp32 (docs/demo.md); "auto" would pick bf16 on CPUs with
        # native bf16 and the demo's figures would depend on the machine.
        dtype="fp32",
    )
    train_started = time.perf_counter()
    fit(model, examples, config, collate=pad_collator(tokenizer), callback=progress)
    train_seconds = time.perf_counter() - train_started
    answers_after = answers()

    result = DemoResult(
        before=exact_match_rate(answers_before, references),
        after=exact_match_rate(answers_after, references),
        prompt=heldout_records[0]["messages"][0]["content"],
        reference=references[0],
        answer_before=answers_before[0].strip(),
        answer_after=answers_after[0].strip(),
        adapter_dir=output,
        train_seconds=train_seconds,
        total_seconds=time.perf_counter() - started,
        recipe=recipe,
    )
    summary = {**asdict(result), "adapter_dir": str(output)}
    (output / "demo_result.json").write_text(json.dumps(summary, indent=2) + "\n")
    return result
