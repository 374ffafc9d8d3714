"""`lorakit merge BASE ADAPTER OUT`: a standalone Hugging Face model folder with the adapter folded in."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("merge", help="merge an adapter into its base model", description=__doc__)
    parser.add_argument("base", help="built-in model name, HF folder or .gguf file")
    parser.add_argument("adapter", help="adapter folder (PEFT layout)")
    parser.add_argument("output", help="the merged model folder to write (new or empty)")
    parser.add_argument(
        "--quantize",
        choices=["auto", "nf4", "none"],
        default="auto",
        help="the base the adapter was trained on: nf4 (QLoRA: merge into the dequantised NF4 base), none, "
        "or auto (default: what the adapter's run_config.yaml says, none without one)",
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT when it holds a previous merged model (never the base, the adapter or other files)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lorakit.ship.merged import export_merged

    quantize = None if args.quantize == "none" else args.quantize
    output = export_merged(
        args.base, args.adapter, args.output, quantize=quantize, dtype=args.dtype, overwrite=args.overwrite
    )
    print(f"merged model written to {output}")
    return 0
