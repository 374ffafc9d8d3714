"""The training loop: accumulation, determinism, resume, checkpoints, early stopping, bf16, checkpointing."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from train_support import (
    COLLATE,
    adapted_llama,
    adapter_tensors,
    counting_examples,
    train_losses,
)

import lorakit
from lorakit.models import tiny_bert
from lorakit.train import TrainCallback, TrainConfig, fit
from lorakit.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from lorakit.train.loop import enable_gradient_checkpointing
from lorakit.train.loss import causal_lm_loss_sum
from lorakit.train.metrics import read_metrics


def _config(output: Path, **changes: Any) -> TrainConfig:
    values: dict[str, Any] = {
        "output": str(output),
        "lr": 1e-2,
        "steps": 4,
        "batch_size": 4,
        "warmup_steps": 1,
        "seed": 0,
    }
    values.update(changes)
    return TrainConfig(**values)


def _fit(model: torch.nn.Module, output: Path, data: list | None = None, **changes: Any):
    return fit(
        model,
        data if data is not None else counting_examples(32),
        _config(output, **changes),
        collate=COLLATE,
        adapter_writer=None,
    )


class _CrashAt(TrainCallback):
    """Raises after optimizer step ``step``, like a process killed mid-run."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step(self, record: dict[str, Any]) -> None:
        if record["step"] == self.step:
            raise KeyboardInterrupt(f"simulated crash after step {self.step}")


# --- gradient accumulation ------------------------------------------------------------------------------


def test_accumulated_micro_batches_give_the_update_of_one_big_batch(tmp_path: Path) -> None:
    data = counting_examples(24, seed=5)  # label counts differ from example to example
    runs = {}
    for batch_size, grad_accum in ((8, 1), (2, 4), (1, 8)):
        model = adapted_llama(dtype=torch.float64)
        out = tmp_path / f"b{batch_size}"
        result = _fit(
            model, out, data, steps=3, batch_size=batch_size, grad_accum=grad_accum, max_grad_norm=0.05
        )
        records = [r for r in read_metrics(out) if r["kind"] == "train"]
        runs[batch_size] = (result.losses, [r["grad_norm"] for r in records], adapter_tensors(model))
    reference_losses, reference_norms, reference_weights = runs[8]
    assert reference_norms[0] > 0.05  # clipping is active, so it must act on the accumulated gradient
    for batch_size in (2, 1):
        losses, norms, weights = runs[batch_size]
        assert losses == pytest.approx(reference_losses, rel=1e-12, abs=0)
        assert norms == pytest.approx(reference_norms, rel=1e-10, abs=0)
        for name, tensor in reference_weights.items():
            torch.testing.assert_close(weights[name], tensor, rtol=1e-10, atol=1e-13, msg=name)


# --- determinism and resume ------------------------------------------------------------------------------


def test_same_seed_same_losses_other_seed_other_losses(tmp_path: Path) -> None:
    first = _fit(adapted_llama(dropout=0.2), tmp_path / "a").losses
    again = _fit(adapted_llama(dropout=0.2), tmp_path / "b").losses
    other = _fit(adapted_llama(dropout=0.2), tmp_path / "c", seed=1).losses
    assert first == again
    assert first != other


def test_a_run_interrupted_and_resumed_has_the_loss_curve_of_an_uninterrupted_run(tmp_path: Path) -> None:
    # Dropout > 0: the resumed run only matches if the RNG state was restored, and AdamW's moments and the
    # schedule position must come back too. grad_accum 2 and 2 epochs exercise the data position.
    options = {"steps": 8, "save_every": 3, "grad_accum": 2, "batch_size": 2, "scheduler": "cosine"}
    data = counting_examples(20)
    straight = adapted_llama(dropout=0.3)
    _fit(straight, tmp_path / "straight", data, **options)

    crashed = tmp_path / "crashed"
    with pytest.raises(KeyboardInterrupt):
        fit(
            adapted_llama(dropout=0.3),
            data,
            _config(crashed, **options),
            collate=COLLATE,
            callback=_CrashAt(5),
            adapter_writer=None,
        )
    assert [p.name for p in list_checkpoints(crashed)] == ["step-00000003"]
    resumed_model = adapted_llama(dropout=0.3)
    result = fit(
        resumed_model, data, _config(crashed, resume=True, **options), collate=COLLATE, adapter_writer=None
    )
    assert result.resumed_from == crashed / "checkpoints" / "step-00000003"
    assert len(result.losses) == 5

    expected = train_losses(tmp_path / "straight")
    assert len(expected) == 8
    assert train_losses(crashed) == pytest.approx(expected, rel=0, abs=1e-6)
    for name, tensor in adapter_tensors(straight).items():
        torch.testing.assert_close(adapter_tensors(resumed_model)[name], tensor, rtol=0, atol=1e-6)


def test_resume_refuses_a_different_global_batch(tmp_path: Path) -> None:
    _fit(adapted_llama(), tmp_path, steps=3, save_every=2)
    with pytest.raises(ValueError, match="global batches of 4"):
        _fit(adapted_llama(), tmp_path, steps=3, batch_size=2, resume=True)


def test_resume_true_without_a_checkpoint_starts_afresh(tmp_path: Path) -> None:
    result = _fit(adapted_llama(), tmp_path, steps=2, resume=True)
    assert result.resumed_from is None and result.step == 2


# --- checkpoints -----------------------------------------------------------------------------------------


def test_checkpoints_hold_everything_needed_to_resume(tmp_path: Path) -> None:
    model = adapted_llama()
    fit(
        model,
        counting_examples(32),
        _config(tmp_path, steps=5, save_every=2, keep_checkpoints=1),
        collate=COLLATE,
    )
    found = list_checkpoints(tmp_path)
    assert [p.name for p in found] == ["step-00000004"]  # step 2 was rotated out, none at the last step
    state = load_checkpoint(found[0])
    assert set(state) >= {"trainable", "optimizer", "scheduler", "rng", "position", "early_stopping"}
    assert state["position"] == {"step": 4, "epoch": 0, "batch_index": 4}
    assert set(state["rng"][0]) >= {"python", "numpy", "torch"}
    assert state["optimizer"]["state"]  # AdamW moments
    # The checkpoint folder is also a usable adapter, in PEFT's layout.
    assert (found[0] / "adapter_config.json").is_file() and (found[0] / "adapter_model.safetensors").is_file()


def test_a_checkpoint_write_that_dies_leaves_the_previous_checkpoint_intact(
    tmp_path: Path, monkeypatch
) -> None:
    save_checkpoint(tmp_path, 1, {"value": torch.ones(2)})
    real_save = torch.save

    def dying_save(obj: Any, path: Any, *args: Any, **kwargs: Any) -> None:
        real_save(obj, path, *args, **kwargs)  # the file is (partly) written ...
        raise OSError("disk full")  # ... and then the write fails

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, {"value": torch.zeros(2)})
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000001"]
    assert latest_checkpoint(tmp_path).name == "step-00000001"
    torch.testing.assert_close(load_checkpoint(latest_checkpoint(tmp_path))["value"], torch.ones(2))

    # A process killed outright leaves its temporary folder: never taken for a checkpoint, removed by the
    # next write of the same checkpoint (only once its writer is gone: a live writer's is kept).
    finished = subprocess.Popen(["true"])
    finished.wait()
    leftover = tmp_path / "checkpoints" / f".step-00000003.lorakit-tmp-{finished.pid}-dead"
    leftover.mkdir()
    (leftover / "trainer_state.pt").write_bytes(b"truncated")
    assert latest_checkpoint(tmp_path).name == "step-00000001"
    save_checkpoint(tmp_path, 3, {"value": torch.full((2,), 3.0)})
    assert not leftover.exists()
    assert latest_checkpoint(tmp_path).name == "step-00000003"


# --- evaluation and early stopping -----------------------------------------------------------------------


def test_early_stopping_stops_after_patience_and_keeps_the_best_adapter(tmp_path: Path) -> None:
    scores = iter([0.2, 0.6, 0.5, 0.4, 0.9])  # best at the 2nd evaluation, then two worse ones

    def scorer(model: torch.nn.Module) -> dict[str, float]:
        return {"exact_match": next(scores)}

    model = adapted_llama()
    data = counting_examples(32)
    result = fit(
        model,
        data,
        _config(
            tmp_path / "stop", steps=10, eval_every=2, eval_metric="exact_match", early_stopping_patience=2
        ),
        collate=COLLATE,
        eval_data=data[:6],
        scorer=scorer,
        adapter_writer=None,
    )
    assert result.stopped_early and result.step == 8
    assert result.best_metric == 0.6 and result.best_step == 4
    assert [r["eval_exact_match"] for r in result.eval_history] == [0.2, 0.6, 0.5, 0.4]
    assert all(math.isfinite(r["eval_loss"]) for r in result.eval_history)

    # The adapter left in the model is the one of step 4: a run stopped there by hand has the same weights
    # (same schedule length, so the same learning rates).
    best = adapted_llama()
    crashed = tmp_path / "best"
    with pytest.raises(KeyboardInterrupt):
        fit(
            best, data, _config(crashed, steps=10), collate=COLLATE, callback=_CrashAt(4), adapter_writer=None
        )
    for name, tensor in adapter_tensors(best).items():
        torch.testing.assert_close(adapter_tensors(model)[name], tensor, rtol=0, atol=0)


def test_evaluation_loss_falls_and_metrics_and_plot_are_written(tmp_path: Path) -> None:
    data = counting_examples(40)
    result = fit(
        adapted_llama(),
        data[:32],
        _config(tmp_path, steps=8, eval_every=4, lr=2e-2, batch_size=8),
        collate=COLLATE,
        eval_data=data[32:],
        adapter_writer=None,
    )
    evals = [r["eval_loss"] for r in result.eval_history]
    assert [r["step"] for r in result.eval_history] == [4, 8]
    assert evals[1] < evals[0]
    records = read_metrics(tmp_path)
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 9))
    assert all(r["tokens_per_s"] > 0 and r["label_tokens"] > 0 for r in train)
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_classification_trains_with_accuracy(tmp_path: Path) -> None:
    model = tiny_bert(num_labels=2)
    torch.manual_seed(0)
    lorakit.inject(
        model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="SEQ_CLS")
    )
    # The label is whether the sequence starts with a low or a high token: learnable in a few steps.
    generator = torch.Generator().manual_seed(0)
    data = []
    for index in range(48):
        ids = torch.randint(10, 120, (8,), generator=generator).tolist()
        ids[0] = 10 if index % 2 else 100
        data.append({"input_ids": ids, "attention_mask": [1] * 8, "labels": index % 2})
    result = fit(
        model,
        data[:32],
        _config(tmp_path, task="classify", steps=12, lr=5e-2, batch_size=8, eval_every=12),
        collate=COLLATE,
        eval_data=data[32:],
        adapter_writer=None,
    )
    assert result.losses[-1] < result.losses[0]
    assert result.eval_history[-1]["eval_accuracy"] == 1.0


# --- bf16 autocast and gradient checkpointing ------------------------------------------------------------


def test_bf16_autocast_trains_with_fp32_adapters(tmp_path: Path) -> None:
    fp32 = _fit(adapted_llama(), tmp_path / "fp32", steps=3).losses
    model = adapted_llama()
    seen: list[torch.dtype] = []
    model.model.layers[0].self_attn.q_proj.base_layer.register_forward_hook(
        lambda m, i, o: seen.append(o.dtype)
    )
    bf16 = _fit(model, tmp_path / "bf16", steps=3, bf16=True).losses
    assert set(seen) == {torch.bfloat16}  # autocast was on in the forward pass
    assert all(p.dtype == torch.float32 for p in adapter_tensors(model).values())
    assert bf16 == pytest.approx(fp32, rel=2e-2)
    assert bf16 != fp32


def test_gradient_checkpointing_gives_the_adapters_the_same_gradients(tmp_path: Path) -> None:
    batch = COLLATE(counting_examples(4))
    grads = []
    layer_calls = []
    for checkpointing in (False, True):
        model = adapted_llama(dtype=torch.float64, init=False).train()
        if checkpointing:
            enable_gradient_checkpointing(model)
        layer = model.model.layers[0].self_attn.q_proj
        handle = layer.register_forward_hook(lambda *args, flag=checkpointing: layer_calls.append(flag))
        causal_lm_loss_sum(model, batch).backward()
        handle.remove()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    plain, checkpointed = grads
    # Only the base is frozen: every adapter parameter gets a gradient, and it is the same.
    assert all(grad is not None for grad in checkpointed.values())
    assert all(float(grad.abs().sum()) > 0 for grad in checkpointed.values())
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-10, atol=1e-14, msg=name)
    # The checkpointed run recomputed the block in backward: its q_proj ran twice.
    assert layer_calls.count(False) == 1 and layer_calls.count(True) == 2


def test_grad_checkpointing_in_a_training_run(tmp_path: Path) -> None:
    plain = _fit(adapted_llama(dropout=0.1), tmp_path / "a", steps=2).losses
    checkpointed = _fit(adapted_llama(dropout=0.1), tmp_path / "b", steps=2, grad_checkpointing=True).losses
    assert checkpointed == pytest.approx(plain, rel=1e-5)


def test_eval_loss_in_length_order_equals_the_per_example_mean() -> None:
    """Evaluation batches the longest examples first (less padding); the mean loss over label tokens is
    the same as one example at a time, in the data's order."""
    import contextlib

    from lorakit.train.distributed import Distributed
    from lorakit.train.evaluate import evaluate_loss
    from lorakit.train.loss import LossModule, count_label_tokens

    model = adapted_llama().eval()
    examples = counting_examples(7, seed=5)
    assert len({len(e["input_ids"]) for e in examples}) > 2  # lengths differ: the order matters
    module = LossModule(model, "causal")
    metrics = evaluate_loss(module, examples, COLLATE, 3, Distributed(), contextlib.nullcontext)
    total, targets = 0.0, 0
    with torch.no_grad():
        for example in examples:
            batch = COLLATE([example])
            total += float(module(batch)[0])
            targets += count_label_tokens(batch, "causal")
    assert metrics["eval_loss"] == pytest.approx(total / targets, rel=1e-5)
