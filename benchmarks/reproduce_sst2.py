"""Reproduce the LoRA paper's SST-2 comparison at CPU scale: all-MiniLM-L6-v2 as a sentiment classifier.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/reproduce_sst2.py            # everything, resumable
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/reproduce_sst2.py --stage pilot   # one stage only

Stages (each resumable: finished runs are skipped, see `lorakit.analysis.sweep`):

1. ``data``: a fixed random subset of SST-2's training set (seed 0), written to ``runs/sst2/data``.
2. ``pilot``: the learning rate, chosen on the **dev** set: LoRA r=8 on q,v at each of ``--lora-lrs``, full
   fine-tuning at each of ``--full-lrs``; the best dev accuracy wins per method.
3. ``sweep``: full fine-tuning, LoRA r ∈ {1, 2, 4, 8, 16, 64} on q,v, r=8 on q,k,v,o and all-linear, and
   DoRA r=8 on q,v, every run with the same data, steps and schedule (the two pilot winners are reused,
   not retrained).
4. ``test``: the held-out test accuracy of full fine-tuning and of LoRA r=8 on q,v, once, after every
   choice was made on dev.
5. ``rank``: the intrinsic rank of the full fine-tune's update ΔW (`lorakit.analysis.rank`).

Commit-ready outputs go to ``docs/figures/sst2/`` (JSON, markdown, PNG); runs, models and checkpoints stay
under ``runs/sst2/`` (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
from pathlib import Path

import torch

from lorakit.analysis.sweep import SweepCallback

ROOT = Path(__file__).resolve().parent.parent
# SST-2 (GLUE: train.tsv, dev.tsv, test.tsv) as the project keeps it beside the checkout; see --sst2.
SST2 = ROOT.parent / "shared" / "data" / "sst2"
STAGES = ("data", "pilot", "sweep", "test", "rank")
# Layer types of a BERT block, by the end of the weight's name (the order matters: o before FFN down).
LAYER_TYPES = (
    ("query", r"attention\.self\.query\.weight$"),
    ("key", r"attention\.self\.key\.weight$"),
    ("value", r"attention\.self\.value\.weight$"),
    ("attention output (o)", r"attention\.output\.dense\.weight$"),
    ("FFN in (intermediate)", r"intermediate\.dense\.weight$"),
    ("FFN out (output)", r"layer\.\d+\.output\.dense\.weight$"),
)
RANKS = (1, 2, 4, 8, 16, 64)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stage", choices=(*STAGES, "all"), default="all")
    parser.add_argument("--train-size", type=int, default=3200, help="training sentences (default 3200)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--lora-lrs", default="5e-4,1e-3,2e-3,4e-3", help="LoRA learning rates tried on dev")
    parser.add_argument(
        "--full-lrs", default="5e-5,1e-4,2e-4,4e-4", help="full fine-tuning learning rates tried on dev"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    parser.add_argument("--sst2", type=Path, default=SST2,
                        help="folder with SST-2's train.tsv, dev.tsv, test.tsv (default ../shared/data/sst2)")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "sst2")
    parser.add_argument("--figures", type=Path, default=ROOT / "docs" / "figures" / "sst2")
    return parser.parse_args()


def base_config(args: argparse.Namespace, train_file: Path):
    from lorakit.train import TrainConfig

    # One epoch over the subset: every run sees the same sentences in the same order (seed 0).
    return TrainConfig(
        model="minilm-l6",
        task="classify",
        format="classify",
        data=str(train_file),
        eval_data=str(args.sst2 / "dev.tsv"),
        max_length=args.max_length,
        batch_size=args.batch_size,
        eval_batch_size=64,
        steps=args.train_size // args.batch_size,
        alpha=16.0,  # fixed for every rank, as in the LoRA paper (scaling alpha / r)
        dropout=0.1,
        scheduler="linear",
        warmup_ratio=0.06,
        eval_metric="accuracy",
        seed=0,
        device="cpu",
    )


# --- 1. data ----------------------------------------------------------------------------------------------


def stage_data(args: argparse.Namespace) -> Path:
    target = args.runs / "data" / f"train-{args.train_size}.tsv"
    if target.is_file():
        return target
    lines = (args.sst2 / "train.tsv").read_text(encoding="utf-8").splitlines()
    header, rows = lines[0], lines[1:]
    random.Random(0).shuffle(rows)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("\n".join([header, *rows[: args.train_size]]) + "\n", encoding="utf-8")
    log(f"data: {args.train_size} of {len(rows)} training sentences -> {target}")
    return target


# --- 2. learning rates on dev -----------------------------------------------------------------------------


def _lrs(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def stage_pilot(args: argparse.Namespace, train_file: Path) -> dict:
    from lorakit.analysis.sweep import SweepSetting, run_sweep

    base = base_config(args, train_file)
    lora, full = SweepSetting("lora", 8, ("q", "v")), SweepSetting("full")
    trials: list[dict] = []
    for lr in _lrs(args.lora_lrs):
        folder = args.runs / "pilot" / f"lora-lr{lr:g}"
        row = run_sweep(base.replace(lr=lr), [lora], folder, callback=Printer()).rows[0]
        trials.append({"method": "lora", "lr": lr, "folder": str(folder / lora.name), **_scores(row)})
    for lr in _lrs(args.full_lrs):
        folder = args.runs / "pilot" / f"full-lr{lr:g}"
        row = run_sweep(base, [full], folder, full_overrides={"lr": lr}, callback=Printer()).rows[0]
        trials.append({"method": "full", "lr": lr, "folder": str(folder / full.name), **_scores(row)})
    chosen = {}
    for method in ("lora", "full"):
        candidates = [t for t in trials if t["method"] == method]
        # best dev accuracy; a tie goes to the lower dev loss
        best = max(candidates, key=lambda t: (t["dev_accuracy"], -t["dev_loss"]))
        chosen[method] = best
    pilot = {"selected_on": "SST-2 dev accuracy (872 sentences)", "trials": trials, "chosen": chosen}
    _write_json(args.figures / "pilot_lr.json", pilot)
    log(f"pilot: LoRA lr {chosen['lora']['lr']:g}, full fine-tuning lr {chosen['full']['lr']:g}")
    return pilot


def _scores(row) -> dict:
    return {
        "dev_accuracy": row.metric,
        "dev_loss": row.eval_metrics.get("eval_loss"),
        "train_seconds": row.train_seconds,
    }


class Printer(SweepCallback):
    """Sweep events to the log."""

    def on_run_start(self, setting, index: int, total: int, skipped: bool) -> None:
        log(f"  {setting.name}: {'finished already, skipped' if skipped else 'training'}")

    def on_run_end(self, row, index: int, total: int) -> None:
        log(
            f"  {row.name}: dev accuracy {row.metric:.4f}, {row.trainable_parameters:,} trainable "
            f"({row.trainable_percent:.3f}%), {row.train_seconds:.0f} s train, {row.wall_seconds:.0f} s wall"
        )


# --- 3. the sweep -----------------------------------------------------------------------------------------


def stage_sweep(args: argparse.Namespace, train_file: Path, pilot: dict) -> None:
    from lorakit.analysis.sweep import plan_settings, run_sweep, write_sweep_report

    base = base_config(args, train_file).replace(lr=pilot["chosen"]["lora"]["lr"])
    full_lr = pilot["chosen"]["full"]["lr"]
    settings = plan_settings(
        RANKS,
        [("q", "v"), ("q", "k", "v", "o"), ("all-linear",)],
        grid="axes",
        anchor_rank=8,
        dora=True,
        full=True,
    )
    main = args.runs / "main"
    main.mkdir(parents=True, exist_ok=True)
    # The pilot's winners are exactly two of these runs (same options): link them instead of retraining.
    # run_sweep checks the options of a finished run before it skips it.
    for name, method in (("lora-qv-r8", "lora"), ("full", "full")):
        link, target = main / name, os.path.relpath(pilot["chosen"][method]["folder"], main)
        if link.is_symlink() and os.readlink(link) != target:
            link.unlink()  # a wider learning-rate grid chose another run
        if not link.exists():
            link.symlink_to(target)
    result = run_sweep(base, settings, main, full_overrides={"lr": full_lr}, callback=Printer())
    paths = write_sweep_report(result, args.figures)
    log(f"sweep: {len(result.ran)} trained, {len(result.skipped)} reused -> {paths['markdown']}")


# --- 4. test, once ----------------------------------------------------------------------------------------


def stage_test(args: argparse.Namespace) -> None:
    from lorakit.analysis.sweep import evaluate_run

    scores = {}
    for name in ("full", "lora-qv-r8"):
        scores[name] = evaluate_run(args.runs / "main" / name, args.sst2 / "test.tsv")
        log(f"test: {name} accuracy {scores[name]['accuracy']:.4f}")
    _write_json(args.figures / "test.json", {"data": "SST-2 test.tsv (1,821 sentences)", "scores": scores})


# --- 5. the intrinsic rank of full fine-tuning's update ---------------------------------------------------


def stage_rank(args: argparse.Namespace) -> None:
    from lorakit.analysis.rank import analyse_rank, report_to_json, write_rank_report
    from lorakit.models import load_classifier
    from lorakit.train.checkpoint import seed_everything
    from lorakit.train.config import TrainConfig, load_yaml

    tuned = (args.runs / "main" / "full").resolve()
    config = TrainConfig.from_dict(load_yaml(tuned / "run_config.yaml"))
    base = args.runs / "base-classifier"
    if not (base / "model.safetensors").is_file():
        # The model as training started from: the MiniLM weights under the classifier's tensor names
        # (bert.…; the MiniLM folder itself names them without the prefix, so `analyse_rank` would find
        # no common tensor), and the trainer's seed, so the fresh classifier head equals the run's start.
        seed_everything(config.seed)
        model, tokenizer = load_classifier(config.model, 2)
        model.save_pretrained(base)
        tokenizer.save_pretrained(base)
    report = analyse_rank(base, tuned, threshold=0.95)
    folder = args.figures / "rank"
    write_rank_report(report, folder)
    summary = energy_by_layer_type(report_to_json(report))
    # a matrix and its transpose have the same singular values: one baseline per shape up to transposition
    baselines = random_baselines({tuple(sorted(values["shape"])) for values in summary.values()})
    _write_json(folder / "energy_by_layer_type.json", {"layer_types": summary, "random_gaussian": baselines})
    plot_energy(summary, baselines, folder / "energy_by_layer_type.png")
    log(f"rank: {len(report.layers)} layers analysed -> {folder}")


def energy_by_layer_type(report: dict) -> dict:
    """Mean over the 6 blocks of the energy the best rank-k approximation keeps: 1 − (relative error)²."""
    summary: dict[str, dict] = {}
    for label, pattern in LAYER_TYPES:
        layers = [layer for layer in report["layers"] if re.search(pattern, layer["name"])]
        if not layers:
            continue
        energy = {
            str(k): sum(1 - float(layer["relative_errors"][str(k)]) ** 2 for layer in layers) / len(layers)
            for k in RANKS
        }
        summary[label] = {
            "layers": len(layers),
            "shape": layers[0]["shape"],
            "energy_captured": energy,
            "mean_energy_rank_95": sum(layer["energy_rank"] for layer in layers) / len(layers),
            "mean_stable_rank": sum(layer["stable_rank"] for layer in layers) / len(layers),
            "mean_relative_update": sum(layer["relative_update"] or 0 for layer in layers) / len(layers),
        }
    return summary


def random_baselines(shapes: set[tuple[int, int]]) -> dict[str, dict[str, float]]:
    """Energy the top k directions keep in a Gaussian matrix of each shape: what "not low-rank" looks like."""
    from lorakit.analysis.spectrum import eckart_young_errors

    generator = torch.Generator().manual_seed(0)
    baselines = {}
    for rows, columns in sorted(shapes):
        values = torch.linalg.svdvals(torch.randn(rows, columns, generator=generator, dtype=torch.float64))
        errors = eckart_young_errors(values, RANKS)
        baselines[f"{rows}×{columns}"] = {str(k): 1 - errors[k] ** 2 for k in RANKS}
    return baselines


def plot_energy(summary: dict, baselines: dict, path: Path) -> None:
    from lorakit.figures import agg_figure

    figure = agg_figure(6, 4, dpi=110)
    axes = figure.add_subplot()
    for label, values in summary.items():
        axes.plot(RANKS, [values["energy_captured"][str(k)] for k in RANKS], "o-", label=label)
    for index, (shape, energy) in enumerate(baselines.items()):
        axes.plot(
            RANKS,
            [energy[str(k)] for k in RANKS],
            linestyle=(0, (4, 2 + 2 * index)),
            color="grey",
            label=f"random Gaussian {shape}",
        )
    axes.set_xscale("log", base=2)
    axes.set_xticks(RANKS, [str(k) for k in RANKS])
    axes.set_ylim(0, 1)
    axes.set_xlabel("rank k of the best approximation of ΔW")
    axes.set_ylabel("fraction of ‖ΔW‖²_F captured")
    axes.set_title("Full fine-tuning of MiniLM-L6 on SST-2: energy of ΔW in the top k directions", fontsize=8)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)


def _write_json(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.figures.mkdir(parents=True, exist_ok=True)
    wanted = STAGES if args.stage == "all" else (args.stage,)
    started = time.perf_counter()
    train_file = stage_data(args)
    pilot = None
    if "pilot" in wanted or "sweep" in wanted:
        pilot = stage_pilot(args, train_file)  # resumable: reruns nothing once done
    if "sweep" in wanted:
        stage_sweep(args, train_file, pilot)
    if "test" in wanted:
        stage_test(args)
    if "rank" in wanted:
        stage_rank(args)
    log(f"done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
