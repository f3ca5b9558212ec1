"""The trainer: AdamW with warm-up + cosine, gradient accumulation and clipping, bf16 autocast on GPU,
aux-loss-free MoE balancing after every step, a progress line, JSONL metrics, atomic checkpoints with
exact resume, Ctrl-C checkpointing, and DDP / FSDP2 through ``torchrun``.

A stage drives it with a *step function* ``loss_fn(model, batch, step) -> LossOutput`` and a *batch
function* ``batches(step, rank, world_size) -> list of micro-batches``: both depend only on the step (and the
rank), never on hidden iterator state, so that a run resumed from a checkpoint sees the same data and gives
the same next loss as a run that never stopped. (Randomness a batch function draws from the global torch /
python generators is restored too: the checkpoint holds their states at the step boundary.)

Loss weighting. ``loss_fn`` returns a per-micro-batch loss, normally a mean over the micro-batch's label
tokens. With ``loss_weighting="tokens"`` (default) micro-batch k of rank r is weighted by n_rk / N (its
``num_tokens`` over the count of the whole step, every micro-batch of every rank), so the step's gradient is the
gradient of the mean over every label token of the global batch, however it is split into micro-batches and
ranks (a plain mean of per-micro-batch means is not: shorter micro-batches would weigh more). ``"mean"`` gives
every micro-batch the same weight (right for losses normalised per sequence or by a constant).

Multi-process (``torchrun``, WORLD_SIZE > 1; gloo on CPU, nccl on CUDA): rank r trains on its share of each
step's batch and the gradients are averaged by DDP (``distributed="ddp"``, the default under torchrun) or
FSDP2 (``"fsdp"``). Under FSDP2 the trainer trains a sharded *copy* of the model: the model the caller passed
stays a plain module; the trained weights are copied back into it before every call of the batch function
(so on-policy rollouts see the current policy), at every checkpoint and at the end (and on Ctrl-C). The copy
costs one full set of weights per rank besides the shards (gradients and AdamW moments stay sharded).

Checkpoint layout (``run_dir/checkpoints/step_<n>/``), written into a temporary directory that is renamed
into place, then ``latest`` (a file holding the directory name) is replaced atomically:

    model/            Hugging Face directory (config.json + model.safetensors), loadable by load_pretrained
                      (a module without ``save_pretrained``: model/model.safetensors of its state dict)
    optimizer.pt      AdamW state keyed by parameter name, whole tensors (loadable into any world size / mode)
    trainer.json      step, python RNG state per rank, stage name, config
    rng.pt            torch CPU (and CUDA) RNG states per rank
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from . import distributed as dist_utils
from .losses import LossOutput


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping of one training run.

    Attributes:
        steps: optimiser steps of the run.
        lr, min_lr_ratio, warmup_steps: linear warm-up to ``lr`` then cosine decay to ``lr * min_lr_ratio``,
            reached by the last step (see :meth:`lr_at`).
        weight_decay, betas, eps: AdamW (matrices decay, vectors do not).
        grad_clip: max global gradient norm (0: off).
        grad_accum: micro-batches per step; the batch function must return this many (checked).
        loss_weighting: "tokens" (each micro-batch weighted by its ``num_tokens`` over the whole step's count,
            all micro-batches of all ranks: the exact global token mean) or "mean" (equal weights).
        autocast: "auto" (bf16 on CUDA, off on CPU), "bf16" or "off".
        routing_bias_gamma: DeepSeek-V3's aux-loss-free bias step (0: off).
        log_every: steps between progress lines; checkpoint_every: steps between checkpoints
            (0: only at the end and on Ctrl-C); keep_checkpoints: how many to keep (the latest always is).
        distributed: None, "ddp" or "fsdp"; under torchrun (WORLD_SIZE > 1) None means "ddp" (ranks that do
            not synchronise gradients would silently train different models).
        seed: seeds torch and python's RNGs at the start (seed + rank; not on resume: the saved states are
            restored).
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
    loss_weighting: str = "tokens"
    autocast: str = "auto"
    routing_bias_gamma: float = 1e-3
    log_every: int = 10
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    distributed: Optional[str] = None
    seed: int = 0

    def __post_init__(self):
        checks = {
            "steps": self.steps >= 0, "warmup_steps": self.warmup_steps >= 0, "grad_accum": self.grad_accum >= 1,
            "keep_checkpoints": self.keep_checkpoints >= 1, "checkpoint_every": self.checkpoint_every >= 0,
            "log_every": self.log_every >= 1, "loss_weighting": self.loss_weighting in ("tokens", "mean"),
            "autocast": self.autocast in ("auto", "bf16", "off"),
            "distributed": self.distributed in (None,) + dist_utils.MODES,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError("TrainConfig: invalid " + ", ".join(f"{k}={getattr(self, k)!r}" for k in bad)
                             + " (steps, warmup_steps, checkpoint_every >= 0; grad_accum, keep_checkpoints, log_every"
                             " >= 1; loss_weighting 'tokens'|'mean'; autocast 'auto'|'bf16'|'off'; distributed"
                             " None|'ddp'|'fsdp')")

    def lr_at(self, step: int) -> float:
        """Learning rate of optimiser step ``step`` (0-based): ``lr * (step + 1) / warmup_steps`` during the
        warm-up, then a half cosine from ``lr`` (the first step after warm-up) to ``lr * min_lr_ratio`` (the
        last step, ``steps - 1``)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = self.steps - 1 - self.warmup_steps  # decay steps after the first post-warm-up one
        t = 1.0 if span <= 0 else min(1.0, (step - self.warmup_steps) / span)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


class _LossModule(nn.Module):
    """Holds the model so that DDP / FSDP2 hooks fire around the whole loss computation. ``loss_fn`` is a plain
    attribute, replaceable without re-wrapping (FSDP2 cannot shard a module twice)."""

    def __init__(self, model: nn.Module, loss_fn: Callable):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch, step: int) -> LossOutput:
        return self.loss_fn(self.model, batch, step)


class _Interrupts:
    """SIGINT (Ctrl-C) handling of a training loop.

    One process: the handler raises KeyboardInterrupt at once, except inside :meth:`critical` (the optimiser
    step, the bias update and the step count), where it is only recorded, so a checkpoint never holds half an
    update; the loop then stops after logging that step. Several processes: the interrupt is only recorded; the
    trainer sums the flag over ranks after each step and every rank stops at the same step boundary (an FSDP
    checkpoint needs every rank). A second Ctrl-C more than a second after the first raises at once wherever it
    lands.
    """

    def __init__(self, deferred: bool):
        self.deferred = deferred
        self.pending = False
        self._first = 0.0
        self._depth = 0

    @contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():  # handlers live in the main thread only
            yield
            return
        previous = signal.signal(signal.SIGINT, self._handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)
            self.pending = False

    def _handler(self, signum, frame) -> None:
        now = time.monotonic()
        if self.pending and now - self._first > 1.0:
            raise KeyboardInterrupt
        if not self.pending:
            self.pending, self._first = True, now
        if not self.deferred and self._depth == 0:
            self.pending = False
            raise KeyboardInterrupt

    @contextmanager
    def critical(self) -> Iterator[None]:
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: str) -> None:
    """Make a rename inside ``path`` durable (where the platform allows opening a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _capture_rng() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


class Trainer:
    """Runs a stage's training loop. See the module docstring for the step and batch functions.

    Args:
        model: a :class:`r1kernels.Transformer` (or any module; one without ``save_pretrained`` is checkpointed
            as a safetensors state dict).
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
        self.mode = (config.distributed or "ddp") if self.info.enabled else None
        self.run_dir = run_dir
        self.progress = progress and self.info.is_main
        self.step = 0
        self.history: list[dict] = []
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self._train_model: nn.Module = model  # the module the optimiser updates (a sharded copy under FSDP)
        self._loss_module: Optional[_LossModule] = None
        self._wrapped: Optional[nn.Module] = None
        self._pending_optimizer: Optional[dict] = None  # from resume(), loaded once the optimiser exists
        self._resumed = False
        self._saved_step = -1  # the step of the last checkpoint this trainer wrote or loaded
        self._synced_step = 0  # under FSDP: the step whose weights self.model holds
        self._boundary_rng: Optional[tuple[int, dict]] = None  # (step, RNG states when that step's batch began)
        self._interrupts = _Interrupts(deferred=self.info.enabled)
        self._stop_requested = False
        if run_dir and self.info.is_main:
            os.makedirs(run_dir, exist_ok=True)

    # ------------------------------------------------------------------ set-up
    def _setup(self, loss_fn: Callable) -> None:
        if self._wrapped is None:
            if self.mode == "fsdp":
                dist_utils.broadcast_module_(self.model, self.info)
                self._train_model = copy.deepcopy(self.model)
                self._synced_step = self.step
            m = self._train_model
            blocks = list(getattr(m, "layers", [])) + [k.block for k in getattr(m, "mtp", []) if hasattr(k, "block")]
            self._loss_module = _LossModule(m, loss_fn)
            self._wrapped = dist_utils.wrap(self._loss_module, self.mode, self.info, blocks)
            self._make_optimizer()  # after wrapping: FSDP2 replaces the parameters with sharded ones
            if self._pending_optimizer is not None:
                self._load_optimizer_state(self._pending_optimizer)
                self._pending_optimizer = None
        self._loss_module.loss_fn = loss_fn

    def _make_optimizer(self) -> None:
        """AdamW; matrices decay, vectors (norm weights, biases) do not."""
        params = [p for p in self._train_model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            [dict(params=[p for p in params if p.dim() >= 2], weight_decay=self.config.weight_decay),
             dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)],
            lr=self.config.lr, betas=tuple(self.config.betas), eps=self.config.eps)

    def _autocast(self):
        mode = self.config.autocast
        on = mode == "bf16" or (mode == "auto" and self.device.type == "cuda")
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=on)

    def _routers(self) -> list:
        return [m for m in self._train_model.modules() if hasattr(m, "update_bias") and hasattr(m, "tokens_per_expert")]

    # ------------------------------------------------------------------ one step
    def _micro_weights(self, micro_batches: list) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w [n], tokens)``: the weight of each micro-batch's loss in this rank's objective, scaled so that the
        ranks' average (what DDP / FSDP do to gradients) is the step's loss; and the step's label-token count
        over all ranks (0-d)."""
        n, world = len(micro_batches), self.info.world_size
        counts = torch.tensor([float(getattr(mb, "num_tokens", 0) or 0) for mb in micro_batches], device=self.device)
        total = dist_utils.all_reduce_sum_(counts.sum(), self.info)
        equal = torch.full_like(counts, 1.0 / n)
        if self.config.loss_weighting == "mean":
            return equal, total
        # no counts at all (micro-batches without num_tokens, or every label ignored): equal weights
        return torch.where(total > 0, counts * world / total.clamp_min(1.0), equal), total

    def train_step(self, micro_batches: list, loss_fn: Callable) -> dict:
        """One optimiser step over ``micro_batches`` (weighted as ``config.loss_weighting`` says, over them and
        over ranks). Returns the step's metrics: the loss and its parts (weighted over the global batch), lr,
        grad norm, step time and label tokens per second (all ranks)."""
        cfg = self.config
        n = len(micro_batches)
        if n != cfg.grad_accum:
            raise ValueError(f"{self.name}: the batch function returned {n} micro-batch(es) for step {self.step}, "
                             f"config.grad_accum is {cfg.grad_accum}")
        self._setup(loss_fn)
        lr = cfg.lr_at(self.step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        model = self._train_model
        model.train()
        # what an interrupted step may have left: gradients, load counts (the bias update uses this step's loads)
        self.optimizer.zero_grad(set_to_none=True)
        for r in self._routers():
            r.tokens_per_expert.zero_()
        t0 = time.perf_counter()
        weights, tokens = self._micro_weights(micro_batches)
        sums: dict = {}
        for k, mb in enumerate(micro_batches):
            with dist_utils.grad_sync(self._wrapped, k == n - 1):
                with self._autocast():
                    out = self._wrapped(mb, self.step)
                (out.total * weights[k]).backward()
            for key, v in {"loss": out.total, **out.parts}.items():
                sums[key] = sums.get(key, 0.0) + v.detach().float() * weights[k] / self.info.world_size
        params = [p for p in model.parameters() if p.requires_grad]
        grad_norm = (torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip > 0
                     else torch.zeros((), device=self.device))
        with self._interrupts.critical():
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if cfg.routing_bias_gamma > 0:
                self._update_routing_biases(cfg.routing_bias_gamma)
            self.step += 1
        keys = sorted(sums)
        flag = torch.tensor([1.0 if self._interrupts.pending else 0.0], device=self.device)
        packed = torch.cat([torch.stack([sums[k] for k in keys]).reshape(-1), flag])  # one all-reduce for all
        dist_utils.all_reduce_sum_(packed, self.info)
        values = packed.tolist()  # the step's one host sync, for logging
        self._stop_requested = values[-1] > 0
        dt = time.perf_counter() - t0
        metrics = dict(zip(keys, values[:-1]))
        metrics.update(step=self.step, lr=lr, grad_norm=float(dist_utils.full_tensor(grad_norm)), step_s=dt,
                       tokens=int(tokens), tokens_per_s=float(tokens) / dt if dt > 0 else 0.0)
        return metrics

    def _update_routing_biases(self, gamma: float) -> None:
        """Aux-loss-free balancing from the loads of all ranks (summed first, so the replicas' biases stay
        identical): one all-reduce for every router, then each router's update."""
        routers = self._routers()
        if not routers:
            return
        if self.info.enabled:
            flat = torch.cat([r.tokens_per_expert for r in routers])
            dist_utils.all_reduce_sum_(flat, self.info)
            for r, part in zip(routers, flat.split([r.tokens_per_expert.numel() for r in routers])):
                r.tokens_per_expert.copy_(part)
        for r in routers:
            r.update_bias(gamma)

    # ------------------------------------------------------------------ the loop
    def fit(self, batches: Callable[[int, int, int], list], loss_fn: Callable,
            on_step: Optional[Callable[[dict], None]] = None) -> list[dict]:
        """Train until ``config.steps``, from ``self.step`` (0, or where :meth:`resume` left off).

        ``on_step(metrics)`` may add entries to the metrics (e.g. a stage's reward) before they are logged.
        Ctrl-C (KeyboardInterrupt) writes a checkpoint of the last finished step, then re-raises; under
        torchrun every rank must receive it (torchrun forwards it) and they stop together after a step.
        When fit returns (or raises KeyboardInterrupt), ``model`` holds the trained weights.
        """
        cfg = self.config
        if self.step == 0 and not self._resumed:
            torch.manual_seed(cfg.seed + self.info.rank)
            random.seed(cfg.seed + self.info.rank)
        t_start = time.perf_counter()
        with self._interrupts.installed():
            try:
                while self.step < cfg.steps:
                    self._sync_model()  # the batch function may use the model (rollouts)
                    self._boundary_rng = (self.step, _capture_rng())
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
                    if self._stop_requested:
                        raise KeyboardInterrupt
            except KeyboardInterrupt:
                self._interrupts.pending = False
                self._sync_model()
                if self.run_dir:
                    path = self.save_checkpoint()
                    if self.info.is_main:
                        print(f"\n{self.name}: interrupted after step {self.step}; checkpoint {path}", file=sys.stderr)
                raise
        self._sync_model()
        if self.run_dir:
            self.save_checkpoint()
        return self.history

    def _sync_model(self) -> None:
        """Under FSDP: copy the trained weights (and buffers: the routing biases) into ``self.model`` — a
        collective, every rank calls it at the same points. Nothing to do otherwise, or when up to date."""
        if self.mode != "fsdp" or self._wrapped is None or self._synced_step == self.step:
            return
        with torch.no_grad():
            shards = dict(self._train_model.named_parameters())
            for name, p in self.model.named_parameters():
                p.copy_(dist_utils.full_tensor(shards[name]))
            bufs = dict(self._train_model.named_buffers())
            for name, b in self.model.named_buffers():
                b.copy_(bufs[name])
        self._synced_step = self.step

    def _log(self, metrics: dict) -> None:
        if self.run_dir and self.info.is_main:
            with open(os.path.join(self.run_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(metrics) + "\n")

    def _print_progress(self, m: dict, elapsed: float) -> None:
        cfg = self.config
        width = 20
        done = int(width * self.step / max(1, cfg.steps))
        extra = "".join(f" {k} {m[k]:.3f}" for k in ("reward", "accuracy") if k in m)
        eta = elapsed / max(1, len(self.history)) * (cfg.steps - self.step)
        print(f"[{self.name}] [{'#' * done}{'.' * (width - done)}] {self.step}/{cfg.steps} loss {m['loss']:.4f}"
              f"{extra} lr {m['lr']:.2e} {m['tokens_per_s']:,.0f} tok/s eta {eta:.0f}s", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ checkpoints
    def _param_names(self) -> dict:
        return {id(p): n for n, p in self._train_model.named_parameters()}

    def _optimizer_state(self) -> dict:
        """The optimiser state keyed by parameter name, whole tensors on the CPU (a collective under FSDP)."""
        if self.optimizer is None:
            return {"state": {}, "param_groups": []}
        names = self._param_names()
        order = [p for g in self.optimizer.param_groups for p in g["params"]]
        sd = self.optimizer.state_dict()
        state = {names[id(order[i])]: {k: dist_utils.full_tensor(v).detach().cpu() if torch.is_tensor(v) else v
                                       for k, v in s.items()}
                 for i, s in sd["state"].items()}
        groups = [dict(g, params=[names[id(order[i])] for i in g["params"]]) for g in sd["param_groups"]]
        return {"state": state, "param_groups": groups}

    def _load_optimizer_state(self, saved: dict) -> None:
        """Inverse of :meth:`_optimizer_state` into the current optimiser (sharding the moments under FSDP)."""
        names = self._param_names()
        groups = self.optimizer.param_groups
        if not saved["param_groups"]:
            return
        current = [[names[id(p)] for p in g["params"]] for g in groups]
        stored = [list(g["params"]) for g in saved["param_groups"]]
        if len(stored) != len(current) or any(set(a) != set(b) for a, b in zip(stored, current)):
            missing = sorted(set(sum(current, [])) - set(sum(stored, [])))
            extra = sorted(set(sum(stored, [])) - set(sum(current, [])))
            raise ValueError(f"{self.name}: the checkpoint's optimizer state does not match the model's parameters "
                             f"(missing: {missing[:8]}, unexpected: {extra[:8]}, "
                             f"groups {len(stored)} vs {len(current)})")
        index, pos = {}, 0
        for g in groups:
            for p in g["params"]:
                index[names[id(p)]] = (pos, p)
                pos += 1
        state = {}
        for name, s in saved["state"].items():
            i, p = index[name]
            state[i] = {k: dist_utils.like_param(v, p) if torch.is_tensor(v) and v.dim() > 0 and v.shape == p.shape
                        else v for k, v in s.items()}
        hyper, pos = [], 0
        for g_saved, g in zip(saved["param_groups"], groups):
            hyper.append(dict(g_saved, params=list(range(pos, pos + len(g["params"])))))
            pos += len(g["params"])
        self.optimizer.load_state_dict({"state": state, "param_groups": hyper})

    def _checkpoint_root(self) -> str:
        return os.path.join(self.run_dir, "checkpoints")

    def save_checkpoint(self) -> Optional[str]:
        """Write ``checkpoints/step_<n>`` atomically and point ``latest`` at it; returns its path (on rank 0).

        Every rank must call it (the weights, optimiser moments and RNG states are gathered). A checkpoint of
        the current step that this trainer already wrote is not rewritten. An exception or a crash while
        writing leaves the previous checkpoints and ``latest`` as they were, and no ``step_*`` directory half
        written (the work happens in ``checkpoints/.tmp-step_<n>``, renamed into place when complete).
        """
        if not self.run_dir:
            return None
        root = self._checkpoint_root()
        name = f"step_{self.step:06d}"
        final = os.path.join(root, name)
        if self._saved_step == self.step:  # (decided alike on every rank: the gathers below are collectives)
            return final if self.info.is_main else None
        self._sync_model()
        optim_sd = self._optimizer_state()
        if self._boundary_rng is not None and self._boundary_rng[0] == self.step:
            rng = self._boundary_rng[1]  # interrupted inside the next step: the states when it began
        else:
            rng = _capture_rng()
        rngs = dist_utils.all_gather_objects(rng, self.info)
        if self.info.is_main:
            os.makedirs(root, exist_ok=True)
            for d in os.listdir(root):  # left by a crash during an earlier save
                if d.startswith(".tmp-"):
                    shutil.rmtree(os.path.join(root, d), ignore_errors=True)
            tmp = os.path.join(root, f".tmp-{name}")
            os.makedirs(tmp)
            try:
                self._write_checkpoint(tmp, optim_sd, rngs)
                self._commit(tmp, final)
                _atomic_write_text(os.path.join(root, "latest"), name)
                _fsync_dir(root)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            self._prune(root, name)
        self._saved_step = self.step
        return final if self.info.is_main else None

    def _write_checkpoint(self, tmp: str, optim_sd: dict, rngs: list) -> None:
        model_dir = os.path.join(tmp, "model")
        if hasattr(self.model, "save_pretrained"):
            self.model.save_pretrained(model_dir)
        else:
            from safetensors.torch import save_file

            os.makedirs(model_dir)
            save_file({k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
                      os.path.join(model_dir, "model.safetensors"))
        torch.save(optim_sd, os.path.join(tmp, "optimizer.pt"))
        torch.save([{k: v for k, v in r.items() if k != "python"} for r in rngs], os.path.join(tmp, "rng.pt"))
        state = {"step": self.step, "name": self.name, "world_size": self.info.world_size,
                 "python_rng": [_jsonable(r["python"]) for r in rngs], "config": asdict(self.config)}
        _atomic_write_text(os.path.join(tmp, "trainer.json"), json.dumps(state))
        _fsync_dir(tmp)

    @staticmethod
    def _commit(tmp: str, final: str) -> None:
        """Move the complete ``tmp`` to ``final``. A ``final`` already there (the same step of an earlier run)
        is swapped out atomically where the OS allows, so ``latest`` never names a missing directory."""
        if not os.path.exists(final):
            os.rename(tmp, final)
            return
        from ..model.checkpoint import _exchange_dirs

        if _exchange_dirs(tmp, final):
            shutil.rmtree(tmp)  # now the old one
            return
        old = f"{final}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)

    def _prune(self, root: str, latest: str) -> None:
        """Keep ``latest`` and the newest others (by step), ``keep_checkpoints`` in all."""
        steps = sorted((d for d in os.listdir(root) if d.startswith("step_") and d[5:].isdigit() and d != latest),
                       key=lambda d: int(d[5:]))
        keep_others = max(0, self.config.keep_checkpoints - 1)
        for old in steps[:len(steps) - keep_others]:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)

    def latest_checkpoint(self) -> Optional[str]:
        """The directory ``latest`` names, or None when there is none."""
        if not self.run_dir:
            return None
        path = os.path.join(self._checkpoint_root(), "latest")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return os.path.join(self._checkpoint_root(), f.read().strip())

    def resume(self, path: Optional[str] = None) -> bool:
        """Load a checkpoint (``path``, default ``run_dir``'s latest): model weights and routing biases, optimiser
        state, RNG states and step. Returns False when there is none. Call it before :meth:`fit`, on every rank.
        A checkpoint loads into any world size and mode (its tensors are whole); the RNG states are exact when
        the world size is the one it was written with. Under ``run_dir``, ``metrics.jsonl`` loses the lines of
        this stage past the checkpoint's step (an interrupted run's later steps are trained again)."""
        if self._wrapped is not None:
            raise RuntimeError(f"{self.name}: resume() must come before the first training step")
        if path is None:
            path = self.latest_checkpoint()
            if path is None:
                return False
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{self.name}: checkpoint directory {path} does not exist")
        self._load_weights(os.path.join(path, "model"))
        self._pending_optimizer = torch.load(os.path.join(path, "optimizer.pt"), weights_only=True, map_location="cpu")
        with open(os.path.join(path, "trainer.json")) as f:
            state = json.load(f)
        rank = self.info.rank if self.info.rank < len(state["python_rng"]) else 0
        rng = torch.load(os.path.join(path, "rng.pt"), weights_only=True)[rank]
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        random.setstate(_from_jsonable(state["python_rng"][rank]))
        self.step = self._saved_step = self._synced_step = int(state["step"])
        self._resumed = True
        self._truncate_metrics()
        return True

    def _load_weights(self, model_dir: str) -> None:
        if os.path.exists(os.path.join(model_dir, "config.json")):
            from ..model.checkpoint import load_pretrained

            loaded = load_pretrained(model_dir, dtype=None, device="cpu").state_dict()
        else:
            from safetensors.torch import load_file

            loaded = load_file(os.path.join(model_dir, "model.safetensors"))
        own = self.model.state_dict()
        missing = sorted(set(own) - set(loaded))
        if missing:
            raise ValueError(f"{self.name}: checkpoint {model_dir} lacks {len(missing)} tensor(s) of the model: "
                             f"{missing[:8]}")
        with torch.no_grad():
            for name, t in own.items():
                t.copy_(loaded[name].to(t.dtype))

    def _truncate_metrics(self) -> None:
        if not (self.run_dir and self.info.is_main):
            return
        path = os.path.join(self.run_dir, "metrics.jsonl")
        if not os.path.exists(path):
            return
        kept = []
        with open(path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:  # a line cut short by a crash
                    continue
                if not (rec.get("stage") == self.name and rec.get("step", 0) > self.step):
                    kept.append(json.dumps(rec) + "\n")
        _atomic_write_text(path, "".join(kept))


def _jsonable(state):
    return [_jsonable(x) for x in state] if isinstance(state, (tuple, list)) else state


def _from_jsonable(state):
    return tuple(_from_jsonable(x) for x in state) if isinstance(state, list) else state
