"""Where the time of an SFT job goes, for `lorakit train` and TRL's `SFTTrainer`: both under cProfile on a
slice of `bench_sft.py`'s jobs, the cumulative time of each phase read from the profile.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/profile_sft.py [--job long --train 24 --heldout 8]

Phases (functions whose cumulative time is the phase): start-up and imports (every module import),
model loading (``from_pretrained``), tokenisation (lorakit ``prepare_examples`` / TRL
``_prepare_dataset``), collation (the collator's call), forward (lorakit ``LossModule.forward`` / TRL
``compute_loss``), backward (``Tensor.backward``), optimizer (``Optimizer.step``), evaluation and writing
the adapter. Writes ``results/sft_profile.json`` and ``.md``. cProfile adds a per-call overhead, larger
for the side making more Python calls: compare shares, not seconds, with `bench_sft.py`'s wall times.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_sft import RESULTS, Settings, lorakit_command, trl_command  # noqa: E402
from sft_jobs import long_job, short_job, write_job  # noqa: E402

# phase -> (file name ending, function name) pairs whose cumulative time is the phase
PHASES = {
    "imports": [("<frozen importlib._bootstrap>", "_find_and_load")],
    "model loading": [("modeling_utils.py", "from_pretrained")],
    "tokenisation": [("data/load.py", "prepare_examples"), ("sft_trainer.py", "_prepare_dataset")],
    "collation": [("data/collate.py", "__call__"), ("sft_trainer.py", "torch_call")],
    "forward + loss": [("train/loss.py", "forward"), ("sft_trainer.py", "compute_loss")],
    "backward": [("torch/_tensor.py", "backward")],
    "optimizer step": [("torch/optim/optimizer.py", "wrapper")],
    "evaluation": [("train/evaluate.py", "evaluate_loss"), ("transformers/trainer.py", "evaluate")],
    "writing the adapter": [("train/adapter.py", "write_adapter"), ("transformers/trainer.py", "save_model")],
}


def phase_times(profile: Path) -> dict[str, float]:
    """Seconds per phase (cumulative, recursion counted once) and the profile's total."""
    stats = pstats.Stats(str(profile))
    total = max(entry[3] for entry in stats.stats.values())  # the outermost frame's cumulative time
    out: dict[str, float] = {}
    for phase, patterns in PHASES.items():
        seconds = 0.0
        for (filename, _, name), (_, _, _, cumulative, _) in stats.stats.items():
            if any(filename.endswith(end) and name == func for end, func in patterns):
                seconds += cumulative
        out[phase] = round(seconds, 2)
    # _find_and_load is recursive: its outermost calls' sum is what the import phase cost.
    out["total"] = round(total, 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--job", choices=("short", "long"), default="long")
    parser.add_argument("--train", type=int, default=24)
    parser.add_argument("--heldout", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="sft_profile")
    args = parser.parse_args()
    from lorakit.models.loading import model_folder

    model = model_folder("smollm2-135m-instruct")
    work = Path(tempfile.mkdtemp(prefix="profile_sft_"))
    job = (short_job if args.job == "short" else long_job)(args.train, args.heldout, seed=0)
    settings = Settings(max_length=128 if args.job == "short" else 1024)
    files = write_job(job, work)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_CACHE": str(work / "datasets-cache")}  # fmt: skip
    commands = {
        "lorakit": lorakit_command(files, settings, model, work / "lorakit"),
        "trl": trl_command(files, settings, model, work / "trl", work / "trl.json", fast=False),
        "trl_fast": trl_command(files, settings, model, work / "trl_fast", work / "trl_fast.json", fast=True),
    }
    result: dict[str, object] = {"job": args.job, "train": args.train, "heldout": args.heldout, "rows": {}}
    for row, command in commands.items():
        profile = work / f"{row}.prof"
        started = time.perf_counter()
        subprocess.run(
            [command[0], "-m", "cProfile", "-o", str(profile), *command[1:]],
            env=env, check=True, capture_output=True,
        )  # fmt: skip
        times = phase_times(profile)
        times["wall under cProfile"] = round(time.perf_counter() - started, 2)
        result["rows"][row] = times  # type: ignore[index]
        print(row, times, file=sys.stderr, flush=True)
    phases = [*PHASES, "total"]
    lines = [
        f"# Where an SFT job's time goes ({args.job} job, {args.train} examples, batch 8, 1 epoch; cProfile)",
        "",
        f"Command: `HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/profile_sft.py --job {args.job} "
        f"--train {args.train} --heldout {args.heldout}`",
        "",
        "| phase | " + " | ".join(result["rows"]) + " |",  # type: ignore[arg-type]
        "| --- |" + " --- |" * len(result["rows"]),  # type: ignore[arg-type]
    ]
    for phase in phases:
        cells = [f"{result['rows'][row][phase]:.1f} s" for row in result["rows"]]  # type: ignore[index]
        lines.append(f"| {phase} | " + " | ".join(cells) + " |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
