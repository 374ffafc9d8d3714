"""LoRA input dropout (lorakit.input_dropout): the drop rate, the layer's output and gradients against a NumPy
reference for the same mask, and what lean activations keep for backward (a 1-byte mask)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from train_support import COLLATE, counting_examples

import lorakit
from lorakit.analysis.measure import LiveTensorTracker
from lorakit.input_dropout import LANES_PER_WORD, keep_mask, rounded_probability
from lorakit.layers import LoraLinear
from lorakit.models.tiny import tiny_llama
from lorakit.train.lean_activations import LeanActivations
from lorakit.train.loss import LossModule


@pytest.mark.parametrize("p", [0.05, 0.1, 0.3, 0.5])
def test_every_lane_drops_at_the_rounded_rate(p: float) -> None:
    assert abs(rounded_probability(p) - p) <= 2**-17
    torch.manual_seed(0)
    words = 1 << 18
    mask = keep_mask(torch.Size([words * LANES_PER_WORD]), p, torch.device("cpu")) == 0  # dropped
    lanes = mask.view(words, LANES_PER_WORD).double().mean(dim=0)  # each 16-bit lane of a 64-bit word
    sigma = (p * (1 - p) / words) ** 0.5
    assert (lanes - rounded_probability(p)).abs().max() <= 5 * sigma, lanes
    # neighbouring lanes are independent: both dropped at the rate of p squared
    pairs = mask.view(words, LANES_PER_WORD)
    both = (pairs[:, 0] & pairs[:, 1]).double().mean()
    assert abs(both - rounded_probability(p) ** 2) <= 5 * (p * p / words) ** 0.5


def test_a_probability_just_below_one_stays_below_one() -> None:
    assert rounded_probability(0.999999) < 1
    assert rounded_probability(1e-7) == 0.0


def _adapted(base: torch.nn.Linear, **adapter: float) -> LoraLinear:
    layer = LoraLinear(base)
    layer.add_adapter("a", init_lora_weights=False, **adapter)
    layer.set_active(["a"])
    return layer


def test_output_and_gradients_match_numpy_for_the_drawn_mask() -> None:
    torch.manual_seed(1)
    base = torch.nn.Linear(12, 7).double()
    layer = _adapted(base, r=3, lora_alpha=6, lora_dropout=0.3).train()
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    weights = torch.randn(2, 5, 7, dtype=torch.float64)  # the loss is sum(y * weights)
    torch.manual_seed(42)
    y = layer(x)
    (y * weights).sum().backward()

    torch.manual_seed(42)  # the same draw: the base layer draws nothing before the adapter's mask
    kept = keep_mask(x.shape, 0.3, x.device).numpy().astype(bool)
    a, b = layer.lora_A["a"].weight.detach().numpy(), layer.lora_B["a"].weight.detach().numpy()
    w, bias = base.weight.detach().numpy(), base.bias.detach().numpy()
    scale = 2.0 / (1 - rounded_probability(0.3))  # alpha / r, and dropout's rescaling
    dropped = x.numpy() * kept
    expected = x.numpy() @ w.T + bias + scale * (dropped @ a.T) @ b.T
    np.testing.assert_allclose(y.detach().numpy(), expected, rtol=1e-12, atol=1e-12)
    g = weights.numpy().reshape(-1, 7)
    h = dropped.reshape(-1, 12)
    np.testing.assert_allclose(layer.lora_B["a"].weight.grad.numpy(), scale * g.T @ (h @ a.T), rtol=1e-12)
    np.testing.assert_allclose(layer.lora_A["a"].weight.grad.numpy(), scale * (g @ b).T @ h, rtol=1e-12)
    assert 0.2 < 1 - kept.mean() < 0.4


def test_eval_mode_and_no_grad_eval_draw_nothing() -> None:
    base = torch.nn.Linear(8, 8)
    layer = _adapted(base, r=2, lora_alpha=2, lora_dropout=0.5).eval()
    x = torch.randn(3, 8)
    state = torch.get_rng_state()
    first = layer(x)
    assert torch.equal(torch.get_rng_state(), state)  # no mask drawn
    assert torch.equal(first, layer(x))


def _live_bytes_after_forward(dropout: float) -> tuple[int, int]:
    """(live tensor bytes once the forward of a bf16-autocast lean step is done, bytes of every adapted
    layer's input: what a 1-byte mask per element costs)."""
    model = tiny_llama(seed=2)
    torch.manual_seed(0)
    config = lorakit.LoraConfig(r=4, target_modules="all-linear", lora_dropout=dropout,
                                init_lora_weights=False)
    lorakit.inject(model, config)
    model.train()
    batch = COLLATE(counting_examples(4, seed=3))
    tokens = batch["input_ids"].numel()
    mask_bytes = sum(tokens * m.base_layer.in_features for m in model.modules() if isinstance(m, LoraLinear))
    tracker = LiveTensorTracker()
    tracker.track_module(model)
    tracker.track(batch.values())
    before = tracker.current_bytes
    with tracker, torch.autocast("cpu", dtype=torch.bfloat16), LeanActivations(model):
        loss, _ = LossModule(model, "causal")(batch)
    kept = tracker.current_bytes - before
    loss.backward()
    return kept, mask_bytes


def test_lean_activations_keep_a_one_byte_mask_per_dropped_input() -> None:
    without, _ = _live_bytes_after_forward(0.0)
    with_dropout, mask_bytes = _live_bytes_after_forward(0.1)
    # nn.Dropout kept a mask and a copy of the input in its width (>= 3 bytes per element under bf16)
    assert with_dropout - without <= 1.1 * mask_bytes, (with_dropout - without, mask_bytes)
