"""The trainer: AdamW with warm-up + cosine, gradient accumulation and clipping, bf16 autocast on GPU,
aux-loss-free MoE balancing after every step, a progress line, JSONL metrics, atomic checkpoints with
exact resume, Ctrl-C checkpointing, and DDP / FSDP2 through ``torchrun``.

A stage drives it with a *step function* ``loss_fn(model, batch, step) -> LossOutput`` and a *batch
function* ``batches(step, rank, world_size) -> list of micro-batches``: both depend only on the step (and the
rank), never on hidden iterator state, so that a run resumed from a checkpoint sees the same data and gives
the same next loss as a run that never stopped.

Checkpoint layout (``run_dir/checkpoints/step_<n>/``), written into a temporary directory that is renamed
into place, then ``latest`` (a file holding the directory name) is replaced atomically:

    model/            Hugging Face directory (config.json + model.safetensors), loadable by load_pretrained
    optimizer.pt      AdamW state (torch.save of tensors and plain containers; loaded with weights_only)
    trainer.json      step, python RNG state, metrics so far
    rng.pt            torch CPU (and CUDA) RNG states
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
from torch import nn

from . import distributed as dist_utils
from .losses import LossOutput


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping of one training run.

    Attributes:
        steps: optimiser steps of the run.
        lr, min_lr_ratio, warmup_steps: linear warm-up to ``lr`` then cosine decay to ``lr * min_lr_ratio``.
        weight_decay, betas, eps: AdamW.
        grad_clip: max global gradient norm (0: off).
        grad_accum: micro-batches per step (the batch function returns this many).
        autocast: "auto" (bf16 on CUDA, off on CPU), "bf16" or "off".
        routing_bias_gamma: DeepSeek-V3's aux-loss-free bias step (0: off).
        log_every: steps between progress lines / metric flushes; checkpoint_every: steps between checkpoints
            (0: only at the end and on Ctrl-C); keep_checkpoints: how many to keep.
        distributed: None, "ddp" or "fsdp" (effective under torchrun with WORLD_SIZE > 1).
        seed: seeds torch and python's RNGs at the start (not on resume: the saved states are restored).
    """

    steps: int = 100
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    grad_accum: int = 1
    autocast: str = "auto"
    routing_bias_gamma: float = 1e-3
    log_every: int = 10
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    distributed: Optional[str] = None
    seed: int = 0

    def lr_at(self, step: int) -> float:
        """Learning rate of optimiser step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, self.steps - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / span)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


class _LossModule(nn.Module):
    """Holds the model so that DDP / FSDP2 hooks fire around the whole loss computation."""

    def __init__(self, model: nn.Module, loss_fn: Callable):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch, step: int) -> LossOutput:
        return self.loss_fn(self.model, batch, step)


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Trainer:
    """Runs a stage's training loop. See the module docstring for the step and batch functions.

    Args:
        model: a :class:`r1kernels.Transformer` (or any module whose ``save_pretrained`` writes a directory).
        config: :class:`TrainConfig`.
        run_dir: where ``metrics.jsonl`` and ``checkpoints/`` go (created); None: nothing is written.
        name: the stage name shown in the progress line and the metrics.
        progress: print a progress line every ``log_every`` steps (rank 0 only).
    """

    def __init__(self, model: nn.Module, config: TrainConfig, run_dir: Optional[str] = None, *, name: str = "train",
                 progress: bool = True):
        self.model, self.config, self.name = model, config, name
        self.device = next(model.parameters()).device
        self.info = dist_utils.init_from_env(self.device)
        self.run_dir = run_dir
        self.progress = progress and self.info.is_main
        self.step = 0
        self.history: list[dict] = []
        self._wrapped: Optional[nn.Module] = None
        self._loss_fn: Optional[Callable] = None
        if run_dir and self.info.is_main:
            os.makedirs(run_dir, exist_ok=True)
        self.optimizer: Optional[torch.optim.Optimizer] = None

    # ------------------------------------------------------------------ set-up
    def _setup(self, loss_fn: Callable) -> None:
        if self._wrapped is not None and self._loss_fn is loss_fn:
            return
        blocks = list(getattr(self.model, "layers", [])) + [m.block for m in getattr(self.model, "mtp", [])]
        self._wrapped = dist_utils.wrap(_LossModule(self.model, loss_fn), self.config.distributed, self.info, blocks)
        self._loss_fn = loss_fn
        if self.optimizer is None:
            self._make_optimizer()  # after wrapping: FSDP2 replaces the parameters with sharded ones

    def _autocast(self):
        mode = self.config.autocast
        on = mode == "bf16" or (mode == "auto" and self.device.type == "cuda")
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=on)

    # ------------------------------------------------------------------ one step
    def train_step(self, micro_batches: list, loss_fn: Callable) -> dict:
        """One optimiser step over ``micro_batches`` (gradients averaged over them and over ranks).
        Returns the step's metrics (rank-averaged loss parts, lr, grad norm, tokens/s)."""
        self._setup(loss_fn)
        cfg = self.config
        lr = cfg.lr_at(self.step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.model.train()
        t0 = time.perf_counter()
        sums: dict = {}
        tokens = 0
        n = len(micro_batches)
        if n == 0:
            raise ValueError(f"{self.name}: the batch function returned no micro-batch for step {self.step}")
        for mb in micro_batches:
            with self._autocast():
                out = self._wrapped(mb, self.step)
            (out.total / n).backward()
            for k, v in {"loss": out.total.detach(), **out.parts}.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float() / n
            tokens += int(getattr(mb, "num_tokens", 0) or 0)
        grad_norm = (torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                     if cfg.grad_clip > 0 else torch.zeros(()))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if cfg.routing_bias_gamma > 0:
            self._update_routing_biases(cfg.routing_bias_gamma)
        self.step += 1
        dt = time.perf_counter() - t0
        metrics = {k: float(dist_utils.all_reduce_mean(v, self.info)) for k, v in sums.items()}
        metrics.update(step=self.step, lr=lr, grad_norm=float(grad_norm), step_s=dt,
                       tokens_per_s=tokens * self.info.world_size / dt if dt > 0 else 0.0)
        return metrics

    def _update_routing_biases(self, gamma: float) -> None:
        """Aux-loss-free balancing from the loads of all ranks (summed first, so replicas stay identical)."""
        for mod in self.model.modules():
            if hasattr(mod, "update_bias") and hasattr(mod, "tokens_per_expert"):
                dist_utils.all_reduce_sum_(mod.tokens_per_expert, self.info)
                mod.update_bias(gamma)

    # ------------------------------------------------------------------ the loop
    def fit(self, batches: Callable[[int, int, int], list], loss_fn: Callable,
            on_step: Optional[Callable[[dict], None]] = None) -> list[dict]:
        """Train until ``config.steps``, from ``self.step`` (0, or where :meth:`resume` left off).

        ``on_step(metrics)`` may add entries to the metrics (e.g. a stage's reward) before they are logged.
        Ctrl-C (KeyboardInterrupt) writes a checkpoint of the last finished step, then re-raises.
        """
        cfg = self.config
        if self.step == 0:
            torch.manual_seed(cfg.seed + self.info.rank)
            random.seed(cfg.seed + self.info.rank)
        t_start = time.perf_counter()
        try:
            while self.step < cfg.steps:
                metrics = self.train_step(batches(self.step, self.info.rank, self.info.world_size), loss_fn)
                if on_step is not None:
                    on_step(metrics)
                metrics["stage"] = self.name
                self.history.append(metrics)
                self._log(metrics)
                if self.progress and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                    self._print_progress(metrics, time.perf_counter() - t_start)
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                    self.save_checkpoint()
        except KeyboardInterrupt:
            if self.run_dir:
                path = self.save_checkpoint()
                if self.info.is_main:
                    print(f"\n{self.name}: interrupted at step {self.step}; checkpoint saved to {path}", file=sys.stderr)
            raise
        if self.run_dir:
            self.save_checkpoint()
        return self.history

    def _log(self, metrics: dict) -> None:
        if self.run_dir and self.info.is_main:
            with open(os.path.join(self.run_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(metrics) + "\n")

    def _print_progress(self, m: dict, elapsed: float) -> None:
        cfg = self.config
        width = 20
        done = int(width * self.step / cfg.steps)
        extra = "".join(f" {k} {m[k]:.3f}" for k in ("reward", "accuracy") if k in m)
        eta = elapsed / max(1, self.step) * (cfg.steps - self.step)
        print(f"[{self.name}] [{'#' * done}{'.' * (width - done)}] {self.step}/{cfg.steps} loss {m['loss']:.4f}"
              f"{extra} lr {m['lr']:.2e} {m['tokens_per_s']:,.0f} tok/s eta {eta:.0f}s", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ checkpoints
    def _state_dicts(self) -> tuple[dict, dict]:
        """Full (unsharded) model and optimizer state dicts, on the CPU."""
        if self.info.enabled and self.config.distributed == "fsdp":
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                                 get_optimizer_state_dict)

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return (get_model_state_dict(self.model, options=opts),
                    get_optimizer_state_dict(self.model, self.optimizer, options=opts))
        return self.model.state_dict(), (self.optimizer.state_dict() if self.optimizer else {})

    def save_checkpoint(self) -> Optional[str]:
        """Write ``checkpoints/step_<n>`` atomically and point ``latest`` at it; returns its path (rank 0)."""
        if not self.run_dir:
            return None
        model_sd, optim_sd = self._state_dicts()  # collective under FSDP: every rank calls it
        if not self.info.is_main:
            return None
        root = os.path.join(self.run_dir, "checkpoints")
        os.makedirs(root, exist_ok=True)
        name = f"step_{self.step:06d}"
        final = os.path.join(root, name)
        tmp = os.path.join(root, f".tmp-{name}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        self._save_model(model_sd, os.path.join(tmp, "model"))
        torch.save(optim_sd, os.path.join(tmp, "optimizer.pt"))
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, os.path.join(tmp, "rng.pt"))
        state = {"step": self.step, "python_rng": _jsonable(random.getstate()), "name": self.name,
                 "config": asdict(self.config)}
        _atomic_write_text(os.path.join(tmp, "trainer.json"), json.dumps(state))
        if os.path.exists(final):  # re-saving the same step (e.g. Ctrl-C right after a periodic save)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _atomic_write_text(os.path.join(root, "latest"), name)
        kept = sorted(d for d in os.listdir(root) if d.startswith("step_"))
        for old in kept[:-max(1, self.config.keep_checkpoints)]:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
        return final

    def _save_model(self, state_dict: dict, path: str) -> None:
        from ..model.checkpoint import save_pretrained

        if hasattr(self.model, "config"):
            # a full copy of the model for saving (the live one may be sharded)
            from ..model import Transformer

            with torch.device("meta"):
                clone = Transformer(self.model.config)
            clone.to_empty(device="cpu")
            clone.load_state_dict({k: v.detach().cpu() for k, v in state_dict.items()})
            clone.reset_derived_buffers()
            save_pretrained(clone, path)
        else:
            torch.save(state_dict, os.path.join(path, "model.pt"))

    def resume(self, path: Optional[str] = None) -> bool:
        """Load the latest checkpoint of ``run_dir`` (or ``path``): model, optimizer, RNG states and step.
        Returns False when there is none. Call it before :meth:`fit` (not supported under FSDP)."""
        if self._wrapped is not None or (self.info.enabled and self.config.distributed == "fsdp"):
            raise RuntimeError(f"{self.name}: resume() must come before fit() and is not supported under FSDP")
        root = os.path.join(self.run_dir or "", "checkpoints")
        if path is None:
            latest = os.path.join(root, "latest")
            if not os.path.exists(latest):
                return False
            path = os.path.join(root, open(latest).read().strip())
        from ..model.checkpoint import load_pretrained

        loaded = load_pretrained(os.path.join(path, "model"), dtype=None, device="cpu")
        sd = loaded.state_dict()
        with torch.no_grad():
            for name, t in self.model.state_dict().items():
                if name in sd:
                    t.copy_(sd[name].to(t.dtype))
        self._make_optimizer()
        optim_sd = torch.load(os.path.join(path, "optimizer.pt"), weights_only=True, map_location=self.device)
        self.optimizer.load_state_dict(optim_sd)
        rng = torch.load(os.path.join(path, "rng.pt"), weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        state = json.load(open(os.path.join(path, "trainer.json")))
        random.setstate(_from_jsonable(state["python_rng"]))
        self.step = int(state["step"])
        return True

    def _make_optimizer(self) -> None:
        """AdamW; matrices decay, vectors (norm weights, biases) do not."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            [dict(params=[p for p in params if p.dim() >= 2], weight_decay=self.config.weight_decay),
             dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)],
            lr=self.config.lr, betas=tuple(self.config.betas), eps=self.config.eps)


def _jsonable(state):
    return [_jsonable(x) for x in state] if isinstance(state, (tuple, list)) else state


def _from_jsonable(state):
    return tuple(_from_jsonable(x) for x in state) if isinstance(state, list) else state
