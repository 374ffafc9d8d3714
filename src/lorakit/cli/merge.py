"""`lorakit merge BASE ADAPTER OUT`: a standalone Hugging Face model folder with the adapter folded in."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("merge", help="merge an adapter into its base model", description=__doc__)
    parser.add_argument("base", help="built-in model name, HF folder or .gguf file")
    parser.add_argument("adapter", help="adapter folder (PEFT layout)")
    parser.add_argument("output", help="the merged model folder to write")
    parser.add_argument("--quantize", choices=["nf4"], default=None,
                        help="the adapter was trained with QLoRA: merge into the dequantised NF4 base")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--overwrite", action="store_true")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lorakit.models.merged import export_merged

    output = export_merged(args.base, args.adapter, args.output, quantize=args.quantize, dtype=args.dtype,
                           overwrite=args.overwrite)
    print(f"merged model written to {output}")
    return 0
