"""The one matcher: which modules of a model an adapter config selects.

One rule for every list of names (``target_modules``, ``exclude_modules``, ``modules_to_save``): an entry
matches a module whose qualified name equals the entry or ends with ``"." + entry``. ``target_modules`` and
``exclude_modules`` may instead be a single string, a regular expression that must fullmatch the qualified
name; ``"all-linear"`` (any case) selects every linear layer except the output head
(`output_head_names`). Keys of ``rank_pattern`` / ``alpha_pattern`` may be regexes and match the same way
as list entries (PEFT's rule: ``re.match(rf"(.*\\.)?({key})$", name)``).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from typing import TypeVar

from torch import nn

from lorakit.config import LoraConfig

ALL_LINEAR = "all-linear"
CLASSIFIER_HEAD_NAMES = ("classifier", "score")

T = TypeVar("T")


def name_matches(name: str, entries: Iterable[str]) -> bool:
    """True when ``name`` equals an entry or ends with ``"." + entry``."""
    return any(name == entry or name.endswith("." + entry) for entry in entries)


def dotted_suffixes(name: str) -> set[str]:
    """``"a.b.c"`` -> ``{"a.b.c", "b.c", "c"}``: an entry matches ``name`` exactly when it is one of these."""
    parts = name.split(".")
    return {".".join(parts[i:]) for i in range(len(parts))}


def entries_matched(names: Iterable[str], entries: Iterable[str]) -> set[str]:
    """The entries that match at least one of ``names``, in time linear in the names (not names × entries:
    an adapter saved from ``all-linear`` lists hundreds of full names)."""
    wanted = set(entries)
    found: set[str] = set()
    for name in names:
        found |= dotted_suffixes(name) & wanted
    return found


def pattern_value(patterns: Mapping[str, T], name: str, default: T) -> T:
    """The value of the first key of ``patterns`` that matches module ``name``, else ``default``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def is_linear(module: nn.Module) -> bool:
    """nn.Linear (bitsandbytes' Linear4bit included) or transformers' Conv1D (GPT-2)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def is_adaptable(module: nn.Module) -> bool:
    return is_linear(module) or isinstance(module, nn.Embedding)


def output_head_names(model: nn.Module, task_type: str | None = None) -> set[str]:
    """Qualified names of the output head that ``"all-linear"`` leaves out, as PEFT decides it.

    The output embedding (``lm_head``) when the model has one; otherwise, for ``task_type="SEQ_CLS"``, the
    classifier head (``classifier`` or ``score``). A classifier head without that task type is an ordinary
    linear layer, as in PEFT.
    """
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    if output is None and task_type == "SEQ_CLS":
        output = next((getattr(model, n) for n in CLASSIFIER_HEAD_NAMES if hasattr(model, n)), None)
    if not isinstance(output, nn.Module):
        return set()
    return {name for name, module in model.named_modules() if module is output}


def _lorakit_internal_names(model: nn.Module) -> set[str]:
    """Names of submodules inside lorakit wrappers (lora_A, base_layer, ...): never targets themselves."""
    from lorakit.adapter_layer import AdapterLayer
    from lorakit.modules_to_save import ModulesToSave

    inside: set[str] = set()
    for prefix, module in model.named_modules():
        if isinstance(module, (AdapterLayer, ModulesToSave)):
            inside.update(f"{prefix}.{suffix}" for suffix, _ in module.named_modules() if suffix)
    return inside


def _layer_index(name: str, layers_pattern: list[str] | str | None) -> int | None:
    """The first numbered segment of ``name`` (``model.layers.3.mlp`` -> 3), as PEFT reads it."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match:
                break
    return int(match.group("idx")) if match else None


def _closest(entry: str, names: list[str]) -> str:
    leaves = sorted({name.rsplit(".", 1)[-1] for name in names})
    close = difflib.get_close_matches(entry, leaves, n=3, cutoff=0.5)
    close += difflib.get_close_matches(entry, names, n=3, cutoff=0.6)
    if not close:
        close = leaves[:8]
    return ", ".join(repr(c) for c in dict.fromkeys(close))


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Qualified names of the modules that ``config`` adapts, in model order.

    Raises:
        ValueError: a list entry of ``target_modules`` that matches no module, a regex that matches nothing,
            a selection that is empty, or a selected module of a type lorakit cannot adapt. The message names
            the closest existing module names.
    """
    from lorakit.adapter_layer import AdapterLayer

    internal = _lorakit_internal_names(model)
    names = [name for name, _ in model.named_modules() if name and name not in internal]
    modules = dict(model.named_modules())
    targets = config.target_modules
    if targets is None:
        raise ValueError("LoraConfig.target_modules is None: name the modules to adapt, "
                         "e.g. ['q_proj', 'v_proj'], or 'all-linear'")

    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        heads = output_head_names(model, config.task_type)
        # Wrapped layers count as what they wrap, so a second adapter finds the same layers.
        bases = {n: m.base_layer if isinstance(m := modules[n], AdapterLayer) else m for n in names}
        selected = [n for n in names if is_linear(bases[n]) and n not in heads]
    elif isinstance(targets, str):
        selected = [n for n in names if re.fullmatch(targets, n)]
        if not selected:
            raise ValueError(f"target_modules regex {targets!r} matches no module; closest names: "
                             f"{_closest(targets, names)}")
    else:
        matched = entries_matched(names, targets)
        for entry in targets:
            if entry not in matched:
                raise ValueError(f"target_modules entry {entry!r} matches no module of "
                                 f"{type(model).__name__}; closest names: {_closest(entry, names)}")
        wanted = set(targets)
        selected = [n for n in names if dotted_suffixes(n) & wanted]

    selected = [n for n in selected if not _excluded(n, config)]
    if config.layers_to_transform:
        wanted = set(config.layers_to_transform)  # type: ignore[arg-type]
        selected = [n for n in selected if _layer_index(n, config.layers_pattern) in wanted]
    if not selected:
        raise ValueError(f"LoraConfig selects no module of {type(model).__name__} "
                         f"(target_modules={targets!r}, exclude_modules={config.exclude_modules!r}, "
                         f"layers_to_transform={config.layers_to_transform!r}); closest names: "
                         f"{_closest(str(targets), names)}")
    for name in selected:
        module = modules[name]
        if not (is_adaptable(module) or isinstance(module, AdapterLayer)):
            raise ValueError(f"module {name!r} is a {type(module).__name__}; lorakit adapts nn.Linear, "
                             "Conv1D and nn.Embedding: name the linear layers inside it instead")
    return selected


def _excluded(name: str, config: LoraConfig) -> bool:
    exclude = config.exclude_modules
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, name):
                return True
        elif name_matches(name, exclude):
            return True
    # A module copied whole by modules_to_save never also gets an adapter, nor do modules inside it.
    saved = modules_to_save_entries(config)
    return any(re.match(rf"(^|.*\.){re.escape(entry)}($|\..*)", name) for entry in saved)


def modules_to_save_entries(config: LoraConfig) -> list[str]:
    """`modules_to_save`, plus the classifier head names when `task_type` is ``"SEQ_CLS"`` (as PEFT)."""
    entries = list(config.modules_to_save or [])
    if config.task_type == "SEQ_CLS":
        entries += [n for n in CLASSIFIER_HEAD_NAMES if n not in entries]
    return entries


def find_modules_to_save(model: nn.Module, config: LoraConfig) -> list[str]:
    """Qualified names of the modules `config.modules_to_save` selects (outermost matches only).

    Raises:
        ValueError: an explicit `modules_to_save` entry that matches no module.
    """
    internal = _lorakit_internal_names(model)
    names = [name for name, _ in model.named_modules() if name and name not in internal]
    for entry in config.modules_to_save or []:
        if not any(name_matches(n, [entry]) for n in names):
            raise ValueError(f"modules_to_save entry {entry!r} matches no module; closest names: "
                             f"{_closest(entry, names)}")
    found = [n for n in names if name_matches(n, modules_to_save_entries(config))]
    return [n for n in found if not any(n.startswith(other + ".") for other in found)]
