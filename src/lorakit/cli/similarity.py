"""`lorakit similarity ADAPTER_1 ADAPTER_2`: normalised subspace similarity φ(i, j) of two adapters.

φ(A₁, A₂, i, j) = ‖U₁[:, :i]ᵀ U₂[:, :j]‖_F² / min(i, j), with U the right-singular vectors of each
adapter's A matrix (LoRA paper, Figure 3), for every layer both adapters adapt.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "similarity", help="subspace similarity of two adapters' A (or B) matrices", description=__doc__
    )
    parser.add_argument("adapter_1", help="a PEFT adapter folder")
    parser.add_argument("adapter_2", help="a PEFT adapter folder")
    parser.add_argument("--matrix", choices=("A", "B"), default="A",
                        help="compare A's right- (default) or B's left-singular vectors")
    parser.add_argument("--output", type=Path, default=Path("similarity-report"),
                        help="folder for JSON, markdown, PNG")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imported here, not at the top: `lorakit similarity --help` answers without loading torch.
    from lorakit.analysis.similarity import compare_adapters, write_similarity_report

    report = compare_adapters(args.adapter_1, args.adapter_2, matrix=args.matrix)
    paths = write_similarity_report(report, args.output)
    print(f"{len(report.layers)} common layers, {len(report.skipped)} skipped")
    width = max((len(layer.name) for layer in report.layers), default=5)
    print(f"{'layer':<{width}}  r1  r2  phi(1,1)  phi(r,r)  random")
    for layer in report.layers:
        print(f"{layer.name:<{width}}  {layer.r1:>2}  {layer.r2:>2}  {layer.phi_top:>8.3f}  "
              f"{layer.phi_common:>8.3f}  {layer.random_common:>6.3f}")
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0
