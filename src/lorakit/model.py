"""The model-level API: inject, add, activate, delete, merge and unload adapters, in place.

The user's model stays its own class (``generate``, ``save_pretrained`` keep working); lorakit only swaps
matched submodules for wrappers from `lorakit.layers`. The adapters' state lives in those layers and these
functions walk them; the only model-level record is ``model.lorakit_configs``, the config of each adapter.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from lorakit.adapter_layer import AdapterLayer, check_supported
from lorakit.config import LoraConfig
from lorakit.layers import wrap
from lorakit.matching import find_modules_to_save, find_targets, pattern_value
from lorakit.modules_to_save import ModulesToSave
from lorakit.registry import adapter_configs, adapter_layers, forget_adapters
from lorakit.routing import routed

__all__ = [  # the registry's two functions are part of this module's API, as before the registry moved
    "active_adapters", "adapter_configs", "adapter_layers", "add_adapter", "check_new_adapter_name",
    "delete_adapter", "disable_adapters", "inject", "merge", "merge_and_unload", "refuse_while_mixed",
    "set_adapter", "trainable_adapter", "trainable_parameters", "unload", "unmerge",
]


def refuse_while_mixed(model: nn.Module, action: str) -> None:
    """Raise RuntimeError when a mixed-adapter batch is running over ``model``.

    Such a batch computes from weights it stacked on entry; changing the adapters or folding them into the
    base under it would apply an adapter twice or not at all.
    """
    if routed(layer for _, layer in adapter_layers(model)):
        raise RuntimeError(f"cannot {action} inside a mixed-adapter batch (adapter_per_row or a serving "
                           "engine); leave the block first")


def active_adapters(model: nn.Module) -> list[str]:
    """The active adapter names, in activation order."""
    for _, layer in adapter_layers(model):
        if isinstance(layer, AdapterLayer):
            return list(layer.active_adapters)
    return []


def inject(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> nn.Module:
    """Add the first adapter to ``model`` in place: it is active, and the only thing that trains.

    Every parameter of the base model is frozen; the adapter's A, B (and DoRA magnitude), its
    ``modules_to_save`` copies and the biases selected by ``config.bias`` are trainable.

    Raises:
        ValueError: the config selects nothing or names a module that does not exist (with the closest
            names), or the model already has adapters (use `add_adapter`). The model is then unchanged.
    """
    if adapter_configs(model):
        raise ValueError(f"model already has adapters {list(adapter_configs(model))}; use add_adapter()")
    _add(model, config, adapter_name)
    for name, parameter in model.named_parameters():
        if not _is_adapter_parameter(name):
            parameter.requires_grad_(False)
    set_adapter(model, adapter_name)
    return model


def add_adapter(model: nn.Module, config: LoraConfig, adapter_name: str) -> None:
    """Add another named adapter; it stays inactive and frozen until `set_adapter` names it."""
    if not adapter_configs(model):
        inject(model, config, adapter_name)
        return
    active, trainable = active_adapters(model), trainable_adapter(model)
    _add(model, config, adapter_name)
    for _, layer in adapter_layers(model):
        layer.set_active(active)
    _set_trainable(model, trainable)


def trainable_adapter(model: nn.Module) -> str | None:
    """The adapter that trains now (the one whose parameters require grad), or None.

    Read from the layers' own parameter names (``lora_A.<adapter>.weight``,
    ``modules_to_save.<adapter>.weight``, ...), so a model path that happens to contain an adapter's
    name (an adapter called ``model`` or ``mlp``) cannot be mistaken for it.
    """
    for _, layer in adapter_layers(model):
        for name, parameter in layer.named_parameters():
            if parameter.requires_grad and _is_adapter_parameter(name):
                return name.split(".")[1]
    return None


def _is_adapter_parameter(name: str) -> bool:
    return any(part.startswith("lora_") for part in name.split(".")) or ".modules_to_save." in f".{name}"


def check_new_adapter_name(model: nn.Module, adapter_name: str) -> None:
    """Raise ValueError unless ``adapter_name`` can name a new adapter of ``model``."""
    if not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter name must be non-empty and contain no '.', got {adapter_name!r}")
    if hasattr(nn.ModuleDict(), adapter_name):
        # The layers keep adapters in nn.ModuleDicts, which cannot hold a key such as "half" or "to".
        raise ValueError(f"adapter name {adapter_name!r} is an attribute of torch modules; pick another")
    if adapter_name in adapter_configs(model):
        raise ValueError(f"adapter {adapter_name!r} already exists; delete_adapter() it first or pick "
                         "another name")


def _add(model: nn.Module, config: LoraConfig, adapter_name: str) -> None:
    """Create adapter ``adapter_name`` everywhere ``config`` says, all or nothing."""
    check_new_adapter_name(model, adapter_name)
    targets = find_targets(model, config)
    saved = find_modules_to_save(model, config)
    modules = dict(model.named_modules())
    for name in targets:
        check_supported(name, modules[name], config.use_dora, config.init_lora_weights,
                        pattern_value(config.rank_pattern, name, config.r))
    new_wrappers: dict[str, nn.Module] = {}
    touched: list[AdapterLayer | ModulesToSave] = []
    try:
        for name in targets:
            module = modules[name]
            layer = module if isinstance(module, AdapterLayer) else wrap(module)
            if layer is not module:
                new_wrappers[name] = layer
            touched.append(layer)
            layer.add_adapter(
                adapter_name,
                r=pattern_value(config.rank_pattern, name, config.r),
                lora_alpha=pattern_value(config.alpha_pattern, name, config.lora_alpha),
                lora_dropout=config.lora_dropout,
                init_lora_weights=config.init_lora_weights,
                use_rslora=config.use_rslora,
                use_dora=config.use_dora,
            )
        for name in saved:
            module = modules[name]
            wrapper = module if isinstance(module, ModulesToSave) else ModulesToSave(module)
            if wrapper is not module:
                new_wrappers[name] = wrapper
            touched.append(wrapper)
            wrapper.add_adapter(adapter_name)
    except Exception:
        for layer in touched:
            layer.delete_adapter(adapter_name)
        raise
    for name, wrapper in new_wrappers.items():
        model.set_submodule(name, wrapper)
    adapter_configs(model)[adapter_name] = config


def set_adapter(model: nn.Module, adapter_names: str | list[str], trainable: str | None = None) -> None:
    """Activate one adapter or several (their updates add up).

    With one name, that adapter also becomes the one that trains (unless ``trainable`` names another);
    with several, none trains unless ``trainable`` names one: activating adapters for inference never makes
    them trainable.
    """
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    _check_names(model, names)
    if isinstance(adapter_names, str) and trainable is None:
        trainable = adapter_names
    if trainable is not None:
        _check_names(model, [trainable])
    for _, layer in adapter_layers(model):
        layer.set_active(names)
    _set_trainable(model, trainable)


def _check_names(model: nn.Module, names: list[str]) -> None:
    known = adapter_configs(model)
    for name in names:
        if name not in known:
            raise ValueError(f"no adapter named {name!r}; the model has {sorted(known)}")


def _set_trainable(model: nn.Module, trainable: str | None) -> None:
    """Exactly ``trainable``'s parameters (and the biases its config selects) require grad."""
    for _, layer in adapter_layers(model):
        for name, parameter in layer.named_parameters():
            if _is_adapter_parameter(name):
                parameter.requires_grad_(name.split(".")[1] == trainable)
    bias = adapter_configs(model)[trainable].bias if trainable else "none"
    adapted_biases = {f"{name}.base_layer.bias" for name, layer in adapter_layers(model)
                      if isinstance(layer, AdapterLayer) and trainable in layer.adapter_names}
    for name, parameter in model.named_parameters():
        # Biases as PEFT picks them: by parameter name. A ModulesToSave's original is never used while the
        # adapter is active, so its bias stays frozen; the trained copy's bias trains with the copy.
        is_bias = name.rsplit(".", 1)[-1] == "bias"
        if not is_bias or _is_adapter_parameter(name) or ".original_module." in f".{name}":
            continue
        parameter.requires_grad_(bias == "all" or (bias == "lora_only" and name in adapted_biases))


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove an adapter from every layer; wrappers left without adapters give back their base module.

    If the adapter was active, the first remaining adapter becomes active (as in PEFT).
    """
    _check_names(model, [adapter_name])
    refuse_while_mixed(model, "delete an adapter")
    for name, layer in adapter_layers(model):
        if isinstance(layer, AdapterLayer) and adapter_name in layer.merged_adapters:
            raise RuntimeError(f"adapter {adapter_name!r} is merged into {name!r}; unmerge() before "
                               "deleting it")
    was_active = adapter_name in active_adapters(model)
    for name, layer in list(adapter_layers(model)):
        layer.delete_adapter(adapter_name)
        if not layer.adapter_names:
            model.set_submodule(name, _base_of(layer))
    del adapter_configs(model)[adapter_name]
    remaining = list(adapter_configs(model))
    if was_active and remaining and not active_adapters(model):
        set_adapter(model, remaining[0])


def _base_of(layer: AdapterLayer | ModulesToSave) -> nn.Module:
    return layer.base_layer if isinstance(layer, AdapterLayer) else layer.original_module


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, as peft's ``print_trainable_parameters`` counts them.

    A bitsandbytes 4-bit parameter packs two values per byte of storage, so it counts twice its numel
    times its element size, as in PEFT.
    """
    trainable = total = 0
    for parameter in model.parameters():
        count = parameter.numel()
        if type(parameter).__name__ == "Params4bit":
            count *= 2 * parameter.element_size()
        total += count
        if parameter.requires_grad:
            trainable += count
    return trainable, total


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Run the base model alone; merged adapters are unmerged inside, and on exit the merged weights come
    back exactly as they were (a copy of each merged layer's weight is held meanwhile: re-merging would
    round a bf16 / fp16 base once more on every use)."""
    layers = [layer for _, layer in adapter_layers(model)]
    with torch.no_grad():
        restores = [layer.suspend_merge() for layer in layers if isinstance(layer, AdapterLayer)]
    for layer in layers:
        layer.disabled = True
    try:
        yield
    finally:
        for layer in layers:
            layer.disabled = False
        with torch.no_grad():
            for restore in restores:
                restore()


@torch.no_grad()
def merge(model: nn.Module, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
    """Fold adapters (default: the active ones) into the base weights: inference then costs nothing extra.

    All or nothing: every layer is checked before any weight is written. With ``safe_merge`` every merged
    weight is also computed aside once and checked for non-finite values first (twice the merge work).

    Raises:
        ValueError: an unknown adapter name.
        RuntimeError: an adapter is already merged, or ``safe_merge`` found a non-finite merged weight
            (the message names the layer). The model is then unchanged.
    """
    if adapter_names is not None:
        _check_names(model, adapter_names)
    refuse_while_mixed(model, "merge")
    plan: list[tuple[str, AdapterLayer, list[str]]] = []
    for name, layer in adapter_layers(model):
        if isinstance(layer, AdapterLayer):
            wanted = adapter_names if adapter_names is not None else layer.active_adapters
            names = layer.check_merge([n for n in wanted if n in layer.adapter_names])
            if safe_merge and names and not torch.isfinite(layer.merged_weight(names)).all():
                raise RuntimeError(f"merging adapters {names} into {name!r} gives non-finite weights; "
                                   "nothing was merged")
            plan.append((name, layer, names))
    for _, layer, names in plan:
        layer.merge(names)


@torch.no_grad()
def unmerge(model: nn.Module) -> None:
    """Undo `merge`: the base weights are restored to fp32 round-off."""
    refuse_while_mixed(model, "unmerge")
    for _, layer in adapter_layers(model):
        if isinstance(layer, AdapterLayer):
            layer.unmerge()


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapters and remove every lorakit module; returns the same (plain) model.

    A 4-bit base is dequantised: its layers come back as full-precision ``nn.Linear``. A
    ``modules_to_save`` module is replaced by the active adapter's trained copy.
    """
    refuse_while_mixed(model, "merge and unload")
    for name, layer in list(adapter_layers(model)):
        if isinstance(layer, AdapterLayer):
            model.set_submodule(name, layer.merged_module())
        else:
            model.set_submodule(name, layer.active_module())
    forget_adapters(model)
    return model


@torch.no_grad()
def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter and give back the base modules unchanged (merged adapters are unmerged first)."""
    refuse_while_mixed(model, "unload adapters")
    for name, layer in list(adapter_layers(model)):
        if isinstance(layer, AdapterLayer):
            layer.unmerge()
        model.set_submodule(name, _base_of(layer))
    forget_adapters(model)
    return model
