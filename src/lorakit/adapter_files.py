"""A model's adapters as PEFT adapter folders: `save_adapter`, `load_adapter` and their state dicts.

A directory written by `save_adapter` loads with ``peft.PeftModel.from_pretrained`` and a directory written
by PEFT's ``save_pretrained`` loads with `load_adapter`. The format itself (file names, keys, the config)
is `lorakit.peft_format`; this module maps a live model's adapters onto it. lorakit's in-memory parameter
names are PEFT's, so a file key is the model's state-dict key with the adapter name taken out:

    in memory                                          in the file
    q_proj.lora_A.<name>.weight       (r, in)          base_model.model.q_proj.lora_A.weight
    q_proj.lora_B.<name>.weight       (out, r)         base_model.model.q_proj.lora_B.weight
    score.modules_to_save.<name>.weight                base_model.model.score.weight

Saving is atomic (`lorakit.atomic.write_folder`: the folder is replaced in one step, other files in it
kept) and loading validates the whole file against a storage-free copy of the model (`lorakit.load_check`)
before the model is touched.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import safetensors.torch
import torch
from torch import nn

from lorakit.adapter_layer import AdapterLayer
from lorakit.adapter_tensors import accepted_entries, adapter_entries
from lorakit.atomic import write_folder
from lorakit.config import LoraConfig
from lorakit.load_check import check_fits_shadow, copy_into, raise_on_mismatch
from lorakit.matching import ALL_LINEAR, entries_matched, find_targets, modules_to_save_entries
from lorakit.model import (
    active_adapters,
    add_adapter,
    check_new_adapter_name,
    delete_adapter,
    refuse_while_mixed,
    set_adapter,
)
from lorakit.peft_format import (
    CONFIG_NAME,
    EMBEDDING_LAYER_NAMES,
    WEIGHTS_NAME,
    lora_config_from_peft,
    peft_config,
    read_adapter_config,
    read_adapter_tensors,
)
from lorakit.registry import adapter_configs, adapter_layers

logger = logging.getLogger(__name__)

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
    refuse_while_mixed(model, "save an adapter")
    config = peft_config_dict(model, adapter_name, base_model_name_or_path=base_model_name_or_path)
    tensors = adapter_state_dict(model, adapter_name, save_embedding_layers=save_embedding_layers)
    # Safetensors refuses aliased storage (e.g. a modules_to_save bias written under two keys) and
    # non-contiguous tensors; an owned CPU copy of each tensor satisfies both.
    payload = {key: tensor.detach().to("cpu", copy=True).contiguous() for key, tensor in tensors.items()}
    text = json.dumps(config, indent=2, sort_keys=True)

    def write(folder: Path) -> None:
        (folder / CONFIG_NAME).write_text(text, encoding="utf-8")
        safetensors.torch.save_file(payload, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
        # safetensors creates its file private (0600); give it the mode an ordinary new file gets here.
        os.chmod(folder / WEIGHTS_NAME, (folder / CONFIG_NAME).stat().st_mode & 0o777)

    # The folder is replaced whole (so the config and the weights always belong together); whatever else
    # it holds (a training run's metrics and checkpoints) is carried over.
    return write_folder(directory, write, carry_over=True)


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
    refuse_while_mixed(model, "load an adapter")
    directory = Path(directory)
    config = _present_targets_only(model, lora_config_from_peft(read_adapter_config(directory),
                                                                source=str(directory / CONFIG_NAME)))
    check_new_adapter_name(model, adapter_name)
    tensors = read_adapter_tensors(directory)
    where = str(directory / WEIGHTS_NAME)
    check_fits_shadow(model, config, adapter_name, tensors, where)

    first = not adapter_configs(model)
    grad_flags = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    add_adapter(model, config, adapter_name)
    try:
        entries = accepted_entries(model, adapter_name, config)
        raise_on_mismatch(entries, tensors, where, type(model).__name__)  # the shadow passed: a guard only
        copy_into(entries, tensors)
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
    entries = adapter_entries(model, adapter_name, bias=config.bias, embeddings=bool(embeddings))
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
    entries = accepted_entries(model, adapter_name, adapter_configs(model)[adapter_name])
    raise_on_mismatch(entries, state_dict, f"state dict for adapter {adapter_name!r}", type(model).__name__)
    copy_into(entries, state_dict)


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
    return peft_config(
        config,
        target_modules=_written_target_modules(model, adapter_name, config),
        fan_in_fan_out=bool(config.fan_in_fan_out or conv1d),
        base_model_name_or_path=name_or_path,
        auto_mapping=auto_mapping,
        modules_to_save=modules_to_save_entries(config) or None,
    )


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
    if not present:
        return config
    dropped = [entry for entry in config.target_modules if entry not in matched]
    if dropped:
        logger.info("adapter config's target_modules entries %s name no module of this %s; ignored (as PEFT "
                    "does)", dropped, type(model).__name__)
    return config.replace(target_modules=present)


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


def _require_adapter(model: nn.Module, adapter_name: str) -> None:
    if adapter_name not in adapter_configs(model):
        raise ValueError(f"no adapter named {adapter_name!r}; the model has {sorted(adapter_configs(model))}")


