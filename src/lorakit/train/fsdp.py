"""Sharded training with FSDP2 (``torch.distributed.fsdp.fully_shard``): ``lorakit train --fsdp``.

Every decoder layer (the classes a transformers model names in ``_no_split_modules``) becomes one FSDP
unit and the loss module (embeddings, final norm, output head) the root unit. Each process then holds
``1 / world_size`` of the frozen base *and* of the adapter, gathers a layer's full weights just before it
runs and frees them after, and keeps gradients and AdamW moments sharded: a model too big for one
device trains across several. Under bf16 the `MixedPrecisionPolicy` computes in bf16 and reduces the
gradients in fp32; the sharded parameters and the optimizer stay fp32.

Checkpoints and the final adapter: the adapter is small (well under 1 % of the model), so the trainable
parameters and their optimizer state are gathered into full tensors (`full_trainable_state`, a collective)
and written by rank 0 in exactly the format of a single-process run. That is why an FSDP checkpoint
resumes under FSDP with another number of processes, under DDP or on one process, and why the adapter
file is complete (an adapter saved from the local shards alone would be a fragment: what PEFT users get
under ZeRO-3 without a gather). ``torch.distributed.checkpoint`` (one file per rank) would pay off only
for a state too big for one host's memory, which the frozen base never is, since it is never saved.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import nn

from lorakit.peft_format import EMBEDDING_LAYER_NAMES as EMBEDDINGS
from lorakit.train.distributed import Distributed

logger = logging.getLogger(__name__)


def is_sharded(tensor: torch.Tensor) -> bool:
    """True for a DTensor (a parameter, gradient or optimizer moment that FSDP sharded)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The modules to shard one by one: instances of the model's ``_no_split_modules`` classes.

    Without that attribute (not a transformers model): the children of the longest ``nn.ModuleList``.
    """
    names = set(getattr(model, "_no_split_modules", None) or ())
    found = [module for module in model.modules() if type(module).__name__ in names]
    if found:
        return found
    lists = [module for module in model.modules() if isinstance(module, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def shard_model(root: nn.Module, model: nn.Module, context: Distributed, bf16: bool) -> nn.Module:
    """Shard ``model``'s decoder layers and then ``root`` (the module whose forward the loop calls).

    ``model`` must be inside ``root``. The trainable parameters are first broadcast from rank 0, so that
    every process shards the same adapter. Sharding replaces the parameters by DTensors: build the
    optimizer afterwards. On one process nothing is sharded (there is no process group to shard over).

    Returns:
        ``root``, now an FSDP module (its class is changed in place).
    """
    if not context.enabled:
        logger.info("fsdp: one process, nothing to shard (launch with torchrun to shard)")
        return root
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    context.broadcast_parameters([p for p in model.parameters() if p.requires_grad])
    mesh = init_device_mesh(context.device.type, (context.world_size,))
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if bf16
        else MixedPrecisionPolicy()
    )
    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(root, mesh=mesh, mp_policy=policy)
    held, total = local_share(root)
    logger.info(
        "fsdp: %d decoder layers and the root sharded over %d processes, computing in %s; process %d "
        "holds %d of the %d parameter values",
        len(layers),
        mesh.size(),
        "bf16 (fp32 gradient reduction)" if bf16 else "fp32",
        context.rank,
        held,
        total,
    )
    return root


def local_share(module: nn.Module) -> tuple[int, int]:
    """``(parameter values this process stores, parameter values of the whole model)``."""
    held = total = 0
    for parameter in module.parameters():
        total += parameter.numel()  # a DTensor's numel is the whole tensor's
        held += parameter.to_local().numel() if is_sharded(parameter) else parameter.numel()
    return held, total


@contextlib.contextmanager
def no_sync(module: nn.Module) -> Iterator[None]:
    """Accumulate gradients locally (no all-reduce / reduce-scatter) inside the block: DDP or FSDP2."""
    if hasattr(module, "no_sync"):  # DistributedDataParallel
        with module.no_sync():
            yield
        return
    if not hasattr(module, "set_requires_gradient_sync"):  # one process: nothing is synchronised anyway
        yield
        return
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def scalar(value: torch.Tensor) -> float:
    """A scalar that may be a DTensor (clip_grad_norm_ of sharded gradients) as a python float."""
    return float(value.full_tensor() if is_sharded(value) else value)


@contextlib.contextmanager
def full_trainable_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Iterator[None]:
    """Inside the block the trainable parameters and their optimizer state are full tensors.

    So are the base weights of adapted embedding layers and output heads, which PEFT's adapter file holds.

    On entry every sharded trainable parameter (and every sharded tensor of its optimizer state) is
    all-gathered -- a collective: every process enters -- and put in place of the shard, so code written
    for one process (``trainable_state``, ``save_adapter``, ``optimizer.state_dict()``,
    ``load_trainable_state``, ``optimizer.load_state_dict``) reads and writes whole tensors. On exit each
    process takes its own shard of whatever the block left there (what it loaded) and the DTensors are put
    back. Without sharded parameters this does nothing. No forward or backward may run inside.
    """
    from torch.distributed.tensor import distribute_tensor

    slots: list[tuple[nn.Module, str, nn.Parameter, nn.Parameter]] = []
    gathered: dict[int, nn.Parameter] = {}
    for path, module in model.named_modules():
        # PEFT's format also holds the base weights of an adapted embedding layer or output head.
        written = path.endswith(".base_layer") and path[: -len(".base_layer")].split(".")[-1] in EMBEDDINGS
        for name, parameter in list(module._parameters.items()):
            if parameter is None or not is_sharded(parameter) or not (parameter.requires_grad or written):
                continue
            if id(parameter) not in gathered:  # a tied parameter is gathered once
                full = parameter.detach().full_tensor()
                gathered[id(parameter)] = nn.Parameter(full, requires_grad=parameter.requires_grad)
            slots.append((module, name, parameter, gathered[id(parameter)]))
    if optimizer is not None:
        for group in optimizer.param_groups:
            for parameter in group["params"]:
                if is_sharded(parameter) and parameter in optimizer.state:
                    optimizer.state[parameter] = {
                        key: value.full_tensor() if is_sharded(value) else value
                        for key, value in optimizer.state[parameter].items()
                    }
    for module, name, _, full in slots:
        module._parameters[name] = full
    try:
        yield
    finally:
        with torch.no_grad():
            for module, name, shard, full in slots:
                module._parameters[name] = shard
                mine = distribute_tensor(
                    full.detach(), shard.device_mesh, shard.placements, src_data_rank=None
                )
                shard.to_local().copy_(mine.to_local())
            if optimizer is not None:
                for group in optimizer.param_groups:
                    for parameter in group["params"]:
                        if not is_sharded(parameter) or parameter not in optimizer.state:
                            continue
                        optimizer.state[parameter] = {
                            key: _shard_like(value, parameter, distribute_tensor)
                            for key, value in optimizer.state[parameter].items()
                        }


def _shard_like(value: object, parameter: torch.Tensor, distribute_tensor) -> object:
    """A full optimizer-state tensor shaped like ``parameter``, sharded like it; anything else as is."""
    if not isinstance(value, torch.Tensor) or is_sharded(value) or value.shape != parameter.shape:
        return value
    return distribute_tensor(
        value.to(parameter.device), parameter.device_mesh, parameter.placements, src_data_rank=None
    )


def gathers_trainable_state(method):
    """Decorate a `Trainer` method that reads or writes the whole adapter (checkpoint, restore, finish).

    The method then runs inside `full_trainable_state` of ``self.model`` and ``self.optimizer``; every
    process must call it (the gather is a collective). Without sharding it is the plain method.
    """
    import functools

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with full_trainable_state(self.model, self.optimizer):
            return method(self, *args, **kwargs)

    return wrapper
