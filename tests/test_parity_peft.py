"""lorakit against peft 0.21 on the same base model, config and adapter tensors.

lorakit's state-dict keys are peft's minus the ``base_model.model.`` prefix, so the adapter tensors are
copied across by name; both models must then give the same logits, the same trainable parameters and the
same counts as peft's ``get_nb_trainable_parameters()``.
"""

from __future__ import annotations

import peft
import pytest
import torch
from conftest import tiny_bert, tiny_gpt2, tiny_llama, token_ids
from torch import nn

import lorakit

PREFIX = "base_model.model."


def _is_adapter_key(key: str) -> bool:
    return ".lora_" in key or ".modules_to_save." in key


def _perturb(model: nn.Module) -> None:
    """Give DoRA magnitudes and modules_to_save copies values that differ from their initial ones."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_magnitude_vector" in name or ".modules_to_save." in name:
                parameter.mul_(torch.linspace(0.6, 1.4, parameter.numel()).view(parameter.shape))


def _pair(build, copy: bool = True, **config: object) -> tuple[nn.Module, nn.Module]:
    """(lorakit model, peft model) built from identical base models, lorakit's adapter tensors copied over."""
    ours = lorakit.inject(build(), lorakit.LoraConfig(**config))
    theirs = peft.get_peft_model(build(), peft.LoraConfig(**config))
    theirs.eval()
    ours_state = ours.state_dict()
    theirs_state = theirs.state_dict()
    assert sorted(ours_state) == sorted(k.removeprefix(PREFIX) for k in theirs_state)
    if copy:
        _perturb(ours)
        with torch.no_grad():
            for key, value in ours.state_dict().items():
                if _is_adapter_key(key):
                    theirs_state[PREFIX + key].copy_(value)
    return ours, theirs


def _assert_parity(ours: nn.Module, theirs: nn.Module, ids: torch.Tensor, atol: float = 1e-5) -> None:
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
        actual = ours(ids).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol)
    ours_trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    theirs_trainable = {n.removeprefix(PREFIX) for n, p in theirs.named_parameters() if p.requires_grad}
    assert ours_trainable == theirs_trainable
    assert lorakit.trainable_parameters(ours) == theirs.get_nb_trainable_parameters()


PARITY_CASES = {
    "lora": (tiny_llama, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}),
    "rslora": (tiny_llama, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "down_proj"],
                            "use_rslora": True}),
    "dora": (tiny_llama, {"r": 4, "lora_alpha": 8, "target_modules": ["k_proj", "up_proj"],
                          "use_dora": True}),
    "dora rslora": (tiny_llama, {"r": 2, "target_modules": ["o_proj"], "use_dora": True, "use_rslora": True}),
    "embedding": (tiny_llama, {"r": 4, "lora_alpha": 2, "target_modules": ["embed_tokens", "q_proj"]}),
    "rank and alpha pattern": (tiny_llama, {
        "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
        "rank_pattern": {"v_proj": 2, r"layers\.1\.mlp\.down_proj": 6},
        "alpha_pattern": {"q_proj": 3, "model.layers.0.mlp.down_proj": 12},
    }),
    "layers_to_transform": (tiny_llama, {"r": 4, "target_modules": ["q_proj", "gate_proj"],
                                         "layers_to_transform": [1], "layers_pattern": "layers"}),
    "exclude_modules": (tiny_llama, {"r": 4, "target_modules": "all-linear",
                                     "exclude_modules": ["down_proj", "layers.0.self_attn.q_proj"]}),
    "all-linear": (tiny_llama, {"r": 4, "lora_alpha": 16, "target_modules": "all-linear"}),
    "all-linear dora": (tiny_llama, {"r": 2, "target_modules": "all-linear", "use_dora": True}),
    "conv1d": (tiny_gpt2, {"r": 4, "target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": True}),
    "conv1d dora": (tiny_gpt2, {"r": 4, "target_modules": ["c_fc"], "fan_in_fan_out": True,
                                "use_dora": True}),
    "modules_to_save seq_cls": (tiny_bert, {"r": 4, "target_modules": ["query", "value"],
                                            "task_type": "SEQ_CLS"}),
    "modules_to_save explicit": (tiny_bert, {"r": 4, "target_modules": ["key"],
                                             "modules_to_save": ["pooler"]}),
    "bias all": (tiny_bert, {"r": 4, "target_modules": ["query", "dense"], "bias": "all",
                             "task_type": "SEQ_CLS"}),
    "bias lora_only": (tiny_bert, {"r": 4, "target_modules": ["query", "dense"], "bias": "lora_only"}),
    "bias all llama": (tiny_llama, {"r": 4, "target_modules": ["q_proj"], "bias": "all"}),
}


@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_same_logits_and_trainable_parameters_as_peft(case):
    build, config = PARITY_CASES[case]
    ours, theirs = _pair(build, init_lora_weights=False, **config)
    _assert_parity(ours, theirs, token_ids())


def test_bias_options_change_what_trains():
    """The bias cases above must differ from each other, or their parity would prove little."""
    counts = {}
    for bias in ("none", "all", "lora_only"):
        model = lorakit.inject(tiny_bert(), lorakit.LoraConfig(r=4, target_modules=["query"], bias=bias))
        counts[bias] = {n for n, p in model.named_parameters() if p.requires_grad}
    assert counts["none"] < counts["lora_only"] < counts["all"]
    query_biases = {f"bert.encoder.layer.{i}.attention.self.query.base_layer.bias" for i in range(2)}
    assert counts["lora_only"] - counts["none"] == query_biases


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_pissa_and_olora_match_peft_after_init(init, build):
    target = ["q_proj", "down_proj"] if build is tiny_llama else ["c_attn", "c_fc"]
    ours, theirs = _pair(build, copy=False, r=4, lora_alpha=8, target_modules=target, init_lora_weights=init,
                         fan_in_fan_out=build is tiny_gpt2)
    ids = token_ids()
    # The residual base plus the adapter reproduces the original model ...
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, build()(ids).logits, rtol=0, atol=1e-4)
    if init == "olora" and build is tiny_gpt2:
        return  # peft 0.21's OLoRA ignores fan_in_fan_out: on Conv1D its factors have the wrong shapes
    # ... with the same factors and the same residual base weights as peft's.
    theirs_state = theirs.state_dict()
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, theirs_state[PREFIX + key], rtol=0, atol=1e-5, msg=key)
    _assert_parity(ours, theirs, ids)


MERGE_CASES = ["lora", "dora", "embedding", "conv1d", "conv1d dora", "modules_to_save seq_cls"]


@pytest.mark.parametrize("case", MERGE_CASES)
def test_merge_and_unload_gives_peft_s_merged_weights(case):
    build, config = PARITY_CASES[case]
    ours, theirs = _pair(build, init_lora_weights=False, **config)
    ours = lorakit.merge_and_unload(ours)
    theirs = theirs.merge_and_unload()
    theirs_state = theirs.state_dict()
    assert list(ours.state_dict()) == list(theirs_state)
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, theirs_state[key], rtol=0, atol=1e-6, msg=key)


def test_multiple_active_lora_adapters_match_peft():
    ours, theirs = _pair(tiny_llama, init_lora_weights=False, r=4, target_modules=["q_proj", "v_proj"])
    second = {"r": 2, "lora_alpha": 6, "target_modules": ["v_proj", "up_proj"], "init_lora_weights": False}
    lorakit.add_adapter(ours, lorakit.LoraConfig(**second), "other")
    theirs.add_adapter("other", peft.LoraConfig(**second))
    theirs_state = theirs.state_dict()
    with torch.no_grad():
        for key, value in ours.state_dict().items():
            if ".other." in key:
                theirs_state[PREFIX + key].copy_(value)
    lorakit.set_adapter(ours, ["default", "other"])
    theirs.base_model.set_adapter(["default", "other"])
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(input_ids=ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("init", [True, "gaussian"])
def test_initial_factors_follow_peft_s_choice(init):
    """Which factor starts at zero, per layer type (the values themselves are random)."""
    ours, theirs = _pair(tiny_llama, copy=False, r=4, target_modules=["embed_tokens", "q_proj"],
                         init_lora_weights=init)
    theirs_state = theirs.state_dict()
    for key, value in ours.state_dict().items():
        if ".lora_" in key:
            assert bool((value == 0).all()) == bool((theirs_state[PREFIX + key] == 0).all()), key
