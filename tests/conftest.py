"""Shared fixtures: tiny, seeded, randomly initialised transformers models (built from configs, no download).

The models are `lorakit.models.tiny`'s (same configs, same weights); the builders here add a ``dtype``
and, unlike `lorakit.models.tiny`, build under the global torch RNG seeded with ``seed``, as the tests have
always had it: what a test draws after building a model (an adapter's init, an input) is the same stream
on every run. Builders are plain functions (``tiny_llama()``,
``tiny_bert()``, ``tiny_gpt2()``) so a test can build two identical copies (one for lorakit, one for
peft); the fixtures of the same names return one fresh model. Models are in eval mode.

Every test also runs with one torch intra-op thread (`one_thread`): tiny matmuls gain nothing from
threads, and on a CPU shared with other processes the threads spin against each other.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from lorakit.models import tiny

VOCAB = tiny.TINY_VOCAB_SIZE


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: object) -> nn.Module:
    """LlamaForCausalLM: hidden 32, 2 layers, 4 heads / 2 kv heads, vocab 128, untied lm_head.

    Linear layers: q_proj (32->32), k_proj / v_proj (32->16), o_proj, gate_proj / up_proj (32->64), down_proj.
    """
    return _under_global_seed(tiny.tiny_llama(seed, **overrides), seed, dtype)


def tiny_bert(seed: int = 0, num_labels: int = 3, dtype: torch.dtype = torch.float32) -> nn.Module:
    """BertForSequenceClassification: hidden 32, 2 layers, linear layers with biases, head ``classifier``."""
    model = tiny.tiny_bert(seed, num_labels=num_labels, max_position_embeddings=64)
    return _under_global_seed(model, seed, dtype)


def tiny_gpt2(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """GPT2LMHeadModel: n_embd 32, 2 layers; its c_attn / c_proj / c_fc are transformers' Conv1D."""
    return _under_global_seed(tiny.tiny_gpt2(seed), seed, dtype)


def _under_global_seed(model: nn.Module, seed: int, dtype: torch.dtype) -> nn.Module:
    # `lorakit.models.tiny` leaves the global RNG untouched; the tests rely on the old behaviour (seed the
    # global RNG, then build), so the model is built again from its config that way: same weights, and
    # the global stream afterwards is the one the tests' tolerances were set with.
    torch.manual_seed(seed)
    return type(model)(model.config).to(dtype).eval()


def token_ids(batch: int = 2, length: int = 8, seed: int = 1) -> torch.Tensor:
    """(batch, length) random token ids below the tiny vocabulary size."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=generator)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One torch intra-op thread for the test, restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
