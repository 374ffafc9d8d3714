"""Read model folders and PEFT adapter folders for analysis, one tensor at a time.

The analysis commands compare checkpoints that may be far larger than memory, so a model folder is
opened lazily (``safetensors.safe_open``) and tensors are read by name only when they are analysed.
An adapter folder is small (A and B only) and is read whole.

The on-disk adapter layout is PEFT's:

    adapter_config.json                 r, lora_alpha, use_rslora, rank_pattern, alpha_pattern, ...
    adapter_model.safetensors           base_model.model.<path>.lora_A.weight        (r, in)
                                        base_model.model.<path>.lora_B.weight        (out, r)
                                        base_model.model.<path>.lora_embedding_A     (r, num_embeddings)
                                        base_model.model.<path>.lora_embedding_B     (embedding_dim, r)
                                        base_model.model.<path>.lora_magnitude_vector (out,)   DoRA only
                                        base_model.model.<path>.weight               modules_to_save copies
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lorakit.matching import pattern_value

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."

_LORA_SUFFIXES = {
    ".lora_A.weight": ("linear", "A"),
    ".lora_B.weight": ("linear", "B"),
    ".lora_embedding_A": ("embedding", "A"),
    ".lora_embedding_B": ("embedding", "B"),
    ".lora_magnitude_vector": ("linear", "magnitude"),
}


def is_adapter_folder(path: str | Path) -> bool:
    """True when ``path`` holds a PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    path = Path(path)
    return (path / ADAPTER_CONFIG).is_file() and (path / ADAPTER_WEIGHTS).is_file()


def lora_scaling(config: dict, module: str) -> tuple[int, float]:
    """(r, scaling) of ``module`` under a PEFT ``adapter_config.json`` dict.

    scaling = lora_alpha / r, or lora_alpha / sqrt(r) with ``use_rslora``; ``rank_pattern`` and
    ``alpha_pattern`` override r and alpha per module.
    """
    r = int(pattern_value(config.get("rank_pattern") or {}, module, config.get("r", 8)))
    alpha = float(pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8)))
    if r <= 0:
        raise ValueError(f"rank of {module!r} must be positive, got r={r}")
    scaling = alpha / math.sqrt(r) if config.get("use_rslora", False) else alpha / r
    return r, scaling


@dataclass(frozen=True)
class LoraPair:
    """One adapted module of an adapter file.

    ``lora_A`` is (r, in) and ``lora_B`` is (out, r) for a linear layer; for an embedding, A is
    (r, num_embeddings) and B is (embedding_dim, r). The update in the base weight's own orientation
    is ``delta_weight()``.
    """

    module: str
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float
    kind: Literal["linear", "embedding"] = "linear"
    fan_in_fan_out: bool = False
    magnitude: torch.Tensor | None = None

    @property
    def r(self) -> int:
        return int(self.lora_A.shape[0])

    @property
    def transposed(self) -> bool:
        """True when the base weight is stored as (in, out): embeddings and Conv1D (fan_in_fan_out)."""
        return self.kind == "embedding" or self.fan_in_fan_out

    @property
    def delta_shape(self) -> tuple[int, int]:
        """Shape of the update in the base weight's orientation, without forming it."""
        out_features, in_features = int(self.lora_B.shape[0]), int(self.lora_A.shape[1])
        return (in_features, out_features) if self.transposed else (out_features, in_features)

    def delta_weight(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """scaling · B @ A in the base weight's orientation: (out, in), or (in, out) when transposed."""
        delta = self.scaling * (self.lora_B.to(dtype) @ self.lora_A.to(dtype))
        return delta.T if self.transposed else delta


@dataclass(frozen=True)
class Adapter:
    """A PEFT adapter folder in memory: its config, its LoRA pairs and its full-copy tensors."""

    path: Path
    config: dict
    pairs: dict[str, LoraPair]
    full_tensors: dict[str, torch.Tensor]

    @property
    def use_dora(self) -> bool:
        return bool(self.config.get("use_dora", False))


def _strip_prefix(key: str) -> str:
    return key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key


def load_adapter_folder(path: str | Path) -> Adapter:
    """Read a PEFT adapter folder; raise ``FileNotFoundError``/``ValueError`` naming what is wrong."""
    path = Path(path)
    if not is_adapter_folder(path):
        raise FileNotFoundError(
            f"{path} is not a PEFT adapter folder: it needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}"
        )
    config = json.loads((path / ADAPTER_CONFIG).read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {config.get('peft_type')!r} is not LORA")
    tensors = load_file(path / ADAPTER_WEIGHTS)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    kinds: dict[str, str] = {}
    full: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        name = _strip_prefix(key)
        for suffix, (kind, part) in _LORA_SUFFIXES.items():
            if name.endswith(suffix):
                module = name[: -len(suffix)]
                parts.setdefault(module, {})[part] = tensor
                if part != "magnitude":
                    kinds[module] = kind
                break
        else:
            # modules_to_save copies and saved embedding layers: full tensors that replace the base's.
            full[name.replace(".base_layer.", ".")] = tensor
    pairs: dict[str, LoraPair] = {}
    for module, found in parts.items():
        if "A" not in found or "B" not in found:
            raise ValueError(f"{path}: module {module!r} has {sorted(found)} but needs both A and B")
        r, scaling = lora_scaling(config, module)
        lora_A, lora_B = found["A"], found["B"]
        if lora_A.shape[0] != r or lora_B.shape[1] != r:
            raise ValueError(
                f"{path}: {module!r} has A {tuple(lora_A.shape)} and B {tuple(lora_B.shape)} "
                f"but adapter_config.json gives r={r}"
            )
        pairs[module] = LoraPair(
            module=module,
            lora_A=lora_A,
            lora_B=lora_B,
            scaling=scaling,
            kind=kinds[module],  # type: ignore[arg-type]
            fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
            magnitude=found.get("magnitude"),
        )
    if not pairs and not full:
        raise ValueError(f"{path}: {ADAPTER_WEIGHTS} holds no LoRA tensors")
    return Adapter(path=path, config=config, pairs=dict(sorted(pairs.items())), full_tensors=full)


class ModelFolder:
    """The tensors of a model folder (one or more ``*.safetensors`` files), opened lazily.

    Use as a context manager; ``names()`` lists tensor names, ``get(name)`` reads one tensor.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        files = sorted(self.path.glob("*.safetensors")) if self.path.is_dir() else [self.path]
        files = [f for f in files if f.name != ADAPTER_WEIGHTS]
        if not files or not all(f.is_file() for f in files):
            raise FileNotFoundError(f"{self.path} holds no *.safetensors model weights")
        self._files = files
        self._stack = ExitStack()
        self._where: dict[str, object] = {}

    def __enter__(self) -> ModelFolder:
        for file in self._files:
            handle = self._stack.enter_context(safe_open(str(file), framework="pt"))
            for name in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                self._where[name] = handle
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name].get_slice(name).get_shape())  # type: ignore[attr-defined]

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise KeyError(f"{self.path} has no tensor {name!r}")
        return self._where[name].get_tensor(name)  # type: ignore[attr-defined]

    def matrices(self) -> Iterator[str]:
        """Names of the 2-D tensors, in file order."""
        return (name for name in self._where if len(self.shape(name)) == 2)


def resolve_name(name: str, names: set[str]) -> str | None:
    """``name`` itself if present, else the one name that differs from it by a leading prefix only.

    Folders of the same model saved from different classes disagree on the prefix: ``bert.encoder...``
    (BertForSequenceClassification) against ``encoder...`` (BertModel).
    """
    if name in names:
        return name
    candidates = [n for n in names if n.endswith("." + name) or name.endswith("." + n)]
    return candidates[0] if len(candidates) == 1 else None


def resolve_base_name(module: str, names: set[str]) -> str:
    """The base tensor name ``<module>.weight``, tolerating a leading prefix difference.

    An adapter trained on ``LlamaForCausalLM`` names ``model.layers.0...``; a base folder saved from
    ``LlamaModel`` names ``layers.0...``. Exact match first, then a unique dotted-suffix match.
    """
    found = resolve_name(f"{module}.weight", names)
    if found is not None:
        return found
    example = sorted(names)[:3]
    raise KeyError(f"base model has no weight for adapted module {module!r} (base names look like {example})")
