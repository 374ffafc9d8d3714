"""`lorakit train`: fine-tune a model with LoRA / DoRA / QLoRA on chat, instruction, text or classify data.

Options come from ``--config run.yaml`` (same names as the flags, ``-`` or ``_``) and from the flags,
which override the file. Under ``torchrun --nproc-per-node N -m lorakit.cli.main train ...`` every
process trains its shard of each global batch and rank 0 writes the output folder.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

_NOT_CONFIG = ("func", "command", "config", "quiet")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="fine-tune a model with LoRA (DoRA, QLoRA, torchrun)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument(
        "--config", default=None, help="a YAML file of options (flags given here override it)"
    )
    parser.add_argument("--quiet", action="store_true", default=False, help="no progress bar")

    what = parser.add_argument_group("model and data")
    what.add_argument(
        "--model",
        help="built-in name (smollm2-135m-instruct, minilm-l6), HF folder or .gguf file (default "
        "smollm2-135m-instruct; minilm-l6 with --task classify)",
    )
    what.add_argument(
        "--task", choices=("causal", "classify"), help="causal LM loss or classification (default causal)"
    )
    what.add_argument(
        "--data", help="training data: .jsonl .json .csv .tsv .parquet or a save_to_disk folder"
    )
    what.add_argument(
        "--format", type=_format, help="chat | instruction | text | classify | auto (default auto)"
    )
    what.add_argument("--eval-data", help="evaluation data, same formats")
    what.add_argument("--max-length", type=int, help="tokens per example (default 512)")
    long = what.add_mutually_exclusive_group()
    long.add_argument(
        "--truncate",
        dest="long_examples",
        action="store_const",
        const="truncate",
        help="cut examples longer than --max-length (default)",
    )
    long.add_argument(
        "--skip-long",
        dest="long_examples",
        action="store_const",
        const="skip",
        help="leave out examples longer than --max-length",
    )
    what.add_argument("--packing", action=argparse.BooleanOptionalAction, help="pack short examples together")

    adapter = parser.add_argument_group("adapter")
    adapter.add_argument("--method", choices=("lora", "full"),
                         help="lora (default) or full: train every parameter, save the whole model")
    # --rank, not --r: torchrun reads every argument that looks like a prefix of one of its own options,
    # and --r is one of --rdzv-*, --role, --run-path, --redirects (an "ambiguous option" error there).
    # --r stays as an alias for single-process use. No flag here starts any torchrun option (tested).
    adapter.add_argument("--rank", "--r", dest="r", type=int, help="LoRA rank r (default 16)")
    adapter.add_argument("--alpha", type=float, help="lora_alpha (default 32)")
    adapter.add_argument("--dropout", type=float, help="lora_dropout (default 0.05)")
    adapter.add_argument(
        "--targets", type=_targets, help="comma-separated module names or all-linear (default)"
    )
    adapter.add_argument(
        "--modules-to-save",
        type=_names,
        help="comma-separated modules trained in full and saved with the adapter (e.g. pooler)",
    )
    adapter.add_argument("--dora", action=argparse.BooleanOptionalAction, help="weight-decomposed LoRA")
    adapter.add_argument("--rslora", action=argparse.BooleanOptionalAction, help="scale by alpha / sqrt(r)")
    adapter.add_argument("--quantize", type=_quantize, help="nf4: QLoRA, the base in 4-bit (none: off)")

    optimisation = parser.add_argument_group("optimisation")
    optimisation.add_argument("--lr", type=float, help="peak learning rate (default 2e-4)")
    optimisation.add_argument(
        "--loraplus-ratio", type=float, help="LoRA+: lr of lora_B = ratio × lr (e.g. 16)"
    )
    optimisation.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0)")
    optimisation.add_argument("--scheduler", choices=("cosine", "linear", "constant"), help="default cosine")
    optimisation.add_argument(
        "--warmup-ratio", type=float, help="warmup as a fraction of the steps (default 0.03)"
    )
    optimisation.add_argument("--warmup-steps", type=int, help="warmup in steps (overrides --warmup-ratio)")
    optimisation.add_argument("--max-grad-norm", type=float, help="gradient clipping norm (default 1.0)")
    length = optimisation.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=float, help="passes over the data (default 1)")
    length.add_argument("--steps", type=int, help="optimizer steps (instead of --epochs)")
    optimisation.add_argument(
        "--batch-size", type=int, help="examples per micro-batch per process (default 8)"
    )
    optimisation.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    optimisation.add_argument(
        "--dtype",
        action=_Precision,
        choices=("auto", "bf16", "fp32"),
        help="compute precision: auto (default) = bf16 autocast where the CPU (AVX512-BF16, AMX, Arm BF16) "
        "or GPU computes bf16 natively, fp32 elsewhere; the choice and its reason are logged at start-up",
    )
    optimisation.add_argument(
        "--bf16", action=_Precision, nargs=0, help="same as --dtype bf16 (--no-bf16: --dtype fp32)"
    )
    optimisation.add_argument("--no-bf16", action=_Precision, nargs=0, help=argparse.SUPPRESS)
    optimisation.add_argument(
        "--grad-checkpointing",
        action=argparse.BooleanOptionalAction,
        help="recompute activations in backward (less memory)",
    )
    optimisation.add_argument(
        "--lean-activations",
        action=argparse.BooleanOptionalAction,
        help="rebuild cheap activations (norms, activations, gated-MLP products) in backward instead of "
        "keeping them: same gradients, less memory (default on)",
    )
    optimisation.add_argument("--loss-chunk-size", type=int, help="label tokens per chunk of the lean loss")
    optimisation.add_argument(
        "--split-by-length",
        action=argparse.BooleanOptionalAction,
        help="cut each micro-batch into groups of similar length: same gradient, less padding, lower peak "
        "(default on; one process only)",
    )
    optimisation.add_argument("--seed", type=int, help="default 0")

    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--eval-every", type=int, help="evaluate every N steps (and at the end)")
    evaluation.add_argument("--eval-batch-size", type=int)
    evaluation.add_argument(
        "--eval-metric",
        choices=("loss", "accuracy", "exact_match"),
        help="what early stopping watches (default loss)",
    )
    evaluation.add_argument(
        "--exact-match-examples",
        type=int,
        help="generate answers for the first N eval examples and score exact match",
    )
    evaluation.add_argument("--max-new-tokens", type=int, help="generation length for exact match")
    evaluation.add_argument(
        "--early-stopping-patience",
        type=int,
        help="stop after N evaluations without improvement; keep the best adapter",
    )

    run = parser.add_argument_group("output")
    run.add_argument("--output", help="run folder (default runs/lorakit); must be empty or hold this run")
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the previous lorakit run in --output (a folder of other files is never deleted)",
    )
    run.add_argument("--save-every", type=int, help="write a resumable checkpoint every N steps")
    run.add_argument("--keep-checkpoints", type=int, help="how many checkpoints to keep (default 2)")
    run.add_argument(
        "--resume",
        nargs="?",
        const=True,
        type=_resume,
        help="continue from the newest checkpoint in --output, or from the one named",
    )
    run.add_argument("--log-every", type=int, help="metrics.jsonl record every N steps (default 1)")
    run.add_argument("--device", help="cpu, cuda, cuda:1 (default: CUDA if present)")
    run.add_argument(
        "--fsdp",
        action=argparse.BooleanOptionalAction,
        help="under torchrun: shard the base, the adapter and its optimizer state over the processes "
        "(FSDP2, one unit per decoder layer) instead of replicating them (DDP)",
    )
    parser.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from lorakit.train import TqdmProgress, build_config, train

    overrides: dict[str, Any] = {k: v for k, v in vars(args).items() if k not in _NOT_CONFIG}
    config = build_config(args.config, overrides)
    main_process = int(os.environ.get("RANK", "0")) == 0
    progress = TqdmProgress(disable=args.quiet or not main_process, file=sys.stderr)
    result = train(config, progress, restore_base=False)  # the process ends here: nobody uses the model
    if main_process and result.already_finished:
        print(f"{config.output} had already finished its {result.total_steps} steps; nothing to do")
    elif main_process:
        summary = f"trained {result.step}/{result.total_steps} steps"
        if result.losses:
            summary += f", last loss {result.losses[-1]:.4f}"
        if result.best_metric is not None:
            summary += f", best eval {config.eval_metric} {result.best_metric:.4f} at step {result.best_step}"
        if result.stopped_early:
            summary += " (stopped early)"
        print(f"{summary}\nadapter, metrics.jsonl, loss.png and run_config.yaml in {config.output}")
    return 0


class _Precision(argparse.Action):
    """``--dtype X`` and the older ``--bf16`` / ``--no-bf16``: set ``dtype`` and ``bf16`` together, so the
    flag overrides a run config's ``bf16`` and ``dtype`` alike."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        dtype = {"--bf16": "bf16", "--no-bf16": "fp32"}.get(option_string or "", values)
        namespace.dtype, namespace.bf16 = dtype, dtype == "bf16"


def _format(value: str) -> str | None:
    return None if value == "auto" else value


def _targets(value: str) -> str | list[str]:
    # One or more plain module names; `all-linear` stays a string (the matcher's keyword).
    if value.lower() == "all-linear":
        return "all-linear"
    return _names(value)


def _names(value: str) -> list[str]:
    return [name.strip() for name in value.split(",") if name.strip()]


def _quantize(value: str) -> str | None:
    if value.lower() in ("none", "off", "no"):
        return None
    if value != "nf4":
        raise argparse.ArgumentTypeError(f"--quantize must be nf4 or none, got {value!r}")
    return value


def _resume(value: str) -> bool | str:
    return True if value.lower() in ("true", "latest") else value
