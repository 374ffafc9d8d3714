"""Losses as *sums* over label tokens (or examples), so the loop can normalise by the whole global batch.

The causal LM loss is memory-lean: the (batch, seq, vocab) logits are never built. The transformer body
gives the hidden states (batch, seq, hidden); only the positions whose next token is a label are kept
(n, hidden); the output head and the cross-entropy then run over chunks of ``chunk_size`` of those rows.
For SmolLM2 (vocabulary 49 152) a batch of 8 × 512 tokens would hold 800 MB of fp32 logits plus as much
again for their gradient; the lean loss holds one chunk's: 100 MB of fp32 logits at chunk_size 512.

A plain ``nn.Linear`` head (the usual ``lm_head``, frozen or trained, tied to the input embedding or not)
takes `lorakit.train.fused_loss`: each chunk's logits are turned in place into their gradient during
forward and contracted at once into the gradients of the hidden states and of the head, so the head's
matmul is not recomputed in backward and only one (chunk, vocab) block (plus its fp32 upcast in half
precision) ever exists. Any other head (a LoRA on ``lm_head``, a quantised layer) runs each chunk under
non-reentrant activation checkpointing: its logits are dropped after forward and recomputed in backward.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lorakit.data.tokenize import IGNORE_INDEX  # one source: the data side decides what is masked
from lorakit.train.fused_loss import linear_cross_entropy_sum


def count_label_tokens(batch: Mapping[str, torch.Tensor], task: str) -> int:
    """How many targets ``batch`` has: label tokens after the shift (causal) or rows (classify)."""
    labels = batch["labels"]
    if task == "classify":
        return int(labels.shape[0])
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def model_inputs(batch: Mapping[str, torch.Tensor], module: nn.Module | None = None) -> dict[str, Any]:
    """The batch without ``labels`` (the model must not compute its own, full-logits loss).

    With ``module``, ``use_cache=False`` is added when its forward takes it: training never needs the
    key/value cache, and building it costs memory.
    """
    inputs: dict[str, Any] = {key: value for key, value in batch.items() if key != "labels"}
    if module is not None and _takes_use_cache(type(module)):
        inputs["use_cache"] = False
    return inputs


@functools.cache
def _takes_use_cache(module_class: type) -> bool:
    try:
        return "use_cache" in inspect.signature(module_class.forward).parameters
    except (TypeError, ValueError):
        return False


def supports_lean_loss(model: nn.Module) -> bool:
    """True for HF causal LMs whose logits are exactly ``output_embeddings(body(...).last_hidden_state)``.

    Models that post-process the logits (Gemma-2's soft-capping, Cohere's logit scale) take the standard
    path, which is always right but builds the full logits.
    """
    body = getattr(model, "base_model", None)
    get_head = getattr(model, "get_output_embeddings", None)
    if body is None or body is model or get_head is None or get_head() is None:
        return False
    config = getattr(model, "config", None)
    softcapped = getattr(config, "final_logit_softcapping", None) is not None
    return not (softcapped or hasattr(config, "logit_scale"))


def causal_lm_loss_sum(
    model: nn.Module, batch: Mapping[str, torch.Tensor], chunk_size: int = 512, lean: bool | None = None
) -> torch.Tensor:
    """Sum of the next-token cross-entropies over the label tokens of ``batch``: a scalar.

    ``batch`` holds ``input_ids`` (b, s), ``labels`` (b, s) in the HF convention (position t is predicted
    from positions < t; ``-100`` is ignored) and optionally ``attention_mask`` / ``position_ids`` (b, s).
    ``lean=None`` uses the lean path whenever `supports_lean_loss`; it equals ``model(**batch).loss`` times
    the number of label tokens, to float round-off, in value and gradients.
    """
    labels = batch["labels"]
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX  # (b, s-1)
    if lean is None:
        lean = supports_lean_loss(model)
    if not lean:
        logits = model(**model_inputs(batch, model)).logits[:, :-1][keep]  # (n, vocab)
        return F.cross_entropy(_upcast(logits), targets[keep], reduction="sum")
    body = model.base_model
    hidden = body(**model_inputs(batch, body)).last_hidden_state  # (b, s, hidden)
    rows = hidden[:, :-1][keep]  # (n, hidden): only positions that predict a label
    return chunked_head_cross_entropy(model.get_output_embeddings(), rows, targets[keep], chunk_size)


def chunked_head_cross_entropy(
    head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    """``sum(cross_entropy(head(hidden), targets))`` with hidden (n, h) and targets (n,), chunk by chunk.

    Gradients reach ``hidden`` and any trainable parameter of ``head`` while only one (chunk, vocab) block
    of logits exists at a time. A plain ``nn.Linear`` head without hooks takes the fused loss
    (`linear_cross_entropy_sum`: gradients computed in forward, no recomputation). Anything else (a LoRA
    on ``lm_head``, a bitsandbytes layer) runs each chunk under non-reentrant checkpointing: its logits
    are dropped after forward and recomputed in backward, through the head's own forward.
    """
    # Exactly nn.Linear: a subclass or wrapper may compute something else than weight and bias say, and
    # the fused path never calls the module, so a head with forward (pre-)hooks keeps the module path too.
    if type(head) is nn.Linear and not head._forward_hooks and not head._forward_pre_hooks:
        return linear_cross_entropy_sum(hidden, head.weight, head.bias, targets, chunk_size)
    # Zero rows (a batch whose labels were all truncated away) still give a loss on the autograd graph, so
    # backward runs, and under DDP every process takes part in the gradient all-reduce.
    total = (hidden.sum() * 0).to(torch.promote_types(hidden.dtype, torch.float32))
    for start in range(0, hidden.shape[0], chunk_size):
        end = start + chunk_size
        if torch.is_grad_enabled():
            part = checkpoint(
                _head_cross_entropy, head, hidden[start:end], targets[start:end], use_reentrant=False
            )
        else:
            part = _head_cross_entropy(head, hidden[start:end], targets[start:end])
        total = total + part
    return total


def _head_cross_entropy(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(_upcast(head(hidden)), targets, reduction="sum")


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    # As transformers' loss: half-precision logits go to fp32 for the softmax; fp64 stays fp64.
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def classification_loss_sum(
    model: nn.Module, batch: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum of cross-entropies over the rows, logits (b, num_labels))`` from the model's own head.

    ``batch["labels"]`` is (b,) class ids.
    """
    logits = model(**model_inputs(batch)).logits
    return F.cross_entropy(_upcast(logits), batch["labels"], reduction="sum"), logits


class LossModule(nn.Module):
    """The model plus its loss, as one module, so DDP sees every trainable parameter used in ``forward``.

    ``forward(batch)`` returns the loss summed over the batch's targets (a scalar) and, for classification,
    the logits (b, num_labels) (None for causal LMs).
    """

    def __init__(self, model: nn.Module, task: str, chunk_size: int = 512) -> None:
        super().__init__()
        self.model = model
        self.task = task
        self.chunk_size = chunk_size
        self.lean = task == "causal" and supports_lean_loss(model)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        if self.task == "classify":
            return classification_loss_sum(self.model, batch)
        return causal_lm_loss_sum(self.model, batch, self.chunk_size, lean=self.lean), None
