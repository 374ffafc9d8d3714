"""Load a causal LM or a sequence classifier, with its tokenizer, from a name, folder or GGUF file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lorakit.models.gguf_cache import converted_folder
from lorakit.models.quantize import quantization_config
from lorakit.models.quiet import quiet_progress
from lorakit.models.registry import DEFAULT_CAUSAL_LM, locate

_DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``torch.float32`` or one of the names ``float32/fp32/float16/fp16/bfloat16/bf16``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPE_NAMES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPE_NAMES)}") from None


def model_folder(name_or_path: str | Path, *, cache_dir: str | Path | None = None) -> Path:
    """The local HF folder for a built-in name, an HF folder or a GGUF (converted once, then cached)."""
    source = locate(name_or_path)
    if source.kind == "gguf":
        return converted_folder(source.path, cache_dir)
    return source.path


def load_causal_lm(
    name_or_path: str | Path = DEFAULT_CAUSAL_LM,
    *,
    dtype: torch.dtype | str = torch.float32,
    cache_dir: str | Path | None = None,
    quantize: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` for causal language modelling, in eval mode, never from the network.

    ``name_or_path``: a built-in name (``smollm2-135m-instruct``, the default), an HF folder or a
    ``.gguf`` file (converted once into ``cache_dir``, default ``$LORAKIT_CACHE`` or
    ``~/.cache/lorakit``). ``quantize="nf4"`` loads the linear layers in 4-bit NF4 with double
    quantisation, ``lm_head`` unquantised (see ``lorakit.models.quantize``). A tokenizer without a
    pad token gets its eos token as pad token, so batches can be padded (labels mask the padding).
    """
    torch_dtype = parse_dtype(dtype)
    folder = model_folder(name_or_path, cache_dir=cache_dir)
    tokenizer = _load_tokenizer(folder)
    model = _from_pretrained(AutoModelForCausalLM, folder, torch_dtype, quantize)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_classifier(
    name_or_path: str | Path,
    num_labels: int,
    *,
    dtype: torch.dtype | str = torch.float32,
    cache_dir: str | Path | None = None,
    quantize: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` for sequence classification with a fresh ``num_labels`` head.

    Same sources and ``quantize`` as ``load_causal_lm`` (built-in ``minilm-l6`` is the usual
    choice); the head (``classifier``/``score``) is randomly initialised from torch's global RNG
    (seed it for reproducibility) and never quantised. Decoder models classify from the last
    non-padding token, so ``config.pad_token_id`` is set from the tokenizer when missing.
    """
    if num_labels < 1:
        raise ValueError(f"num_labels must be >= 1, got {num_labels}")
    torch_dtype = parse_dtype(dtype)
    folder = model_folder(name_or_path, cache_dir=cache_dir)
    tokenizer = _load_tokenizer(folder)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    # ignore_mismatched_sizes: a checkpoint that already has a head of another size (say a
    # 2-class model asked for 3 labels) gets a fresh head instead of an error.
    model = _from_pretrained(
        AutoModelForSequenceClassification,
        folder,
        torch_dtype,
        quantize,
        num_labels=num_labels,
        ignore_mismatched_sizes=True,
    )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def _from_pretrained(
    auto_class: Any, folder: Path, dtype: torch.dtype, quantize: str | None, **kwargs: Any
) -> PreTrainedModel:
    bnb_config = quantization_config(quantize, dtype)
    if bnb_config is not None:
        kwargs["quantization_config"] = bnb_config
    with quiet_progress():
        model = auto_class.from_pretrained(folder, dtype=dtype, local_files_only=True, **kwargs)
    return model.eval()
