"""Lean activations keep fewer tensors for backward and give autograd's gradients (the oracle: the same
model and batch without them; finite differences for the RMSNorm function)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_train_loop import _fit
from torch import nn
from train_support import COLLATE, adapted_llama, counting_examples

import lorakit
from lorakit import recipes
from lorakit.analysis.measure import LiveTensorTracker
from lorakit.models import tiny_llama
from lorakit.recipes import mark_recomputable
from lorakit.train import lean_activations
from lorakit.train.lean_activations import LeanActivations, _RMSNorm
from lorakit.train.loss import LossModule


def _model(kind: str, dtype: torch.dtype = torch.float64, dropout: float = 0.0) -> nn.Module:
    model = tiny_llama(seed=2).to(dtype)
    if kind == "full":
        model.requires_grad_(True)
    else:
        torch.manual_seed(0)
        config = lorakit.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules="all-linear",
            init_lora_weights=False,
            use_dora=kind == "dora",
            lora_dropout=dropout,
        )
        lorakit.inject(model, config)
    return model.train()


def _loss_and_grads(
    model: nn.Module, lean: bool, bf16: bool = False
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    batch = COLLATE(counting_examples(4, seed=3))
    torch.manual_seed(7)  # the same dropout masks on both sides
    with (
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16),
        LeanActivations(model) if lean else torch.enable_grad(),
    ):
        loss, _ = LossModule(model, "causal")(batch)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("kind", ["lora", "dora", "full", "dropout"])
def test_lean_activations_give_autograds_gradients(kind: str) -> None:
    model = _model("lora" if kind == "dropout" else kind, dropout=0.1 if kind == "dropout" else 0.0)
    loss, grads = _loss_and_grads(model, lean=False)
    lean_loss, lean_grads = _loss_and_grads(model, lean=True)
    assert torch.equal(lean_loss, loss)  # forward is the same operators
    assert grads.keys() == lean_grads.keys()
    for name, grad in grads.items():
        # rebuilt tensors are bit-identical; only the RMSNorm backward is hand-written, and transformers'
        # RMSNorm computes in float32 even in a float64 model: float32 round-off
        assert (lean_grads[name] - grad).norm() <= 1e-6 * grad.norm(), name


@pytest.mark.parametrize("kind", ["lora", "dora", "full"])
def test_lean_activations_under_bf16_autocast(kind: str) -> None:
    model = _model(kind, dtype=torch.float32)
    loss, grads = _loss_and_grads(model, lean=False, bf16=True)
    lean_loss, lean_grads = _loss_and_grads(model, lean=True, bf16=True)
    assert torch.equal(lean_loss, loss)  # explicit casts and recipes under the forward's autocast state
    for name, grad in grads.items():
        assert lean_grads[name].dtype == grad.dtype
        assert (lean_grads[name] - grad).norm() <= 1e-5 * grad.norm(), name


def _bytes_kept_after_forward(model: nn.Module, lean: bool, bf16: bool = False) -> int:
    batch = COLLATE(counting_examples(4, seed=3))
    with LiveTensorTracker() as tracker:
        with (
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16),
            LeanActivations(model) if lean else torch.enable_grad(),
        ):
            loss, _ = LossModule(model, "causal")(batch)
        kept = tracker.current_bytes  # everything the graph keeps for backward (and the loss)
    loss.backward()
    return kept


def test_lean_activations_drop_norm_activation_and_product_outputs() -> None:
    # float32: in a float64 model transformers' RMSNorm keeps a float32 copy of its input instead
    model = _model("lora", dtype=torch.float32)
    tokens = COLLATE(counting_examples(4, seed=3))["input_ids"].numel()
    config = model.config
    # per layer: the two norm outputs (hidden), the SiLU output and the gated product (intermediate)
    per_layer = tokens * (2 * config.hidden_size + 2 * config.intermediate_size) * 4
    saved = _bytes_kept_after_forward(model, lean=False) - _bytes_kept_after_forward(model, lean=True)
    # ... except the first norm's input (the frozen embedding's output) and reciprocal norms (tokens, 1),
    # which autograd would not keep and the recipe of the first norm's output does
    first_input = tokens * (config.hidden_size + 1) * 4
    assert saved == config.num_hidden_layers * per_layer - first_input


def test_under_bf16_autocast_the_bf16_copies_of_weights_and_inputs_are_not_kept() -> None:
    model = _model("lora", dtype=torch.float32)
    config = model.config
    tokens = COLLATE(counting_examples(4, seed=3))["input_ids"].numel()
    blocks = model.model.layers
    # autocast keeps a bf16 copy of every frozen block weight (for the input gradient) ...
    weight_copies = sum(m.weight.numel() * 2 for m in blocks.modules() if type(m) is nn.Linear)
    # ... and every adapted layer a bf16 copy of its fp32 input: q, k, v and gate, up (norm outputs)
    input_copies = config.num_hidden_layers * 5 * tokens * config.hidden_size * 2
    saved = _bytes_kept_after_forward(model, False, bf16=True) - _bytes_kept_after_forward(
        model, True, bf16=True
    )
    assert saved >= weight_copies + input_copies


def test_leaving_restores_the_model() -> None:
    model = _model("full")
    lean = LeanActivations(model)
    assert len(lean.rms_norms) == 2 * model.config.num_hidden_layers + 1 and len(lean.gated) == 2
    assert len(lean.linears) == 7 * model.config.num_hidden_layers + 1  # and lm_head
    with lean:
        assert all("forward" in module.__dict__ for module in (*lean.rms_norms, *lean.linears))
    for module in model.modules():
        assert "forward" not in module.__dict__
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_an_input_changed_in_place_before_backward_is_refused() -> None:
    x = torch.randn(3, 4, requires_grad=True)
    weight = torch.randn(4, 2, requires_grad=True)
    with LeanActivations(nn.Module()):
        base = x * 1.0
        y = base.exp()
        mark_recomputable(y, torch.exp, base)
        out = (y @ weight).sum()  # keeps y (for weight's gradient): stored as its recipe
    with torch.no_grad():
        base.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        out.backward()


def test_views_of_a_marked_tensor_are_rebuilt_with_their_geometry() -> None:
    x = torch.randn(3, 4, dtype=torch.float64)
    weight = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    expected = torch.autograd.grad((torch.exp(x).t()[1:] @ weight).sum(), weight)[0]
    with LeanActivations(nn.Module()):
        y = torch.exp(x)
        mark_recomputable(y, torch.exp, x)
        out = (y.t()[1:] @ weight).sum()  # keeps a strided view of y with an offset
    assert torch.equal(torch.autograd.grad(out, weight)[0], expected)


def test_a_tensor_changed_in_place_after_marking_is_kept_as_it_is() -> None:
    x = torch.randn(3, 4, dtype=torch.float64)
    weight = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    with LeanActivations(nn.Module()):
        y = torch.exp(x)
        mark_recomputable(y, torch.exp, x)
        y.mul_(2.0)  # no longer exp(x): must be saved, not rebuilt
        out = (y @ weight).sum()
    assert torch.equal(torch.autograd.grad(out, weight)[0], (2.0 * torch.exp(x)).sum(0)[:, None].expand(4, 2))


class OtherGating(nn.Module):
    """Has a gated MLP's parts but computes act(up(x)) * gate(x): must not be rebuilt as act(g) * u."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(8, 16), nn.Linear(8, 16)
        self.down_proj, self.act_fn = nn.Linear(16, 8), nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))


def test_a_gated_mlp_is_checked_before_its_product_is_rebuilt() -> None:
    torch.manual_seed(0)
    mlp = OtherGating().double()
    x = torch.randn(5, 8, dtype=torch.float64)
    expected = torch.autograd.grad(mlp(x).square().sum(), list(mlp.parameters()))
    lean = LeanActivations(mlp)
    with lean:
        out = mlp(x).square().sum()
    assert lean.gated[0].verified is False
    for got, want in zip(torch.autograd.grad(out, list(mlp.parameters())), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)

    llama = _model("lora")
    lean = LeanActivations(llama)
    _loss_and_grads(llama, lean=True)
    assert lean.gated  # a fresh instance was used above; this one verifies on its own first forward
    with lean:
        LossModule(llama, "causal")(COLLATE(counting_examples(2)))
    assert all(mlp.verified for mlp in lean.gated)


def test_rms_norm_function_against_finite_differences() -> None:
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, dtype=torch.float64, requires_grad=True)
    # the norm computes in float32 (as transformers'), so the differences use a float32-sized step
    assert torch.autograd.gradcheck(
        lambda a, w: _RMSNorm.apply(a, w, 1e-6), (x, weight), eps=1e-3, atol=1e-3, rtol=1e-3
    )
    norm = tiny_llama().model.norm.double()
    x = torch.randn(2, 3, norm.weight.shape[0], dtype=torch.float64)
    assert torch.equal(_RMSNorm.apply(x, norm.weight, norm.variance_epsilon), norm(x))


def test_a_norm_of_another_formula_is_not_replaced() -> None:
    class ShiftedRMSNorm(nn.Module):  # Gemma's (1 + weight) scaling
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(6))
            self.variance_epsilon = 1e-6

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (1 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    lean = LeanActivations(ShiftedRMSNorm())
    assert len(lean.elementwise) == 1 and lean.rms_norms == []


def test_training_with_and_without_lean_activations_gives_the_same_losses(tmp_path: Path) -> None:
    lean = _fit(adapted_llama(), tmp_path / "lean", steps=3).losses
    plain = _fit(adapted_llama(), tmp_path / "plain", steps=3, lean_activations=False).losses
    torch.testing.assert_close(torch.tensor(lean), torch.tensor(plain), rtol=1e-6, atol=0)


def test_rebuilt_lora_output_of_dora_is_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    # DoRA saves its (..., out) B·A·x for backward; lean activations keep the recipe (F.linear of the
    # r-wide A·x and B) instead and rebuild it. A lone DoRA layer has no hand-written backward, so the
    # gradients must be autograd's bit for bit, and the rebuild must really have been used.
    torch.manual_seed(0)
    model = lorakit.inject(
        nn.Sequential(nn.Linear(8, 6, dtype=torch.float64)),
        lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], use_dora=True, init_lora_weights=False),
    ).train()
    x = torch.randn(5, 8, dtype=torch.float64)
    rebuilt_linear = []

    def counting_unpack(saved: object) -> torch.Tensor:
        if isinstance(saved, recipes._Packed) and saved.recipe.fn is F.linear:
            rebuilt_linear.append(saved.recipe.inputs[0].shape)
        return unpack_saved(saved)

    unpack_saved = lean_activations.unpack_saved
    monkeypatch.setattr(lean_activations, "unpack_saved", counting_unpack)

    def gradients(lean: bool) -> dict[str, torch.Tensor]:
        with LeanActivations(model) if lean else torch.enable_grad():
            loss = model(x).pow(2).sum()
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        return grads

    plain = gradients(lean=False)
    assert rebuilt_linear == []
    lean = gradients(lean=True)
    assert rebuilt_linear and all(shape == (5, 4) for shape in rebuilt_linear)  # rebuilt from A·x
    assert plain.keys() == lean.keys() and any("magnitude" in name for name in plain)
    for name, grad in plain.items():
        assert torch.equal(lean[name], grad), name
