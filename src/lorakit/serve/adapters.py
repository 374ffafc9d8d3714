"""Adapters a server can serve: the catalog of names, parsing a PEFT folder into slot weights, combinations.

A served adapter is a PEFT-format folder (``adapter_config.json`` + ``adapter_model.safetensors``). It is
parsed once into `SlotWeights` per module (scaling folded into B, the DoRA factor computed against the
base weight), checked against the base model, and kept in a host-memory LRU (`HostCache`) from which
slots are filled. A model name ``"a*0.7+b*0.3"`` asks for a weighted combination of served adapters,
built exactly by rank concatenation (as ``combine_adapters(method="cat")``): A = [A_a; A_b],
s·B = [0.7·s_a·B_a, 0.3·s_b·B_b], so ΔW = 0.7·ΔW_a + 0.3·ΔW_b.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lorakit.dora import row_norm
from lorakit.peft_format import is_adapter_folder, load_adapter_folder
from lorakit.serve.errors import ServeError
from lorakit.serve.pool import SlotWeights, dense_weight, module_shape

_NAME = re.compile(r"^[A-Za-z0-9_.:/@-]+$")
_TERM = re.compile(r"^\s*([A-Za-z0-9_.:/@-]+)\s*(?:\*\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?))?\s*$")


class AdapterError(ServeError):
    """An adapter that cannot be served (unknown: status 404; unloadable or not fitting the base: 400)."""

    def __init__(self, message: str, status: int = 400, param: str | None = "model") -> None:
        super().__init__(message, status, param)


@dataclass(frozen=True)
class ParsedAdapter:
    """An adapter ready for a slot: module name -> weights; ``rank`` is the largest module rank."""

    name: str
    weights: dict[str, SlotWeights]
    use_dora: bool

    @property
    def rank(self) -> int:
        return max((w.r for w in self.weights.values()), default=0)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for w in self.weights.values()
                   for t in (w.lora_A, w.lora_B, w.dora_factor) if t is not None)


def check_adapter_name(name: str) -> None:
    """Served names may not contain ``*``, ``+`` or spaces (they would read as a combination)."""
    if not name or not _NAME.match(name):
        raise AdapterError(f"adapter name {name!r} must be non-empty and use only letters, digits and _.:/@-",
                           param="lora_name")


def parse_combination(model_name: str) -> list[tuple[str, float]] | None:
    """``"a*0.7+b*0.3"`` -> [("a", 0.7), ("b", 0.3)]; None when ``model_name`` is not a combination.

    A term without a weight (``"a+b"``) has weight 1. Raises AdapterError on a malformed expression.
    """
    if "*" not in model_name and "+" not in model_name:
        return None
    terms = []
    for text in model_name.split("+"):
        match = _TERM.match(text)
        if match is None:
            raise AdapterError(f"model {model_name!r}: cannot read {text!r} as 'adapter*weight'")
        terms.append((match.group(1), float(match.group(2)) if match.group(2) else 1.0))
    names = [name for name, _ in terms]
    if len(set(names)) != len(names):
        raise AdapterError(f"model {model_name!r} names an adapter twice")
    return terms


def involves(key: str, name: str) -> bool:
    """True when adapter key ``key`` is ``name`` or a combination with ``name`` as a term."""
    terms = parse_combination(key)
    return key == name if terms is None else any(term == name for term, _ in terms)


def parse_adapter_folder(name: str, folder: Path, modules: dict[str, nn.Module], max_rank: int,
                         dtype: torch.dtype = torch.float32) -> ParsedAdapter:
    """Read ``folder`` and check it against the base model's ``modules`` (qualified name -> module).

    Raises:
        AdapterError: not an adapter folder, a module the base lacks or cannot adapt, shapes that do not fit
            the base, a rank above ``max_rank``, or full-module copies (``modules_to_save``), which cannot
            share a forward pass with other rows.
    """
    try:
        adapter = load_adapter_folder(folder)
    except (OSError, ValueError) as error:
        raise AdapterError(f"adapter {name!r} failed to load: {error}") from error
    if adapter.full_tensors:
        raise AdapterError(f"adapter {name!r} trains whole modules ({sorted(adapter.full_tensors)[:3]}); "
                           "only LoRA factors can be served in a shared batch")
    weights: dict[str, SlotWeights] = {}
    for module_name, pair in adapter.pairs.items():
        module = modules.get(module_name)
        if module is None:
            raise AdapterError(f"adapter {name!r} adapts {module_name!r}, which the base model does not have")
        try:
            kind, in_features, out_features = module_shape(module)
        except ValueError as error:
            raise AdapterError(f"adapter {name!r}: module {module_name!r}: {error}") from error
        expected_A = (pair.r, in_features)
        if kind != pair.kind or tuple(pair.lora_A.shape) != expected_A or \
                tuple(pair.lora_B.shape) != (out_features, pair.r):
            raise AdapterError(f"adapter {name!r} does not fit the base model at {module_name!r}: A "
                               f"{tuple(pair.lora_A.shape)}, B {tuple(pair.lora_B.shape)} against a "
                               f"{kind} layer ({in_features} -> {out_features})")
        if pair.r > max_rank:
            raise AdapterError(f"adapter {name!r} has rank {pair.r} at {module_name!r}, above the server's "
                               f"--max-lora-rank {max_rank}")
        lora_A = pair.lora_A.to(dtype)
        lora_B = (pair.scaling * pair.lora_B.to(dtype))
        factor = None
        if pair.magnitude is not None:
            weight = dense_weight(module).to(dtype)
            factor = pair.magnitude.to(dtype) / row_norm(weight, lora_B @ lora_A)
        weights[module_name] = SlotWeights(lora_A.contiguous(), lora_B.contiguous(), factor)
    return ParsedAdapter(name, weights, adapter.use_dora)


def combine(name: str, parts: list[tuple[ParsedAdapter, float]], max_rank: int) -> ParsedAdapter:
    """The exact weighted sum of ``parts`` by rank concatenation, one module at a time.

    Raises:
        AdapterError: a DoRA part (its magnitude has no linear combination) or a combined rank above
            ``max_rank``.
    """
    for adapter, _ in parts:
        if adapter.use_dora or any(w.dora_factor is not None for w in adapter.weights.values()):
            raise AdapterError(f"model {name!r}: adapter {adapter.name!r} is DoRA; DoRA adapters cannot be "
                               "combined (their magnitude vectors have no linear combination)")
    modules = sorted({m for adapter, _ in parts for m in adapter.weights})
    weights: dict[str, SlotWeights] = {}
    for module in modules:
        pieces = [(adapter.weights[module], w) for adapter, w in parts if module in adapter.weights]
        lora_A = torch.cat([p.lora_A for p, _ in pieces], dim=0)
        lora_B = torch.cat([w * p.lora_B for p, w in pieces], dim=1)
        if lora_A.shape[0] > max_rank:
            raise AdapterError(f"model {name!r} has combined rank {lora_A.shape[0]} at {module!r}, above the "
                               f"server's --max-lora-rank {max_rank}")
        weights[module] = SlotWeights(lora_A, lora_B, None)
    return ParsedAdapter(name, weights, False)


class AdapterCatalog:
    """Served adapter names and their folders: the sub-folders of ``--adapters DIR`` plus run-time loads.

    Thread-safe; names are checked with `check_adapter_name`.
    """

    def __init__(self, directory: str | Path | None = None) -> None:
        self._lock = threading.Lock()
        self._paths: dict[str, Path] = {}
        if directory is not None:
            directory = Path(directory)
            if not directory.is_dir():
                raise FileNotFoundError(f"--adapters {directory}: not a folder")
            for child in sorted(directory.iterdir()):
                if child.is_dir() and is_adapter_folder(child) and _NAME.match(child.name):
                    self._paths[child.name] = child

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._paths)

    def path(self, name: str) -> Path | None:
        with self._lock:
            return self._paths.get(name)

    def add(self, name: str, path: str | Path) -> None:
        check_adapter_name(name)
        path = Path(path)
        if not is_adapter_folder(path):
            raise AdapterError(f"lora_path {str(path)!r} is not a PEFT adapter folder (it needs "
                               "adapter_config.json and adapter_model.safetensors)", param="lora_path")
        with self._lock:
            if name in self._paths:
                raise AdapterError(f"adapter {name!r} is already loaded; unload it first", param="lora_name")
            self._paths[name] = path

    def remove(self, name: str) -> None:
        with self._lock:
            if name not in self._paths:
                raise AdapterError(f"no adapter named {name!r} is loaded", status=404, param="lora_name")
            del self._paths[name]


class HostCache:
    """A thread-safe LRU of parsed adapters in host memory, at most ``capacity`` entries."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"max_cpu_loras must be >= 1, got {capacity}")
        self.capacity = capacity
        self._items: OrderedDict[str, ParsedAdapter] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> ParsedAdapter | None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def put(self, key: str, item: ParsedAdapter) -> None:
        with self._lock:
            self._items[key] = item
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def drop(self, predicate: Callable[[str], bool]) -> None:
        """Forget every entry whose key satisfies ``predicate``."""
        with self._lock:
            for key in [k for k in self._items if predicate(k)]:
                del self._items[key]

    def __len__(self) -> int:
        return len(self._items)
