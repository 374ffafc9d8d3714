"""The frozen base layer's weight: 4-bit (bitsandbytes) or dense, read as fp32, and the dtype its adapters
train in."""

from __future__ import annotations

import copy

import torch
from torch import nn


def is_4bit(module: nn.Module) -> bool:
    return type(module).__name__ == "Linear4bit"


def dequantize_weight(module: nn.Module) -> torch.Tensor:
    """The fp32 (out, in) weight of a bitsandbytes ``Linear4bit``, the module left exactly as it is.

    bitsandbytes repacks an NF4 weight for its bf16 CPU kernel on the first eval-mode forward, and
    ``dequantize_4bit`` reads only the canonical layout. The inverse conversion (private in bitsandbytes,
    which calls it itself before saving) is run on a copy of the quantisation state, never written back:
    writing it back would make bitsandbytes repack the weight again on the next forward.
    """
    import bitsandbytes.functional as bnbf

    weight = module.weight
    data, state = weight.data, weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        state = copy.copy(state)
        # Packing keeps the block scales unquantised (in bf16, as its kernel reads them); quantising them
        # again on the way back would move the weight further from what the forward computes with.
        state.original_nested = False
        data, state = bnbf._convert_weight_packed_for_cpu_inverse(data, state)
    return bnbf.dequantize_4bit(data, state).to(torch.float32)


def adapter_dtype(base_weight: torch.Tensor) -> torch.dtype:
    # Adapters train in fp32 next to a bf16/fp16/4-bit base (as PEFT's autocast_adapter_dtype); fp64 bases
    # keep fp64 so the tests can compare against the float64 NumPy oracle.
    return base_weight.dtype if base_weight.dtype in (torch.float32, torch.float64) else torch.float32
