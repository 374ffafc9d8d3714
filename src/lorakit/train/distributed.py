"""Multi-process training under ``torchrun``: process group, device, DDP wrapping, small collectives.

``torchrun --nproc-per-node N`` sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; `Distributed.from_env`
joins the process group (NCCL on CUDA, gloo on CPU). Without them everything here is a no-op, so the
single-process path and the multi-process path are the same code.

Why DDP is safe with a frozen base: DDP only registers parameters that require grad, so its buckets hold
the adapters alone. With ``find_unused_parameters=False`` every one of them must receive a gradient in
every backward, which is true when each adapted module runs in the forward pass (the usual case);
`check_all_have_grads` turns the exception (an adapter on a module the loss never uses) into a clear
error naming it, and ``ddp_find_unused_parameters`` in the loop switches DDP to the slower search.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Distributed:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str | None = None) -> Distributed:
        """Join the torchrun process group if the environment names one; pick this process's device."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        chosen = _pick_device(device, local_rank)
        owns_group = False
        if world_size > 1 and not dist.is_initialized():
            backend = "nccl" if chosen.type == "cuda" else "gloo"
            if chosen.type == "cuda":
                torch.cuda.set_device(chosen)
            dist.init_process_group(backend, timeout=timedelta(minutes=30))
            owns_group = True
        if dist.is_initialized():
            rank, world_size = dist.get_rank(), dist.get_world_size()
        return cls(
            rank=rank, local_rank=local_rank, world_size=world_size, device=chosen, owns_group=owns_group
        )

    def close(self) -> None:
        """Leave the process group if `from_env` joined it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False

    # --- collectives (identity on one process) ------------------------------------------------------------

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over processes of a small tensor (returned, on ``values``' device)."""
        if not self.enabled:
            return values
        reduced = values.detach().clone().to(self.device)
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
        return reduced.to(values.device)

    def broadcast_parameters(self, parameters: list[nn.Parameter]) -> None:
        """Copy rank 0's values into every process (the adapters start identical everywhere)."""
        if not self.enabled:
            return
        with torch.no_grad():
            for parameter in parameters:
                dist.broadcast(parameter.data, src=0)

    def gather_objects(self, value: Any) -> list[Any]:
        """``[value of rank 0, value of rank 1, ...]`` on every process."""
        if not self.enabled:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's ``value`` on every process."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def _pick_device(device: str | None, local_rank: int) -> torch.device:
    if device is not None:
        chosen = torch.device(device)
        if chosen.type == "cuda" and chosen.index is None:
            chosen = torch.device("cuda", local_rank)
        return chosen
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def wrap_ddp(module: nn.Module, context: Distributed, find_unused_parameters: bool = False) -> nn.Module:
    """``module`` in DistributedDataParallel (unchanged on one process).

    ``init_sync=False``: DDP's own start-up broadcast would send the whole frozen base (every process
    loads it from the same files anyway); `Distributed.broadcast_parameters` syncs the trainable ones.
    """
    if not context.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return DistributedDataParallel(
        module, device_ids=device_ids, init_sync=False, find_unused_parameters=find_unused_parameters
    )


def check_all_have_grads(named_parameters: list[tuple[str, nn.Parameter]]) -> None:
    """Raise if a trainable parameter got no gradient: DDP without unused-parameter search would fail.

    Raises:
        RuntimeError: with the names of the parameters the loss never reached.
    """
    missing = [name for name, parameter in named_parameters if parameter.grad is None]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise RuntimeError(
            f"{len(missing)} trainable parameters get no gradient from the loss ({shown}); under DDP they "
            "break gradient synchronisation. Exclude those modules from the adapter, or set "
            "ddp_find_unused_parameters=True."
        )
