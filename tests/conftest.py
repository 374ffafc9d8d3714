"""Shared fixtures: tiny, seeded, randomly initialised transformers models (built from configs, no download).

Builders are plain functions (``tiny_llama()``, ``tiny_bert()``, ``tiny_gpt2()``) so a test can build two
identical copies (one for lorakit, one for peft); the fixtures of the same names return one fresh model.
Every builder seeds torch itself, so the same call always gives the same weights. Models are in eval mode.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

VOCAB = 128


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: object) -> nn.Module:
    """LlamaForCausalLM: hidden 32, 2 layers, 4 heads / 2 kv heads, vocab 128, untied lm_head.

    Linear layers: q_proj (32->32), k_proj / v_proj (32->16), o_proj, gate_proj / up_proj (32->64), down_proj.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    values = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                  tie_word_embeddings=False)
    values.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**values)).to(dtype).eval()


def tiny_bert(seed: int = 0, num_labels: int = 3, dtype: torch.dtype = torch.float32) -> nn.Module:
    """BertForSequenceClassification: hidden 32, 2 layers, linear layers with biases, head ``classifier``."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        vocab_size=VOCAB, max_position_embeddings=64, num_labels=num_labels)
    torch.manual_seed(seed)
    return BertForSequenceClassification(config).to(dtype).eval()


def tiny_gpt2(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """GPT2LMHeadModel: n_embd 32, 2 layers; its c_attn / c_proj / c_fc are transformers' Conv1D."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).to(dtype).eval()


def token_ids(batch: int = 2, length: int = 8, seed: int = 1) -> torch.Tensor:
    """(batch, length) random token ids below the tiny vocabulary size."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=generator)


@pytest.fixture
def llama() -> nn.Module:
    return tiny_llama()


@pytest.fixture
def bert() -> nn.Module:
    return tiny_bert()


@pytest.fixture
def gpt2() -> nn.Module:
    return tiny_gpt2()


@pytest.fixture
def ids() -> torch.Tensor:
    return token_ids()
