"""Evaluation: loss (and accuracy for classifiers) over an eval set, and generation-based exact match."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lorakit.train.distributed import Distributed
from lorakit.train.length_split import example_lengths
from lorakit.train.loss import LossModule, count_label_tokens
from lorakit.train.sampler import shard_indices

Collate = Callable[[list[Any]], dict[str, torch.Tensor]]
# A scorer takes the model (in eval mode, no grad) and returns metrics named "eval_<something>".
Scorer = Callable[[nn.Module], dict[str, float]]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and no grad inside; the previous train/eval mode after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
    }


def evaluate_loss(
    loss_module: LossModule,
    dataset: Sequence[Any],
    collate: Collate,
    batch_size: int,
    context: Distributed,
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> dict[str, float]:
    """``eval_loss`` (mean over all label tokens of the set) and, for classification, ``eval_accuracy``.

    Each process evaluates its shard (every ``world_size``-th example), longest examples first so that a
    batch holds similar lengths (less padding); the sums are added over processes,
    so the result is the same on every process and for any number of processes.
    """
    task = loss_module.task
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, targets, correct
    indices = shard_indices(len(dataset), context.world_size, context.rank)
    lengths = example_lengths(dataset)
    if lengths is not None:  # batches of similar lengths pad less; the sums do not depend on the order
        indices = sorted(indices, key=lambda i: lengths[i], reverse=True)
    starts: list[int | None] = list(range(0, len(indices), batch_size))
    # Under FSDP every forward is a collective: each process runs as many batches as the busiest one,
    # the extra ones on example 0, not counted.
    starts += [None] * (max(context.gather_objects(len(starts))) - len(starts))
    with eval_mode(loss_module):
        for start in starts:
            chosen = [0] if start is None else indices[start : start + batch_size]
            batch = to_device(collate([dataset[i] for i in chosen]), context.device)
            with autocast():
                loss_sum, logits = loss_module(batch)
            if start is None:
                continue
            totals[0] += float(loss_sum)
            totals[1] += count_label_tokens(batch, task)
            if task == "classify":
                totals[2] += float((logits.argmax(-1) == batch["labels"]).sum())
    totals = context.all_reduce_sum(totals)
    metrics = {"eval_loss": float(totals[0] / totals[1].clamp(min=1))}
    if task == "classify":
        metrics["eval_accuracy"] = float(totals[2] / totals[1].clamp(min=1))
    return metrics


def normalise_answer(text: str) -> str:
    """Lower case, single spaces, no surrounding whitespace or final period: what exact match compares."""
    return re.sub(r"\s+", " ", text).strip().rstrip(".").strip().lower()


def exact_match_scorer(
    prompt_ids: Sequence[Sequence[int]],
    references: Sequence[str],
    tokenizer: Any,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> Scorer:
    """A scorer that generates greedily from each prompt and returns ``eval_exact_match`` in [0, 1].

    ``prompt_ids`` are the token ids the model sees before its answer, exactly as in training (a chat
    prompt rendered with its generation prompt); the generated continuation is decoded and compared to
    its reference after `normalise_answer`.
    """
    if len(prompt_ids) != len(references):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(references)} references")

    def score(model: nn.Module) -> dict[str, float]:
        answers = generate_answers(model, tokenizer, prompt_ids, max_new_tokens, batch_size, autocast)
        hits = sum(normalise_answer(a) == normalise_answer(r) for a, r in zip(answers, references))
        return {"eval_exact_match": hits / max(len(references), 1)}

    return score


def generate_answers(
    model: nn.Module,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_size: int = 8,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> list[str]:
    """Greedy continuations of the prompts (token ids in, text out), batched with left padding."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers: list[str] = []
    with eval_mode(model):
        for start in range(0, len(prompt_ids), batch_size):
            rows = [list(ids) for ids in prompt_ids[start : start + batch_size]]
            width = max(len(row) for row in rows)
            # Generation appends on the right, so the padding goes on the left.
            input_ids = torch.tensor([[pad_id] * (width - len(row)) + row for row in rows], device=device)
            attention_mask = torch.tensor(
                [[0] * (width - len(row)) + [1] * len(row) for row in rows], device=device
            )
            with autocast():
                output = model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=pad_id,
                )
            answers.extend(tokenizer.batch_decode(output[:, width:], skip_special_tokens=True))
    return answers
