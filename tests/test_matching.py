"""The matcher selects exactly the modules peft 0.21 selects for the same config."""

from __future__ import annotations

import peft
import pytest
from conftest import tiny_bert, tiny_gpt2, tiny_llama
from peft.tuners.lora import LoraLayer
from torch import nn

from lorakit import LoraConfig
from lorakit.matching import find_modules_to_save, find_targets, name_matches, pattern_value

PREFIX = "base_model.model."


def _peft_targets(model: nn.Module, **config: object) -> list[str]:
    wrapped = peft.get_peft_model(model, peft.LoraConfig(**config))
    return [n.removeprefix(PREFIX) for n, m in wrapped.named_modules() if isinstance(m, LoraLayer)]


CASES = {
    "list": (tiny_llama, {"target_modules": ["q_proj", "v_proj"]}),
    "qualified entry": (tiny_llama, {"target_modules": ["self_attn.q_proj", "model.layers.1.mlp.up_proj"]}),
    "regex": (tiny_llama, {"target_modules": r".*\.layers\.1\.(self_attn|mlp)\.(k|gate)_proj"}),
    "exclude list": (tiny_llama, {"target_modules": "all-linear",
                                  "exclude_modules": ["o_proj", "layers.0.mlp.up_proj"]}),
    "exclude regex": (tiny_llama, {"target_modules": ["q_proj", "k_proj"],
                                   "exclude_modules": r".*\.0\.self_attn\.q_proj"}),
    "layers_to_transform": (tiny_llama, {"target_modules": ["q_proj", "down_proj"],
                                         "layers_to_transform": [1]}),
    "layers_pattern": (tiny_llama, {"target_modules": ["q_proj"], "layers_to_transform": 0,
                                    "layers_pattern": "layers"}),
    "gpt2 layers": (tiny_gpt2, {"target_modules": ["c_attn"], "layers_to_transform": [1],
                                "layers_pattern": "h"}),
    "all-linear llama": (tiny_llama, {"target_modules": "all-linear"}),
    "all-linear gpt2": (tiny_gpt2, {"target_modules": "all-linear"}),
    "all-linear bert seq_cls": (tiny_bert, {"target_modules": "all-linear", "task_type": "SEQ_CLS"}),
    "all-linear bert": (tiny_bert, {"target_modules": "all-linear"}),  # no task type: the head is adapted too
    "embedding": (tiny_llama, {"target_modules": ["embed_tokens", "lm_head"]}),
    "modules_to_save excluded": (tiny_bert, {"target_modules": ["query", "dense"],
                                             "modules_to_save": ["pooler"]}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_selects_the_same_modules_as_peft(case):
    build, config = CASES[case]
    ours = find_targets(build(), LoraConfig(**config))
    assert ours == _peft_targets(build(), **config)
    assert ours  # every case selects something


def test_all_linear_leaves_out_the_output_head():
    names = find_targets(tiny_llama(), LoraConfig(target_modules="all-linear"))
    assert "lm_head" not in names and len(names) == 2 * 7
    bert = find_targets(tiny_bert(), LoraConfig(target_modules="all-linear", task_type="SEQ_CLS"))
    assert "classifier" not in bert and "bert.pooler.dense" in bert


def test_modules_to_save_for_seq_cls_adds_the_classifier():
    config = LoraConfig(target_modules=["query"], task_type="SEQ_CLS")
    assert find_modules_to_save(tiny_bert(), config) == ["classifier"]
    assert find_modules_to_save(tiny_bert(), LoraConfig(target_modules=["query"])) == []


def test_name_rule():
    assert name_matches("model.layers.0.self_attn.q_proj", ["q_proj"])
    assert name_matches("model.layers.0.self_attn.q_proj", ["self_attn.q_proj"])
    assert name_matches("q_proj", ["q_proj"])
    assert not name_matches("model.layers.0.self_attn.q_proj", ["proj"])
    assert not name_matches("model.layers.0.self_attn.q_proj", ["attn.q_proj"])


def test_pattern_keys_follow_peft():
    from peft.utils.other import get_pattern_key

    patterns = {"q_proj": 2, r"layers\.1\.mlp\..*": 3, "model.layers.0.mlp.down_proj": 5}
    names = [n for n, _ in tiny_llama().named_modules() if n]
    for name in names:
        key = get_pattern_key(list(patterns), name)
        assert pattern_value(patterns, name, 8) == patterns.get(key, 8), name
    assert pattern_value(patterns, "model.layers.1.mlp.up_proj", 8) == 3
    assert pattern_value(patterns, "model.layers.0.mlp.up_proj", 8) == 8


def test_second_adapter_matches_wrapped_modules_not_their_insides():
    import lorakit

    model = lorakit.inject(tiny_llama(), LoraConfig(target_modules="all-linear"))
    again = find_targets(model, LoraConfig(target_modules="all-linear"))
    assert again == find_targets(tiny_llama(), LoraConfig(target_modules="all-linear"))
    with pytest.raises(ValueError, match="'lora_A' matches no module"):
        find_targets(model, LoraConfig(target_modules=["lora_A"]))
