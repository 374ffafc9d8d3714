"""Helpers shared by the torchrun tests (no tests here): launch `lorakit train` under torchrun, compare runs.

Each launch is the real CLI entry point limited to the train command, in a fresh interpreter, one thread
per process, with a hard timeout so that a hung collective fails the test instead of the CI job.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file

from lorakit.train.metrics import read_metrics

ENTRY = """
import sys
import lorakit.cli.main as cli
cli.COMMANDS = ("train",)
sys.exit(cli.main(sys.argv[1:]))
"""
TIMEOUT_S = 180
# fp32 on every CPU: dtype "auto" would pick bf16 autocast on a CPU with AVX512-BF16.
FP32 = {"dtype": "fp32"}


def environment() -> dict[str, str]:
    # Loopback only: gloo would otherwise pick the interface of the host name. Fault handler: a worker that
    # dies of a signal (a native abort) prints every thread's Python stack, so a failure says where.
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "GLOO_SOCKET_IFNAME": "lo",
        "PYTHONFAULTHANDLER": "1",
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_run(folder: Path, name: str, options: dict[str, Any]) -> Path:
    """``folder/name.yaml`` holding ``options`` with ``output = folder/name``; the YAML path."""
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**options, "output": str(folder / name)}))
    return path


def torchrun(folder: Path, launcher: list[str], config: Path, *extra: str) -> subprocess.Popen[str]:
    """Start ``torchrun <launcher> entry.py train --config <config> --quiet <extra>``."""
    entry = folder / "entry.py"
    if not entry.exists():
        entry.write_text(ENTRY)
    command = [sys.executable, "-m", "torch.distributed.run", *launcher, str(entry), "train", "--config"]
    return subprocess.Popen(
        [*command, str(config), "--quiet", *extra],
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(*processes: subprocess.Popen[str], errors: list[str] | None = None) -> list[str]:
    """Wait for every launch (killing them all on timeout); assert each succeeded; their stdouts.

    ``errors`` receives their stderrs (lorakit's log lines).
    """
    outputs = []
    try:
        for process in processes:
            stdout, stderr = process.communicate(timeout=TIMEOUT_S)
            assert process.returncode == 0, f"stdout:\n{stdout[-2000:]}\nstderr:\n{stderr[-6000:]}"
            outputs.append(stdout)
            if errors is not None:
                errors.append(stderr)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    return outputs


def train_records(output: Path, key: str, kind: str = "train") -> list[float]:
    return [r[key] for r in read_metrics(output) if r["kind"] == kind]


def assert_same_adapter(output: Path, expected: Path, rtol: float = 1e-4, atol: float = 1e-6) -> None:
    """Both folders hold the same adapter file: same keys, shapes and (to tolerance) values, none empty."""
    got = load_file(output / "adapter_model.safetensors")
    want = load_file(expected / "adapter_model.safetensors")
    assert set(got) == set(want) and len(want) > 0
    for key, tensor in want.items():
        assert got[key].shape == tensor.shape and got[key].numel() > 0, key
        assert float(got[key].abs().sum()) > 0, key
        torch.testing.assert_close(got[key], tensor, rtol=rtol, atol=atol, msg=key)
