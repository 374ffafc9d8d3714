"""Training memory from a config.json alone: weights, gradients, optimizer state, activations, NF4 constants.

Parameters are counted exactly: the model is built on the meta device from the config (shapes, no
storage) and its linear layers are the ones ``lorakit.matching`` selects for the adapter. Per
component, with N the parameter count, p the compute-dtype bytes (2 for bf16/fp16, 4 for fp32):

============ =========================== ===================== =============================
component    full fine-tuning            LoRA                  QLoRA
============ =========================== ===================== =============================
weights      p·N (+ 4·N fp32 master)     p·N + 4·N_lora        0.5·N_q + p·N_rest + 4·N_lora
gradients    p·N                         4·N_lora              4·N_lora
optimizer    per trainable tensor: AdamW 8 bytes/param (two fp32 moments; 2·p with ``moments="param"``,
             as torch keeps them for bf16 parameters); 8-bit AdamW 2 bytes/param
             + an fp32 absmax per 256-block per moment (tensors < 4096 elements stay fp32); SGD 0
quantisation –                           –                     NF4 constants (below)
activations  ``lorakit.analysis.activations``: per-block inventory × layers + the head/loss term
============ =========================== ===================== =============================

``TrainingSetup.trainer`` picks whose step the activations describe: ``"lorakit"`` (the default, what
``lorakit train`` runs: the chunked fused loss of ``lorakit.train.loss``, never the full logits, and the
lean activations of ``lorakit.train.lean_activations``, which the trainer turns off under gradient
checkpointing) or
``"transformers"`` (a standard ``model(**batch, labels=...)`` step: autograd's default saved tensors and
the full (batch, seq, vocab) logits). Weights, gradients and optimizer state do not depend on it.

N_q are the weights of the linear layers bitsandbytes quantises (all but the heads), N_rest the
rest (embeddings, norms, heads, biases). Adapters are counted in fp32 because lorakit and PEFT keep
them in fp32 next to a half-precision base. NF4 constants for a weight of n elements: with double
quantisation, an 8-bit absmax per 64-block (n/64 bytes), an fp32 scale per 256 of those and an fp32
offset; without it, an fp32 absmax per 64-block (4·n/64 bytes).

``MemoryEstimate.total`` is the static part (weights, gradients, optimizer state, constants) plus
the larger of the activations and the optimizer step's temporaries, which never coexist. Counting all
gradients next to all activations makes it a slight upper bound: backward frees activations as it
produces gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import nn

from lorakit.analysis.activations import (
    LOSS_TEMPORARIES,
    AdaptedLinear,
    Attention,
    BlockShape,
    Trainer,
    block_activation_bytes,
    head_activation_bytes,
    lean_head_activation_bytes,
)
from lorakit.matching import name_matches
from lorakit.models.quantize import UNQUANTIZED_HEADS

Method = Literal["full", "lora", "qlora"]
Optimizer = Literal["adamw", "adamw8bit", "sgd"]
OptimizerImpl = Literal["fused", "foreach", "for-loop"]
DType = Literal["bf16", "fp16", "fp32"]

DTYPE_BYTES: dict[str, int] = {"bf16": 2, "fp16": 2, "fp32": 4}
NF4_BLOCK = 64  # bitsandbytes' 4-bit block size
NF4_DOUBLE_QUANT_BLOCK = 256  # block size of the second-level (absmax) quantisation
ADAM8BIT_BLOCK = 256
ADAM8BIT_MIN_SIZE = 4096  # bitsandbytes keeps smaller tensors' states in fp32


@dataclass(frozen=True)
class TrainingSetup:
    """How the model is trained: what the estimate depends on besides the model itself."""

    method: Method = "lora"
    batch_size: int = 1
    seq_len: int = 512
    optimizer: Optimizer = "adamw"
    dtype: DType = "bf16"
    gradient_checkpointing: bool = False
    r: int = 16
    target_modules: str | list[str] = "all-linear"
    lora_dropout: float = 0.0
    attention: Attention = "sdpa"
    master_weights: bool = False  # full fine-tuning with an fp32 master copy (mixed precision / ZeRO)
    # AdamW moments in fp32 (mixed precision, the usual tables) or in the parameters' dtype, as
    # torch.optim.AdamW does for bf16 parameters without a master copy
    moments: Literal["fp32", "param"] = "fp32"
    # torch AdamW's implementation decides its temporaries during the step (see optimizer_workspace_bytes)
    optimizer_impl: OptimizerImpl = "fused"
    double_quant: bool = True
    # whose training step the activations describe: lorakit's trainer (lean loss + lean activations, the
    # latter off under gradient checkpointing) or a standard transformers step (full logits)
    trainer: Trainer = "lorakit"
    loss_chunk_size: int = 512  # label rows per chunk of lorakit's loss (TrainConfig.loss_chunk_size)

    def __post_init__(self) -> None:
        if self.trainer not in ("lorakit", "transformers"):
            raise ValueError(f"trainer must be lorakit or transformers, got {self.trainer!r}")
        if self.loss_chunk_size < 1:
            raise ValueError(f"loss_chunk_size must be >= 1, got {self.loss_chunk_size}")
        if self.method not in ("full", "lora", "qlora"):
            raise ValueError(f"method must be full, lora or qlora, got {self.method!r}")
        if self.optimizer not in ("adamw", "adamw8bit", "sgd"):
            raise ValueError(f"optimizer must be adamw, adamw8bit or sgd, got {self.optimizer!r}")
        if self.optimizer_impl not in ("fused", "foreach", "for-loop"):
            raise ValueError(
                f"optimizer_impl must be fused, foreach or for-loop, got {self.optimizer_impl!r}"
            )
        if self.moments not in ("fp32", "param"):
            raise ValueError(f"moments must be fp32 or param, got {self.moments!r}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {self.dtype!r}")
        if self.batch_size < 1 or self.seq_len < 1 or self.r < 1:
            raise ValueError(
                f"batch_size, seq_len and r must be >= 1, got {self.batch_size}, {self.seq_len}, {self.r}"
            )


@dataclass
class MemoryEstimate:
    """Bytes per component; ``total`` is their sum."""

    setup: TrainingSetup
    model_type: str
    parameters: int
    trainable_parameters: int
    quantized_parameters: int
    weights: int
    gradients: int
    optimizer_state: int
    activations: int
    quantization_constants: int
    optimizer_workspace: int = 0
    activation_parts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def static(self) -> int:
        """What lives through the whole step: weights, gradients, optimizer state, NF4 constants."""
        return self.weights + self.gradients + self.optimizer_state + self.quantization_constants

    @property
    def total(self) -> int:
        """The peak: the static part plus the larger of the activations (forward/backward) and the
        optimizer step's temporaries, which never coexist (the step runs after backward)."""
        return self.static + max(self.activations, self.optimizer_workspace)

    def components(self) -> dict[str, int]:
        return {
            "weights": self.weights,
            "gradients": self.gradients,
            "optimizer_state": self.optimizer_state,
            "optimizer_workspace": self.optimizer_workspace,
            "activations": self.activations,
            "quantization_constants": self.quantization_constants,
            "total": self.total,
        }


def nf4_constant_bytes(numel: int, double_quant: bool = True) -> int:
    """Bytes of the NF4 quantisation constants of one weight of ``numel`` elements (data excluded)."""
    blocks = math.ceil(numel / NF4_BLOCK)
    if not double_quant:
        return 4 * blocks
    return blocks + 4 * math.ceil(blocks / NF4_DOUBLE_QUANT_BLOCK) + 4


def optimizer_bytes(tensor_sizes: list[int], optimizer: Optimizer, moment_bytes: int = 4) -> int:
    """Optimizer state for trainable tensors of the given element counts (AdamW: two moments each)."""
    if optimizer == "sgd":
        return 0
    if optimizer == "adamw":
        return 2 * moment_bytes * sum(tensor_sizes)
    total = 0
    for n in tensor_sizes:
        if n < ADAM8BIT_MIN_SIZE:
            total += 8 * n
        else:
            total += 2 * n + 2 * 4 * math.ceil(n / ADAM8BIT_BLOCK)
    return total


def optimizer_workspace_bytes(
    tensor_sizes: list[int], optimizer: Optimizer, impl: OptimizerImpl, moment_bytes: int = 4
) -> int:
    """Temporaries of one AdamW step (torch): the ``sqrt(v)/c`` denominator is a new tensor.

    ``fused``: none (one kernel per group). ``foreach``: one denominator per parameter, all at once
    (``torch._foreach_sqrt`` over the whole list; CUDA's default). ``for-loop``: two temporaries
    (sqrt, then the division) of the largest tensor at a time (the CPU default). 8-bit AdamW
    (bitsandbytes kernels) and plain SGD: none.
    """
    if optimizer != "adamw" or impl == "fused" or not tensor_sizes:
        return 0
    if impl == "foreach":
        return moment_bytes * sum(tensor_sizes)
    return 2 * moment_bytes * max(tensor_sizes)


def _linears(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every nn.Linear and transformers Conv1D, by qualified name."""
    found: dict[str, tuple[int, int]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            found[name] = (module.in_features, module.out_features)
        elif type(module).__name__ == "Conv1D":  # GPT-2: weight stored (in, out)
            found[name] = (int(module.weight.shape[0]), int(module.weight.shape[1]))
    return found


def block_shape(config: Any, model: nn.Module) -> BlockShape:
    """The block sizes of a transformers config; the meta ``model`` tells gated MLPs and RMSNorm apart."""

    def first(*names: str, default: Any = None) -> Any:
        for name in names:
            value = getattr(config, name, None)
            if value is not None:
                return value
        return default

    hidden = int(first("hidden_size", "n_embd", "d_model"))
    heads = int(first("num_attention_heads", "n_head"))
    module_names = [name for name, _ in model.named_modules()]
    norm_classes = {type(m).__name__ for m in model.modules()}
    activation = str(first("hidden_act", "activation_function", default=""))
    return BlockShape(
        hidden_size=hidden,
        intermediate_size=int(first("intermediate_size", "n_inner", "ffn_dim", default=None) or 4 * hidden),
        num_heads=heads,
        num_kv_heads=int(first("num_key_value_heads", default=heads)),
        head_dim=int(first("head_dim", default=hidden // heads)),
        num_layers=int(first("num_hidden_layers", "n_layer")),
        vocab_size=int(first("vocab_size")),
        gated_mlp=any(name.endswith(("gate_proj", "gate_up_proj")) for name in module_names),
        rms_norm=any("RMSNorm" in cls for cls in norm_classes),
        attention_dropout=float(
            first("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob", default=0)
        ),
        hidden_dropout=float(first("resid_pdrop", "hidden_dropout_prob", "hidden_dropout", default=0)),
        activation_saves=4 if activation in ("gelu_new", "gelu_pytorch_tanh_python", "gelu_fast") else 1,
    )


def _targets(model: nn.Module, target_modules: str | list[str], r: int) -> list[str]:
    from lorakit.config import LoraConfig
    from lorakit.matching import find_targets

    if isinstance(target_modules, str) and target_modules.lower() != "all-linear" and "," in target_modules:
        target_modules = target_modules.split(",")
    return find_targets(model, LoraConfig(r=r, target_modules=target_modules))


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    return next((int(part) for part in parts if part.isdigit()), None)


def estimate_memory(config: Any, setup: TrainingSetup | None = None) -> MemoryEstimate:
    """Estimate training memory for ``config`` (a transformers config, a config.json path or a folder)."""
    from lorakit.analysis.params import load_config, meta_model

    setup = setup or TrainingSetup()
    if isinstance(config, (str, Path)):
        config = load_config(config)
    model = meta_model(config)
    shape = block_shape(config, model)
    p = DTYPE_BYTES[setup.dtype]
    full = setup.method == "full"

    parameters = {id(param): param.numel() for param in model.parameters()}
    total = sum(parameters.values())
    linears = _linears(model)
    quantized = quantized_bytes = constants = 0
    if setup.method == "qlora":
        # the heads are recognised by name, as the skip list handed to bitsandbytes does
        for name, (fan_in, fan_out) in linears.items():
            if name_matches(name, UNQUANTIZED_HEADS):
                continue
            quantized += fan_in * fan_out
            quantized_bytes += (fan_in * fan_out + 1) // 2  # two 4-bit codes per byte
            constants += nf4_constant_bytes(fan_in * fan_out, setup.double_quant)

    notes: list[str] = []
    if full:
        adapted: list[AdaptedLinear] = [AdaptedLinear(n, *linears[n]) for n in linears]
        trainable_sizes = list(parameters.values())
        trainable = total
        weights = p * total + (4 * total if setup.master_weights and p != 4 else 0)
        gradients = p * total
        if setup.master_weights and p != 4:
            notes.append("fp32 master copy of the weights included (mixed precision)")
    else:
        names = _targets(model, setup.target_modules, setup.r)
        adapted = [AdaptedLinear(n, *linears[n]) for n in names if n in linears]
        # A is (r, in) and B is (out, r): two tensors per adapted layer
        trainable_sizes = [n for a in adapted for n in (setup.r * a.in_features, a.out_features * setup.r)]
        trainable = sum(trainable_sizes)
        weights = p * (total - quantized) + quantized_bytes + 4 * trainable
        gradients = 4 * trainable
    # adapters are fp32 parameters, so only full fine-tuning can have half-precision moments
    moment_bytes = p if setup.moments == "param" and full and not setup.master_weights else 4
    optimizer = optimizer_bytes(trainable_sizes, setup.optimizer, moment_bytes)
    workspace = optimizer_workspace_bytes(
        trainable_sizes, setup.optimizer, setup.optimizer_impl, moment_bytes
    )

    lorakit_trainer = setup.trainer == "lorakit"
    # lorakit's trainer turns lean activations off under gradient checkpointing (see lorakit.train.loop)
    lean = lorakit_trainer and not setup.gradient_checkpointing
    per_layer: dict[int, list[AdaptedLinear]] = {}
    for linear in adapted:
        index = _layer_of(linear.name)
        if index is not None:
            per_layer.setdefault(index, []).append(linear)
    blocks = [
        block_activation_bytes(
            shape,
            setup.batch_size,
            setup.seq_len,
            p,
            full,
            per_layer.get(index, []),
            setup.r,
            setup.lora_dropout,
            setup.attention,
            lean=lean,
        )
        for index in range(shape.num_layers)
    ]
    tokens = setup.batch_size * setup.seq_len
    head_names = [n for n in linears if name_matches(n, UNQUANTIZED_HEADS)]
    head_trains = full or any(a.name in head_names for a in adapted)
    parts: dict[str, int] = {}
    if setup.gradient_checkpointing:
        parts["block_inputs"] = shape.num_layers * p * shape.hidden_size * tokens
        parts["recomputed_block"] = max(sum(block.values()) for block in blocks)
    else:
        for block in blocks:
            for key, value in block.items():
                parts[key] = parts.get(key, 0) + value
    if lorakit_trainer:
        # the fused loss needs a plain linear head; an adapted one runs chunks under checkpointing
        head_adapted = not full and any(a.name in head_names for a in adapted)
        parts.update(
            lean_head_activation_bytes(
                shape,
                setup.batch_size,
                setup.seq_len,
                p,
                head_trains,
                full,
                setup.loss_chunk_size,
                lean=lean,
                fused=not head_adapted,
            )
        )
    else:
        parts.update(head_activation_bytes(shape, setup.batch_size, setup.seq_len, p, head_trains, full))
    if setup.attention == "eager":
        parts["causal_mask"] = setup.batch_size * setup.seq_len**2 * p
    if setup.method == "qlora" and quantized:
        largest = max(i * o for n, (i, o) in linears.items() if not name_matches(n, UNQUANTIZED_HEADS))
        parts["dequantized_weight"] = p * largest  # one layer's weight, dequantised for its matmul
    if lorakit_trainer:
        # The loss's forward temporaries are freed before backward recomputes a block, and no 4-bit weight
        # is dequantised while the loss runs: only the larger of the two groups is counted.
        loss_group = {key: parts[key] for key in LOSS_TEMPORARIES if key in parts}
        block_group = {key: parts[key] for key in ("recomputed_block", "dequantized_weight") if key in parts}
        if block_group:
            larger, smaller = sorted((loss_group, block_group), key=lambda g: sum(g.values()), reverse=True)
            for key in smaller:
                del parts[key]
            notes.append(
                f"{' + '.join(smaller)} ({sum(smaller.values()) / 1e9:.3f} GB) not counted: "
                f"never alive at the same time as {' + '.join(larger)}, which is larger"
            )
    parts = {key: value for key, value in parts.items() if value}

    return MemoryEstimate(
        setup=setup,
        model_type=str(getattr(config, "model_type", "?")),
        parameters=total,
        trainable_parameters=trainable,
        quantized_parameters=quantized,
        weights=weights,
        gradients=gradients,
        optimizer_state=optimizer,
        activations=sum(parts.values()),
        quantization_constants=constants,
        optimizer_workspace=workspace,
        activation_parts=parts,
        notes=notes,
    )
