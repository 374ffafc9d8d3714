"""The SDPA kernel of a training step: math for short sequences on a CPU, torch's choice otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_support import COLLATE, adapted_llama, counting_examples

from lorakit.train import TrainConfig, fit
from lorakit.train import attention_kernel as kernel_module
from lorakit.train.attention_kernel import MATH_MAX_LENGTH, attention_kernel_for

CPU = torch.device("cpu")


def _flash_allowed(context) -> bool:
    with context:
        return torch.backends.cuda.flash_sdp_enabled()


def test_math_kernel_for_short_cpu_batches_only() -> None:
    model = adapted_llama(attn_implementation="sdpa")
    choose = attention_kernel_for(model, CPU)
    assert not _flash_allowed(choose(MATH_MAX_LENGTH))  # the math kernel alone
    assert _flash_allowed(choose(MATH_MAX_LENGTH + 1))  # torch's own choice
    assert _flash_allowed(attention_kernel_for(model, torch.device("cuda"))(8))
    assert _flash_allowed(attention_kernel_for(adapted_llama(attn_implementation="eager"), CPU)(8))
    dropout = adapted_llama(attn_implementation="sdpa", attention_dropout=0.1)
    assert _flash_allowed(attention_kernel_for(dropout, CPU)(8))  # the math kernel would keep a mask
    assert torch.backends.cuda.flash_sdp_enabled()  # restored


def _run(output: Path, monkeypatch: pytest.MonkeyPatch, math_max: int) -> tuple[list, dict, set[str]]:
    """Losses, trained adapter and the attention operators a 3-step fp32 run called."""
    monkeypatch.setattr(kernel_module, "MATH_MAX_LENGTH", math_max)
    model = adapted_llama(attn_implementation="sdpa", init=False)
    config = TrainConfig(output=str(output), lr=1e-2, steps=3, batch_size=4, seed=0, dtype="fp32")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        result = fit(model, counting_examples(12), config, collate=COLLATE, adapter_writer=None)
    operators = {event.key for event in profile.key_averages() if "scaled_dot_product" in event.key}
    adapter = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    return result.losses, adapter, operators


def test_a_run_on_the_math_kernel_trains_as_on_flash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # counting examples are 6-16 tokens: every batch takes the math kernel, or (limit 0) none does
    math_losses, math_adapter, math_ops = _run(tmp_path / "math", monkeypatch, MATH_MAX_LENGTH)
    flash_losses, flash_adapter, flash_ops = _run(tmp_path / "flash", monkeypatch, 0)
    assert "aten::_scaled_dot_product_attention_math" in math_ops
    assert not any("flash" in op for op in math_ops)
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in flash_ops
    torch.testing.assert_close(math_losses, flash_losses, rtol=1e-5, atol=1e-6)
    for name, value in flash_adapter.items():
        torch.testing.assert_close(math_adapter[name], value, rtol=1e-4, atol=1e-6)
