"""`lorakit combine A B [C ...] OUT --weights 0.5,0.5 --method M`: a new adapter from a weighted combination.

Methods (PEFT's add_weighted_adapter): linear, cat (exact, rank = sum), svd (truncated), ties, dare_linear,
dare_ties (--density). Works on the adapter files alone; no base model is loaded.
"""

from __future__ import annotations

import argparse

# lorakit.combine.METHODS, written out so that `--help` needs no torch (a test keeps the two equal)
METHODS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("combine", help="combine adapters into a new one (linear, cat, svd, "
                                   "TIES, DARE)", description=__doc__)
    parser.add_argument("paths", nargs="+", metavar="PATH", help="adapter folders, then the output folder")
    parser.add_argument("--weights", required=True, help="comma-separated, one per adapter, e.g. 0.5,0.5")
    parser.add_argument("--method", choices=METHODS, default="linear")
    parser.add_argument("--density", type=float, default=None,
                        help="fraction kept by ties / dare_* (default 0.5 for those)")
    parser.add_argument("--svd-rank", type=int, default=None, help="rank of the svd result")
    parser.add_argument("--majority-sign", choices=("total", "frequency"), default="total")
    parser.add_argument("--seed", type=int, default=None, help="seed of DARE's random masks")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lorakit.ship.combine_files import combine_adapter_folders

    if len(args.paths) < 2:
        raise ValueError("give at least one adapter folder and the output folder")
    *adapters, output = args.paths
    try:
        weights = [float(text) for text in args.weights.split(",")]
    except ValueError:
        raise ValueError(f"--weights must be comma-separated numbers, got {args.weights!r}") from None
    density = args.density
    if density is None and args.method in ("ties", "dare_linear", "dare_ties"):
        density = 0.5
    path = combine_adapter_folders(adapters, weights, output, method=args.method, density=density,
                                   svd_rank=args.svd_rank, majority_sign_method=args.majority_sign,
                                   seed=args.seed)
    print(f"{args.method} combination of {len(adapters)} adapters written to {path}")
    return 0
