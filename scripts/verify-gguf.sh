#!/usr/bin/env bash
# Verify `lorakit export-gguf` against a real llama.cpp (llama-cpp-python from PyPI, built from source).
#
#   1. installs llama-cpp-python into .venv (a no-op when it is there already; a source build takes
#      ~10 minutes on 2 cores);
#   2. converts the built-in SmolLM2-135M-Instruct base (lorakit's fp32 folder) to an f32 GGUF with
#      llama.cpp's own convert_hf_to_gguf.py (from the llama-cpp-python source of the installed version);
#   3. makes an rsLoRA adapter with rank and alpha patterns on all seven projections (random, non-zero),
#      exports it with `lorakit export-gguf`;
#   4. loads base + adapter in llama.cpp and compares greedy output token by token with lorakit's merged
#      model (transformers, fp32) on the same prompts, plus the last-position logits (and the base alone,
#      to show how far llama.cpp and transformers differ without any adapter);
#   5. controls: the same adapter through llama.cpp's own convert_lora_to_gguf.py (rsLoRA and the
#      patterns are lost: expected to differ), and `lorakit convert --target llama.cpp` followed by
#      llama.cpp's own converter (expected to match).
#
# Usage: scripts/verify-gguf.sh [WORK_DIR]     (exit 0 when every prompt matches)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
WORK=${1:-$(mktemp -d -t lorakit-verify-gguf-XXXX)}
mkdir -p "$WORK"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

echo "== llama-cpp-python"
# sentencepiece: llama.cpp's converter imports it before it falls back to the BPE tokenizer.json
nice -n 10 .venv/bin/pip install -q llama-cpp-python sentencepiece
VERSION=$($PY -c "import importlib.metadata as m; print(m.version('llama_cpp_python'))")
echo "llama-cpp-python $VERSION"

echo "== llama.cpp's HF -> GGUF converter (from the llama-cpp-python $VERSION source)"
if [ ! -f "$WORK/llama.cpp/convert_lora_to_gguf.py" ]; then
    .venv/bin/pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$WORK/sdist"
    tar -xzf "$WORK"/sdist/llama_cpp_python-*.tar.gz -C "$WORK" --wildcards \
        '*/vendor/llama.cpp/convert_hf_to_gguf.py' '*/vendor/llama.cpp/convert_lora_to_gguf.py' \
        '*/vendor/llama.cpp/conversion/*' '*/vendor/llama.cpp/gguf-py/*'
    rm -rf "$WORK/llama.cpp" && mv "$WORK"/llama_cpp_python-*/vendor/llama.cpp "$WORK/llama.cpp"
fi

BASE=$($PY -c "from lorakit.models import model_folder; print(model_folder('smollm2-135m-instruct'))")
echo "== base folder $BASE"
if [ ! -f "$WORK/base-f32.gguf" ]; then
    $PY "$WORK/llama.cpp/convert_hf_to_gguf.py" "$BASE" --outtype f32 --outfile "$WORK/base-f32.gguf" \
        > "$WORK/convert.log" 2>&1 || { tail -20 "$WORK/convert.log"; exit 1; }
fi

echo "== adapter (rsLoRA, rank_pattern, alpha_pattern) and its GGUF"
rm -rf "$WORK/adapter" "$WORK/adapter.gguf"
$PY - "$BASE" "$WORK/adapter" <<'EOF'
import sys

import torch

import lorakit
from lorakit.models import load_causal_lm

base, out = sys.argv[1], sys.argv[2]
model, _ = load_causal_lm(base)
config = lorakit.LoraConfig(
    r=8, lora_alpha=16, use_rslora=True, init_lora_weights=False,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    rank_pattern={"v_proj": 4, "down_proj": 6}, alpha_pattern={"o_proj": 4})
torch.manual_seed(0)
lorakit.inject(model, config)
with torch.no_grad():  # a visible but not destructive change of the model's behaviour
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.mul_(0.02)
lorakit.save_adapter(model, out)
EOF
.venv/bin/lorakit export-gguf "$WORK/adapter" --base "$BASE" "$WORK/adapter.gguf"

echo "== controls: llama.cpp's own LoRA converter, on the adapter as is and after lorakit convert"
rm -rf "$WORK/converted" "$WORK/naive.gguf" "$WORK/converted.gguf"
.venv/bin/lorakit convert "$WORK/adapter" "$WORK/converted" --target llama.cpp
for name in adapter converted; do
    out=$([ "$name" = adapter ] && echo naive || echo converted)
    $PY "$WORK/llama.cpp/convert_lora_to_gguf.py" --base "$BASE" --outtype f32 --outfile "$WORK/$out.gguf" \
        "$WORK/$name" > "$WORK/convert-lora-$out.log" 2>&1 || { tail -20 "$WORK/convert-lora-$out.log"; exit 1; }
done

echo "== llama.cpp vs lorakit's merged model (greedy)"
$PY - "$BASE" "$WORK" <<'EOF'
import json
import sys

import numpy as np
import torch
from llama_cpp import Llama

import lorakit
from lorakit.models import load_causal_lm

base, work = sys.argv[1], sys.argv[2]
prompts = ["What is the capital of France?", "Write a haiku about autumn.",
           "List three prime numbers and explain why they are prime."]
new_tokens = 32
torch.set_num_threads(2)
model, tokenizer = load_causal_lm(base)
reference = load_causal_lm(base)[0]
lorakit.load_adapter(model, f"{work}/adapter")
lorakit.merge_and_unload(model)


def prompt_ids(text):
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)


def hf_greedy(m, ids):
    with torch.no_grad():
        out = m.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=tokenizer.eos_token_id)
        logits = m(torch.tensor([ids])).logits[0, -1].numpy()
    return out[0, len(ids):].tolist(), logits


def llama_greedy(llm, ids):
    llm.reset()
    llm.eval(ids)
    logits = np.array(llm.scores[llm.n_tokens - 1])
    llm.reset()
    tokens = []
    for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        tokens.append(token)
        if token == tokenizer.eos_token_id or len(tokens) == new_tokens:
            break
    return tokens, logits


def trim(tokens):
    return tokens[: tokens.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in tokens else tokens


# logits_all: llama-cpp-python keeps logits only then (needed for the logit comparison).
common = dict(model_path=f"{work}/base-f32.gguf", n_ctx=512, n_threads=2, n_batch=512, verbose=False, seed=0,
              logits_all=True)
engines = {name: Llama(lora_path=f"{work}/{name}.gguf", **common) for name in ("adapter", "naive", "converted")}
base_only = Llama(**common)
results = []
for text in prompts:
    ids = prompt_ids(text)
    ours, our_logits = hf_greedy(model, ids)
    plain, plain_logits = hf_greedy(reference, ids)
    _, base_logits = llama_greedy(base_only, ids)
    ours = trim(ours)
    row = {"prompt": text, "adapter_changes_output": ours != trim(plain),
           "base_only_max_abs_logit_diff": float(np.abs(plain_logits - base_logits).max()),
           "logit_scale": float(np.abs(our_logits).max()), "lorakit": tokenizer.decode(ours)}
    for name, llm in engines.items():
        theirs, their_logits = llama_greedy(llm, ids)
        theirs = trim(theirs)
        row[name] = {"identical": ours == theirs, "max_abs_logit_diff": float(np.abs(our_logits - their_logits).max()),
                     "text": tokenizer.decode(theirs)}
    results.append(row)
summary = {"llama_cpp_python": __import__("importlib.metadata").metadata.version("llama_cpp_python"),
           "base": "smollm2-135m-instruct, f32 GGUF from llama.cpp's convert_hf_to_gguf.py",
           "new_tokens": new_tokens,
           "all_identical": all(r["adapter"]["identical"] for r in results),
           "converted_then_llama_cpp_converter_identical": all(r["converted"]["identical"] for r in results),
           "naive_llama_cpp_converter_identical": all(r["naive"]["identical"] for r in results),
           "results": results}
for llm in (*engines.values(), base_only):
    llm.close()  # explicitly: llama-cpp-python's destructor fails at interpreter exit otherwise
print(json.dumps(summary, indent=2))
with open(f"{work}/result.json", "w") as handle:
    json.dump(summary, handle, indent=2)
sys.exit(0 if summary["all_identical"] else 1)
EOF
