"""Resumable checkpoints, written atomically.

A checkpoint is a folder ``<output>/checkpoints/step-<N>`` holding ``trainer_state.pt``: the trainable
parameters by name, the optimizer and scheduler states, the RNG states of every process (python, numpy,
torch CPU and CUDA), the data-order position, the step, the early-stopping state, the best adapter so
far and the run's options (a resume checks it asks for the same run). It is written with
`lorakit.atomic.write_folder` (a temporary sibling folder renamed into place), so a folder named
``step-<N>`` is always complete: a run killed while writing leaves only a temporary folder, which
`latest_checkpoint` ignores and the next write of that checkpoint removes.
"""

from __future__ import annotations

import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorakit.atomic import write_folder
from lorakit.train.config import TrainConfig
from lorakit.train.output import run_differences
from lorakit.train.sampler import BatchPlan

STATE_FILE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states: python ``random``, numpy's global, torch CPU and every CUDA device."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def checkpoint_dir(output: str | Path, step: int) -> Path:
    return Path(output) / "checkpoints" / f"step-{step:08d}"


def list_checkpoints(output: str | Path) -> list[Path]:
    """Complete checkpoints under ``output/checkpoints``, oldest first."""
    root = Path(output) / "checkpoints"
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), path)
        for path in root.iterdir()
        if (m := _STEP_DIR.match(path.name)) and (path / STATE_FILE).is_file()
    ]
    return [path for _, path in sorted(found)]


def latest_checkpoint(output: str | Path) -> Path | None:
    found = list_checkpoints(output)
    return found[-1] if found else None


def save_checkpoint(
    output: str | Path,
    step: int,
    state: dict[str, Any],
    keep: int = 2,
    extra_writer: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``state`` as checkpoint ``step`` (atomically), then delete all but the newest ``keep``.

    ``extra_writer(folder)`` may add files (the adapter in PEFT format, for use without resuming).
    """

    def write(folder: Path) -> None:
        torch.save(state, folder / STATE_FILE)
        if extra_writer is not None:
            extra_writer(folder)

    path = write_folder(checkpoint_dir(output, step), write)
    for old in list_checkpoints(output)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The state saved by `save_checkpoint` (a folder, or its ``trainer_state.pt``)."""
    path = Path(path)
    file = path / STATE_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (expected {file})")
    # weights_only=False: the state holds python/numpy RNG tuples; the file is one this library wrote.
    return torch.load(file, map_location="cpu", weights_only=False)


def resolve_resume(resume: bool | str, output: str | Path) -> Path | None:
    """The checkpoint folder ``resume`` refers to: the newest in ``output`` for True, a path as given.

    Raises:
        FileNotFoundError: ``resume`` is a path without a checkpoint.
    """
    if resume is False or resume is None:
        return None
    if resume is True or str(resume).lower() in ("true", "latest"):
        return latest_checkpoint(output)
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        found = latest_checkpoint(path)  # the run folder itself may be named
        if found is None:
            raise FileNotFoundError(f"resume={resume!r}: no checkpoint there (no {STATE_FILE})")
        return found
    return path


def check_resumable(state: dict[str, Any], config: TrainConfig, plan: BatchPlan, path: Path) -> None:
    """Raise ValueError unless checkpoint ``state`` (at ``path``) belongs to the run ``config`` asks for.

    The identity options (`lorakit.train.output.IDENTITY_FIELDS`) must be equal, and so must the number
    of examples and the global batch; the message names every difference (checkpoint → asked).
    """
    differences = run_differences(state.get("config", {}), config)
    if differences:
        raise ValueError(
            f"checkpoint {path} belongs to another run: {'; '.join(differences)} (checkpoint → asked). "
            "Resume with the options it was written with, or start a new run in another folder"
        )
    saved = state["plan"]
    if saved["num_examples"] != plan.num_examples or saved["global_batch_size"] != plan.global_batch_size:
        options = state.get("config") or {}
        split = (
            f" (batch_size {options['batch_size']} × grad_accum {options['grad_accum']} × "
            f"{state['world_size']} processes)"
            if "batch_size" in options and "world_size" in state
            else ""
        )
        raise ValueError(
            f"checkpoint {path} was written for {saved['num_examples']} examples in global batches of "
            f"{saved['global_batch_size']}{split}; this run has {plan.num_examples} examples in global "
            f"batches of {plan.global_batch_size} (batch_size {plan.micro_batch_size} × grad_accum "
            f"{plan.grad_accum} × {plan.world_size} processes): resume with the same data and the same "
            "batch_size × grad_accum × processes"
        )
