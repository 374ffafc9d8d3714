"""`lorakit memory CONFIG --method full|lora|qlora`: training memory from a config.json, by component.

Weights, gradients, optimizer state, activations and NF4 quantisation constants; the formulas are in
docs/analysis.md. Activations assume a LLaMA-style decoder (validated against measured CPU peaks) and
model `lorakit train`'s step by default (`--trainer lorakit`: chunked fused loss, lean activations), or a
standard transformers step with the full logits (`--trainer transformers`).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

# torch loads only when the command runs: `lorakit memory --help` answers at once.
if TYPE_CHECKING:
    from lorakit.analysis.memory import MemoryEstimate, TrainingSetup


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "memory", help="estimate training memory from a config.json", description=__doc__
    )
    parser.add_argument("config", help="a config.json file or a model folder holding one")
    parser.add_argument("--method", choices=("full", "lora", "qlora"), required=True)
    parser.add_argument("--batch", type=int, default=1, help="sequences per step (default 1)")
    parser.add_argument("--seq", type=int, default=512, help="tokens per sequence (default 512)")
    parser.add_argument("--optimizer", choices=("adamw", "adamw8bit", "sgd"), default="adamw")
    parser.add_argument(
        "--dtype",
        choices=("bf16", "fp16", "fp32"),
        default="bf16",
        help="weights and compute dtype (default bf16)",
    )
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--r", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument(
        "--targets",
        default="all-linear",
        help="comma-separated module names or all-linear (default all-linear)",
    )
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument(
        "--attention",
        choices=("sdpa", "sdpa-math", "eager"),
        default="sdpa",
        help="sdpa (flash kernels), sdpa-math (the CPU math kernel: lorakit train on a CPU at <= 128 "
        "tokens), eager",
    )
    parser.add_argument(
        "--master-weights",
        action="store_true",
        help="full fine-tuning keeps an fp32 master copy (mixed precision): +4 bytes/param",
    )
    parser.add_argument(
        "--moments",
        choices=("fp32", "param"),
        default="fp32",
        help="AdamW moments in fp32 (default) or in the parameters' dtype",
    )
    parser.add_argument(
        "--optimizer-impl",
        choices=("fused", "foreach", "for-loop"),
        default="fused",
        help="torch AdamW implementation: its step temporaries (default fused: none)",
    )
    parser.add_argument("--no-double-quant", action="store_true", help="QLoRA without double quantisation")
    parser.add_argument(
        "--trainer",
        choices=("lorakit", "transformers"),
        default="lorakit",
        help="whose step: lorakit train (lean loss and activations; the default) or a "
        "standard transformers step, model(**batch, labels=...), with the full logits",
    )
    parser.add_argument(
        "--loss-chunk-size",
        type=int,
        default=512,
        help="label rows per chunk of lorakit's loss (default 512, as lorakit train)",
    )
    parser.set_defaults(func=run)


def trainer_line(setup: TrainingSetup) -> str:
    """Which training step the activations describe, in words."""
    if setup.trainer == "transformers":
        return "trainer=transformers: a standard step, model(**batch, labels=...), with the full logits"
    lean = (
        "lean activations off (gradient checkpointing)"
        if setup.gradient_checkpointing
        else "lean activations"
    )
    chunk = f"chunked fused loss ({setup.loss_chunk_size} rows a chunk, no full logits)"
    return f"trainer=lorakit: lorakit train's step, {chunk}, {lean}"


def format_estimate(estimate: MemoryEstimate) -> str:
    """The estimate as an aligned text table, in GB (10⁹ bytes) and GiB."""
    setup = estimate.setup
    lines = [
        f"{estimate.model_type}: {estimate.parameters:,} parameters, "
        f"{estimate.trainable_parameters:,} trainable"
        + (f", {estimate.quantized_parameters:,} in NF4" if estimate.quantized_parameters else ""),
        f"method={setup.method} dtype={setup.dtype} optimizer={setup.optimizer} batch={setup.batch_size} "
        f"seq={setup.seq_len} grad_checkpointing={setup.gradient_checkpointing}"
        + ("" if setup.method == "full" else f" r={setup.r} targets={setup.target_modules}"),
        trainer_line(setup),
        "",
        f"{'component':<24}{'GB':>12}{'GiB':>12}",
    ]
    for name, value in estimate.components().items():
        if name == "total":
            lines.append("-" * 48)
        lines.append(f"{name:<24}{value / 1e9:>12.2f}{value / 2**30:>12.2f}")
    lines += ["total = weights + gradients + optimizer state + constants + max(activations, workspace)"]
    lines += ["", "activations by part:"]
    lines += [f"  {name:<22}{value / 1e9:>12.3f} GB" for name, value in estimate.activation_parts.items()]
    lines += [f"note: {note}" for note in estimate.notes]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from lorakit.analysis.memory import TrainingSetup, estimate_memory

    setup = TrainingSetup(
        method=args.method,
        batch_size=args.batch,
        seq_len=args.seq,
        optimizer=args.optimizer,
        dtype=args.dtype,
        gradient_checkpointing=args.grad_checkpointing,
        r=args.r,
        target_modules=args.targets,
        lora_dropout=args.lora_dropout,
        attention=args.attention,
        master_weights=args.master_weights,
        moments=args.moments,
        optimizer_impl=args.optimizer_impl,
        double_quant=not args.no_double_quant,
        trainer=args.trainer,
        loss_chunk_size=args.loss_chunk_size,
    )
    print(format_estimate(estimate_memory(args.config, setup)))
    return 0
