"""lorakit.io: PEFT-layout adapter files, checked against peft 0.21 (the parity oracle)."""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import pytest
import safetensors.torch
import torch
from conftest import tiny_gpt2, tiny_llama, token_ids
from safetensors import safe_open
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

import lorakit
from lorakit import adapter_files, atomic, io
from lorakit.adapter_layer import AdapterLayer

IDS = token_ids()


def tiny_bert() -> BertForSequenceClassification:
    """conftest's tiny BERT but with initializer_range 0.2: at the default 0.02 its logits are ~0.02 and an
    adapter moves them by less than 1e-3, too little for a 1e-5 comparison to mean much."""
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        vocab_size=128, max_position_embeddings=64, num_labels=3, initializer_range=0.2)
    return BertForSequenceClassification(config).eval()


# name -> (base model factory, LoraConfig keyword arguments shared by lorakit and peft)
CASES: dict[str, tuple[Callable[[], nn.Module], dict[str, Any]]] = {
    "lora": (tiny_llama, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}),
    "rslora": (tiny_llama, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
                            "use_rslora": True}),
    "dora": (tiny_llama, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "o_proj"], "use_dora": True}),
    "embedding": (tiny_llama, {"r": 4, "lora_alpha": 8, "target_modules": ["embed_tokens", "q_proj"]}),
    "all_linear": (tiny_llama, {"r": 2, "lora_alpha": 4, "target_modules": "all-linear"}),
    "patterns": (tiny_llama, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
                              "rank_pattern": {"v_proj": 2, "layers.1.self_attn.q_proj": 6},
                              "alpha_pattern": {"q_proj": 16, "down_proj": 3}}),
    "head_and_layers": (tiny_llama, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
                                     "modules_to_save": ["lm_head"], "layers_to_transform": [1]}),
    "seq_cls": (tiny_bert, {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"],
                            "task_type": "SEQ_CLS"}),
    "conv1d": (tiny_gpt2, {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_proj"]}),
    "bias_all": (tiny_bert, {"r": 4, "lora_alpha": 8, "target_modules": ["query"], "bias": "all",
                             "task_type": "SEQ_CLS"}),
    "bias_lora_only": (tiny_bert, {"r": 4, "lora_alpha": 8, "target_modules": ["query", "key"],
                                   "bias": "lora_only"}),
}


def perturb_trainable(model: nn.Module, seed: int = 3) -> None:
    """Give every trainable tensor (adapter, DoRA magnitude, head copy, trained biases) a new value."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in sorted(model.named_parameters()):
            if parameter.requires_grad:
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def lorakit_model(case: str) -> tuple[nn.Module, nn.Module]:
    """(pristine base, lorakit model with a trained-looking adapter "default") for ``case``."""
    factory, kwargs = CASES[case]
    base = factory()
    model = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(init_lora_weights=False, **kwargs))
    perturb_trainable(model)
    return base, model


def peft_model(case: str) -> tuple[nn.Module, nn.Module]:
    factory, kwargs = CASES[case]
    base = factory()
    config = peft.LoraConfig(init_lora_weights=False, **kwargs)
    model = peft.get_peft_model(copy.deepcopy(base), config).eval()
    perturb_trainable(model)
    return base, model


def file_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(directory / io.WEIGHTS_NAME), "pt") as handle:
        return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118


def peft_save(model: nn.Module, directory: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Setting save_embedding_layers to True ..."
        model.save_pretrained(str(directory))


def snapshot(model: nn.Module) -> dict[str, Any]:
    """What load_adapter could change: tensors, module types, grad flags, adapter configs, active list."""
    return {
        "state": {key: value.clone() for key, value in model.state_dict().items()},
        "modules": [(name, type(module).__name__) for name, module in model.named_modules()],
        "grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "configs": copy.deepcopy(lorakit.adapter_configs(model)),
        "active": lorakit.active_adapters(model),
    }


def assert_unchanged(model: nn.Module, before: dict[str, Any]) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key
    assert after["grad"] == before["grad"]
    assert after["configs"] == before["configs"]
    assert after["active"] == before["active"]


# --- parity with PEFT ----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_lorakit_file_loads_in_peft_with_same_logits(case: str, tmp_path: Path) -> None:
    base, model = lorakit_model(case)
    io.save_adapter(model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    expected = logits(model)
    assert not torch.allclose(expected, logits(base), atol=1e-3)  # the adapter does change the output
    torch.testing.assert_close(logits(loaded), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_file_loads_in_lorakit_with_same_logits(case: str, tmp_path: Path) -> None:
    base, model = peft_model(case)
    peft_save(model, tmp_path)
    loaded = copy.deepcopy(base)
    io.load_adapter(loaded, tmp_path)
    expected = logits(model)
    assert not torch.allclose(expected, logits(base), atol=1e-3)
    torch.testing.assert_close(logits(loaded), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_file_layout_equals_peft(case: str, tmp_path: Path) -> None:
    _, ours = lorakit_model(case)
    _, theirs = peft_model(case)
    io.save_adapter(ours, tmp_path / "lorakit")
    peft_save(theirs, tmp_path / "peft")
    assert file_shapes(tmp_path / "lorakit") == file_shapes(tmp_path / "peft")
    ours_config = json.loads((tmp_path / "lorakit" / io.CONFIG_NAME).read_text())
    peft_config = json.loads((tmp_path / "peft" / io.CONFIG_NAME).read_text())
    assert ours_config.keys() == peft_config.keys()
    # peft writes a set as a list in arbitrary order
    assert sorted(ours_config.pop("target_modules")) == sorted(peft_config.pop("target_modules"))
    assert ours_config == peft_config
    with safe_open(str(tmp_path / "lorakit" / io.WEIGHTS_NAME), "pt") as handle:
        assert handle.metadata() == {"format": "pt"}


def test_key_mapping_for_each_kind_of_tensor(tmp_path: Path) -> None:
    _, model = lorakit_model("dora")
    io.save_adapter(model, tmp_path)
    shapes = file_shapes(tmp_path)
    prefix = "base_model.model.model.layers.0.self_attn."
    assert shapes[prefix + "q_proj.lora_A.weight"] == (4, 32)
    assert shapes[prefix + "q_proj.lora_B.weight"] == (32, 4)
    assert shapes[prefix + "q_proj.lora_magnitude_vector"] == (32,)
    _, model = lorakit_model("embedding")
    io.save_adapter(model, tmp_path / "emb")
    shapes = file_shapes(tmp_path / "emb")
    assert shapes["base_model.model.model.embed_tokens.lora_embedding_A"] == (4, 128)
    assert shapes["base_model.model.model.embed_tokens.lora_embedding_B"] == (32, 4)
    # PEFT also writes a targeted embedding's base weights; lorakit does the same unless told not to
    assert shapes["base_model.model.model.embed_tokens.base_layer.weight"] == (128, 32)
    io.save_adapter(model, tmp_path / "emb_only", save_embedding_layers=False)
    assert "base_model.model.model.embed_tokens.base_layer.weight" not in file_shapes(tmp_path / "emb_only")
    _, model = lorakit_model("seq_cls")
    io.save_adapter(model, tmp_path / "cls")
    shapes = file_shapes(tmp_path / "cls")
    assert shapes["base_model.model.classifier.weight"] == (3, 32)
    assert shapes["base_model.model.classifier.bias"] == (3,)
    assert not any("modules_to_save" in key or "original_module" in key for key in shapes)


def test_config_loads_in_peft_without_warnings_and_has_peft_key_set(tmp_path: Path) -> None:
    _, model = lorakit_model("lora")
    io.save_adapter(model, tmp_path, base_model_name_or_path="tiny/llama")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peft.PeftConfig.from_pretrained(str(tmp_path))
    assert [str(w.message) for w in caught] == []
    assert isinstance(loaded, peft.LoraConfig)
    written = json.loads((tmp_path / io.CONFIG_NAME).read_text())
    assert written.keys() == peft.LoraConfig(r=4, target_modules=["q_proj"]).to_dict().keys()
    assert written["peft_type"] == "LORA"
    assert written["inference_mode"] is True
    assert written["base_model_name_or_path"] == "tiny/llama"
    assert (loaded.r, loaded.lora_alpha, set(loaded.target_modules)) == (4, 8, {"q_proj", "v_proj"})


def test_target_modules_written_as_leaves_only_when_they_are_exact(tmp_path: Path) -> None:
    def written(config: lorakit.LoraConfig) -> list[str]:
        model = lorakit.inject(tiny_llama(), config)
        return io.peft_config_dict(model)["target_modules"]

    assert written(lorakit.LoraConfig(target_modules=["self_attn.q_proj", "v_proj"])) == ["q_proj", "v_proj"]
    # the leaf "q_proj" would also select layer 1, so the full name is written
    assert written(lorakit.LoraConfig(target_modules=r"model\.layers\.0\.self_attn\.q_proj")) == [
        "model.layers.0.self_attn.q_proj"]
    # with layers_to_transform in the config, the leaf does select exactly layer 1 again
    assert written(lorakit.LoraConfig(target_modules=["q_proj"], layers_to_transform=[1])) == ["q_proj"]
    assert written(lorakit.LoraConfig(target_modules="all-linear")) == sorted(
        f"model.layers.{i}.{m}" for i in range(2) for m in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))


def test_regex_target_with_layers_to_transform_loads_in_peft(tmp_path: Path) -> None:
    # PEFT refuses a regex target_modules together with layers_to_transform; the written list is fine.
    base = tiny_llama()
    config = lorakit.LoraConfig(target_modules=r".*\.(q|v)_proj", layers_to_transform=[0],
                                init_lora_weights=False)
    model = lorakit.inject(copy.deepcopy(base), config)
    io.save_adapter(model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    torch.testing.assert_close(logits(loaded), logits(model), atol=1e-5, rtol=0)


# --- lorakit round trip ----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_is_exact(case: str, tmp_path: Path) -> None:
    base, model = lorakit_model(case)
    io.save_adapter(model, tmp_path)
    loaded = copy.deepcopy(base)
    io.load_adapter(loaded, tmp_path)
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert torch.equal(logits(loaded), logits(model))
    ours, theirs = lorakit.adapter_configs(model)["default"], lorakit.adapter_configs(loaded)["default"]
    assert (theirs.r, theirs.lora_alpha, theirs.bias, theirs.use_rslora, theirs.use_dora) == (
        ours.r, ours.lora_alpha, ours.bias, ours.use_rslora, ours.use_dora)
    assert (theirs.rank_pattern, theirs.alpha_pattern) == (ours.rank_pattern, ours.alpha_pattern)


def test_round_trip_of_a_second_adapter_under_another_name(tmp_path: Path) -> None:
    base, model = lorakit_model("lora")
    other = lorakit.LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights=False)
    lorakit.add_adapter(model, other, "other")
    io.save_adapter(model, tmp_path, "other")
    assert all(".k_proj." in key for key in file_shapes(tmp_path))
    loaded = copy.deepcopy(base)
    io.load_adapter(loaded, tmp_path, "renamed")
    lorakit.set_adapter(model, "other")
    torch.testing.assert_close(logits(loaded), logits(model), atol=0, rtol=0)


def test_state_dict_round_trip(tmp_path: Path) -> None:
    _, model = lorakit_model("seq_cls")
    saved = {key: value.clone() for key, value in io.adapter_state_dict(model).items()}
    assert "base_model.model.classifier.weight" in saved
    expected = logits(model)
    perturb_trainable(model, seed=11)
    assert not torch.allclose(logits(model), expected)
    io.load_adapter_state_dict(model, saved)
    assert torch.equal(logits(model), expected)


def test_state_dict_that_does_not_fit_changes_nothing() -> None:
    _, model = lorakit_model("lora")
    good = {key: value.clone() for key, value in io.adapter_state_dict(model).items()}
    before = snapshot(model)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    bad_cases = [
        ({k: v for k, v in good.items() if k != key}, "missing key .*q_proj.lora_A.weight"),
        ({**good, "base_model.model.model.norm.weight": torch.zeros(32)}, "unexpected key .*norm.weight"),
        ({**good, key: torch.zeros(3, 32)}, r"q_proj.lora_A.weight: shape \(3, 32\) in the file, \(4, 32\)"),
    ]
    for state, message in bad_cases:
        state = {k: v + 1 if k != key else v for k, v in state.items()}  # any copy would show
        with pytest.raises(ValueError, match=message):
            io.load_adapter_state_dict(model, state)
        assert_unchanged(model, before)


# --- activation and training flags ------------------------------------------------------------------------


def test_first_adapter_active_later_inactive_and_frozen_unless_trainable(tmp_path: Path) -> None:
    base, model = lorakit_model("lora")
    io.save_adapter(model, tmp_path)
    loaded = copy.deepcopy(base)
    io.load_adapter(loaded, tmp_path, "a")
    assert lorakit.active_adapters(loaded) == ["a"]
    assert lorakit.trainable_parameters(loaded)[0] == 0
    io.load_adapter(loaded, tmp_path, "b")
    assert lorakit.active_adapters(loaded) == ["a"]
    assert sorted(lorakit.adapter_configs(loaded)) == ["a", "b"]
    assert lorakit.trainable_parameters(loaded)[0] == 0
    io.load_adapter(loaded, tmp_path, "c", is_trainable=True)
    trainable = {name for name, p in loaded.named_parameters() if p.requires_grad}
    assert trainable and all(".c." in f".{name}" for name in trainable)
    assert lorakit.active_adapters(loaded) == ["a"]

    fresh = copy.deepcopy(base)
    io.load_adapter(fresh, tmp_path, is_trainable=True)
    assert lorakit.trainable_parameters(fresh)[0] == lorakit.trainable_parameters(model)[0] > 0


def test_unknown_peft_fields_are_ignored(tmp_path: Path) -> None:
    base, model = lorakit_model("lora")
    io.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / io.CONFIG_NAME).read_text())
    config["a_field_from_the_future"] = {"x": 1}
    (tmp_path / io.CONFIG_NAME).write_text(json.dumps(config))
    loaded = copy.deepcopy(base)
    io.load_adapter(loaded, tmp_path)
    torch.testing.assert_close(logits(loaded), logits(model), atol=0, rtol=0)


# --- atomic writes ----------------------------------------------------------------------------------------


def test_crash_while_writing_weights_keeps_previous_adapter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, model = lorakit_model("lora")
    io.save_adapter(model, tmp_path)
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    perturb_trainable(model, seed=5)

    def crash(tensors: dict[str, torch.Tensor], filename: str, metadata: dict[str, str] | None = None
              ) -> None:
        Path(filename).write_bytes(b"half a header")  # a partial write, then the process "dies"
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        io.save_adapter(model, tmp_path)
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before


def test_crash_while_replacing_keeps_previous_adapter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, model = lorakit_model("lora")
    io.save_adapter(model, tmp_path)
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    perturb_trainable(model, seed=5)

    def crash(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic, "_swap_into_place", crash)
    with pytest.raises(KeyboardInterrupt):
        io.save_adapter(model, tmp_path)
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before


def test_save_replaces_files_and_leaves_no_temporaries(tmp_path: Path) -> None:
    base, model = lorakit_model("lora")
    io.save_adapter(model, tmp_path / "new" / "nested")
    perturb_trainable(model, seed=5)
    io.save_adapter(model, tmp_path / "new" / "nested")
    written = sorted(path.name for path in (tmp_path / "new" / "nested").iterdir())
    assert written == [io.CONFIG_NAME, io.WEIGHTS_NAME]
    umask = os.umask(0)
    os.umask(umask)
    for path in (tmp_path / "new" / "nested").iterdir():
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    loaded = copy.deepcopy(base)
    io.load_adapter(loaded, tmp_path / "new" / "nested")
    assert torch.equal(logits(loaded), logits(model))


def test_save_refuses_unknown_adapter_and_file_target(tmp_path: Path) -> None:
    _, model = lorakit_model("lora")
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        io.save_adapter(model, tmp_path, "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        io.save_adapter(model, tmp_path / "file")


# --- bad files never change the model ---------------------------------------------------------------------


def _edit_config(**changes: Any) -> Callable[[Path], None]:
    def edit(directory: Path) -> None:
        config = json.loads((directory / io.CONFIG_NAME).read_text())
        config.update(changes)
        (directory / io.CONFIG_NAME).write_text(json.dumps(config))

    return edit


def _edit_tensors(edit: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        tensors = safetensors.torch.load_file(str(directory / io.WEIGHTS_NAME))
        edit(tensors)
        safetensors.torch.save_file(tensors, str(directory / io.WEIGHTS_NAME))

    return apply


def _truncate(directory: Path) -> None:
    data = (directory / io.WEIGHTS_NAME).read_bytes()
    (directory / io.WEIGHTS_NAME).write_bytes(data[: len(data) // 2])


Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
STRAY = "base_model.model.model.x.q_proj.lora_A.weight"

BAD_FILES: dict[str, tuple[Callable[[Path], None], type[Exception], str]] = {
    "no_config": (lambda d: (d / io.CONFIG_NAME).unlink(), FileNotFoundError, "json is missing"),
    "no_weights": (lambda d: (d / io.WEIGHTS_NAME).unlink(), FileNotFoundError, "safetensors is missing"),
    "truncated": (_truncate, ValueError, "not a readable safetensors file"),
    "garbage": (lambda d: (d / io.WEIGHTS_NAME).write_bytes(b"\x00" * 64), ValueError, "not a readable"),
    "empty": (lambda d: (d / io.WEIGHTS_NAME).write_bytes(b""), ValueError, "not a readable safetensors"),
    "bad_json": (lambda d: (d / io.CONFIG_NAME).write_text("{"), ValueError, "not valid JSON"),
    "not_lora": (_edit_config(peft_type="IA3"), ValueError, "peft_type is 'IA3'"),
    "lora_bias": (_edit_config(lora_bias=True), ValueError, "lora_bias"),
    "bad_rank": (_edit_config(r=0), ValueError, "invalid LoRA config"),
    "base_rewriting_init": (_edit_config(init_lora_weights="corda"), ValueError, "corda"),
    "missing_key": (_edit_tensors(lambda t: t.pop(Q_A)), ValueError, "missing key " + Q_A),
    "unexpected_key": (_edit_tensors(lambda t: t.update({STRAY: t[Q_A] * 1})), ValueError,
                       "unexpected key " + STRAY),
    "unprefixed_key": (_edit_tensors(lambda t: t.update({"model.norm.weight": torch.ones(32)})),
                       ValueError, "unexpected key model.norm.weight"),
    "shape": (_edit_tensors(lambda t: t.update({Q_A: torch.zeros(4, 31)})), ValueError,
              r"q_proj.lora_A.weight: shape \(4, 31\) in the file, \(4, 32\) in the model"),
    "rank_in_config": (_edit_config(r=8), ValueError, r"shape \(4, 32\) in the file, \(8, 32\) in the model"),
    "other_architecture": (_edit_config(target_modules=["c_attn"]), ValueError,
                           "does not fit this LlamaForCausalLM.*'c_attn' matches no module"),
}


@pytest.mark.parametrize("with_existing_adapter", [False, True])
@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_leaves_model_unchanged(case: str, with_existing_adapter: bool, tmp_path: Path) -> None:
    base, model = lorakit_model("lora")
    io.save_adapter(model, tmp_path)
    damage, error, message = BAD_FILES[case]
    damage(tmp_path)
    target = copy.deepcopy(base)
    if with_existing_adapter:
        kept = lorakit.LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights=False)
        lorakit.inject(target, kept, "kept")
    before = snapshot(target)
    with pytest.raises(error, match=message):
        io.load_adapter(target, tmp_path, "new")
    assert_unchanged(target, before)


def test_adapter_of_another_architecture_leaves_model_unchanged(tmp_path: Path) -> None:
    _, bert_model = lorakit_model("seq_cls")
    io.save_adapter(bert_model, tmp_path)
    llama = tiny_llama()
    before = snapshot(llama)
    with pytest.raises(ValueError, match="does not fit this LlamaForCausalLM"):
        io.load_adapter(llama, tmp_path)
    assert_unchanged(llama, before)


def test_missing_directory_and_taken_name(tmp_path: Path) -> None:
    base, model = lorakit_model("lora")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        io.load_adapter(base, tmp_path / "nowhere")
    io.save_adapter(model, tmp_path)
    before = snapshot(model)
    with pytest.raises(ValueError, match="'default' already exists"):
        io.load_adapter(model, tmp_path)
    with pytest.raises(ValueError, match="attribute of torch modules"):
        io.load_adapter(model, tmp_path, "half")
    assert_unchanged(model, before)


def test_pissa_adapter_reproduces_the_trained_model(tmp_path: Path) -> None:
    # PiSSA rewrote the base weight at injection; loading reruns it on the pristine base, as PEFT does.
    base = tiny_llama()
    config = lorakit.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa")
    model = lorakit.inject(copy.deepcopy(base), config)
    perturb_trainable(model)
    io.save_adapter(model, tmp_path)
    loaded = copy.deepcopy(base)
    io.load_adapter(loaded, tmp_path)
    torch.testing.assert_close(logits(loaded), logits(model), atol=1e-5, rtol=0)
    peft_loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    torch.testing.assert_close(logits(peft_loaded), logits(model), atol=1e-5, rtol=0)


def test_loaded_layers_are_lorakit_wrappers(tmp_path: Path) -> None:
    base, model = lorakit_model("lora")
    io.save_adapter(model, tmp_path)
    loaded = copy.deepcopy(base)
    io.load_adapter(loaded, tmp_path)
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, AdapterLayer)
    assert not isinstance(loaded.model.layers[0].self_attn.k_proj, AdapterLayer)


def test_failure_while_copying_takes_the_adapter_out_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, model = lorakit_model("seq_cls")
    io.save_adapter(model, tmp_path)
    target = copy.deepcopy(base)
    before = snapshot(target)

    def fail(*args: Any, **kwargs: Any) -> None:
        raise MemoryError("simulated")

    monkeypatch.setattr(adapter_files, "copy_into", fail)
    with pytest.raises(MemoryError):
        io.load_adapter(target, tmp_path)
    assert_unchanged(target, before)


def test_seq_cls_head_names_from_peft_are_implicit_again() -> None:
    values = {"peft_type": "LORA", "task_type": "SEQ_CLS", "target_modules": ["query"]}
    config = io.lora_config_from_peft({**values, "modules_to_save": ["classifier", "score", "pooler"]})
    assert config.modules_to_save == ["pooler"]
    heads_only = io.lora_config_from_peft({**values, "modules_to_save": ["classifier", "score"]})
    assert heads_only.modules_to_save is None


def test_peft_style_generic_target_list_loads_when_the_tensors_fit(tmp_path: Path) -> None:
    """PEFT tolerates target entries that match nothing (e.g. a generic list); the tensors decide."""
    model = tiny_llama()
    config = lorakit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    lorakit.inject(model, config)
    lorakit.save_adapter(model, tmp_path / "a")
    config_file = tmp_path / "a" / "adapter_config.json"
    values = json.loads(config_file.read_text())
    values["target_modules"] = ["q_proj", "v_proj", "query_key_value", "Wqkv"]
    config_file.write_text(json.dumps(values))
    fresh = tiny_llama()
    lorakit.load_adapter(fresh, tmp_path / "a")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits)
    # An adapter none of whose targets exist is still refused with the matcher's closest names.
    values["target_modules"] = ["query_key_value"]
    config_file.write_text(json.dumps(values))
    with pytest.raises(ValueError, match="closest names"):
        lorakit.load_adapter(tiny_llama(), tmp_path / "a")
