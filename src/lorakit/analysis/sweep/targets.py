"""Short target names (``q``, ``v``, ``down``...) and the module names they select in each architecture.

Short target names are mapped to the module names of the model's architecture (`SHORT_TARGETS`):

====== ============================================== ==================================
short  BERT / RoBERTa / ELECTRA (``BertLayer``)       Llama, Mistral, Qwen, Gemma, ...
====== ============================================== ==================================
q      ``query``                                      ``q_proj``
k      ``key``                                        ``k_proj``
v      ``value``                                      ``v_proj``
o      ``attention.output.dense``                     ``o_proj``
gate   --                                             ``gate_proj``
up     ``intermediate.dense``                         ``up_proj``
down   ``output.dense`` (not ``attention.output``)    ``down_proj``
====== ============================================== ==================================

DistilBERT (``q_lin``, ``k_lin``, ``v_lin``, ``out_lin``, ``lin1``, ``lin2``) and OPT / BART
(``q_proj``..., ``out_proj``, ``fc1``, ``fc2``) are covered too. ``all-linear`` is passed through (every
linear layer but the output head), and any other name is taken as a module name when the model has a
linear layer of that name. Names are checked against the model before anything trains.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lorakit.matching import is_linear, name_matches


@dataclass(frozen=True)
class TargetRule:
    """Modules whose qualified name ends with ``suffix`` (PEFT's list rule) but not with ``exclude``."""

    suffix: str
    exclude: str | None = None

    def matches(self, name: str) -> bool:
        if not name_matches(name, [self.suffix]):
            return False
        return self.exclude is None or not name_matches(name, [self.exclude])


# Short name -> candidate rules, tried in order; the first that matches a linear layer of the model wins.
SHORT_TARGETS: dict[str, tuple[TargetRule, ...]] = {
    "q": (TargetRule("q_proj"), TargetRule("query"), TargetRule("q_lin")),
    "k": (TargetRule("k_proj"), TargetRule("key"), TargetRule("k_lin")),
    "v": (TargetRule("v_proj"), TargetRule("value"), TargetRule("v_lin")),
    "o": (
        TargetRule("o_proj"),
        TargetRule("attention.output.dense"),
        TargetRule("out_proj"),
        TargetRule("out_lin"),
    ),
    "gate": (TargetRule("gate_proj"),),
    "up": (TargetRule("up_proj"), TargetRule("intermediate.dense"), TargetRule("fc1"), TargetRule("lin1")),
    "down": (
        TargetRule("down_proj"),
        # BERT's FFN output is `layer.N.output.dense`; `layer.N.attention.output.dense` is `o`.
        TargetRule("output.dense", exclude="attention.output.dense"),
        TargetRule("fc2"),
        TargetRule("lin2"),
    ),
}
ALL_LINEAR = "all-linear"


def linear_module_names(model: str, task: str = "causal", num_labels: int = 2) -> list[str]:
    """Qualified names of the linear layers of ``model`` (built-in name or folder), as the trainer loads it.

    Built on the meta device from the config alone: no weights are read.
    """
    import transformers

    from lorakit.models.loading import model_folder

    config = transformers.AutoConfig.from_pretrained(model_folder(model), local_files_only=True)
    if task == "classify":
        config.num_labels = num_labels
        auto = transformers.AutoModelForSequenceClassification
    else:
        auto = transformers.AutoModelForCausalLM
    with torch.device("meta"):
        built = auto.from_config(config)
    return [name for name, module in built.named_modules() if is_linear(module)]


def resolve_targets(names: Sequence[str], linear_names: Sequence[str]) -> list[str] | str:
    """The ``target_modules`` for the short or literal ``names`` on a model with ``linear_names``.

    Each short name becomes the first of its `SHORT_TARGETS` rules that selects a linear layer; a rule
    that needs an exclusion (BERT's ``down``) becomes the full names it selects, so the list means exactly
    the same under PEFT's suffix rule. ``("all-linear",)`` stays ``"all-linear"``.

    Raises:
        ValueError: a short name with no module in this architecture, or an unknown name.
    """
    if tuple(names) == (ALL_LINEAR,):
        return ALL_LINEAR
    resolved: list[str] = []
    for name in names:
        if name in SHORT_TARGETS:
            rules = SHORT_TARGETS[name]
            rule = next((r for r in rules if any(r.matches(n) for n in linear_names)), None)
            if rule is None:
                tried = ", ".join(r.suffix for r in rules)
                raise ValueError(
                    f"target {name!r} has no module in this architecture (looked for {tried}); "
                    f"its linear layers are named like {_leaf_examples(linear_names)}"
                )
            if rule.exclude is None:
                resolved.append(rule.suffix)
            else:
                resolved.extend(n for n in linear_names if rule.matches(n))
        elif any(name_matches(n, [name]) for n in linear_names):
            resolved.append(name)  # a literal module name, e.g. "query"
        else:
            raise ValueError(
                f"unknown target {name!r}: neither a short name ({', '.join(SHORT_TARGETS)}, {ALL_LINEAR}) "
                f"nor a linear layer of the model (named like {_leaf_examples(linear_names)})"
            )
    return list(dict.fromkeys(resolved))


def _leaf_examples(linear_names: Sequence[str], limit: int = 8) -> str:
    leaves = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in linear_names))
    return ", ".join(leaves[:limit]) or "(none)"
