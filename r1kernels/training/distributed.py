"""torch.distributed for the trainer: process-group set-up from ``torchrun``'s environment, wrapping a loss
module in DDP or FSDP2 (``fully_shard``), and the few collectives the trainer needs.

The trainer wraps a *loss module* (an ``nn.Module`` whose ``forward(batch, step)`` runs the model and returns
the loss), not the bare model: DDP synchronises gradients and FSDP2 gathers parameters from hooks on a module's
``__call__``, and the losses call several model methods (``forward_train``, ``mtp_hidden``, ``head_weight``),
so the call that all of them happen inside is the loss module's.

Every function here is a no-op (or the identity) in a single process, so the trainer has one code path.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

MODES = ("ddp", "fsdp")


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
    a single process otherwise. Idempotent.

    On CUDA the current device is set to ``device`` first (NCCL and FSDP2's default mesh use the current
    device); every rank must have put its model on its own GPU (``cuda:LOCAL_RANK``).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if device.type == "cuda":
        torch.cuda.set_device(device if device.index is not None else int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size())


def wrap(loss_module: nn.Module, mode: Optional[str], info: DistInfo, blocks: list) -> nn.Module:
    """Wrap ``loss_module`` for data parallelism; returns the module to call.

    Args:
        mode: None (single process: returned as is), ``"ddp"`` or ``"fsdp"`` (FSDP2: each of ``blocks``
            sharded on its own, then the root; the parameters of ``loss_module`` are replaced by shards, in place).
        blocks: the transformer blocks (FSDP2 shards each as one unit).

    DDP keeps buffers rank-local (``broadcast_buffers=False``): the MoE load counters must hold each rank's own
    counts until the trainer sums them over ranks (broadcasting rank 0's buffers at every forward would overwrite
    them between micro-batches), and the routing biases stay identical because every rank applies the same
    update from the summed counts. ``find_unused_parameters=True`` because a stage's loss need not touch every
    parameter (GRPO's log-probabilities leave the MTP modules out); it costs a walk of the autograd graph per
    step, and DDP warns once when a run happens to use every parameter.
    """
    if not info.enabled or mode is None:
        return loss_module
    if mode == "ddp":
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        # newer torch renamed the flag (and deprecated the old name); both keep the sync at construction
        key = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
               else "broadcast_buffers")
        return DistributedDataParallel(loss_module, find_unused_parameters=True, **{key: False})
    if mode == "fsdp":
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError as exc:  # torch < 2.6
            raise RuntimeError(f"distributed='fsdp' needs torch.distributed.fsdp.fully_shard (torch >= 2.6): "
                               f"{exc}") from exc
        broadcast_module_(loss_module, info)  # FSDP2 shards each rank's own copy: make the copies identical first
        for block in blocks:
            fully_shard(block)
            _keep_list_arguments(block)
        fully_shard(loss_module)
        _keep_list_arguments(loss_module)
        return loss_module
    raise ValueError(f"distributed must be None, 'ddp' or 'fsdp', got {mode!r}")


def _keep_list_arguments(module: nn.Module) -> None:
    """Hand ``module`` the caller's own list arguments, not FSDP2's copies.

    FSDP2's pre-forward hook wraps every argument tensor that requires grad in an autograd function (to know when
    the module's input gradients are done) and rebuilds the containers holding them: a ``list`` argument that
    already holds such tensors reaches ``forward`` as a new list. The model passes lists that layers *append*
    to (``balance``: the MoE routing for the balance loss; ``aux``: attention losses), so the appends would land
    in the copy and be lost (measured: the MTP block's balance term vanished under FSDP). The block only appends
    to these lists, never reads the tensors in them, so giving it the original list changes no gradient: the
    post-backward hook still fires from the hidden-state input.
    """
    saved: list = []  # a stack: one entry per call in flight (re-entrant calls are possible)

    def before(mod, args, kwargs):  # runs first: remember the caller's objects
        saved.append((args, kwargs))

    def after(mod, args, kwargs):  # runs after FSDP's hook: put the caller's lists back
        orig_args, orig_kwargs = saved.pop()
        args = tuple(o if isinstance(o, list) else a for a, o in zip(args, orig_args))
        kwargs = {k: orig_kwargs[k] if isinstance(orig_kwargs.get(k), list) else v for k, v in kwargs.items()}
        return args, kwargs

    module.register_forward_pre_hook(before, prepend=True, with_kwargs=True)
    module.register_forward_pre_hook(after, with_kwargs=True)


@contextmanager
def grad_sync(wrapped: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce (DDP ``no_sync``) / reduce-scatter (FSDP2) for a micro-batch that is not the
    step's last: the gradients accumulate locally and are synchronised once, with the last micro-batch."""
    if enabled:
        yield
        return
    if hasattr(wrapped, "no_sync"):  # DDP
        with wrapped.no_sync():
            yield
        return
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        wrapped.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)
        return
    yield  # a single process: nothing is synchronised anyway


def broadcast_module_(module: nn.Module, info: DistInfo) -> None:
    """Copy rank 0's parameters and buffers to every rank, in place (no-op in one process)."""
    if not info.enabled:
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


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


def all_gather_objects(obj, info: DistInfo) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` in one process). Picklable objects only."""
    if not info.enabled:
        return [obj]
    out: list = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5 has no public DTensor (and no FSDP2, so nothing is one)
        return None
    return DTensor


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind an FSDP2 shard (a collective: every rank must call it); ``t`` itself otherwise."""
    dtensor = _dtensor_type()
    return t.full_tensor() if dtensor is not None and isinstance(t, dtensor) else t


def like_param(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``full`` (a whole tensor of ``param``'s shape) laid out like ``param``: this rank's shard when ``param``
    is an FSDP2 DTensor (every rank passes the same ``full``), else ``full`` on ``param``'s device."""
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(param, dtensor):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(param.device), param.device_mesh, param.placements)
    return full.to(param.device)
