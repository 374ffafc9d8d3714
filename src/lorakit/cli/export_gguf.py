"""`lorakit export-gguf ADAPTER --base BASE OUT.gguf`: a llama.cpp LoRA adapter computing what PEFT computes.

PEFT's per-module scale (rsLoRA and rank/alpha patterns included) is folded into lora_b; Q/K rows follow
llama.cpp's LLaMA layout. Bases: LLaMA, Mistral, Qwen2 (SmolLM2 is LLaMA).
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("export-gguf", help="write an adapter as a llama.cpp GGUF LoRA",
                                   description=__doc__)
    parser.add_argument("adapter", help="adapter folder (PEFT layout)")
    parser.add_argument("--base", required=True, help="base model (built-in name, HF folder, .gguf)")
    parser.add_argument("output", help="the .gguf file to write (must not exist)")
    parser.add_argument("--dtype", choices=("f32", "f16"), default="f32")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lorakit.ship.gguf_export import export_gguf

    export = export_gguf(args.adapter, args.base, args.output, dtype=args.dtype)
    print(f"{len(export.tensors)} LoRA tensor pairs for {export.architecture}, adapter.lora.alpha "
          f"{export.alpha:g} (llama.cpp factor 1; PEFT's scales are in lora_b)")
    print(f"written to {export.path}")
    return 0
