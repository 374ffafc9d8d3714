"""DoRA under bf16 autocast: the same output and gradients as peft, and the base output's dtype kept."""

from __future__ import annotations

import copy

import peft
import torch
from torch import nn

import lorakit


class Projection(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(64, 96)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def test_dora_bf16_autocast_matches_peft() -> None:
    torch.manual_seed(0)
    base = Projection()
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["proj"], "use_dora": True,
              "init_lora_weights": False}
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    ours = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(**config))
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if "lora_" in name:
                dict(ours.named_parameters())[name.removeprefix("base_model.model.")].copy_(parameter)
    x = torch.randn(32, 64)
    outputs, grads = [], []
    for model in (ours, theirs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
        y.float().square().mean().backward()
        outputs.append(y)
        grads.append({n.removeprefix("base_model.model."): p.grad for n, p in model.named_parameters()
                      if p.requires_grad})
    assert outputs[0].dtype == outputs[1].dtype == torch.bfloat16
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1.6e-2)  # bf16 resolution
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-2, atol=1e-5)  # bf16 resolution
