"""`lorakit train` under torchrun, 2 CPU processes (gloo), equals one process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from train_support import train_losses, write_chat_jsonl, write_tiny_model

from lorakit.train import build_config, train
from lorakit.train.checkpoint import list_checkpoints
from lorakit.train.metrics import read_metrics

# The real CLI entry point, limited to the train command so that this test needs no other command module.
ENTRY = """
import sys
import lorakit.cli.main as cli
cli.COMMANDS = ("train",)
sys.exit(cli.main(sys.argv[1:]))
"""


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
        "dtype": "fp32",  # the comparison is at fp32 tolerance; "auto" picks bf16 on an AVX512-BF16 CPU
    }
    (tmp_path / "ddp.yaml").write_text(
        yaml.safe_dump({**common, "batch_size": 2, "output": str(tmp_path / "ddp")})
    )
    (tmp_path / "entry.py").write_text(ENTRY)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(tmp_path / "entry.py"),
        "train",
        "--config",
        str(tmp_path / "ddp.yaml"),
        "--quiet",
    ]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert finished.stdout.count("trained 3/3 steps") == 1  # only rank 0 reports

    # One process, micro-batches of 4 = the 2 × 2 of the two ranks, same accumulation.
    single = build_config(None, {**common, "batch_size": 4, "output": str(tmp_path / "single")})
    train(single)

    ddp_out, single_out = tmp_path / "ddp", tmp_path / "single"
    assert train_losses(ddp_out) == pytest.approx(train_losses(single_out), rel=1e-5)
    assert len(train_losses(ddp_out)) == 3  # rank 0 alone appended to metrics.jsonl
    # The gradient itself (not only its direction, which is all AdamW sees) is the global batch's.
    assert _grad_norms(ddp_out) == pytest.approx(_grad_norms(single_out), rel=1e-4)
    ddp_tensors = load_file(ddp_out / "adapter_model.safetensors")
    single_tensors = load_file(single_out / "adapter_model.safetensors")
    assert set(ddp_tensors) == set(single_tensors) and len(ddp_tensors) == 2 * 7 * 2
    for key, tensor in single_tensors.items():
        assert ddp_tensors[key].numel() > 0 and float(ddp_tensors[key].abs().sum()) > 0, key
        torch.testing.assert_close(ddp_tensors[key], tensor, rtol=1e-4, atol=1e-6, msg=key)
    assert [p.name for p in list_checkpoints(ddp_out)] == ["step-00000002"]
    assert (ddp_out / "loss.png").is_file() and (ddp_out / "run_config.yaml").is_file()


def _grad_norms(output: Path) -> list[float]:
    return [r["grad_norm"] for r in read_metrics(output) if r["kind"] == "train"]
