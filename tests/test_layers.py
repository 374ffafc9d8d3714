"""The LoRA layers against the hand-written NumPy oracle in `lorakit.reference` (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lorakit import reference
from lorakit.layers import LoraEmbedding, LoraLinear

RTOL, ATOL = 1e-10, 1e-12


def _np(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy()


def _linear_layer(n_in: int, n_out: int, r: int, bias: bool, seed: int, conv1d: bool = False,
                  use_rslora: bool = False, alpha: float = 8.0, use_dora: bool = False) -> LoraLinear:
    """A float64 LoraLinear with one active adapter "default" whose A and B are both random."""
    torch.manual_seed(seed)
    if conv1d:
        from transformers.pytorch_utils import Conv1D

        base: nn.Module = Conv1D(n_out, n_in).double()
        nn.init.normal_(base.weight)
        nn.init.normal_(base.bias)
    else:
        base = nn.Linear(n_in, n_out, bias=bias, dtype=torch.float64)
    layer = LoraLinear(base)
    layer.add_adapter("default", r=r, lora_alpha=alpha, init_lora_weights=False, use_rslora=use_rslora,
                      use_dora=use_dora)
    layer.set_active(["default"])
    layer.base_layer.requires_grad_(False)
    return layer


def _base_weight(layer: LoraLinear) -> np.ndarray:
    """(out, in), whatever the base layer's storage."""
    weight = _np(layer.base_layer.weight)
    return weight.T if layer.fan_in_fan_out else weight


def _factors(layer: LoraLinear, name: str = "default") -> tuple[np.ndarray, np.ndarray]:
    return _np(layer.lora_A[name].weight), _np(layer.lora_B[name].weight)


# (batch shape, in, out, r, bias, rslora, conv1d)
GRAD_CASES = [
    ((5,), 7, 3, 1, False, False, False),
    ((4,), 16, 16, 4, True, False, False),
    ((2, 6), 9, 13, 8, True, True, False),
    ((3, 2, 2), 32, 8, 16, False, False, False),
    ((11,), 5, 20, 5, True, True, False),
    ((2, 3), 12, 6, 3, True, False, True),   # Conv1D: weight stored (in, out), output a view
]


@pytest.mark.parametrize(("batch", "n_in", "n_out", "r", "bias", "rslora", "conv1d"), GRAD_CASES)
def test_linear_forward_and_gradients_match_numpy_oracle(batch, n_in, n_out, r, bias, rslora, conv1d):
    layer = _linear_layer(n_in, n_out, r, bias, seed=r * 100 + n_in, conv1d=conv1d, use_rslora=rslora,
                          alpha=6.0)
    assert layer.lora_A["default"].weight.dtype == torch.float64  # fp64 base keeps fp64 adapters
    generator = torch.Generator().manual_seed(n_out)
    x = torch.randn(*batch, n_in, dtype=torch.float64, generator=generator, requires_grad=True)
    grad_out = torch.randn(*batch, n_out, dtype=torch.float64, generator=generator)

    y = layer(x)
    y.backward(grad_out)

    scaling = 6.0 / np.sqrt(r) if rslora else 6.0 / r
    W, (A, B) = _base_weight(layer), _factors(layer)
    b = _np(layer.base_layer.bias) if layer.base_layer.bias is not None else None
    x2d, g2d = _np(x).reshape(-1, n_in), _np(grad_out).reshape(-1, n_out)
    expected_y = reference.lora_linear_forward(x2d, W, b, A, B, scaling)
    grads = reference.lora_linear_backward(x2d, W, A, B, scaling, g2d)

    np.testing.assert_allclose(_np(y).reshape(-1, n_out), expected_y, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(_np(x.grad).reshape(-1, n_in), grads.dx, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(_np(layer.lora_A["default"].weight.grad), grads.dA, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(_np(layer.lora_B["default"].weight.grad), grads.dB, rtol=RTOL, atol=ATOL)
    assert layer.base_layer.weight.grad is None


def test_numpy_backward_matches_finite_differences():
    """The oracle's hand-derived gradients against central differences of its own forward."""
    rng = np.random.default_rng(0)
    n, n_in, n_out, r, scaling = 3, 5, 4, 2, 1.7
    x, W, b = rng.normal(size=(n, n_in)), rng.normal(size=(n_out, n_in)), rng.normal(size=n_out)
    A, B, g = rng.normal(size=(r, n_in)), rng.normal(size=(n_out, r)), rng.normal(size=(n, n_out))

    def loss(x_: np.ndarray, A_: np.ndarray, B_: np.ndarray) -> float:
        return float((reference.lora_linear_forward(x_, W, b, A_, B_, scaling) * g).sum())

    def numeric(which: int) -> np.ndarray:
        args = [x, A, B]
        grad = np.zeros_like(args[which])
        for index in np.ndindex(grad.shape):
            plus, minus = [a.copy() for a in args], [a.copy() for a in args]
            plus[which][index] += 1e-6
            minus[which][index] -= 1e-6
            grad[index] = (loss(*plus) - loss(*minus)) / 2e-6
        return grad

    grads = reference.lora_linear_backward(x, W, A, B, scaling, g)
    np.testing.assert_allclose(grads.dx, numeric(0), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(grads.dA, numeric(1), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(grads.dB, numeric(2), rtol=1e-6, atol=1e-8)


def test_linear_gradients_pass_torch_gradcheck():
    """Finite differences on the torch layer itself (x, A and B all perturbed)."""
    layer = _linear_layer(6, 4, 3, True, seed=7)
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    A = layer.lora_A["default"].weight.detach().clone().requires_grad_(True)
    B = layer.lora_B["default"].weight.detach().clone().requires_grad_(True)

    def run(x_: torch.Tensor, A_: torch.Tensor, B_: torch.Tensor) -> torch.Tensor:
        params = {"lora_A.default.weight": A_, "lora_B.default.weight": B_}
        return torch.func.functional_call(layer, params, (x_,))

    assert torch.autograd.gradcheck(run, (x, A, B), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize(("bias", "conv1d"), [(False, False), (True, False), (True, True)])
def test_dora_forward_matches_numpy_oracle(bias, conv1d):
    layer = _linear_layer(10, 7, 3, bias, seed=3, conv1d=conv1d, use_dora=True)
    with torch.no_grad():  # a trained magnitude, no longer equal to the initial row norms
        layer.lora_magnitude_vector["default"].weight.mul_(torch.linspace(0.5, 1.5, 7, dtype=torch.float64))
    x = torch.randn(4, 10, dtype=torch.float64)
    b = _np(layer.base_layer.bias) if layer.base_layer.bias is not None else None
    A, B = _factors(layer)
    magnitude = _np(layer.lora_magnitude_vector["default"].weight)
    expected = reference.dora_linear_forward(_np(x), _base_weight(layer), b, A, B, magnitude, 8.0 / 3)
    np.testing.assert_allclose(_np(layer(x)), expected, rtol=RTOL, atol=ATOL)


def test_dora_initial_magnitude_is_the_row_norm():
    layer = _linear_layer(10, 7, 3, False, seed=4, use_dora=True)
    A, B = _factors(layer)
    updated = _base_weight(layer) + 8.0 / 3 * B @ A
    np.testing.assert_allclose(_np(layer.lora_magnitude_vector["default"].weight),
                               np.linalg.norm(updated, axis=1), rtol=RTOL)


def test_lora_and_dora_adapters_active_together_add_their_deltas():
    """A DoRA adapter rescales the base output W·x, not the output with another adapter already added."""
    layer = _linear_layer(8, 6, 2, True, seed=5)
    layer.add_adapter("dora", r=3, lora_alpha=4.0, init_lora_weights=False, use_dora=True)
    with torch.no_grad():
        layer.lora_magnitude_vector["dora"].weight.mul_(1.3)
    x = torch.randn(5, 8, dtype=torch.float64)
    W, b = _base_weight(layer), _np(layer.base_layer.bias)
    A, B = _factors(layer)
    A2, B2 = _factors(layer, "dora")
    magnitude = _np(layer.lora_magnitude_vector["dora"].weight)
    base = _np(x) @ W.T + b
    lora_delta = reference.lora_linear_forward(_np(x), W, b, A, B, 8.0 / 2) - base
    dora_delta = reference.dora_linear_forward(_np(x), W, b, A2, B2, magnitude, 4.0 / 3) - base
    for order in (["default", "dora"], ["dora", "default"]):
        layer.set_active(order)
        np.testing.assert_allclose(_np(layer(x)), base + lora_delta + dora_delta, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("padding_idx", [None, 2])
def test_embedding_forward_matches_numpy_oracle(padding_idx):
    torch.manual_seed(0)
    layer = LoraEmbedding(nn.Embedding(12, 5, padding_idx=padding_idx, dtype=torch.float64))
    layer.add_adapter("default", r=3, lora_alpha=6.0, init_lora_weights=False)
    layer.set_active(["default"])
    ids = torch.tensor([[0, 2, 11, 5], [2, 2, 7, 1]])
    expected = reference.lora_embedding_forward(_np(ids), _np(layer.base_layer.weight),
                                                _np(layer.lora_embedding_A["default"]),
                                                _np(layer.lora_embedding_B["default"]), 2.0)
    np.testing.assert_allclose(_np(layer(ids)), expected, rtol=RTOL, atol=ATOL)


def test_bf16_base_keeps_fp32_adapters_and_its_own_output_dtype():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(16, 8, dtype=torch.bfloat16))
    layer.add_adapter("default", r=4, lora_alpha=8.0, init_lora_weights=False)
    layer.set_active(["default"])
    assert layer.lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(3, 16).to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    A, B = _factors(layer)
    W, b = _np(layer.base_layer.weight.double()), _np(layer.base_layer.bias.double())
    expected = reference.lora_linear_forward(_np(x.double()), W, b, A.astype(np.float64),
                                             B.astype(np.float64), 2.0)
    np.testing.assert_allclose(_np(y.double()), expected, rtol=2e-2, atol=2e-2)


def test_in_place_update_does_not_leak_into_base_output_seen_by_dora():
    """Order of DoRA/LoRA adapters must not matter also under autograd (in-place add on the base output)."""
    layer = _linear_layer(8, 6, 2, False, seed=6)
    layer.add_adapter("dora", r=2, lora_alpha=4.0, init_lora_weights=False, use_dora=True)
    with torch.no_grad():  # m ≠ ||W + sBA||, or DoRA would not read the base output at all
        layer.lora_magnitude_vector["dora"].weight.mul_(0.8)
    layer.set_active(["default", "dora"])
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    y.sum().backward()  # raises if an in-place update hit a tensor autograd saved
    layer.set_active(["dora", "default"])
    np.testing.assert_allclose(_np(layer(x)), _np(y), rtol=1e-12, atol=1e-12)
