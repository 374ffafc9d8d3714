"""Adapter files in PEFT's exact on-disk layout: ``adapter_config.json`` + ``adapter_model.safetensors``.

A directory written by `save_adapter` loads with ``peft.PeftModel.from_pretrained`` and a directory written
by PEFT's ``save_pretrained`` loads with `load_adapter`. The in-memory parameter names of lorakit are PEFT's,
so a file key is the model's state-dict key with the adapter name taken out and ``base_model.model.`` put
in front (see docs/adapter-files.md for the full table):

    in memory                                          in the file
    q_proj.lora_A.<name>.weight       (r, in)          base_model.model.q_proj.lora_A.weight
    q_proj.lora_B.<name>.weight       (out, r)         base_model.model.q_proj.lora_B.weight
    q_proj.lora_magnitude_vector.<name>.weight (out,)  base_model.model.q_proj.lora_magnitude_vector
    embed.lora_embedding_A.<name>     (r, num_emb)     base_model.model.embed.lora_embedding_A
    embed.lora_embedding_B.<name>     (dim, r)         base_model.model.embed.lora_embedding_B
    score.modules_to_save.<name>.weight                base_model.model.score.weight

Saving is atomic (temporary files in the target directory, fsync, ``os.replace``) and loading validates
the whole file against the model before the model is touched.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import os
import stat
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import nn

from lorakit.config import LoraConfig
from lorakit.layers import ADAPTER_PARAMETER_PREFIXES, AdapterLayer, LoraEmbedding, LoraLinear, ModulesToSave
from lorakit.matching import (
    ALL_LINEAR,
    CLASSIFIER_HEAD_NAMES,
    entries_matched,
    find_targets,
    modules_to_save_entries,
)
from lorakit.model import (
    active_adapters,
    adapter_configs,
    adapter_layers,
    add_adapter,
    check_new_adapter_name,
    delete_adapter,
    set_adapter,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# The PEFT release whose file format (and LoraConfig field set) lorakit writes.
PEFT_FORMAT_VERSION = "0.21.2"
# PEFT saves the (base) weights of a targeted embedding layer when target_modules names one of these.
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")

# Fields of peft.LoraConfig that lorakit does not have, at PEFT 0.21.2's defaults (written as they are).
_PEFT_ONLY_FIELDS: dict[str, Any] = {
    "revision": None,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "trainable_token_indices": None,
    "loftq_config": {},
    "eva_config": None,
    "corda_config": None,
    "lora_ga_config": None,
    "velora_config": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "qalora_group_size": 16,
    "monteclora_config": None,
    "layer_replication": None,
    "lora_bias": False,
    "target_parameters": None,
    "use_bdlora": None,
    "arrow_config": None,
    "kasa_config": None,
    "ensure_weight_tying": False,
}
# PEFT features that change what the adapter computes (or which tensors it has): a file that uses one is
# refused rather than loaded into something that silently computes a different function.
_REFUSED_WHEN_SET = (
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
_INIT_WITHOUT_BASE_CHANGE = ("eva", "orthogonal")

EntryKind = Literal["adapter", "bias", "embedding"]


@dataclass(frozen=True)
class _Entry:
    """One tensor an adapter file can hold: the live model tensor it belongs to, and what it is.

    ``kind`` is ``"adapter"`` for the adapter's own weights (A, B, DoRA magnitude, modules_to_save copies):
    always written, required on load. ``"bias"`` and ``"embedding"`` (a targeted embedding's base weights)
    are written per the config, as PEFT does, and restored when a file has them.
    """

    tensor: torch.Tensor
    kind: EntryKind


# --- public API ----------------------------------------------------------------------------------------


def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike[str],
    adapter_name: str = "default",
    *,
    base_model_name_or_path: str | None = None,
    save_embedding_layers: bool | Literal["auto"] = "auto",
) -> Path:
    """Write adapter ``adapter_name`` of ``model`` to ``directory`` in PEFT's layout.

    Args:
        model: a model with lorakit adapters.
        directory: created if missing; existing adapter files there are replaced atomically.
        adapter_name: the adapter to write (its name is not stored: PEFT files are name-free).
        base_model_name_or_path: recorded in adapter_config.json; defaults to the adapter config's value,
            else the model's ``name_or_path``.
        save_embedding_layers: also write the base weights of targeted embedding layers; ``"auto"`` does so
            when ``target_modules`` names ``embed_tokens`` or ``lm_head`` (PEFT's rule for targeted layers).

    Returns:
        The directory.

    Raises:
        ValueError: no adapter of that name, or ``directory`` is a file.
    """
    _require_adapter(model, adapter_name)
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory} is a file; save_adapter needs a directory")
    config = peft_config_dict(model, adapter_name, base_model_name_or_path=base_model_name_or_path)
    tensors = adapter_state_dict(model, adapter_name, save_embedding_layers=save_embedding_layers)
    # Safetensors refuses aliased storage (e.g. a modules_to_save bias written under two keys) and
    # non-contiguous tensors; an owned CPU copy of each tensor satisfies both.
    payload = {key: tensor.detach().to("cpu", copy=True).contiguous() for key, tensor in tensors.items()}
    text = json.dumps(config, indent=2, sort_keys=True)
    directory.mkdir(parents=True, exist_ok=True)
    _write_adapter_files(directory, payload, text)
    return directory


def load_adapter(
    model: nn.Module,
    directory: str | os.PathLike[str],
    adapter_name: str = "default",
    *,
    is_trainable: bool = False,
) -> None:
    """Load a PEFT-layout LoRA adapter into ``model`` as ``adapter_name``.

    The first adapter of a model is injected and becomes active; a later one is added inactive (activate it
    with `lorakit.set_adapter`). The loaded adapter is frozen unless ``is_trainable``, in which case its
    parameters (and the biases its config trains) require grad.

    Everything is checked before the model changes: the config, the safetensors file, that every module the
    adapter names exists in ``model``, and that the file holds exactly the adapter's tensors with the
    model's shapes. On any error the model is exactly as it was.

    Raises:
        FileNotFoundError: the directory, adapter_config.json or adapter_model.safetensors is missing.
        ValueError: a corrupt or truncated file, a non-LORA or unsupported config, an adapter for another
            architecture, missing / unexpected keys, a shape mismatch (key, file shape, model shape), or an
            adapter name already in use.
    """
    directory = Path(directory)
    config = _present_targets_only(model, lora_config_from_peft(_read_config(directory),
                                                                source=str(directory / CONFIG_NAME)))
    check_new_adapter_name(model, adapter_name)
    tensors = _read_tensors(directory / WEIGHTS_NAME)
    where = str(directory / WEIGHTS_NAME)
    _check_fits_shadow(model, config, adapter_name, tensors, where)

    first = not adapter_configs(model)
    grad_flags = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    add_adapter(model, config, adapter_name)
    try:
        entries = _accepted_entries(model, adapter_name, config)
        _raise_on_mismatch(entries, tensors, where, type(model).__name__)  # the shadow passed: a guard only
        _copy_into(entries, tensors)
    except BaseException:
        # Reached only if copying itself fails (e.g. out of memory): take the half-loaded adapter out again.
        # (A PiSSA / OLoRA init has rewritten base weights by now; that cannot be undone.)
        delete_adapter(model, adapter_name)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(grad_flags.get(name, parameter.requires_grad))
        raise
    if first and not is_trainable:
        set_adapter(model, [adapter_name])  # active, but nothing trains
    elif not first and is_trainable:
        set_adapter(model, active_adapters(model), trainable=adapter_name)


def adapter_state_dict(
    model: nn.Module,
    adapter_name: str = "default",
    *,
    save_embedding_layers: bool | Literal["auto"] = "auto",
) -> dict[str, torch.Tensor]:
    """The tensors `save_adapter` writes, under PEFT's keys (``base_model.model.<path>...``).

    The values are the live tensors, detached (not copies): clone them to keep a snapshot.
    """
    _require_adapter(model, adapter_name)
    config = adapter_configs(model)[adapter_name]
    embeddings = save_embedding_layers
    if embeddings == "auto":
        written = _written_target_modules(model, adapter_name, config)
        embeddings = any(name in written for name in EMBEDDING_LAYER_NAMES)
    entries = _entries(model, adapter_name, bias=config.bias, embeddings=bool(embeddings))
    return {key: entry.tensor.detach() for key, entry in entries.items()}


@torch.no_grad()
def load_adapter_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], adapter_name: str = "default"
) -> None:
    """The inverse of `adapter_state_dict`: copy ``state_dict`` into the existing adapter ``adapter_name``.

    Validated like `load_adapter` (every adapter tensor present, no unknown key, shapes equal) before
    anything is copied.

    Raises:
        ValueError: no adapter of that name, or the dict does not fit it.
    """
    _require_adapter(model, adapter_name)
    entries = _accepted_entries(model, adapter_name, adapter_configs(model)[adapter_name])
    _raise_on_mismatch(entries, state_dict, f"state dict for adapter {adapter_name!r}", type(model).__name__)
    _copy_into(entries, state_dict)


def peft_config_dict(
    model: nn.Module, adapter_name: str = "default", *, base_model_name_or_path: str | None = None
) -> dict[str, Any]:
    """adapter_config.json's content: every field of ``peft.LoraConfig`` (0.21), ``peft_type`` ``"LORA"``.

    ``target_modules`` is the list of leaf names when those select exactly the adapted modules (with the
    rest of the config), else their full names; ``"all-linear"`` is expanded to full names, as PEFT does.
    """
    _require_adapter(model, adapter_name)
    config = adapter_configs(model)[adapter_name]
    adapted = _adapted_modules(model, adapter_name)
    conv1d = any(getattr(model.get_submodule(name), "fan_in_fan_out", False) for name in adapted)
    name_or_path = base_model_name_or_path or config.base_model_name_or_path
    name_or_path = name_or_path or getattr(model, "name_or_path", None) or None
    auto_mapping = None
    if config.task_type is None:
        auto_mapping = {"base_model_class": type(model).__name__, "parent_library": type(model).__module__}
    values = dict(_PEFT_ONLY_FIELDS)
    values.update(
        peft_type="LORA",
        task_type=config.task_type,
        auto_mapping=auto_mapping,
        peft_version=PEFT_FORMAT_VERSION,
        base_model_name_or_path=name_or_path,
        inference_mode=True,
        r=config.r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=_written_target_modules(model, adapter_name, config),
        exclude_modules=copy.deepcopy(config.exclude_modules),
        layers_to_transform=copy.deepcopy(config.layers_to_transform),
        layers_pattern=copy.deepcopy(config.layers_pattern),
        rank_pattern=dict(config.rank_pattern),
        alpha_pattern=dict(config.alpha_pattern),
        bias=config.bias,
        modules_to_save=modules_to_save_entries(config) or None,
        init_lora_weights=config.init_lora_weights,
        use_rslora=config.use_rslora,
        use_dora=config.use_dora,
        fan_in_fan_out=bool(config.fan_in_fan_out or conv1d),
    )
    return values


def lora_config_from_peft(values: Mapping[str, Any], *, source: str = "adapter config") -> LoraConfig:
    """A `LoraConfig` from PEFT's adapter_config.json content; PEFT fields lorakit does not know are ignored.

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
    for name in _REFUSED_WHEN_SET:
        if values.get(name) not in (None, False, [], {}):
            raise ValueError(f"{source}: uses PEFT's {name}={values[name]!r}, which lorakit does not "
                             "implement; loading it would compute a different function")
    known = {f.name for f in fields(LoraConfig)}
    kept = {key: value for key, value in values.items() if key in known and value is not None}
    kept["init_lora_weights"] = _loadable_init(values.get("init_lora_weights", True), source)
    if kept.get("task_type") == "SEQ_CLS" and kept.get("modules_to_save"):
        # PEFT writes both classifier head names for SEQ_CLS although a model has one; lorakit adds them
        # implicitly for SEQ_CLS (and insists that explicit entries exist), so they are dropped here.
        rest = [name for name in kept["modules_to_save"] if name not in CLASSIFIER_HEAD_NAMES]
        kept["modules_to_save"] = rest or None
    try:
        return LoraConfig.from_dict(kept)
    except (TypeError, ValueError, AttributeError) as error:
        raise ValueError(f"{source}: invalid LoRA config: {error}") from error


def _present_targets_only(model: nn.Module, config: LoraConfig) -> LoraConfig:
    """Drop ``target_modules`` entries that name no module of ``model``, as PEFT tolerates on load.

    Configs in circulation often list generic names (all seven projections, say) for a model that has
    fewer; the adapter's tensors, checked next, say exactly which modules it needs. If no entry matches,
    the config is kept whole so the matcher's error names the closest modules.
    """
    if not isinstance(config.target_modules, list):
        return config
    names = [name for name, _ in model.named_modules()]
    matched = entries_matched(names, config.target_modules)
    present = [entry for entry in config.target_modules if entry in matched]
    return config.replace(target_modules=present) if present else config


# --- which tensors belong to an adapter ------------------------------------------------------------------


def _entries(model: nn.Module, adapter_name: str, *, bias: str, embeddings: bool) -> dict[str, _Entry]:
    """PEFT key -> entry for the adapter's tensors, the biases per ``bias`` and (optionally) the base
    weights of wrapped embedding layers. Aliased keys (PEFT writes some biases twice) share a tensor."""
    found: dict[str, _Entry] = {}
    for key, tensor in _bias_tensors(model, adapter_name, bias).items():
        found[PEFT_PREFIX + key] = _Entry(tensor, "bias")
    if embeddings:
        for key, tensor in _embedding_base_tensors(model).items():
            found[PEFT_PREFIX + key] = _Entry(tensor, "embedding")
    # Adapter weights last: where a bias key aliases a modules_to_save weight, "adapter" wins (required).
    for key, tensor in _adapter_tensors(model, adapter_name).items():
        found[PEFT_PREFIX + key] = _Entry(tensor, "adapter")
    return found


def _accepted_entries(model: nn.Module, adapter_name: str, config: LoraConfig) -> dict[str, _Entry]:
    """What a file for ``config`` may hold: the adapter's tensors (required), any bias when the config
    trains biases, and the base weights of wrapped embeddings (optional, as PEFT writes them)."""
    bias = "none" if config.bias == "none" else "all"
    return _entries(model, adapter_name, bias=bias, embeddings=True)


def _adapter_tensors(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """Unprefixed PEFT key -> tensor for A, B, DoRA magnitude and modules_to_save copies."""
    out: dict[str, torch.Tensor] = {}
    for path, layer in adapter_layers(model):
        if isinstance(layer, LoraLinear) and adapter_name in layer.r:
            out[f"{path}.lora_A.weight"] = layer.lora_A[adapter_name].weight
            out[f"{path}.lora_B.weight"] = layer.lora_B[adapter_name].weight
            if adapter_name in layer.lora_magnitude_vector:
                out[f"{path}.lora_magnitude_vector"] = layer.lora_magnitude_vector[adapter_name].weight
        elif isinstance(layer, LoraEmbedding) and adapter_name in layer.r:
            out[f"{path}.lora_embedding_A"] = layer.lora_embedding_A[adapter_name]
            out[f"{path}.lora_embedding_B"] = layer.lora_embedding_B[adapter_name]
        elif isinstance(layer, ModulesToSave) and adapter_name in layer.modules_to_save:
            # PEFT stores the trained copy under the module's own path:
            # score.modules_to_save.<name>.weight -> score.weight
            for key, tensor in layer.modules_to_save[adapter_name].state_dict(keep_vars=True).items():
                out[f"{path}.{key}"] = tensor
    return out


def _bias_tensors(model: nn.Module, adapter_name: str, bias: str) -> dict[str, torch.Tensor]:
    """The biases PEFT writes for ``bias`` (unprefixed keys, adapter name removed).

    ``"all"``: every ``*.bias`` of the model's state dict except other adapters' copies, as PEFT (which
    includes ``score.original_module.bias`` and ``score.modules_to_save.bias``). ``"lora_only"``: the base
    bias of every layer that carries this adapter.
    """
    if bias == "none":
        return {}
    state = model.state_dict(keep_vars=True)
    if bias == "lora_only":
        keys = (f"{path}.base_layer.bias" for path, layer in adapter_layers(model)
                if isinstance(layer, AdapterLayer) and adapter_name in layer.adapter_names)
        return {key: state[key] for key in keys if key in state}
    own, others = _adapter_key_prefixes(model, adapter_name)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if not (key == "bias" or key.endswith(".bias")) or key.startswith(others):
            continue
        for prefix, replacement in own:
            if key.startswith(prefix):
                key = replacement + key[len(prefix):]
                break
        out[key] = tensor
    return out


def _adapter_key_prefixes(
    model: nn.Module, adapter_name: str
) -> tuple[list[tuple[str, str]], tuple[str, ...]]:
    """State-dict key prefixes of this adapter's containers (with their name-free form) and of the others'."""
    own: list[tuple[str, str]] = []
    others: list[str] = []
    layer_containers = (*ADAPTER_PARAMETER_PREFIXES, "lora_dropout")
    for path, layer in adapter_layers(model):
        containers = ("modules_to_save",) if isinstance(layer, ModulesToSave) else layer_containers
        for container in containers:
            names = getattr(layer, container, None)
            for name in names if names is not None else ():
                prefix = f"{path}.{container}.{name}."
                if name == adapter_name:
                    own.append((prefix, f"{path}.{container}."))
                else:
                    others.append(prefix)
    return own, tuple(others)


def _embedding_base_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Base weights of the input / output embedding when lorakit wraps it (PEFT's save_embedding_layers)."""
    paths = {id(module): name for name, module in model.named_modules()}
    out: dict[str, torch.Tensor] = {}
    for getter_name in ("get_input_embeddings", "get_output_embeddings"):
        getter = getattr(model, getter_name, None)
        layer = getter() if callable(getter) else None
        if isinstance(layer, AdapterLayer) and isinstance(layer.base_layer, (nn.Linear, nn.Embedding)):
            path = paths.get(id(layer.base_layer))
            if path is None:
                continue
            for key, tensor in layer.base_layer.state_dict(keep_vars=True).items():
                out[f"{path}.{key}"] = tensor
    return out


def _adapted_modules(model: nn.Module, adapter_name: str) -> list[str]:
    return [path for path, layer in adapter_layers(model)
            if isinstance(layer, AdapterLayer) and adapter_name in layer.adapter_names]


def _written_target_modules(model: nn.Module, adapter_name: str, config: LoraConfig) -> list[str]:
    """Leaf names if they (with the rest of the config) select exactly the adapted modules, else the
    full names."""
    adapted = _adapted_modules(model, adapter_name)
    targets = config.target_modules
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        return sorted(adapted)  # PEFT expands "all-linear" to the full names
    leaves = sorted({path.rsplit(".", 1)[-1] for path in adapted})
    try:
        selected = find_targets(model, config.replace(target_modules=leaves))
    except ValueError:
        return sorted(adapted)
    return leaves if set(selected) == set(adapted) else sorted(adapted)


# --- loading ---------------------------------------------------------------------------------------------


def _read_config(directory: Path) -> Any:
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory {directory} does not exist")
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: not a PEFT adapter directory")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        hint = " (found adapter_model.bin: lorakit reads safetensors only)" if (
            path.parent / "adapter_model.bin").exists() else ""
        raise FileNotFoundError(f"{path} is missing{hint}")
    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except SafetensorError as error:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): "
                         f"{error}") from error


def _loadable_init(init: Any, source: str) -> bool | str:
    """PEFT's init_lora_weights as lorakit must rerun it on load (only base-rewriting inits matter)."""
    if isinstance(init, bool) or init in ("gaussian", "pissa", "olora"):
        return init
    if init in _INIT_WITHOUT_BASE_CHANGE:
        return True
    raise ValueError(f"{source}: init_lora_weights={init!r} rewrites the base weights in a way lorakit "
                     "does not reproduce; merge the adapter or convert it to plain LoRA with PEFT first")


def _check_fits_shadow(
    model: nn.Module, config: LoraConfig, adapter_name: str, tensors: Mapping[str, torch.Tensor], where: str
) -> None:
    """Inject the adapter into a storage-free copy of ``model`` and check ``tensors`` against it."""
    shadow = _meta_shadow(model)
    # The shadow only needs names and shapes: no base-rewriting init, and DoRA magnitudes (whose init
    # reads the base weight, impossible on meta or 4-bit storage) are added as placeholders below.
    try:
        add_adapter(shadow, config.replace(init_lora_weights=True, use_dora=False), adapter_name)
    except ValueError as error:
        raise ValueError(f"{where} does not fit this {type(model).__name__}: {error}") from error
    entries = _accepted_entries(shadow, adapter_name, config)
    if config.use_dora:
        entries.update(_dora_placeholders(shadow, adapter_name, where))
    _raise_on_mismatch(entries, tensors, where, type(model).__name__)


def _meta_shadow(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are meta tensors: structure without storage."""
    memo: dict[int, Any] = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        meta = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
        is_parameter = isinstance(tensor, nn.Parameter)
        memo[id(tensor)] = nn.Parameter(meta, requires_grad=False) if is_parameter else meta
    return copy.deepcopy(model, memo)


def _dora_placeholders(shadow: nn.Module, adapter_name: str, where: str) -> dict[str, _Entry]:
    out: dict[str, _Entry] = {}
    for path, layer in adapter_layers(shadow):
        if isinstance(layer, LoraEmbedding) and adapter_name in layer.r:
            raise ValueError(f"{where}: DoRA on embedding layers ({path}) is not supported by lorakit")
        if isinstance(layer, LoraLinear) and adapter_name in layer.r:
            meta = torch.empty(layer.out_features, device="meta")
            out[f"{PEFT_PREFIX}{path}.lora_magnitude_vector"] = _Entry(meta, "adapter")
    return out


def _raise_on_mismatch(
    entries: Mapping[str, _Entry], tensors: Mapping[str, torch.Tensor], where: str, model_name: str
) -> None:
    """ValueError listing every missing key, unexpected key and shape mismatch (with both shapes)."""
    missing = sorted(key for key, entry in entries.items() if entry.kind == "adapter" and key not in tensors)
    unexpected = sorted(key for key in tensors if key not in entries)
    problems = [f"missing key {key}" for key in missing]
    problems += [f"unexpected key {key} (the model has no such adapter tensor)" for key in unexpected]
    for key in sorted(tensors.keys() & entries.keys()):
        file_tensor, model_tensor = tensors[key], entries[key].tensor
        if not isinstance(file_tensor, torch.Tensor):
            problems.append(f"{key} is a {type(file_tensor).__name__}, not a tensor")
        elif tuple(file_tensor.shape) != tuple(model_tensor.shape):
            problems.append(f"{key}: shape {tuple(file_tensor.shape)} in the file, "
                            f"{tuple(model_tensor.shape)} in the model")
        elif model_tensor.is_floating_point() and not file_tensor.is_floating_point():
            problems.append(f"{key}: dtype {file_tensor.dtype} in the file, {model_tensor.dtype} in the "
                            "model")
    if problems:
        more = len(problems) - 12
        shown = "; ".join(problems[:12]) + (f"; ... and {more} more" if more > 0 else "")
        raise ValueError(f"{where} does not fit this {model_name}: {shown}")


@torch.no_grad()
def _copy_into(entries: Mapping[str, _Entry], tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy validated tensors into the model; adapter weights last so they win over aliased bias keys."""
    order = {"bias": 0, "embedding": 1, "adapter": 2}
    for key in sorted(tensors.keys() & entries.keys(), key=lambda k: order[entries[k].kind]):
        entries[key].tensor.copy_(tensors[key])


def _require_adapter(model: nn.Module, adapter_name: str) -> None:
    if adapter_name not in adapter_configs(model):
        raise ValueError(f"no adapter named {adapter_name!r}; the model has {sorted(adapter_configs(model))}")


# --- atomic writing ----------------------------------------------------------------------------------------


def _write_adapter_files(directory: Path, tensors: dict[str, torch.Tensor], config_text: str) -> None:
    """Write both files into temporaries in ``directory``, fsync them, then ``os.replace`` each into place.

    Nothing is replaced until both temporaries are complete on disk, so a failure while serialising leaves
    the previous adapter untouched and no temporary behind.
    """
    weights_tmp = _temporary_name(directory, WEIGHTS_NAME)
    config_tmp = _temporary_name(directory, CONFIG_NAME)
    try:
        _write_text_synced(config_tmp, config_text)
        safetensors.torch.save_file(tensors, str(weights_tmp), metadata={"format": "pt"})
        # safetensors creates its file private (0600); give it the mode an ordinary new file gets here
        # (the umask-derived mode of the config temporary, which os.open created with 0o666).
        os.chmod(weights_tmp, stat.S_IMODE(os.stat(config_tmp).st_mode))
        _fsync_path(weights_tmp)
        # Weights first: a reader that sees the new config always finds the new weights.
        os.replace(weights_tmp, directory / WEIGHTS_NAME)
        os.replace(config_tmp, directory / CONFIG_NAME)
    except BaseException:
        for temporary in (weights_tmp, config_tmp):
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()
        raise
    _fsync_path(directory)


def _temporary_name(directory: Path, final_name: str) -> Path:
    # Same directory as the target, so os.replace is a rename within one file system (atomic).
    return directory / f".{final_name}.{uuid.uuid4().hex}.tmp"


def _write_text_synced(path: Path, text: str) -> None:
    # O_EXCL: never clobber; mode 0o666 lets the umask decide, as for any ordinary file.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_path(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
