"""A fused linear + cross-entropy loss that computes its gradients during forward.

``linear_cross_entropy_sum(hidden, weight, bias, targets, chunk_size)`` is
``sum(cross_entropy(hidden @ weight.T + bias, targets))``, built so that neither the (n, vocab) logits nor
their gradient ever exist, and the output-head matmul is never recomputed.

Why it can work in forward: the loss is a scalar at the end of the graph, so d loss / d logits is known
as soon as the logits are, ``softmax(logits) - onehot(target)``, up to the one number backward will bring
(the incoming scalar gradient, e.g. ``1 / tokens`` of the global batch). So forward takes the rows a chunk
at a time: it computes the chunk's (chunk, vocab) logits, its loss, turns that buffer *in place* into the
gradient of the logits, and contracts it at once into the small gradients: the chunk's rows of
d loss / d hidden, (chunk, h), and the running d loss / d weight, (vocab, h), and d loss / d bias,
(vocab,). Those (not the logits) are saved; backward only scales them, in place, by the incoming
gradient (so a graph through this loss can be backpropagated once, not again with retain_graph). Compared
with chunks under activation checkpointing, this saves recomputing ``hidden @ weight.T`` in backward
(a tenth of a SmolLM2 step) and the logits' second life in backward.

Precision follows plain autograd: half-precision logits are upcast to fp32 for the softmax (as
transformers' loss does; fp64 stays fp64); under ``torch.autocast`` the matmuls run in the autocast dtype
(fp32 / fp16 / bf16 inputs are cast, fp64 ones are not, as autocast does), and the fp32 gradient of the
logits is cast back to that dtype before the two gradient matmuls, as autograd's backward of the cast
would; d loss / d weight and d loss / d bias accumulate over chunks in fp32 (or the parameter's dtype,
if wider) and are cast to the parameter's dtype at the end.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

_HALF = (torch.float16, torch.bfloat16)
_AUTOCAST_ELIGIBLE = (torch.float16, torch.bfloat16, torch.float32)


def linear_cross_entropy_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    chunk_size: int,
) -> torch.Tensor:
    """``sum(cross_entropy(hidden @ weight.T + bias, targets))`` as a scalar, ``chunk_size`` rows at a time.

    hidden (n, h), weight (vocab, h), bias (vocab,) or None, targets (n,) integer class ids in
    [0, vocab) (ignored positions must already be dropped). The loss is in fp32 for half-precision logits
    (fp64 for fp64). At most one (chunk_size, vocab) block of logits, plus its fp32 upcast when the logits
    are half precision, is alive at a time; the saved state is the gradients: (n, h) for ``hidden``,
    (vocab, h) and (vocab,) for ``weight`` and ``bias`` when they require grad.
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(
            f"hidden must be (n, h) and targets (n,); got {tuple(hidden.shape)} and {tuple(targets.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    _check_targets(targets, weight.shape[0])
    inputs = (hidden, weight) if bias is None else (hidden, weight, bias)
    if torch.is_grad_enabled() and any(tensor.requires_grad for tensor in inputs):
        return _LinearCrossEntropySum.apply(hidden, weight, bias, targets, chunk_size)
    # Nothing to differentiate (evaluation): the same chunked loss, without computing any gradient.
    return _fused_forward(hidden, weight, bias, targets, chunk_size, (False, False, False))[0]


def _check_targets(targets: torch.Tensor, vocab: int) -> None:
    # F.cross_entropy refuses an out-of-range class (on CUDA, with a device assert); the in-place gather
    # and scatter below would not. One min/max and one sync per call is cheap next to the matmuls.
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"targets must be integer class ids, got dtype {targets.dtype}")
    if targets.numel() == 0:
        return
    low, high = torch.stack(torch.aminmax(targets)).tolist()
    if low < 0 or high >= vocab:
        bad = low if low < 0 else high
        raise ValueError(f"target {bad} is out of range: class ids must lie in [0, {vocab})")


class _LinearCrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        chunk_size: int,
    ) -> torch.Tensor:
        needs = ctx.needs_input_grad[:3]
        loss, grad_hidden, grad_weight, grad_bias = _fused_forward(
            hidden, weight, bias, targets, chunk_size, needs
        )
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.used = False
        # save_for_backward (not ctx attributes): autograd frees them once backward has run.
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.used:
            raise RuntimeError(
                "linear_cross_entropy_sum supports one backward per forward (it scales its saved "
                "gradients in place); recompute the loss instead of backward(retain_graph=True)"
            )
        ctx.used = True
        # Scaled in place: an out-of-place product would hold a second (vocab, h) weight gradient while
        # the saved one is alive (113 MB for SmolLM2 in fp32, 2 GB for a 128k-vocabulary 4096-wide head).
        grads = tuple(
            None if grad is None else grad.mul_(grad_output).to(dtype)
            for grad, dtype in zip(ctx.saved_tensors, ctx.dtypes)
        )
        return (*grads, None, None)


def _fused_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    chunk_size: int,
    needs: tuple[bool, ...],
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(loss, d loss / d hidden, d loss / d weight, d loss / d bias); a gradient is None unless needed."""
    need_hidden, need_weight = needs[0], needs[1]
    need_bias = bias is not None and needs[2]
    device_type = hidden.device.type
    autocast = torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
    # The casts autocast would make for F.linear, made once here (the (vocab, h) weight not once per
    # chunk); then autocast is switched off so the fp32 softmax and accumulations stay fp32.
    weight_c = _autocast_cast(weight, device_type, autocast)
    bias_c = None if bias is None else _autocast_cast(bias, device_type, autocast)
    logits_dtype = torch.promote_types(_autocast_dtype(hidden.dtype, device_type, autocast), weight_c.dtype)
    softmax_dtype = torch.float32 if logits_dtype in _HALF else logits_dtype
    n = hidden.shape[0]

    loss = torch.zeros((), dtype=softmax_dtype, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    grad_weight = _zeros_for(weight) if need_weight else None
    grad_bias = _zeros_for(bias) if need_bias and bias is not None else None
    any_grad = need_hidden or need_weight or need_bias
    with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
        for start in range(0, n, chunk_size):
            rows = _autocast_cast(hidden[start : start + chunk_size], device_type, autocast)
            index = targets[start : start + chunk_size].unsqueeze(1)  # (chunk, 1)
            logits = F.linear(rows, weight_c, bias_c)  # (chunk, vocab) in the matmul dtype
            # The only (chunk, vocab) buffers: `logits` and, for half-precision logits, `probs` (its fp32
            # upcast, as transformers' loss makes); everything below works in place in them.
            probs = logits.float() if logits.dtype in _HALF else logits
            target_logit = probs.gather(1, index)  # (chunk, 1)
            peak = probs.amax(1, keepdim=True)  # (chunk, 1): subtracted so exp cannot overflow
            probs.sub_(peak).exp_()
            total = probs.sum(1, keepdim=True)
            # loss of a row = logsumexp(logits) - logits[target]
            loss += (peak + total.log() - target_logit).sum()
            if not any_grad:
                del logits, probs  # freed before the next chunk's logits are made
                continue
            # d loss / d logits = softmax - onehot(target), in the buffer that held the logits
            probs.div_(total).scatter_add_(1, index, probs.new_full(index.shape, -1.0))
            if grad_bias is not None:
                grad_bias += probs.sum(0)
            # autograd's backward of `.float()` casts the gradient back to the logits' dtype before the
            # matmuls: written into the logits' own buffer (a no-op without the upcast).
            grad_logits = logits.copy_(probs) if probs is not logits else logits
            del logits, probs  # the fp32 block goes before the matmuls
            if grad_hidden is not None:
                grad_hidden[start : start + chunk_size] = grad_logits @ weight_c  # (chunk, h)
            if grad_weight is not None:
                if grad_weight.dtype == grad_logits.dtype:
                    grad_weight.addmm_(grad_logits.T, rows)  # (vocab, h), no temporary
                else:  # a half-precision product (as autograd's), accumulated in fp32
                    grad_weight += grad_logits.T @ rows
            del grad_logits  # freed before the next chunk's logits are made
    return loss, grad_hidden, grad_weight, grad_bias


def _autocast_dtype(dtype: torch.dtype, device_type: str, autocast: bool) -> torch.dtype:
    # autocast casts the floating inputs of a lower-precision op (F.linear) to its dtype, except fp64 ones.
    if autocast and dtype in _AUTOCAST_ELIGIBLE:
        return torch.get_autocast_dtype(device_type)
    return dtype


def _autocast_cast(tensor: torch.Tensor, device_type: str, autocast: bool) -> torch.Tensor:
    return tensor.to(_autocast_dtype(tensor.dtype, device_type, autocast))


def _zeros_for(parameter: torch.Tensor) -> torch.Tensor:
    # gradients of parameters accumulate over chunks in fp32, or in the parameter's dtype if wider
    dtype = torch.promote_types(parameter.dtype, torch.float32)
    return torch.zeros(parameter.shape, dtype=dtype, device=parameter.device)
