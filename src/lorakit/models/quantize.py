"""NF4 quantisation of a frozen base model with bitsandbytes.

``quantize="nf4"`` loads every ``nn.Linear`` of the base model as a bitsandbytes ``Linear4bit``
holding 4-bit NormalFloat weights (QLoRA's format). Two defaults matter:

* **double quantisation is on** (``bnb_4bit_use_double_quant=True``): the per-block fp32 scales are
  themselves quantised to 8 bits, saving ~0.4 bit per weight at no measurable cost in quality;
  this is QLoRA's recipe.
* **heads stay unquantised**: ``lm_head``, ``score``, ``classifier`` and BERT's ``pooler.dense`` keep
  their dtype, because they are small, sensitive, and often trained (``modules_to_save``).

The compute dtype is the model's ``dtype`` (fp32 by default on CPUs without bf16). With
bitsandbytes >= 0.45 this works on CPU as well as CUDA; transformers performs the quantisation
while it loads the weights.
"""

from __future__ import annotations

from typing import Any

import torch

QUANTIZE_CHOICES = ("nf4",)
# Matched by transformers as a prefix or a suffix of the module name ("pooler.dense" is BERT's pooler).
UNQUANTIZED_HEADS = ("lm_head", "score", "classifier", "pooler.dense")


def quantization_config(quantize: str | None, dtype: torch.dtype) -> Any | None:
    """A transformers ``BitsAndBytesConfig`` for ``quantize`` (None: no quantisation)."""
    if quantize is None:
        return None
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(
            f"quantize={quantize!r} is not supported; expected None or one of {QUANTIZE_CHOICES}"
        )
    try:
        import bitsandbytes  # noqa: F401  (checked here so the error says what to install)
    except ImportError as error:
        raise ImportError(
            "quantize='nf4' needs bitsandbytes: pip install 'lorakit[train]' (or pip install bitsandbytes)"
        ) from error
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        llm_int8_skip_modules=list(UNQUANTIZED_HEADS),
    )
