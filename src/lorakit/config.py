"""`LoraConfig`: PEFT's field names and meaning, validated where the values enter."""

from __future__ import annotations

import dataclasses
import difflib
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

InitLoraWeights = bool | Literal["gaussian", "pissa", "olora"]
_INIT_STRINGS = ("gaussian", "pissa", "olora")
_BIAS_VALUES = ("none", "all", "lora_only")
# Fields of peft.LoraConfig that lorakit does not have, at PEFT 0.21.2's defaults (written as they are).
PEFT_ONLY_FIELDS: dict[str, Any] = {
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
# Keys PEFT writes about the file itself rather than the adapter.
PEFT_BOOKKEEPING_FIELDS = ("peft_type", "auto_mapping", "peft_version", "inference_mode")
# How close (difflib ratio) an unknown key must be to a field to be taken for a misspelling of it.
_MISSPELLING_RATIO = 0.85


def lora_scaling(lora_alpha: float, r: int, use_rslora: bool = False) -> float:
    """The factor s in ``base(x) + s · B(A(x))``: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` (rsLoRA).

    The one place the rule is written; layers, file readers and converters all call it.
    """
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


@dataclass
class LoraConfig:
    """What to adapt and how, with the meaning of `peft.LoraConfig` for every shared field.

    Target names (`target_modules`, `exclude_modules`, `modules_to_save`) follow one rule, documented in
    `lorakit.matching`: a list entry matches a module whose qualified name equals it or ends with
    ``"." + entry``; a string is a regex that must fullmatch the qualified name; ``"all-linear"`` is every
    linear layer except the output head.

    Attributes:
        r: rank of the update ΔW = B·A (A is r×in, B is out×r).
        lora_alpha: numerator of the scaling: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA.
        lora_dropout: dropout on the adapter's input, in [0, 1).
        target_modules: which modules get an adapter.
        exclude_modules: modules never adapted, same rule as `target_modules`.
        layers_to_transform: only modules inside these layer indices (the first ``<name>.<index>.`` segment).
        layers_pattern: the name of the layer list (``"layers"``, ``"h"``) when `layers_to_transform` is set.
        rank_pattern: per-module rank; key ``k`` applies to module ``n`` when ``n`` equals ``k`` or ends with
            ``"." + k`` (``k`` may be a regex), as in PEFT.
        alpha_pattern: per-module alpha, same keys as `rank_pattern`.
        bias: ``"none"``, ``"all"`` (every bias trains) or ``"lora_only"`` (biases of adapted layers).
        modules_to_save: modules copied per adapter, fully trained and saved with it (e.g. a classifier head).
        init_lora_weights: ``True`` (Kaiming-uniform A, zero B), ``"gaussian"`` (normal A with std 1/r,
            zero B), ``"pissa"`` / ``"olora"`` (A, B from the SVD / QR of W, which keeps the residual), or
            ``False`` (random non-zero B: the adapter changes the output at once; for tests).
        use_rslora: scale by ``lora_alpha / sqrt(r)``.
        use_dora: weight-decomposed LoRA (Linear layers only).
        fan_in_fan_out: the base weight is stored (in, out), as GPT-2's Conv1D; set automatically for Conv1D.
        task_type: PEFT's task type; ``"SEQ_CLS"`` adds the classifier head (``classifier`` or ``score``) to
            `modules_to_save`, as PEFT does.
        base_model_name_or_path: written to adapter_config.json.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_lora_weights: InitLoraWeights = True
    use_rslora: bool = False
    use_dora: bool = False
    fan_in_fan_out: bool = False
    task_type: str | None = None
    base_model_name_or_path: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoraConfig.r must be an integer >= 1, got {self.r!r}")
        if not _is_number(self.lora_alpha) or self.lora_alpha <= 0:
            raise ValueError(f"LoraConfig.lora_alpha must be a number > 0, got {self.lora_alpha!r}")
        if not _is_number(self.lora_dropout) or not 0 <= self.lora_dropout < 1:
            raise ValueError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in _BIAS_VALUES:
            raise ValueError(f"LoraConfig.bias must be one of {_BIAS_VALUES}, got {self.bias!r}")
        if not (isinstance(self.init_lora_weights, bool) or self.init_lora_weights in _INIT_STRINGS):
            raise ValueError(
                f"LoraConfig.init_lora_weights must be True, False or one of {_INIT_STRINGS}, "
                f"got {self.init_lora_weights!r}"
            )
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.layers_to_transform, int) and not isinstance(self.layers_to_transform, bool):
            self.layers_to_transform = [self.layers_to_transform]
        if self.layers_pattern and not self.layers_to_transform:
            raise ValueError("LoraConfig.layers_pattern is only meaningful with layers_to_transform")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("LoraConfig.target_modules is an empty list: name at least one module")
        # adapter_config.json files written by older PEFT versions may hold null here.
        self.rank_pattern = dict(self.rank_pattern or {})
        self.alpha_pattern = dict(self.alpha_pattern or {})
        for key, rank in self.rank_pattern.items():
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
                raise ValueError(f"LoraConfig.rank_pattern[{key!r}] must be an integer >= 1, got {rank!r}")
        for key, alpha in self.alpha_pattern.items():
            if not _is_number(alpha) or alpha <= 0:
                raise ValueError(f"LoraConfig.alpha_pattern[{key!r}] must be a number > 0, got {alpha!r}")
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)

    def replace(self, **changes: Any) -> LoraConfig:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LoraConfig:
        """Build from a dict such as PEFT's adapter_config.json.

        Keys lorakit does not know are ignored with a warning (newer PEFT versions add fields), except a
        key that looks like a misspelt field, which is an error: ``lora_alpah`` silently meaning the
        default alpha would train or load a different adapter. PEFT's own fields that lorakit lacks
        (`PEFT_ONLY_FIELDS`) are dropped quietly.

        Raises:
            ValueError: a key within a small edit distance of a field ("did you mean lora_alpha?"), or an
                invalid value.
        """
        known = [f.name for f in dataclasses.fields(cls)]
        skip = {*PEFT_ONLY_FIELDS, *PEFT_BOOKKEEPING_FIELDS}
        unknown = [key for key in values if key not in known and key not in skip]
        for key in unknown:
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=_MISSPELLING_RATIO)
            if close:
                raise ValueError(f"unknown LoraConfig field {key!r}: did you mean {close[0]!r}?")
        if unknown:
            ignored = sorted(map(str, unknown))
            warnings.warn(f"LoraConfig fields lorakit does not know were ignored: {ignored}", stacklevel=2)
        return cls(**{key: value for key, value in values.items() if key in known})


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
