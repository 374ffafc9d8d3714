"""`dtype`: auto picks bf16 autocast where the device computes bf16 natively and fp32 elsewhere, says why,
and the run records the choice. The hardware answer is forced both ways (monkeypatched detection)."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import pytest
import torch
import yaml
from train_support import train_losses, write_chat_jsonl, write_tiny_model

from lorakit.cli.main import build_parser
from lorakit.train import TrainConfig, build_config, train
from lorakit.train import precision as precision_module
from lorakit.train.precision import choose_precision, cpu_bf16_instructions, cpu_flags

CPU = torch.device("cpu")
X86_HEAD = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Some CPU\n"


def _cpuinfo(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    return path


# --- detection ----------------------------------------------------------------------------------------------


def test_cpu_flags_read_the_x86_flags_line(tmp_path: Path) -> None:
    path = _cpuinfo(tmp_path, X86_HEAD + "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16\nbugs\t: x\n")
    assert cpu_flags(path) == {"fpu", "sse2", "avx2", "avx512f", "avx512_bf16"}
    assert cpu_flags(tmp_path / "missing") == set()  # not Linux: nothing known


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"avx2", "avx512f", "avx512_bf16"}, "AVX512-BF16"),
        ({"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}, "AMX-BF16"),
        ({"avx2", "fma"}, None),  # an AVX2-only CPU: bf16 would be emulated
        ({"avx2", "avx512f", "avx512bw"}, None),  # AVX-512 without its bf16 extension
        (set(), None),
    ],
)
def test_x86_bf16_instructions(flags: set[str], expected: str | None) -> None:
    assert cpu_bf16_instructions(flags) == expected


def test_arm_bf16_feature_counts_only_on_arm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision_module.platform, "machine", lambda: "aarch64")
    assert cpu_bf16_instructions({"fp", "asimd", "bf16"}) == "Arm BF16"
    assert cpu_bf16_instructions({"fp", "asimd"}) is None
    monkeypatch.setattr(precision_module.platform, "machine", lambda: "x86_64")
    assert cpu_bf16_instructions({"bf16"}) is None


# --- the choice ---------------------------------------------------------------------------------------------


def test_auto_on_a_cpu_with_native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision_module, "cpu_bf16_instructions", lambda: "AVX512-BF16")
    choice = choose_precision("auto", CPU)
    assert choice.bf16 and choice.dtype == "bf16"
    assert "AVX512-BF16" in choice.reason and "auto" in choice.reason


def test_auto_on_a_cpu_without_native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision_module, "cpu_bf16_instructions", lambda: None)
    choice = choose_precision("auto", CPU)
    assert not choice.bf16 and choice.dtype == "fp32"
    assert "no native bf16" in choice.reason and "--dtype bf16" in choice.reason


@pytest.mark.parametrize("native", [True, False])
def test_auto_on_cuda_follows_native_bf16(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    monkeypatch.setattr(precision_module, "cuda_bf16_native", lambda device: native)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the name falls back to the device
    choice = choose_precision("auto", torch.device("cuda", 0))
    assert choice.bf16 is native
    assert "cuda:0" in choice.reason


def test_explicit_dtypes_win_over_the_hardware(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision_module, "cpu_bf16_instructions", lambda: None)
    assert choose_precision("bf16", CPU).bf16
    monkeypatch.setattr(precision_module, "cpu_bf16_instructions", lambda: "AMX-BF16")
    assert not choose_precision("fp32", CPU).bf16
    assert not choose_precision("auto", torch.device("meta")).bf16  # no rule: the safe answer
    with pytest.raises(ValueError, match="dtype must be one of"):
        choose_precision("fp16", CPU)


# --- the option ---------------------------------------------------------------------------------------------


def test_config_dtype_and_the_older_bf16_switch() -> None:
    assert TrainConfig().dtype == "auto" and TrainConfig().bf16 is False
    assert TrainConfig(bf16=True).dtype == "bf16"
    assert TrainConfig(dtype="bf16").bf16 is True
    assert TrainConfig(dtype="fp32").bf16 is False
    with pytest.raises(ValueError, match="contradicts"):
        TrainConfig(dtype="fp32", bf16=True)
    with pytest.raises(ValueError, match="dtype must be one of"):
        TrainConfig(dtype="float16")


def test_cli_flags_override_the_run_config_either_way(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"bf16": True}))
    parser = build_parser()

    def built(*flags: str) -> TrainConfig:
        args = parser.parse_args(["train", "--config", str(config), *flags])
        keep = {k: v for k, v in vars(args).items() if k not in ("func", "command", "config", "quiet")}
        return build_config(args.config, keep)

    assert built().dtype == "bf16"
    assert built("--dtype", "fp32").dtype == "fp32"
    assert built("--no-bf16").dtype == "fp32"
    assert built("--dtype", "auto").dtype == "auto"
    config.write_text(yaml.safe_dump({"dtype": "fp32"}))
    assert built("--bf16").dtype == "bf16"


# --- a run --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run_inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("precision")
    return write_tiny_model(folder / "model"), write_chat_jsonl(folder / "train.jsonl", 8, seed=0)


def _run(tmp_path: Path, inputs: tuple[Path, Path], name: str, **options: object) -> Path:
    model, data = inputs
    output = tmp_path / name
    config = TrainConfig(
        model=str(model),
        data=str(data),
        r=4,
        alpha=8,
        targets="q_proj,v_proj",
        lr=1e-2,
        steps=2,
        batch_size=4,
        output=str(output),
        **options,
    )
    train(config)
    return output


@pytest.mark.parametrize(("native", "expected"), [("AVX512-BF16", "bf16"), (None, "fp32")])
def test_train_resolves_auto_logs_why_and_records_the_choice(
    tmp_path: Path,
    tiny_run_inputs: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    native: str | None,
    expected: str,
) -> None:
    monkeypatch.setattr(precision_module, "cpu_bf16_instructions", lambda: native)
    with caplog.at_level(logging.INFO, logger="lorakit.train.precision"):
        output = _run(tmp_path, tiny_run_inputs, "auto")
    said = [r.getMessage() for r in caplog.records if r.name == "lorakit.train.precision"]
    assert len(said) == 1 and said[0].startswith(f"precision: {expected}")
    recorded = yaml.safe_load((output / "run_config.yaml").read_text())
    assert recorded["dtype"] == expected and recorded["bf16"] is (expected == "bf16")
    # The choice is the one that ran: the same losses as the run that asked for it by name.
    named = _run(tmp_path, tiny_run_inputs, "named", dtype=expected)
    assert train_losses(output) == train_losses(named)
    other = _run(tmp_path, tiny_run_inputs, "other", dtype="fp32" if expected == "bf16" else "bf16")
    assert train_losses(output) != train_losses(other)


# --- frozen linear weights stored in bf16 under bf16 autocast -----------------------------------------------


def _adapted_llama(tie: bool, dora: bool = False) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    import lorakit

    torch.manual_seed(0)
    sizes = {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2}
    model = LlamaForCausalLM(
        LlamaConfig(**sizes, num_hidden_layers=2, vocab_size=101, tie_word_embeddings=tie)
    ).train()
    model.requires_grad_(False)
    targets = ["q_proj", "v_proj", "down_proj"]
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=targets, lora_dropout=0.1, use_dora=dora))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # B = 0 at the start: give the adapters something to say
            parameter.data.normal_(0, 0.05)
    return model


def _loss_and_grads(model: torch.nn.Module, lean: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    from lorakit.train.lean_activations import LeanActivations
    from lorakit.train.loss import LossModule

    ids = torch.randint(0, 101, (3, 17), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)  # the same dropout masks
    context = LeanActivations(model) if lean else contextlib.nullcontext()
    with torch.autocast("cpu", dtype=torch.bfloat16), context:
        loss, _ = LossModule(model, "causal")({"input_ids": ids, "labels": ids})
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("lean", [False, True])
def test_frozen_linears_in_bf16_give_autocasts_bits(tie: bool, lean: bool) -> None:
    import copy

    from lorakit.train.precision import store_frozen_linears_in

    model = _adapted_llama(tie)
    lowered = copy.deepcopy(model)
    # 2 layers × (q, k, v, o, gate, up, down) frozen bases, and lm_head unless it is the tied embedding
    assert len(store_frozen_linears_in(lowered, torch.bfloat16)) == 14 + (0 if tie else 1)
    assert lowered.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16
    assert lowered.model.layers[0].self_attn.k_proj.weight.dtype == torch.bfloat16
    assert lowered.model.embed_tokens.weight.dtype == torch.float32  # a lookup: stays fp32
    assert lowered.lm_head.weight.dtype == (torch.float32 if tie else torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in lowered.parameters() if p.requires_grad)
    loss, grads = _loss_and_grads(model, lean)
    lowered_loss, lowered_grads = _loss_and_grads(lowered, lean)
    assert torch.equal(loss, lowered_loss)
    assert grads.keys() == lowered_grads.keys() and len(grads) == 12
    for name, grad in grads.items():
        assert torch.equal(grad, lowered_grads[name]), name


def test_frozen_linears_skip_dora_bases_and_trainable_layers() -> None:
    from lorakit.train.precision import store_frozen_linears_in

    model = _adapted_llama(tie=False, dora=True)
    model.model.layers[1].self_attn.k_proj.weight.requires_grad_(True)
    lowered = store_frozen_linears_in(model, torch.bfloat16)
    assert len(lowered) == 2 * 4 + 1 - 1  # k, o, gate, up per layer, the head; layer 1's k trains
    assert "model.layers.0.self_attn.o_proj" in lowered and "lm_head" in lowered
    attention = model.model.layers[0].self_attn
    assert attention.q_proj.base_layer.weight.dtype == torch.float32  # DoRA reads it
    assert model.model.layers[1].self_attn.k_proj.weight.dtype == torch.float32  # trains
    assert attention.k_proj.weight.dtype == torch.bfloat16


def test_a_bf16_run_trains_on_bf16_linears_and_returns_the_loaded_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lorakit.models import load_causal_lm
    from lorakit.train import loop

    write_tiny_model(tmp_path / "model")
    write_chat_jsonl(tmp_path / "chat.jsonl", 8)
    common = {"model": str(tmp_path / "model"), "data": str(tmp_path / "chat.jsonl"), "steps": 1, "r": 4}
    seen: list[set[torch.dtype]] = []
    fit = loop.fit

    def recording_fit(model, *args, **kwargs):
        seen.append({p.dtype for p in model.parameters() if not p.requires_grad})
        return fit(model, *args, **kwargs)

    monkeypatch.setattr("lorakit.train.run.fit", recording_fit)
    restored = train(TrainConfig(**common, dtype="bf16", output=str(tmp_path / "bf16"))).model
    kept = train(TrainConfig(**common, dtype="bf16", output=str(tmp_path / "cli")), restore_base=False).model
    fp32 = train(TrainConfig(**common, dtype="fp32", output=str(tmp_path / "fp32"))).model
    assert seen == [{torch.bfloat16, torch.float32}] * 2 + [{torch.float32}]  # what each run trained on
    assert {p.dtype for p in kept.parameters() if not p.requires_grad} == {torch.bfloat16, torch.float32}
    loaded, _ = load_causal_lm(str(tmp_path / "model"))
    for model in (restored, fp32):
        assert {p.dtype for p in model.parameters()} == {torch.float32}
        base = model.model.layers[0].self_attn
        assert torch.equal(base.q_proj.base_layer.weight, loaded.model.layers[0].self_attn.q_proj.weight)
        assert torch.equal(model.lm_head.weight, loaded.lm_head.weight)  # not adapted (all-linear)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
def test_lowering_lets_the_loaded_file_mapping_go(tmp_path: Path) -> None:
    # transformers hands out views of the mapped safetensors file; a frozen fp32 tensor left there (the
    # embedding) would keep the whole file resident beside the bf16 copies
    import gc

    from lorakit.models import load_causal_lm
    from lorakit.train.precision import store_frozen_linears_in

    write_tiny_model(tmp_path / "model")
    weights = str((tmp_path / "model" / "model.safetensors").resolve())

    def mapped() -> bool:
        return weights in Path("/proc/self/maps").read_text()

    model, _ = load_causal_lm(str(tmp_path / "model"))
    model.requires_grad_(False)
    if not mapped():
        pytest.skip("this transformers version copies the weights at load")
    embedding = model.get_input_embeddings().weight.detach().clone()
    assert store_frozen_linears_in(model, torch.bfloat16)
    gc.collect()
    assert not mapped()
    assert torch.equal(model.get_input_embeddings().weight, embedding)  # copied, not changed
