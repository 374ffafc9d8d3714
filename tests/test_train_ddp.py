"""`lorakit train` under torchrun, 2 CPU processes (gloo), equals one process with the same global batch."""

from __future__ import annotations

from pathlib import Path

import pytest
from distributed_support import FP32, assert_same_adapter, finish, torchrun, train_records, write_run
from safetensors.torch import load_file
from train_support import train_losses, write_chat_jsonl, write_tiny_model

from lorakit.train import build_config, train
from lorakit.train.checkpoint import list_checkpoints


def test_two_processes_train_the_adapter_of_one_process_with_the_same_global_batch(tmp_path: Path) -> None:
    model = write_tiny_model(tmp_path / "model")
    data = write_chat_jsonl(tmp_path / "train.jsonl", 24)
    common = {
        "model": str(model),
        "data": str(data),
        "r": 4,
        "alpha": 8,
        "dropout": 0.0,
        "lr": 1e-2,
        "steps": 3,
        "grad_accum": 2,
        "save_every": 2,
        "seed": 3,
        "device": "cpu",
        **FP32,  # the comparison is at fp32 tolerance
    }
    config = write_run(tmp_path, "ddp", {**common, "batch_size": 2})
    (stdout,) = finish(torchrun(tmp_path, ["--standalone", "--nproc-per-node", "2"], config))
    assert stdout.count("trained 3/3 steps") == 1  # only rank 0 reports

    # One process, micro-batches of 4 = the 2 × 2 of the two ranks, same accumulation.
    single = build_config(None, {**common, "batch_size": 4, "output": str(tmp_path / "single")})
    train(single)

    ddp_out, single_out = tmp_path / "ddp", tmp_path / "single"
    assert train_losses(ddp_out) == pytest.approx(train_losses(single_out), rel=1e-5)
    assert len(train_losses(ddp_out)) == 3  # rank 0 alone appended to metrics.jsonl
    # The gradient itself (not only its direction, which is all AdamW sees) is the global batch's.
    grad_norms = [train_records(output, "grad_norm") for output in (ddp_out, single_out)]
    assert grad_norms[0] == pytest.approx(grad_norms[1], rel=1e-4)
    assert len(load_file(ddp_out / "adapter_model.safetensors")) == 2 * 7 * 2
    assert_same_adapter(ddp_out, single_out)
    assert [p.name for p in list_checkpoints(ddp_out)] == ["step-00000002"]
    assert (ddp_out / "loss.png").is_file() and (ddp_out / "run_config.yaml").is_file()

