"""The run folder belongs to one run: refuse to mix two, replace a previous one only when asked.

A run folder holds ``run_config.yaml`` (the options), ``metrics.jsonl``, ``loss.png``, ``checkpoints/``,
the adapter (or, with ``method="full"``, the whole model) and, once the run has ended, ``run_state.json``
(the step it ended at). Writing a new run into a folder that holds another one would mix them: the old
checkpoints would sit next to the new ones (rotation then deletes each new one as it is written, since
the old ones have higher step numbers) and ``--resume`` would continue the old run. So:

* a fresh run needs an empty (or missing) folder, or one that holds only this run's ``run_config.yaml``
  (a run killed before it wrote anything else);
* ``resume`` needs the folder's ``run_config.yaml`` to describe the same run (`run_differences`);
* ``overwrite`` replaces a previous *lorakit run* only: a folder with a ``run_config.yaml`` and nothing
  a run does not write. Anything else is refused, never deleted.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
from pathlib import Path
from typing import Any

from lorakit.atomic import TEMPORARY_PATTERNS, write_file
from lorakit.models.folder import SAVED_MODEL_FILES
from lorakit.peft_format import CONFIG_NAME, WEIGHTS_NAME
from lorakit.train.config import TrainConfig, field_names

RUN_CONFIG_FILE = "run_config.yaml"
RUN_STATE_FILE = "run_state.json"
# The options that decide what a run computes: a resume (or a reuse of its folder) needs them equal.
# Run length, evaluation, logging, checkpointing and memory options may change between the two.
IDENTITY_FIELDS = (
    "model",
    "task",
    "data",
    "format",
    "max_length",
    "long_examples",
    "packing",
    "method",
    "r",
    "alpha",
    "dropout",
    "targets",
    "dora",
    "rslora",
    "quantize",
    "lr",
    "loraplus_ratio",
    "weight_decay",
    "scheduler",
    "warmup_ratio",
    "warmup_steps",
    "max_grad_norm",
    "seed",
)
_PATH_FIELDS = ("model", "data")
_TEMPORARIES = (*TEMPORARY_PATTERNS, ".tmp-*", ".old-*")
# What a run writes into its folder (``.*.lorakit-tmp-*``, ``.*.lorakit-old-*``: temporaries of
# `lorakit.atomic`'s writes; ``.tmp-*``/``.old-*``: those of older versions).
_RUN_FILES = (
    RUN_CONFIG_FILE,
    RUN_STATE_FILE,
    "metrics.jsonl",
    "loss.png",
    "checkpoints",
    CONFIG_NAME,
    WEIGHTS_NAME,
    "README.md",
    *_TEMPORARIES,
)
# ... and, with method="full", what save_pretrained writes for a model and its tokenizer.
_FULL_MODEL_FILES = SAVED_MODEL_FILES


class OutputFolderError(ValueError):
    """The output folder cannot be used for this run; the message says why and what to pass instead."""


def run_differences(saved: dict[str, Any], config: TrainConfig) -> list[str]:
    """``"name: saved → asked"`` for every identity option on which ``saved`` and ``config`` disagree.

    ``saved`` is a run's options as a mapping (``run_config.yaml`` or a checkpoint's ``config``); options
    it does not mention (an older file) are not compared.
    """
    asked = config.to_dict()
    differences = []
    for name in IDENTITY_FIELDS:
        if name not in saved:
            continue
        before, after = _normalised(name, saved[name]), _normalised(name, asked[name])
        if before != after and not (name in _PATH_FIELDS and _same_file(saved[name], asked[name])):
            differences.append(f"{name}: {saved[name]!r} → {asked[name]!r}")
    return differences


def prepare_output(config: TrainConfig, *, remove: bool = True) -> None:
    """Check that ``config.output`` may receive this run; with ``config.overwrite``, clear a previous run.

    Call it before anything is written (``remove=False`` on every process but the one that writes: the
    checks only read). Idempotent: a second call for the same run finds the folder its own.

    Raises:
        OutputFolderError: the path is a file; the folder holds another run (the differing options are
            listed), files that are not a lorakit run, or a finished run and no ``resume``/``overwrite``.
    """
    output = Path(config.output)
    for path in (output, *output.parents):
        if path.exists() and not path.is_dir():
            raise OutputFolderError(f"output {output}: {path} is a file, not a folder")
    entries = sorted(output.iterdir()) if output.is_dir() else []
    if config.resume and config.overwrite:
        raise OutputFolderError("resume and overwrite exclude each other: continue the run or replace it")
    content = [e for e in entries if not _matches(e.name, _TEMPORARIES)]
    if not content:
        return
    saved = read_run_config(output)
    if config.resume:
        if saved is None:
            raise OutputFolderError(
                f"output {output} is not a lorakit run folder (no readable {RUN_CONFIG_FILE}), so there is "
                "nothing to resume there; choose another output folder"
            )
        differences = run_differences(saved, config)
        if differences:
            raise OutputFolderError(
                f"cannot resume the run in {output}: it was started with other options "
                f"({'; '.join(differences)}). Resume with the options in {output / RUN_CONFIG_FILE}, "
                "or start a new run in another folder"
            )
        return
    if saved is not None and not run_differences(saved, config) and [e.name for e in content] in (
        [RUN_CONFIG_FILE],
        ["checkpoints", RUN_CONFIG_FILE],
    ) and not any((output / "checkpoints").glob("step-*")):
        return  # this run's own folder, claimed by an earlier call that wrote nothing else yet
    if not config.overwrite:
        what = _describe(output, saved, config)
        raise OutputFolderError(
            f"output {output} is not empty: {what}. Choose another output folder"
            + (", pass resume (--resume) to continue that run" if saved is not None else "")
            + (" or overwrite (--overwrite) to replace it" if saved is not None else "")
        )
    foreign = _foreign_entries(output, saved)
    if saved is None or foreign:
        reason = (
            f"files a lorakit run does not write: {', '.join(foreign[:5])}"
            if saved is not None
            else f"no {RUN_CONFIG_FILE}: it was not written by lorakit train"
        )
        raise OutputFolderError(
            f"output {output} holds {reason}; --overwrite only replaces a previous lorakit run folder, "
            "never other files. Choose another output folder or move them away"
        )
    if remove:
        shutil.rmtree(output)


def read_run_config(folder: str | Path) -> dict[str, Any] | None:
    """The options in ``folder/run_config.yaml`` (None when it is missing or not a run configuration)."""
    import yaml

    path = Path(folder) / RUN_CONFIG_FILE
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    if not isinstance(values, dict) or not set(values) <= field_names():
        return None
    return values


def read_run_state(folder: str | Path) -> dict[str, Any] | None:
    """``run_state.json`` of a run that ended (``step``, ``total_steps``, ``stopped_early``), else None."""
    try:
        return json.loads((Path(folder) / RUN_STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_run_state(folder: str | Path, state: dict[str, Any]) -> None:
    """Record that the run ended (written last, atomically: present means every output is complete)."""
    write_file(Path(folder) / RUN_STATE_FILE, json.dumps(state) + "\n")


def remove_run_state(folder: str | Path) -> None:
    """A run that continues is no longer finished: drop its marker before it rewrites anything."""
    (Path(folder) / RUN_STATE_FILE).unlink(missing_ok=True)


def _describe(output: Path, saved: dict[str, Any] | None, config: TrainConfig) -> str:
    if saved is None:
        names = [e.name for e in sorted(output.iterdir())]
        return f"it holds {', '.join(names[:5])}{' ...' if len(names) > 5 else ''} and no {RUN_CONFIG_FILE}"
    differences = run_differences(saved, config)
    state = read_run_state(output)
    done = f"finished at step {state['step']}" if state else "unfinished"
    if differences:
        return f"it holds another run ({done}; {'; '.join(differences)})"
    return f"it holds a run with the same options ({done})"


def _foreign_entries(output: Path, saved: dict[str, Any] | None) -> list[str]:
    patterns = _RUN_FILES + (_FULL_MODEL_FILES if (saved or {}).get("method") == "full" else ())
    return [entry.name for entry in sorted(output.iterdir()) if not _matches(entry.name, patterns)]


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _normalised(name: str, value: Any) -> Any:
    if name == "targets" and isinstance(value, str) and value.lower() != "all-linear":
        # TrainConfig turns "q_proj,v_proj" into a list; an older file may hold either spelling.
        return TrainConfig(targets=value).targets
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _same_file(a: Any, b: Any) -> bool:
    try:
        return a is not None and b is not None and os.path.samefile(str(a), str(b))
    except OSError:
        return False
