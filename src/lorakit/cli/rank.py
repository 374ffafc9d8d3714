"""`lorakit rank BASE TUNED`: how low-rank is a fine-tuning update? Per-layer SVD of ΔW = W_tuned − W_base.

TUNED is a model folder (compared with the BASE model folder tensor by tensor) or a PEFT adapter
folder (ΔW = scaling·B·A); give a single adapter folder to analyse the adapter alone.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "rank", help="per-layer SVD of a fine-tuning update (model vs model, or an adapter)",
        description=__doc__,
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="BASE TUNED, or a single ADAPTER folder")
    parser.add_argument(
        "--threshold", type=float, default=0.95, help="energy fraction that defines the rank (default 0.95)"
    )
    parser.add_argument(
        "--output", type=Path, default=Path("rank-report"), help="folder for JSON, markdown and PNGs"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imported here, not at the top: `lorakit rank --help` answers without loading torch.
    from lorakit.analysis.rank import analyse_rank, write_rank_report

    if len(args.paths) > 2:
        raise ValueError(f"expected BASE TUNED or a single ADAPTER, got {len(args.paths)} paths")
    base, tuned = (None, args.paths[0]) if len(args.paths) == 1 else args.paths
    report = analyse_rank(base, tuned, threshold=args.threshold)
    paths = write_rank_report(report, args.output)
    print(f"{len(report.layers)} layers analysed ({report.mode}), {len(report.skipped)} skipped")
    width = max((len(layer.name) for layer in report.layers), default=5)
    print(f"{'layer':<{width}}  rank@{args.threshold:g}  stable rank  err@8")
    for layer in report.layers:
        print(f"{layer.name:<{width}}  {layer.energy_rank:>9}  {layer.stable_rank:>11.2f}  "
              f"{layer.relative_errors[8]:.3g}")
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0
