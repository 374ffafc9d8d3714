"""What every LoRA layer shares: the wrapped base module, the named adapters, which are active and which
merged, and which adapters a base module supports. `lorakit.layers` holds the layers themselves."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lorakit.base_weights import is_4bit
from lorakit.config import lora_scaling

ADAPTER_PARAMETER_PREFIXES = (
    "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector",
)


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

