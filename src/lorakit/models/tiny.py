"""Tiny random-weight models and a character tokenizer, for tests and examples.

Everything here is built from a config in milliseconds, needs no file and no network, and is
deterministic: the same ``seed`` gives the same weights, and the global torch RNG is left untouched.
The ids line up: ``tiny_tokenizer()`` has at most 128 tokens, so its ids fit ``tiny_llama()`` and
``tiny_bert()`` (vocabulary 128), and ``pad_token_id=0``, ``bos_token_id=1``, ``eos_token_id=2``
agree between the tokenizer and the model configs.
"""

from __future__ import annotations

from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

TINY_VOCAB_SIZE = 128
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3

# ChatML, like SmolLM2's template but without the default system prompt, so tests can also check
# that assistant spans do not depend on one particular template.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>")
# Tab, newline and printable ASCII: one token per character, 103 tokens in all with the specials.
_CHARACTERS = ("\t", "\n", *(chr(code) for code in range(32, 127)))


def tiny_tokenizer(
    *, chat_template: str | None = TINY_CHAT_TEMPLATE, add_bos: bool = True
) -> PreTrainedTokenizerFast:
    """A fast character-level tokenizer: one id per ASCII character, ``<unk>`` for anything else.

    It has ``<pad>`` (0), ``<s>`` (1, prepended when ``add_bos``), ``</s>`` (2, the eos token),
    ``<unk>`` (3) and the ChatML markers ``<|im_start|>`` (4) / ``<|im_end|>`` (5). Offsets are
    exact (one character per token), which makes label-masking tests easy to reason about.
    """
    vocab = {token: index for index, token in enumerate((*_SPECIAL_TOKENS, *_CHARACTERS))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # Split every character apart; `[\s\S]` rather than `.` so that newlines are tokens too.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS_ID)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=chat_template,
        model_max_length=256,
    )


def tiny_llama(seed: int = 0, **overrides: Any) -> LlamaForCausalLM:
    """A random ``LlamaForCausalLM``: hidden 32, 2 layers, 4 heads, 2 kv heads, vocabulary 128.

    ``overrides`` are ``LlamaConfig`` fields (e.g. ``tie_word_embeddings=True``, ``vocab_size=300``).
    Embeddings are untied by default so that tests see ``lm_head`` as its own module. The model is
    returned in eval mode, like ``from_pretrained`` does.
    """
    fields: dict[str, Any] = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": TINY_VOCAB_SIZE,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
        "pad_token_id": PAD_ID,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
    }
    fields.update(overrides)
    return _seeded(LlamaForCausalLM, LlamaConfig(**fields), seed)


def tiny_bert(seed: int = 0, num_labels: int = 2, **overrides: Any) -> BertForSequenceClassification:
    """A random ``BertForSequenceClassification``: hidden 32, 2 layers, 4 heads, vocabulary 128.

    Dropout is 0 by default so that outputs are deterministic in train mode too; pass
    ``hidden_dropout_prob=0.1`` (a ``BertConfig`` field) to get it back. Returned in eval mode.
    """
    fields: dict[str, Any] = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": TINY_VOCAB_SIZE,
        "max_position_embeddings": 128,
        "type_vocab_size": 2,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "pad_token_id": PAD_ID,
        "num_labels": num_labels,
    }
    fields.update(overrides)
    return _seeded(BertForSequenceClassification, BertConfig(**fields), seed)


def tiny_gpt2(seed: int = 0, **overrides: Any) -> GPT2LMHeadModel:
    """A random ``GPT2LMHeadModel``: n_embd 32, 2 layers, 4 heads, vocabulary 128, 64 positions.

    Its ``c_attn`` / ``c_proj`` / ``c_fc`` are transformers' ``Conv1D`` (weight stored (in, out)), the
    case lorakit handles with ``fan_in_fan_out``. ``overrides`` are ``GPT2Config`` fields. Eval mode.
    """
    fields: dict[str, Any] = {"n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": TINY_VOCAB_SIZE,
                              "n_positions": 64}
    fields.update(overrides)
    return _seeded(GPT2LMHeadModel, GPT2Config(**fields), seed)


def _seeded(model_class: Any, config: Any, seed: int) -> Any:
    # fork_rng keeps the caller's RNG stream as it was: building a tiny model in a test must not
    # change what a later `torch.randn` returns.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    return model.eval()
