"""`lorakit check ADAPTER --target ENGINE`: will the engine load the adapter and compute what PEFT computes?

Exit 0 when it will, 1 when not (each problem printed with the engine's source, what it does and the fix),
2 for bad input.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from lorakit.ship.rules import ENGINES

    parser = subparsers.add_parser("check", help="check an adapter against a serving engine's rules",
                                   description=__doc__)
    parser.add_argument("adapter", help="adapter folder (PEFT layout)")
    parser.add_argument("--target", required=True, choices=ENGINES)
    parser.add_argument("--max-lora-rank", type=int, default=None,
                        help="the server's --max-lora-rank (vLLM; default vLLM's 16)")
    parser.add_argument("--base", default=None, help="base model (built-in name, HF folder, .gguf)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lorakit.ship.check import check_adapter

    result = check_adapter(args.adapter, args.target, max_lora_rank=args.max_lora_rank, base=args.base)
    for finding in result.findings:
        rule = finding.rule
        print(f"[{rule.id}] {rule.engine} {rule.effect}: {rule.what}")
        print(f"    source: {rule.source}")
        shown = ", ".join(finding.items[:6]) + (f", ... ({len(finding.items)} in all)"
                                                 if len(finding.items) > 6 else "")
        print(f"    where:  {shown}")
        print(f"    fix:    {rule.fix.format(engine=rule.engine).replace('ADAPTER', str(args.adapter), 1)}")
    for note in result.notes:
        print(f"note: {note}")
    if result.ok:
        print(f"OK: {args.target} loads {args.adapter} and computes what PEFT computes")
        return 0
    print(f"FAIL: {len(result.findings)} problem(s) for {args.target}")
    return 1
