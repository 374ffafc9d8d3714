"""Routes: a forward pass of a lorakit layer handed to another object for a while.

A mixed-adapter batch (`lorakit.adapter_per_row`, the serving engine) gives every row its own adapter.
The state that needs (stacked weights, each row's slot) belongs to the code that runs the batch, not to the
layers: that code sets a route on each layer, the layer's forward asks `route_of(self)` and, when there is
one, calls ``route.forward(layer, x, ...)`` instead of computing its own adapters. Routes are held weakly,
so a layer that is freed takes its route with it.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any, Protocol

import torch
from torch import nn


class Route(Protocol):
    """What a layer calls instead of its own forward while the route is set."""

    def forward(self, layer: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any: ...


_ROUTES: weakref.WeakKeyDictionary[nn.Module, Route] = weakref.WeakKeyDictionary()


def route_of(layer: nn.Module) -> Route | None:
    """The route set on ``layer``, or None (then the layer computes its active adapters itself)."""
    return _ROUTES.get(layer) if _ROUTES else None


def set_route(layer: nn.Module, route: Route) -> None:
    """Send ``layer``'s forward to ``route`` until `clear_route`.

    Raises:
        RuntimeError: the layer already has a route (routes do not nest).
    """
    if layer in _ROUTES:
        raise RuntimeError("this layer is already inside a mixed-adapter batch; mixed batches do not nest")
    _ROUTES[layer] = route


def clear_route(layer: nn.Module) -> None:
    _ROUTES.pop(layer, None)


def routed(modules: Iterable[nn.Module]) -> bool:
    """True when any of ``modules`` has a route set (a mixed batch is running over them)."""
    return bool(_ROUTES) and any(module in _ROUTES for module in modules)
