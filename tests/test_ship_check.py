"""`lorakit inspect` and `lorakit check`: every engine rule triggered and not triggered, on peft's files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from test_ship_helpers import base_folder, peft_adapter, raw_adapter

from lorakit.cli.main import main
from lorakit.ship.check import check_adapter
from lorakit.ship.inspect import inspect_adapter
from lorakit.ship.rules import RULES

# rule id -> (peft LoraConfig kwargs that trigger it, kwargs that do not)
PLAIN: dict[str, Any] = {"r": 8, "lora_alpha": 16}
CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "vllm-dora": ({"use_dora": True}, PLAIN),
    "vllm-modules-to-save": ({"modules_to_save": ["lm_head"]}, PLAIN),
    "vllm-bias": ({"bias": "lora_only"}, PLAIN),
    "vllm-rank": ({"r": 32}, {"r": 16}),
    "vllm-patterns": ({"rank_pattern": {"q_proj": 4}}, {"use_rslora": True}),
    "llama.cpp-dora": ({"use_dora": True}, PLAIN),
    "llama.cpp-modules-to-save": ({"modules_to_save": ["lm_head"]}, PLAIN),
    "llama.cpp-bias": ({"bias": "all"}, PLAIN),
    "llama.cpp-rslora": ({"use_rslora": True}, PLAIN),
    # llama.cpp reads each tensor's rank: a rank_pattern alone is computed right, an alpha_pattern is not.
    "llama.cpp-alpha-pattern": ({"alpha_pattern": {"v_proj": 3}}, {"rank_pattern": {"v_proj": 2}}),
    "llama.cpp-alpha-zero": ({"lora_alpha": 0}, PLAIN),
    "sglang-rslora": ({"use_rslora": True}, PLAIN),
    "sglang-patterns": ({"alpha_pattern": {"q_proj": 3}}, PLAIN),
    "lorax-dora": ({"use_dora": True}, PLAIN),
    "lorax-modules-to-save": ({"modules_to_save": ["lm_head"]}, PLAIN),
    "lorax-bias": ({"bias": "lora_only"}, PLAIN),
    # LoRAX reads use_rslora, so rsLoRA alone is fine there.
    "lorax-patterns": ({"rank_pattern": {"q_proj": 4}}, {"use_rslora": True}),
}
# Rules whose case needs a base model or a hand-written file (tested below).
SPECIAL = {"vllm-target-modules", "llama.cpp-tied-lm-head"}


def engine_of(rule_id: str) -> str:
    return next(engine for engine, rules in RULES.items() if any(rule.id == rule_id for rule in rules))


def finding_ids(adapter: Path, engine: str, **kwargs: Any) -> set[str]:
    return {finding.rule.id for finding in check_adapter(adapter, engine, **kwargs).findings}


def test_every_rule_has_a_case() -> None:
    assert {rule.id for rules in RULES.values() for rule in rules} == set(CASES) | SPECIAL
    for rules in RULES.values():
        for rule in rules:
            assert rule.source and rule.fix and rule.effect in ("refuses", "computes something else")


@pytest.mark.parametrize("rule_id", sorted(CASES))
def test_rule_triggered_and_not(rule_id: str, tmp_path: Path) -> None:
    triggering, harmless = CASES[rule_id]
    bias = {"attention_bias": True} if "bias" in rule_id else {}
    from conftest import tiny_llama

    base = tiny_llama(**bias)
    bad = peft_adapter(tmp_path / "bad", base, **triggering)
    good = peft_adapter(tmp_path / "good", base, **harmless)
    engine = engine_of(rule_id)
    assert rule_id in finding_ids(bad, engine)
    assert rule_id not in finding_ids(good, engine)


def test_plain_adapter_passes_every_engine(tmp_path: Path) -> None:
    adapter = peft_adapter(tmp_path / "plain", r=8, lora_alpha=16,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                           "down_proj"])
    base = base_folder(tmp_path / "base")
    for engine in RULES:
        result = check_adapter(adapter, engine, base=base)
        assert result.ok, (engine, result.findings)


def test_vllm_rank_follows_max_lora_rank(tmp_path: Path) -> None:
    adapter = peft_adapter(tmp_path / "r32", r=32)
    assert "vllm-rank" in finding_ids(adapter, "vllm")  # vLLM's default limit is 16
    assert "vllm-rank" in finding_ids(adapter, "vllm", max_lora_rank=16)
    assert "vllm-rank" not in finding_ids(adapter, "vllm", max_lora_rank=32)


def test_vllm_target_modules_need_a_known_base(tmp_path: Path) -> None:
    fused = {"base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight": torch.ones(8, 32),
             "base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.weight": torch.ones(64, 8)}
    bad = raw_adapter(tmp_path / "fused", {"target_modules": ["qkv_proj"]}, fused)
    good = peft_adapter(tmp_path / "good")
    base = base_folder(tmp_path / "base")
    assert "vllm-target-modules" in finding_ids(bad, "vllm", base=base)
    assert "vllm-target-modules" not in finding_ids(good, "vllm", base=base)
    without_base = check_adapter(bad, "vllm")
    assert "vllm-target-modules" not in {f.rule.id for f in without_base.findings}
    assert any(note.startswith("vllm-target-modules") for note in without_base.notes)


def test_llama_cpp_tied_lm_head(tmp_path: Path) -> None:
    adapter = peft_adapter(tmp_path / "head", target_modules=["q_proj", "lm_head"])
    tied = base_folder(tmp_path / "tied", tie_word_embeddings=True)
    untied = base_folder(tmp_path / "untied")
    assert "llama.cpp-tied-lm-head" in finding_ids(adapter, "llama.cpp", base=tied)
    assert "llama.cpp-tied-lm-head" not in finding_ids(adapter, "llama.cpp", base=untied)
    result = check_adapter(adapter, "llama.cpp")
    assert result.ok and any("tied-lm-head" in note for note in result.notes)


def test_check_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = peft_adapter(tmp_path / "good")
    bad = peft_adapter(tmp_path / "bad", use_rslora=True)
    assert main(["check", str(good), "--target", "llama.cpp"]) == 0
    assert main(["check", str(bad), "--target", "llama.cpp"]) == 1
    out = capsys.readouterr().out
    assert "llama.cpp-rslora" in out and "convert_lora_to_gguf.py" in out and "lorakit convert" in out
    assert main(["check", str(tmp_path / "missing"), "--target", "vllm"]) == 2
    assert main(["check", str(good), "--target", "vllm", "--max-lora-rank", "0"]) == 2


def test_inspect_reports_config_and_norms(tmp_path: Path) -> None:
    adapter = peft_adapter(tmp_path / "a", r=4, lora_alpha=8, use_rslora=True, rank_pattern={"v_proj": 2},
                           alpha_pattern={"o_proj": 3}, modules_to_save=["lm_head"])
    report = inspect_adapter(adapter)
    assert report.scaling_rule.startswith("lora_alpha / sqrt(r)")
    assert report.rank_pattern == {"v_proj": 2} and report.alpha_pattern == {"o_proj": 3}
    assert report.modules_to_save == ["lm_head"] and report.saved_tensors
    assert report.dtypes == {"float32": len(report.saved_tensors) + 2 * len(report.layers)}
    # The oracle: peft's merged update of every layer, its Frobenius norm formed explicitly.
    from test_ship_helpers import peft_merged_deltas

    deltas = peft_merged_deltas(adapter)
    for layer in report.layers:
        expected = float(torch.linalg.matrix_norm(deltas[layer.module]))
        assert layer.norm == pytest.approx(expected, rel=1e-5)
        assert layer.flags == ()
    rank_of = {layer.module.rsplit(".", 1)[-1]: layer.rank for layer in report.layers}
    assert rank_of["v_proj"] == 2 and rank_of["q_proj"] == 4


def test_inspect_flags_zero_nonfinite_and_large(tmp_path: Path) -> None:
    prefix = "base_model.model.model.layers"
    tensors: dict[str, torch.Tensor] = {}
    for index in range(4):
        tensors[f"{prefix}.{index}.q_proj.lora_A.weight"] = torch.full((2, 8), 0.1)
        tensors[f"{prefix}.{index}.q_proj.lora_B.weight"] = torch.full((8, 2), 0.1)
    tensors[f"{prefix}.1.q_proj.lora_B.weight"] = torch.zeros(8, 2)
    tensors[f"{prefix}.2.q_proj.lora_A.weight"][0, 0] = float("nan")
    tensors[f"{prefix}.3.q_proj.lora_B.weight"] = torch.full((8, 2), 1e4)
    tensors[f"{prefix}.4.q_proj.lora_A.weight"] = torch.full((2, 8), 0.1)
    tensors[f"{prefix}.4.q_proj.lora_B.weight"] = torch.full((8, 2), 0.1)
    config = {"r": 2, "lora_alpha": 2, "target_modules": ["q_proj"]}
    adapter = raw_adapter(tmp_path / "broken", config, tensors)
    report = inspect_adapter(adapter)
    flags = {layer.module.split(".")[2]: layer.flags for layer in report.layers}
    assert flags == {"0": (), "1": ("all-zero",), "2": ("non-finite",), "3": ("large",), "4": ()}
    assert json.loads(json.dumps(report.to_dict(), allow_nan=False))["flagged"] == [
        layer.module for layer in report.layers if layer.flags]


def test_inspect_cli_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    adapter = peft_adapter(tmp_path / "a")
    assert main(["inspect", str(adapter), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["rank"] == 8 and len(data["layers"]) == 8 and data["flagged"] == []
    assert main(["inspect", str(adapter)]) == 0
    assert "no layer flagged" in capsys.readouterr().out


def test_vllm_embedding_modules_depend_on_the_model_class(tmp_path: Path) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False)
    qwen = Qwen2ForCausalLM(config).eval()
    qwen.save_pretrained(str(tmp_path / "qwen"))
    with_embedding = peft_adapter(tmp_path / "emb-qwen", qwen, target_modules=["q_proj", "embed_tokens"])
    assert "vllm-target-modules" in finding_ids(with_embedding, "vllm", base=tmp_path / "qwen")
    llama_embedding = peft_adapter(tmp_path / "emb-llama", target_modules=["q_proj", "embed_tokens"])
    assert "vllm-target-modules" not in finding_ids(llama_embedding, "vllm", base=base_folder(tmp_path / "b"))
