"""AdamW over the trainable parameters only, LoRA+ groups, and the warmup schedules."""

from __future__ import annotations

import pytest
import torch
from train_support import adapted_llama

import lorakit
from lorakit.models import tiny_llama
from lorakit.train import TrainConfig
from lorakit.train.optim import build_optimizer, build_scheduler, lr_multiplier, parameter_groups


def _lrs_by_name(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    return {name: group["lr"] for group in optimizer.param_groups for name in group["param_names"]}


def test_loraplus_gives_every_lora_B_ratio_times_the_lr_and_keeps_it_through_the_schedule() -> None:
    model = adapted_llama()
    config = TrainConfig(lr=1e-3, loraplus_ratio=16, scheduler="cosine", warmup_steps=2)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, total_steps=10)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    for _ in range(5):
        optimizer.step()
        scheduler.step()
        lrs = _lrs_by_name(optimizer)
        assert set(lrs) == trainable  # every trainable parameter, nothing frozen
        a_lr = lrs["model.layers.0.self_attn.q_proj.lora_A.default.weight"]
        assert a_lr > 0
        for name, lr in lrs.items():
            expected = 16 * a_lr if ".lora_B." in name else a_lr
            assert lr == pytest.approx(expected, rel=1e-12), name


def test_without_loraplus_there_is_one_lr_and_1d_parameters_get_no_weight_decay() -> None:
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    groups = {g["name"]: g for g in parameter_groups(model, lr=0.1, weight_decay=0.01)}
    assert set(groups) == {"A", "no_decay"}
    assert all(
        name.endswith("lora_magnitude_vector.default.weight") for name in groups["no_decay"]["param_names"]
    )
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["A"]["weight_decay"] == 0.01
    assert {g["lr"] for g in groups.values()} == {0.1}


def test_a_model_without_trainable_parameters_is_refused() -> None:
    with pytest.raises(ValueError, match="no trainable parameters"):
        parameter_groups(tiny_llama().requires_grad_(False), lr=0.1)


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedules_equal_transformers_schedules(kind: str) -> None:
    from transformers.optimization import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    warmup, total = 3, 17
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    if kind == "cosine":
        reference = get_cosine_schedule_with_warmup(optimizer, warmup, total)
    elif kind == "linear":
        reference = get_linear_schedule_with_warmup(optimizer, warmup, total)
    else:
        reference = get_constant_schedule_with_warmup(optimizer, warmup)
    for step in range(total + 1):
        assert lr_multiplier(step, kind, warmup, total) == pytest.approx(
            reference.get_last_lr()[0], abs=1e-12
        )
        optimizer.step()
        reference.step()


def test_warmup_ratio_and_steps() -> None:
    model = adapted_llama()
    optimizer = build_optimizer(model, TrainConfig(lr=1.0))
    scheduler = build_scheduler(optimizer, TrainConfig(lr=1.0, warmup_ratio=0.25), total_steps=8)
    assert scheduler.get_last_lr()[0] == 0.0  # two warmup steps: 0, 0.5, then the peak
    optimizer.step()
    scheduler.step()
    assert scheduler.get_last_lr()[0] == pytest.approx(0.5)
