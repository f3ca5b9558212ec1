"""The training stages of the R1 recipe, each usable alone: supervised fine-tuning (cold start,
rejection-sampling SFT, distillation by SFT and logit KD) and GRPO.

Letters: B sequences, S padded length, D hidden, V vocabulary, G group size (completions per prompt).

GRPO (DeepSeekMath section 4.1, R1 section 2.2): for each prompt, G completions are sampled through the
generation engine (and its sampling kernel); rewards are rule-based (accuracy by the task's verifier, format,
optional safety/length); the advantage of completion i is (r_i - mean_G r) / (std_G r + eps); the policy
loss is the clipped ratio objective with the k3 KL to a frozen reference model (``ops.grpo_loss``), over
per-token log-probabilities from ``ops.fused_linear_logprobs`` (no [B·S, V] logits).
"""
from __future__ import annotations

import copy
import dataclasses
import random
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from ..ops import fused_linear_kd_loss, fused_linear_logprobs, grpo_loss
from ..training import IGNORE_INDEX, LossConfig, LossOutput, causal_lm_loss
from ..training.trainer import TrainConfig, Trainer
from .data import Batch, collate, encode_pair
from .evaluate import complete
from .rewards import RewardFn, SafetyChecker, accuracy_reward, format_reward
from .tasks import Sample


def sft_batches(pairs: Sequence[tuple], batch_size: int, pad_id: int, seed: int, device, grad_accum: int = 1) -> Callable:
    """The batch function of an SFT stage: step s draws ``batch_size`` pairs with ``Random(seed, s)``; under
    torchrun rank r takes its own slice of the step's draw (so 2 ranks x B/2 = 1 rank x B), split into
    ``grad_accum`` micro-batches."""
    def batches(step: int, rank: int, world: int) -> list:
        rng = random.Random(seed * 1_000_003 + step)
        draw = [pairs[rng.randrange(len(pairs))] for _ in range(batch_size)]
        share = draw[rank::world]
        return [collate(share[i::grad_accum], pad_id, device) for i in range(grad_accum)]
    return batches


def sft(model, tokenizer, samples: Sequence[Sample], config: TrainConfig, *, losses: LossConfig = LossConfig(),
        batch_size: int = 32, max_len: int = 128, run_dir: Optional[str] = None, name: str = "sft",
        completions: Optional[Sequence[str]] = None, on_step: Optional[Callable] = None) -> list[dict]:
    """Supervised fine-tuning on ``prompt -> solution`` pairs (or ``completions`` when given): cross entropy
    on the completion tokens plus the auxiliary losses in ``losses`` (MTP, early exit, MoE balance).
    Returns the per-step metrics."""
    texts = completions if completions is not None else [s.solution for s in samples]
    pairs = [encode_pair(tokenizer, s.prompt, c, max_len) for s, c in zip(samples, texts)]
    if not pairs:
        raise ValueError(f"{name}: no training samples")
    device = next(model.parameters()).device

    def loss_fn(m, batch: Batch, step: int) -> LossOutput:
        # LayerSkip's curriculum in its simplest form: the early-exit weight ramps up over the first quarter
        ramp = min(1.0, (step + 1) / max(1, config.steps // 4))
        return causal_lm_loss(m, batch.input_ids, batch.labels, losses, exit_scale=ramp)

    trainer = Trainer(model, config, run_dir, name=name)
    return trainer.fit(sft_batches(pairs, batch_size, tokenizer.pad_id, config.seed, device, config.grad_accum),
                       loss_fn, on_step)


# ---------------------------------------------------------------------------------------------- GRPO
@dataclass
class GRPOConfig:
    """GRPO hyper-parameters (R1-Zero used G = 16, ε = 10, β = 0.001 at scale; the tiny model needs less).

    Attributes:
        prompts_per_step: prompts per optimiser step; group_size: G completions per prompt.
        epsilon / epsilon_high: clip range of the ratio; beta: KL weight; loss_type: "grpo" | "dr_grpo" | "dapo".
        temperature / top_p: rollout sampling; max_new_tokens: rollout length cap.
        updates_per_rollout: optimiser steps on one batch of rollouts (1: on-policy, the ratio is 1).
    """

    prompts_per_step: int = 16
    group_size: int = 8
    epsilon: float = 0.2
    epsilon_high: Optional[float] = None
    beta: float = 0.04
    loss_type: str = "grpo"
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    max_len: int = 160


@dataclass
class Rollouts:
    """One step's rollouts: ``input_ids [B, S]`` (prompt + completion, right-padded), ``mask [B, S-1]`` (the
    positions whose next token is a completion token), ``old_logprobs`` / ``ref_logprobs [B, S-1]``,
    ``advantages [B]``, ``rewards [B]``, ``correct [B]`` and ``formatted [B]``."""

    input_ids: torch.Tensor
    mask: torch.Tensor
    old_logprobs: torch.Tensor
    ref_logprobs: Optional[torch.Tensor]
    advantages: torch.Tensor
    rewards: torch.Tensor
    correct: torch.Tensor
    formatted: torch.Tensor
    num_tokens: int
    mean_length: float


def token_logprobs(model, input_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``[B, S]`` ids -> ``[B, S-1]`` log p(ids[:, 1:] | prefix) under ``model`` (fused, no logits tensor)."""
    hidden, _ = model.forward_train(input_ids)  # [B, S, D]
    b, s, d = hidden.shape
    lp = fused_linear_logprobs(hidden[:, :-1].reshape(-1, d), model.head_weight(), input_ids[:, 1:].reshape(-1),
                               temperature)
    return lp.view(b, s - 1)  # [B, S-1]


def rollout(policy, reference, tokenizer, samples: Sequence[Sample], cfg: GRPOConfig, reward: RewardFn,
            seed: int, checker: Optional[SafetyChecker] = None) -> Rollouts:
    """Sample G completions per prompt with ``policy``, score them, and compute the group advantages and the
    old / reference log-probabilities."""
    g = cfg.group_size
    group = [s for s in samples for _ in range(g)]
    gen = complete(policy, tokenizer, [s.prompt for s in group], max_new_tokens=cfg.max_new_tokens,
                   batch_size=len(group), temperature=cfg.temperature, top_p=cfg.top_p, seed=seed)
    rewards, comps = reward.batch(group, gen.texts, [len(t) for t in gen.tokens], group_size=g)
    correct = comps["accuracy"] > 0.5
    r = rewards.view(-1, g)  # [P, G]
    adv = ((r - r.mean(dim=1, keepdim=True)) / (r.std(dim=1, keepdim=True) + 1e-4)).view(-1)  # [B]
    pairs = []
    for s, toks in zip(group, gen.tokens):
        p = tokenizer.encode(s.prompt)
        ids = (p + toks)[:cfg.max_len]
        pairs.append((ids, [IGNORE_INDEX] * len(p) + toks[:cfg.max_len - len(p)]))
    device = next(policy.parameters()).device
    batch = collate(pairs, tokenizer.pad_id, device)
    mask = batch.labels[:, 1:] != IGNORE_INDEX  # [B, S-1]
    with torch.no_grad():
        old = token_logprobs(policy, batch.input_ids, cfg.temperature)
        ref = token_logprobs(reference, batch.input_ids, cfg.temperature) if reference is not None and cfg.beta > 0 else None
    lengths = [len(t) for t in gen.tokens]
    return Rollouts(batch.input_ids, mask, old, ref, adv.to(device), rewards, correct, comps["format"] > 0.5,
                    int(mask.sum()),
                    sum(lengths) / max(1, len(lengths)))


def grpo(model, tokenizer, samples: Sequence[Sample], config: TrainConfig, grpo_cfg: GRPOConfig, *,
         reward: Optional[RewardFn] = None, reference=None, run_dir: Optional[str] = None, name: str = "grpo",
         checker: Optional[SafetyChecker] = None) -> list[dict]:
    """GRPO on ``samples`` (prompts with verifiable answers). ``reference``: the frozen KL reference (default:
    a copy of ``model`` at the start). Each step logs ``reward``, ``accuracy`` (verified rollouts),
    ``format_rate``, ``kl``, ``clip_fraction``, ``completion_tokens``."""
    reward = reward or RewardFn(accuracy=1.0, format=0.5)
    if reference is None and grpo_cfg.beta > 0:
        reference = copy.deepcopy(model).eval()
        for p in reference.parameters():
            p.requires_grad_(False)
    last: dict = {}

    def batches(step: int, rank: int, world: int) -> list:
        rng = random.Random(config.seed * 1_000_003 + step)
        picked = [samples[rng.randrange(len(samples))] for _ in range(grpo_cfg.prompts_per_step)]
        picked = picked[rank::world]
        ro = rollout(model, reference, tokenizer, picked, grpo_cfg, reward, seed=config.seed * 7919 + step * 131 + rank,
                     checker=checker)
        last.update(reward=float(ro.rewards.mean()), accuracy=float(ro.correct.float().mean()),
                    format_rate=float(ro.formatted.float().mean()), completion_tokens=ro.mean_length)
        return [ro]

    def loss_fn(m, ro: Rollouts, step: int) -> LossOutput:
        lp = token_logprobs(m, ro.input_ids, grpo_cfg.temperature)  # [B, S-1]
        loss, stats = grpo_loss(lp, ro.old_logprobs, ro.ref_logprobs, ro.advantages, ro.mask,
                                epsilon=grpo_cfg.epsilon, epsilon_high=grpo_cfg.epsilon_high, beta=grpo_cfg.beta,
                                loss_type=grpo_cfg.loss_type)
        return LossOutput(loss, {"kl": stats["kl"], "clip_fraction": stats["clip_fraction"]})

    def on_step(metrics: dict) -> None:
        metrics.update(last)

    if grpo_cfg.loss_type in ("grpo", "dr_grpo"):
        # these losses normalise per sequence / by a fixed count already: weight the step's parts equally
        config = dataclasses.replace(config, loss_weighting="mean")
    trainer = Trainer(model, config, run_dir, name=name)
    return trainer.fit(batches, loss_fn, on_step)


# ---------------------------------------------------------------------------------------------- rejection sampling
def rejection_sample(model, tokenizer, samples: Sequence[Sample], *, n: int, max_new_tokens: int,
                     temperature: float = 0.7, seed: int = 0, batch_size: int = 128) -> tuple[list, list, dict]:
    """Sample n completions per prompt and keep, per prompt, the first that verifies and is well formed.

    Returns ``(kept samples, their completions, stats)`` with stats ``kept_fraction`` (prompts with a kept
    completion) and ``sampled``."""
    group = [s for s in samples for _ in range(n)]
    gen = complete(model, tokenizer, [s.prompt for s in group], max_new_tokens=max_new_tokens,
                   batch_size=batch_size, temperature=temperature, seed=seed)
    kept, texts = [], []
    for i, s in enumerate(samples):
        for text in gen.texts[i * n:(i + 1) * n]:
            if format_reward(text) == 1.0 and accuracy_reward(s, text) == 1.0:  # verified and well formed
                kept.append(s)
                texts.append(text)
                break
    return kept, texts, {"kept_fraction": len(kept) / max(1, len(samples)), "sampled": len(group)}


# ---------------------------------------------------------------------------------------------- distillation
def distill(student, teacher, tokenizer, samples: Sequence[Sample], completions: Sequence[str], config: TrainConfig, *,
            kd_kind: str = "forward_kl", kd_weight: float = 1.0, kd_temperature: float = 1.0, batch_size: int = 32,
            max_len: int = 128, losses: LossConfig = LossConfig(), run_dir: Optional[str] = None,
            name: str = "distill") -> list[dict]:
    """Distil ``teacher`` into ``student``: SFT on the teacher's completions plus the fused logit KD loss on
    the completion tokens (``kd_weight`` 0: SFT only). The vocabularies must match."""
    pairs = [encode_pair(tokenizer, s.prompt, c, max_len) for s, c in zip(samples, completions)]
    if not pairs:
        raise ValueError(f"{name}: no training samples")
    teacher.eval()
    device = next(student.parameters()).device

    def loss_fn(m, batch: Batch, step: int) -> LossOutput:
        out = causal_lm_loss(m, batch.input_ids, batch.labels, losses)
        if kd_weight <= 0:
            return out
        with torch.no_grad():
            t_logits = teacher(batch.input_ids)[:, :-1]  # [B, S-1, V] fp32 (the tiny teacher's are small)
        hidden = out.hidden  # [B, S, D], the student's final-normed states from the same forward
        d = hidden.shape[-1]
        mask = (batch.labels[:, 1:] != IGNORE_INDEX).reshape(-1)
        kd = fused_linear_kd_loss(hidden[:, :-1].reshape(-1, d), m.head_weight(), t_logits.reshape(mask.numel(), -1),
                                  kind=kd_kind, temperature=kd_temperature, mask=mask)
        parts = dict(out.parts, kd=kd.detach())
        return LossOutput(out.total + kd_weight * kd, parts, hidden)

    trainer = Trainer(student, config, run_dir, name=name)
    return trainer.fit(sft_batches(pairs, batch_size, tokenizer.pad_id, config.seed, device, config.grad_accum),
                       loss_fn)
