"""lorakit.combine_adapters against peft's LoraModel.add_weighted_adapter on the same A and B."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from conftest import tiny_bert, tiny_llama, token_ids
from torch import nn

import lorakit
from lorakit import io
from lorakit.adapter_layer import AdapterLayer
from lorakit.combine import combine_adapters

IDS = token_ids()
# Adapter names avoid substrings of "lora_" ("a", "r", ...), which peft warns about.
WEIGHTS = {"x": 0.7, "y": -0.3}
TIGHT = {"atol": 1e-6, "rtol": 1e-5}
# fp32 SVD reconstructs Σ w·ΔW (entries up to ~10) to ~1e-5
LOOSE = {"atol": 1e-4, "rtol": 1e-4}


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def twin_models(kwargs_x: dict[str, Any], kwargs_y: dict[str, Any]) -> tuple[nn.Module, Any]:
    """A lorakit model and a peft model with identical adapters "x" and "y" (weights copied key by key)."""
    base = tiny_llama()
    ours = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(**kwargs_x), "x")
    lorakit.add_adapter(ours, lorakit.LoraConfig(**kwargs_y), "y")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs_x), adapter_name="x").eval()
    theirs.add_adapter("y", peft.LoraConfig(**kwargs_y))
    # The in-memory names are PEFT's: the whole state dict maps one to one.
    theirs.base_model.model.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs


def shared_twins(rank_y: int, rslora: bool = False) -> tuple[nn.Module, Any]:
    """Adapters that share q_proj and each have layers of their own (an embedding included)."""
    kwargs_x = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "embed_tokens"],
                "init_lora_weights": False, "use_rslora": rslora}
    kwargs_y = {"r": rank_y, "lora_alpha": 3, "target_modules": ["q_proj", "k_proj"],
                "init_lora_weights": False, "use_rslora": rslora}
    return twin_models(kwargs_x, kwargs_y)


def adapted_layers(model: nn.Module, adapter_name: str) -> dict[str, AdapterLayer]:
    return {name: module for name, module in model.named_modules()
            if isinstance(module, AdapterLayer) and adapter_name in module.adapter_names}


def peft_adapted_layers(peft_model: Any, adapter_name: str) -> list[str]:
    return [name for name, module in peft_model.base_model.model.named_modules()
            if adapter_name in getattr(module, "lora_A", {})
            or adapter_name in getattr(module, "lora_embedding_A", {})]


def weighted_delta(layer: AdapterLayer, weights: dict[str, float]) -> torch.Tensor:
    """Σ w·ΔW over the sources this layer carries."""
    return sum(w * layer.delta_weight(name) for name, w in weights.items() if name in layer.adapter_names)


def peft_delta(peft_model: Any, name: str, adapter_name: str) -> torch.Tensor:
    return peft_model.base_model.model.get_submodule(name).get_delta_weight(adapter_name)


def assert_same_factors(ours: nn.Module, theirs: Any, adapter_name: str) -> None:
    """"linear" and "cat" are deterministic: A and B themselves (not only B·A) equal PEFT's."""
    for name, layer in adapted_layers(ours, adapter_name).items():
        other = theirs.base_model.model.get_submodule(name)
        if adapter_name in other.lora_embedding_A:
            pairs = [(layer.lora_embedding_A[adapter_name], other.lora_embedding_A[adapter_name]),
                     (layer.lora_embedding_B[adapter_name], other.lora_embedding_B[adapter_name])]
        else:
            pairs = [(layer.lora_A[adapter_name].weight, other.lora_A[adapter_name].weight),
                     (layer.lora_B[adapter_name].weight, other.lora_B[adapter_name].weight)]
        for mine, peft_factor in pairs:
            torch.testing.assert_close(mine, peft_factor, **TIGHT)


def combine_both(ours: nn.Module, theirs: Any, weights: dict[str, float], method: str,
                 svd_rank: int | None = None, name: str = "xy") -> None:
    combine_adapters(ours, weights, name, method, svd_rank=svd_rank)  # type: ignore[arg-type]
    theirs.add_weighted_adapter(list(weights), list(weights.values()), name, combination_type=method,
                                svd_rank=svd_rank)


@pytest.mark.parametrize(("method", "rank_y", "svd_rank"), [
    ("linear", 4, None),
    ("cat", 2, None),
    ("svd", 2, None),  # truncated to rank 4: not Σ w·ΔW, but the same best approximation as PEFT's
    ("svd", 2, 6),  # rank 6 holds Σ w·ΔW exactly
])
def test_same_result_as_peft(method: str, rank_y: int, svd_rank: int | None) -> None:
    ours, theirs = shared_twins(rank_y)
    combine_both(ours, theirs, WEIGHTS, method, svd_rank)
    tolerance = LOOSE if method == "svd" else TIGHT
    layers = adapted_layers(ours, "xy")
    assert sorted(layers) == sorted(peft_adapted_layers(theirs, "xy"))
    for name, layer in layers.items():
        torch.testing.assert_close(layer.delta_weight("xy"), peft_delta(theirs, name, "xy"), **tolerance)
        if method == "cat" or svd_rank == 6:
            torch.testing.assert_close(layer.delta_weight("xy"), weighted_delta(layer, WEIGHTS), **tolerance)
    if method != "svd":
        assert_same_factors(ours, theirs, "xy")
    assert lorakit.adapter_configs(ours)["xy"].r == theirs.peft_config["xy"].r
    lorakit.set_adapter(ours, "xy")
    theirs.set_adapter("xy")
    torch.testing.assert_close(logits(ours), logits(theirs), atol=1e-5, rtol=0)


def test_linear_is_not_the_weighted_sum_when_adapters_share_a_layer() -> None:
    # A guard on the test above: "linear" differs from Σ w·ΔW on q_proj (cross terms), as in PEFT.
    ours, _ = shared_twins(4)
    combine_adapters(ours, WEIGHTS, "xy", "linear")
    q_proj = ours.model.layers[0].self_attn.q_proj
    assert not torch.allclose(q_proj.delta_weight("xy"), weighted_delta(q_proj, WEIGHTS), atol=1e-3)
    v_proj = ours.model.layers[0].self_attn.v_proj  # only "x" here: exactly 0.7·ΔW_x
    torch.testing.assert_close(v_proj.delta_weight("xy"), 0.7 * v_proj.delta_weight("x"), **TIGHT)


def test_single_adapter_is_scaled_like_peft() -> None:
    ours, theirs = shared_twins(2)
    combine_both(ours, theirs, {"y": -2.0}, "svd", name="neg")  # one source: always "linear", as in PEFT
    for name, layer in adapted_layers(ours, "neg").items():
        torch.testing.assert_close(layer.delta_weight("neg"), -2.0 * layer.delta_weight("y"), **TIGHT)
        torch.testing.assert_close(layer.delta_weight("neg"), peft_delta(theirs, name, "neg"), **TIGHT)
    assert_same_factors(ours, theirs, "neg")
    assert lorakit.adapter_configs(ours)["neg"].r == 2


@pytest.mark.parametrize("method", ["cat", "svd"])
def test_rslora_sources_give_exact_sum_where_peft_scales_by_sqrt_r(method: str) -> None:
    ours, theirs = shared_twins(2, rslora=True)
    rank = 6
    combine_both(ours, theirs, WEIGHTS, method, svd_rank=rank)
    for name, layer in adapted_layers(ours, "xy").items():
        torch.testing.assert_close(layer.delta_weight("xy"), weighted_delta(layer, WEIGHTS), **LOOSE)
        # peft 0.21 keeps use_rslora with alpha = r, so its combined update is sqrt(r) times too large
        expected_peft = math.sqrt(rank) * layer.delta_weight("xy")
        torch.testing.assert_close(peft_delta(theirs, name, "xy"), expected_peft, **LOOSE)
    assert lorakit.adapter_configs(ours)["xy"].use_rslora is False


def test_rank_pattern_sources_are_padded_to_the_config_rank() -> None:
    kwargs_x = {"r": 2, "target_modules": ["q_proj", "v_proj"], "rank_pattern": {"v_proj": 4},
                "init_lora_weights": False}
    kwargs_y = {"r": 4, "target_modules": ["v_proj"], "init_lora_weights": False}
    ours, theirs = twin_models(kwargs_x, kwargs_y)
    combine_both(ours, theirs, WEIGHTS, "cat")
    q_proj = ours.model.layers[0].self_attn.q_proj
    assert q_proj.lora_A["xy"].weight.shape == (8, 32)  # rank 2 of "x", zero-padded to 4 + 4
    for name, layer in adapted_layers(ours, "xy").items():
        torch.testing.assert_close(layer.delta_weight("xy"), weighted_delta(layer, WEIGHTS), **TIGHT)
        torch.testing.assert_close(layer.delta_weight("xy"), peft_delta(theirs, name, "xy"), **TIGHT)


def test_new_adapter_is_inactive_frozen_and_covers_the_union() -> None:
    ours, _ = shared_twins(2)
    lorakit.set_adapter(ours, "x")
    before = logits(ours)
    trainable = {name for name, p in ours.named_parameters() if p.requires_grad}
    combine_adapters(ours, WEIGHTS, "xy", "cat")
    assert lorakit.active_adapters(ours) == ["x"]
    assert {name for name, p in ours.named_parameters() if p.requires_grad} == trainable
    torch.testing.assert_close(logits(ours), before, atol=0, rtol=0)
    union = set(adapted_layers(ours, "x")) | set(adapted_layers(ours, "y"))
    assert set(adapted_layers(ours, "xy")) == union
    config = lorakit.adapter_configs(ours)["xy"]
    assert (config.r, config.lora_alpha, config.use_dora) == (6, 6, False)
    assert sorted(config.target_modules) == sorted(union)


def test_combined_adapter_saves_and_loads_in_peft(tmp_path: Path) -> None:
    ours, _ = shared_twins(2)
    combine_adapters(ours, WEIGHTS, "xy", "svd")
    io.save_adapter(ours, tmp_path, "xy")
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    lorakit.set_adapter(ours, "xy")
    torch.testing.assert_close(logits(loaded), logits(ours), atol=1e-5, rtol=0)


def snapshot(model: nn.Module) -> dict[str, Any]:
    return {"state": {k: v.clone() for k, v in model.state_dict().items()},
            "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
            "configs": copy.deepcopy(lorakit.adapter_configs(model)),
            "active": lorakit.active_adapters(model)}


@pytest.mark.parametrize(("weights", "name", "method", "message"), [
    ({"x": 0.5, "y": 0.5}, "xy", "linear", "equal rank"),
    ({"x": 0.5, "nope": 0.5}, "xy", "cat", "no adapter named 'nope'"),
    ({"x": 0.5, "y": float("nan")}, "xy", "cat", "finite number"),
    ({"x": 0.5, "y": 0.5}, "x", "cat", "'x' already exists"),
    ({"x": 0.5, "y": 0.5}, "x.y", "cat", "contain no '.'"),
    ({"x": 0.5, "y": 0.5}, "half", "cat", "attribute of torch modules"),
    ({"x": 0.5, "y": 0.5}, "xy", "magic", "unknown combination method"),
    ({}, "xy", "cat", "at least one"),
])
def test_bad_requests_leave_model_unchanged(weights: dict[str, float], name: str, method: str,
                                            message: str) -> None:
    ours, _ = shared_twins(2)
    before = snapshot(ours)
    with pytest.raises(ValueError, match=message):
        combine_adapters(ours, weights, name, method)  # type: ignore[arg-type]
    after = snapshot(ours)
    assert (after["modules"], after["configs"], after["active"]) == (
        before["modules"], before["configs"], before["active"])
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][key], value) for key, value in before["state"].items())


def test_linear_with_unequal_ranks_in_one_layer_is_refused() -> None:
    # Equal config ranks (PEFT's check) but rank 2 vs 4 in q_proj: refused before anything is added.
    kwargs_x = {"r": 4, "target_modules": ["q_proj", "v_proj"], "rank_pattern": {"q_proj": 2}}
    kwargs_y = {"r": 4, "target_modules": ["q_proj"]}
    ours, _ = twin_models(kwargs_x, kwargs_y)
    with pytest.raises(ValueError, match="equal ranks in every layer"):
        combine_adapters(ours, WEIGHTS, "xy", "linear")
    assert sorted(lorakit.adapter_configs(ours)) == ["x", "y"]
    assert not adapted_layers(ours, "xy")


def test_dora_is_refused() -> None:
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=2, target_modules=["q_proj"]), "x")
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), "d")
    with pytest.raises(ValueError, match="DoRA"):
        combine_adapters(model, {"x": 1.0, "d": 1.0}, "xd", "cat")
    assert sorted(lorakit.adapter_configs(model)) == ["d", "x"]


def test_trained_head_of_the_one_source_that_has_it_is_copied() -> None:
    # PEFT gives the combined adapter an untrained copy of the original head; lorakit takes the trained one.
    head_config = lorakit.LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS",
                                     init_lora_weights=False)
    model = lorakit.inject(tiny_bert(), head_config, "x")
    no_head = lorakit.LoraConfig(r=2, target_modules=["value"], init_lora_weights=False)
    lorakit.add_adapter(model, no_head, "y")
    head = model.classifier
    with torch.no_grad():
        head.modules_to_save["x"].weight.add_(1.0)
    combine_adapters(model, {"x": 0.5, "y": 0.5}, "xy", "cat")
    assert torch.equal(head.modules_to_save["xy"].weight, head.modules_to_save["x"].weight)
    assert torch.equal(head.modules_to_save["xy"].bias, head.modules_to_save["x"].bias)

    lorakit.add_adapter(model, head_config, "z")
    with pytest.raises(ValueError, match="each train their own copy of 'classifier'"):
        combine_adapters(model, {"x": 0.5, "z": 0.5}, "xz", "cat")
    assert "xz" not in lorakit.adapter_configs(model)
