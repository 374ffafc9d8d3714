"""Activation memory of one training step: what autograd keeps between forward and backward.

The estimate is an inventory of the tensors a transformer block saves for its backward pass, per
token, written from what transformers' eager modules actually hand to autograd (checked tensor by
tensor with ``torch.autograd.graph.saved_tensors_hooks`` on a LLaMA block). Notation, per token:
h hidden size, i intermediate size, a query heads, g = kv_heads·head_dim, h_q = a·head_dim, s the
sequence length, p the bytes of the compute dtype (2 for bf16/fp16, 4 for fp32).

Two trainers are modelled. ``transformers``: a standard step, ``model(**batch, labels=...)`` with
autograd's default saved tensors and the full logits. ``lorakit``: what ``lorakit train`` runs, the
lean loss (``lorakit.train.loss``) and lean activations (``lorakit.train.lean_activations``; off
under gradient checkpointing: a lorakit step under gradient checkpointing takes the first column but
for the head):

============== ============================================== ===========================================
part           transformers (autograd's defaults)             lean activations (``train.lean_activations``)
============== ============================================== ===========================================
2 × RMSNorm    x in fp32 (4h), 1/rms (4), and when the         x in the compute dtype (p·h) and 1/rms (4)
               weight trains x/rms in the compute dtype (p·h)
2 × LayerNorm  x (p·h), mean and rstd (8)                      the same
norm outputs   p·h each, when a linear reading them saves      none: rebuilt from x and 1/rms in backward
               its input (the shared role inputs below)
attention      sdpa or eager (below)                           the same
gated MLP      gate, up, act(gate) (3·p·i) + the product       gate and up (2·p·i): act(gate) and the
               act(gate)·up (p·i) when down_proj saves it      product are rebuilt from them
plain MLP      the activation's saves (p·i each)               the same; its output (down's input) rebuilt
adapters       4r + fp32 input copies / dropout (below)        the same
head           final norm + the full logits, b·s·V·(p + 12)    final norm + one chunk of logits (below)
============== ============================================== ===========================================

RMSNorm (LLaMA) computes in fp32: it saves x in fp32 (4h), 1/rms (4 bytes), and, when its weight
trains, the normalised input in the compute dtype (p·h). LayerNorm saves x (p·h) and mean/rstd (8).
Lean activations replace a LLaMA RMSNorm by a function that keeps only x and 1/rms, and keep every norm
output, activation output and gated product as a recipe (the tensors it is rebuilt from are kept
anyway). Every block is counted alike: in the first one the norm's input is a frozen embedding's output,
which the recipe keeps (p·h), except with a bf16/fp16 base, whose adapters save fp32 copies instead of
the norm output (p·h + 4 counted too many in that block).

A linear layer saves its input only when something needs it: a trainable weight (full fine-tuning)
or an adapter's A (LoRA). Inputs are shared by role: q/k/v read one tensor (the first norm's
output), gate/up read the second norm's output, o_proj reads the attention output, down_proj the
gated product. A frozen or 4-bit base layer saves nothing of its input.

Attention, ``sdpa`` (flash/efficient kernels, CPU flash): q and the output (p·h_q each), k and v
(p·g each: GQA is passed to SDPA unexpanded when there is no padding mask), and the log-sum-exp
(4 bytes per head). ``sdpa-math`` (SDPA's math kernel on a CPU, which lorakit's trainer picks there for
sequences of at most 128 tokens: `lorakit.train.attention_kernel`): it computes in fp32 and keeps the
scaled q and k and v, all expanded to the query heads (3·4·h_q), and the softmax (4·a·s); not the output,
so o_proj's input is a copy of its own (p·h_q) when o_proj saves it. ``eager``: q, the expanded k and v
(p·h_q each), the fp32 softmax (4·a·s), its copy in the compute dtype (p·a·s, only when p ≠ 4), and the
contiguous attention output (p·h_q) when o_proj saves its input.

MLP: gated (SwiGLU): gate and up outputs and the activation (3·p·i), plus the product (p·i) when
down_proj saves its input. Plain (GELU): the first projection's output, saved by the activation.

Adapters (lorakit and PEFT keep A and B in fp32): with a bf16/fp16 base each adapted module casts its
input to fp32 and A saves that copy (4·in per module, not shared, and not rebuilt by lean activations);
with dropout A saves the dropped copy (4·in) and the dropout its 1-byte mask; under lean activations the
copy is rebuilt from the mask and the input (``lorakit.input_dropout``), so dropout adds only the mask
to what the module keeps without dropout. Every adapted module also saves A's
output (4·r). (DoRA is not modelled; lean activations would also drop its unscaled B·A·x.)

The head, ``transformers``: the final norm, and the logits: b·s·V in the compute dtype (kept by the
model output), the fp32 log-softmax saved by the cross-entropy, and at the start of backward its
gradient and the logits' fp32 gradient: b·s·V·(p + 12) bytes.

The head, ``lorakit`` (``lorakit.train.fused_loss``): the full logits never exist. Of the b·s hidden
states only the n = b·(s − 1) label rows go through the head, c = min(chunk_size, n) rows at a time,
with the cross-entropy's gradients computed during forward. Kept for backward: the final norm's saves,
the rows' gradient (n·p·h), the boolean label mask (1 byte per position, saved by the indexing) and,
when the head trains, its fp32 weight-gradient accumulator (4·V·h; in fp32 it is the head's gradient
itself, counted under gradients, so only counted when p ≠ 4). Alive only during the loss's forward:
the final hidden states and the label rows gathered from them ((b·s + n)·p·h) and one chunk of logits
(c·V·p; when p ≠ 4 also the larger of their fp32 upcast, 4·c·V, and, when the head trains, the
half-precision weight-gradient product p·V·h). Those temporaries never coexist with a block that
gradient checkpointing recomputes or a dequantised 4-bit weight: only the larger group counts. A head
that is not a plain linear layer (a LoRA on ``lm_head``) runs each chunk under activation
checkpointing instead: the rows are kept and one chunk's logits path, c·V·(p + 12), comes back in
backward.

Gradient checkpointing keeps only each block's input (p·h per layer) and recomputes one block at a
time during backward, so one block's activations come back on top.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Attention = Literal["sdpa", "sdpa-math", "eager"]
Trainer = Literal["lorakit", "transformers"]
Role = Literal["qkv", "attn_out", "mlp_in", "mlp_mid"]

# Ordered: the attention output projection must be tried before the MLP output ("output.dense").
_ROLE_PATTERNS: tuple[tuple[Role, re.Pattern[str]], ...] = (
    ("attn_out", re.compile(r"(^|\.)(o_proj|out_proj|attn\.c_proj|attention\.(output\.)?dense)$")),
    ("qkv", re.compile(r"(^|\.)(q_proj|k_proj|v_proj|qkv_proj|c_attn|query|key|value|query_key_value)$")),
    ("mlp_in", re.compile(r"(^|\.)(gate_proj|up_proj|gate_up_proj|c_fc|intermediate\.dense|fc1|w1|w3)$")),
    ("mlp_mid", re.compile(r"(^|\.)(down_proj|mlp\.c_proj|output\.dense|fc2|w2)$")),
)


def linear_role(name: str) -> Role | None:
    """Which block input a linear layer reads (``model.layers.0.mlp.up_proj`` → ``mlp_in``), or None."""
    for role, pattern in _ROLE_PATTERNS:
        if pattern.search(name):
            return role
    return None


@dataclass(frozen=True)
class BlockShape:
    """The sizes of a transformer block, read from a config (see ``lorakit.analysis.memory``)."""

    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_layers: int
    vocab_size: int
    gated_mlp: bool = True
    rms_norm: bool = True
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    # tensors of size i the MLP activation saves: 1 for SiLU/ReLU/erf-GELU (its input), 4 for GPT-2's
    # tanh-GELU written out in Python (input, x³ term, tanh output, 0.5·x)
    activation_saves: int = 1


@dataclass(frozen=True)
class AdaptedLinear:
    """A linear layer with an adapter (or, for full fine-tuning, any linear layer)."""

    name: str
    in_features: int
    out_features: int

    @property
    def role(self) -> Role | None:
        return linear_role(self.name)


def block_activation_bytes(
    shape: BlockShape,
    batch_size: int,
    seq_len: int,
    dtype_bytes: int,
    full: bool,
    adapted: Sequence[AdaptedLinear] = (),
    r: int = 0,
    lora_dropout: float = 0.0,
    attention: Attention = "sdpa",
    mask_bytes: int = 1,
    lean: bool = False,
) -> dict[str, int]:
    """Bytes one block saves for backward, by part (norms, attention, scores, mlp, adapters, dropout).

    ``full``: every weight trains (every linear saves its input, norm weights train). Otherwise
    ``adapted`` lists the block's adapted linear layers (rank ``r``, dropout ``lora_dropout``).
    ``mask_bytes`` is the size of a dropout mask element (1: CUDA's bool mask). ``lean``: under
    ``lorakit.train.lean_activations.LeanActivations`` (norm outputs, activation outputs and gated
    products rebuilt,
    RMSNorm keeping x in the compute dtype and 1/rms only; see the module docstring).
    """
    p = dtype_bytes
    tokens = batch_size * seq_len
    h, i, a = shape.hidden_size, shape.intermediate_size, shape.num_heads
    h_q, g = a * shape.head_dim, shape.num_kv_heads * shape.head_dim

    # Which role inputs are kept once, in the compute dtype, shared by the layers that read them.
    shared: set[str] = {"qkv", "attn_out", "mlp_in", "mlp_mid"} if full else set()
    adapter_bytes = 0
    for linear in adapted if not full else ():
        adapter_bytes += 4 * r  # A's output, saved by B
        if lora_dropout > 0 and not lean:
            adapter_bytes += (4 + mask_bytes) * linear.in_features  # the dropped copy A saves, the mask
            continue
        if lora_dropout > 0:  # lean: the dropped copy is rebuilt from the mask and the input (below)
            adapter_bytes += mask_bytes * linear.in_features
        if p != 4:
            adapter_bytes += 4 * linear.in_features  # the fp32 cast copy of the input, one per module
        elif linear.role is not None:
            shared.add(linear.role)
        else:
            adapter_bytes += 4 * linear.in_features

    if lean:  # the norm outputs (the shared qkv / mlp_in inputs) are rebuilt from x and 1/rms
        norms = 2 * (p * h + 4 if shape.rms_norm else p * h + 8)
    else:
        norm = 4 * h + 4 + (p * h if full else 0) if shape.rms_norm else p * h + 8
        norms = 2 * norm + p * h * (("qkv" in shared) + ("mlp_in" in shared))

    if attention == "sdpa":
        attention_bytes = p * (2 * h_q + 2 * g) + 4 * a
        scores = 0
    elif attention == "sdpa-math":
        if shape.attention_dropout > 0:
            raise ValueError("sdpa-math is modelled without attention dropout (lorakit keeps flash then)")
        # fp32 whatever the compute dtype: q and k scaled, v, k and v expanded to every query head, and the
        # softmax; the output is not kept, so o_proj's input is its own contiguous copy when o_proj saves it
        attention_bytes = 4 * 3 * h_q + (p * h_q if "attn_out" in shared else 0)
        scores = 4 * a * seq_len
    elif attention == "eager":
        attention_bytes = p * 3 * h_q + (p * h_q if "attn_out" in shared else 0)
        scores = a * seq_len * (4 + (p if p != 4 else 0))
        if shape.attention_dropout > 0:
            scores += a * seq_len * (mask_bytes + p)
    else:
        raise ValueError(f"attention must be 'sdpa', 'sdpa-math' or 'eager', got {attention!r}")

    if lean:  # act(gate) and the product entering down_proj are rebuilt from gate and up
        mlp = p * i * (2 if shape.gated_mlp else shape.activation_saves)
    else:
        saves = 3 if shape.gated_mlp else shape.activation_saves
        mlp = p * i * saves + (p * i if "mlp_mid" in shared else 0)
    dropout = 2 * mask_bytes * h if shape.hidden_dropout > 0 else 0

    parts = {
        "norms": norms,
        "attention": attention_bytes,
        "attention_scores": scores,
        "mlp": mlp,
        "adapters": adapter_bytes,
        "dropout": dropout,
    }
    return {name: value * tokens for name, value in parts.items()}


def head_activation_bytes(
    shape: BlockShape, batch_size: int, seq_len: int, dtype_bytes: int, head_trains: bool, full: bool
) -> dict[str, int]:
    """The final norm and the full logits of a standard transformers step (module docstring), in bytes."""
    p = dtype_bytes
    tokens = batch_size * seq_len
    h = shape.hidden_size
    norm = (4 * h + 4 + (p * h if full else 0)) if shape.rms_norm else p * h + 8
    norm += p * h if head_trains else 0
    return {
        "final_norm": norm * tokens,
        "logits": shape.vocab_size * (p + 12) * tokens,
    }


# The parts of `lean_head_activation_bytes` alive only during the loss's forward: they never coexist with
# what lives only inside the blocks (a recomputed block, a dequantised 4-bit weight).
LOSS_TEMPORARIES = ("final_hidden_states", "logits_chunk")


def lean_head_activation_bytes(
    shape: BlockShape,
    batch_size: int,
    seq_len: int,
    dtype_bytes: int,
    head_trains: bool,
    full: bool,
    chunk_size: int = 512,
    lean: bool = True,
    fused: bool = True,
) -> dict[str, int]:
    """The final norm and lorakit's chunked loss (``lorakit.train.loss``; module docstring), in bytes.

    Every position but the last of each sequence is taken as a label: n = batch·(seq − 1) rows.
    ``lean``: lean activations are on (the final RMSNorm keeps x in the compute dtype and 1/rms).
    ``fused``: the head is a plain linear layer (the fused loss); otherwise each chunk runs under
    activation checkpointing (a LoRA on ``lm_head``).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    p = dtype_bytes
    tokens = batch_size * seq_len
    rows = batch_size * (seq_len - 1)
    chunk = min(chunk_size, rows)
    h, vocab = shape.hidden_size, shape.vocab_size
    if lean:
        norm = p * h + 4 if shape.rms_norm else p * h + 8
    else:
        norm = (4 * h + 4 + (p * h if full else 0)) if shape.rms_norm else p * h + 8
    parts = {
        "final_norm": norm * tokens,
        # kept for backward: the label rows' gradient (fused; the rows themselves under checkpointing) and
        # the (batch, seq − 1) boolean label mask, which the indexing that gathers the rows saves
        "label_rows": p * h * rows + batch_size * (seq_len - 1),
        # the loss's forward temporaries (LOSS_TEMPORARIES): the final hidden states and the label rows
        # gathered from them, and one chunk of logits
        "final_hidden_states": p * h * (tokens + rows),
    }
    if fused:
        # the chunk's logits, and in half precision the larger of their fp32 upcast and, when the head
        # trains, the half-precision product grad_logitsᵀ·rows (vocab, h) added into the fp32 accumulator
        half = 0 if p == 4 else max(4 * chunk * vocab, p * vocab * h if head_trains else 0)
        parts["logits_chunk"] = p * chunk * vocab + half
        parts["head_gradient_accumulator"] = 4 * vocab * h if head_trains and p != 4 else 0
    else:
        parts["logits_chunk"] = chunk * vocab * (p + 12)
    return parts
