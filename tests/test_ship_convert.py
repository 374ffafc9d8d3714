"""`lorakit convert`: before/after outputs of the base model with peft as the oracle.

Exact conversions (folded scales, padding) must reproduce peft's logits of the original adapter to float
tolerance; SVD conversions must reproduce peft's merged update of every layer within the reported error.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from test_ship_helpers import base_folder, peft_adapter, peft_logits, peft_merged_deltas

from lorakit.cli.main import main
from lorakit.ship.check import check_adapter
from lorakit.ship.convert import convert_adapter

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def relative_errors(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict[str, float]:
    assert set(after) <= set(before)
    return {key: float(torch.linalg.matrix_norm(before[key] - after.get(key, 0 * before[key]))
                       / torch.linalg.matrix_norm(before[key])) for key in before}


@pytest.mark.parametrize("engine", ["vllm", "llama.cpp", "sglang", "lorax"])
def test_fold_scales_and_patterns_exactly(engine: str, tmp_path: Path) -> None:
    adapter = peft_adapter(tmp_path / "in", r=8, lora_alpha=16, use_rslora=True,
                           target_modules=[*ALL, "embed_tokens"],
                           rank_pattern={"v_proj": 4, "down_proj": 2}, alpha_pattern={"o_proj": 5})
    assert not check_adapter(adapter, engine).ok
    report = convert_adapter(adapter, tmp_path / "out", engine)
    assert report.rank == 8 and not report.truncated and report.overall_error == 0.0
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (8, 8, False)
    assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}
    assert check_adapter(tmp_path / "out", engine).ok
    torch.testing.assert_close(peft_logits(tmp_path / "out"), peft_logits(adapter), atol=1e-5, rtol=1e-5)


def test_rank_cap_by_svd_within_reported_error(tmp_path: Path) -> None:
    adapter = peft_adapter(tmp_path / "in", r=16, lora_alpha=8, target_modules=[*ALL, "embed_tokens"])
    report = convert_adapter(adapter, tmp_path / "out", "vllm", max_lora_rank=4)
    assert report.rank == 4 and len(report.truncated) == 15
    assert check_adapter(tmp_path / "out", "vllm", max_lora_rank=4).ok
    measured = relative_errors(peft_merged_deltas(adapter), peft_merged_deltas(tmp_path / "out"))
    for layer in report.layers:
        assert 0 < layer.relative_error < 1
        assert measured[layer.module] == pytest.approx(layer.relative_error, rel=1e-3, abs=1e-6)


def test_dora_to_plain_lora(tmp_path: Path) -> None:
    base = base_folder(tmp_path / "base")
    adapter = peft_adapter(tmp_path / "in", r=4, lora_alpha=8, use_dora=True,
                           target_modules=["q_proj", "v_proj"])
    with pytest.raises(ValueError, match="--base"):
        convert_adapter(adapter, tmp_path / "no-base", "vllm")
    # Full rank (the layers are 32 wide): the conversion is exact.
    full = convert_adapter(adapter, tmp_path / "full", "vllm", base=base, rank=32, max_lora_rank=32)
    assert full.overall_error < 1e-6
    torch.testing.assert_close(peft_logits(tmp_path / "full"), peft_logits(adapter), atol=1e-4, rtol=1e-4)
    # Rank 2: truncated, and peft's merged update is off by exactly the reported error.
    low = convert_adapter(adapter, tmp_path / "low", "llama.cpp", base=base, rank=2)
    assert low.rank == 2 and all(layer.method == "dora-svd" for layer in low.layers)
    measured = relative_errors(peft_merged_deltas(adapter), peft_merged_deltas(tmp_path / "low"))
    for layer in low.layers:
        assert measured[layer.module] == pytest.approx(layer.relative_error, rel=1e-3, abs=1e-6)
    assert check_adapter(tmp_path / "low", "llama.cpp").ok


def test_modules_to_save_and_bias_dropped_only_when_asked(tmp_path: Path) -> None:
    adapter = peft_adapter(tmp_path / "in", tiny_llama(attention_bias=True), modules_to_save=["lm_head"],
                           bias="lora_only")
    with pytest.raises(ValueError, match="--drop-modules-to-save"):
        convert_adapter(adapter, tmp_path / "a", "vllm", drop_bias=True)
    with pytest.raises(ValueError, match="--drop-bias"):
        convert_adapter(adapter, tmp_path / "b", "vllm", drop_modules_to_save=True)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with pytest.warns(UserWarning, match="lm_head"), pytest.warns(UserWarning, match="biases"):
        report = convert_adapter(adapter, tmp_path / "c", "vllm", drop_modules_to_save=True, drop_bias=True)
    assert any("lm_head" in item for item in report.dropped) and any("bias" in i for i in report.dropped)
    assert check_adapter(tmp_path / "c", "vllm").ok
    # SGLang has no rule against them: they are kept, and the result computes exactly what peft does.
    convert_adapter(adapter, tmp_path / "d", "sglang")
    base = tiny_llama(attention_bias=True)
    torch.testing.assert_close(peft_logits(tmp_path / "d", base), peft_logits(adapter, base), atol=1e-5,
                               rtol=1e-5)


def test_output_folder_is_never_replaced(tmp_path: Path) -> None:
    adapter = peft_adapter(tmp_path / "in", use_rslora=True)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    assert main(["convert", str(adapter), str(occupied), "--target", "sglang"]) == 2
    assert (occupied / "keep.txt").read_text() == "mine" and len(list(occupied.iterdir())) == 1
    assert main(["convert", str(adapter), str(tmp_path / "new"), "--target", "sglang"]) == 0
    assert check_adapter(tmp_path / "new", "sglang").ok
