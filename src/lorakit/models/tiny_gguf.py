"""Write a tiny Llama as a GGUF file, the way llama.cpp's converter does, for fast conversion tests.

The real built-in GGUF takes ~40 s to convert; this one takes well under a second, and because the
weights are known, a test can check that the round trip GGUF -> cache folder -> model gives back the
very same logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import LlamaForCausalLM

from lorakit.models.tiny import TINY_CHAT_TEMPLATE, tiny_llama

# GPT-2 byte-level BPE: three specials, the 256-symbol byte alphabet and two merges.
_GGUF_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_GGUF_MERGES = ("Ġ t", "h e")


def _byte_alphabet() -> list[str]:
    # The printable stand-ins GPT-2 uses for the 256 byte values (same table as transformers').
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return list(bytes_to_unicode().values())


def _permute_for_gguf(weight: torch.Tensor, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (transformers undoes it on load). weight: (out, in)."""
    out_features = weight.shape[0]
    return (
        weight.reshape(n_head, 2, out_features // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
        .numpy()
    )


def write_tiny_llama_gguf(
    path: str | Path,
    *,
    seed: int = 0,
    tie_word_embeddings: bool = True,
    chat_template: str | None = TINY_CHAT_TEMPLATE,
    **overrides: Any,
) -> LlamaForCausalLM:
    """Write ``tiny_llama(seed, ...)`` with a byte-level BPE tokenizer to ``path`` as F32 GGUF.

    Returns the model that was written (vocabulary 261: the tokenizer's size), so a test can
    compare it with what comes back from the file. Embeddings are tied by default, like SmolLM2.
    """
    import gguf  # imported here: only this helper and the converter need the gguf package

    tokens = [*_GGUF_SPECIALS, *_byte_alphabet(), *(merge.replace(" ", "") for merge in _GGUF_MERGES)]
    model = tiny_llama(
        seed,
        vocab_size=len(tokens),
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=0,
        **overrides,
    )
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("lorakit tiny llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(len(tokens))
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    control, normal = int(gguf.TokenType.CONTROL), int(gguf.TokenType.NORMAL)
    writer.add_token_types([control] * len(_GGUF_SPECIALS) + [normal] * (len(tokens) - len(_GGUF_SPECIALS)))
    writer.add_token_merges(list(_GGUF_MERGES))
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)

    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    state = {name: tensor.detach().float() for name, tensor in model.state_dict().items()}
    tensors: dict[str, np.ndarray] = {
        "token_embd.weight": state["model.embed_tokens.weight"].numpy(),
        "output_norm.weight": state["model.norm.weight"].numpy(),
    }
    if not tie_word_embeddings:
        tensors["output.weight"] = state["lm_head.weight"].numpy()
    for index in range(config.num_hidden_layers):
        prefix = f"model.layers.{index}."
        block = f"blk.{index}."
        tensors[block + "attn_norm.weight"] = state[prefix + "input_layernorm.weight"].numpy()
        tensors[block + "attn_q.weight"] = _permute_for_gguf(
            state[prefix + "self_attn.q_proj.weight"], n_head
        )
        tensors[block + "attn_k.weight"] = _permute_for_gguf(state[prefix + "self_attn.k_proj.weight"], n_kv)
        tensors[block + "attn_v.weight"] = state[prefix + "self_attn.v_proj.weight"].numpy()
        tensors[block + "attn_output.weight"] = state[prefix + "self_attn.o_proj.weight"].numpy()
        tensors[block + "ffn_norm.weight"] = state[prefix + "post_attention_layernorm.weight"].numpy()
        tensors[block + "ffn_gate.weight"] = state[prefix + "mlp.gate_proj.weight"].numpy()
        tensors[block + "ffn_up.weight"] = state[prefix + "mlp.up_proj.weight"].numpy()
        tensors[block + "ffn_down.weight"] = state[prefix + "mlp.down_proj.weight"].numpy()
    for name, array in tensors.items():
        writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model
