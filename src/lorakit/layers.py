"""LoRA layers: a frozen base module plus any number of named adapters.

``LoraLinear`` wraps ``nn.Linear``, transformers' ``Conv1D`` (weight stored (in, out)) or bitsandbytes'
``Linear4bit``; ``LoraEmbedding`` wraps ``nn.Embedding``. Their shared bookkeeping is
`lorakit.adapter_layer.AdapterLayer`; a module trained whole is `lorakit.modules_to_save.ModulesToSave`.
Parameter names are PEFT's, so state-dict keys map one to one.

For an input x of shape (..., in) and an active adapter with A (r, in), B (out, r) and scaling s:

    y = base(x) + s · B(A(dropout(x)))

(dropout as `lorakit.input_dropout` draws it: zeros written into x, its 1/(1-p) folded into s).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.adapter_layer import AdapterLayer
from lorakit.base_weights import adapter_dtype, dequantize_weight, is_4bit
from lorakit.dora import DoraMagnitude, dora_delta, row_norm
from lorakit.input_dropout import drop_inputs
from lorakit.recipes import autocast_dtype, cast_for_autocast, mark_recomputable
from lorakit.routing import route_of


class LoraLinear(AdapterLayer):
    """LoRA (and DoRA) around a linear layer: x (..., in) -> (..., out)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        # GPT-2's Conv1D stores its weight as (in, out).
        self.fan_in_fan_out = type(base_layer).__name__ == "Conv1D"
        if self.fan_in_fan_out:
            self.in_features, self.out_features = base_layer.weight.shape
        else:
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()

    def _new_adapter(self, name: str, r: int, dropout: float, init: bool | str, use_dora: bool) -> None:
        weight = self.base_layer.weight
        kwargs = {"device": weight.device, "dtype": adapter_dtype(weight)}
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, **kwargs)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, **kwargs)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._init_weights(name, init)
        if use_dora:
            dense = self._dense_weight().to(kwargs["dtype"])
            self.lora_magnitude_vector[name] = DoraMagnitude(row_norm(dense, self.delta_weight(name)))

    @torch.no_grad()
    def _init_weights(self, name: str, init: bool | str) -> None:
        lora_A, lora_B = self.lora_A[name].weight, self.lora_B[name].weight
        r = lora_A.shape[0]
        if init is False:
            return  # nn.Linear's default init: both factors random, so the adapter changes the output
        if init is True:
            nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
            nn.init.zeros_(lora_B)
        elif init == "gaussian":
            nn.init.normal_(lora_A, std=1 / r)
            nn.init.zeros_(lora_B)
        elif init in ("pissa", "olora"):
            self._init_from_base(name, init)
        else:
            raise ValueError(f"unknown init_lora_weights {init!r}")

    def _init_from_base(self, name: str, init: str) -> None:
        """PiSSA (top singular triplets) or OLoRA (QR): the base keeps the residual; same output."""
        weight = self._dense_weight().to(adapter_dtype(self.base_layer.weight))
        r, s = self.r[name], self.scaling[name]
        if init == "pissa":
            u, sigma, vh = torch.linalg.svd(weight, full_matrices=False)
            root = torch.sqrt(sigma[:r] / s)
            lora_A, lora_B = root[:, None] * vh[:r], u[:, :r] * root
        else:
            q, upper = torch.linalg.qr(weight)
            lora_A, lora_B = upper[:r], q[:, :r]
        self.lora_A[name].weight.copy_(lora_A)
        self.lora_B[name].weight.copy_(lora_B)
        self._write_weight(weight - s * (lora_B @ lora_A))

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """s·B·A, shape (out, in)."""
        lora_A, lora_B = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        return self.scaling[adapter_name] * (lora_B @ lora_A)

    def _dense_weight(self) -> torch.Tensor:
        """The base weight as (out, in), dequantised if the base is 4-bit."""
        if is_4bit(self.base_layer):
            return dequantize_weight(self.base_layer)
        weight = self.base_layer.weight
        return weight.data.T if self.fan_in_fan_out else weight.data

    def _write_weight(self, weight: torch.Tensor) -> None:
        target = self.base_layer.weight.data
        target.copy_(weight.T if self.fan_in_fan_out else weight)

    def _merged_weight(self, name: str, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if name not in self.lora_magnitude_vector:
            return super()._merged_weight(name, weight)
        delta = self.delta_weight(name).to(weight.dtype)
        norm = row_norm(weight, delta)
        factor = self.lora_magnitude_vector[name].weight.detach().to(weight.dtype) / norm
        return factor[:, None] * (weight + delta), norm

    def _unmerged_weight(self, name: str, weight: torch.Tensor, memo: torch.Tensor | None) -> torch.Tensor:
        if name not in self.lora_magnitude_vector:
            return super()._unmerged_weight(name, weight, memo)
        # Merged W' = (m / n)·(W + sBA) with n = ||W + sBA|| taken at merge time (the memo; it cannot be
        # recomputed from W'), so W = W'·(n / m) − sBA.
        assert memo is not None, "a merged DoRA adapter always leaves its norm"
        magnitude = self.lora_magnitude_vector[name].weight.detach().to(weight.dtype)
        delta = self.delta_weight(name).to(weight.dtype)
        return weight * (memo.to(weight.dtype) / magnitude)[:, None] - delta

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        route = route_of(self)
        if route is not None:
            return route.forward(self, x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled or not self.active_adapters:
            return result
        names = self._unmerged_active()
        if self.lora_magnitude_vector:
            # DoRA rescales the base output W·x, so DoRA adapters go first, while `result` is still the
            # untouched base output (their sum is added out of place), and LoRA adapters after.
            base_result = result
            for name in names:
                if name in self.lora_magnitude_vector:
                    # Added in the wider dtype and rounded once (a bf16 base under autocast), as PEFT.
                    result = (result + self._dora_output(base_result, x, name)).to(base_result.dtype)
        for name in names:
            if name not in self.lora_magnitude_vector:
                result = self._add_lora_output(result, x, name)
        return result

    def _add_lora_output(self, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        """result (..., out) + s·B·A·dropout(x), written into ``result`` when that is safe."""
        lora_A, lora_B = self.lora_A[name].weight, self.lora_B[name].weight
        scaling, dropout = self.scaling[name], self.lora_dropout[name]
        lowered = autocast_dtype(x.device.type) if lora_A.dtype != torch.float64 else None
        # Under autocast, cast straight to the matmul dtype (what autocast would do after the cast to the
        # adapter's dtype; the same bits), so lean activations can rebuild the copy.
        x = x.to(lora_A.dtype) if lowered is None else cast_for_autocast(x, lowered)
        if dropout.training and isinstance(dropout, nn.Dropout):
            x, rescale = drop_inputs(x, dropout.p)  # dropout's 1/(1-p) moves into the scaling
            scaling = scaling * rescale
        hidden = F.linear(x, lora_A)  # (..., r)
        if result.dtype != lora_A.dtype or hidden.dtype != result.dtype:
            # A bf16/fp16/4-bit base next to fp32 adapters, or autocast having lowered `hidden` while the
            # base computed in fp32: add in the wider dtype, then round once (as PEFT).
            return torch.add(result, F.linear(hidden, lora_B), alpha=scaling).to(result.dtype)
        # One GEMM accumulates s·(h·Bᵀ) into the base output in place: no scale, add or copy pass over the
        # (tokens, out) output. That is safe because `result` is a fresh tensor that autograd did not save
        # (linear layers save their input and weight, not their output); a base layer that did save it would
        # make autograd raise at backward, never silently differ.
        if result.is_contiguous():
            result.view(-1, result.shape[-1]).addmm_(hidden.reshape(-1, hidden.shape[-1]), lora_B.t(),
                                                      alpha=scaling)
            return result
        return torch.addmm(result.reshape(-1, result.shape[-1]), hidden.reshape(-1, hidden.shape[-1]),
                           lora_B.t(), alpha=scaling).view(result.shape)

    def _dora_output(self, base_result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        """What DoRA adapter ``name`` adds to the base output ``base_result`` (..., out), in the adapter's
        dtype or wider; the caller rounds the sum once."""
        lora_A, lora_B = self.lora_A[name].weight, self.lora_B[name].weight
        x = x.to(lora_A.dtype)
        weight = self._dense_weight().to(x.dtype)
        norm = row_norm(weight, self.delta_weight(name).to(x.dtype))
        dropout = self.lora_dropout[name]
        if isinstance(dropout, nn.Identity) or not self.training:
            bias = self.base_layer.bias
            # Kept in the base output's dtype: an fp32 copy of a bf16 output would be what autograd saves,
            # doubling that memory; the product with the fp32 factor promotes anyway.
            base_no_bias = base_result if bias is None else base_result - bias.to(base_result.dtype)
        else:
            # Dropout changes x, so the base term is recomputed on the dropped-out input (as PEFT).
            x = dropout(x)
            base_no_bias = F.linear(x, weight)
        lowered = autocast_dtype(x.device.type) if lora_A.dtype != torch.float64 else None
        hidden = F.linear(x if lowered is None else cast_for_autocast(x, lowered), lora_A)  # (..., r)
        lora_out = F.linear(hidden, lora_B)
        mark_recomputable(lora_out, F.linear, hidden, lora_B)  # (..., out) rebuilt from (..., r)
        magnitude = self.lora_magnitude_vector[name].weight
        return dora_delta(base_no_bias, lora_out, magnitude, norm, self.scaling[name])


class LoraEmbedding(AdapterLayer):
    """LoRA around an embedding: ids (...) -> (..., embedding_dim).

    ``lora_embedding_A[name]`` is (r, num_embeddings) and ``lora_embedding_B[name]`` (embedding_dim, r),
    so the update of the (num_embeddings, embedding_dim) table is s·(B·A)ᵀ.
    """

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()

    def _new_adapter(self, name: str, r: int, dropout: float, init: bool | str, use_dora: bool) -> None:
        weight = self.base_layer.weight
        kwargs = {"device": weight.device, "dtype": adapter_dtype(weight)}
        lora_A = torch.empty(r, self.base_layer.num_embeddings, **kwargs)
        lora_B = torch.empty(self.base_layer.embedding_dim, r, **kwargs)
        if init is False:
            nn.init.normal_(lora_A)
            nn.init.normal_(lora_B)
        else:  # True and "gaussian" alike, as PEFT: zero A, normal B (nn.Embedding's own init)
            nn.init.zeros_(lora_A)
            nn.init.normal_(lora_B)
        self.lora_embedding_A[name] = nn.Parameter(lora_A)
        self.lora_embedding_B[name] = nn.Parameter(lora_B)
        # Dropout is meaningless on integer ids; kept as Identity so the layout matches PEFT's.
        self.lora_dropout[name] = nn.Identity()

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """s·(B·A)ᵀ, shape (num_embeddings, embedding_dim)."""
        lora_A, lora_B = self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]
        return self.scaling[adapter_name] * (lora_B @ lora_A).T

    def _dense_weight(self) -> torch.Tensor:
        return self.base_layer.weight.data

    def _write_weight(self, weight: torch.Tensor) -> None:
        self.base_layer.weight.data.copy_(weight)

    def embed(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """Look ids up in ``table`` (num_embeddings, d) with the base embedding's options."""
        base = self.base_layer
        return F.embedding(ids, table, base.padding_idx, base.max_norm, base.norm_type,
                           base.scale_grad_by_freq, base.sparse)

    def forward(self, ids: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        route = route_of(self)
        if route is not None:
            return route.forward(self, ids, *args, **kwargs)
        result = self.base_layer(ids, *args, **kwargs)
        if self.disabled:
            return result
        for name in self.active_adapters:
            if name not in self.r or name in self.merged_adapters:
                continue
            lora_A, lora_B = self.lora_embedding_A[name], self.lora_embedding_B[name]
            hidden = self.embed(ids, lora_A.T)
            result = result + (self.scaling[name] * (hidden @ lora_B.T)).to(result.dtype)
        return result



def wrap(module: nn.Module) -> AdapterLayer:
    """A new, adapter-less LoRA wrapper for ``module``, in ``module``'s train / eval mode.

    The mode matters: adapters added to a model in eval mode must not run dropout (two identical greedy
    ``generate`` calls would differ), as PEFT's loaded adapters do not.
    """
    layer = LoraEmbedding(module) if isinstance(module, nn.Embedding) else LoraLinear(module)
    return layer.train(module.training)
