"""The engine on the real SmolLM2-135M-Instruct: a mixed batch equals each request alone, merged (fp32)."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit
from lorakit import LoraConfig
from lorakit.serve.adapters import AdapterCatalog
from lorakit.serve.engine import Engine
from lorakit.serve.requests import Request
from lorakit.serve.sampling import SamplingParams

CONFIGS = {
    "qv": LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian"),
    "dora": LoraConfig(r=4, target_modules=["q_proj", "o_proj"], use_dora=True, init_lora_weights="gaussian"),
    "mlp": LoraConfig(r=16, target_modules=["gate_proj", "down_proj"], init_lora_weights="gaussian"),
}


@pytest.mark.integration
def test_smollm2_mixed_batch_equals_each_request_merged(tmp_path):
    from lorakit.models import load_causal_lm

    base, tokenizer = load_causal_lm("smollm2-135m-instruct")
    for index, (name, config) in enumerate(CONFIGS.items()):
        model = lorakit.inject(copy.deepcopy(base), config, name)
        generator = torch.Generator().manual_seed(index)
        with torch.no_grad():
            for key, parameter in model.named_parameters():
                if "lora_B" in key:  # B starts at zero: give it weights that change the answers
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
                if "lora_magnitude_vector" in key:
                    parameter.mul_(1.05)
        lorakit.save_adapter(model, tmp_path / name, adapter_name=name)
    engine = Engine(copy.deepcopy(base), tokenizer, base_name="smollm2", catalog=AdapterCatalog(tmp_path),
                    max_batch=4, max_loras=2, max_lora_rank=16)
    questions = ["What is the capital of France?", "Name a colour.", "Count to five.", "Say hello."]
    models = ["qv", None, "dora", "mlp"]
    lengths = [12, 7, 10, 5]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             tokenize=True)["input_ids"] for q in questions]
    requests = [Request(list(p), m, SamplingParams(max_tokens=n, temperature=0))
                for p, m, n in zip(prompts, models, lengths)]
    results = engine.generate(requests)
    answers = set()
    for prompt, name, length, result in zip(prompts, models, lengths, results):
        alone = copy.deepcopy(base)
        if name is not None:
            lorakit.load_adapter(alone, tmp_path / name, adapter_name=name)
            lorakit.merge(alone)
        ids = torch.tensor([prompt])
        with torch.no_grad():
            expected = alone.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=length,
                                      do_sample=False)[0, ids.shape[1]:].tolist()
        assert result.token_ids == expected, f"{name}: {tokenizer.decode(result.token_ids)!r} vs " \
                                             f"{tokenizer.decode(expected)!r}"
        answers.add(tokenizer.decode(expected))
    assert len(answers) == 4
