"""`lorakit convert ADAPTER OUT --target ENGINE`: rewrite an adapter so the engine computes what PEFT does.

Scales (rsLoRA, rank/alpha patterns) are folded into the weights exactly; DoRA (needs --base) and ranks
above --max-lora-rank become plain LoRA by truncated SVD, with the relative error reported per layer.
"""

from __future__ import annotations

import argparse
import warnings


def register(subparsers: argparse._SubParsersAction) -> None:
    from lorakit.ship.rules import ENGINES

    parser = subparsers.add_parser("convert", help="rewrite an adapter for a serving engine",
                                   description=__doc__)
    parser.add_argument("adapter", help="adapter folder (PEFT layout)")
    parser.add_argument("output", help="new adapter folder (must not exist, or be empty)")
    parser.add_argument("--target", required=True, choices=ENGINES)
    parser.add_argument("--base", default=None, help="base model (needed for DoRA)")
    parser.add_argument("--rank", type=int, default=None, help="rank of converted DoRA layers")
    parser.add_argument("--max-lora-rank", type=int, default=None, help="cap every layer's rank (SVD)")
    parser.add_argument("--drop-modules-to-save", action="store_true",
                        help="drop modules_to_save copies (their training is lost)")
    parser.add_argument("--drop-bias", action="store_true", help="drop trained biases (lost)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lorakit.ship.convert import convert_adapter

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = convert_adapter(args.adapter, args.output, args.target, base=args.base, rank=args.rank,
                                 max_lora_rank=args.max_lora_rank,
                                 drop_modules_to_save=args.drop_modules_to_save, drop_bias=args.drop_bias)
    for warning in caught:
        print(f"warning: {warning.message}")
    exact = [layer for layer in report.layers if layer.method == "fold"]
    print(f"{len(exact)} layers folded exactly (scale into lora_B), rank {report.rank}, alpha {report.rank}")
    for layer in report.truncated:
        print(f"  {layer.module}: {layer.method} r {layer.rank_before} -> {layer.rank_after}, "
              f"relative error {layer.relative_error:.3e}")
    if report.truncated:
        print(f"overall relative error of the truncated layers: {report.overall_error:.3e}")
    print(f"written to {report.output}")
    return 0
