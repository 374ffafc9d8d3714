"""Serving benchmark: lorakit serve over loopback with K distinct adapters, against the alternatives.

    .venv/bin/python benchmarks/bench_serve.py [--model smollm2-135m-instruct|tiny] [--requests 128]
    python benchmarks/bench_serve.py --device cuda --dtype bfloat16 --output serve_gpu   # on a GPU

Bounded: a fixed number of requests per configuration, each generating exactly ``--max-tokens`` tokens
(``ignore_eos``), ``--concurrency`` clients at a time; every phase after ``--time-limit`` seconds is skipped
and said so. Everything runs on 127.0.0.1 in one process (uvicorn on a thread, httpx clients).

Measures, in the same run:
- lorakit serve with K = 1, 8, 32, 128 adapters (request i uses adapter i mod K; ``--max-loras`` below 128,
  so slots are evicted and reloaded at K = 128): generated tokens/s, time to first token and inter-token
  latency p50/p99 (client side, streamed), failed requests, adapter pool bytes, peak RSS;
- (a) the same server with every request on one adapter (the K = 1 row);
- (b) peft ``generate(..., adapter_names=...)`` on the same prompts, batches of ``--concurrency``, K = 32;
- (c) naive swapping: lorakit merge, ``generate`` one request, unmerge, for ``--naive-requests`` requests;
- (d) transformers' own continuous batching (``generate_batch``) on the base model, no adapter.
Adapters: r=8 on q_proj and v_proj, random weights, written to a temporary folder.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
import uvicorn
from timing import machine, write

import lorakit
from lorakit.serve.server import ServeOptions, build_app

QUESTIONS = ["What is the capital of France?", "Name three colours.", "Count to five.",
             "Say hello in Spanish.", "What is 2 + 2?", "Describe the sea.", "Why is the sky blue?",
             "Give me a fruit."]
LORA = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": "gaussian"}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_base(name: str, device: str = "cpu", dtype: str = "float32"):
    """(model on ``device`` in ``dtype``, tokenizer); every row of the run starts from a copy of it."""
    if name == "tiny":
        from lorakit.models.tiny import tiny_llama, tiny_tokenizer

        model, tokenizer = tiny_llama(), tiny_tokenizer()
    else:
        from lorakit.models import load_causal_lm

        model, tokenizer = load_causal_lm(name)
    return model.to(device=device, dtype=getattr(torch, dtype)).eval(), tokenizer


def write_adapters(base, folder: Path, count: int) -> list[str]:
    model = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(**LORA), "x")
    generator = torch.Generator().manual_seed(0)
    names = []
    for index in range(count):
        with torch.no_grad():
            for key, parameter in model.named_parameters():
                if "lora_" in key:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
        names.append(f"ad{index}")
        lorakit.save_adapter(model, folder / names[-1], adapter_name="x")
    return names


def prompts(tokenizer, count: int) -> list[list[int]]:
    out = []
    for index in range(count):
        question = f"{QUESTIONS[index % len(QUESTIONS)]} (#{index})"
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                                add_generation_prompt=True, tokenize=True)["input_ids"]
        else:
            ids = tokenizer(question).input_ids
        out.append(list(ids))
    return out


async def run_clients(url: str, jobs: list[tuple[list[int], str]], concurrency: int, max_tokens: int) -> dict:
    """Stream every job through /v1/completions, ``concurrency`` at a time; client-side latencies."""
    ttft, itl, failures, tokens = [], [], 0, 0
    queue: asyncio.Queue = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal failures, tokens
        while not queue.empty():
            prompt, model = queue.get_nowait()
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            start = time.perf_counter()
            last = None
            try:
                async with client.stream("POST", url + "/v1/completions", json=body) as response:
                    if response.status_code != 200:
                        failures += 1
                        await response.aread()
                        continue
                    async for line in response.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if chunk.get("usage"):
                            tokens += chunk["usage"]["completion_tokens"]
                        if chunk.get("choices"):
                            now = time.perf_counter()
                            if last is None:
                                ttft.append(now - start)
                            else:
                                itl.append(now - last)
                            last = now
            except httpx.HTTPError:
                failures += 1

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=300) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return {"tokens": tokens, "seconds": time.perf_counter() - start, "failed": failures, "ttft": ttft,
            "itl": itl}


def summarize(parts: list[dict]) -> dict:
    """One row from the rounds of one configuration: totals, rates and latency percentiles."""
    tokens, seconds = sum(p["tokens"] for p in parts), sum(p["seconds"] for p in parts)
    ttft = [t for p in parts for t in p["ttft"]]
    itl = [t for p in parts for t in p["itl"]]
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "failed": sum(p["failed"] for p in parts), "ttft_p50": percentile(ttft, 0.5),
            "ttft_p99": percentile(ttft, 0.99), "itl_p50": percentile(itl, 0.5),
            "itl_p99": percentile(itl, 0.99)}


def start_server(args, base, tokenizer, folder: Path):
    """(url, engine, server, thread) of a lorakit server on a free loopback port."""
    options = ServeOptions(model="base", adapters=str(folder), max_batch=args.concurrency,
                           max_loras=args.max_loras, max_lora_rank=16, max_cpu_loras=args.max_cpu_loras,
                           max_queue=10 * args.requests, dtype=args.dtype, device=args.device)
    app, engine = build_app(options, copy.deepcopy(base), tokenizer)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    return f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}", engine, server, thread


def interleaved_phase(args, base, tokenizer, folder: Path, ids: list[list[int]], ks: list[int],
                      deadline: float) -> tuple[dict, dict]:
    """Serve rows for every K and the peft row, run round-robin in ``--rounds`` rounds so that changes in
    machine load hit all of them alike; each round runs ``requests / rounds`` requests of each."""
    url, engine, server, thread = start_server(args, base, tokenizer, folder)
    peft_model = build_peft(base, folder, args.peft_k)
    parts: dict[str, list[dict]] = {f"K={k}": [] for k in ks}
    peft_parts: list[dict] = []
    per_round = args.requests // args.rounds
    try:
        warm_up = [(ids[i % len(ids)], "ad0") for i in range(2 * args.concurrency)]
        asyncio.run(run_clients(url, warm_up, args.concurrency, args.max_tokens))
        for round_index in range(args.rounds):
            if time.perf_counter() > deadline:
                break
            chunk = range(round_index * per_round, (round_index + 1) * per_round)
            for k in ks:
                jobs = [(ids[i], f"ad{i % k}") for i in chunk]
                parts[f"K={k}"].append(asyncio.run(run_clients(url, jobs, args.concurrency, args.max_tokens)))
                print(f"round {round_index} serve K={k}: {parts[f'K={k}'][-1]['tokens']} tokens in "
                      f"{parts[f'K={k}'][-1]['seconds']:.1f} s", flush=True)
            peft_parts.append(peft_round(args, peft_model, tokenizer, ids, list(chunk), args.peft_k))
            last = peft_parts[-1]
            print(f"round {round_index} peft: {last['tokens']} tokens in {last['seconds']:.1f} s", flush=True)
    finally:
        server.should_exit = True
        thread.join(timeout=60)
    serve = {}
    for name, rows in parts.items():
        serve[name] = {**summarize(rows), "rounds": len(rows)} if rows else {"skipped": "time limit"}
    serve_extra = {"pool_mb": engine.pool.nbytes() / 2**20, "host_cache_adapters": len(engine.host),
                   "peak_rss_mb": peak_rss_mb()}
    peft_row = {**summarize(peft_parts), "adapters": args.peft_k, "rounds": len(peft_parts)} if peft_parts \
        else {"skipped": "time limit"}
    return {"rows": serve, **serve_extra}, peft_row


def left_padded(batch: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in batch)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
    return ids, mask


def build_peft(base, folder: Path, k: int):
    import peft

    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder / "ad0", adapter_name="ad0")
    for index in range(1, k):
        model.load_adapter(folder / f"ad{index}", adapter_name=f"ad{index}")
    return model.eval()


def peft_round(args, model, tokenizer, ids: list[list[int]], indices: list[int], k: int) -> dict:
    """peft ``generate(adapter_names=...)`` over ``indices`` in batches of ``--concurrency``."""
    pad = tokenizer.pad_token_id or 0
    tokens, start = 0, time.perf_counter()
    with torch.no_grad():
        for first in range(0, len(indices), args.concurrency):
            batch = indices[first : first + args.concurrency]
            input_ids, mask = (t.to(args.device) for t in left_padded([ids[i] for i in batch], pad))
            names = [f"ad{i % k}" for i in batch]
            out = model.generate(input_ids=input_ids, attention_mask=mask, adapter_names=names,
                                 max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens,
                                 do_sample=False, pad_token_id=pad)
            tokens += (out.shape[1] - input_ids.shape[1]) * len(batch)
    return {"tokens": tokens, "seconds": time.perf_counter() - start, "failed": 0, "ttft": [], "itl": []}


def naive_phase(args, base, tokenizer, folder: Path, ids: list[list[int]], k: int) -> dict:
    model = copy.deepcopy(base)
    for index in range(k):
        lorakit.load_adapter(model, folder / f"ad{index}", adapter_name=f"ad{index}")
    tokens, start = 0, time.perf_counter()
    with torch.no_grad():
        for index in range(args.naive_requests):
            lorakit.set_adapter(model, f"ad{index % k}")
            lorakit.merge(model)
            prompt = torch.tensor([ids[index]], device=args.device)
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                 max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id or 0)
            lorakit.unmerge(model)
            tokens += out.shape[1] - prompt.shape[1]
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "adapters": k,
            "requests": args.naive_requests}


def transformers_cb_phase(args, seconds: float) -> dict:
    """Run `cb_only` in a child process, killed after ``seconds`` (it can be very slow on a CPU)."""
    command = [sys.executable, __file__, "--cb-only", "--model", args.model, "--requests", str(args.requests),
               "--cb-requests", str(args.cb_requests), "--max-tokens", str(args.max_tokens),
               "--device", args.device, "--dtype", args.dtype]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=seconds, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"{args.cb_requests} requests did not finish within {seconds:.0f} s",
                "requests": args.cb_requests}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {"error": done.stderr.strip().splitlines()[-1:]}


def cb_only(args, base, ids: list[list[int]]) -> dict:
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=args.max_tokens, do_sample=False, eos_token_id=-1,
                              pad_token_id=0)
    model = copy.deepcopy(base)
    try:
        model.generate_batch(inputs=ids[:2], generation_config=config)  # warm-up
        start = time.perf_counter()
        outputs = model.generate_batch(inputs=ids[: args.cb_requests], generation_config=config)
        seconds = time.perf_counter() - start
    except Exception as error:  # report whatever stops it on this machine
        return {"error": f"{type(error).__name__}: {error}"}
    tokens = sum(len(o.generated_tokens) for o in outputs.values())
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "requests": args.cb_requests}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct", help="built-in name, folder or 'tiny'")
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-loras", type=int, default=32)
    parser.add_argument("--max-cpu-loras", type=int, default=64)
    parser.add_argument("--ks", default="1,8,32,128")
    parser.add_argument("--peft-k", type=int, default=32)
    parser.add_argument("--naive-requests", type=int, default=16)
    parser.add_argument("--cb-requests", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the serve and peft rows")
    parser.add_argument("--time-limit", type=float, default=900, help="seconds; later phases are skipped")
    parser.add_argument("--output", default="serve")
    parser.add_argument("--cb-timeout", type=float, default=300, help="seconds for transformers' batching")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: where the model runs")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="the base model's weights (all rows alike)")
    parser.add_argument("--cb-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cb_only:
        base, tokenizer = load_base(args.model, args.device, args.dtype)
        print(json.dumps(cb_only(args, base, prompts(tokenizer, args.requests))))
        return
    started = time.perf_counter()
    load_at_start = os.getloadavg()  # the machine is shared: say how busy it was
    deadline = started + args.time_limit
    ks = [int(k) for k in args.ks.split(",")]
    base, tokenizer = load_base(args.model, args.device, args.dtype)
    ids = prompts(tokenizer, args.requests)
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_adapters(base, folder, max([*ks, args.peft_k]))
        results["lorakit_serve"], results["peft_adapter_names"] = interleaved_phase(
            args, base, tokenizer, folder, ids, ks, deadline)
        for name, phase in (("naive_merge_unmerge", lambda: naive_phase(args, base, tokenizer, folder, ids,
                                                                        args.peft_k)),
                            ("transformers_continuous_batching_base", lambda: transformers_cb_phase(
                                args, args.cb_timeout))):
            if time.perf_counter() > deadline:
                results[name] = {"skipped": "time limit"}
                continue
            results[name] = phase()
            print(f"{name}: {results[name]}", flush=True)
    serve = results["lorakit_serve"]["rows"]
    single = serve.get("K=1", {}).get("tokens_per_s")
    k32 = serve.get("K=32", {}).get("tokens_per_s")
    peft_rate = results["peft_adapter_names"].get("tokens_per_s")
    ratios = {}
    if single and k32:
        ratios["serve_K32_vs_K1"] = k32 / single
    if k32 and peft_rate:
        ratios["serve_K32_vs_peft_K32"] = k32 / peft_rate
    load = {"start": list(load_at_start), "end": list(os.getloadavg())}  # 1, 5, 15-minute averages
    setup = {**vars(args), "lora": LORA, **machine(), **device_facts(args.device)}
    payload = {"setup": setup, "results": results, "ratios": ratios,
               "wall_seconds": time.perf_counter() - started, "load_average": load}
    write(args.output, payload, table(args, results, ratios, load))
    print(table(args, results, ratios, load))


def device_name(device: str) -> str:
    kind = torch.device(device)
    return torch.cuda.get_device_name(kind) if kind.type == "cuda" else "CPU"


def device_facts(device: str) -> dict:
    if torch.device(device).type != "cuda":
        return {"device": "cpu"}
    return {"device": device, "device_name": device_name(device), "cuda": torch.version.cuda}


def regenerate_command(args) -> str:
    python = ".venv/bin/python" if torch.device(args.device).type == "cpu" else "python"
    extra = f" --device {args.device} --dtype {args.dtype} --output {args.output}"
    if args.device == "cpu" and args.dtype == "float32" and args.output == "serve":
        extra = ""
    return f"{python} benchmarks/bench_serve.py --model {args.model}{extra}"


def table(args, results: dict, ratios: dict, load: dict) -> str:
    lines = [
        "# Serving benchmark (loopback)",
        "",
        f"Model {args.model}, {args.dtype} on {device_name(args.device)}, {torch.get_num_threads()} CPU "
        f"threads; {args.requests} requests per row, "
        f"{args.max_tokens} generated tokens each, {args.concurrency} concurrent streaming clients "
        f"(= --max-batch), --max-loras {args.max_loras}, --max-cpu-loras {args.max_cpu_loras}; adapters r=8 "
        "on q_proj, v_proj.",
        f"Load average (1 / 5 / 15 min) at start {'/'.join(f'{x:.1f}' for x in load['start'])}, at end "
        f"{'/'.join(f'{x:.1f}' for x in load['end'])} (shared machine).",
        "",
        "| lorakit serve | tokens/s | TTFT p50 / p99 (s) | ITL p50 / p99 (s) | failed |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, row in results["lorakit_serve"]["rows"].items():
        if "skipped" in row:
            lines.append(f"| {name} | skipped ({row['skipped']}) | | | |")
            continue
        lines.append(f"| {name} | {row['tokens_per_s']:.1f} | {row['ttft_p50']:.3f} / {row['ttft_p99']:.3f} "
                     f"| {row['itl_p50']:.3f} / {row['itl_p99']:.3f} | {row['failed']} |")
    serve = results["lorakit_serve"]
    lines += ["", f"Adapter pool (stacks for every slot, fixed by --max-loras / --max-lora-rank): "
              f"{serve['pool_mb']:.1f} MiB; parsed adapters in host memory at the end: "
              f"{serve['host_cache_adapters']}; peak RSS of the whole benchmark process after the serving "
              f"rows: {serve['peak_rss_mb']:.0f} MiB.", ""]
    lines += ["| alternative | tokens/s | notes |", "| --- | --- | --- |"]
    for name in ("peft_adapter_names", "naive_merge_unmerge", "transformers_continuous_batching_base"):
        row = results.get(name, {})
        if "tokens_per_s" in row:
            notes = {k: v for k, v in row.items()
                     if k not in ("tokens_per_s", "seconds", "tokens", "ttft_p50", "ttft_p99", "itl_p50",
                                  "itl_p99", "failed")}
            lines.append(f"| {name} | {row['tokens_per_s']:.1f} | {notes} |")
        else:
            lines.append(f"| {name} | - | {row} |")
    lines += ["", "| ratio | value | target |", "| --- | --- | --- |"]
    targets = {"serve_K32_vs_K1": ">= 0.8", "serve_K32_vs_peft_K32": ">= 3"}
    lines += [f"| {k} | {v:.2f} | {targets.get(k, '')} |" for k, v in ratios.items()]
    lines += ["", f"Regenerate: `{regenerate_command(args)}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
