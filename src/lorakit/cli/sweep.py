"""`lorakit sweep`: train a model once per setting (rank × target set, DoRA, full FT) and tabulate the runs.

Every setting trains into its own subfolder of --output; the table (sweep.md, sweep.json) and the plots
(metric_vs_rank.png, metric_vs_params.png) are written there when all runs are done. Run the same
command again to continue an interrupted sweep: finished runs are skipped, unfinished ones rerun (from
their newest checkpoint with --set save_every=N).

Short target names: q k v o (attention), gate up down (MLP), mapped to each architecture's module names
(q -> query for BERT, q_proj for Llama; o -> attention.output.dense / o_proj; ...); all-linear; or any
module name of the model.

Example:
  lorakit sweep --model minilm-l6 --data train.tsv --eval-data dev.tsv --ranks 1,2,4,8,16,64 \\
      --targets "q,v;q,k,v,o;all-linear" --grid axes --dora --full --full-set lr=5e-5 \\
      --set task=classify --set lr=1e-3 --set eval_metric=accuracy --output runs/sweep
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

# lorakit.analysis.sweep (torch, transformers) is imported only when an argument is parsed or the
# command runs: building the parser, `lorakit sweep --help` included, loads no torch.
_SWEEP = "lorakit.analysis.sweep"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sweep",
        help="train once per rank × target set (+ DoRA, full fine-tuning); one table and plots",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="built-in name (minilm-l6, ...) or HF folder")
    parser.add_argument("--data", required=True, help="training data (any format `lorakit train` reads)")
    parser.add_argument("--eval-data", help="evaluation data: the table's metric comes from it")
    parser.add_argument("--config", help="a YAML file of training options (as for `lorakit train`)")
    parser.add_argument(
        "--ranks", type=_argument("parse_ranks"), default=[8], help="comma-separated ranks (default 8)"
    )
    parser.add_argument(
        "--targets",
        type=_argument("parse_target_sets"),
        default=[("q", "v")],
        help="target sets separated by ';', names by ',' (default 'q,v')",
    )
    parser.add_argument(
        "--grid",
        type=_argument("parse_grid"),
        default="product",
        help="product: every rank on every target set; axes: ranks on the first set, other sets at "
        "--anchor-rank only",
    )
    parser.add_argument(
        "--anchor-rank",
        type=int,
        help="rank of the DoRA run and, with --grid axes, of the other sets "
        "(default 8 if listed, else the first rank)",
    )
    parser.add_argument("--dora", action="store_true", help="add a DoRA run (anchor rank, first target set)")
    parser.add_argument("--full", action="store_true", help="add a full fine-tuning run")
    parser.add_argument(
        "--set",
        dest="assignments",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any training option for every run (repeatable), e.g. --set lr=1e-3 --set steps=200",
    )
    parser.add_argument(
        "--full-set",
        dest="full_assignments",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option for the full fine-tuning run only, e.g. --full-set lr=5e-5",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--output", type=Path, default=Path("runs/sweep"), help="sweep folder")
    parser.set_defaults(func=run)


def _argument(name: str) -> Callable[[str], Any]:
    """The parser ``name`` of lorakit.analysis.sweep (or of this module) for argparse, imported on first
    use; its ValueError's message is shown, not argparse's generic one."""

    def convert(text: str) -> Any:
        parse = globals().get(name) or getattr(importlib.import_module(_SWEEP), name)
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return convert


def parse_grid(text: str) -> str:
    from lorakit.analysis.sweep import GRIDS

    if text not in GRIDS:
        raise ValueError(f"invalid choice: {text!r} (choose from {', '.join(GRIDS)})")
    return text


def _printer() -> Any:
    """A SweepCallback that prints each run's start and end on stderr."""
    from lorakit.analysis.sweep import SweepCallback, SweepRow, SweepSetting

    class Printer(SweepCallback):
        def on_run_start(self, setting: SweepSetting, index: int, total: int, skipped: bool) -> None:
            state = "finished already, skipped" if skipped else "training"
            print(f"[{index}/{total}] {setting.name}: {state}", file=sys.stderr, flush=True)

        def on_run_end(self, row: SweepRow, index: int, total: int) -> None:
            metric = "–" if row.metric is None else f"{row.metric:.4f}"
            print(
                f"[{index}/{total}] {row.name}: {row.metric_name} {metric}, {row.trainable_parameters:,} "
                f"trainable ({row.trainable_percent:.3f}%), {row.train_seconds:.0f} s",
                file=sys.stderr,
                flush=True,
            )

    return Printer()


def run(args: argparse.Namespace) -> int:
    from lorakit.analysis.sweep import (
        SWEEP_OWNED,
        parse_assignments,
        plan_settings,
        run_sweep,
        write_sweep_report,
    )
    from lorakit.train import TqdmProgress, build_config

    overrides = parse_assignments(args.assignments)
    owned = sorted(k.replace("-", "_") for k in overrides if k.replace("-", "_") in SWEEP_OWNED)
    if owned:
        raise ValueError(
            f"--set {owned[0]}=... is chosen per run by the sweep; use --ranks, --targets, --dora, --full"
        )
    overrides["model"], overrides["data"] = args.model, args.data
    if args.eval_data:
        overrides["eval_data"] = args.eval_data
    base = build_config(args.config, overrides)
    full_overrides = {k.replace("-", "_"): v for k, v in parse_assignments(args.full_assignments).items()}
    settings = plan_settings(
        args.ranks, args.targets, grid=args.grid, anchor_rank=args.anchor_rank, dora=args.dora, full=args.full
    )
    print(f"{len(settings)} runs: {', '.join(s.name for s in settings)}", file=sys.stderr)
    result = run_sweep(
        base,
        settings,
        args.output,
        full_overrides=full_overrides,
        measure_memory=not args.no_memory,
        callback=_printer(),
        progress=lambda _: TqdmProgress(disable=args.quiet, file=sys.stderr),
    )
    paths = write_sweep_report(result, args.output)
    print(Path(paths["markdown"]).read_text(encoding="utf-8"))
    print(f"ran {len(result.ran)}, skipped {len(result.skipped)} finished", file=sys.stderr)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0
