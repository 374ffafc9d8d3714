"""LoRA layers: a frozen base module plus any number of named adapters.

``LoraLinear`` wraps ``nn.Linear``, transformers' ``Conv1D`` (weight stored (in, out)) or bitsandbytes'
``Linear4bit``; ``LoraEmbedding`` wraps ``nn.Embedding``; ``ModulesToSave`` keeps a trainable copy of a
whole module per adapter. Parameter names are PEFT's, so state-dict keys map one to one.

For an input x of shape (..., in) and an active adapter with A (r, in), B (out, r) and scaling s:

    y = base(x) + s · B(A(dropout(x)))

(dropout as `lorakit.input_dropout` draws it: zeros written into x, its 1/(1-p) folded into s).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.config import lora_scaling
from lorakit.dora import DoraMagnitude, dora_delta, row_norm
from lorakit.input_dropout import drop_inputs
from lorakit.recipes import autocast_dtype, cast_for_autocast, mark_recomputable
from lorakit.routing import route_of

ADAPTER_PARAMETER_PREFIXES = (
    "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector",
)


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


def check_supported(name: str, module: nn.Module, use_dora: bool, init: bool | str, r: int = 1) -> None:
    """Raise ValueError when lorakit cannot give ``module`` (or the base inside a wrapper) such an adapter.

    Run on every target before anything is created, because PiSSA/OLoRA rewrite base weights at creation.
    """
    base = module.base_layer if isinstance(module, AdapterLayer) else module
    if isinstance(base, nn.Embedding):
        if use_dora:
            raise ValueError(f"module {name!r} is an nn.Embedding: DoRA is supported on linear layers only; "
                             "exclude it or set use_dora=False")
        if init in ("pissa", "olora"):
            raise ValueError(f"module {name!r} is an nn.Embedding: init_lora_weights={init!r} is supported "
                             "on linear layers only")
    elif is_4bit(base) and init in ("pissa", "olora"):
        raise ValueError(f"module {name!r} is 4-bit: init_lora_weights={init!r} rewrites the base weight and "
                         "needs a full-precision base")
    elif init in ("pissa", "olora"):
        # The factors come from r singular / QR directions of W, which has at most min(in, out) of them.
        weight = base.weight
        limit = min(weight.shape[0], weight.shape[1])
        if r > limit:
            raise ValueError(f"module {name!r} has a {tuple(weight.shape)} weight: "
                             f"init_lora_weights={init!r} needs r <= {limit}, got r={r}")


def _adapter_dtype(base_weight: torch.Tensor) -> torch.dtype:
    # Adapters train in fp32 next to a bf16/fp16/4-bit base (as PEFT's autocast_adapter_dtype); fp64 bases
    # keep fp64 so the tests can compare against the float64 NumPy oracle.
    return base_weight.dtype if base_weight.dtype in (torch.float32, torch.float64) else torch.float32


class WrapsBase(nn.Module):
    """A module around ``base_layer`` whose unknown attributes are the base's: code written for the base
    module (``layer.weight``, ``layer.in_features``, ``lm_head.out_features``) keeps working."""

    base_layer: nn.Module

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)


class AdapterLayer(WrapsBase):
    """Bookkeeping shared by the LoRA layers: adapter names, which are active, which are merged.

    Subclasses provide ``_new_adapter``, ``delta_weight``, ``_dense_weight`` and ``_write_weight``.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        # What unmerge needs beyond the adapter itself, per merged adapter (DoRA: the norm at merge time).
        self.merge_memos: dict[str, torch.Tensor] = {}
        self.disabled = False

    @property
    def adapter_names(self) -> list[str]:
        return list(self.r)

    def add_adapter(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        init_lora_weights: bool | str = True,
        use_rslora: bool = False,
        use_dora: bool = False,
    ) -> None:
        """Create adapter ``adapter_name`` (inactive), its weights initialised per ``init_lora_weights``."""
        if adapter_name in self.r:
            raise ValueError(f"adapter {adapter_name!r} already exists in this layer")
        check_supported(type(self.base_layer).__name__, self, use_dora, init_lora_weights, r)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_scaling(lora_alpha, r, use_rslora)
        try:
            self._new_adapter(adapter_name, r, lora_dropout, init_lora_weights, use_dora)
        except Exception:
            self.delete_adapter(adapter_name)
            raise
        self._match_mode(adapter_name)

    def _match_mode(self, adapter_name: str) -> None:
        """The new adapter's modules (dropout above all) take this layer's train / eval mode."""
        for prefix in (*ADAPTER_PARAMETER_PREFIXES, "lora_dropout"):
            container = self._modules.get(prefix)
            if container is not None and adapter_name in container:
                container.train(self.training)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise RuntimeError(f"adapter {adapter_name!r} is merged; unmerge before deleting it")
        for prefix in (*ADAPTER_PARAMETER_PREFIXES, "lora_dropout"):
            container = self._modules.get(prefix)
            if container is not None and adapter_name in container:
                del container[adapter_name]
        for table in (self.r, self.lora_alpha, self.scaling):
            table.pop(adapter_name, None)
        if adapter_name in self.active_adapters:
            self.active_adapters.remove(adapter_name)

    def set_active(self, adapter_names: list[str]) -> None:
        """The model-wide active list; adapters this layer lacks are skipped at forward time."""
        self.active_adapters = list(adapter_names)

    def _unmerged_active(self) -> list[str]:
        return [n for n in self.active_adapters if n in self.r and n not in self.merged_adapters]

    # --- merging -----------------------------------------------------------------------------------------

    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Add the adapters' updates into the base weight (default: the active adapters), all or nothing.

        Raises:
            RuntimeError: an adapter is already merged, the base is 4-bit, or ``safe_merge`` found a
                non-finite merged weight. The layer is then unchanged.
        """
        names = self.check_merge(adapter_names)
        weight, memos = self._merge_result(names)
        if safe_merge and not torch.isfinite(weight).all():
            raise RuntimeError(f"merging adapters {names} gives non-finite weights; the layer is unchanged")
        self._write_weight(weight)
        self.merged_adapters.extend(names)
        self.merge_memos.update(memos)

    def check_merge(self, adapter_names: list[str] | None) -> list[str]:
        """The adapters `merge` would fold in, checked; raises before anything is written."""
        if adapter_names is None:
            adapter_names = [n for n in self.active_adapters if n in self.r]
        names = list(adapter_names)
        for name in names:
            if name not in self.r:
                raise ValueError(f"no adapter named {name!r} in this layer; it has {self.adapter_names}")
            if name in self.merged_adapters or names.count(name) > 1:
                raise RuntimeError(f"adapter {name!r} is already merged into this layer; merging it twice "
                                   "would add its update twice")
        if names and is_4bit(self.base_layer):
            raise RuntimeError("cannot merge into a 4-bit base in place: use merge_and_unload(), which "
                               "dequantises the base and returns a full-precision model")
        return names

    def merged_weight(self, names: list[str]) -> torch.Tensor:
        """The base weight (out, in) with ``names`` merged in, nothing written (``check_merge`` first)."""
        return self._merge_result(names)[0]

    def _merge_result(self, names: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The base weight with ``names`` merged in order (nothing written), and what unmerge will need."""
        weight, memos = self._dense_weight(), {}
        for name in names:
            weight, memo = self._merged_weight(name, weight)
            if memo is not None:
                memos[name] = memo
        return weight, memos

    def unmerge(self) -> None:
        """Subtract every merged adapter again, last merged first."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            memo = self.merge_memos.pop(name, None)
            self._write_weight(self._unmerged_weight(name, self._dense_weight(), memo))

    def _merged_weight(self, name: str, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight + ΔW, None); DoRA overrides it and returns the norm its unmerge needs instead of None."""
        return weight + self.delta_weight(name).to(weight.dtype), None

    def _unmerged_weight(self, name: str, weight: torch.Tensor, memo: torch.Tensor | None) -> torch.Tensor:
        return weight - self.delta_weight(name).to(weight.dtype)

    def suspend_merge(self) -> Callable[[], None]:
        """Unmerge for a while; the returned function puts the merged weights back bit for bit.

        Re-merging would round a bf16 / fp16 base a second time on every use (`disable_adapters`); the
        merged weight is copied aside instead, at the cost of one copy of this layer's weight.
        """
        if not self.merged_adapters:
            return lambda: None
        weight = self.base_layer.weight
        saved = weight.data.clone()
        merged, memos = list(self.merged_adapters), dict(self.merge_memos)
        self.unmerge()

        def restore() -> None:
            weight.data.copy_(saved)
            self.merged_adapters[:] = merged
            self.merge_memos.update(memos)

        return restore

    def merged_module(self) -> nn.Module:
        """The base module with the active, not yet merged adapters folded in (for merge_and_unload)."""
        if is_4bit(self.base_layer):
            return self._dequantised_linear()
        self.merge(self._unmerged_active())
        return self.base_layer

    def _dequantised_linear(self) -> nn.Linear:
        weight, _ = self._merge_result(self._unmerged_active())
        base = self.base_layer
        linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                           device=weight.device, dtype=weight.dtype)
        linear.weight.data.copy_(weight)
        if base.bias is not None:
            linear.bias.data.copy_(base.bias.data.to(weight.dtype))
        linear.requires_grad_(False)
        return linear

    # --- to be provided by subclasses --------------------------------------------------------------------

    def _new_adapter(self, name: str, r: int, dropout: float, init: bool | str, use_dora: bool) -> None:
        raise NotImplementedError

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        raise NotImplementedError

    def _dense_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def _write_weight(self, weight: torch.Tensor) -> None:
        raise NotImplementedError


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
        kwargs = {"device": weight.device, "dtype": _adapter_dtype(weight)}
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
        weight = self._dense_weight().to(_adapter_dtype(self.base_layer.weight))
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
        kwargs = {"device": weight.device, "dtype": _adapter_dtype(weight)}
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


class ModulesToSave(nn.Module):
    """A module trained whole: the frozen ``original_module`` and a trainable copy per adapter."""

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disabled = False
        self.train(original_module.training)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "original_module":
                raise
            return getattr(self.original_module, name)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save)

    def add_adapter(self, adapter_name: str) -> None:
        copied = copy.deepcopy(self.original_module)
        self.modules_to_save[adapter_name] = copied.train(self.training)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        if adapter_name in self.active_adapters:
            self.active_adapters.remove(adapter_name)

    def set_active(self, adapter_names: list[str]) -> None:
        self.active_adapters = list(adapter_names)

    def active_module(self) -> nn.Module:
        """The copy of the active adapter that has one, else the original.

        Copies of whole modules cannot be summed like LoRA updates: with several active adapters that have
        a copy, the first is used and a warning says so (PEFT refuses this case outright).
        """
        if self.disabled:
            return self.original_module
        with_copy = [name for name in self.active_adapters if name in self.modules_to_save]
        if len(with_copy) > 1:
            warnings.warn(f"adapters {with_copy} are active together and each has its own copy of this "
                          f"module ({type(self.original_module).__name__}); copies cannot be combined, "
                          f"so only {with_copy[0]!r}'s is used", stacklevel=3)
        return self.modules_to_save[with_copy[0]] if with_copy else self.original_module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        route = route_of(self)
        if route is not None:
            return route.forward(self, *args, **kwargs)
        return self.active_module()(*args, **kwargs)


def wrap(module: nn.Module) -> AdapterLayer:
    """A new, adapter-less LoRA wrapper for ``module``, in ``module``'s train / eval mode.

    The mode matters: adapters added to a model in eval mode must not run dropout (two identical greedy
    ``generate`` calls would differ), as PEFT's loaded adapters do not.
    """
    layer = LoraEmbedding(module) if isinstance(module, nn.Embedding) else LoraLinear(module)
    return layer.train(module.training)
