"""LoraConfig validation, and failed injections that must leave the model untouched."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_llama
from torch import nn

import lorakit
from lorakit import LoraConfig


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("r", 0, r"LoraConfig\.r .*got 0"),
        ("r", -3, r"LoraConfig\.r .*got -3"),
        ("r", 2.5, r"LoraConfig\.r .*got 2\.5"),
        ("r", True, r"LoraConfig\.r .*got True"),
        ("lora_alpha", 0, r"LoraConfig\.lora_alpha .*got 0"),
        ("lora_alpha", -1.5, r"LoraConfig\.lora_alpha .*got -1\.5"),
        ("lora_alpha", math.inf, r"LoraConfig\.lora_alpha .*got inf"),
        ("lora_dropout", 1.0, r"LoraConfig\.lora_dropout .*got 1\.0"),
        ("lora_dropout", -0.1, r"LoraConfig\.lora_dropout .*got -0\.1"),
        ("bias", "some", r"LoraConfig\.bias .*got 'some'"),
        ("init_lora_weights", "kaiming", r"LoraConfig\.init_lora_weights .*got 'kaiming'"),
        ("rank_pattern", {"q_proj": 0}, r"LoraConfig\.rank_pattern\['q_proj'\] .*got 0"),
        ("alpha_pattern", {"q_proj": -2}, r"LoraConfig\.alpha_pattern\['q_proj'\] .*got -2"),
        ("target_modules", [], r"LoraConfig\.target_modules"),
    ],
)
def test_bad_values_fail_at_construction_naming_field_and_value(field, value, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**{field: value})


def test_replace_validates_too():
    with pytest.raises(ValueError, match=r"LoraConfig\.r "):
        LoraConfig(target_modules=["q_proj"]).replace(r=0)


def test_layers_pattern_needs_layers_to_transform():
    with pytest.raises(ValueError, match="layers_to_transform"):
        LoraConfig(target_modules=["q_proj"], layers_pattern="layers")


def test_valid_values_are_normalised():
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=("v_proj", "q_proj"),
                        layers_to_transform=1, init_lora_weights="gaussian", bias="lora_only")
    assert config.target_modules == ["q_proj", "v_proj"]
    assert config.layers_to_transform == [1]


def test_from_dict_reads_a_peft_adapter_config():
    from peft import LoraConfig as PeftLoraConfig

    peft_dict = PeftLoraConfig(r=4, lora_alpha=16, target_modules=["q_proj"], use_rslora=True).to_dict()
    config = LoraConfig.from_dict(peft_dict)
    assert (config.r, config.lora_alpha, config.use_rslora) == (4, 16, True)
    assert sorted(config.target_modules) == ["q_proj"]


def _snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[tuple[str, type]], set[str]]:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    types = [(n, type(m)) for n, m in model.named_modules()]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return state, types, trainable


def _assert_unchanged(model: nn.Module, snapshot: tuple) -> None:
    state, types, trainable = snapshot
    now = model.state_dict()
    assert list(now) == list(state)
    for key, value in state.items():
        assert torch.equal(now[key], value), key
    assert [(n, type(m)) for n, m in model.named_modules()] == types
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable


@pytest.mark.parametrize(
    ("config", "message"),
    [
        # a typo: the message offers the real name
        (LoraConfig(target_modules=["q_prj", "v_proj"]), r"'q_prj'.*'q_proj'"),
        # an entry must match a whole name segment, "proj" is not "q_proj"
        (LoraConfig(target_modules=["proj"]), r"'proj' matches no module.*_proj"),
        (LoraConfig(target_modules=r".*\.qq_proj"), r"regex.*matches no module"),
        # everything selected is excluded again
        (LoraConfig(target_modules=["q_proj"], exclude_modules=["q_proj"]), "selects no module"),
        (LoraConfig(target_modules=["q_proj"], layers_to_transform=[5]), "selects no module"),
        # not a linear layer or embedding
        (LoraConfig(target_modules=["mlp"]), r"'model\.layers\.0\.mlp' is a LlamaMLP"),
        (LoraConfig(target_modules=["input_layernorm"]), "LlamaRMSNorm"),
        (LoraConfig(target_modules=None), "target_modules is None"),
        (LoraConfig(target_modules=["q_proj"], modules_to_save=["scorer"]), r"'scorer'.*closest"),
        # unsupported on an embedding: found before the linear layers are touched (PiSSA rewrites weights)
        (LoraConfig(target_modules=["q_proj", "embed_tokens"], init_lora_weights="pissa"), "embed_tokens"),
        (LoraConfig(target_modules=["q_proj", "embed_tokens"], use_dora=True), "DoRA"),
    ],
)
def test_failed_inject_leaves_the_model_unchanged(config, message):
    model = tiny_llama()
    model.requires_grad_(True)
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=message):
        lorakit.inject(model, config)
    _assert_unchanged(model, snapshot)
    assert lorakit.adapter_configs(model) == {}


@pytest.mark.parametrize(
    "config",
    [
        LoraConfig(target_modules=["k_prj"]),
        LoraConfig(target_modules=["embed_tokens", "k_proj"], use_dora=True),
        LoraConfig(target_modules=["k_proj", "embed_tokens"], init_lora_weights="olora"),
    ],
)
def test_failed_add_adapter_leaves_the_model_unchanged(config):
    model = lorakit.inject(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "k_proj"],
                                                     init_lora_weights=False))
    snapshot = _snapshot(model)
    with pytest.raises(ValueError):
        lorakit.add_adapter(model, config, "second")
    _assert_unchanged(model, snapshot)
    assert list(lorakit.adapter_configs(model)) == ["default"]


@pytest.mark.parametrize("option", [{"init_lora_weights": "pissa"}, {"use_dora": True}])
def test_unsupported_embedding_found_before_an_earlier_linear_is_touched(option):
    """PiSSA rewrites the base weight of a linear layer on creation: check every target first."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"proj": nn.Linear(6, 6), "emb": nn.Embedding(5, 6)})  # linear first
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=r"'emb' is an nn\.Embedding"):
        lorakit.inject(model, LoraConfig(r=2, target_modules=["proj", "emb"], **option))
    _assert_unchanged(model, snapshot)


def test_bad_adapter_names_raise():
    model = lorakit.inject(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already exists"):
        lorakit.add_adapter(model, LoraConfig(target_modules=["q_proj"]), "default")
    with pytest.raises(ValueError, match=r"no '\.'"):
        lorakit.add_adapter(model, LoraConfig(target_modules=["q_proj"]), "a.b")
