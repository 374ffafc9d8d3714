"""`lorakit params CONFIG`: exact trainable-parameter counts from a model config alone."""

from __future__ import annotations

import argparse

# PEFT's default targets for the common architectures, used when --targets is not given.
DEFAULT_TARGETS = {
    "llama": "q_proj,v_proj", "mistral": "q_proj,v_proj", "qwen2": "q_proj,v_proj", "gemma": "q_proj,v_proj",
    "bert": "query,value", "roberta": "query,value", "gpt2": "c_attn", "opt": "q_proj,v_proj",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("params", help="exact trainable-parameter counts from a config.json",
                                   description=__doc__)
    parser.add_argument("config", help="a config.json file or a model folder holding one")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=None,
                        help="lora_alpha (default: r; no effect on counts)")
    parser.add_argument("--targets", default=None,
                        help="comma-separated module names, or all-linear (default: PEFT's default)")
    parser.add_argument("--dora", action="store_true")
    parser.add_argument("--modules-to-save", default=None, help="comma-separated module names")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imported here, not at the top: `lorakit params --help` answers without loading torch.
    from lorakit.analysis.params import count_parameters, load_config, meta_model
    from lorakit.config import LoraConfig

    config = load_config(args.config)
    targets = args.targets or DEFAULT_TARGETS.get(config.model_type)
    if targets is None:
        raise ValueError(f"no default targets for model_type {config.model_type!r}: pass --targets")
    lora = LoraConfig(
        r=args.r,
        lora_alpha=args.alpha or args.r,
        target_modules=targets if targets.lower() == "all-linear" else targets.split(","),
        use_dora=args.dora,
        modules_to_save=args.modules_to_save.split(",") if args.modules_to_save else None,
    )
    report = count_parameters(meta_model(config), lora)
    print(f"{args.config}: r={args.r}, targets={targets}{', DoRA' if args.dora else ''}")
    print(f"trainable params: {report.trainable:,} || all params: {report.total:,} || "
          f"trainable%: {report.trainable_percent:.4f}")
    print("\n| module | count | adapter parameters |\n| --- | --- | --- |")
    for leaf, count in report.per_module_type.items():
        print(f"| {leaf} | {count.modules} | {count.parameters:,} |")
    sizes = ", ".join(f"{dtype} {size / 2**20:,.2f} MiB"
                      for dtype, size in report.adapter_tensor_bytes.items())
    print(f"\nadapter file tensors: {sizes}")
    return 0
