"""Micro-batches cut by length (`split_by_length`, on by default): the cut is optimal for its cost, and a
run with it takes the same steps as the plain padded run (same losses, same gradients, same adapter)."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest
import torch
from train_support import COLLATE, IGNORE, adapted_llama, adapter_tensors

from lorakit.train import TrainConfig, fit
from lorakit.train.length_split import split_by_length
from lorakit.train.metrics import read_metrics


def _cost(groups: list[list[int]], lengths: list[int], overhead: int) -> int:
    return sum(len(g) * max(lengths[i] for i in g) + overhead for g in groups)


def _brute_force(indices: list[int], lengths: list[int], overhead: int) -> int:
    """Cheapest cost over every way of cutting the length-sorted indices into consecutive groups."""
    order = sorted(indices, key=lambda i: (lengths[i], i))
    best = None
    for cuts in itertools.product((False, True), repeat=len(order) - 1):
        groups, current = [], [order[0]]
        for index, cut in zip(order[1:], cuts, strict=True):
            if cut:
                groups.append(current)
                current = []
            current.append(index)
        groups.append(current)
        cost = _cost(groups, lengths, overhead)
        best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_the_cut_is_a_partition_and_optimal(seed: int) -> None:
    rng = random.Random(seed)
    lengths = [rng.choice((rng.randint(5, 40), rng.randint(100, 600))) for _ in range(9)]
    indices = rng.sample(range(9), 8)
    for overhead in (0, 64, 128, 1000):
        groups = split_by_length(indices, lengths, overhead)
        assert sorted(i for g in groups for i in g) == sorted(indices)
        assert _cost(groups, lengths, overhead) == _brute_force(indices, lengths, overhead)


def test_equal_lengths_stay_together_and_very_different_ones_split() -> None:
    assert split_by_length([3, 1, 2], [50] * 4) == [[1, 2, 3]]
    assert split_by_length([0, 1, 2, 3], [10, 500, 12, 480], overhead_tokens=128) == [[0, 2], [3, 1]]
    assert split_by_length([0, 1], [10, 500], overhead_tokens=10_000) == [[0, 1]]
    assert split_by_length([], []) == [] and split_by_length([4], [1] * 5) == [[4]]
    with pytest.raises(ValueError, match="overhead_tokens"):
        split_by_length([0], [1], overhead_tokens=-1)


def _examples(count: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """Short (6-20 tokens) and long (150-250 tokens) counting sequences, labels after a prompt."""
    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        length = rng.choice((rng.randint(6, 20), rng.randint(150, 250)))
        start = rng.randrange(6, 128)
        ids = [6 + (start + i) % 122 for i in range(length)]
        prompt = rng.randint(1, length - 2)
        examples.append(
            {"input_ids": ids, "attention_mask": [1] * length, "labels": [IGNORE] * prompt + ids[prompt:]}
        )
    return examples


def test_a_split_run_takes_the_steps_of_the_plain_run(tmp_path: Path) -> None:
    data = _examples(24, seed=1)
    runs = {}
    for split in (False, True):
        sizes: list[int] = []

        def collate(batch, sizes=sizes):
            sizes.append(len(batch))
            return COLLATE(batch)

        model = adapted_llama(dtype=torch.float64)
        output = tmp_path / f"split-{split}"
        config = TrainConfig(
            steps=3, batch_size=8, lr=1e-2, max_grad_norm=0.05, output=str(output), split_by_length=split
        )
        result = fit(model, data, config, collate=collate)
        norms = [r["grad_norm"] for r in read_metrics(output) if r["kind"] == "train"]
        runs[split] = (result.losses, norms, adapter_tensors(model), sizes)
    plain, split = runs[False], runs[True]
    assert plain[3] == [8, 8, 8]  # one padded micro-batch per step
    assert len(split[3]) > 3 and sum(split[3]) == 24  # the same examples, in more, smaller batches
    assert split[0] == pytest.approx(plain[0], rel=1e-12, abs=0)
    assert split[1] == pytest.approx(plain[1], rel=1e-10, abs=0)
    for name, tensor in plain[2].items():
        torch.testing.assert_close(split[2][name], tensor, rtol=1e-10, atol=1e-13, msg=name)
