"""TIES, DARE-linear and DARE-TIES in combine_adapters against peft's add_weighted_adapter.

TIES is deterministic: same factors and outputs as peft. DARE's masks are random: the task merge is
compared with peft's merge_utils under one seed (same masks, bit for bit), whole adapters statistically
(mean over seeds), and the kept fraction and rescaling directly.
"""

from __future__ import annotations

import pytest
import torch
from peft.utils import merge_utils
from test_combine import TIGHT, adapted_layers, logits, peft_adapted_layers, shared_twins

import lorakit
from lorakit.combine import _merge_task_tensors, combine_adapters

WEIGHTS = {"x": 0.7, "y": 0.4}
METHODS = ("ties", "dare_linear", "dare_ties")


@pytest.mark.parametrize("sign_method", ["total", "frequency"])
def test_ties_same_factors_and_outputs_as_peft(sign_method: str) -> None:
    for rslora in (False, True):  # rsLoRA: the sources' scales enter the weights and differ from alpha/r
        ours, theirs = shared_twins(rank_y=4, rslora=rslora)
        theirs.add_weighted_adapter(list(WEIGHTS), list(WEIGHTS.values()), "z", combination_type="ties",
                                    density=0.5, majority_sign_method=sign_method)
        combine_adapters(ours, WEIGHTS, "z", "ties", density=0.5, majority_sign_method=sign_method)
        peft_modules = dict(theirs.base_model.model.named_modules())
        layers = adapted_layers(ours, "z")
        assert set(layers) == set(peft_adapted_layers(theirs, "z"))
        for path, layer in layers.items():
            for mine, peft_factor in zip(factors(layer), factors(peft_modules[path])):
                torch.testing.assert_close(mine, peft_factor, **TIGHT)
        if not rslora:  # peft keeps use_rslora on the result (scale sqrt(r)); lorakit makes its scale 1
            lorakit.set_adapter(ours, ["z"])
            theirs.set_adapter("z")
            torch.testing.assert_close(logits(ours), logits(theirs), **TIGHT)


def factors(layer: object) -> tuple[torch.Tensor, torch.Tensor]:
    if "z" in getattr(layer, "lora_embedding_A", {}):
        return layer.lora_embedding_A["z"], layer.lora_embedding_B["z"]  # type: ignore[attr-defined]
    return layer.lora_A["z"].weight, layer.lora_B["z"].weight  # type: ignore[attr-defined]


@pytest.mark.parametrize("sign_method", ["total", "frequency"])
@pytest.mark.parametrize("method", METHODS)
def test_same_masks_as_peft_merge_utils(method: str, sign_method: str) -> None:
    """peft's add_weighted_adapter draws the new adapter's init from the global RNG before DARE's masks, so
    the layer-level streams cannot be aligned; the task merge itself is compared under one seed."""
    generator = torch.Generator().manual_seed(3)
    tensors = [torch.randn(16, 8, generator=generator) for _ in range(3)]
    weights = [0.8, -0.5, 0.3]
    peft_merge = getattr(merge_utils, method)
    extra = {} if method == "dare_linear" else {"majority_sign_method": sign_method}
    torch.manual_seed(11)
    expected = peft_merge(tensors, torch.tensor(weights), 0.4, **extra)
    torch.manual_seed(11)
    mine = _merge_task_tensors(tensors, weights, method, 0.4, sign_method)
    torch.testing.assert_close(mine, expected, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_layers_statistically_like_peft(method: str) -> None:
    """Mean and kept fraction of every merged factor over seeds: lorakit and peft agree."""
    ours_sum: dict[str, torch.Tensor] = {}
    theirs_sum: dict[str, torch.Tensor] = {}
    runs = 40
    for run in range(runs):
        ours, theirs = shared_twins(rank_y=4)
        torch.manual_seed(run)
        theirs.add_weighted_adapter(list(WEIGHTS), list(WEIGHTS.values()), "z", combination_type=method,
                                    density=0.5)
        combine_adapters(ours, WEIGHTS, "z", method, density=0.5, seed=1000 + run)
        peft_modules = dict(theirs.base_model.model.named_modules())
        for path, layer in adapted_layers(ours, "z").items():
            for part, mine, peft_factor in zip("AB", factors(layer), factors(peft_modules[path])):
                key = f"{path}.{part}"
                ours_sum[key] = ours_sum.get(key, 0) + mine.detach()
                theirs_sum[key] = theirs_sum.get(key, 0) + peft_factor.detach()
    for key in ours_sum:
        mine, peft_mean = ours_sum[key] / runs, theirs_sum[key] / runs
        scale = float(peft_mean.abs().mean())
        # Each entry is a mean of 40 draws; compare the layer-wide average deviation against its scale.
        assert float((mine - peft_mean).abs().mean()) < 0.25 * scale, key


def test_seed_makes_dare_independent_of_the_global_rng() -> None:
    ours, _ = shared_twins(rank_y=4)
    torch.manual_seed(1)
    combine_adapters(ours, WEIGHTS, "a1", "dare_ties", density=0.3, seed=5)
    torch.manual_seed(2)
    combine_adapters(ours, WEIGHTS, "a2", "dare_ties", density=0.3, seed=5)
    torch.manual_seed(3)
    combine_adapters(ours, WEIGHTS, "a3", "dare_ties", density=0.3, seed=6)
    compared = 0
    for layer in adapted_layers(ours, "a1").values():
        if hasattr(layer, "lora_A") and "a1" in layer.lora_A:
            assert torch.equal(layer.lora_A["a1"].weight, layer.lora_A["a2"].weight)
            assert not torch.equal(layer.lora_A["a1"].weight, layer.lora_A["a3"].weight)
            compared += 1
    assert compared


def test_dare_keeps_a_density_fraction_rescaled() -> None:
    ours, _ = shared_twins(rank_y=4)
    combine_adapters(ours, {"x": 1.0}, "one", "dare_linear", density=0.3, seed=0)  # one source: linear
    ours2, _ = shared_twins(rank_y=4)
    # Two sources with one coefficient each; where only "y" adapts (k_proj), A = sqrt(c)·mask·A_y/0.3.
    combine_adapters(ours2, {"x": 1.0, "y": 1.0}, "two", "dare_linear", density=0.3, seed=0)
    kept, total = 0, 0
    for path, layer in adapted_layers(ours2, "two").items():
        if path.endswith("k_proj"):
            source = layer.lora_A["y"].weight * (layer.scaling["y"] ** 0.5) / 0.3
            merged = layer.lora_A["two"].weight
            nonzero = merged != 0
            torch.testing.assert_close(merged[nonzero], source[nonzero], **TIGHT)
            kept += int(nonzero.sum())
            total += merged.numel()
    assert total > 0 and abs(kept / total - 0.3) < 0.1


def test_bad_task_arguments() -> None:
    ours, _ = shared_twins(rank_y=4)
    with pytest.raises(ValueError, match="density"):
        combine_adapters(ours, WEIGHTS, "z", "ties")
    with pytest.raises(ValueError, match="density"):
        combine_adapters(ours, WEIGHTS, "z", "dare_ties", density=0.0)
    with pytest.raises(ValueError, match="majority_sign_method"):
        combine_adapters(ours, WEIGHTS, "z", "ties", density=0.5, majority_sign_method="vote")
    unequal, _ = shared_twins(rank_y=2)
    with pytest.raises(ValueError, match="equal rank"):
        combine_adapters(unequal, WEIGHTS, "z", "ties", density=0.5)
