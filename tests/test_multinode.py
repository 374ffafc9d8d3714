"""`lorakit train` across two "nodes": two torchrun launches on 127.0.0.1, one process each, c10d rendezvous.

The same command as on two machines (``--nnodes 2 --rdzv-backend c10d --rdzv-endpoint HOST:PORT``), for
DDP in fp32 (checked exactly against one process with the same global batch) and FSDP in bf16 (the
MixedPrecisionPolicy path; checked against one process with bf16 autocast, to bf16 tolerance).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from distributed_support import (
    FP32,
    assert_same_adapter,
    finish,
    free_port,
    torchrun,
    train_records,
    write_run,
)
from safetensors.torch import load_file
from train_support import write_chat_jsonl, write_tiny_model

from lorakit.train import build_config, train

# The FSDP run also adapts the embedding: the adapter file then holds its (sharded, frozen) base weight too.
BF16 = {"dtype": "bf16", "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj", "embed_tokens"]}


def _two_nodes(folder: Path, config: Path, run_id: str) -> list:
    """Start both "nodes" of a 2-node job (each launch is one node with one process)."""
    endpoint = f"127.0.0.1:{free_port()}"
    launcher = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d"]
    launcher += ["--rdzv-endpoint", endpoint, "--rdzv-id", run_id]
    return [torchrun(folder, launcher, config) for _ in range(2)]


def test_two_nodes_ddp_and_fsdp_train_what_one_process_trains(tmp_path: Path) -> None:
    common = {
        "model": str(write_tiny_model(tmp_path / "model")),
        "data": str(write_chat_jsonl(tmp_path / "train.jsonl", 16)),
        "r": 4,
        "alpha": 8,
        "dropout": 0.0,
        "lr": 1e-2,
        "steps": 2,
        "grad_accum": 2,
        "seed": 5,
        "device": "cpu",
    }
    ddp = write_run(tmp_path, "ddp", {**common, **FP32, "batch_size": 2})
    fsdp = write_run(tmp_path, "fsdp", {**common, **BF16, "batch_size": 2, "fsdp": True})
    launches = _two_nodes(tmp_path, ddp, "ddp") + _two_nodes(tmp_path, fsdp, "fsdp")
    try:
        train(build_config(None, {**common, **FP32, "batch_size": 4, "output": str(tmp_path / "one")}))
        train(build_config(None, {**common, **BF16, "batch_size": 4, "output": str(tmp_path / "one_bf16")}))
    finally:
        outputs = finish(*launches)
    assert sum(out.count("trained 2/2 steps") for out in outputs) == 2  # the rank 0 of each job

    assert train_records(tmp_path / "ddp", "loss") == pytest.approx(
        train_records(tmp_path / "one", "loss"), rel=1e-5
    )
    assert_same_adapter(tmp_path / "ddp", tmp_path / "one")

    bf16_losses = train_records(tmp_path / "one_bf16", "loss")
    assert train_records(tmp_path / "fsdp", "loss") == pytest.approx(bf16_losses, rel=1e-3)
    norms = train_records(tmp_path / "one_bf16", "grad_norm")
    assert train_records(tmp_path / "fsdp", "grad_norm") == pytest.approx(norms, rel=2e-2)
    # Whole (not one node's shards), fp32 (the sharded master weights, not the bf16 compute copies).
    sharded = load_file(tmp_path / "fsdp" / "adapter_model.safetensors")
    reference = load_file(tmp_path / "one_bf16" / "adapter_model.safetensors")
    assert {k: (v.shape, v.dtype) for k, v in sharded.items()} == {
        k: (v.shape, v.dtype) for k, v in reference.items()
    }
    frozen = [key for key in reference if "embed_tokens" in key and "lora" not in key]
    assert frozen and all(torch.equal(sharded[key], reference[key]) for key in frozen)  # gathered whole
