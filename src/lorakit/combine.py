"""Adapter arithmetic: a new adapter from a weighted combination of existing ones (PEFT's
``LoraModel.add_weighted_adapter`` for ``"linear"``, ``"cat"`` and ``"svd"``).

Every adapter's update of a layer is ΔW_i = s_i·B_i·A_i (A_i is (r_i, in), B_i is (out, r_i); for an
embedding A_i is (r_i, num_embeddings), B_i (dim, r_i)). The new adapter has ``lora_alpha = r``, so its
scaling is 1 and its update is just B·A. With weights w_i:

* ``"cat"``: A = [w_1·s_1·A_1; w_2·s_2·A_2; ...] stacked along the rank, B = [B_1, B_2, ...]: exactly
  Σ w_i·ΔW_i, with rank Σ r_i.
* ``"svd"``: Σ w_i·ΔW_i truncated to ``svd_rank`` (default: the largest source rank) by SVD: B = U·S, A = Vh.
* ``"linear"``: A = Σ sign(c_i)·sqrt(|c_i|)·A_i, B = Σ sqrt(|c_i|)·B_i with c_i = w_i·s_i. Cheap but not
  Σ w_i·ΔW_i when several adapters share a layer (cross terms B_i·A_j appear); needs equal ranks.

Where a layer carries only some of the sources, only those contribute; the new adapter covers the union of
the sources' layers.

``"ties"``, ``"dare_linear"`` and ``"dare_ties"`` (PEFT's task-arithmetic merges, see the last section)
treat the A's and the B's as task vectors, as PEFT does: each list is sparsified (TIES: keep the
``density`` largest entries by magnitude; DARE: keep each entry with probability ``density`` and divide
by it), weighted by ±sqrt(|c_i|) (A) / sqrt(|c_i|) (B), then summed (DARE-linear) or merged where signs
agree with the elected sign (TIES, DARE-TIES). Equal ranks are needed, as for ``"linear"``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import torch
from torch import nn

from lorakit.adapter_layer import AdapterLayer
from lorakit.config import LoraConfig
from lorakit.layers import LoraEmbedding, LoraLinear
from lorakit.model import adapter_configs, adapter_layers, add_adapter, check_new_adapter_name
from lorakit.modules_to_save import ModulesToSave

CombineMethod = Literal["linear", "cat", "svd", "ties", "dare_linear", "dare_ties"]
METHODS: tuple[str, ...] = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties")


@torch.no_grad()
def combine_adapters(
    model: nn.Module,
    weights: Mapping[str, float],
    adapter_name: str,
    method: CombineMethod = "linear",
    *,
    svd_rank: int | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    seed: int | None = None,
) -> None:
    """Add adapter ``adapter_name`` = the ``weights``-weighted combination of existing adapters.

    Args:
        model: a model with lorakit adapters.
        weights: source adapter -> weight (may be negative), e.g. ``{"a": 0.7, "b": 0.3}``. The first source's
            config (dropout, bias, task type) is the base of the new adapter's config.
        adapter_name: the new adapter; added inactive and frozen, with a config so it can be saved.
        method: ``"linear"``, ``"cat"`` or ``"svd"`` (see the module docstring). With one source adapter
            PEFT always uses ``"linear"``, and so does lorakit.
        svd_rank: rank of the ``"svd"`` result (default: the largest source rank).
        density: the fraction of entries TIES / DARE keep, in (0, 1] (required for those methods).
        majority_sign_method: TIES / DARE-TIES sign election, ``"total"`` (sign of the sum) or
            ``"frequency"`` (the more frequent sign), as in PEFT.
        seed: DARE's random masks come from torch's global RNG (as PEFT's merge_utils draw them: same
            RNG state, same masks); with ``seed`` they come from a private stream seeded with it, so they
            do not depend on the global RNG.

    A ``modules_to_save`` module trained by one source is copied into the new adapter (two sources with a
    copy of the same module are refused, as in PEFT).

    Raises:
        ValueError: unknown adapter or method, an existing ``adapter_name``, a DoRA source (its magnitude
            vector has no linear combination), ``"linear"`` with unequal ranks, or two sources that both
            train the same ``modules_to_save`` module. The model is then unchanged.
    """
    sources = _check_request(model, weights, adapter_name, method, svd_rank)
    _check_task_arguments(method, density, majority_sign_method)
    configs = adapter_configs(model)
    if len(sources) == 1:
        method = "linear"
    ranks = {name: _max_rank(configs[name]) for name in sources}
    new_rank = _new_rank(method, ranks, svd_rank)
    task = (density, majority_sign_method)
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        factors = {path: _combined_factors(layer, sources, method, new_rank, task)
                   for path, layer in adapter_layers(model)
                   if isinstance(layer, AdapterLayer) and any(name in layer.r for name in sources)}
    copies = _modules_to_copy(model, sources)
    config = _combined_config(configs[next(iter(sources))], new_rank, sorted(factors), sorted(copies))

    add_adapter(model, config, adapter_name)
    modules = dict(model.named_modules())
    for path, (lora_A, lora_B) in factors.items():
        _write_factors(modules[path], adapter_name, lora_A, lora_B)
    for path, source in copies.items():
        wrapper = modules[path]
        wrapper.modules_to_save[adapter_name].load_state_dict(wrapper.modules_to_save[source].state_dict())


# --- checks ----------------------------------------------------------------------------------------------


def _check_request(
    model: nn.Module, weights: Mapping[str, float], adapter_name: str, method: str, svd_rank: int | None
) -> dict[str, float]:
    configs = adapter_configs(model)
    if method not in METHODS:
        raise ValueError(f"unknown combination method {method!r}; lorakit supports {METHODS}")
    if not weights:
        raise ValueError("combine_adapters needs at least one source adapter")
    for name, weight in weights.items():
        if name not in configs:
            raise ValueError(f"no adapter named {name!r}; the model has {sorted(configs)}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"weight of adapter {name!r} must be a finite number, got {weight!r}")
        if configs[name].use_dora:
            raise ValueError(f"adapter {name!r} uses DoRA: its magnitude vector cannot be combined linearly; "
                             "merge it or combine plain LoRA adapters")
    check_new_adapter_name(model, adapter_name)
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1):
        raise ValueError(f"svd_rank must be an integer >= 1, got {svd_rank!r}")
    return {name: float(weight) for name, weight in weights.items()}


def _max_rank(config: LoraConfig) -> int:
    """The largest rank a config gives any layer (PEFT sizes the combined adapter from the configs)."""
    return max([config.r, *config.rank_pattern.values()])


def _new_rank(method: str, ranks: Mapping[str, int], svd_rank: int | None) -> int:
    if method in ("linear", *TASK_METHODS):
        if len(set(ranks.values())) != 1:
            raise ValueError(f"method {method!r} needs adapters of equal rank, got {dict(ranks)}; "
                             "use 'cat' or 'svd'")
        return next(iter(ranks.values()))
    if method == "cat":
        return sum(ranks.values())
    return svd_rank or max(ranks.values())


def _modules_to_copy(model: nn.Module, sources: Mapping[str, float]) -> dict[str, str]:
    """modules_to_save path -> the one source adapter whose trained copy the new adapter takes."""
    copies: dict[str, str] = {}
    for path, layer in adapter_layers(model):
        if not isinstance(layer, ModulesToSave):
            continue
        owners = [name for name in sources if name in layer.modules_to_save]
        if len(owners) > 1:
            raise ValueError(f"adapters {owners} each train their own copy of {path!r} (modules_to_save); "
                             "there is no meaningful combination of two trained modules")
        if owners:
            copies[path] = owners[0]
    return copies


def _combined_config(base: LoraConfig, rank: int, targets: list[str], saved: list[str]) -> LoraConfig:
    """The new adapter's config: the first source's, with rank r, alpha r (scaling 1) and exact targets.

    rsLoRA is switched off: with alpha = r it would scale the combined update by sqrt(r) instead of 1.
    """
    return base.replace(
        r=rank,
        lora_alpha=rank,
        target_modules=targets,
        exclude_modules=None,
        layers_to_transform=None,
        layers_pattern=None,
        rank_pattern={},
        alpha_pattern={},
        modules_to_save=saved or None,
        init_lora_weights=True,
        use_rslora=False,
        use_dora=False,
    )


# --- the math ----------------------------------------------------------------------------------------------


def _factors(layer: AdapterLayer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of ``name`` oriented so that ΔW = s·B·A.

    Linear: A (r, in), B (out, r). Embedding: A (r, num_embeddings), B (embedding_dim, r).
    """
    if isinstance(layer, LoraEmbedding):
        return layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    if isinstance(layer, LoraLinear):
        return layer.lora_A[name].weight, layer.lora_B[name].weight
    raise TypeError(f"cannot combine adapters of a {type(layer).__name__}")


def _combined_factors(
    layer: AdapterLayer, sources: Mapping[str, float], method: str, rank: int,
    task: tuple[float | None, str] = (None, "total"),
) -> tuple[torch.Tensor, torch.Tensor]:
    """The new (A, B) of one layer, zero-padded to ``rank`` (padding adds nothing to B·A)."""
    present = [(name, weight) for name, weight in sources.items() if name in layer.r]
    factors = [_factors(layer, name) for name, _ in present]
    coefficients = [weight * layer.scaling[name] for name, weight in present]
    if method == "cat":
        lora_A = torch.cat([c * a for c, (a, _) in zip(coefficients, factors)], dim=0)
        lora_B = torch.cat([b for _, b in factors], dim=1)
    elif method in TASK_METHODS:
        lora_A, lora_B = _task_factors(factors, coefficients, method, *task)
    elif method == "linear":
        if len({a.shape[0] for a, _ in factors}) != 1:
            ranks = {name: layer.r[name] for name, _ in present}
            raise ValueError(f"method 'linear' needs equal ranks in every layer, got {ranks}; "
                             "use 'cat' or 'svd'")
        # sqrt(|c|) on both factors, the sign on A only (so that a negative weight subtracts the update).
        lora_A = sum(math.copysign(math.sqrt(abs(c)), c) * a for c, (a, _) in zip(coefficients, factors))
        lora_B = sum(math.sqrt(abs(c)) * b for c, (_, b) in zip(coefficients, factors))
    else:
        lora_A, lora_B = _svd_factors(coefficients, factors, rank)
    return _pad_rank(lora_A, lora_B, rank)


def _svd_factors(
    coefficients: list[float], factors: list[tuple[torch.Tensor, torch.Tensor]], rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factorisation of Σ c_i·B_i·A_i: B = U·S (out, k), A = Vh (k, in)."""
    dtype = factors[0][0].dtype
    # SVD needs at least fp32 (bf16/fp16 adapters are upcast for it).
    work = torch.promote_types(dtype, torch.float32)
    delta = sum(c * (b.to(work) @ a.to(work)) for c, (a, b) in zip(coefficients, factors))
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, s.shape[0])
    return vh[:k].to(dtype), (u[:, :k] * s[:k]).to(dtype)


def _pad_rank(lora_A: torch.Tensor, lora_B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    missing = rank - lora_A.shape[0]
    if missing > 0:
        lora_A = torch.cat([lora_A, lora_A.new_zeros(missing, lora_A.shape[1])], dim=0)
        lora_B = torch.cat([lora_B, lora_B.new_zeros(lora_B.shape[0], missing)], dim=1)
    return lora_A, lora_B


def _write_factors(layer: nn.Module, name: str, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
    if isinstance(layer, LoraEmbedding):
        layer.lora_embedding_A[name].copy_(lora_A)
        layer.lora_embedding_B[name].copy_(lora_B)
    else:
        layer.lora_A[name].weight.copy_(lora_A)
        layer.lora_B[name].weight.copy_(lora_B)


# --- TIES and DARE (PEFT's merge_utils semantics, applied to the A's and the B's) ------------------------

TASK_METHODS: tuple[str, ...] = ("ties", "dare_linear", "dare_ties")
SIGN_METHODS: tuple[str, ...] = ("total", "frequency")


def _check_task_arguments(method: str, density: float | None, majority_sign_method: str) -> None:
    if method not in TASK_METHODS:
        return
    if density is None or isinstance(density, bool) or not isinstance(density, (int, float)):
        raise ValueError(f"method {method!r} needs a density in (0, 1], got {density!r}")
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    if majority_sign_method not in SIGN_METHODS:
        raise ValueError(f"majority_sign_method must be one of {SIGN_METHODS}, got {majority_sign_method!r}")


def _task_factors(
    factors: list[tuple[torch.Tensor, torch.Tensor]], coefficients: list[float], method: str,
    density: float | None, sign_method: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of one layer: the A's and the B's each merged as task tensors (A first: DARE's masks are
    drawn in PEFT's order, so the same RNG state gives the same masks)."""
    assert density is not None
    weights_A = [math.copysign(math.sqrt(abs(c)), c) for c in coefficients]  # the sign on A only
    weights_B = [math.sqrt(abs(c)) for c in coefficients]
    lora_A = _merge_task_tensors([a for a, _ in factors], weights_A, method, density, sign_method)
    lora_B = _merge_task_tensors([b for _, b in factors], weights_B, method, density, sign_method)
    return lora_A.to(factors[0][0].dtype), lora_B.to(factors[0][1].dtype)


def _merge_task_tensors(
    tensors: list[torch.Tensor], weights: list[float], method: str, density: float, sign_method: str
) -> torch.Tensor:
    """Sparsify each tensor (all of one shape), weight, then sum (DARE-linear) or sign-consensus merge."""
    sparse = _keep_largest if method == "ties" else _keep_random
    stacked = torch.stack([sparse(tensor, density) for tensor in tensors])  # (n, *shape)
    scale = torch.tensor(weights).view(-1, *([1] * (stacked.dim() - 1)))
    weighted = stacked * scale
    if method == "dare_linear":
        return weighted.sum(dim=0)
    agrees = _majority_sign_mask(stacked, sign_method)
    return (weighted * agrees).sum(dim=0) / agrees.sum(dim=0).clamp(min=1.0)


def _keep_largest(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """TIES' trim: zero all but the int(density · numel) entries of largest magnitude."""
    if density >= 1:
        return tensor
    keep = int(density * tensor.numel())
    mask = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    mask[torch.topk(tensor.abs().reshape(-1), k=keep, largest=True).indices] = 1
    return tensor * mask.reshape(tensor.shape)


def _keep_random(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """DARE's drop-and-rescale: keep each entry with probability ``density``, divide the kept by it."""
    if density >= 1:
        return tensor  # no mask drawn (as PEFT), so the RNG stream stays aligned with PEFT's
    mask = torch.bernoulli(torch.full_like(tensor, density))
    return tensor * mask / density


def _majority_sign_mask(stacked: torch.Tensor, sign_method: str) -> torch.Tensor:
    """Where each task tensor's sign equals the elected sign (of the sum, or the more frequent one)."""
    signs = stacked.sign()
    votes = stacked.sum(dim=0) if sign_method == "total" else signs.sum(dim=0)
    elected = torch.where(votes >= 0, 1.0, -1.0)
    return signs == elected
