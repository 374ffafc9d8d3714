"""The memory-lean causal LM loss equals the standard full-logits loss, in value and in gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from train_support import COLLATE, IGNORE, counting_examples

import lorakit
from lorakit.models import tiny_bert, tiny_llama
from lorakit.train.loss import (
    LossModule,
    causal_lm_loss_sum,
    chunked_head_cross_entropy,
    classification_loss_sum,
    count_label_tokens,
    supports_lean_loss,
)


def _model(tied: bool, lora_on_head: bool) -> torch.nn.Module:
    model = tiny_llama(seed=3, tie_word_embeddings=tied).double()
    targets = ["q_proj", "v_proj", "down_proj"] + (["lm_head"] if lora_on_head else [])
    torch.manual_seed(0)
    # init_lora_weights=False: B is non-zero, so the adapters change the logits and get real gradients.
    lorakit.inject(
        model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    )
    model.requires_grad_(
        True
    )  # every base weight too: their gradients must agree as well (tied ones included)
    return model.train()


def _batch() -> dict[str, torch.Tensor]:
    return COLLATE(counting_examples(5, seed=1))


def _full_logits_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="sum")


def _grads(model: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
def test_lean_loss_and_gradients_equal_the_full_logits_loss(tied: bool, chunk_size: int) -> None:
    model, batch = _model(tied, lora_on_head=not tied), _batch()
    assert supports_lean_loss(model)
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight

    lean = causal_lm_loss_sum(model, batch, chunk_size=chunk_size)
    reference = _full_logits_loss(model, batch)
    torch.testing.assert_close(lean, reference, rtol=1e-12, atol=0)

    lean_grads, reference_grads = _grads(model, lean), _grads(model, _full_logits_loss(model, batch))
    assert set(lean_grads) == set(reference_grads)
    assert any("lora_B" in name for name in lean_grads)
    for name, grad in reference_grads.items():
        torch.testing.assert_close(lean_grads[name], grad, rtol=1e-10, atol=1e-12, msg=name)


def test_lean_loss_equals_transformers_own_loss() -> None:
    model, batch = _model(tied=True, lora_on_head=False), _batch()
    count = count_label_tokens(batch, "causal")
    # transformers computes its loss in fp32 (it calls .float() on the logits), hence the fp32 tolerance.
    expected = model(**batch).loss.double() * count
    torch.testing.assert_close(causal_lm_loss_sum(model, batch, chunk_size=5), expected, rtol=1e-6, atol=0)


def test_the_head_only_ever_sees_one_chunk_of_label_positions() -> None:
    model, batch = _model(tied=False, lora_on_head=False), _batch()
    rows_seen: list[int] = []
    hook = model.lm_head.register_forward_hook(
        lambda module, inputs, output: rows_seen.append(output.shape[0])
    )
    loss = causal_lm_loss_sum(model, batch, chunk_size=8)
    forward_rows = list(rows_seen)
    loss.backward()
    hook.remove()
    label_tokens = count_label_tokens(batch, "causal")
    # (n, vocab) blocks of at most 8 rows, n = label tokens << batch × seq: never the full logits.
    assert label_tokens < batch["input_ids"].numel() // 2
    assert max(forward_rows) <= 8 and sum(forward_rows) == label_tokens
    # Backward recomputes each chunk (checkpointing): its logits were not kept from the forward pass.
    assert sum(rows_seen) == 2 * label_tokens


def test_chunked_cross_entropy_without_grad_and_with_no_rows() -> None:
    head = torch.nn.Linear(4, 10)
    hidden, targets = torch.randn(9, 4), torch.randint(0, 10, (9,))
    with torch.no_grad():
        value = chunked_head_cross_entropy(head, hidden, targets, chunk_size=4)
    torch.testing.assert_close(value, F.cross_entropy(head(hidden), targets, reduction="sum"))
    rows = hidden[:0].requires_grad_(True)
    empty = chunked_head_cross_entropy(head, rows, targets[:0], chunk_size=4)
    assert float(empty.detach()) == 0.0
    empty.backward()  # connected to the graph: backward (and DDP's all-reduce) still runs
    assert rows.grad is not None


def test_models_with_post_processed_logits_take_the_full_path() -> None:
    model = _model(tied=False, lora_on_head=False)
    model.config.final_logit_softcapping = 30.0
    assert not supports_lean_loss(model)
    assert not supports_lean_loss(torch.nn.Linear(3, 3))
    batch = _batch()
    torch.testing.assert_close(
        causal_lm_loss_sum(model, batch), _full_logits_loss(model, batch), rtol=1e-12, atol=0
    )


def test_classification_loss_uses_the_models_own_head() -> None:
    model = tiny_bert(num_labels=3).double()
    batch = {
        "input_ids": torch.randint(4, 128, (4, 7)),
        "attention_mask": torch.ones(4, 7, dtype=torch.long),
        "labels": torch.tensor([0, 2, 1, 2]),
    }
    loss_sum, logits = classification_loss_sum(model, batch)
    assert logits.shape == (4, 3)
    torch.testing.assert_close(loss_sum, model(**batch).loss.double() * 4, rtol=1e-6, atol=0)
    assert count_label_tokens(batch, "classify") == 4
    module_loss, _ = LossModule(model, "classify")(batch)
    torch.testing.assert_close(module_loss, loss_sum)


def test_label_tokens_are_counted_after_the_shift() -> None:
    labels = torch.tensor([[5, IGNORE, 7, 8], [IGNORE, IGNORE, IGNORE, 9]])
    # The first position is never predicted: only labels[:, 1:] count.
    assert count_label_tokens({"labels": labels}, "causal") == 3
