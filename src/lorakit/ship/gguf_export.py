"""A PEFT LoRA adapter as a llama.cpp GGUF adapter that computes exactly what PEFT computes.

llama.cpp adds ``scale · B·A·x`` per layer with ``scale = adapter.lora.alpha / rank`` (rank read from the
tensor, scale 1 when alpha is 0; ``src/llama-adapter.h``) and knows nothing of rsLoRA or per-module
patterns. So every module's PEFT scale s is folded into B (B' = s·B) and alpha is chosen to make
llama.cpp's factor 1: alpha = r when all modules share one rank, else 0. rsLoRA, ``rank_pattern`` and
``alpha_pattern`` are thereby reproduced exactly.

The file follows llama.cpp's own converter (``convert_lora_to_gguf.py``):

* metadata ``general.architecture`` (the base's, checked on load), ``general.type = "adapter"``,
  ``adapter.type = "lora"``, ``adapter.lora.alpha``;
* tensors ``<base tensor name>.lora_a`` / ``.lora_b`` with the base names from gguf's own
  ``TensorNameMap`` (``model.layers.0.self_attn.q_proj`` -> ``blk.0.attn_q.weight``); lora_a is A (r, in)
  and lora_b is B (out, r) as NumPy arrays (GGML shapes [in, r] and [r, out]); for ``token_embd`` lora_a
  is Aᵀ (num_embeddings, r), as llama.cpp's embedding lookup expects;
* LLaMA-family q_proj / k_proj: llama.cpp's HF converter permutes the rows of the base Q and K weights
  (the two rotary halves of each head are interleaved), so the rows of B are permuted the same way
  (A is untouched: the permutation acts on the output dimension only).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorakit.ship.base import architecture_of, base_config
from lorakit.ship.folder import AdapterFolder, LoraModule, read_adapter_folder

# HF architecture -> (gguf MODEL_ARCH member name, whether llama.cpp's converter permutes Q / K rows)
ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "LlamaForCausalLM": ("LLAMA", True),
    "MistralForCausalLM": ("LLAMA", True),
    "Qwen2ForCausalLM": ("QWEN2", False),
}
_DTYPES = {"f32": (torch.float32, np.float32), "f16": (torch.float16, np.float16)}


@dataclass(frozen=True)
class GgufTensorPair:
    name: str  # e.g. blk.0.attn_q.weight
    module: str
    rank: int


@dataclass
class GgufExport:
    path: str
    architecture: str
    alpha: float
    tensors: list[GgufTensorPair]


def rope_permute(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder the rows (output features) of a Q or K projection as llama.cpp's HF converter does.

    HF keeps each head's rotary dimensions as two halves [x_0..x_{d/2-1}, x_{d/2}..x_{d-1}]; GGUF
    interleaves them pairwise. ``rows`` is (n_head · head_dim, ...).
    """
    head_dim = rows.shape[0] // n_head
    return (rows.reshape(n_head, 2, head_dim // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape))


def export_gguf(
    adapter: str | os.PathLike[str],
    base: str | Path,
    output: str | os.PathLike[str],
    *,
    dtype: str = "f32",
) -> GgufExport:
    """Write ``adapter`` (a PEFT folder) for ``base`` as a llama.cpp LoRA GGUF file ``output``.

    Raises:
        ValueError: ``output`` exists, an unsupported base architecture, or tensors llama.cpp cannot hold
            (DoRA, modules_to_save, biases: convert them first with ``lorakit convert --target llama.cpp``),
            ``lm_head`` on a base with tied embeddings, a module gguf has no name for.
    """
    import gguf

    output = Path(output)
    if output.exists():
        raise ValueError(f"{output} exists; lorakit does not replace files it did not create")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    folder = read_adapter_folder(adapter)
    _refuse_unsupported(folder)
    config = base_config(base)
    architecture = architecture_of(config)
    if architecture not in ARCHITECTURES:
        raise ValueError(f"base architecture {architecture!r} is not supported for GGUF export; lorakit "
                         f"knows {sorted(ARCHITECTURES)}")
    arch_member, permutes = ARCHITECTURES[architecture]
    arch = getattr(gguf.MODEL_ARCH, arch_member)
    names = gguf.get_tensor_name_map(arch, int(config["num_hidden_layers"]))
    ranks = {module.rank for module in folder.modules.values()}
    alpha = float(ranks.pop()) if len(ranks) == 1 else 0.0  # either way llama.cpp's factor is 1

    tensors: list[tuple[str, np.ndarray]] = []
    pairs: list[GgufTensorPair] = []
    torch_dtype, numpy_dtype = _DTYPES[dtype]
    for module in folder.modules.values():
        name = names.get_name(module.path)
        if name is None:
            raise ValueError(f"gguf has no {gguf.MODEL_ARCH_NAMES[arch]} tensor for module {module.path!r}")
        if name == "output" and config.get("tie_word_embeddings", False):
            raise ValueError(f"{module.path}: the base ties lm_head to the embeddings, so llama.cpp has no "
                             "output tensor to adapt; merge the adapter instead (lorakit merge)")
        lora_a, lora_b = _gguf_factors(module, name, config, permutes)
        for suffix, factor in (("lora_a", lora_a), ("lora_b", lora_b)):
            array = factor.to(torch_dtype).contiguous().numpy().astype(numpy_dtype, copy=False)
            tensors.append((f"{name}.weight.{suffix}", array))
        pairs.append(GgufTensorPair(f"{name}.weight", module.path, module.rank))

    def write(path: Path) -> None:
        writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for tensor_name, array in tensors:
            writer.add_tensor(tensor_name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    _write_new_file(output, write)
    return GgufExport(str(output), gguf.MODEL_ARCH_NAMES[arch], alpha, pairs)


def _refuse_unsupported(folder: AdapterFolder) -> None:
    fix = f"lorakit convert {folder.path} OUT --target llama.cpp"
    if folder.use_dora:
        raise ValueError(f"{folder.path} uses DoRA, which llama.cpp cannot hold; first: {fix} --base BASE")
    if folder.saved:
        raise ValueError(f"{folder.path} has modules_to_save copies ({', '.join(sorted(folder.saved)[:3])}), "
                         f"which llama.cpp cannot hold; first: {fix} --drop-modules-to-save")
    if folder.biases or folder.lora_biases:
        raise ValueError(f"{folder.path} has trained biases, which llama.cpp cannot hold; first: {fix} "
                         "--drop-bias")
    if folder.config.get("fan_in_fan_out", False):
        raise ValueError(f"{folder.path}: fan_in_fan_out (GPT-2 Conv1D) adapters are not supported")


def _gguf_factors(module: LoraModule, name: str, config: dict[str, Any],
                  permutes: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_a, lora_b) as llama.cpp wants them, PEFT's scale folded into lora_b (computed in float64)."""
    lora_A, lora_B = module.lora_A.double(), module.scaling * module.lora_B.double()
    if permutes and module.leaf == "q_proj":
        lora_B = rope_permute(lora_B, int(config["num_attention_heads"]))
    elif permutes and module.leaf == "k_proj":
        heads = config.get("num_key_value_heads") or config["num_attention_heads"]
        lora_B = rope_permute(lora_B, int(heads))
    if name == "token_embd":
        return lora_A.T, lora_B  # (num_embeddings, r), (dim, r): llama.cpp looks rows of A up by token
    return lora_A, lora_B


def _write_new_file(output: Path, write: Any) -> None:
    """``write(temporary)`` next to ``output``, fsync, then rename into place (never over a file)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.parent / f".{output.name}.lorakit-tmp-{os.getpid()}"
    try:
        write(temporary)
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        if output.exists():
            raise ValueError(f"{output} appeared while writing; not replaced")
        os.replace(temporary, output)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
