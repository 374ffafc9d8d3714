"""PEFT's on-disk adapter format, in one place: file names, tensor keys, the config and the scaling rule.

A PEFT LoRA adapter is a folder with ``adapter_config.json`` and ``adapter_model.safetensors``. A tensor key
is the module's path in the model with ``base_model.model.`` in front and the part after it (see
docs/adapter-files.md for the full table):

    base_model.model.<path>.lora_A.weight            (r, in)
    base_model.model.<path>.lora_B.weight            (out, r)
    base_model.model.<path>.lora_embedding_A         (r, num_embeddings)
    base_model.model.<path>.lora_embedding_B         (embedding_dim, r)
    base_model.model.<path>.lora_magnitude_vector    (out,)             DoRA only
    base_model.model.<path>.weight / .bias           modules_to_save copies, saved embedding layers, biases

This module knows the format and nothing of live models: `lorakit.adapter_files` maps a model's adapters
onto it, and the analysis, export and shipping code read folders through it. Nothing else re-derives key
names or the scaling rule.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import safetensors.torch
import torch
from safetensors import SafetensorError

from lorakit.config import PEFT_ONLY_FIELDS, LoraConfig, lora_scaling
from lorakit.matching import CLASSIFIER_HEAD_NAMES, pattern_value

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# The PEFT release whose file format (and LoraConfig field set) lorakit writes.
PEFT_FORMAT_VERSION = "0.21.2"
# PEFT saves the (base) weights of a targeted embedding layer when target_modules names one of these.
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")

# The adapter's own tensors: in-memory container name -> the key's ending in the file.
LORA_PARTS: dict[str, str] = {
    "lora_A": ".lora_A.weight",
    "lora_B": ".lora_B.weight",
    "lora_embedding_A": ".lora_embedding_A",
    "lora_embedding_B": ".lora_embedding_B",
    "lora_magnitude_vector": ".lora_magnitude_vector",
}

# PEFT features that change what the adapter computes (or which tensors it has): a file that uses one is
# refused rather than loaded into something that silently computes a different function.
REFUSED_WHEN_SET = (
    "lora_bias",
    "use_qalora",
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
    "alora_invocation_tokens",
    "use_bdlora",
    "arrow_config",
    "monteclora_config",
    "kasa_config",
    "velora_config",
    "megatron_config",
)
# PEFT initialisations that only set A and B (the file overwrites them): loaded as the default init.
INIT_WITHOUT_BASE_CHANGE = ("eva", "orthogonal")


# --- keys ------------------------------------------------------------------------------------------------


def file_key(module_path: str, part: str) -> str:
    """The file key of ``part`` (a `LORA_PARTS` name, or a plain tensor name such as ``weight``) of the
    module at ``module_path``."""
    suffix = LORA_PARTS.get(part, f".{part}")
    return f"{PEFT_PREFIX}{module_path}{suffix}"


def strip_prefix(key: str) -> str:
    """A file key without ``base_model.model.``."""
    return key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key


def split_file_key(key: str) -> tuple[str, str] | None:
    """(module path, `LORA_PARTS` name) of an adapter tensor's key, or None for any other tensor."""
    name = strip_prefix(key)
    for part, suffix in LORA_PARTS.items():
        if name.endswith(suffix):
            return name[: -len(suffix)], part
    return None


# --- the config ----------------------------------------------------------------------------------------


def module_rank_alpha(config: Mapping[str, Any], module: str) -> tuple[int, float]:
    """(r, lora_alpha) of ``module`` under an adapter_config.json dict (``rank_pattern`` / ``alpha_pattern``
    override the defaults per module)."""
    r = int(pattern_value(config.get("rank_pattern") or {}, module, config.get("r", 8)))
    alpha = float(pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8)))
    return r, alpha


def module_scaling(config: Mapping[str, Any], module: str) -> tuple[int, float]:
    """(r, scaling) of ``module`` under an adapter_config.json dict.

    Raises:
        ValueError: a rank that is not positive.
    """
    r, alpha = module_rank_alpha(config, module)
    if r <= 0:
        raise ValueError(f"rank of {module!r} must be positive, got r={r}")
    return r, lora_scaling(alpha, r, bool(config.get("use_rslora", False)))


def peft_config(
    config: LoraConfig,
    *,
    target_modules: list[str],
    fan_in_fan_out: bool,
    base_model_name_or_path: str | None,
    auto_mapping: dict[str, str] | None,
    modules_to_save: list[str] | None,
) -> dict[str, Any]:
    """adapter_config.json's content for ``config``: every field of ``peft.LoraConfig`` (0.21).

    What depends on the model (the written target names, Conv1D, the class) is worked out by the caller.
    """
    values = dict(PEFT_ONLY_FIELDS)
    values.update(
        peft_type="LORA",
        task_type=config.task_type,
        auto_mapping=auto_mapping,
        peft_version=PEFT_FORMAT_VERSION,
        base_model_name_or_path=base_model_name_or_path,
        inference_mode=True,
        r=config.r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=target_modules,
        exclude_modules=_copy(config.exclude_modules),
        layers_to_transform=_copy(config.layers_to_transform),
        layers_pattern=_copy(config.layers_pattern),
        rank_pattern=dict(config.rank_pattern),
        alpha_pattern=dict(config.alpha_pattern),
        bias=config.bias,
        modules_to_save=modules_to_save,
        init_lora_weights=config.init_lora_weights,
        use_rslora=config.use_rslora,
        use_dora=config.use_dora,
        fan_in_fan_out=fan_in_fan_out,
    )
    return values


def _copy(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value


def lora_config_from_peft(values: Mapping[str, Any], *, source: str = "adapter config") -> LoraConfig:
    """A `LoraConfig` from PEFT's adapter_config.json content.

    PEFT's own fields that lorakit lacks (at values that do not change the computation) are dropped
    quietly; keys neither knows are dropped with a warning, unless they look like a misspelt field.

    Raises:
        ValueError: ``peft_type`` is not ``"LORA"``, the config uses a PEFT feature that changes the adapter's
            computation and that lorakit lacks (``lora_bias``, aLoRA, QALoRA, ...), an initialisation that
            rewrites the base weights in a way lorakit cannot reproduce, or an invalid value.
    """
    if not isinstance(values, Mapping):
        raise ValueError(f"{source}: expected a JSON object, got {type(values).__name__}")
    peft_type = values.get("peft_type")
    if peft_type != "LORA":
        raise ValueError(f"{source}: peft_type is {peft_type!r}; lorakit loads LORA adapters only")
    for name in REFUSED_WHEN_SET:
        if values.get(name) not in (None, False, [], {}):
            raise ValueError(f"{source}: uses PEFT's {name}={values[name]!r}, which lorakit does not "
                             "implement; loading it would compute a different function")
    kept = {key: value for key, value in values.items() if value is not None}
    kept["init_lora_weights"] = _loadable_init(values.get("init_lora_weights", True), source)
    if kept.get("task_type") == "SEQ_CLS" and kept.get("modules_to_save"):
        # PEFT writes both classifier head names for SEQ_CLS although a model has one; lorakit adds them
        # implicitly for SEQ_CLS (and insists that explicit entries exist), so they are dropped here.
        rest = [name for name in kept["modules_to_save"] if name not in CLASSIFIER_HEAD_NAMES]
        kept["modules_to_save"] = rest or None
        if kept["modules_to_save"] is None:
            del kept["modules_to_save"]
    try:
        return LoraConfig.from_dict(kept)
    except (TypeError, ValueError, AttributeError) as error:
        raise ValueError(f"{source}: invalid LoRA config: {error}") from error


def _loadable_init(init: Any, source: str) -> bool | str:
    """PEFT's init_lora_weights as lorakit must rerun it on load (only base-rewriting inits matter)."""
    if isinstance(init, bool) or init in ("gaussian", "pissa", "olora"):
        return init
    if init in INIT_WITHOUT_BASE_CHANGE:
        return True
    raise ValueError(f"{source}: init_lora_weights={init!r} rewrites the base weights in a way lorakit "
                     "does not reproduce; merge the adapter or convert it to plain LoRA with PEFT first")


# --- reading folders ---------------------------------------------------------------------------------------


def is_adapter_folder(path: str | Path) -> bool:
    """True when ``path`` holds a PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    path = Path(path)
    return (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()


def read_adapter_config(directory: str | Path) -> Any:
    """The parsed adapter_config.json of ``directory`` (any JSON value: the caller checks its shape).

    Raises:
        FileNotFoundError: the folder or its config is missing.
        ValueError: the config is not valid JSON.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory {directory} does not exist")
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: not a PEFT adapter directory")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error


def read_adapter_tensors(directory: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of ``directory``'s adapter_model.safetensors, on the CPU.

    Raises:
        FileNotFoundError: the file is missing (with a hint when a pickled ``adapter_model.bin`` is there).
        ValueError: the file is truncated or corrupt.
    """
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        hint = " (found adapter_model.bin: lorakit reads safetensors only)" if (
            path.parent / "adapter_model.bin").exists() else ""
        raise FileNotFoundError(f"{path} is missing{hint}")
    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except SafetensorError as error:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): "
                         f"{error}") from error


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


_PAIR_PARTS = {
    "lora_A": ("linear", "A"),
    "lora_B": ("linear", "B"),
    "lora_embedding_A": ("embedding", "A"),
    "lora_embedding_B": ("embedding", "B"),
    "lora_magnitude_vector": ("linear", "magnitude"),
}


def adapter_pairs(
    config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], where: str = "adapter"
) -> tuple[dict[str, LoraPair], dict[str, torch.Tensor]]:
    """Group an adapter file's tensors: (module path -> `LoraPair`, other tensor name -> tensor).

    The other tensors are modules_to_save copies, saved embedding layers and biases, by their name in the
    model (``base_layer.`` removed).

    Raises:
        ValueError: a module with A but no B (or the reverse), or ranks that disagree with the config.
    """
    parts: dict[str, dict[str, torch.Tensor]] = {}
    kinds: dict[str, str] = {}
    full: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        found = split_file_key(key)
        if found is None:
            full[strip_prefix(key).replace(".base_layer.", ".")] = tensor
            continue
        module, part = found
        kind, role = _PAIR_PARTS[part]
        parts.setdefault(module, {})[role] = tensor
        if role != "magnitude":
            kinds[module] = kind
    pairs: dict[str, LoraPair] = {}
    for module, found in parts.items():
        if "A" not in found or "B" not in found:
            raise ValueError(f"{where}: module {module!r} has {sorted(found)} but needs both A and B")
        r, scaling = module_scaling(config, module)
        lora_A, lora_B = found["A"], found["B"]
        if lora_A.shape[0] != r or lora_B.shape[1] != r:
            raise ValueError(
                f"{where}: {module!r} has A {tuple(lora_A.shape)} and B {tuple(lora_B.shape)} "
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
    return dict(sorted(pairs.items())), full


def load_adapter_folder(path: str | Path) -> Adapter:
    """Read a PEFT adapter folder without a model; raise ``FileNotFoundError``/``ValueError`` naming what
    is wrong."""
    path = Path(path)
    if not is_adapter_folder(path):
        raise FileNotFoundError(
            f"{path} is not a PEFT adapter folder: it needs {CONFIG_NAME} and {WEIGHTS_NAME}"
        )
    config = read_adapter_config(path)
    if not isinstance(config, dict):
        raise ValueError(f"{path / CONFIG_NAME}: expected a JSON object, got {type(config).__name__}")
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {config.get('peft_type')!r} is not LORA")
    pairs, full = adapter_pairs(config, read_adapter_tensors(path), str(path))
    if not pairs and not full:
        raise ValueError(f"{path}: {WEIGHTS_NAME} holds no LoRA tensors")
    return Adapter(path=path, config=config, pairs=pairs, full_tensors=full)
