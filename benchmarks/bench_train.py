"""Training-step benchmark: lorakit against peft in the same run, on SmolLM2-135M (batch 8 x 256 tokens).

    .venv/bin/python benchmarks/bench_train.py                      # every row, fp32 and bf16
    .venv/bin/python benchmarks/bench_train.py --rows lora_r8_qv,qlora_r16_all --dtypes fp32 --rounds 2

One optimizer step = forward + backward + gradient clipping (max norm 1, as lorakit's trainer and HF's
Trainer do) + AdamW step + ``zero_grad(set_to_none=True)``, on random token ids; by default every position
is labelled (``--label-fraction 1``), the case least favourable to lorakit's lean loss, which saves most
when only a response is labelled.

- **lorakit**: ``lorakit.inject`` (or the plain model for full fine-tuning), the trainer's ``LossModule``
  (``causal_lm_loss_sum``: logits only at labelled positions, 512 rows at a time, through the fused
  head + cross-entropy that computes its gradients in forward) and its default lean activations
  (``lorakit.train.lean_activations.LeanActivations`` around the forward), divided by the label count,
  exactly as ``lorakit.train`` does.
- **peft**: ``peft.get_peft_model`` (or the plain model) and ``model(input_ids=..., labels=...).loss``, the
  standard transformers loss; the output is dropped before backward, as HF's Trainer does.

bf16 rows wrap the forward of both in ``torch.autocast("cpu", dtype=torch.bfloat16)``; adapters, gradients
and AdamW's state stay fp32. The QLoRA rows use the same NF4 base on both sides (double quantisation,
``lm_head`` unquantised), stored and computed in fp32 for the fp32 row and in bf16 for the bf16 row (what
``lorakit train --quantize nf4 --bf16`` loads).

Per row, in one process: both models get the same initial weights (peft's adapter, made with
``init_lora_weights=False`` so B is not zero, copied into lorakit by name). A small forward + backward of
each (1 x 32 tokens, no update) runs every code path once. The first full step of each then runs under
lorakit's ``LiveTensorTracker`` (the same method for both libraries, AdamW's state allocated beforehand so
the step has the steady-state layout): its peak counts weights, gradients, AdamW's state, the batch and
activations, and its loss and per-tensor gradient norms are compared between the libraries. It is not
timed (the tracker slows small operators, peft's more than lorakit's). Then ``--rounds`` (fp32) or
``--bf16-rounds`` timed steps alternate lorakit and peft in ABBA order, so drifting load from other jobs
hits both alike; the report gives medians and the ratios lorakit / peft. ``--rounds 0`` times the measured
step instead (a quick estimate of the cost of a run).

Each (row, dtype) runs in a fresh Python process (``--same-process`` runs them all in this one): a step's
time depends on the state earlier rows leave behind (the process's heap above all). In one run with every
row in one process, peft's LoRA r=8 q,v step took 7.0 s right after the full fine-tuning row and 8.5 s in a
process of its own, while lorakit's took 7.05 s in both; fresh processes give every row the same start.

``OMP_WAIT_POLICY=PASSIVE`` is set before torch loads (unless already set): OpenMP's default spinning
made every step 2 to 3 times slower on the shared 2-core machine. ``HF_HUB_OFFLINE=1`` likewise.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Before torch loads OpenMP: with the default (spinning) wait policy, OpenMP threads that wait burn the CPU
# other processes need, and on this project's shared 2-core machines a step took 2 to 3 times longer.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft
import torch
from timing import machine, write
from torch import nn

import lorakit
from lorakit.analysis.measure import LiveTensorTracker
from lorakit.models import load_causal_lm
from lorakit.train.lean_activations import LeanActivations
from lorakit.train.loss import IGNORE_INDEX, LossModule, count_label_tokens

MODEL = "smollm2-135m-instruct"
LR = 2e-4
MAX_GRAD_NORM = 1.0
# name -> (LoRA config or None for full fine-tuning, NF4 base?)
ROWS: dict[str, tuple[dict[str, Any] | None, bool]] = {
    "full": (None, False),
    "lora_r8_qv": ({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}, False),
    "lora_r16_all": ({"r": 16, "lora_alpha": 32, "target_modules": "all-linear"}, False),
    "dora_r16_all": ({"r": 16, "lora_alpha": 32, "target_modules": "all-linear", "use_dora": True}, False),
    "qlora_r16_all": ({"r": 16, "lora_alpha": 32, "target_modules": "all-linear"}, True),
}
LABELS = {
    "full": "full fine-tuning",
    "lora_r8_qv": "LoRA r=8 q,v",
    "lora_r16_all": "LoRA r=16 all-linear",
    "dora_r16_all": "DoRA r=16 all-linear",
    "qlora_r16_all": "QLoRA r=16 all-linear (NF4)",
}
DTYPES = ("fp32", "bf16")
TARGET_TIME, TARGET_MEMORY = 1.0, 0.6


Batch = dict[str, torch.Tensor]


@dataclass
class Side:
    """One library's model, its AdamW and its loss (the mean over the label tokens of a batch)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    params: list[tuple[str, nn.Parameter]]
    loss_of: Callable[[Batch], torch.Tensor]
    times: list[float] = field(default_factory=list)

    def step(self, batch: Batch) -> tuple[float, dict[str, float]]:
        """One optimizer step; the loss and every trainable tensor's gradient norm (before clipping)."""
        loss = self.loss_of(batch)
        loss.backward()
        norms = {name: float(p.grad.norm()) if p.grad is not None else 0.0 for name, p in self.params}
        torch.nn.utils.clip_grad_norm_([p for _, p in self.params], MAX_GRAD_NORM)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach()), norms

    def warm_up(self, batch: Batch) -> None:
        """Forward and backward without an update (the weights stay as they are), gradients dropped."""
        self.loss_of(batch).backward()
        self.optimizer.zero_grad(set_to_none=True)


def make_batch(vocab: int, size: int, seq: int, label_fraction: float, seed: int = 0) -> Batch:
    """Random ids (size, seq); the last ``label_fraction`` of each row is labelled (a response), the rest
    is -100 (a prompt)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (size, seq), generator=generator)
    labels = input_ids.clone()
    labels[:, : seq - round(seq * label_fraction)] = IGNORE_INDEX
    return {"input_ids": input_ids, "labels": labels}


def trainable(model: nn.Module, prefix: str = "") -> list[tuple[str, nn.Parameter]]:
    """``(name without prefix, parameter)`` of the trainable parameters, in model order."""
    return [(name.removeprefix(prefix), p) for name, p in model.named_parameters() if p.requires_grad]


def load_base(quantized: bool, dtype: str, device: str = "cpu") -> nn.Module:
    """The SmolLM2 base: fp32, or NF4 with fp32 (fp32 row) / bf16 / fp16 storage and compute.

    On another ``device`` (benchmarks/gpu_check.py) a plain base is moved there; an NF4 base is quantised
    there while it loads (bitsandbytes quantises on the device the weights land on).
    """
    storage = {"bf16": "bfloat16", "fp16": "float16"}.get(dtype, "float32")
    if not quantized:
        model, _ = load_causal_lm(MODEL)
        return model.to(device)
    if device == "cpu":
        model, _ = load_causal_lm(MODEL, quantize="nf4", dtype=storage)
        return model
    from transformers import AutoModelForCausalLM

    from lorakit.models import model_folder
    from lorakit.models.quantize import quantization_config

    torch_dtype = getattr(torch, storage)
    return AutoModelForCausalLM.from_pretrained(
        model_folder(MODEL),
        dtype=torch_dtype,
        quantization_config=quantization_config("nf4", torch_dtype),
        device_map={"": torch.device(device).index or 0},
    )


def build_row(row: str, dtype: str, chunk_size: int, device: str = "cpu") -> tuple[Side, Side]:
    """``(lorakit side, peft side)`` of one row, with identical initial weights, on ``device``.

    ``dtype`` fp32, bf16 or fp16 (the last on CUDA, for benchmarks/gpu_check.py): autocast to it.
    """
    config, quantized = ROWS[row]
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)
    kind = torch.device(device).type
    autocast = (lambda: torch.autocast(kind, dtype=half)) if half is not None else contextlib.nullcontext
    torch.manual_seed(0)

    peft_model = load_base(quantized, dtype, device)
    ours = load_base(quantized, dtype, device)
    if config is None:
        peft_model.requires_grad_(True)
        ours.requires_grad_(True)
        peft_params, our_params = trainable(peft_model), trainable(ours)
    else:
        peft_model = peft.get_peft_model(
            peft_model, peft.LoraConfig(**config, lora_dropout=0.0, init_lora_weights=False)
        )
        lorakit.inject(ours, lorakit.LoraConfig(**config, lora_dropout=0.0))
        peft_params, our_params = trainable(peft_model, "base_model.model."), trainable(ours)
        by_name = dict(our_params)
        if sorted(by_name) != sorted(name for name, _ in peft_params):
            raise RuntimeError(f"{row}: lorakit's trainable tensors are not peft's")
        with torch.no_grad():
            for name, parameter in peft_params:  # the same adapter (A, B, DoRA magnitude) on both sides
                by_name[name].copy_(parameter)
        for name, parameter in peft_params + our_params:
            if parameter.dtype != torch.float32:
                raise RuntimeError(f"{row}: adapter tensor {name} is {parameter.dtype}, expected float32")
    peft_model.train()
    ours.train()

    loss_module = LossModule(ours, "causal", chunk_size)  # what lorakit.train runs
    lean = LeanActivations(ours)  # the trainer's default (lean_activations=True)

    def our_loss(batch: Batch) -> torch.Tensor:
        # the label count is taken before the forward, as the trainer does
        scale = 1.0 / max(count_label_tokens(batch, "causal"), 1)
        with autocast(), lean:
            loss_sum, _ = loss_module(batch)
        return loss_sum * scale

    def peft_loss(batch: Batch) -> torch.Tensor:
        with autocast():
            return peft_model(input_ids=batch["input_ids"], labels=batch["labels"]).loss

    sides = []
    for model, params, loss_of in ((ours, our_params, our_loss), (peft_model, peft_params, peft_loss)):
        optimizer = torch.optim.AdamW([p for _, p in params], lr=LR, weight_decay=0.0)
        sides.append(Side(model, optimizer, params, loss_of))
    return sides[0], sides[1]


def agreement(ours: tuple[float, dict[str, float]], theirs: tuple[float, dict[str, float]]) -> dict[str, Any]:
    """Relative differences of the first step's loss and of the per-tensor gradient norms."""
    (our_loss, our_norms), (peft_loss, peft_norms) = ours, theirs
    largest = max(peft_norms.values())
    relative = {
        # a tensor whose gradient is (nearly) zero is compared against the largest norm instead
        name: abs(our_norms[name] - peft_norms[name]) / max(peft_norms[name], 1e-3 * largest)
        for name in peft_norms
    }
    worst = max(relative, key=relative.get)
    total_ours = math.sqrt(sum(v * v for v in our_norms.values()))
    total_peft = math.sqrt(sum(v * v for v in peft_norms.values()))
    return {
        "loss_lorakit": our_loss,
        "loss_peft": peft_loss,
        "loss_rel_diff": abs(our_loss - peft_loss) / abs(peft_loss),
        "grad_norm_lorakit": total_ours,
        "grad_norm_peft": total_peft,
        "grad_norm_rel_diff": abs(total_ours - total_peft) / total_peft,
        "max_tensor_grad_norm_rel_diff": relative[worst],
        "worst_tensor": worst,
        "tensors": len(relative),
    }


def init_adamw_state(optimizer: torch.optim.AdamW) -> None:
    """Allocate AdamW's state now, exactly as ``torch.optim.AdamW`` does lazily in its first step.

    The first step then already has the steady-state memory layout (weights + moments live through the
    whole step), so measuring it gives the peak of any later step, and its update is unchanged.
    """
    for group in optimizer.param_groups:
        if group["fused"] or group["capturable"] or group["amsgrad"]:
            raise ValueError("init_adamw_state handles the default (non-fused, non-amsgrad) AdamW only")
        for parameter in group["params"]:
            state = optimizer.state[parameter]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.get_default_dtype())
                state["exp_avg"] = torch.zeros_like(parameter, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(parameter, memory_format=torch.preserve_format)


def measured_step(side: Side, batch: Batch) -> tuple[tuple[float, dict[str, float]], dict[str, int], float]:
    """The first optimizer step, under ``LiveTensorTracker``: its result, the memory and its seconds.

    Weights, buffers, NF4 quantisation state, AdamW's (pre-allocated) moments and the batch are
    registered before the step; gradients, activations and logits are seen as the operators make them.
    """
    init_adamw_state(side.optimizer)
    gc.collect()
    tracker = LiveTensorTracker()
    tracker.track_module(side.model)
    tracker.track_optimizer(side.optimizer)
    tracker.track(batch.values())
    static = tracker.current_bytes
    start = time.perf_counter()
    with tracker:
        result = side.step(batch)
    seconds = time.perf_counter() - start
    return result, {"static_bytes": static, "peak_bytes": tracker.peak_bytes}, seconds


def run_row(
    row: str,
    dtype: str,
    batch: Batch,
    rounds: int,
    chunk_size: int,
    log: Callable[[str], None],
    lorakit_first: bool = True,
) -> dict[str, Any]:
    """One (row, dtype): warm-up, the measured first step of each library, then alternated timed steps.

    With ``rounds == 0`` the seconds are those of the measured (tracked) first steps instead.
    """
    start = time.perf_counter()
    ours, theirs = build_row(row, dtype, chunk_size)
    # A small forward + backward of each (no update: the weights stay equal) runs every code path once
    # (lazy initialisation, kernel lookup) before anything is measured.
    small = {key: value[:1, :32] for key, value in batch.items()}
    for side in (ours, theirs):
        side.warm_up(small)
    built = time.perf_counter()
    # The first full step of each is the memory pass and the agreement check (same weights, same batch).
    # (which library goes first alternates between rows, so a drift in background load is shared)
    if lorakit_first:
        first_ours, memory_ours, tracked_ours = measured_step(ours, batch)
        first_peft, memory_peft, tracked_peft = measured_step(theirs, batch)
    else:
        first_peft, memory_peft, tracked_peft = measured_step(theirs, batch)
        first_ours, memory_ours, tracked_ours = measured_step(ours, batch)
    check = agreement(first_ours, first_peft)
    log(
        f"{row}/{dtype}: built and warmed up in {built - start:.0f}s, measured step lorakit "
        f"{tracked_ours:.1f}s peft {tracked_peft:.1f}s, loss diff {check['loss_rel_diff']:.1e}, max "
        f"per-tensor grad-norm diff {check['max_tensor_grad_norm_rel_diff']:.1e}"
    )
    for index in range(rounds):
        # ABBA order, continuing from the measured steps: a drift in background load hits both alike
        for side in (ours, theirs) if (index % 2 == 0) != lorakit_first else (theirs, ours):
            tick = time.perf_counter()
            side.step(batch)
            side.times.append(time.perf_counter() - tick)
    from_tracked = rounds == 0
    if from_tracked:
        ours.times, theirs.times = [tracked_ours], [tracked_peft]
    seconds = {"lorakit": statistics.median(ours.times), "peft": statistics.median(theirs.times)}
    memory = {"lorakit": memory_ours, "peft": memory_peft}
    tokens = batch["input_ids"].numel()
    result = {
        "row": row,
        "dtype": dtype,
        "trainable_parameters": sum(p.numel() for _, p in ours.params),
        "seconds_per_step": seconds,
        "step_samples": {"lorakit": ours.times, "peft": theirs.times},
        "tracked_step_seconds": {"lorakit": tracked_ours, "peft": tracked_peft},
        "seconds_from_tracked_first_step": from_tracked,
        "tokens_per_s": {k: tokens / v for k, v in seconds.items()},
        "memory": memory,
        "time_ratio": seconds["lorakit"] / seconds["peft"],
        "memory_ratio": memory_ours["peak_bytes"] / memory_peft["peak_bytes"],
        "agreement": check,
        "wall_seconds": time.perf_counter() - start,
    }
    result["time_target_met"] = result["time_ratio"] <= TARGET_TIME
    result["memory_target_met"] = result["memory_ratio"] <= TARGET_MEMORY
    log(
        f"{row}/{dtype}: lorakit {seconds['lorakit']:.2f}s peft {seconds['peft']:.2f}s "
        f"(x{result['time_ratio']:.2f}), peak {memory_ours['peak_bytes'] / 2**20:.0f} MiB vs "
        f"{memory_peft['peak_bytes'] / 2**20:.0f} MiB (x{result['memory_ratio']:.2f}), row took "
        f"{result['wall_seconds']:.0f}s"
    )
    return result


def timing(setup: dict[str, Any]) -> str:
    """How the seconds of the table were taken, in words."""
    parts = []
    for dtype, rounds in (("fp32", setup["rounds"]), ("bf16", setup["bf16_rounds"])):
        if dtype not in setup["dtypes"]:
            continue
        if rounds:
            parts.append(
                f"{dtype}: median of {rounds} timed steps per library, lorakit and peft alternated, after "
                "the measured first step"
            )
        else:
            parts.append(
                f"{dtype}: one sample per library, the measured first step itself (under the tracker, after "
                "a small forward/backward warm-up), to fit the time budget"
            )
    return "Seconds: " + "; ".join(parts) + "."


def table(results: list[dict[str, Any]], setup: dict[str, Any], command: str) -> str:
    """The markdown report: one row per (row, dtype), then the agreement of the first step."""
    mib = 2**20
    size, seq = setup["batch"]
    lines = [
        "# Training-step benchmark: lorakit vs peft (same run)",
        "",
        f"SmolLM2-135M-Instruct, batch {size} x {seq} random tokens, {setup['label_fraction']:.0%} of "
        f"positions labelled ({setup['label_tokens']} label tokens), LoRA dropout 0. One optimizer step = "
        f"forward + backward + clip to norm {MAX_GRAD_NORM} + AdamW (lr {LR}) + zero_grad. {timing(setup)} "
        f"torch {setup['torch']} (CPU, {setup['threads']} threads), peft {setup['peft']}, transformers "
        f"{setup['transformers']}, bitsandbytes {setup['bitsandbytes']}. The machine was shared with other "
        "jobs: compare lorakit with peft within a row, not absolute times across rows.",
        "",
        "Peak = most live tensor bytes during a step (lorakit's `LiveTensorTracker`, the same pass for both "
        "libraries: the first step, with AdamW's state allocated beforehand): weights, gradients, AdamW "
        "state, batch, activations and logits. Targets: lorakit time <= peft, lorakit peak <= "
        f"{TARGET_MEMORY} x peft.",
        "",
        "| row | dtype | trainable | lorakit s/step | peft s/step | time ratio | lorakit tok/s | peft tok/s "
        "| lorakit peak MiB | peft peak MiB | memory ratio | target met (time, memory) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        s, t, m = r["seconds_per_step"], r["tokens_per_s"], r["memory"]
        met = f"{'yes' if r['time_target_met'] else 'no'}, {'yes' if r['memory_target_met'] else 'no'}"
        lines.append(
            f"| {LABELS[r['row']]} | {r['dtype']} | {r['trainable_parameters'] / 1e6:.2f} M "
            f"| {s['lorakit']:.2f} | {s['peft']:.2f} | {r['time_ratio']:.2f} "
            f"| {t['lorakit']:.0f} | {t['peft']:.0f} "
            f"| {m['lorakit']['peak_bytes'] / mib:.0f} | {m['peft']['peak_bytes'] / mib:.0f} "
            f"| {r['memory_ratio']:.2f} | {met} |"
        )
    lines += [
        "",
        "Agreement of the first step (same initial weights, same batch): relative difference of the loss, of "
        "the global gradient norm, and the largest relative difference of a trainable tensor's gradient "
        "norm. "
        "Static = weights, buffers, AdamW state and batch before the step.",
        "",
        "| row | dtype | loss (lorakit) | loss rel. diff | grad-norm rel. diff | max per-tensor rel. diff "
        "| static MiB (lorakit / peft) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        a, m = r["agreement"], r["memory"]
        lines.append(
            f"| {LABELS[r['row']]} | {r['dtype']} | {a['loss_lorakit']:.6f} | {a['loss_rel_diff']:.1e} "
            f"| {a['grad_norm_rel_diff']:.1e} | {a['max_tensor_grad_norm_rel_diff']:.1e} "
            f"| {m['lorakit']['static_bytes'] / mib:.0f} / {m['peft']['static_bytes'] / mib:.0f} |"
        )
    lines += ["", f"Regenerate: `{command}`", ""]
    return "\n".join(lines)


DEFAULTS: dict[str, Any] = {
    "rows": ",".join(ROWS),
    "dtypes": ",".join(DTYPES),
    "rounds": 4,
    "bf16_rounds": 4,
    "batch_size": 8,
    "seq_len": 256,
    "label_fraction": 1.0,
    "chunk_size": 512,
    "threads": 2,
}


def run_row_in_child(args: argparse.Namespace, row: str, dtype: str, lorakit_first: bool) -> dict[str, Any]:
    """`run_row` in a fresh Python process with the same options; its result dict."""
    options = [
        f"--{key.replace('_', '-')}={getattr(args, key)}" for key in DEFAULTS if key not in ("rows", "dtypes")
    ]
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "row.json"
        subprocess.run(
            [
                sys.executable,
                __file__,
                f"--rows={row}",
                f"--dtypes={dtype}",
                *options,
                f"--row-json={out}",
                f"--lorakit-first={int(lorakit_first)}",
            ],
            check=True,
        )
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", help=f"comma-separated subset of {', '.join(ROWS)}")
    parser.add_argument("--dtypes", help="comma-separated subset of fp32, bf16")
    parser.add_argument("--rounds", type=int, help="timed steps per library, fp32 rows (0: estimate only)")
    parser.add_argument("--bf16-rounds", type=int, help="timed steps per library, bf16 rows")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--label-fraction", type=float, help="labelled share of each row (its end)")
    parser.add_argument("--chunk-size", type=int, help="label tokens per chunk of lorakit's lean loss")
    parser.add_argument("--threads", type=int)
    parser.add_argument(
        "--name",
        help="write results/<name>.{json,md}; default: 'train' for a run with every default, else none",
    )
    parser.add_argument(
        "--same-process",
        action="store_true",
        help="run every row in this process (default: each row in a fresh one; see the docstring)",
    )
    parser.add_argument("--row-json", help=argparse.SUPPRESS)  # internal: one row, its result to this file
    parser.add_argument("--lorakit-first", type=int, default=1, help=argparse.SUPPRESS)
    parser.set_defaults(**DEFAULTS)
    args = parser.parse_args()
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    unknown = [r for r in rows if r not in ROWS] + [d for d in dtypes if d not in DTYPES]
    if unknown:
        parser.error(f"unknown rows/dtypes: {unknown}")
    if not 0 < args.label_fraction <= 1:
        parser.error("--label-fraction must be in (0, 1]")
    changed = {key: getattr(args, key) for key in DEFAULTS if getattr(args, key) != DEFAULTS[key]}
    name = args.name if args.name is not None else (None if changed else "train")
    command = ".venv/bin/python benchmarks/bench_train.py" + "".join(
        f" --{key.replace('_', '-')} {value}" for key, value in changed.items()
    )
    torch.set_num_threads(args.threads)

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    import bitsandbytes
    import transformers

    vocab = load_causal_lm(MODEL)[0].config.vocab_size
    batch = make_batch(vocab, args.batch_size, args.seq_len, args.label_fraction)
    started = time.perf_counter()
    if args.row_json:  # a child of an isolated run: one row, written where the parent reads it
        rounds = args.rounds if dtypes[0] == "fp32" else args.bf16_rounds
        result = run_row(rows[0], dtypes[0], batch, rounds, args.chunk_size, log, bool(args.lorakit_first))
        Path(args.row_json).write_text(json.dumps(result))
        return
    results = []
    for dtype in dtypes:
        for row in rows:
            rounds = args.rounds if dtype == "fp32" else args.bf16_rounds
            first = len(results) % 2 == 0
            if args.same_process:
                results.append(run_row(row, dtype, batch, rounds, args.chunk_size, log, lorakit_first=first))
                gc.collect()
            else:
                results.append(run_row_in_child(args, row, dtype, first))
    setup = {
        "model": "SmolLM2-135M-Instruct",
        "batch": [args.batch_size, args.seq_len],
        "label_fraction": args.label_fraction,
        "label_tokens": count_label_tokens(batch, "causal"),
        "dtypes": dtypes,
        "rows": rows,
        "rounds": args.rounds,
        "bf16_rounds": args.bf16_rounds,
        "chunk_size": args.chunk_size,
        "rows_in_fresh_processes": not args.same_process,
        "lr": LR,
        "max_grad_norm": MAX_GRAD_NORM,
        "lora_dropout": 0.0,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        **machine(),
    }
    payload = {
        "setup": setup,
        "targets": {"time_ratio_max": TARGET_TIME, "memory_ratio_max": TARGET_MEMORY},
        "results": results,
        "all_time_targets_met": all(r["time_target_met"] for r in results),
        "all_memory_targets_met": all(r["memory_target_met"] for r in results),
        "total_seconds": time.perf_counter() - started,
        "command": command,
    }
    text = table(results, setup, command)
    if name:
        write(name, payload, text)
    print(text)
    log(f"done in {payload['total_seconds']:.0f}s" + (f", wrote results/{name}.{{json,md}}" if name else ""))


if __name__ == "__main__":
    main()
