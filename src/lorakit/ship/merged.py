"""A standalone merged model: base + adapter folded into one Hugging Face folder.

The folder (safetensors, config, tokenizer) loads with plain transformers, lorakit not installed, and
gives the outputs of the unmerged model. Two traps are handled:

* tied embeddings: when the adapter changes ``lm_head`` or the input embedding of a model whose two are
  one tensor, merging into one would silently change the other, and a reload would re-tie them and
  undo the merge. The output head gets its own copy first and the config says
  ``tie_word_embeddings: false``.
* QLoRA: with ``quantize="nf4"`` the adapter is merged into the *dequantised* NF4 base it was trained
  on (so the merged model reproduces the QLoRA model), written in full precision with no trace of the
  quantisation config.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from lorakit.atomic import write_atomically
from lorakit.io import load_adapter
from lorakit.model import merge_and_unload
from lorakit.models.loading import load_causal_lm, load_classifier


def export_merged(
    base: str | Path,
    adapter: str | Path,
    output: str | Path,
    *,
    quantize: str | None = None,
    dtype: torch.dtype | str = torch.float32,
    overwrite: bool = False,
) -> Path:
    """Merge ``adapter`` into ``base`` and write the result to ``output`` atomically.

    Args:
        base: a built-in model name, an HF folder or a .gguf file.
        adapter: a PEFT-layout adapter folder; ``task_type: SEQ_CLS`` loads the base as a classifier.
        output: the new model folder; refused if it exists unless ``overwrite``.
        quantize: ``"nf4"`` when the adapter was trained on an NF4 base (QLoRA).
        dtype: the dtype of the written weights.

    Returns:
        ``output``.
    """
    output = Path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists; pass overwrite=True (--overwrite) to replace it")
    adapter = Path(adapter)
    config_path = adapter / "adapter_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no adapter_config.json in {adapter}")
    adapter_config = json.loads(config_path.read_text())
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

    return write_atomically(output, write)


def _num_labels(adapter: Path) -> int:
    """Rows of the saved classifier head (``classifier.weight`` or ``score.weight``)."""
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as tensors:
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
    from lorakit.layers import LoraLinear, is_4bit

    for name, module in list(model.named_modules()):
        if is_4bit(module):
            # A LoRA wrapper without adapters dequantises exactly like a merged one.
            model.set_submodule(name, LoraLinear(module)._dequantised_linear())


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
    state = {key: value.to(torch_dtype) for key, value in model.state_dict().items()}
    missing, unexpected = plain.load_state_dict(state, strict=False)
    tied = {key for key in missing if key.endswith("lm_head.weight")} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(
            f"merged weights do not fit a plain {type(plain).__name__}: missing "
            f"{sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    return plain.eval()
