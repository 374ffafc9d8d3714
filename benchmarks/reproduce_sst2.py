"""Reproduce the LoRA paper's SST-2 comparison at CPU scale: all-MiniLM-L6-v2 as a sentiment classifier.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/reproduce_sst2.py            # everything, resumable
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/reproduce_sst2.py --stage pilot   # one stage only

Stages (each resumable: finished runs are skipped, see `lorakit.analysis.sweep`):

1. ``data``: a fixed random subset of SST-2's training set (seed 0), written to ``runs/sst2/data``;
   ``--train-size all`` takes every sentence (see `training_rows`).
2. ``pilot``: the learning rate, chosen on the **dev** set: LoRA r=8 on q,v at each of ``--lora-lrs``, full
   fine-tuning at each of ``--full-lrs``; the best dev accuracy wins per method. The pilot trains on the
   training file itself, or on the first ``--pilot-size`` sentences of the same shuffle (then it is shorter
   than the final runs).
3. ``sweep``: full fine-tuning, LoRA r ∈ {1, 2, 4, 8, 16, 64} on q,v, r=8 on q,k,v,o and all-linear, and
   DoRA r=8 on q,v, every run with the same data, steps and schedule (the two pilot winners are reused,
   not retrained).
4. ``test``: the held-out test accuracy of full fine-tuning and of LoRA r=8 on q,v, once, after every
   choice was made on dev.
5. ``rank``: the intrinsic rank of the full fine-tune's update ΔW (`lorakit.analysis.rank`).

``all`` runs these five. One more stage runs only when named:

- ``final``: only the two compared runs (full fine-tuning and LoRA r=8 on q,v at the chosen learning rates)
  on the training file, and their table; with a ``--pilot-size`` pilot these are new runs (the full-data
  design, where a sweep of ten settings would not fit), otherwise the pilot's winners. ``--methods lora``
  or ``full`` limits ``pilot`` and ``final`` to one method, so that two processes can train side by side;
  a later run with both methods writes ``pilot_lr.json`` and the table from the finished runs.

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
from typing import Any

import torch

from lorakit.analysis.sweep import SweepCallback, SweepSetting

ROOT = Path(__file__).resolve().parent.parent
# SST-2 (GLUE: train.tsv, dev.tsv, test.tsv) as the project keeps it beside the checkout; see --sst2.
SST2 = ROOT.parent / "shared" / "data" / "sst2"
STAGES = ("data", "pilot", "sweep", "test", "rank")  # what --stage all runs
EXTRA_STAGES = ("final",)  # run only when named
METHODS = ("lora", "full")
# The two settings the reproduction compares (and scores on test).
COMPARED = {"lora": SweepSetting("lora", 8, ("q", "v")), "full": SweepSetting("full")}
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


def train_size(text: str) -> int | None:
    """``--train-size``: a positive number of sentences, or ``all`` (None)."""
    if text == "all":
        return None
    try:
        size = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of sentences or 'all', got {text!r}") from None
    if size <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of sentences, got {size}")
    return size


def method_list(text: str) -> tuple[str, ...]:
    """``--methods``: a comma-separated subset of ``lora,full``, in the canonical order."""
    names = {name.strip() for name in text.split(",")}
    unknown = sorted(names - set(METHODS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"methods are {', '.join(METHODS)}; got {text!r}")
    return tuple(m for m in METHODS if m in names)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stage", choices=(*STAGES, *EXTRA_STAGES, "all"), default="all")
    parser.add_argument(
        "--train-size", type=train_size, default=3200, help="training sentences, or 'all' (default 3200)"
    )
    parser.add_argument(
        "--pilot-size",
        type=train_size,
        default=None,
        help="train the learning-rate pilot on the first N sentences of the shuffle (default: the training "
        "file itself)",
    )
    parser.add_argument(
        "--methods", type=method_list, default=METHODS, help="pilot and final: lora, full or both (default)"
    )
    parser.add_argument("--model", default="minilm-l6", help="built-in model name or HF folder (minilm-l6)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--lora-lrs", default="5e-4,1e-3,2e-3,4e-3", help="LoRA learning rates tried on dev")
    parser.add_argument(
        "--full-lrs", default="5e-5,1e-4,2e-4,4e-4", help="full fine-tuning learning rates tried on dev"
    )
    parser.add_argument(
        "--final-epochs",
        type=int,
        default=1,
        help="passes over the training file in the final runs (the pilot keeps its length); default 1",
    )
    parser.add_argument(
        "--lora-modules-to-save",
        default=None,
        help="modules the LoRA runs train in full besides the classifier head, comma-separated (e.g. "
        "pooler: BERT's pooler dense layer, as RoBERTa's head in the paper); default none",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    parser.add_argument("--sst2", type=Path, default=SST2,
                        help="folder with SST-2's train.tsv, dev.tsv, test.tsv (default ../shared/data/sst2)")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "sst2")
    parser.add_argument("--figures", type=Path, default=ROOT / "docs" / "figures" / "sst2")
    args = parser.parse_args(argv)
    if args.methods != METHODS and args.stage not in ("data", "pilot", "final"):
        parser.error("--methods applies to the pilot and final stages only")
    return args


def base_config(args: argparse.Namespace, train_file: Path):
    from lorakit.train import TrainConfig

    # One epoch over the file: every run sees the same sentences in the same order (seed 0).
    return TrainConfig(
        model=args.model,
        task="classify",
        format="classify",
        data=str(train_file),
        eval_data=str(args.sst2 / "dev.tsv"),
        max_length=args.max_length,
        batch_size=args.batch_size,
        eval_batch_size=64,
        steps=_count_rows(train_file) // args.batch_size,
        alpha=16.0,  # fixed for every rank, as in the LoRA paper (scaling alpha / r)
        dropout=0.1,
        scheduler="linear",
        warmup_ratio=0.06,
        eval_metric="accuracy",
        seed=0,
        device="cpu",
        # fp32 as in the published runs; `dtype="auto"` would pick bf16 autocast on a CPU with AVX512-BF16.
        dtype="fp32",
    )


def lora_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options only the LoRA runs take (``--lora-modules-to-save``); full fine-tuning trains all."""
    names = [name.strip() for name in (args.lora_modules_to_save or "").split(",") if name.strip()]
    return {"modules_to_save": names} if names else {}


def full_overrides(lr: float) -> dict[str, Any]:
    """Full fine-tuning's own options over the shared base: its learning rate, and no LoRA-only option."""
    return {"lr": lr, "modules_to_save": None}


def _count_rows(tsv: Path) -> int:
    """Data rows of a TSV file with a header line."""
    with tsv.open(encoding="utf-8") as handle:
        return sum(1 for line in handle if line.strip()) - 1


# --- 1. data ----------------------------------------------------------------------------------------------


def stage_data(args: argparse.Namespace, size: int | None) -> Path:
    """The training file of ``size`` sentences (None: all), written once under ``runs/…/data``."""
    from lorakit.atomic import write_file

    target = args.runs / "data" / f"train-{'all' if size is None else size}.tsv"
    if target.is_file():
        return target
    lines = (args.sst2 / "train.tsv").read_text(encoding="utf-8").splitlines()
    header, rows = lines[0], [line for line in lines[1:] if line.strip()]
    chosen = training_rows(rows, size, args.batch_size)
    # atomic: two processes (--methods) may write the same file at once
    write_file(target, "\n".join([header, *chosen]) + "\n")
    log(f"data: {len(chosen)} rows from {len(rows)} training sentences -> {target}")
    return target


def training_rows(rows: list[str], size: int | None, batch_size: int) -> list[str]:
    """The first ``size`` rows of a seed-0 shuffle, or (``size`` None) every row.

    The trainer drops an incomplete last batch. So that every sentence is trained on, ``all`` repeats the
    first rows of the shuffle until the count is a whole number of batches (11 repeats for SST-2's 67,349
    sentences in batches of 32).
    """
    if size is not None and size > len(rows):
        raise ValueError(f"--train-size {size} is more than the {len(rows)} training sentences")
    shuffled = list(rows)
    random.Random(0).shuffle(shuffled)
    if size is not None:
        return shuffled[:size]
    return shuffled + shuffled[: -len(shuffled) % batch_size]


# --- 2. learning rates on dev -----------------------------------------------------------------------------


def _lrs(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def stage_pilot(args: argparse.Namespace, pilot_file: Path) -> dict:
    """Train each method at each of its learning rates on ``pilot_file``; the best on dev is chosen.

    ``pilot_lr.json`` is written only when both methods ran (one process of a ``--methods`` pair would
    otherwise overwrite the other's).
    """
    from lorakit.analysis.sweep import run_sweep

    base = base_config(args, pilot_file)
    grids = {"lora": _lrs(args.lora_lrs), "full": _lrs(args.full_lrs)}
    trials: list[dict] = []
    for method in args.methods:
        setting = COMPARED[method]
        for lr in grids[method]:
            folder = args.runs / "pilot" / f"{method}-lr{lr:g}"
            # the full run takes its lr from the overrides, LoRA from the base options
            if method == "full":
                config, overrides = base, full_overrides(lr)
            else:
                config, overrides = base.replace(lr=lr, **lora_options(args)), None
            row = run_sweep(config, [setting], folder, full_overrides=overrides, callback=Printer()).rows[0]
            trials.append({"method": method, "lr": lr, "folder": str(folder / setting.name), **_scores(row)})
    chosen = {}
    for method in args.methods:
        candidates = [t for t in trials if t["method"] == method]
        # best dev accuracy; a tie goes to the lower dev loss
        best = max(candidates, key=lambda t: (t["dev_accuracy"], -t["dev_loss"]))
        chosen[method] = best
    pilot: dict = {"selected_on": "SST-2 dev accuracy (872 sentences)", "trials": trials, "chosen": chosen}
    if args.pilot_size is not None:
        # a pilot shorter than the final runs says how much shorter
        pilot["pilot_sentences"] = _count_rows(pilot_file)
        pilot["pilot_steps"] = base.steps
    if args.methods == METHODS:
        _write_json(args.figures / "pilot_lr.json", pilot)
    log("pilot: " + ", ".join(f"{m} lr {chosen[m]['lr']:g}" for m in args.methods))
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


def link_pilot_winners(pilot: dict, main: Path, methods: tuple[str, ...] = METHODS) -> None:
    """Link the pilot's chosen runs into ``main``: they are exactly the runs the next stage would train
    (same options; `run_sweep` checks the options of a finished run before it skips it)."""
    main.mkdir(parents=True, exist_ok=True)
    for method in methods:
        name = COMPARED[method].name
        link, target = main / name, os.path.relpath(pilot["chosen"][method]["folder"], main)
        if link.is_symlink() and os.readlink(link) != target:
            link.unlink()  # a wider learning-rate grid chose another run
        if not link.exists():
            link.symlink_to(target)


def stage_final(args: argparse.Namespace, train_file: Path, pilot_file: Path, pilot: dict) -> None:
    """The two compared runs on the training file at the chosen learning rates, in ``runs/…/main``."""
    from lorakit.analysis.sweep import run_sweep, write_sweep_report

    main = args.runs / "main"
    if pilot_file == train_file:
        link_pilot_winners(pilot, main, args.methods)
    base, overrides = final_configs(args, train_file, pilot["chosen"])
    settings = [COMPARED[method] for method in args.methods]
    result = run_sweep(base, settings, main, full_overrides=overrides, callback=Printer())
    if args.methods == METHODS:
        paths = write_sweep_report(result, args.figures)
        _portable_report(paths)
        log(f"final: {len(result.ran)} trained, {len(result.skipped)} reused -> {paths['markdown']}")


def final_configs(args: argparse.Namespace, train_file: Path, chosen: dict) -> tuple[Any, dict | None]:
    """The final runs' base config (LoRA's learning rate and options, ``--final-epochs`` passes over the
    training file) and full fine-tuning's overrides (its learning rate), from the pilot's choices."""
    base = base_config(args, train_file)
    # more passes: the trainer draws a new order of the file for each epoch
    base = base.replace(steps=base.steps * args.final_epochs)
    if "lora" in chosen:
        base = base.replace(lr=chosen["lora"]["lr"], **lora_options(args))
    return base, (full_overrides(chosen["full"]["lr"]) if "full" in chosen else None)


def stage_sweep(args: argparse.Namespace, train_file: Path, pilot: dict) -> None:
    from lorakit.analysis.sweep import plan_settings, run_sweep, write_sweep_report

    base = base_config(args, train_file).replace(lr=pilot["chosen"]["lora"]["lr"], **lora_options(args))
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
    # The pilot's winners are exactly two of these runs (same options): link them instead of retraining.
    link_pilot_winners(pilot, main)
    result = run_sweep(base, settings, main, full_overrides=full_overrides(full_lr), callback=Printer())
    paths = write_sweep_report(result, args.figures)
    _portable_report(paths)
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
    from lorakit.atomic import write_file

    write_file(path, json.dumps(portable_paths(value), indent=2) + "\n")


def portable_paths(value: Any, root: Path = ROOT) -> Any:
    """``value`` with every absolute path beside the checkout made relative to ``root`` (the repository):
    the committed figures name ``runs/…`` and ``../shared/data/…``, never this machine's folders."""
    if isinstance(value, dict):
        return {key: portable_paths(item, root) for key, item in value.items()}
    if isinstance(value, list):
        return [portable_paths(item, root) for item in value]
    if isinstance(value, str) and value.startswith(f"{root.parent}{os.sep}"):
        return os.path.relpath(value, root)
    return value


def _portable_report(paths: dict[str, Path]) -> None:
    """Rewrite the sweep report's JSON with portable paths (the sweep records resolved ones)."""
    _write_json(paths["json"], json.loads(paths["json"].read_text(encoding="utf-8")))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.figures.mkdir(parents=True, exist_ok=True)
    wanted = STAGES if args.stage == "all" else (args.stage,)
    started = time.perf_counter()
    train_file = stage_data(args, args.train_size)
    pilot_file = train_file if args.pilot_size is None else stage_data(args, args.pilot_size)
    pilot = None
    if {"pilot", "final", "sweep"} & set(wanted):
        pilot = stage_pilot(args, pilot_file)  # resumable: reruns nothing once done
    if "final" in wanted:
        stage_final(args, train_file, pilot_file, pilot)
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
