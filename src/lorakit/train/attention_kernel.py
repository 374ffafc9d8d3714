"""Which SDPA kernel a training step runs on: the math kernel for short sequences on a CPU.

transformers' ``sdpa`` attention calls ``F.scaled_dot_product_attention``, which on a CPU picks its flash
kernel. For short sequences that kernel's backward is slow: forward + backward of one SmolLM2 layer's
attention (batch 8, 9 query and 3 key/value heads of 64, causal, bf16, one thread) took

======== ======== ======== =============
length   flash    math     math / flash
======== ======== ======== =============
32       6.1 ms   2.9 ms   0.48
64       13.5 ms  8.5 ms   0.63
128      32.1 ms  26.8 ms  0.83
192      44.7 ms  50.5 ms  1.13
512      228 ms   408 ms   1.79
======== ======== ======== =============

so a CPU step whose batch is at most `MATH_MAX_LENGTH` tokens long runs the math kernel. The math kernel
computes in fp32 and keeps its softmax (4 bytes per head and key position) and fp32 copies of q, k and v
for backward, where flash keeps the output and a log-sum-exp: `lorakit.analysis.activations` counts both
(``sdpa`` and ``sdpa-math``). The kernel is chosen in forward; autograd records the math kernel's
operators, so backward follows. CUDA keeps torch's choice (its flash and memory-efficient kernels win at
every length), and so does a model whose attention has dropout (the math kernel would keep a mask too).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

MATH_MAX_LENGTH = 128  # below the measured crossover (about 160 tokens); see the table above

KernelChoice = Callable[[int], contextlib.AbstractContextManager]


def attention_kernel_for(model: nn.Module, device: torch.device) -> KernelChoice:
    """A function of a batch's sequence length giving the context its forward runs in.

    It selects the math kernel when ``device`` is a CPU, ``model`` uses transformers' ``sdpa`` attention
    without attention dropout, and the length is at most `MATH_MAX_LENGTH`; otherwise it changes nothing.
    """
    if device.type != "cpu" or not _sdpa_without_dropout(model):
        return lambda length: contextlib.nullcontext()
    return lambda length: (
        sdpa_kernel([SDPBackend.MATH]) if length <= MATH_MAX_LENGTH else contextlib.nullcontext()
    )


def _sdpa_without_dropout(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    dropout = getattr(config, "attention_dropout", getattr(config, "attention_probs_dropout_prob", 0.0))
    return not dropout
