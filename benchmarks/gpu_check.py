"""The CUDA paths, proven on a GPU: training steps against peft, the fused loss, lean activations, the
mixed-adapter serving engine, and NCCL DDP. Run by scripts/gpu-check.sh; writes results/gpu.{md,json}.

    .venv/bin/python benchmarks/gpu_check.py                      # everything (< 8 min on one H200)
    .venv/bin/python benchmarks/gpu_check.py --sections train --rows lora_r16_all --dtypes bf16

Without a CUDA device it prints "no CUDA device: skipped" and exits 0 (nothing is imported beyond torch).
Every check records its figures and a pass/fail verdict; the exit status is 1 when a check failed.

Sections:

* ``train``: bench_train's rows (LoRA, DoRA, QLoRA with bitsandbytes NF4 on CUDA) under bf16 and fp16
  autocast, lorakit (LossModule + fused loss + lean activations) against peft with identical initial
  weights: loss and gradient-norm agreement of the first step, median step time and the step's peak
  ``torch.cuda.max_memory_allocated`` above the memory held before it, as lorakit / peft ratios.
* ``kernels``: the fused linear + cross-entropy (values and both gradients against the plain full-logits
  loss, fp32 and bf16) and lean activations (gradients with and without, peak memory) on CUDA.
* ``serve``: the serving engine (adapters mixed per row in one batch) against each request run alone with
  its adapter merged, greedy, on CUDA; tokens/s of the batch.
* ``ddp``: with 2+ GPUs, ``torchrun --nproc-per-node 2 lorakit train --device cuda`` (NCCL), DDP and
  ``--fsdp``, each against one process with the same global batch.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SECTIONS = ("train", "kernels", "serve", "ddp")
GPU_ROWS = ("lora_r16_all", "dora_r16_all", "qlora_r16_all")
GPU_DTYPES = ("bf16", "fp16")
# Agreement bounds: the same model under the same autocast, two implementations (summation order differs).
LOSS_TOLERANCE = {"bf16": 2e-2, "fp16": 5e-3}
GRAD_TOLERANCE = {"bf16": 5e-2, "fp16": 2e-2}
SKIPPED = "no CUDA device: skipped (scripts/gpu-check.sh needs an NVIDIA GPU; nothing was measured)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options; raises SystemExit (argparse's error, exit 2) on unknown sections, rows or dtypes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"subset of {', '.join(SECTIONS)}")
    parser.add_argument("--rows", default=",".join(GPU_ROWS), help=f"training rows: {', '.join(GPU_ROWS)}")
    parser.add_argument("--dtypes", default=",".join(GPU_DTYPES), help="autocast dtypes: bf16, fp16")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=10, help="timed steps per library and row")
    parser.add_argument("--device", default="cuda", help="cuda or cuda:N (cpu only to dry-run the code)")
    parser.add_argument(
        "--model",
        default="smollm2-135m-instruct",
        help="built-in name or model folder (benchmarks/stand_in_model.py: one for a machine without it)",
    )
    parser.add_argument("--output", default=None, help="results name under benchmarks/results (default gpu)")
    args = parser.parse_args(argv)
    args.sections = _subset(parser, "--sections", args.sections, SECTIONS)
    args.rows = _subset(parser, "--rows", args.rows, GPU_ROWS)
    args.dtypes = _subset(parser, "--dtypes", args.dtypes, GPU_DTYPES)
    for name in ("batch_size", "seq_len"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    return args


def _subset(parser: argparse.ArgumentParser, flag: str, value: str, allowed: tuple[str, ...]) -> list[str]:
    chosen = [part.strip() for part in value.split(",") if part.strip()]
    unknown = [part for part in chosen if part not in allowed]
    if unknown or not chosen:
        parser.error(f"{flag}: unknown or empty {unknown or value!r}; choose from {', '.join(allowed)}")
    return chosen


class Clock:
    """Seconds of GPU work: synchronises before reading the time (CUDA runs asynchronously)."""

    def __init__(self, device: Any) -> None:
        import torch

        self.torch, self.cuda = torch, device.type == "cuda"

    def now(self) -> float:
        if self.cuda:
            self.torch.cuda.synchronize()
        return time.perf_counter()

    def peak_during(self, work: Callable[[], Any]) -> tuple[Any, float, int | None]:
        """``(result, seconds, peak bytes allocated above what was allocated before)``; None on CPU."""
        torch = self.torch
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        start = self.now()
        result = work()
        seconds = self.now() - start
        peak = torch.cuda.max_memory_allocated() - before if self.cuda else None
        return result, seconds, peak


# --- train: lorakit vs peft -------------------------------------------------------------------------------


def check_train(args: argparse.Namespace, device: Any, log: Callable[[str], None]) -> list[dict[str, Any]]:
    import gc

    import bench_train
    import torch
    from bench_train import agreement, build_row, init_adamw_state, make_batch

    bench_train.MODEL = args.model  # build_row's base
    results = []
    for dtype in args.dtypes:
        for row in args.rows:
            ours, theirs = build_row(row, dtype, 512, device=str(device))
            vocab = ours.model.config.vocab_size
            batch = {
                k: v.to(device) for k, v in make_batch(vocab, args.batch_size, args.seq_len, 1.0).items()
            }
            clock = Clock(device)
            small = {key: value[:1, :32] for key, value in batch.items()}
            for side in (ours, theirs):
                side.warm_up(small)
                init_adamw_state(side.optimizer)
            first_ours, _, peak_ours = clock.peak_during(functools.partial(ours.step, batch))
            first_peft, _, peak_peft = clock.peak_during(functools.partial(theirs.step, batch))
            check = agreement(first_ours, first_peft)
            for index in range(args.rounds):  # ABBA: drift hits both alike
                for side in (ours, theirs) if index % 2 == 0 else (theirs, ours):
                    start = clock.now()
                    side.step(batch)
                    side.times.append(clock.now() - start)
            seconds = {"lorakit": statistics.median(ours.times), "peft": statistics.median(theirs.times)}
            passed = (
                check["loss_rel_diff"] <= LOSS_TOLERANCE[dtype]
                and check["grad_norm_rel_diff"] <= GRAD_TOLERANCE[dtype]
                and all(math.isfinite(v) for v in (check["loss_lorakit"], check["grad_norm_lorakit"]))
            )
            result = {
                "row": row,
                "dtype": dtype,
                "agreement": check,
                "seconds_per_step": seconds,
                "time_ratio": seconds["lorakit"] / seconds["peft"],
                "peak_step_bytes": {"lorakit": peak_ours, "peft": peak_peft},
                "memory_ratio": peak_ours / peak_peft if peak_ours and peak_peft else None,
                "passed": passed,
            }
            results.append(result)
            log(
                f"train {row}/{dtype}: loss diff {check['loss_rel_diff']:.1e}, grad-norm diff "
                f"{check['grad_norm_rel_diff']:.1e}, time x{result['time_ratio']:.2f}, memory "
                f"x{result['memory_ratio'] or float('nan'):.2f} {'ok' if passed else 'FAILED'}"
            )
            del ours, theirs, batch
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return results


# --- kernels: fused loss and lean activations -------------------------------------------------------------


def check_kernels(args: argparse.Namespace, device: Any, log: Callable[[str], None]) -> list[dict[str, Any]]:
    import torch
    import torch.nn.functional as F

    from lorakit.train.fused_loss import linear_cross_entropy_sum

    clock = Clock(device)
    results = []
    generator = torch.Generator(device="cpu").manual_seed(0)
    rows, hidden_size, vocab = args.batch_size * args.seq_len, 576, 49152  # SmolLM2's head
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        hidden = torch.randn(rows, hidden_size, generator=generator).to(device, dtype)
        weight = (torch.randn(vocab, hidden_size, generator=generator) * 0.02).to(device, dtype)
        targets = torch.randint(0, vocab, (rows,), generator=generator).to(device)

        def fused(h=hidden, w=weight, t=targets):
            h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
            loss = linear_cross_entropy_sum(h, w, None, t, 512)
            loss.backward()
            return float(loss), h.grad.float(), w.grad.float()

        def plain(h=hidden, w=weight, t=targets):
            h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
            loss = F.cross_entropy((h @ w.T).float(), t, reduction="sum")
            loss.backward()
            return float(loss), h.grad.float(), w.grad.float()

        (ours, seconds_ours, peak_ours) = clock.peak_during(fused)
        (reference, seconds_ref, peak_ref) = clock.peak_during(plain)
        loss_diff = abs(ours[0] - reference[0]) / abs(reference[0])
        grad_diffs = [float((a - b).norm() / b.norm()) for a, b in zip(ours[1:], reference[1:])]
        bound = 1e-5 if dtype_name == "fp32" else 2e-2
        result = {
            "check": f"fused linear+cross-entropy {dtype_name}",
            "loss_rel_diff": loss_diff,
            "grad_rel_diffs": grad_diffs,
            "seconds": {"fused": seconds_ours, "plain": seconds_ref},
            "peak_bytes": {"fused": peak_ours, "plain": peak_ref},
            "passed": loss_diff <= bound and max(grad_diffs) <= max(bound, 1e-4) * 10,
        }
        results.append(result)
        log(f"kernels fused {dtype_name}: loss diff {loss_diff:.1e}, grads {max(grad_diffs):.1e}")
    results.extend(_lean_activations(args, device, clock, log))
    return results


def _lean_activations(
    args: argparse.Namespace, device: Any, clock: Clock, log: Callable[[str], None]
) -> list[dict[str, Any]]:
    """Gradients with and without lean activations: equal in fp32 (the recipes rebuild exactly what was
    dropped), close in bf16 (rebuilt in bf16, as autocast computed them); peak memory of both."""
    import torch

    import lorakit
    from lorakit.models import load_causal_lm
    from lorakit.train.lean_activations import LeanActivations
    from lorakit.train.loss import LossModule

    model, _ = load_causal_lm(args.model)
    lorakit.inject(model, lorakit.LoraConfig(r=16, target_modules="all-linear", init_lora_weights=False))
    model.to(device).train()
    loss_module = LossModule(model, "causal", 512)
    ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len)).to(device)
    batch = {"input_ids": ids, "labels": ids}
    lean = LeanActivations(model)

    def step(with_lean: bool, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
        with autocast, lean if with_lean else _nothing():
            loss, _ = loss_module(batch)
        loss.backward()
        return {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}

    results = []
    for name, dtype, bound in (("fp32", torch.float32, 1e-5), ("bf16", torch.bfloat16, 2e-2)):
        step(True, dtype)  # warm-up
        plain, seconds_plain, peak_plain = clock.peak_during(functools.partial(step, False, dtype))
        leaned, seconds_lean, peak_lean = clock.peak_during(functools.partial(step, True, dtype))
        # The gradient of all adapter tensors as one vector (a single tiny tensor's relative error says
        # little in bf16).
        difference = math.sqrt(sum(float((leaned[n] - g).norm()) ** 2 for n, g in plain.items()))
        norm = math.sqrt(sum(float(g.norm()) ** 2 for g in plain.values()))
        log(
            f"kernels lean activations {name}: grad diff {difference / norm:.1e}, peak bytes {peak_lean} "
            f"(lean), {peak_plain} (plain)"
        )
        results.append(
            {
                "check": f"lean activations {name} (SmolLM2, LoRA r=16 all-linear)",
                "grad_rel_diff": difference / norm,
                "seconds": {"lean": seconds_lean, "plain": seconds_plain},
                "peak_bytes": {"lean": peak_lean, "plain": peak_plain},
                "memory_ratio": peak_lean / peak_plain if peak_lean and peak_plain else None,
                "passed": difference / norm <= bound,
            }
        )
    return results


class _nothing:
    def __enter__(self) -> None: ...
    def __exit__(self, *exc: object) -> None: ...


# --- report ----------------------------------------------------------------------------------------------


def report(results: dict[str, list[dict[str, Any]]], setup: dict[str, Any], command: str) -> str:
    """The markdown of results/gpu.md."""
    mib = 2**20

    def size(value: int | None) -> str:
        return "n/a" if value is None else f"{value / mib:.0f}"

    lines = [
        "# GPU check",
        "",
        f"{setup['device_name']}, torch {setup['torch']}, CUDA {setup['cuda']}, "
        f"peft {setup.get('peft')}, bitsandbytes {setup.get('bitsandbytes')}, transformers "
        f"{setup.get('transformers')}; model {setup.get('model')}; batch "
        f"{setup['batch'][0]} x {setup['batch'][1]} tokens. Total {setup['seconds']:.0f} s.",
        "",
    ]
    if results.get("train"):
        lines += [
            "## Training step, lorakit vs peft (same weights, same batch, autocast)",
            "",
            "| row | dtype | loss rel. diff | grad-norm rel. diff | lorakit ms | peft ms | time ratio "
            "| lorakit step peak MiB | peft step peak MiB | memory ratio | ok |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in results["train"]:
            a, s, p = r["agreement"], r["seconds_per_step"], r["peak_step_bytes"]
            ratio = "n/a" if r["memory_ratio"] is None else f"{r['memory_ratio']:.2f}"
            lines.append(
                f"| {r['row']} | {r['dtype']} | {a['loss_rel_diff']:.1e} | {a['grad_norm_rel_diff']:.1e} "
                f"| {s['lorakit'] * 1e3:.1f} | {s['peft'] * 1e3:.1f} | {r['time_ratio']:.2f} "
                f"| {size(p['lorakit'])} | {size(p['peft'])} | {ratio} | {'yes' if r['passed'] else 'NO'} |"
            )
        lines += [
            "",
            "Step peak = `torch.cuda.max_memory_allocated` during the step minus the memory allocated "
            "before it (both models resident).",
            "",
        ]
    for section in ("kernels", "serve", "ddp"):
        if results.get(section):
            lines += [f"## {section}", ""]
            for r in results[section]:
                shown = {k: v for k, v in r.items() if k not in ("check", "passed")}
                lines.append(f"- {r['check']}: {'ok' if r['passed'] else 'FAILED'} — `{json.dumps(shown)}`")
            lines.append("")
    lines += [f"Regenerate: `{command}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(SKIPPED, flush=True)
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(Path(__file__).parent))  # bench_train, timing

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    started = time.perf_counter()
    from gpu_check_serving import check_ddp, check_serve

    checks = {"train": check_train, "kernels": check_kernels, "serve": check_serve, "ddp": check_ddp}
    results: dict[str, list[dict[str, Any]]] = {}
    for section in args.sections:
        try:
            results[section] = checks[section](args, device, log)
        except Exception as error:  # one broken path must not hide the others' figures
            log(f"{section}: FAILED with {type(error).__name__}: {error}")
            results[section] = [
                {"check": section, "error": f"{type(error).__name__}: {error}", "passed": False}
            ]
    import bitsandbytes
    import peft
    import transformers
    from timing import machine, write

    setup = {
        **machine(),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)",
        "cuda": torch.version.cuda,
        "peft": peft.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "transformers": transformers.__version__,
        "model": args.model,
        "batch": [args.batch_size, args.seq_len],
        "seconds": time.perf_counter() - started,
    }
    shown = sys.argv[1:] if argv is None else argv
    command = " ".join(["bash scripts/gpu-check.sh", *shown])
    text = report(results, setup, command)
    passed = all(r["passed"] for section in results.values() for r in section)
    if device.type == "cuda" or args.output:
        write(args.output or "gpu", {"setup": setup, "results": results, "all_passed": passed}, text)
    print(text)
    log(f"done in {setup['seconds']:.0f} s: {'all checks passed' if passed else 'SOME CHECKS FAILED'}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
