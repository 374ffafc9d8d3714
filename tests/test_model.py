"""Model-level API: zero init, merge / unmerge / unload, multiple adapters, disable_adapters."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert, tiny_gpt2, tiny_llama, token_ids
from torch import nn

import lorakit
from lorakit.adapter_layer import AdapterLayer
from lorakit.layers import LoraLinear
from lorakit.modules_to_save import ModulesToSave

QV = ["q_proj", "v_proj"]


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _lorakit_modules(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, (AdapterLayer, ModulesToSave))]


def _perturb_magnitudes(model: nn.Module) -> None:
    """DoRA with a trained magnitude; at init it is the row norm and DoRA equals LoRA."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_magnitude_vector" in name:
                parameter.mul_(torch.linspace(0.7, 1.3, parameter.numel()))


def _assert_same_state(model: nn.Module, reference: nn.Module, atol: float = 0.0) -> None:
    state, expected = model.state_dict(), reference.state_dict()
    assert list(state) == list(expected)
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=atol, msg=key)
    types = [(n, type(m)) for n, m in model.named_modules()]
    assert types == [(n, type(m)) for n, m in reference.named_modules()]


@pytest.mark.parametrize("init", [True, "gaussian"])
def test_zero_initialised_b_leaves_the_output_identical(init):
    ids = token_ids()
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=4, target_modules="all-linear",
                                                            init_lora_weights=init))
    assert torch.equal(_logits(model, ids), _logits(tiny_llama(), ids))


def test_embedding_default_init_leaves_the_output_identical():
    ids = token_ids()
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=4, target_modules=["embed_tokens"]))
    assert torch.equal(_logits(model, ids), _logits(tiny_llama(), ids))


MERGE_CASES = {
    "lora": (tiny_llama, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=QV, init_lora_weights=False)),
    "rslora": (tiny_llama, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True,
                                              init_lora_weights=False)),
    "dora": (tiny_llama, lorakit.LoraConfig(r=4, target_modules=["q_proj", "down_proj"], use_dora=True,
                                            init_lora_weights=False)),
    "embedding": (tiny_llama, lorakit.LoraConfig(r=4, target_modules=["embed_tokens", "o_proj"],
                                                 init_lora_weights=False)),
    "conv1d": (tiny_gpt2, lorakit.LoraConfig(r=4, target_modules=["c_attn", "c_proj", "c_fc"],
                                             init_lora_weights=False)),
    "conv1d_dora": (tiny_gpt2, lorakit.LoraConfig(r=4, target_modules=["c_attn"], use_dora=True,
                                                  init_lora_weights=False)),
}


@pytest.mark.parametrize("case", list(MERGE_CASES))
def test_merge_equals_unmerged_and_unmerge_restores_the_base(case):
    build, config = MERGE_CASES[case]
    ids = token_ids()
    model = lorakit.inject(build(), config)
    _perturb_magnitudes(model)
    unmerged = _logits(model, ids)
    assert not torch.allclose(unmerged, _logits(build(), ids), atol=1e-3)  # the adapters do something

    lorakit.merge(model)
    torch.testing.assert_close(_logits(model, ids), unmerged, rtol=0, atol=1e-5)
    with pytest.raises(RuntimeError, match="already merged"):
        lorakit.merge(model)

    lorakit.unmerge(model)
    base = build()
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            expected = base.get_submodule(name).weight
            torch.testing.assert_close(module.base_layer.weight, expected, rtol=0, atol=1e-6, msg=name)
    torch.testing.assert_close(_logits(model, ids), unmerged, rtol=0, atol=1e-5)


def test_safe_merge_refuses_non_finite_weights_and_changes_nothing():
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=4, target_modules=QV, init_lora_weights=False))
    with torch.no_grad():  # only the second layer's v_proj goes bad: the first layers must not be merged
        model.model.layers[1].self_attn.v_proj.lora_B["default"].weight[0, 0] = float("inf")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"layers\.1\.self_attn\.v_proj.*non-finite"):
        lorakit.merge(model, safe_merge=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(not m.merged_adapters for m in model.modules() if isinstance(m, AdapterLayer))


def test_layer_safe_merge_refuses_and_leaves_the_layer_unchanged():
    layer = tiny_llama().model.layers[0].self_attn.q_proj
    layer = LoraLinear(layer)
    layer.add_adapter("a", r=2, lora_alpha=2, init_lora_weights=False)
    layer.add_adapter("b", r=2, lora_alpha=2, init_lora_weights=False)
    with torch.no_grad():
        layer.lora_A["b"].weight[0, 0] = float("nan")
    weight = layer.base_layer.weight.clone()
    with pytest.raises(RuntimeError, match="non-finite"):
        layer.merge(["a", "b"], safe_merge=True)  # "a" alone is fine, but the merge is all or nothing
    assert torch.equal(layer.base_layer.weight, weight)
    assert layer.merged_adapters == []


@pytest.mark.parametrize("case", ["lora", "dora", "embedding", "conv1d"])
def test_merge_and_unload_leaves_a_plain_model_with_the_same_output(case):
    build, config = MERGE_CASES[case]
    ids = token_ids()
    model = lorakit.inject(build(), config)
    _perturb_magnitudes(model)
    adapted = _logits(model, ids)
    plain = lorakit.merge_and_unload(model)
    assert _lorakit_modules(plain) == []
    assert [type(m) for m in plain.modules()] == [type(m) for m in build().modules()]
    assert list(plain.state_dict()) == list(build().state_dict())
    torch.testing.assert_close(_logits(plain, ids), adapted, rtol=0, atol=1e-5)
    assert lorakit.adapter_configs(plain) == {}


def test_merge_and_unload_keeps_the_modules_to_save_copy():
    ids = token_ids()
    model = lorakit.inject(tiny_bert(), lorakit.LoraConfig(r=4, target_modules=["query"], task_type="SEQ_CLS",
                                                           init_lora_weights=False))
    with torch.no_grad():
        model.classifier.modules_to_save["default"].weight.add_(0.5)
    adapted = _logits(model, ids)
    plain = lorakit.merge_and_unload(model)
    assert isinstance(plain.classifier, nn.Linear)
    torch.testing.assert_close(_logits(plain, ids), adapted, rtol=0, atol=1e-5)


@pytest.mark.parametrize("merged", [False, True])
def test_unload_restores_the_base_exactly(merged):
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=4, target_modules=["embed_tokens", *QV],
                                                            init_lora_weights=False))
    if merged:
        lorakit.merge(model)
        lorakit.unmerge(model)  # unmerge is exact only to round-off; unload of an unmerged model is exact
    plain = lorakit.unload(model)
    _assert_same_state(plain, tiny_llama(), atol=1e-6 if merged else 0.0)
    assert _lorakit_modules(plain) == []


def _trainable(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def _two_adapters() -> nn.Module:
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=4, target_modules=QV, init_lora_weights=False),
                           "a")
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2, target_modules=["q_proj", "down_proj"],
                                                  init_lora_weights=False), "b")
    return model


def test_inject_freezes_everything_but_the_adapter():
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=4, target_modules=QV))
    trainable = _trainable(model)
    assert trainable and all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
    assert len(trainable) == 2 * 2 * 2  # A and B, q and v, two layers


def test_add_adapter_leaves_the_new_one_inactive_and_frozen():
    ids = token_ids()
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=4, target_modules=QV, init_lora_weights=False),
                           "a")
    only_a = _logits(model, ids)
    trainable = _trainable(model)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2, target_modules=["q_proj", "down_proj"],
                                                  init_lora_weights=False), "b")
    assert lorakit.active_adapters(model) == ["a"]
    assert _trainable(model) == trainable
    assert any(".b." in n for n, _ in model.named_parameters())
    torch.testing.assert_close(_logits(model, ids), only_a, rtol=0, atol=0)


def test_set_adapter_one_name_makes_it_the_only_trainable_one():
    model = _two_adapters()
    lorakit.set_adapter(model, "b")
    trainable = _trainable(model)
    assert trainable and all(".b." in n for n in trainable)
    assert {n for n, _ in model.named_parameters() if ".b." in n} == trainable
    assert lorakit.active_adapters(model) == ["b"]


def test_set_adapter_list_adds_up_the_deltas_and_trains_none():
    ids = token_ids()
    model = _two_adapters()
    with lorakit.disable_adapters(model):
        base = _logits(model, ids)
    lorakit.set_adapter(model, "a")
    delta_a = _logits(model, ids) - base
    lorakit.set_adapter(model, "b")
    delta_b = _logits(model, ids) - base
    lorakit.set_adapter(model, ["a", "b"])
    assert _trainable(model) == set()
    assert delta_a.abs().max() > 1e-2 and delta_b.abs().max() > 1e-2
    # The deltas of the layers add up; the logits are a non-linear function of them, so compare one layer.
    layer = model.model.layers[0].self_attn.q_proj
    hidden = torch.randn(3, 32)
    with torch.no_grad():
        both = layer(hidden)
        lorakit.set_adapter(model, "a")
        only_a = layer(hidden)
        lorakit.set_adapter(model, "b")
        only_b = layer(hidden)
        plain = layer.base_layer(hidden)
    torch.testing.assert_close(both - plain, (only_a - plain) + (only_b - plain), rtol=0, atol=1e-6)


def test_set_adapter_unknown_name_raises():
    model = _two_adapters()
    with pytest.raises(ValueError, match=r"'c'.*\['a', 'b'\]"):
        lorakit.set_adapter(model, "c")


def test_delete_adapter():
    ids = token_ids()
    model = _two_adapters()
    only_a = _logits(model, ids)
    lorakit.delete_adapter(model, "b")
    assert not any(".b." in key for key in model.state_dict())
    assert list(lorakit.adapter_configs(model)) == ["a"]
    # down_proj had only "b": its wrapper is gone
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    torch.testing.assert_close(_logits(model, ids), only_a, rtol=0, atol=0)
    lorakit.delete_adapter(model, "a")
    _assert_same_state(model, tiny_llama())


def test_delete_active_adapter_activates_a_remaining_one():
    model = _two_adapters()
    lorakit.delete_adapter(model, "a")
    assert lorakit.active_adapters(model) == ["b"]
    assert _trainable(model) and all(".b." in n for n in _trainable(model))


def test_delete_merged_adapter_raises_and_changes_nothing():
    model = _two_adapters()
    lorakit.merge(model)
    keys = list(model.state_dict())
    with pytest.raises(RuntimeError, match="unmerge"):
        lorakit.delete_adapter(model, "a")
    assert list(model.state_dict()) == keys


def test_disable_adapters_runs_the_base_model():
    ids = token_ids()
    model = _two_adapters()
    adapted = _logits(model, ids)
    with lorakit.disable_adapters(model):
        torch.testing.assert_close(_logits(model, ids), _logits(tiny_llama(), ids), rtol=0, atol=0)
    torch.testing.assert_close(_logits(model, ids), adapted, rtol=0, atol=0)


def test_disable_adapters_when_merged_unmerges_inside_and_merges_back():
    ids = token_ids()
    model = _two_adapters()
    adapted = _logits(model, ids)
    lorakit.merge(model)
    q_proj = model.model.layers[0].self_attn.q_proj
    merged_weight = q_proj.base_layer.weight.clone()
    with lorakit.disable_adapters(model):
        torch.testing.assert_close(_logits(model, ids), _logits(tiny_llama(), ids), rtol=0, atol=1e-5)
        assert q_proj.merged_adapters == []
    assert q_proj.merged_adapters == ["a"]
    torch.testing.assert_close(q_proj.base_layer.weight, merged_weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(_logits(model, ids), adapted, rtol=0, atol=1e-5)


def test_disable_adapters_restores_state_after_an_exception():
    model = _two_adapters()
    with pytest.raises(KeyError), lorakit.disable_adapters(model):
        raise KeyError("boom")
    assert not any(m.disabled for m in model.modules() if isinstance(m, AdapterLayer))


def test_inject_twice_raises():
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(target_modules=QV))
    with pytest.raises(ValueError, match="add_adapter"):
        lorakit.inject(model, lorakit.LoraConfig(target_modules=QV))


def test_wrapper_exposes_the_base_attributes():
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(target_modules=QV))
    layer = model.model.layers[0].self_attn.v_proj
    assert isinstance(layer, LoraLinear)
    assert (layer.in_features, layer.out_features) == (32, 16)
    assert layer.weight is layer.base_layer.weight
