"""The fused linear + cross-entropy loss equals plain autograd, in value and in every gradient.

The oracle is ``F.cross_entropy(F.linear(h, W, b), t, reduction="sum")`` with half-precision logits upcast
to fp32 first, as transformers' loss (and lorakit's checkpointed path) does.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit.train.loss as loss_module
from lorakit.analysis.measure import LiveTensorTracker
from lorakit.train.fused_loss import linear_cross_entropy_sum
from lorakit.train.loss import chunked_head_cross_entropy


def _oracle(hidden, weight, bias, targets):
    logits = F.linear(hidden, weight, bias)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits, targets, reduction="sum")


def _problem(n, h, vocab, dtype=torch.float64, bias=True, train_weight=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=generator, dtype=dtype).requires_grad_(True)
    # a spread of logits well beyond ±1, so the softmax is far from uniform
    weight = (2 * torch.randn(vocab, h, generator=generator, dtype=dtype)).requires_grad_(train_weight)
    b = torch.randn(vocab, generator=generator, dtype=dtype).requires_grad_(True) if bias else None
    targets = torch.randint(0, vocab, (n,), generator=generator)
    return hidden, weight, b, targets


def _grads(loss, tensors):
    wanted = [t for t in tensors if t is not None and t.requires_grad]
    return torch.autograd.grad(loss, wanted)


@pytest.mark.parametrize("chunk_size", [1, 3, 10, 64])  # n = 10: not divisible by 3; all rows; more
@pytest.mark.parametrize("train_weight", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_float64_loss_and_gradients_equal_autograd(chunk_size, train_weight, bias):
    hidden, weight, b, targets = _problem(10, 6, 17, bias=bias, train_weight=train_weight, seed=chunk_size)
    inputs = (hidden, weight, b)

    fused = linear_cross_entropy_sum(hidden, weight, b, targets, chunk_size)
    expected = _oracle(hidden, weight, b, targets)
    assert fused.dtype == torch.float64
    torch.testing.assert_close(fused, expected, rtol=1e-10, atol=1e-10)
    fused_grads, expected_grads = _grads(fused, inputs), _grads(expected, inputs)
    assert len(fused_grads) == 1 + int(train_weight) + int(bias)  # hidden, then weight and bias if trained
    for got, want in zip(fused_grads, expected_grads):
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("scale", [3.0, 1 / 7])
def test_the_incoming_gradient_scales_every_gradient(scale):
    hidden, weight, b, targets = _problem(9, 5, 13)
    inputs = (hidden, weight, b)
    fused = _grads(linear_cross_entropy_sum(hidden, weight, b, targets, 4) * scale, inputs)
    expected = _grads(_oracle(hidden, weight, b, targets) * scale, inputs)
    for got, want in zip(fused, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_a_second_backward_is_refused_not_silently_wrong():
    # backward scales the saved gradients in place, so a retained graph must not be run again
    hidden, weight, b, targets = _problem(6, 4, 9)
    loss = linear_cross_entropy_sum(hidden, weight, b, targets, 4)
    torch.autograd.grad(loss * 3, weight, retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        torch.autograd.grad(loss, weight)


def test_a_tied_weight_gets_the_embedding_and_the_head_gradients():
    generator = torch.Generator().manual_seed(1)
    vocab, h, n = 15, 6, 11
    tied = nn.Parameter(torch.randn(vocab, h, generator=generator, dtype=torch.float64))
    ids = torch.randint(0, vocab, (n,), generator=generator)
    targets = torch.randint(0, vocab, (n,), generator=generator)
    mix = torch.randn(h, h, generator=generator, dtype=torch.float64)

    def run(loss_fn):
        tied.grad = None
        hidden = torch.tanh(F.embedding(ids, tied) @ mix)  # the same Parameter as input embedding ...
        loss_fn(hidden).backward()  # ... and as the head
        return tied.grad.clone()

    fused = run(lambda hidden: linear_cross_entropy_sum(hidden, tied, None, targets, 4))
    expected = run(lambda hidden: _oracle(hidden, tied, None, targets))
    embedding_only = run(lambda hidden: _oracle(hidden.detach(), tied.detach(), None, targets) + hidden.sum())
    assert not torch.allclose(expected, embedding_only)  # the head's contribution is not negligible
    torch.testing.assert_close(fused, expected, rtol=1e-10, atol=1e-12)


def test_no_rows_give_a_zero_loss_on_the_graph():
    hidden, weight, b, targets = _problem(0, 4, 9)
    loss = linear_cross_entropy_sum(hidden, weight, b, targets, 4)
    assert loss.requires_grad and float(loss.detach()) == 0.0
    loss.backward()  # backward (and DDP's all-reduce) still runs
    assert hidden.grad is not None and hidden.grad.shape == (0, 4)
    assert float(weight.grad.abs().sum()) == 0.0 and float(b.grad.abs().sum()) == 0.0


def test_without_grad_only_the_loss_is_computed():
    hidden, weight, b, targets = _problem(7, 4, 9)
    with torch.no_grad():
        loss = linear_cross_entropy_sum(hidden, weight, b, targets, 3)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, _oracle(hidden, weight, b, targets).detach(), rtol=1e-12, atol=0)


def test_float32_is_close_to_autograd():
    hidden, weight, b, targets = _problem(20, 16, 50, dtype=torch.float32)
    inputs = (hidden, weight, b)
    fused = linear_cross_entropy_sum(hidden, weight, b, targets, 7)
    expected = _oracle(hidden, weight, b, targets)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(_grads(fused, inputs), _grads(expected, inputs)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_bf16_autocast_matches_autograd_under_the_same_autocast(bias):
    hidden, weight, b, targets = _problem(24, 16, 40, dtype=torch.float32, bias=bias)
    inputs = (hidden, weight, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = linear_cross_entropy_sum(hidden, weight, b, targets, 5)
        expected = _oracle(hidden, weight, b, targets)
    # fp32 loss from bf16 logits: both paths compute the same bf16 logits, so the losses agree to fp32
    # round-off; the gradients pass through bf16 matmuls (summed per chunk here, over all rows in autograd)
    # so they agree to bf16 round-off, 2e-2 relative to the largest entry.
    assert fused.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(fused, expected, rtol=1e-3, atol=0)
    for got, want in zip(_grads(fused, inputs), _grads(expected, inputs)):
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0, atol=2e-2 * float(want.abs().max()))


def test_bf16_parameters_without_autocast_match_autograd():
    hidden, weight, b, targets = _problem(12, 8, 30, dtype=torch.bfloat16)
    inputs = (hidden, weight, b)
    fused = linear_cross_entropy_sum(hidden, weight, b, targets, 5)
    expected = _oracle(hidden, weight, b, targets)
    assert fused.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(fused, expected, rtol=1e-3, atol=0)
    for got, want in zip(_grads(fused, inputs), _grads(expected, inputs)):
        assert got.dtype == want.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=2e-2 * float(want.abs().max()))


@pytest.mark.parametrize("bad", [9, 100, -1, -100])
def test_an_out_of_range_target_is_refused(bad):
    hidden, weight, b, targets = _problem(5, 4, 9)
    targets[2] = bad
    with pytest.raises(ValueError, match=f"target {bad} "):
        linear_cross_entropy_sum(hidden, weight, b, targets, 2)


class _Wrapped(nn.Module):
    """A head that is not exactly nn.Linear (as a LoRA-wrapped or quantised lm_head is)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.linear(x)


def test_chunked_head_cross_entropy_fuses_exactly_the_linear_heads(monkeypatch):
    fused_calls = []

    def spy(*args, **kwargs):
        fused_calls.append(args[4])
        return linear_cross_entropy_sum(*args, **kwargs)

    monkeypatch.setattr(loss_module, "linear_cross_entropy_sum", spy)
    hidden, _, _, targets = _problem(10, 6, 17)
    head = nn.Linear(6, 17).double()
    expected = _oracle(hidden, head.weight, head.bias, targets)
    expected_grads = _grads(expected, (hidden, head.weight, head.bias))

    def check(module, fused):
        before = len(fused_calls)
        loss = chunked_head_cross_entropy(module, hidden, targets, chunk_size=3)
        assert len(fused_calls) == before + int(fused)
        torch.testing.assert_close(loss, expected, rtol=1e-10, atol=0)
        for got, want in zip(_grads(loss, (hidden, head.weight, head.bias)), expected_grads):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)

    check(head, fused=True)
    assert fused_calls == [3]
    wrapped = _Wrapped(head)
    check(wrapped, fused=False)
    # checkpointed path: each chunk's forward, then its recomputation in backward (4 chunks of 10 rows)
    assert wrapped.calls == 8
    # a hook on the head would not run in the fused path, so a hooked nn.Linear keeps the module path
    seen = []
    handle = head.register_forward_hook(lambda module, args, output: seen.append(output.shape[0]))
    check(head, fused=False)
    handle.remove()
    assert sum(seen) == 20


def test_one_chunk_of_logits_at_a_time():
    n, h, vocab, chunk = 64, 8, 5000, 16
    full_logits = n * vocab * 4  # one (n, vocab) fp32 tensor: 1.28 MB
    one_chunk = chunk * vocab * 4

    def peak_above_inputs(loss_fn, train_weight):
        hidden, weight, b, targets = _problem(n, h, vocab, dtype=torch.float32, train_weight=train_weight)
        tracker = LiveTensorTracker()
        tracker.track([hidden, weight, b, targets])
        start = tracker.current_bytes
        with tracker:
            loss_fn(hidden, weight, b, targets).backward()
        return tracker.peak_bytes - start

    fused = lambda *args: linear_cross_entropy_sum(*args, chunk)  # noqa: E731
    # the tracker does see the oracle's full logits (and their gradient): this test can fail
    assert peak_above_inputs(_oracle, train_weight=False) >= 2 * full_logits
    # The rest is gradient-sized: d loss / d hidden (n, h) and d loss / d bias (vocab,), saved in forward
    # and scaled in place in backward, plus (chunk, 1) columns; and (vocab, h) for a trained head.
    small = 2 * (n * h + vocab) * 4 + 4096
    frozen = peak_above_inputs(fused, train_weight=False)  # the LoRA case: a frozen head
    assert frozen < full_logits / 2
    assert one_chunk <= frozen < one_chunk + small
    trained = peak_above_inputs(fused, train_weight=True)
    assert one_chunk <= trained < one_chunk + small + vocab * h * 4
