"""torch.distributed for the trainer: process-group set-up from ``torchrun``'s environment, and wrapping a
loss module in DDP or FSDP2 (``fully_shard``).

The trainer wraps a *loss module* (an ``nn.Module`` whose ``forward(batch)`` runs the model and returns the
loss), not the bare model: DDP synchronises gradients and FSDP2 gathers parameters from hooks on a module's
``__call__``, and the losses call several model methods (``forward_train``, ``mtp_hidden``,
``head_weight``), so the call that all of them happen inside is the loss module's.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    """``rank`` / ``world_size`` of this process (0 / 1 without a process group)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_from_env(device: torch.device) -> DistInfo:
    """Join the process group ``torchrun`` describes (WORLD_SIZE > 1), gloo on CPU and nccl on CUDA;
    a single process otherwise. Idempotent."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size())


def wrap(loss_module: nn.Module, mode: Optional[str], info: DistInfo, blocks: list) -> nn.Module:
    """Wrap ``loss_module`` for data parallelism.

    Args:
        mode: None / "none" (single process, or plain replicas), ``"ddp"`` or ``"fsdp"`` (FSDP2: each of
            ``blocks`` sharded on its own, then the root).
        blocks: the transformer blocks (FSDP2 shards each as one unit).
    """
    if not info.enabled or mode in (None, "none"):
        return loss_module
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(loss_module)
    if mode == "fsdp":
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError as exc:  # torch < 2.6
            raise RuntimeError(f"distributed='fsdp' needs torch.distributed.fsdp.fully_shard (torch >= 2.6): {exc}") from exc
        for block in blocks:
            fully_shard(block)
        fully_shard(loss_module)
        return loss_module
    raise ValueError(f"distributed must be None, 'ddp' or 'fsdp', got {mode!r}")


def all_reduce_sum_(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """In-place sum over ranks (no-op in one process)."""
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean over ranks of a (detached) tensor, for logging."""
    if not info.enabled:
        return value
    t = value.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / info.world_size
