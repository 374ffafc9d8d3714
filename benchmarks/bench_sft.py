"""End to end SFT: `lorakit train` against TRL's `SFTTrainer` + peft on the same jobs, each in a process.

For each job (`sft_jobs`: ``short`` date answers, ``long`` inventory rewrites with prompts of very
different lengths) and each row:

- ``lorakit``: ``python -m lorakit.cli.main train`` with its defaults for everything the job does not fix
  (``--dtype auto``: bf16 autocast on a CPU with AVX512-BF16/AMX, lean activations, chunked loss);
- ``trl``: `sft_trl_run.py`, TRL's defaults for everything the job does not fix (bf16 on, gradient
  checkpointing on);
- ``trl_fast``: the same with TRL's documented speed settings: ``padding_free=True`` (one row of
  concatenated examples, no padding; transformers 5 builds the block-diagonal mask from position ids, so
  examples do not attend to each other) and gradient checkpointing off.

Every row trains the same model (SmolLM2-135M-Instruct, fp32 weights from one HF folder), on the same
conversations rendered by the same chat template, loss on the answer only, with the same rank, alpha,
targets (all-linear), dropout, learning rate, cosine schedule, warm-up steps, epochs, batch size, maximum
length and seed; each ends with an eval loss on the held-out set and writes its adapter. Measured from
outside: wall time of the whole process (start-up, imports, tokenisation, training, evaluation, writing),
time to the first optimizer step, peak RSS (``wait4``'s ``ru_maxrss``) and an RSS timeline. Then one judge
(`sft_jobs.judge`: peft loads each adapter, greedy answers, exact match) scores every adapter on the
held-out prompts.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_sft.py            # ~15-20 min on a shared 2-core CPU
    .venv/bin/python benchmarks/bench_sft.py --jobs short --rows lorakit --short-train 32 --name ''  # a try
    .venv/bin/python benchmarks/bench_sft.py --profile                    # cProfile of both, small slice
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from sft_jobs import Job, judge, long_job, short_job, write_job  # noqa: E402

RESULTS = HERE / "results"
ROWS = ("lorakit", "trl", "trl_fast")


@dataclass(frozen=True)
class Settings:
    """What every row of one job shares."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    lr: float = 1e-3
    warmup_steps: int = 3
    epochs: float = 1.0
    batch_size: int = 8
    max_length: int = 1024
    seed: int = 0


def lorakit_command(files: dict[str, Path], settings: Settings, model: Path, output: Path) -> list[str]:
    s = settings
    return [
        sys.executable, "-m", "lorakit.cli.main", "train",
        "--model", str(model), "--data", str(files["train_chat"]), "--eval-data", str(files["heldout_chat"]),
        "--format", "chat", "--rank", str(s.r), "--alpha", str(s.alpha), "--dropout", str(s.dropout),
        "--targets", "all-linear", "--lr", str(s.lr), "--scheduler", "cosine",
        "--warmup-steps", str(s.warmup_steps), "--epochs", str(s.epochs), "--batch-size", str(s.batch_size),
        "--eval-batch-size", str(s.batch_size), "--max-length", str(s.max_length), "--seed", str(s.seed),
        "--output", str(output), "--quiet",
    ]  # fmt: skip


def trl_command(
    files: dict[str, Path], settings: Settings, model: Path, output: Path, phases: Path, fast: bool
) -> list[str]:
    s = settings
    command = [
        sys.executable, str(HERE / "sft_trl_run.py"),
        "--model", str(model), "--train", str(files["train_pc"]), "--eval", str(files["heldout_pc"]),
        "--output", str(output), "--phases", str(phases), "--r", str(s.r), "--alpha", str(s.alpha),
        "--dropout", str(s.dropout), "--lr", str(s.lr), "--warmup-steps", str(s.warmup_steps),
        "--epochs", str(s.epochs), "--batch-size", str(s.batch_size), "--max-length", str(s.max_length),
        "--seed", str(s.seed), "--bf16",
    ]  # fmt: skip
    return command + (["--padding-free"] if fast else ["--grad-checkpointing"])


def _rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def run_process(command: list[str], env: dict[str, str], first_step: Any, log: Path) -> dict[str, Any]:
    """Run ``command`` to its end: wall seconds, peak RSS, the RSS timeline and the first-step time
    (``first_step()`` polled: True once the first optimizer step has been taken)."""
    started = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        timeline: list[tuple[float, int]] = []
        first: list[float] = []
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                now = time.perf_counter() - started
                rss = _rss_bytes(process.pid)
                if rss is not None:
                    timeline.append((round(now, 2), rss))
                if not first and first_step():
                    first.append(now)
                done.wait(0.2)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
        done.set()
        watcher.join()
        process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(
            f"{command[:4]} failed ({process.returncode}); see {log}:\n{log.read_text()[-3000:]}"
        )
    return {
        "wall_s": round(wall, 2),
        "peak_rss_bytes": usage.ru_maxrss * 1024,
        "first_step_poll_s": round(first[0], 2) if first else None,
        "user_s": round(usage.ru_utime, 1),
        "system_s": round(usage.ru_stime, 1),
        "rss_timeline": timeline[:: max(1, len(timeline) // 200)],
    }


def _lorakit_first_step(output: Path) -> Any:
    metrics = output / "metrics.jsonl"

    def taken() -> bool:
        try:
            return '"train"' in metrics.read_text(encoding="utf-8")
        except OSError:
            return False

    return taken


def _rss_at(timeline: list[tuple[float, int]], seconds: float | None) -> int | None:
    if seconds is None:
        return None
    before = [rss for t, rss in timeline if t <= seconds]
    return max(before) if before else None


def train_row(
    row: str,
    job: Job,
    files: dict[str, Path],
    settings: Settings,
    model: Path,
    work: Path,
    env: dict[str, str],
) -> dict[str, Any]:
    output = work / job.name / row
    log = work / job.name / f"{row}.log"
    if row == "lorakit":
        measured = run_process(
            lorakit_command(files, settings, model, output), env, _lorakit_first_step(output), log
        )
        records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in records if r["kind"] == "train"]
        evals = [r for r in records if r["kind"] == "eval"]
        extra = {
            "steps": len(train),
            "first_loss": train[0]["loss"],
            "last_loss": train[-1]["loss"],
            "eval_loss": evals[-1]["eval_loss"] if evals else None,
            "first_step_s": measured["first_step_poll_s"],
            "tokens_seen": sum(r["tokens"] for r in train),
        }
        import yaml

        extra["dtype"] = yaml.safe_load((output / "run_config.yaml").read_text())["dtype"]
    else:
        phases_file = work / job.name / f"{row}.phases.json"
        measured = run_process(
            trl_command(files, settings, model, output, phases_file, row == "trl_fast"),
            env,
            lambda: False,
            log,
        )
        phases = json.loads(phases_file.read_text())
        extra = {
            "steps": phases["steps"],
            "first_loss": phases["logged_losses"][0] if phases["logged_losses"] else None,
            "last_loss": phases["logged_losses"][-1] if phases["logged_losses"] else None,
            "eval_loss": phases["eval_loss"],
            "first_step_s": round(phases["phases"]["first_step"], 2),
            "phases": {k: round(v, 2) for k, v in phases["phases"].items()},
            "dtype": "bf16",
            "padding_free": row == "trl_fast",
            "gradient_checkpointing": row == "trl",
        }
    measured["rss_before_first_step_bytes"] = _rss_at(measured["rss_timeline"], extra["first_step_s"])
    return {"row": row, "job": job.name, "adapter": str(output), **measured, **extra}


def startup_times(env: dict[str, str], repeats: int = 3) -> dict[str, float]:
    """Median wall seconds of each start-up command, in fresh interpreters."""
    commands = {
        "import torch": [sys.executable, "-c", "import torch"],
        "import lorakit": [sys.executable, "-c", "import lorakit"],
        "import lorakit + torch": [sys.executable, "-c", "import lorakit, torch"],
        "lorakit --help": [sys.executable, "-m", "lorakit.cli.main", "--help"],
        "lorakit train --help": [sys.executable, "-m", "lorakit.cli.main", "train", "--help"],
        "import trl + peft (TRL job's imports)": [
            sys.executable, "-c", "import torch, transformers, datasets, peft; from trl import SFTTrainer"
        ],
    }  # fmt: skip
    times: dict[str, float] = {}
    for name, command in commands.items():
        samples = []
        for _ in range(repeats):
            started = time.perf_counter()
            subprocess.run(command, env=env, check=True, capture_output=True)
            samples.append(time.perf_counter() - started)
        times[name] = round(statistics.median(samples), 3)
    return times


def make_jobs(args: argparse.Namespace) -> dict[str, tuple[Job, Settings]]:
    jobs = {
        "short": (short_job(args.short_train, args.short_heldout, seed=0), Settings(max_length=128)),
        "long": (long_job(args.long_train, args.long_heldout, seed=0), Settings(max_length=1024)),
    }
    return {name: jobs[name] for name in args.jobs}


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# SFT end to end: lorakit train vs TRL SFTTrainer + peft",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {result['machine']}; {result['threads']} threads per run; "
        f"torch {result['versions']['torch']}, "
        f"transformers {result['versions']['transformers']}, trl {result['versions']['trl']}, "
        f"peft {result['versions']['peft']}. Model SmolLM2-135M-Instruct (fp32 weights), LoRA r=8, alpha 16, "
        "all-linear, dropout 0.05, lr 1e-3 cosine, 3 warm-up steps, 1 epoch, batch 8, seed 0, loss on the "
        "answer only. Wall = the whole process; ratios are lorakit / TRL row within this run.",
        "",
        "| job | row | dtype | steps | wall s | CPU s | first step s | peak RSS GiB | eval loss | "
        "exact match | "
        "wall vs TRL | CPU vs TRL | RSS vs TRL | load 1 min |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in result["runs"]:
        if "error" in run:
            lines.append(f"| {run['job']} | {run['row']} | failed: {run['error'][-160:]!r} |" + " |" * 8)
            continue
        ratios = run.get("ratios", {})
        wall = ", ".join(f"{v:.2f} ({k})" for k, v in ratios.get("wall", {}).items())
        rss = ", ".join(f"{v:.2f} ({k})" for k, v in ratios.get("rss", {}).items())
        cpu = ", ".join(f"{v:.2f} ({k})" for k, v in ratios.get("cpu", {}).items())
        em = run.get("exact_match")
        lines.append(
            f"| {run['job']} | {run['row']} | {run['dtype']} | {run['steps']} | {run['wall_s']:.0f} | "
            f"{run['user_s'] + run['system_s']:.0f} | "
            f"{run['first_step_s']:.1f} | {run['peak_rss_bytes'] / 2**30:.2f} | "
            f"{run['eval_loss']:.4f} | {'-' if em is None else f'{100 * em:.1f} %'} | {wall or '-'} | "
            f"{cpu or '-'} | "
            f"{rss or '-'} | {run['load_before']:.1f}-{run['load_after']:.1f} |"
        )
    lines += ["", "Start-up (median of 3 fresh interpreters, seconds):", ""]
    lines += [f"- {name}: {seconds:.2f}" for name, seconds in result["startup"].items()]
    lines += ["", f"Sizes: {result['sizes']}. Total benchmark time {result['total_s'] / 60:.1f} min."]
    lines += [f"Note: {result['note']}"] if result.get("note") else []
    return "\n".join(lines) + "\n"


def add_ratios(runs: list[dict[str, Any]]) -> None:
    for run in runs:
        if run["row"] != "lorakit" or "error" in run:
            continue
        for other in runs:
            if other["job"] == run["job"] and other["row"] != "lorakit" and "error" not in other:
                run.setdefault("ratios", {"wall": {}, "cpu": {}, "rss": {}, "exact_match_points": {}})
                cpu = (run["user_s"] + run["system_s"]) / (other["user_s"] + other["system_s"])
                run["ratios"]["cpu"][other["row"]] = round(cpu, 3)
                run["ratios"]["wall"][other["row"]] = round(run["wall_s"] / other["wall_s"], 3)
                run["ratios"]["rss"][other["row"]] = round(run["peak_rss_bytes"] / other["peak_rss_bytes"], 3)
                if run.get("exact_match") is not None and other.get("exact_match") is not None:
                    run["ratios"]["exact_match_points"][other["row"]] = round(
                        100 * (run["exact_match"] - other["exact_match"]), 1
                    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=lambda s: s.split(","), default=["short", "long"])
    parser.add_argument("--rows", type=lambda s: s.split(","), default=list(ROWS))
    parser.add_argument("--short-train", type=int, default=400)
    parser.add_argument("--short-heldout", type=int, default=100)
    parser.add_argument("--long-train", type=int, default=160)
    parser.add_argument("--long-heldout", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None, help="folder for data, adapters and logs")
    parser.add_argument("--name", default="sft", help="results/<name>.json and .md ('' writes nothing)")
    parser.add_argument("--no-judge", action="store_true")
    args = parser.parse_args()
    began = time.perf_counter()

    import torch
    import transformers

    from lorakit.models.loading import model_folder

    model = model_folder("smollm2-135m-instruct")  # the GGUF converted once, outside every timing
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_sft_"))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": str(args.threads),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_DATASETS_CACHE": str(work / "datasets-cache"),
    }
    torch.set_num_threads(args.threads)
    runs: list[dict[str, Any]] = []
    jobs = make_jobs(args)
    for name, (job, settings) in jobs.items():
        files = write_job(job, work)
        for row in args.rows:
            load = os.getloadavg()[0]
            try:
                run = train_row(row, job, files, settings, model, work, env)
            except RuntimeError as error:  # e.g. killed for memory: the other rows still run
                runs.append({"row": row, "job": name, "error": str(error)[-2000:], "load_before": load})
                print(f"{name} {row}: FAILED {str(error)[:300]}", file=sys.stderr, flush=True)
                continue
            run["settings"] = asdict(settings)
            run["load_before"], run["load_after"] = round(load, 2), round(os.getloadavg()[0], 2)
            runs.append(run)
            print(
                f"{name} {row}: {run['wall_s']:.0f} s, first step {run['first_step_s']} s, "
                f"peak RSS {run['peak_rss_bytes'] / 2**30:.2f} GiB, eval loss {run['eval_loss']:.4f}",
                file=sys.stderr,
                flush=True,
            )
    if not args.no_judge:
        for run in runs:
            if "error" in run:
                continue
            job = jobs[run["job"]][0]
            scored = judge(model, run["adapter"], job.prompts(), job.references(), job.max_new_tokens)
            run["exact_match"], run["sample_replies"] = scored["exact_match"], scored["sample_replies"]
            print(
                f"{run['job']} {run['row']}: exact match {100 * run['exact_match']:.1f} %",
                file=sys.stderr,
                flush=True,
            )
    add_ratios(runs)
    import peft
    import trl

    result = {
        "command": "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_sft.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs ({platform.processor() or 'cpu'})",
        "threads": args.threads,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
            "peft": peft.__version__,
        },
        "sizes": {
            name: {"train": len(job.train), "heldout": len(job.heldout)} for name, (job, _) in jobs.items()
        },
        "runs": runs,
        "startup": startup_times(env),
    }
    result["total_s"] = round(time.perf_counter() - began, 1)
    # the committed results name the work folder WORK, not this machine's path
    result = json.loads(json.dumps(result).replace(str(work), "WORK"))
    print(markdown(result))
    if args.name:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        (RESULTS / f"{args.name}.md").write_text(markdown(result), encoding="utf-8")


if __name__ == "__main__":
    main()
