"""Core benchmark: lorakit against peft in the same run, on SmolLM2-135M (fp32, batch 8 x 128 tokens).

    .venv/bin/python benchmarks/bench_core.py [--rounds 15] [--decode-only]

Measures
- the unmerged forward with one adapter (r=16, all linear layers) relative to the base model;
- a mixed batch with 8 different adapters relative to the same batch on one adapter (peft: adapter_names=);
- merge_and_unload, adapter save and adapter load times.
Both libraries get the same adapter weights (copied from peft into lorakit by name), and the benchmark
checks that their logits agree before timing anything.

The decode-size row (``decode_sizes``; alone with ``--decode-only``, written to results/core_decode.*) times a
mixed batch where serving lives: a 6-layer h=576 Llama (SmolLM2's widths, random weights), 8 rows of 64
tokens, 8 adapters r=8 on q,k,v,o. It reports a forward step inside an open ``adapter_per_row`` block (the
serving case: the block's stacks are built once) and a block entered for every forward, both against the
same batch on one adapter.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import peft
import torch
from timing import interleaved, machine, write

import lorakit
from lorakit.models import load_causal_lm

ADAPTERS = [f"a{i}" for i in range(8)]


def copy_peft_weights(peft_model: torch.nn.Module, model: torch.nn.Module) -> None:
    """lorakit's parameter names are peft's without the ``base_model.model.`` prefix."""
    ours = dict(model.named_parameters())
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                ours[name.removeprefix("base_model.model.")].copy_(parameter)


def paired(ours, theirs, repeats: int = 9) -> tuple[float, float]:
    """Median seconds of two self-timing runs, called alternately so that load changes hit both."""
    samples: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        samples[0].append(ours())
        samples[1].append(theirs())
    return tuple(sorted(values)[len(values) // 2] for values in samples)  # type: ignore[return-value]


def decode_sizes(rounds: int) -> dict[str, object]:
    """Mixed batch of 8 adapters vs one adapter at decode sizes (see the module docstring)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048)
    model = LlamaForCausalLM(config).eval()
    lora = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
            "init_lora_weights": False}
    lorakit.inject(model, lorakit.LoraConfig(**lora), ADAPTERS[0])
    for name in ADAPTERS[1:]:
        lorakit.add_adapter(model, lorakit.LoraConfig(**lora), name)
    ids = torch.randint(0, config.vocab_size, (8, 64))

    def single() -> float:
        start = time.perf_counter()
        model(ids)
        return time.perf_counter() - start

    def mixed_step() -> float:
        with lorakit.adapter_per_row(model, ADAPTERS):
            start = time.perf_counter()
            model(ids)
            return time.perf_counter() - start

    def mixed_with_entry() -> float:
        start = time.perf_counter()
        with lorakit.adapter_per_row(model, ADAPTERS):
            model(ids)
        return time.perf_counter() - start

    with torch.inference_mode():
        for run in (single, mixed_step, mixed_with_entry):
            run()
        samples: dict[str, list[float]] = {"single": [], "mixed_step": [], "mixed_with_entry": []}
        for _ in range(rounds):
            for name, run in (("single", single), ("mixed_step", mixed_step),
                              ("mixed_with_entry", mixed_with_entry)):
                samples[name].append(run())
    seconds = {k: sorted(v)[len(v) // 2] for k, v in samples.items()}
    return {
        "setup": {"model": "Llama 6 layers, h=576, vocab 49152 (random)", "batch": [8, 64], "lora": lora,
                  "adapters": len(ADAPTERS), "rounds": rounds},
        "seconds": seconds,
        "ratios": {"mixed_step_vs_single": seconds["mixed_step"] / seconds["single"],
                   "mixed_with_entry_vs_single": seconds["mixed_with_entry"] / seconds["single"]},
    }


def decode_table(decode: dict) -> list[str]:
    ratios = decode["ratios"]
    return [
        "| decode size (6 layers h=576, 8 x 64, 8 adapters r=8 q,k,v,o) | lorakit | target |",
        "| --- | --- | --- |",
        f"| mixed step in an open block / 1 adapter | {ratios['mixed_step_vs_single']:.3f} | <= 1.10 |",
        f"| block entered per forward / 1 adapter | {ratios['mixed_with_entry_vs_single']:.3f} | |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--decode-only", action="store_true", help="only the decode-size mixed row")
    args = parser.parse_args()
    if args.decode_only:
        decode = decode_sizes(args.rounds)
        lines = ["# Core benchmark: mixed batch at decode sizes", "",
                 f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, {args.rounds} "
                 "interleaved rounds, median seconds.", "", *decode_table(decode), "",
                 *[f"- {k}: {v:.4f} s" for k, v in decode["seconds"].items()], "",
                 "Regenerate: `.venv/bin/python benchmarks/bench_core.py --decode-only`", ""]
        write("core_decode", {**decode, "machine": machine()}, "\n".join(lines))
        print("\n".join(lines))
        return
    torch.manual_seed(0)
    base, _ = load_causal_lm("smollm2-135m-instruct")
    base.eval()
    ids = torch.randint(0, base.config.vocab_size, (8, 128))
    config = {"r": 16, "lora_alpha": 32, "target_modules": "all-linear", "init_lora_weights": False}

    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config), adapter_name=ADAPTERS[0])
    for name in ADAPTERS[1:]:
        peft_model.add_adapter(name, peft.LoraConfig(**config))
    peft_model.set_adapter(ADAPTERS[0])
    peft_model.eval()
    ours = copy.deepcopy(base)
    lorakit.inject(ours, lorakit.LoraConfig(**config), ADAPTERS[0])
    for name in ADAPTERS[1:]:
        lorakit.add_adapter(ours, lorakit.LoraConfig(**config), name)
    copy_peft_weights(peft_model, ours)
    ours.eval()

    with torch.inference_mode():
        agree = (peft_model(input_ids=ids).logits - ours(ids).logits).abs().max().item()
        with lorakit.adapter_per_row(ours, ADAPTERS):
            mixed_ours = ours(ids).logits
        mixed_peft = peft_model(input_ids=ids, adapter_names=ADAPTERS).logits
        agree_mixed = (mixed_ours - mixed_peft).abs().max().item()

        def lorakit_mixed() -> None:
            with lorakit.adapter_per_row(ours, ADAPTERS):
                ours(ids)

        forward = interleaved({
            "base": lambda: base(ids),
            "lorakit": lambda: ours(ids),
            "peft": lambda: peft_model(input_ids=ids),
            "lorakit_mixed8": lorakit_mixed,
            "peft_mixed8": lambda: peft_model(input_ids=ids, adapter_names=ADAPTERS),
        }, rounds=args.rounds)

    def merge_ours() -> float:
        model = copy.deepcopy(ours)
        start = time.perf_counter()
        lorakit.merge_and_unload(model)
        return time.perf_counter() - start

    def merge_peft() -> float:
        model = copy.deepcopy(peft_model)
        start = time.perf_counter()
        model.merge_and_unload()
        return time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        def save_ours() -> float:
            start = time.perf_counter()
            lorakit.save_adapter(ours, f"{tmp}/ours", adapter_name=ADAPTERS[0])
            return time.perf_counter() - start

        def save_peft() -> float:
            start = time.perf_counter()
            peft_model.save_pretrained(f"{tmp}/peft", selected_adapters=[ADAPTERS[0]])
            return time.perf_counter() - start

        def load_ours() -> float:
            model = copy.deepcopy(base)
            start = time.perf_counter()
            lorakit.load_adapter(model, f"{tmp}/ours")
            return time.perf_counter() - start

        def load_peft() -> float:
            model = copy.deepcopy(base)
            start = time.perf_counter()
            # peft writes an adapter not named "default" into a subfolder of that name.
            peft.PeftModel.from_pretrained(model, f"{tmp}/peft/{ADAPTERS[0]}")
            return time.perf_counter() - start

        lifecycle = {
            "merge_and_unload": paired(merge_ours, merge_peft, repeats=5),
            "save_adapter": paired(save_ours, save_peft),
            "load_adapter": paired(load_ours, load_peft),
        }

    ratios = {
        "lorakit_forward_vs_base": forward["lorakit"] / forward["base"],
        "peft_forward_vs_base": forward["peft"] / forward["base"],
        "lorakit_mixed8_vs_single": forward["lorakit_mixed8"] / forward["lorakit"],
        "peft_mixed8_vs_single": forward["peft_mixed8"] / forward["peft"],
        "lorakit_mixed8_vs_peft_mixed8": forward["lorakit_mixed8"] / forward["peft_mixed8"],
        **{f"{k}_lorakit_vs_peft": ours_s / peft_s for k, (ours_s, peft_s) in lifecycle.items()},
    }
    payload = {
        "setup": {"model": "SmolLM2-135M-Instruct", "dtype": "float32", "batch": [8, 128], "lora": config,
                  "rounds": args.rounds, "peft": peft.__version__, **machine()},
        "max_abs_logit_difference": {"single": agree, "mixed8": agree_mixed},
        "forward_seconds": forward,
        "lifecycle_seconds": {k: {"lorakit": a, "peft": b} for k, (a, b) in lifecycle.items()},
        "ratios": ratios,
        "decode_sizes": decode_sizes(args.rounds),
    }
    rows = [
        ("unmerged forward, 1 adapter / base", ratios["lorakit_forward_vs_base"],
         ratios["peft_forward_vs_base"],
         "lorakit <= 1.08"),
        ("mixed batch of 8 adapters / 1 adapter", ratios["lorakit_mixed8_vs_single"],
         ratios["peft_mixed8_vs_single"], "lorakit <= 1.15, < peft"),
    ]
    lines = [
        "# Core benchmark: lorakit vs peft (same run)",
        "",
        f"SmolLM2-135M-Instruct, fp32, batch 8 x 128, LoRA r=16 on all linear layers, "
        f"{args.rounds} interleaved "
        f"rounds, torch {torch.__version__}, {torch.get_num_threads()} threads, peft {peft.__version__}. "
        f"Logits agree to {agree:.1e} (one adapter) and {agree_mixed:.1e} (mixed batch).",
        "",
        "| ratio | lorakit | peft | target |",
        "| --- | --- | --- | --- |",
        *[f"| {name} | {a:.3f} | {b:.3f} | {target} |" for name, a, b, target in rows],
        "",
        "| operation (median seconds) | lorakit | peft | lorakit / peft |",
        "| --- | --- | --- | --- |",
        *[f"| {k} | {a:.4f} | {b:.4f} | {a / b:.2f} |" for k, (a, b) in lifecycle.items()],
        "",
        "| forward (median seconds) | value |",
        "| --- | --- |",
        *[f"| {k} | {v:.4f} |" for k, v in forward.items()],
        "",
        *decode_table(payload["decode_sizes"]),
        "",
        "Regenerate: `.venv/bin/python benchmarks/bench_core.py`",
        "",
    ]
    write("core", payload, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
