"""The real SmolLM2-135M-Instruct: a few LoRA steps on a handful of chat examples; PEFT reads the result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lorakit import disable_adapters
from lorakit.train import TrainConfig, train

CAPITALS = {
    "France": "Paris",
    "Japan": "Tokyo",
    "Italy": "Rome",
    "Egypt": "Cairo",
    "Peru": "Lima",
    "Kenya": "Nairobi",
    "Norway": "Oslo",
    "Chile": "Santiago",
}


@pytest.mark.integration
def test_smollm2_trains_and_its_adapter_loads_in_peft(tmp_path: Path) -> None:
    with open(tmp_path / "chat.jsonl", "w", encoding="utf-8") as handle:
        for country, city in CAPITALS.items():
            messages = [
                {"role": "user", "content": f"Capital of {country}? One word."},
                {"role": "assistant", "content": city},
            ]
            handle.write(json.dumps({"messages": messages}) + "\n")
    config = TrainConfig(
        model="smollm2-135m-instruct",
        data=str(tmp_path / "chat.jsonl"),
        r=8,
        alpha=16,
        dropout=0.0,
        targets=["q_proj", "v_proj"],
        lr=3e-3,
        steps=6,
        batch_size=4,
        max_length=96,
        warmup_steps=0,
        scheduler="constant",
        output=str(tmp_path / "run"),
    )
    result = train(config)
    assert result.losses[-1] < result.losses[0] - 0.3, result.losses

    from peft import PeftModel

    from lorakit.models import load_causal_lm

    base, tokenizer = load_causal_lm("smollm2-135m-instruct")
    peft_model = PeftModel.from_pretrained(base, tmp_path / "run").eval()
    ids = tokenizer("Capital of Peru?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ours = result.model.eval()(ids).logits
        theirs = peft_model(ids).logits
        with disable_adapters(result.model):
            plain = result.model(ids).logits
    assert float((ours - plain).abs().max()) > 1e-2  # the adapter matters, so the comparison means something
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
