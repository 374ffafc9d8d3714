"""`lorakit params` counts against peft's own counts on the same meta-device models."""

from __future__ import annotations

import copy
import json

import peft
import pytest
from transformers import AutoConfig

from lorakit.analysis.params import count_parameters, load_config, meta_model
from lorakit.cli.main import main
from lorakit.config import LoraConfig

LLAMA_7B = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
            "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 32, "vocab_size": 32000, "tie_word_embeddings": False}
LLAMA3_8B = {**LLAMA_7B, "intermediate_size": 14336, "num_key_value_heads": 8, "vocab_size": 128256}
SMALL = {
    "llama": {**LLAMA_7B, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 3,
              "num_attention_heads": 8, "num_key_value_heads": 8},
    "llama-gqa": {**LLAMA_7B, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 3,
                  "num_attention_heads": 8, "num_key_value_heads": 2},
    "mistral": {"model_type": "mistral", "architectures": ["MistralForCausalLM"], "hidden_size": 256,
                "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 8,
                "num_key_value_heads": 2, "vocab_size": 1000},
    "bert": {"model_type": "bert", "architectures": ["BertForSequenceClassification"], "hidden_size": 128,
             "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 1000},
    "gpt2": {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 128, "n_layer": 2,
             "n_head": 4, "vocab_size": 1000},
}
TARGETS = {
    "llama": [["q_proj", "v_proj"], "all-linear"],
    "llama-gqa": [["q_proj", "k_proj", "v_proj", "o_proj"], "all-linear"],
    "mistral": [["q_proj", "v_proj"], "all-linear"],
    "bert": [["query", "value"], "all-linear"],
    "gpt2": [["c_attn"], "all-linear"],
}


def config_of(values: dict):
    values = dict(values)
    return AutoConfig.for_model(values.pop("model_type"), **values)


def peft_counts(model, **lora) -> tuple[int, int]:
    task = {"task_type": "SEQ_CLS"} if "SequenceClassification" in type(model).__name__ else {}
    return peft.get_peft_model(model, peft.LoraConfig(**lora, **task)).get_nb_trainable_parameters()


@pytest.mark.parametrize("kind", sorted(SMALL))
@pytest.mark.parametrize("which", [0, 1])
@pytest.mark.parametrize("dora", [False, True])
def test_counts_equal_peft(kind: str, which: int, dora: bool) -> None:
    config = config_of(SMALL[kind])
    targets = TARGETS[kind][which]
    model = meta_model(config)
    expected = peft_counts(copy.deepcopy(model), r=4, target_modules=targets, use_dora=dora)
    task = "SEQ_CLS" if kind == "bert" else None
    report = count_parameters(model, LoraConfig(r=4, target_modules=targets, use_dora=dora, task_type=task))
    assert (report.trainable, report.total) == expected


def test_modules_to_save_counts_equal_peft() -> None:
    model = meta_model(config_of(SMALL["llama"]))
    expected = peft_counts(copy.deepcopy(model), r=8, target_modules=["q_proj"], modules_to_save=["lm_head"])
    report = count_parameters(model, LoraConfig(r=8, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    assert (report.trainable, report.total) == expected


def test_llama_7b_q_v_is_4_194_304_not_128x_more() -> None:
    lora = LoraConfig(r=8, target_modules=["q_proj", "v_proj"])
    report = count_parameters(meta_model(config_of(LLAMA_7B)), lora)
    assert report.trainable == 4_194_304
    assert report.per_module_type["q_proj"].modules == 32
    assert report.per_module_type["q_proj"].parameters == 32 * 8 * (4096 + 4096)
    assert report.adapter_tensor_bytes == {"fp32": 4_194_304 * 4, "bf16": 4_194_304 * 2}


def test_llama3_8b_all_projections_r16() -> None:
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    report = count_parameters(meta_model(config_of(LLAMA3_8B)), LoraConfig(r=16, target_modules=targets))
    assert (report.trainable, report.total) == (41_943_040, 8_072_204_288)
    # k_proj and v_proj are 4096 -> 1024 under grouped-query attention: r * (4096 + 1024) each.
    assert report.per_module_type["k_proj"].parameters == 32 * 16 * (4096 + 1024)


def test_load_config_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no model config"):
        load_config(tmp_path / "missing.json")
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ValueError, match="model_type"):
        load_config(tmp_path)


def test_cli_prints_peft_style_line(tmp_path, capsys) -> None:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_7B))
    assert main(["params", str(tmp_path), "--r", "8", "--targets", "q_proj,v_proj"]) == 0
    out = capsys.readouterr().out
    assert "trainable params: 4,194,304 || all params: 6,742,609,920" in out
    assert "| v_proj | 32 | 2,097,152 |" in out
