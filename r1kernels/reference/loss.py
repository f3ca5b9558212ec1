"""Training losses, the readable reference: cross entropy and log-probabilities through the output head, the
GRPO policy loss, and distillation losses. Every op materialises the full logits; this is the spec that the
chunked implementations (``r1kernels.ops.loss``) are tested against.

Letters: T tokens (rows of hidden), D hidden width, V vocabulary, B sequences, S positions per sequence.

Logits convention (all the fused-linear ops): ``logits = hidden @ weight^T`` accumulated in fp32 and rounded
once to hidden's dtype, exactly what ``torch.nn.functional.linear`` returns for that dtype (a no-op rounding
for fp32 inputs). Everything after that, softmax, logsumexp, the loss and its gradient, runs in fp32.
"""
from __future__ import annotations

from typing import Optional

import torch

GRPO_LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
KD_KINDS = ("forward_kl", "reverse_kl", "jsd")


def head_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``[T, V]`` fp32: ``hidden [T, D] @ weight [V, D]^T`` accumulated in fp32, rounded to hidden's dtype."""
    return (hidden.float() @ weight.float().t()).to(hidden.dtype).float()


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross entropy of ``softmax(hidden @ weight^T)`` against ``labels``, a 0-d fp32 tensor.

    Args:
        hidden: ``[T, D]`` fp32 / fp16 / bf16.
        weight: ``[V, D]``, hidden's dtype.
        labels: ``[T]`` int64; a label equal to ``ignore_index`` drops its token.
        reduction: ``"mean"`` (over the tokens not ignored; 0 with zero gradients when every token is
            ignored) or ``"sum"``.
    Differentiable (autograd) in hidden and weight.
    """
    logits = head_logits(hidden, weight)  # [T, V]
    valid = labels != ignore_index  # [T]
    # Ignored rows gather column 0 and are then zeroed: the value never reaches the loss or its gradient.
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    nll = torch.logsumexp(logits, dim=-1) - logits.gather(1, safe[:, None]).squeeze(1)  # [T]
    total = torch.where(valid, nll, torch.zeros_like(nll)).sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp(min=1).float()


def fused_linear_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """``[T]`` fp32: ``log_softmax(hidden @ weight^T / temperature)[t, tokens[t]]``.

    Args:
        hidden: ``[T, D]`` fp32 / fp16 / bf16. weight: ``[V, D]``, hidden's dtype. tokens: ``[T]`` int64 in
        ``[0, V)``. temperature: > 0, divides the (rounded) logits in fp32.
    Differentiable (autograd) in hidden and weight.
    """
    logp = torch.log_softmax(head_logits(hidden, weight) / temperature, dim=-1)  # [T, V]
    return logp.gather(1, tokens[:, None]).squeeze(1)


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: Optional[torch.Tensor],
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon: float = 0.2,
    epsilon_high: Optional[float] = None,
    beta: float = 0.04,
    loss_type: str = "grpo",
    max_tokens: Optional[int] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped GRPO policy loss with a k3 KL penalty; returns ``(loss, {"kl", "clip_fraction"})``.

    Per token (fp32): ``r = exp(logprobs - old_logprobs)``,
    ``objective = min(r A, clip(r, 1 - epsilon, 1 + epsilon_high) A)``,
    ``kl = exp(ref - logprobs) - (ref - logprobs) - 1`` (0 when ``ref_logprobs`` is None),
    ``loss_token = -(objective - beta kl)`` (the KL term is left out when ref is None or beta == 0).

    Aggregation over the tokens where ``mask`` is set (a float mask weights each token):
    ``"grpo"``: per sequence, sum / that sequence's token count (at least 1), then mean over the B sequences;
    ``"dapo"``: sum over all tokens / the total token count (at least 1);
    ``"dr_grpo"``: sum over all tokens / (B * max_tokens), ``max_tokens`` defaulting to S.

    Args:
        logprobs: ``[B, S]`` float, the policy's log-probabilities (the only input the loss is differentiated
            in; masked positions may hold anything, NaN included).
        old_logprobs: ``[B, S]`` float, the sampling policy's; ref_logprobs: ``[B, S]`` float or None.
        advantages: ``[B]`` (one per sequence) or ``[B, S]`` float.
        mask: ``[B, S]`` bool or float.
    Metrics (detached 0-d fp32, over masked tokens): ``kl`` the mean k3 KL (0 without ref); ``clip_fraction``
    the fraction of tokens whose clipped term is the minimum and differs from the unclipped one (ratio below
    ``1 - epsilon`` with A < 0, or above ``1 + epsilon_high`` with A > 0): those tokens have no gradient.
    """
    eps_high = epsilon if epsilon_high is None else epsilon_high
    b, s = logprobs.shape
    w = mask.float()  # [B, S]
    on = w != 0
    zero = torch.zeros((), device=logprobs.device)
    lp = torch.where(on, logprobs.float(), zero)
    old = torch.where(on, old_logprobs.detach().float(), zero)
    adv = advantages.detach().float()
    adv = adv[:, None].expand(b, s) if adv.dim() == 1 else adv  # [B, S]
    ratio = torch.exp(lp - old)
    objective = torch.minimum(ratio * adv, torch.clamp(ratio, 1.0 - epsilon, 1.0 + eps_high) * adv)
    clipped = ((ratio < 1.0 - epsilon) & (adv < 0)) | ((ratio > 1.0 + eps_high) & (adv > 0))
    per_token = -objective
    kl = torch.zeros_like(lp)
    if ref_logprobs is not None:
        d = torch.where(on, ref_logprobs.detach().float(), zero) - lp
        kl = torch.exp(d) - d - 1.0
        if beta != 0:
            per_token = per_token + beta * kl
    per_token = torch.where(on, per_token * w, zero)  # masked positions hold exactly 0 (and no NaN)
    count = w.sum()
    if loss_type == "grpo":
        loss = (per_token.sum(-1) / w.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "dapo":
        loss = per_token.sum() / count.clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = per_token.sum() / (b * (s if max_tokens is None else max_tokens))
    else:
        raise ValueError(f"loss_type must be one of {GRPO_LOSS_TYPES}, got {loss_type!r}")
    metrics = {
        "kl": (torch.where(on, kl.detach() * w, zero).sum() / count.clamp(min=1.0)),
        "clip_fraction": (torch.where(on, clipped.float() * w, zero).sum() / count.clamp(min=1.0)),
    }
    return loss, metrics


def kd_row_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
) -> torch.Tensor:
    """``[T]`` fp32 per-token distillation loss between ``softmax(student / temperature)`` (s) and
    ``softmax(teacher / temperature)`` (t), both ``[T, V]``:

    * ``forward_kl``: KL(t || s) = sum t (log t - log s);
    * ``reverse_kl``: KL(s || t) = sum s (log s - log t);
    * ``jsd``: beta KL(t || m) + (1 - beta) KL(s || m) with m = beta t + (1 - beta) s (beta = 0 or 1: 0).

    Terms whose probability is exactly 0 count 0 (the 0 log 0 = 0 convention), so teacher logits of -inf
    (a padded vocabulary) are allowed where the student's probability is not compared against them.
    """
    ls = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    lt = torch.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    ps, pt = ls.exp(), lt.exp()
    zero = torch.zeros((), device=ls.device)
    if kind == "forward_kl":
        return torch.where(pt > 0, pt * (lt - ls), zero).sum(-1)
    if kind == "reverse_kl":
        return torch.where(ps > 0, ps * (ls - lt), zero).sum(-1)
    if kind == "jsd":
        lm = torch.log(beta * pt + (1.0 - beta) * ps)
        kl_t = torch.where((pt > 0) & (beta > 0), pt * (lt - lm), zero).sum(-1)
        kl_s = torch.where((ps > 0) & (beta < 1), ps * (ls - lm), zero).sum(-1)
        return beta * kl_t + (1.0 - beta) * kl_s
    raise ValueError(f"kind must be one of {KD_KINDS}, got {kind!r}")


def fused_linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """0-d fp32: :func:`kd_row_loss` of the student's head logits against ``teacher_logits``, averaged over
    the tokens (``mask [T]`` bool / float weights them; the mean divides by the mask's sum, at least 1).

    Args:
        student_hidden: ``[T, D]`` fp32 / fp16 / bf16. student_weight: ``[V, D]``, student_hidden's dtype.
        teacher_logits: ``[T, V]`` any float dtype (no gradient flows to it).
    Differentiable (autograd) in the student's hidden and weight. No temperature^2 factor is applied.
    """
    rows = kd_row_loss(head_logits(student_hidden, student_weight), teacher_logits, kind, temperature, beta)  # [T]
    if mask is None:
        return rows.sum() / max(rows.shape[0], 1)
    w = mask.float()
    rows = torch.where(w != 0, rows * w, torch.zeros((), device=rows.device))
    return rows.sum() / w.sum().clamp(min=1.0)
