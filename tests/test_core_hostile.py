"""The core under realistic abuse: each test fails on the behaviour it guards against."""

from __future__ import annotations

import copy
import functools
import warnings
from pathlib import Path

import pytest
import torch
from conftest import tiny_bert, tiny_llama, token_ids
from torch import nn

import lorakit
from lorakit import LoraConfig, adapter_files, atomic
from lorakit.base_weights import dequantize_weight
from lorakit.layers import LoraLinear
from lorakit.modules_to_save import ModulesToSave
from lorakit.train.lean_activations import LeanActivations


def _dropout_model(tmp_path: Path) -> tuple[nn.Module, Path]:
    trained = tiny_llama()
    lorakit.inject(trained, LoraConfig(r=4, lora_dropout=0.3, target_modules=["q_proj", "v_proj"],
                                       init_lora_weights=False))
    lorakit.save_adapter(trained, tmp_path / "adapter")
    return tiny_llama(), tmp_path / "adapter"


def test_loaded_adapter_is_deterministic_in_eval_mode(tmp_path: Path) -> None:
    model, folder = _dropout_model(tmp_path)
    assert not model.training
    lorakit.load_adapter(model, folder)
    ids = token_ids()
    with torch.no_grad():
        first, second = model(ids).logits, model(ids).logits
    assert torch.equal(first, second)
    greedy = [model.generate(ids, max_new_tokens=5, do_sample=False) for _ in range(2)]
    assert torch.equal(greedy[0], greedy[1])
    # and dropout is back as soon as the user trains
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, model(ids).logits)


def test_new_wrappers_and_adapters_take_the_wrapped_modules_mode() -> None:
    model = tiny_llama()  # eval
    lorakit.inject(model, LoraConfig(r=2, lora_dropout=0.5, target_modules=["q_proj"]))
    lorakit.add_adapter(model, LoraConfig(r=2, lora_dropout=0.5, target_modules=["q_proj"]), "other")
    for module in model.modules():
        if isinstance(module, LoraLinear):
            assert not any(m.training for m in module.modules())
    training = tiny_llama().train()
    lorakit.inject(training, LoraConfig(r=2, lora_dropout=0.5, target_modules=["q_proj"]))
    assert all(m.training for m in training.modules())


@pytest.mark.parametrize("action", ["merge", "unmerge", "load_adapter", "delete_adapter", "save_adapter",
                                    "merge_and_unload"])
def test_changing_adapters_inside_a_mixed_block_raises(action: str, tmp_path: Path) -> None:
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), "a")
    lorakit.add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), "b")
    lorakit.save_adapter(model, tmp_path / "saved", "a")
    before = copy.deepcopy(model.state_dict())
    calls = {
        "merge": lambda: lorakit.merge(model),
        "unmerge": lambda: lorakit.unmerge(model),
        "load_adapter": lambda: lorakit.load_adapter(model, tmp_path / "saved", "c"),
        "delete_adapter": lambda: lorakit.delete_adapter(model, "b"),
        "save_adapter": lambda: lorakit.save_adapter(model, tmp_path / "again", "a"),
        "merge_and_unload": lambda: lorakit.merge_and_unload(model),
    }
    ids = token_ids()
    with lorakit.adapter_per_row(model, ["a", "b"]):
        with pytest.raises(RuntimeError, match="inside a mixed-adapter batch"):
            calls[action]()
        mixed = model(ids).logits
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    lorakit.set_adapter(model, "a")
    with torch.no_grad():
        assert torch.allclose(mixed[0], model(ids).logits[0], atol=1e-6)


def test_disable_adapters_leaves_a_merged_half_precision_model_bit_identical() -> None:
    model = tiny_llama(dtype=torch.bfloat16)
    lorakit.inject(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lorakit.merge(model)
    merged = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(3):
        with lorakit.disable_adapters(model):
            model(token_ids())
    for key, value in model.state_dict().items():
        assert torch.equal(value, merged[key]), key  # re-merging would round bf16 once more each time
    lorakit.unmerge(model)  # and the merge bookkeeping came back with the weights
    assert not any(layer.merged_adapters for layer in model.modules() if isinstance(layer, LoraLinear))


def test_lean_activations_keep_an_instance_level_forward() -> None:
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(r=2, target_modules=["q_proj"]))
    lorakit.set_adapter(model, "default")
    head = model.lm_head
    calls = []

    def hooked(module: nn.Module, x: torch.Tensor) -> torch.Tensor:  # as accelerate's hooks wrap forward
        calls.append(1)
        return type(module).forward(module, x)

    head.forward = functools.partial(hooked, head)
    patched = head.forward
    with LeanActivations(model):
        model(token_ids()).logits.sum().backward()
    assert calls, "the instance's own forward was bypassed"
    assert head.forward is patched, "the instance's own forward was removed"


def test_modules_to_save_with_two_active_copies_warns() -> None:
    model = tiny_bert()
    config = LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS")
    lorakit.inject(model, config, "a")
    lorakit.add_adapter(model, config, "b")
    lorakit.set_adapter(model, ["a", "b"])
    with pytest.warns(UserWarning, match=r"\['a', 'b'\].*only 'a'"):
        model(token_ids())
    wrappers = [m for m in model.modules() if isinstance(m, ModulesToSave)]
    assert wrappers and wrappers[0].active_module() is not None


def test_misspelt_config_keys_are_reported_and_unknown_ones_warned() -> None:
    with pytest.raises(ValueError, match="did you mean 'lora_alpha'"):
        LoraConfig.from_dict({"r": 8, "lora_alpah": 32})
    with pytest.raises(ValueError, match="did you mean 'target_modules'"):
        LoraConfig.from_dict({"target_module": ["q_proj"]})
    with pytest.warns(UserWarning, match="a_field_from_the_future"):
        config = LoraConfig.from_dict({"r": 4, "a_field_from_the_future": 1})
    assert config.r == 4
    from peft import LoraConfig as PeftLoraConfig

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PEFT's own fields are known, not warned about
        LoraConfig.from_dict(PeftLoraConfig(r=4, target_modules=["q_proj"]).to_dict())


def test_save_adapter_cleans_what_killed_saves_left(tmp_path: Path) -> None:
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(r=2, target_modules=["q_proj"]))
    target = tmp_path / "adapter"
    lorakit.save_adapter(model, target)
    dead = 2**22 + 12345  # above the default pid_max: no such process
    for i in range(5):
        leftover = tmp_path / f".adapter.lorakit-tmp-{dead}-{i:012d}"
        leftover.mkdir()
        (leftover / adapter_files.WEIGHTS_NAME).write_bytes(b"\0" * 10_000)
    lorakit.save_adapter(model, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert sorted(p.name for p in target.iterdir()) == [adapter_files.CONFIG_NAME, adapter_files.WEIGHTS_NAME]
    assert atomic._alive(dead) is False


def test_save_into_a_run_folder_keeps_its_other_files(tmp_path: Path) -> None:
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(r=2, target_modules=["q_proj"]))
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "checkpoints").mkdir()
    lorakit.save_adapter(model, tmp_path)
    assert (tmp_path / "metrics.jsonl").read_text() == "{}\n"
    assert (tmp_path / "checkpoints").is_dir()


bitsandbytes = pytest.importorskip("bitsandbytes")


def _nf4_linear(features: int = 64) -> nn.Module:
    torch.manual_seed(0)
    dense = nn.Linear(features, features, bias=False)
    layer = bitsandbytes.nn.Linear4bit(features, features, bias=False, quant_type="nf4",
                                       compute_dtype=torch.bfloat16)
    layer.weight = bitsandbytes.nn.Params4bit(dense.weight.data.clone(), requires_grad=False,
                                              quant_type="nf4")
    return layer.to("cpu")


def test_dequantized_weight_leaves_the_4bit_module_as_it_is() -> None:
    model = nn.Sequential(_nf4_linear()).eval()
    state = model[0].weight.quant_state
    canonical = bitsandbytes.functional.dequantize_4bit(model[0].weight.data, state).float()
    assert torch.equal(dequantize_weight(model[0]), canonical)
    lorakit.inject(model, LoraConfig(r=4, target_modules=["0"], use_dora=True, init_lora_weights=False))
    x = torch.randn(2, 64)
    with torch.no_grad():
        model(x)  # bitsandbytes may repack the weight for its CPU kernel here (bf16 block scales)
    layer = model[0].base_layer
    packed = getattr(layer.weight.quant_state, "packing_format_for_cpu", None)
    data = layer.weight.data.data_ptr()
    weights = []
    with torch.no_grad():
        for _ in range(3):
            model(x)  # a DoRA forward reads the dense weight: it must not undo the packing
            weights.append(dequantize_weight(layer))
    assert layer.weight.data.data_ptr() == data
    assert getattr(layer.weight.quant_state, "packing_format_for_cpu", None) == packed
    assert all(torch.equal(w, weights[0]) for w in weights)
    assert torch.allclose(weights[0], canonical, rtol=1e-2, atol=1e-3)  # bf16 block scales at most


def test_the_cli_shows_library_warnings_and_logs(capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import logging

    from lorakit.cli import main
    from lorakit.peft_format import lora_config_from_peft

    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    logger = logging.getLogger("lorakit")
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(logger, "level", logger.level)
    main.show_library_messages()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        # raised inside lorakit (the reader of adapter configs), as a command meets it
        lora_config_from_peft({"peft_type": "LORA", "r": 4, "a_field_from_the_future": 1})
    logging.getLogger("lorakit.adapter_files").info("a note for the user")
    err = capsys.readouterr().err
    assert "lorakit: warning: LoraConfig fields lorakit does not know were ignored" in err
    assert "lorakit: a note for the user" in err


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_olora_with_a_rank_above_the_layer_is_a_clear_error(init: str) -> None:
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"init_lora_weights='.*' needs r <= 16, got r=40"):
        lorakit.inject(model, LoraConfig(r=40, target_modules=["k_proj"], init_lora_weights=init))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
