"""The serving and multi-GPU halves of benchmarks/gpu_check.py (see its docstring): the mixed-adapter
engine on CUDA against each request merged and run alone, and NCCL DDP / FSDP against one process."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpu_check import Clock

# --- serve: adapters mixed per row on CUDA ---------------------------------------------------------------


def check_serve(args: argparse.Namespace, device: Any, log: Callable[[str], None]) -> list[dict[str, Any]]:
    import torch

    import lorakit
    from lorakit.models import load_causal_lm
    from lorakit.serve.adapters import AdapterCatalog
    from lorakit.serve.engine import Engine
    from lorakit.serve.requests import Request
    from lorakit.serve.sampling import SamplingParams

    names = ["a", "b", "c", "d"]
    configs = {
        "a": lorakit.LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        "b": lorakit.LoraConfig(r=16, target_modules="all-linear", init_lora_weights=False),
        "c": lorakit.LoraConfig(r=4, target_modules=["down_proj"], init_lora_weights=False, use_rslora=True),
        "d": lorakit.LoraConfig(
            r=8, target_modules=["q_proj", "o_proj"], init_lora_weights=False, use_dora=True
        ),
    }
    clock = Clock(device)
    with tempfile.TemporaryDirectory() as folder:
        for index, name in enumerate(names):
            torch.manual_seed(index)
            model, _ = load_causal_lm(args.model)
            lorakit.inject(model, configs[name], "x")
            with torch.no_grad():  # strong enough that every adapter changes the greedy tokens
                for key, parameter in model.named_parameters():
                    if "lora_B" in key:
                        parameter.mul_(3.0)
            lorakit.save_adapter(model, Path(folder) / name, adapter_name="x")
        model, tokenizer = load_causal_lm(args.model)
        engine = Engine(
            model.to(device),
            tokenizer,
            base_name="base",
            catalog=AdapterCatalog(folder),
            max_batch=16,
            max_loras=4,
            max_lora_rank=16,
        )
        prompts = [tokenizer(f"Question {i}: what is {i} + {i}?").input_ids for i in range(16)]
        models = [[*names, None][i % 5] for i in range(16)]
        tokens = 24

        def batch() -> list:
            params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
            return engine.generate([Request(p, m, params) for p, m in zip(prompts, models)])

        batch()  # warm-up (adapters parsed and placed in slots)
        events, seconds, peak = clock.peak_during(batch)
        agreeing, total, changed = 0, 0, 0
        base_model, _ = load_causal_lm(args.model)
        base_model.to(device)

        def greedy(model: Any, prompt: list[int]) -> list[int]:
            """The tokens ``model.generate`` adds to ``prompt``, greedy, at most ``tokens``."""
            ids = torch.tensor([prompt], device=device)
            with torch.no_grad():
                out = model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )
            return out[0, len(prompt) :].tolist()

        for prompt, name, event in zip(prompts, models, events):
            reference, _ = load_causal_lm(args.model)
            if name is not None:
                lorakit.load_adapter(reference, Path(folder) / name)
                lorakit.merge(reference)
            reference.to(device)
            expected = greedy(reference, prompt)
            # generate stops at eos, the engine (ignore_eos) goes on: compare the tokens generate made.
            # Greedy paths may part after a near-tie in the last bits; count the tokens before that.
            pairs = zip(event.token_ids, expected)
            same = next((i for i, (a, b) in enumerate(pairs) if a != b), len(expected))
            agreeing, total = agreeing + same, total + len(expected)
            if name is not None:  # the adapter must matter, or agreeing with the merged model proves little
                changed += expected != greedy(base_model, prompt)
        fraction = agreeing / total
    result = {
        "check": "serving engine, 16 requests over 4 adapters + base in one batch, greedy, fp32",
        "matching_prefix_fraction": fraction,
        "adapter_requests_unlike_base": f"{changed}/{sum(m is not None for m in models)}",
        "tokens_per_s": 16 * tokens / seconds,
        "peak_bytes": peak,
        "passed": fraction >= 0.95 and changed >= sum(m is not None for m in models) // 2,
    }
    log(f"serve: {fraction:.1%} of greedy tokens as merged per request, {result['tokens_per_s']:.0f} tok/s")
    return [result]


# --- ddp: NCCL -------------------------------------------------------------------------------------------


def check_ddp(args: argparse.Namespace, device: Any, log: Callable[[str], None]) -> list[dict[str, Any]]:
    import torch

    if device.type != "cuda" or torch.cuda.device_count() < 2:
        log("ddp: skipped (needs 2 or more CUDA devices)")
        return [{"check": "NCCL DDP", "skipped": "fewer than 2 CUDA devices", "passed": True}]
    import yaml

    from lorakit.models import tiny_llama, tiny_tokenizer
    from lorakit.train import build_config, train
    from lorakit.train.metrics import read_metrics

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        tiny_llama().save_pretrained(root / "model")
        tiny_tokenizer().save_pretrained(root / "model")
        rows = [
            {"messages": [{"role": "user", "content": f"rev {w}"}, {"role": "assistant", "content": w[::-1]}]}
            for w in ["cat", "dog", "sun", "map", "pen", "cup", "box", "hat"] * 3
        ]
        (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        common = {
            "model": str(root / "model"),
            "data": str(root / "train.jsonl"),
            "r": 4,
            "alpha": 8,
            "dropout": 0.0,
            "lr": 1e-2,
            "steps": 3,
            "grad_accum": 2,
            "seed": 3,
            "device": "cuda",
            "dtype": "fp32",
        }
        train(build_config(None, {**common, "batch_size": 4, "output": str(root / "one")}))
        one = [r["loss"] for r in read_metrics(root / "one") if r["kind"] == "train"]
        results = []
        for mode, extra in (("DDP", {}), ("FSDP", {"fsdp": True})):
            config = root / f"{mode}.yaml"
            output = root / mode
            config.write_text(yaml.safe_dump({**common, **extra, "batch_size": 2, "output": str(output)}))
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
            command += ["-m", "lorakit.cli.main", "train", "--config", str(config), "--quiet"]
            finished = subprocess.run(command, capture_output=True, text=True, timeout=300)
            check = f"NCCL {mode}, 2 GPUs vs 1 (same global batch)"
            if finished.returncode != 0:
                log(f"{mode}: torchrun failed: {finished.stderr[-2000:]}")
                results.append({"check": check, "error": finished.stderr[-2000:], "passed": False})
                continue
            losses = [r["loss"] for r in read_metrics(output) if r["kind"] == "train"]
            worst = max(abs(a - b) / abs(b) for a, b in zip(losses, one))
            log(f"{mode}: 2 GPUs vs 1, worst loss diff {worst:.1e}")
            results.append(
                {
                    "check": check,
                    "losses": losses,
                    "single_losses": one,
                    "loss_rel_diff_max": worst,
                    "passed": worst <= 1e-4 and len(losses) == len(one),
                }
            )
    return results
