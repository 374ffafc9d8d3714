"""Recompute recipes: tag a tensor with how to rebuild it, so it need not be kept for backward.

A layer that makes a tensor which is a cheap function of tensors autograd keeps anyway (a cast of a
weight, DoRA's ``B·A·x`` from ``A·x``) marks it with `mark_recomputable`. Outside a training technique
that uses the marks the mark costs nothing and changes nothing. `lorakit.train.lean_activations` installs
``saved_tensors_hooks`` that store the recipe (`pack_saved`) instead of the tensor and rebuild it in
backward (`unpack_saved`): same operators, same inputs, same autocast state, so the same bits.

A recipe checks in backward that neither its inputs nor the tensor it stands for were changed in place
since forward, as autograd does for the tensors it saves.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

RECIPE_ATTRIBUTE = "_lorakit_recipe"

@dataclass
class _Recipe:
    """How to rebuild one tensor: ``fn(*inputs)`` under the autocast state of the forward that made it.

    An input is a tensor, or (once packed) the `_Packed` recipe of an input that has one itself, so a
    chain (a norm output cast to bf16 for a matmul) keeps only the chain's first inputs alive.
    """

    fn: Callable[..., torch.Tensor]
    inputs: tuple[torch.Tensor | _Packed, ...]
    input_versions: tuple[int | None, ...]
    output_version: int
    device_type: str
    autocast: bool
    autocast_dtype: torch.dtype
    # The rebuilt tensor, shared by the backward nodes that saved this recipe (q, k and v all keep the
    # same norm output): it lives as long as one of them does, i.e. within one block's backward.
    rebuilt: torch.Tensor | None = dataclasses.field(default=None, repr=False)

    def rebuild(self) -> torch.Tensor:
        versions = tuple(t._version if isinstance(t, torch.Tensor) else None for t in self.inputs)
        if versions != self.input_versions:
            raise RuntimeError(
                "lorakit lean activations: an input of a recomputed activation was modified in place "
                "between forward and backward; disable lean activations for this model"
            )
        if self.rebuilt is None:
            inputs = tuple(unpack_saved(t) for t in self.inputs)
            with (
                torch.no_grad(),
                torch.autocast(self.device_type, dtype=self.autocast_dtype, enabled=self.autocast),
            ):
                self.rebuilt = self.fn(*inputs)
        return self.rebuilt

    def packed_inputs(self) -> _Recipe:
        """This recipe with every input that has a recipe of its own replaced by that (packed) recipe."""
        inputs = tuple(t if isinstance(t, _Packed) else pack_saved(t) for t in self.inputs)
        if all(new is old for new, old in zip(inputs, self.inputs, strict=True)):
            return self
        versions = tuple(
            None if isinstance(new, _Packed) else version
            for new, version in zip(inputs, self.input_versions, strict=True)
        )
        return dataclasses.replace(self, inputs=inputs, input_versions=versions)


@dataclass
class _Packed:
    """What autograd stores in place of a tagged tensor (or a view of one): its recipe and view geometry."""

    recipe: _Recipe
    size: torch.Size
    stride: tuple[int, ...]
    offset: int
    base_geometry: tuple[torch.Size, tuple[int, ...], int]


def mark_recomputable(output: torch.Tensor, fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> None:
    """Let lean activations keep ``fn(*inputs)`` instead of ``output`` if autograd saves ``output``.

    ``fn`` must give ``output`` exactly from ``inputs`` under the current autocast state, and should cost
    little next to keeping ``output``: the inputs should be tensors that backward keeps anyway, or that
    can be rebuilt themselves. Outside a `LeanActivations` context the mark has no effect.
    """
    if torch.is_grad_enabled():  # otherwise nothing will be saved for backward
        attach_recipe(output, fn, inputs)


def attach_recipe(
    output: torch.Tensor, fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...]
) -> None:
    device_type = output.device.type
    recipe = _Recipe(
        fn,
        inputs,
        tuple(t._version for t in inputs),
        output._version,
        device_type,
        torch.is_autocast_enabled(device_type),
        torch.get_autocast_dtype(device_type),
    )
    setattr(output, RECIPE_ATTRIBUTE, recipe)


def _has_recipe(tensor: torch.Tensor) -> bool:
    base = tensor if tensor._base is None else tensor._base
    return getattr(base, RECIPE_ATTRIBUTE, None) is not None


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast lowers matmul inputs to on ``device_type``, or None when autocast is off."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def cast_for_autocast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` cast to ``dtype`` as autocast casts a matmul input (fp64 and integers stay as they are).

    Made explicitly before the matmul, the cast is the same bits autocast would make inside it, but it
    can be marked recomputable: a parameter's copy, or a copy of a tensor that is itself rebuilt (a norm
    output), is then rebuilt in backward instead of kept. Under bf16 autocast every frozen linear layer
    otherwise keeps a bf16 copy of its weight, and every adapted one a bf16 copy of its input.
    """
    if tensor.dtype == dtype or tensor.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return tensor
    cast = tensor.to(dtype)
    if isinstance(tensor, nn.Parameter) or _has_recipe(tensor):
        mark_recomputable(cast, functools.partial(_to_dtype, dtype=dtype), tensor)
    return cast


def _to_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype)


def pack_saved(tensor: torch.Tensor) -> torch.Tensor | _Packed:
    base = tensor if tensor._base is None else tensor._base
    recipe: _Recipe | None = getattr(base, RECIPE_ATTRIBUTE, None)
    if recipe is None or base._version != recipe.output_version:
        return tensor
    return _Packed(
        recipe.packed_inputs(),
        tensor.size(),
        tensor.stride(),
        tensor.storage_offset(),
        (base.size(), base.stride(), base.storage_offset()),
    )


def unpack_saved(saved: torch.Tensor | _Packed) -> torch.Tensor:
    if not isinstance(saved, _Packed):
        return saved
    base = saved.recipe.rebuild()
    size, stride, offset = saved.base_geometry
    if base.size() != size or base.stride() != stride:
        raise RuntimeError("lorakit lean activations: a recomputed activation changed its layout")
    return base.as_strided(saved.size, saved.stride, saved.offset - offset + base.storage_offset())
