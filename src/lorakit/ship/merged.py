"""A standalone merged model: base + adapter folded into one Hugging Face folder.

The folder (safetensors, config, tokenizer) loads with plain transformers, lorakit not installed, and
gives the outputs of the unmerged model. Two traps are handled:

* tied embeddings: when the adapter changes ``lm_head`` or the input embedding of a model whose two are
  one tensor, merging into one would silently change the other, and a reload would re-tie them and
  undo the merge. The output head gets its own copy first and the config says
  ``tie_word_embeddings: false``.
* QLoRA: with ``quantize="nf4"`` the adapter is merged into the *dequantised* NF4 base it was trained
  on (so the merged model reproduces the QLoRA model), written in full precision with no trace of the
  quantisation config. By default (``quantize="auto"``) the adapter's run configuration
  (``run_config.yaml`` of the run that wrote it) says whether it was a QLoRA: merging a QLoRA adapter into
  the full-precision base would give another model (logits off by ~0.1 on a small model).

The output folder is written atomically and is never one that holds anything else: it may not be (or
lie inside, or contain) the base or the adapter, and ``overwrite`` replaces only a previous merged model.
"""

from __future__ import annotations

import fnmatch
import warnings
from pathlib import Path

import torch
from torch import nn

from lorakit.adapter_files import load_adapter
from lorakit.atomic import TEMPORARY_PATTERNS, write_folder
from lorakit.model import merge_and_unload
from lorakit.models.folder import SAVED_MODEL_FILES
from lorakit.models.loading import load_causal_lm, load_classifier
from lorakit.peft_format import CONFIG_NAME, WEIGHTS_NAME, read_adapter_config


def export_merged(
    base: str | Path,
    adapter: str | Path,
    output: str | Path,
    *,
    quantize: str | None = "auto",
    dtype: torch.dtype | str = torch.float32,
    overwrite: bool = False,
) -> Path:
    """Merge ``adapter`` into ``base`` and write the result to ``output`` atomically.

    Args:
        base: a built-in model name, an HF folder or a .gguf file.
        adapter: a PEFT-layout adapter folder; ``task_type: SEQ_CLS`` loads the base as a classifier.
        output: the new model folder; a non-empty one is refused unless ``overwrite`` and it holds a
            previous merged model.
        quantize: ``"nf4"`` when the adapter was trained on an NF4 base (QLoRA), None when not, ``"auto"``
            to follow the adapter's ``run_config.yaml`` (None when there is none).
        dtype: the dtype of the written weights.

    Returns:
        ``output``.

    Raises:
        FileExistsError: ``output`` is not empty and ``overwrite`` is not set.
        ValueError: ``output`` is the base or the adapter folder, lies inside or contains one of them, or
            holds something other than a merged model.
    """
    output, adapter = Path(output), Path(adapter)
    adapter_config = read_adapter_config(adapter)
    if not isinstance(adapter_config, dict):
        raise ValueError(f"{adapter / CONFIG_NAME}: expected a JSON object")
    check_merge_output(output, base, adapter, overwrite=overwrite)
    quantize = _quantize_of(adapter, quantize)
    if adapter_config.get("task_type") == "SEQ_CLS":
        model, tokenizer = load_classifier(base, _num_labels(adapter), dtype=dtype, quantize=quantize)
    else:
        model, tokenizer = load_causal_lm(base, dtype=dtype, quantize=quantize)
    _untie_if_adapted(model, adapter_config)
    load_adapter(model, adapter)
    merge_and_unload(model)
    _dequantize_remaining(model)
    plain = _plain_copy(model, dtype)

    def write(folder: Path) -> None:
        plain.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return write_folder(output, write)


# A folder holding only what save_pretrained writes (and leftovers of an atomic write) is a merged model.
_MODEL_FILES = (*SAVED_MODEL_FILES, *TEMPORARY_PATTERNS)


def check_merge_output(output: Path, base: str | Path, adapter: Path, *, overwrite: bool) -> None:
    """Raise unless ``output`` may receive a merged model (see `export_merged`); reads only."""
    target = output.resolve()
    for role, path in (("base model", _base_path(base)), ("adapter", adapter)):
        if path is None or not path.exists():
            continue
        source = path.resolve()
        if target == source or source in target.parents or target in source.parents:
            where = "is" if target == source else ("lies inside" if source in target.parents else "contains")
            raise ValueError(f"output {output} {where} the {role} {path}: write the merged model elsewhere")
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"output {output} exists and is a file, not a folder")
    entries = sorted(e.name for e in output.iterdir()) if output.is_dir() else []
    if not entries:
        return
    if not overwrite:
        raise FileExistsError(f"output {output} exists and is not empty; pass --overwrite to replace it")
    foreign = [name for name in entries if not any(fnmatch.fnmatchcase(name, p) for p in _MODEL_FILES)]
    if foreign or "config.json" not in entries:
        what = (
            f"files a merged model does not hold: {', '.join(foreign[:5])}" if foreign else "no config.json"
        )
        raise ValueError(
            f"output {output} does not look like a merged model ({what}); --overwrite only replaces a "
            "previous merged model. Choose another folder"
        )


def _base_path(base: str | Path) -> Path | None:
    """The folder (or .gguf file) ``base`` names on disk, None when it cannot be located."""
    from lorakit.models.registry import ModelNotFoundError, locate

    try:
        return locate(base).path
    except ModelNotFoundError:
        return None


def _quantize_of(adapter: Path, requested: str | None) -> str | None:
    """The base quantisation to merge into: ``requested``, or the run configuration's for ``"auto"``."""
    trained = _trained_quantize(adapter)
    if requested == "auto":
        if trained is not None and trained[0]:
            warnings.warn(
                f"{adapter} was trained as a QLoRA ({trained[1]}: quantize={trained[0]}): merging into the "
                f"dequantised {trained[0]} base it was trained on (quantize=None to merge into the "
                "full-precision base instead)",
                stacklevel=3,
            )
        return trained[0] if trained is not None else None
    if requested not in (None, "nf4"):
        raise ValueError(f"quantize must be 'nf4', None or 'auto', got {requested!r}")
    if trained is not None and trained[0] != requested:
        warnings.warn(
            f"{adapter} was trained with quantize={trained[0]} ({trained[1]}) but is merged with "
            f"quantize={requested}: the merged model will differ from the trained one",
            stacklevel=3,
        )
    return requested


def _trained_quantize(adapter: Path) -> tuple[str | None, Path] | None:
    """``(quantize, run_config.yaml)`` of the run that wrote ``adapter``; None when none is found.

    The run folder holds the adapter itself; a checkpoint's adapter is ``<run>/checkpoints/step-N``.
    """
    import yaml

    candidates = [adapter / "run_config.yaml"]
    if adapter.parent.name == "checkpoints":
        candidates.append(adapter.parent.parent / "run_config.yaml")
    for path in candidates:
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
        if isinstance(values, dict):
            return values.get("quantize"), path
    return None


def _num_labels(adapter: Path) -> int:
    """Rows of the saved classifier head (``classifier.weight`` or ``score.weight``)."""
    from safetensors import safe_open

    with safe_open(str(adapter / WEIGHTS_NAME), framework="pt") as tensors:
        for key in tensors.keys():  # noqa: SIM118 (safe_open objects are not iterable)
            if key.endswith(("classifier.weight", "score.weight", "classifier.out_proj.weight")):
                return tensors.get_slice(key).get_shape()[0]
    raise ValueError(f"{adapter}: a SEQ_CLS adapter without a saved classifier head (modules_to_save)")


def _untie_if_adapted(model: nn.Module, adapter_config: dict) -> None:
    """Give the output head its own weight when the adapter touches either tied embedding."""
    input_embedding, output_embedding = model.get_input_embeddings(), model.get_output_embeddings()
    if output_embedding is None or output_embedding.weight is not input_embedding.weight:
        return
    names = {name for name, module in model.named_modules() if module in (input_embedding, output_embedding)}
    targets = adapter_config.get("target_modules") or []
    saved = adapter_config.get("modules_to_save") or []
    entries = [targets] if isinstance(targets, str) else [*targets, *saved]
    if isinstance(targets, str) or any(n == e or n.endswith("." + e) for n in names for e in entries):
        output_embedding.weight = nn.Parameter(output_embedding.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
        text_config = getattr(model.config, "get_text_config", lambda: None)()
        if text_config is not None:
            text_config.tie_word_embeddings = False


def _dequantize_remaining(model: nn.Module) -> None:
    """Replace the 4-bit layers the adapter did not touch by full-precision ``nn.Linear`` copies."""
    from lorakit.base_weights import dequantize_weight, is_4bit

    for name, module in list(model.named_modules()):
        if is_4bit(module):
            weight = dequantize_weight(module)  # (out, in), fp32: what a merged adapter layer gets too
            linear = nn.Linear(
                module.in_features, module.out_features, bias=module.bias is not None, dtype=weight.dtype
            )
            linear.weight.data.copy_(weight)
            if module.bias is not None:
                linear.bias.data.copy_(module.bias.data.to(weight.dtype))
            model.set_submodule(name, linear.requires_grad_(False))


def cast_floating(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``state`` with its floating tensors in ``dtype``; integer and boolean buffers (position or token
    type ids, masks) keep theirs, as ``from_pretrained`` expects them."""
    return {key: value.to(dtype) if value.is_floating_point() else value for key, value in state.items()}


def _plain_copy(model: nn.Module, dtype: torch.dtype | str) -> nn.Module:
    """The same architecture built from its config without any quantisation, holding ``model``'s weights.

    A model loaded through bitsandbytes keeps its quantiser attached even after dequantisation; building
    a fresh one from the config is the reliable way to write a plain full-precision folder.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    auto = (
        AutoModelForSequenceClassification
        if "ForSequenceClassification" in type(model).__name__
        else AutoModelForCausalLM
    )
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    plain = auto.from_config(config, dtype=torch_dtype)
    state = cast_floating(model.state_dict(), torch_dtype)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    tied = {key for key in missing if key.endswith("lm_head.weight")} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(
            f"merged weights do not fit a plain {type(plain).__name__}: missing "
            f"{sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    return plain.eval()
