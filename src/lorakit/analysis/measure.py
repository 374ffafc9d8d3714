"""Measure the peak of live tensor memory of a training step, on any device, CPU included.

Why this method: torch's CPU allocator keeps no peak statistic (there is no CPU
``max_memory_allocated``), and process RSS mixes in the Python heap, shared libraries, allocator
caching and mmap'd checkpoint pages. What ``lorakit.analysis.memory`` predicts is the bytes of live
tensors, so that is what is measured: a ``TorchDispatchMode`` sees every ATen operator (forward,
backward and optimizer alike), registers the storage of every tensor it returns, and a weak
reference on that storage removes it when its memory is freed. After each operator the live total
is compared with the peak. Tensors made before tracking starts (parameters, buffers, bitsandbytes
quantisation state, optimizer state) are registered explicitly.

What it does not see: scratch memory inside one operator (a matmul's workspace, a fused kernel's
temporaries), and memory outside tensors. Storages are counted once however many views share them.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorTracker(TorchDispatchMode):
    """Tracks the bytes of live tensor storages; ``peak_bytes`` is the maximum seen after any operator.

    Use as a context manager around the work to measure; ``track`` registers tensors made before.
    """

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, tuple[weakref.ref, int]] = {}
        self.current_bytes = 0
        self.peak_bytes = 0

    def _forget(self, key: int) -> Callable[[object], None]:
        def callback(_: object) -> None:
            entry = self._live.pop(key, None)
            if entry is not None:
                self.current_bytes -= entry[1]

        return callback

    def track(self, tensors: Iterable[Any] | torch.Tensor) -> None:
        """Register tensors (their storages, once each); meta tensors and non-tensors are ignored."""
        for tensor in [tensors] if isinstance(tensors, torch.Tensor) else tensors:
            if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
                continue
            try:
                storage = tensor.untyped_storage()
            except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts
                continue
            # the same Python object comes back for the same storage while it lives (PyObject
            # preservation), so its id is a key and a weak reference on it fires when it is freed
            key = id(storage)
            if key in self._live or storage.nbytes() == 0:
                continue
            self._live[key] = (weakref.ref(storage, self._forget(key)), storage.nbytes())
            self.current_bytes += storage.nbytes()
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)

    def track_module(self, module: nn.Module) -> None:
        """Register a module's parameters, gradients, buffers and bitsandbytes quantisation state."""
        for parameter in module.parameters():
            self.track(parameter)
            if parameter.grad is not None:
                self.track(parameter.grad)
            self.track(_quant_state_tensors(getattr(parameter, "quant_state", None)))
        self.track(module.buffers())

    def track_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        for state in optimizer.state.values():
            self.track(v for v in state.values() if isinstance(v, torch.Tensor))

    def reset_peak(self) -> None:
        self.peak_bytes = self.current_bytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.track(tree_flatten(out)[0])
        return out


def _quant_state_tensors(state: Any, depth: int = 0) -> list[torch.Tensor]:
    """Tensors inside a bitsandbytes QuantState (absmax, code, offset, nested state2)."""
    if state is None or depth > 2:
        return []
    found: list[torch.Tensor] = []
    for value in vars(state).values():
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif type(value).__name__ == "QuantState":
            found += _quant_state_tensors(value, depth + 1)
    return found


@dataclass
class MeasuredPeak:
    """Bytes of live tensors: at the start (model), and the peak over the measured steps."""

    static_bytes: int
    peak_bytes: int
    steps: int


def measure_training_peak(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    steps: int = 2,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
) -> MeasuredPeak:
    """Run ``steps`` optimizer steps of ``model(**batch)`` and return the peak of live tensor bytes.

    Two steps by default, so the last one runs with the optimizer state already allocated (the
    steady state). ``loss_fn`` maps the model output to the loss (default: ``output.loss``).
    """
    tracker = LiveTensorTracker()
    tracker.track_module(model)
    tracker.track_optimizer(optimizer)
    tracker.track(batch.values())
    static = tracker.current_bytes
    model.train()
    with tracker:
        for _ in range(steps):
            # the output (and its logits) lives through backward, as in a plain training loop
            output = model(**batch)
            loss = loss_fn(output) if loss_fn is not None else output.loss
            loss.backward()
            del output, loss
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return MeasuredPeak(static_bytes=static, peak_bytes=tracker.peak_bytes, steps=steps)
