"""`lorakit train --fsdp` under torchrun, 2 CPU processes (gloo), against one process (same global batch).

DoRA adapters: LoRA's A and B plus 1-D magnitude vectors, all sharded. The oracle is the single-process
run: same losses, gradient norms (clipping active, so the norm across shards must be the global one),
evaluation losses (an eval set that splits unevenly over the processes), checkpoint and adapter file.
The FSDP checkpoint then resumes on one process and under FSDP again, both giving the adapter of the
uninterrupted run.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from distributed_support import (
    FP32,
    assert_same_adapter,
    finish,
    torchrun,
    train_records,
    write_run,
)
from train_support import write_chat_jsonl, write_tiny_model

from lorakit.train import build_config, train
from lorakit.train.checkpoint import list_checkpoints, load_checkpoint
from lorakit.train.config import TrainConfig

STEPS = 3


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """One FSDP run (2 processes × micro-batch 2) and one single-process run (micro-batch 4)."""
    folder = tmp_path_factory.mktemp("fsdp")
    common = {
        "model": str(write_tiny_model(folder / "model")),
        "data": str(write_chat_jsonl(folder / "train.jsonl", 24)),
        "eval_data": str(write_chat_jsonl(folder / "eval.jsonl", 5, seed=1)),  # 3 + 2 examples per rank
        "eval_every": 2,
        "eval_batch_size": 2,
        "r": 4,
        "alpha": 8,
        "dora": True,  # DoRA's 1-D magnitude vectors are sharded too (and A, B as for LoRA)
        "dropout": 0.0,
        "lr": 1e-2,
        "max_grad_norm": 0.05,  # below the gradient norms: clipping acts on every step
        "steps": STEPS,
        "grad_accum": 2,
        "save_every": 2,
        "seed": 3,
        "device": "cpu",
        **FP32,
    }
    fsdp_config = write_run(folder, "fsdp", {**common, "batch_size": 2, "fsdp": True})
    launch = torchrun(folder, ["--standalone", "--nproc-per-node", "2"], fsdp_config)
    train(build_config(None, {**common, "batch_size": 4, "output": str(folder / "single")}))
    errors: list[str] = []
    (stdout,) = finish(launch, errors=errors)
    return {"folder": folder, "common": common, "stdout": stdout, "stderr": errors[0]}


def test_fsdp_trains_what_one_process_trains(runs: dict) -> None:
    folder: Path = runs["folder"]
    fsdp, single = folder / "fsdp", folder / "single"
    assert runs["stdout"].count(f"trained {STEPS}/{STEPS} steps") == 1  # rank 0 alone reports
    # Each process stores about half of the model (the layers' and the root's parameters are split in two).
    shares = re.findall(r"process (\d) holds (\d+) of the (\d+) parameter values", runs["stderr"])
    assert sorted(rank for rank, _, _ in shares) == ["0", "1"]
    for _, held, total in shares:
        assert 0.45 < int(held) / int(total) < 0.55
    assert train_records(fsdp, "loss") == pytest.approx(train_records(single, "loss"), rel=1e-5)
    norms = train_records(fsdp, "grad_norm")
    assert norms == pytest.approx(train_records(single, "grad_norm"), rel=1e-4)
    assert min(norms) > runs["common"]["max_grad_norm"]  # so clipping changed every update
    evaluated = train_records(fsdp, "eval_loss", kind="eval")
    assert len(evaluated) == 2 and evaluated == pytest.approx(
        train_records(single, "eval_loss", kind="eval"), rel=1e-5
    )
    # The adapter file is whole (not one rank's shards) and equals the single-process one.
    assert_same_adapter(fsdp, single)
    # So is the checkpoint: the full trainable tensors and AdamW moments, in the single-process format.
    assert [p.name for p in list_checkpoints(fsdp)] == ["step-00000002"]
    sharded = load_checkpoint(list_checkpoints(fsdp)[0])
    plain = load_checkpoint(list_checkpoints(single)[0])
    assert set(sharded["trainable"]) == set(plain["trainable"])
    for name, tensor in plain["trainable"].items():
        assert type(sharded["trainable"][name]) is torch.Tensor
        torch.testing.assert_close(sharded["trainable"][name], tensor, rtol=1e-4, atol=1e-6, msg=name)
    for index, moments in plain["optimizer"]["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            got = sharded["optimizer"]["state"][index][key]
            assert type(got) is torch.Tensor and got.shape == moments[key].shape
            torch.testing.assert_close(got, moments[key], rtol=1e-4, atol=1e-8)
    assert sharded["world_size"] == 2


def _copy_for_resume(folder: Path, name: str) -> Path:
    """The FSDP run folder as it stood before its last step: checkpoint step 2, not finished."""
    copy = folder / name
    shutil.copytree(folder / "fsdp", copy)
    for leftover in ("run_state.json", "adapter_model.safetensors", "adapter_config.json"):
        (copy / leftover).unlink()
    return copy


def test_fsdp_checkpoint_resumes_on_one_process_and_under_fsdp(runs: dict) -> None:
    folder: Path = runs["folder"]
    common = runs["common"]
    # Under FSDP again (2 processes) ...
    _copy_for_resume(folder, "resumed_fsdp")
    config = write_run(folder, "resumed_fsdp", {**common, "batch_size": 2, "fsdp": True, "resume": True})
    launch = torchrun(folder, ["--standalone", "--nproc-per-node", "2"], config)
    # ... and meanwhile on one process (the same global batch, 4 × 1).
    one = _copy_for_resume(folder, "resumed_one")
    result = train(TrainConfig(**{**common, "batch_size": 4, "output": str(one), "resume": True}))
    finish(launch)
    assert result.resumed_from is not None and result.resumed_from.name == "step-00000002"
    assert result.losses == pytest.approx(train_records(folder / "single", "loss")[2:], rel=1e-5)
    assert_same_adapter(one, folder / "single")
    assert_same_adapter(folder / "resumed_fsdp", folder / "fsdp", rtol=1e-5)
    assert train_records(folder / "resumed_fsdp", "loss") == pytest.approx(
        train_records(folder / "fsdp", "loss"), rel=1e-5
    )


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"quantize": "nf4"}, "4-bit"),
        ({"method": "full"}, "full fine-tuning"),
        ({"exact_match_examples": 2}, "exact-match"),
    ],
)
def test_fsdp_refuses_what_it_cannot_shard_before_anything_loads(options: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        TrainConfig(fsdp=True, **options)


def test_fsdp_on_one_process_trains_as_without_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    common = {
        "model": str(write_tiny_model(tmp_path / "model")),
        "data": str(write_chat_jsonl(tmp_path / "train.jsonl", 8)),
        "r": 2,
        "dropout": 0.0,
        "steps": 2,
        "batch_size": 4,
        "device": "cpu",
        **FP32,
    }
    with caplog.at_level("INFO", logger="lorakit.train.fsdp"):
        train(TrainConfig(**common, fsdp=True, output=str(tmp_path / "fsdp")))
    assert "one process, nothing to shard" in caplog.text
    train(TrainConfig(**common, output=str(tmp_path / "plain")))
    assert_same_adapter(tmp_path / "fsdp", tmp_path / "plain", rtol=0, atol=0)
