"""What each serving engine does with a PEFT LoRA adapter: one rule table per engine.

Every rule names the file in the engine's own repository it comes from, what the engine does when the
rule is triggered (``refuses`` the adapter, or ``computes something else`` than PEFT, silently), and the
`lorakit convert` call that fixes it. `check_adapter` runs one table against one adapter folder; a rule
that needs the base model (its architecture, tied embeddings) and did not get one becomes a note.

Facts behind the tables (read from the engines' sources):

* vLLM (``vllm/lora/peft_helper.py``): refuses ``modules_to_save`` and DoRA, refuses a bias, refuses a rank
  above ``--max-lora-rank`` (default 16; allowed 1, 8, 16, 32, 64, 128, 256, 320, 512,
  ``vllm/config/lora.py``); computes one scale for the whole adapter from the top-level ``r`` and
  ``lora_alpha`` (``lora_alpha / r``, or ``/ sqrt(r)`` with ``use_rslora``), so ``rank_pattern`` /
  ``alpha_pattern`` are ignored; refuses modules its model class does not list
  (``vllm/lora/lora_model.py``, "expected target modules in ...").
* llama.cpp (``convert_lora_to_gguf.py``, ``src/llama-adapter.cpp``, ``src/llama-adapter.h``): the
  converter stops at any tensor that is not lora_A / lora_B (modules_to_save copies, DoRA magnitudes,
  biases) and at ``lm_head`` when the base ties it to the embeddings; the runtime scales each layer by
  ``alpha / rank`` with one ``adapter.lora.alpha`` for the file and the rank read from the tensor (so a
  ``rank_pattern`` alone is right but an ``alpha_pattern`` is not), never reads ``use_rslora``, and uses a
  scale of 1 when alpha is 0.
* SGLang (``python/sglang/srt/lora/lora.py``): ``scaling = lora_alpha / r`` from the top-level config.
* LoRAX (``server/lorax_server/adapters/lora.py``): reads only ``r``, ``target_modules``,
  ``fan_in_fan_out``, ``lora_alpha`` and ``use_rslora``; DoRA magnitudes, ``modules_to_save``, biases and
  the patterns are dropped without a word.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from lorakit.config import lora_scaling  # the standard library only: no torch for `check --help`

# Annotations only: `lorakit check --help` reads ENGINES without loading torch (ship.folder does).
if TYPE_CHECKING:
    from lorakit.ship.folder import AdapterFolder, LoraModule

ENGINES = ("vllm", "llama.cpp", "sglang", "lorax")
Effect = Literal["refuses", "computes something else"]

VLLM_DEFAULT_MAX_LORA_RANK = 16
VLLM_ALLOWED_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# vLLM's LoRA-capable modules per model class (vllm/model_executor/models/llama.py, qwen2.py): the packed
# qkv_proj / gate_up_proj by their PEFT names, plus the class's embedding_modules. LlamaForCausalLM (which
# also serves MistralForCausalLM) declares embed_tokens and lm_head; Qwen2ForCausalLM declares none.
_PROJECTIONS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
VLLM_KNOWN_MODULES: dict[str, frozenset[str]] = {
    "LlamaForCausalLM": _PROJECTIONS | {"embed_tokens", "lm_head"},
    "MistralForCausalLM": _PROJECTIONS | {"embed_tokens", "lm_head"},
    "Qwen2ForCausalLM": _PROJECTIONS,
}


@dataclass(frozen=True)
class Facts:
    """What the rules look at: the adapter, the server's rank limit and (optional) the base's config."""

    folder: AdapterFolder
    max_lora_rank: int | None = None
    architecture: str | None = None  # the base's config.json "architectures"[0]
    tied_embeddings: bool | None = None  # the base's tie_word_embeddings


Condition = Callable[[Facts], "list[str] | None"]  # offending items; [] = fine; None = needs the base


@dataclass(frozen=True)
class Rule:
    id: str
    engine: str
    source: str  # file in the engine's repository
    effect: Effect
    what: str  # what the engine does
    fix: str  # how to fix it (a `lorakit convert` call, or why there is none)
    condition: Condition = field(repr=False)


@dataclass(frozen=True)
class Finding:
    rule: Rule
    items: tuple[str, ...]


@dataclass
class CheckResult:
    engine: str
    findings: list[Finding]
    notes: list[str]

    @property
    def ok(self) -> bool:
        return not self.findings


# --- conditions ----------------------------------------------------------------------------------------


def _dora(facts: Facts) -> list[str]:
    return [m.path for m in facts.folder.modules.values() if m.magnitude is not None] or (
        ["use_dora: true"] if facts.folder.use_dora else [])


def _modules_to_save(facts: Facts) -> list[str]:
    entries = [f"modules_to_save: {e}" for e in facts.folder.config.get("modules_to_save") or []]
    return sorted(facts.folder.saved) or entries


def _bias(facts: Facts) -> list[str]:
    folder = facts.folder
    items = sorted([*folder.biases, *folder.lora_biases])
    if not items and folder.config.get("bias", "none") != "none":
        items = [f"bias: {folder.config['bias']}"]
    if not items and folder.config.get("lora_bias"):
        items = ["lora_bias: true"]
    return items


def _rank_over_limit(facts: Facts) -> list[str]:
    limit = facts.max_lora_rank or VLLM_DEFAULT_MAX_LORA_RANK
    return [f"{m.path} (r={m.rank} > {limit})" for m in facts.folder.modules.values() if m.rank > limit]


def _unknown_targets(facts: Facts) -> list[str] | None:
    if facts.architecture is None:
        return None
    known = VLLM_KNOWN_MODULES.get(facts.architecture)
    if known is None:
        return None
    return sorted({m.leaf for m in facts.folder.modules.values() if m.leaf not in known})


def _differs(a: float, b: float) -> bool:
    return not math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)


def _global_scale_mismatch(rslora_read: bool) -> Condition:
    """Modules whose PEFT scale differs from one scale for the file computed from the top-level r / alpha."""

    def condition(facts: Facts) -> list[str]:
        config = facts.folder.config
        rank, alpha = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
        items = []
        for module in facts.folder.modules.values():
            engine = lora_scaling(alpha, rank, rslora_read and facts.folder.use_rslora)
            peft = lora_scaling(module.alpha, module.rank, rslora_read and facts.folder.use_rslora)
            if (module.rank, module.alpha) != (rank, alpha) and _differs(engine, peft):
                items.append(_pattern_item(module, rank, alpha))
        return items

    return condition


def _pattern_item(module: LoraModule, rank: int, alpha: float) -> str:
    return f"{module.path} (r={module.rank}, alpha={module.alpha:g}; top level r={rank}, alpha={alpha:g})"


def _rslora_ignored(facts: Facts) -> list[str]:
    if not facts.folder.use_rslora:
        return []
    return [f"{m.path} (PEFT scale {m.scaling:.6g}, engine {m.alpha / m.rank:.6g})"
            for m in facts.folder.modules.values() if m.rank != 1]


def _alpha_pattern_per_file(facts: Facts) -> list[str]:
    """llama.cpp: one alpha for the file, rank from each tensor (so only alpha differences matter)."""
    alpha = float(facts.folder.config.get("lora_alpha", 8))
    return [_pattern_item(m, int(facts.folder.config.get("r", 8)), alpha)
            for m in facts.folder.modules.values() if _differs(m.alpha, alpha)]


def _alpha_zero(facts: Facts) -> list[str]:
    return ["lora_alpha: 0"] if float(facts.folder.config.get("lora_alpha", 8)) == 0 else []


def _tied_lm_head(facts: Facts) -> list[str] | None:
    heads = [m.path for m in facts.folder.modules.values() if m.leaf == "lm_head"]
    if not heads:
        return []
    if facts.tied_embeddings is None:
        return None
    return heads if facts.tied_embeddings else []


# --- the tables ----------------------------------------------------------------------------------------

_CONVERT = "lorakit convert ADAPTER OUT --target {engine}"
_DORA_FIX = _CONVERT + " --base BASE [--rank R]  (DoRA -> plain LoRA by truncated SVD, error reported)"
_MTS_FIX = _CONVERT + " --drop-modules-to-save  (the trained copies are lost; the base's modules are used)"
_BIAS_FIX = _CONVERT + " --drop-bias  (the trained biases are lost)"
_SCALE_FIX = _CONVERT + "  (folds every module's scale into lora_B; exact)"

VLLM_RULES: tuple[Rule, ...] = (
    Rule("vllm-dora", "vllm", "vllm/lora/peft_helper.py", "refuses",
         "vLLM does not yet support DoRA", _DORA_FIX, _dora),
    Rule("vllm-modules-to-save", "vllm", "vllm/lora/peft_helper.py", "refuses",
         "vLLM only supports modules_to_save being None", _MTS_FIX, _modules_to_save),
    Rule("vllm-bias", "vllm", "vllm/lora/peft_helper.py", "refuses",
         "vLLM refuses adapter biases", _BIAS_FIX, _bias),
    Rule("vllm-rank", "vllm", "vllm/lora/peft_helper.py, vllm/config/lora.py", "refuses",
         "LoRA rank is greater than max_lora_rank (vLLM's default is 16)",
         _CONVERT + " --max-lora-rank R  (truncated SVD, error reported)", _rank_over_limit),
    Rule("vllm-target-modules", "vllm", "vllm/lora/lora_model.py, vllm/model_executor/models/*.py", "refuses",
         "expected target modules in {the model class's LoRA modules} but received [...]",
         "no conversion: retrain without these modules, or merge them into the base (lorakit merge)",
         _unknown_targets),
    Rule("vllm-patterns", "vllm", "vllm/lora/peft_helper.py", "computes something else",
         "one scale for all modules from the top-level r and lora_alpha: rank_pattern / alpha_pattern "
         "ignored",
         _SCALE_FIX, _global_scale_mismatch(rslora_read=True)),
)

LLAMA_CPP_RULES: tuple[Rule, ...] = (
    Rule("llama.cpp-dora", "llama.cpp", "convert_lora_to_gguf.py", "refuses",
         "stops at lora_magnitude_vector: 'Not a lora_A or lora_B tensor'", _DORA_FIX, _dora),
    Rule("llama.cpp-modules-to-save", "llama.cpp", "convert_lora_to_gguf.py", "refuses",
         "stops at a modules_to_save copy: 'Not a lora_A or lora_B tensor'", _MTS_FIX, _modules_to_save),
    Rule("llama.cpp-bias", "llama.cpp", "convert_lora_to_gguf.py", "refuses",
         "stops at a bias tensor: 'Not a lora_A or lora_B tensor'", _BIAS_FIX, _bias),
    Rule("llama.cpp-tied-lm-head", "llama.cpp", "convert_lora_to_gguf.py", "refuses",
         "'lm_head is present in adapter, but is ignored in base model' (the base ties its embeddings)",
         "no conversion: merge the adapter into the base instead (lorakit merge)", _tied_lm_head),
    Rule("llama.cpp-rslora", "llama.cpp", "src/llama-adapter.h (get_scale), convert_lora_to_gguf.py",
         "computes something else", "scales by alpha / rank and never reads use_rslora: the update comes "
         "out sqrt(r) times too weak", _SCALE_FIX, _rslora_ignored),
    Rule("llama.cpp-alpha-pattern", "llama.cpp", "src/llama-adapter.h (get_scale), convert_lora_to_gguf.py",
         "computes something else", "one adapter.lora.alpha for the file: alpha_pattern ignored",
         _SCALE_FIX, _alpha_pattern_per_file),
    Rule("llama.cpp-alpha-zero", "llama.cpp", "src/llama-adapter.h (get_scale)", "computes something else",
         "alpha 0 means scale 1 in llama.cpp, but 0 (no update) in PEFT", _SCALE_FIX, _alpha_zero),
)

SGLANG_RULES: tuple[Rule, ...] = (
    Rule("sglang-rslora", "sglang", "python/sglang/srt/lora/lora.py", "computes something else",
         "scaling = lora_alpha / r: use_rslora ignored, the update comes out sqrt(r) times too weak",
         _SCALE_FIX, _rslora_ignored),
    Rule("sglang-patterns", "sglang", "python/sglang/srt/lora/lora.py", "computes something else",
         "scaling = lora_alpha / r from the top-level config: rank_pattern / alpha_pattern ignored",
         _SCALE_FIX, _global_scale_mismatch(rslora_read=False)),
)

LORAX_RULES: tuple[Rule, ...] = (
    Rule("lorax-dora", "lorax", "server/lorax_server/adapters/lora.py", "computes something else",
         "reads r, target_modules, fan_in_fan_out, lora_alpha, use_rslora only: DoRA magnitudes ignored",
         _DORA_FIX, _dora),
    Rule("lorax-modules-to-save", "lorax", "server/lorax_server/adapters/lora.py", "computes something else",
         "modules_to_save copies ignored: the base's modules are used", _MTS_FIX, _modules_to_save),
    Rule("lorax-bias", "lorax", "server/lorax_server/adapters/lora.py", "computes something else",
         "trained biases ignored", _BIAS_FIX, _bias),
    Rule("lorax-patterns", "lorax", "server/lorax_server/adapters/lora.py", "computes something else",
         "rank_pattern / alpha_pattern not read: one scale from the top-level r and lora_alpha",
         _SCALE_FIX, _global_scale_mismatch(rslora_read=True)),
)

RULES: dict[str, tuple[Rule, ...]] = {
    "vllm": VLLM_RULES,
    "llama.cpp": LLAMA_CPP_RULES,
    "sglang": SGLANG_RULES,
    "lorax": LORAX_RULES,
}


def run_rules(engine: str, facts: Facts) -> CheckResult:
    """Evaluate ``engine``'s table on ``facts``.

    Raises:
        ValueError: an unknown engine.
    """
    if engine not in RULES:
        raise ValueError(f"unknown target {engine!r}; lorakit knows {', '.join(ENGINES)}")
    findings, notes = [], []
    for rule in RULES[engine]:
        items = rule.condition(facts)
        if items is None:
            notes.append(f"{rule.id}: not checked, needs --base ({rule.what})")
        elif items:
            findings.append(Finding(rule, tuple(items)))
    if engine == "vllm" and facts.max_lora_rank is None and facts.folder.max_rank > 0:
        notes.append(f"vllm-rank: checked against vLLM's default --max-lora-rank "
                     f"{VLLM_DEFAULT_MAX_LORA_RANK}; pass --max-lora-rank to match your server")
    if (engine == "vllm" and facts.max_lora_rank is not None
            and facts.max_lora_rank not in VLLM_ALLOWED_MAX_LORA_RANKS):
        notes.append(f"vLLM accepts --max-lora-rank only in {VLLM_ALLOWED_MAX_LORA_RANKS}")
    return CheckResult(engine, findings, notes)
