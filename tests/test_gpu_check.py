"""The CPU-safe parts of the GPU check: its options, and a clean skip without a CUDA device."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402


def test_options_parse_and_bad_ones_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    args = gpu_check.parse_args(["--sections", "train,serve", "--rows", "qlora_r16_all", "--dtypes", "fp16"])
    assert (args.sections, args.rows, args.dtypes) == (["train", "serve"], ["qlora_r16_all"], ["fp16"])
    defaults = gpu_check.parse_args([])
    assert defaults.sections == list(gpu_check.SECTIONS) and defaults.dtypes == ["bf16", "fp16"]
    assert defaults.device == "cuda" and defaults.rows == list(gpu_check.GPU_ROWS)
    for bad in (["--sections", "train,fly"], ["--dtypes", "fp8"], ["--rows", ""], ["--rounds", "0"]):
        with pytest.raises(SystemExit) as stop:
            gpu_check.parse_args(bad)
        assert stop.value.code == 2
    assert "fly" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skip on machines without CUDA")
def test_without_cuda_the_check_and_the_script_skip_cleanly(capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu_check.main(["--sections", "train"]) == 0
    assert capsys.readouterr().out.strip() == gpu_check.SKIPPED
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu-check.sh")],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith("no CUDA device: skipped")

