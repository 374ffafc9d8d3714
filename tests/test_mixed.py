"""Mixed-adapter batches: every row equals running it alone with its adapter (and peft's mixed batches)."""

from __future__ import annotations

import peft
import pytest
import torch
from conftest import tiny_bert, tiny_llama, token_ids
from torch import nn

import lorakit
from lorakit import LoraConfig
from lorakit.layers import LoraEmbedding, LoraLinear
from lorakit.routing import route_of

PREFIX = "base_model.model."


def _perturb_magnitudes_and_heads(model: nn.Module) -> None:
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_magnitude_vector" in name or ".modules_to_save." in name:
                parameter.mul_(torch.linspace(0.6, 1.4, parameter.numel()).view(parameter.shape))


def _llama_with_five_adapters() -> nn.Module:
    """Adapters of different ranks and targets: LoRA, all-linear rsLoRA, partial, DoRA, embedding."""
    model = lorakit.inject(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                    init_lora_weights=False), "a")
    extra = {
        "b": LoraConfig(r=8, lora_alpha=4, target_modules="all-linear", use_rslora=True,
                        init_lora_weights=False),
        "c": LoraConfig(r=2, target_modules=["down_proj"], layers_to_transform=[1], init_lora_weights=False),
        "d": LoraConfig(r=4, target_modules=["q_proj", "o_proj"], use_dora=True, init_lora_weights=False),
        "e": LoraConfig(r=3, target_modules=["embed_tokens", "k_proj"], init_lora_weights=False),
    }
    for name, config in extra.items():
        lorakit.add_adapter(model, config, name)
    _perturb_magnitudes_and_heads(model)
    return model


def _alone(model: nn.Module, name: str | None, ids: torch.Tensor) -> torch.Tensor:
    """Logits of ``ids`` with only adapter ``name`` active (None: the base model)."""
    with torch.no_grad():
        if name is None:
            with lorakit.disable_adapters(model):
                return model(ids).logits
        lorakit.set_adapter(model, name)
        return model(ids).logits


ROWS = ["a", None, "b", "c", "d", "e", "a", "d"]


def test_every_row_equals_its_single_adapter_run():
    model = _llama_with_five_adapters()
    ids = token_ids(batch=len(ROWS), length=6)
    with torch.no_grad(), lorakit.adapter_per_row(model, ROWS):
        mixed = model(ids).logits
    outputs = [_alone(model, name, ids[i : i + 1]) for i, name in enumerate(ROWS)]
    for i, (name, expected) in enumerate(zip(ROWS, outputs)):
        torch.testing.assert_close(mixed[i : i + 1], expected, rtol=0, atol=1e-5, msg=f"row {i} ({name})")
    # the rows really differ from each other, so the comparison above can tell adapters apart
    assert not torch.allclose(outputs[0], _alone(model, "b", ids[:1]), atol=1e-3)
    assert all(not route_of(layer) for layer in model.modules() if isinstance(layer, LoraLinear))


def test_modules_to_save_heads_per_row():
    model = lorakit.inject(tiny_bert(), LoraConfig(r=4, target_modules=["query"], task_type="SEQ_CLS",
                                                   init_lora_weights=False), "x")
    lorakit.add_adapter(model, LoraConfig(r=2, target_modules=["value"], task_type="SEQ_CLS",
                                          init_lora_weights=False), "y")
    _perturb_magnitudes_and_heads(model)
    names = ["x", None, "y", "x"]
    ids = token_ids(batch=4)
    with torch.no_grad(), lorakit.adapter_per_row(model, names):
        mixed = model(ids).logits
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i : i + 1], _alone(model, name, ids[i : i + 1]), rtol=0, atol=1e-5)


def test_matches_peft_mixed_batches():
    """peft's own mixed-batch forward (``adapter_names=``) as an independent oracle."""
    first = {"r": 4, "target_modules": ["query", "value"], "task_type": "SEQ_CLS", "init_lora_weights": False}
    second = {"r": 8, "lora_alpha": 2, "target_modules": ["value", "dense"], "task_type": "SEQ_CLS",
              "init_lora_weights": False}
    ours = lorakit.inject(tiny_bert(), LoraConfig(**first), "x")
    lorakit.add_adapter(ours, LoraConfig(**second), "y")
    _perturb_magnitudes_and_heads(ours)
    theirs = peft.get_peft_model(tiny_bert(), peft.LoraConfig(**first), adapter_name="x")
    theirs.add_adapter("y", peft.LoraConfig(**second))
    theirs.eval()
    theirs_state = theirs.state_dict()
    with torch.no_grad():
        for key, value in ours.state_dict().items():
            if ".lora_" in key or ".modules_to_save." in key:
                theirs_state[PREFIX + key].copy_(value)
    ids = token_ids(batch=5)
    names = ["y", "x", None, "y", None]
    with torch.no_grad():
        expected = theirs(input_ids=ids, adapter_names=[n or "__base__" for n in names]).logits
        with lorakit.adapter_per_row(ours, names):
            actual = ours(ids).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def test_generate_each_row_as_if_alone():
    model = _llama_with_five_adapters()
    names = ["b", None, "d", "e"]
    ids = token_ids(batch=4, length=5)
    options = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad(), lorakit.adapter_per_row(model, names):
        mixed = model.generate(ids, attention_mask=torch.ones_like(ids), **options)
    for i, name in enumerate(names):
        row = ids[i : i + 1]
        with torch.no_grad():
            if name is None:
                with lorakit.disable_adapters(model):
                    alone = model.generate(row, attention_mask=torch.ones_like(row), **options)
            else:
                lorakit.set_adapter(model, name)
                alone = model.generate(row, attention_mask=torch.ones_like(row), **options)
        assert torch.equal(mixed[i], alone[0]), f"row {i} ({name})"


def test_wrong_batch_size_raises():
    model = _llama_with_five_adapters()
    three_rows = token_ids(batch=3)
    with lorakit.adapter_per_row(model, ["a", "b"]), pytest.raises(ValueError, match=r"2 names.*3 rows"):
        model(three_rows)


def test_unknown_adapter_raises():
    model = _llama_with_five_adapters()
    with pytest.raises(ValueError, match="'zz'"), lorakit.adapter_per_row(model, ["a", "zz"]):
        pass


def test_merged_adapters_raise():
    model = _llama_with_five_adapters()
    lorakit.set_adapter(model, "a")
    lorakit.merge(model)
    with pytest.raises(ValueError, match="unmerge"), lorakit.adapter_per_row(model, ["a", None]):
        pass


def test_no_python_loop_over_rows_or_adapters_in_the_layer_hot_path(monkeypatch):
    """Per layer, a mixed forward runs a fixed number of batched products and looks up no adapter by name,
    whatever the number of rows and adapters."""
    model = _llama_with_five_adapters()
    counts = {"batched products": 0, "lookups": 0}

    def counting(original, what):
        def run(*args, **kwargs):
            counts[what] += 1
            return original(*args, **kwargs)
        return run

    def run(names: list[str | None]) -> dict[str, int]:
        ids = token_ids(batch=len(names), length=4)
        with torch.no_grad(), lorakit.adapter_per_row(model, names):
            counts.update({"batched products": 0, "lookups": 0})
            with monkeypatch.context() as patch:
                patch.setattr(torch, "bmm", counting(torch.bmm, "batched products"))
                patch.setattr(torch.Tensor, "baddbmm_", counting(torch.Tensor.baddbmm_, "batched products"))
                patch.setattr(nn.ModuleDict, "__getitem__", counting(nn.ModuleDict.__getitem__, "lookups"))
                lookup = counting(nn.ParameterDict.__getitem__, "lookups")
                patch.setattr(nn.ParameterDict, "__getitem__", lookup)
                model(ids)
        return dict(counts)

    small = run(["a", None])
    large = run(["a", "b", "c", "d", "e", None, "b", "e", "a", "c"])
    linear = sum(isinstance(m, LoraLinear) for m in model.modules())
    embedding = sum(isinstance(m, LoraEmbedding) for m in model.modules())
    assert small == large == {"batched products": 2 * linear + embedding, "lookups": 0}


def test_every_edit_between_blocks_is_seen_even_through_data():
    """Stacks are built per block: an edit that bumps no version counter (``.data``) is not missed."""
    model = _llama_with_five_adapters()
    names = ["a", "b", "d", None]
    ids = token_ids(batch=4)
    layer = model.model.layers[0].self_attn.q_proj
    edits = [
        lambda: layer.lora_B["b"].weight.data.mul_(3.0),                                   # no version bump
        lambda: layer.lora_A["a"].weight.mul_(2.0).requires_grad_(True),                  # in place
        lambda: setattr(layer.lora_A["a"], "weight", nn.Parameter(layer.lora_A["a"].weight.detach() / 3)),
        lambda: layer.lora_magnitude_vector["d"].weight.data.mul_(1.5),                   # DoRA magnitude
        lambda: layer.base_layer.weight.data.add_(0.1),                    # the base (in the DoRA norm)
    ]
    for edit in edits:
        with torch.no_grad():
            edit()
            with lorakit.adapter_per_row(model, names):
                mixed = model(ids).logits
        for i, name in enumerate(names):
            alone = _alone(model, name, ids[i : i + 1])
            torch.testing.assert_close(mixed[i : i + 1], alone, rtol=0, atol=1e-5)


def test_changing_adapters_inside_a_block_raises(tmp_path):
    model = _llama_with_five_adapters()
    lorakit.save_adapter(model, tmp_path / "a", adapter_name="a")
    lorakit.set_adapter(model, "a")
    with lorakit.adapter_per_row(model, ["a", "b"]):
        for action in (lambda: lorakit.merge(model), lambda: lorakit.unmerge(model),
                       lambda: lorakit.delete_adapter(model, "b"),
                       lambda: lorakit.load_adapter(model, tmp_path / "a", adapter_name="again")):
            with pytest.raises(RuntimeError, match="mixed-adapter batch"):
                action()
    assert "b" in lorakit.adapter_configs(model) and "again" not in lorakit.adapter_configs(model)
    lorakit.merge(model)  # fine again after the block


def test_stacks_live_only_as_long_as_the_block():
    import gc
    import weakref

    model = _llama_with_five_adapters()
    layer = model.model.layers[0].self_attn.q_proj
    with lorakit.adapter_per_row(model, ["a", "b"]):
        stack = weakref.ref(route_of(layer).lora_B)
    gc.collect()
    assert stack() is None  # nothing keeps the block's stacks (no module-level cache)
    assert not hasattr(layer, "row_plan")


def test_blocks_do_not_nest_and_state_is_cleared_on_exit():
    model = _llama_with_five_adapters()
    with lorakit.adapter_per_row(model, ["a"]):
        with pytest.raises(RuntimeError, match="nest"), lorakit.adapter_per_row(model, ["b"]):
            pass
        assert all(route_of(layer) is not None for layer in model.modules() if isinstance(layer, LoraLinear))
    assert all(route_of(layer) is None for layer in model.modules() if isinstance(layer, LoraLinear))
