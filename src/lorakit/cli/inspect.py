"""`lorakit inspect ADAPTER`: what an adapter folder holds, and per-layer update norms with red flags."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("inspect", help="describe an adapter folder and flag broken layers",
                                   description=__doc__)
    parser.add_argument("adapter", help="adapter folder (PEFT layout)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lorakit.ship.inspect import inspect_adapter

    report = inspect_adapter(args.adapter)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str, allow_nan=False))
        return 0
    print(f"adapter        {report.path}")
    print(f"base model     {report.base_model}")
    print(f"task type      {report.task_type}")
    print(f"targets        {report.targets}")
    print(f"r / alpha      {report.rank} / {report.alpha:g}   scaling {report.scaling_rule}")
    if report.rank_pattern or report.alpha_pattern:
        print(f"rank_pattern   {report.rank_pattern}")
        print(f"alpha_pattern  {report.alpha_pattern}")
    print(f"DoRA           {report.use_dora}")
    print(f"modules_to_save {report.modules_to_save or '-'} ({len(report.saved_tensors)} tensors)")
    print(f"bias           {report.bias}{'  + lora_bias' if report.lora_bias else ''}"
          f" ({len(report.bias_tensors)} tensors)")
    print(f"parameters     {report.parameters:,}")
    print(f"file size      {report.file_size:,} bytes   dtypes {report.dtypes}")
    width = max(len(layer.module) for layer in report.layers)
    print(f"\n{'module':<{width}}  {'shape':>11}  {'r':>3}  {'alpha':>6}  {'scale':>8}  "
          f"{'||s*BA||':>10}  flags")
    for layer in report.layers:
        shape = f"{layer.shape[0]}x{layer.shape[1]}"
        print(f"{layer.module:<{width}}  {shape:>11}  {layer.rank:>3}  {layer.alpha:>6g}  "
              f"{layer.scaling:>8.4g}  {layer.norm:>10.4g}  {' '.join(layer.flags)}")
    flagged = report.flagged
    print(f"\n{len(flagged)} of {len(report.layers)} layers flagged" if flagged else "\nno layer flagged")
    return 0
