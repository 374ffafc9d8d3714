"""The tensors of a model folder (one or more ``*.safetensors`` files), opened lazily.

Analysis and export compare checkpoints that may be far larger than memory, so a folder is opened with
``safetensors.safe_open`` and tensors are read by name only when they are needed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from lorakit.peft_format import WEIGHTS_NAME

# What ``save_pretrained`` writes for a model and its tokenizer (glob patterns): a folder holding only
# these is a saved model.
SAVED_MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
)

class ModelFolder:
    """The tensors of a model folder (one or more ``*.safetensors`` files), opened lazily.

    Use as a context manager; ``names()`` lists tensor names, ``get(name)`` reads one tensor.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        files = sorted(self.path.glob("*.safetensors")) if self.path.is_dir() else [self.path]
        files = [f for f in files if f.name != WEIGHTS_NAME]
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
