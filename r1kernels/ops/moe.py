"""Public MoE ops: routing gate and routed-expert computation (reference backend here; the MoE issue
brings the fused Triton / CUDA / C++ backends behind the same signatures)."""
from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from .._dispatch import Impl, Op, always
from ._validate import FLOAT_DTYPES, check_tensor


def _route_ref(logits, bias, top_k, n_group, topk_group, score_func, group_score, norm, scale):
    return reference.moe_route(
        logits, bias, top_k=top_k, n_group=n_group, topk_group=topk_group, score_func=score_func,
        group_score=group_score, norm_topk_prob=norm, routed_scaling_factor=scale, return_counts=True,
    )


def _experts_ref(x, w13, w2, weights, expert_ids, deterministic):
    return reference.moe_experts(x, w13, w2, weights, expert_ids)


# Every moe_route backend returns (weights, expert_ids, counts); the public op drops counts unless asked.
MOE_ROUTE = Op("moe_route", {"reference": Impl(_route_ref, always)})
MOE_ALIGN = Op("moe_align", {"reference": Impl(reference.moe_align, always)})
MOE_EXPERTS = Op("moe_experts", {"reference": Impl(_experts_ref, always)})


def moe_route(
    router_logits: torch.Tensor,
    bias: Optional[torch.Tensor],
    *,
    top_k: int,
    n_group: int = 1,
    topk_group: int = 1,
    score_func: str = "sigmoid",
    group_score: str = "top2_sum",
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
    return_counts: bool = False,
    backend: str = "auto",
):
    """Group-limited top-k routing (semantics: ``r1kernels.reference.moe.moe_route``).

    Args:
        router_logits: ``[T, E]`` fp32 / fp16 / bf16 (computed in fp32).
        bias: ``[E]`` fp32 selection bias (``e_score_correction_bias``) or None.
        top_k, n_group, topk_group, score_func (``"sigmoid"`` | ``"softmax"``), group_score
        (``"top2_sum"`` | ``"max"``), norm_topk_prob, routed_scaling_factor: see the reference.
    Returns:
        ``(weights [T, K] fp32, expert_ids [T, K] int32)``, experts in descending selection score; ties go
        to the lower expert index. With ``return_counts``, also ``counts [E] int32`` (tokens per expert),
        produced by the same pass without a host sync.
    """
    check_tensor("moe_route", "router_logits", router_logits, ndim=2, dtypes=FLOAT_DTYPES)
    e = router_logits.shape[1]
    if bias is not None:
        check_tensor("moe_route", "bias", bias, shape=(e,), dtypes=(torch.float32,), device=router_logits.device)
    if e % n_group:
        raise ValueError(f"r1kernels.ops.moe_route: E={e} (router_logits.shape[1]) is not divisible by n_group={n_group}")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"r1kernels.ops.moe_route: topk_group={topk_group} must be in [1, n_group={n_group}]")
    if not 1 <= top_k <= topk_group * (e // n_group):
        raise ValueError(f"r1kernels.ops.moe_route: top_k={top_k} must be in [1, {topk_group * (e // n_group)}] "
                         f"(the experts in the kept groups)")
    if score_func not in ("sigmoid", "softmax"):
        raise ValueError(f"r1kernels.ops.moe_route: score_func must be 'sigmoid' or 'softmax', got {score_func!r}")
    if group_score not in ("top2_sum", "max"):
        raise ValueError(f"r1kernels.ops.moe_route: group_score must be 'top2_sum' or 'max', got {group_score!r}")
    weights, ids, counts = MOE_ROUTE(backend, router_logits, bias, int(top_k), int(n_group), int(topk_group),
                                     score_func, group_score, bool(norm_topk_prob), float(routed_scaling_factor))
    return (weights, ids, counts) if return_counts else (weights, ids)


def moe_align(expert_ids: torch.Tensor, num_experts: int, block_size: int, *, backend: str = "auto"):
    """Sort routing slots by expert, each expert's run padded to ``block_size`` (see ``reference.moe_align``).

    Args:
        expert_ids: ``[T, K]`` int32 / int64 in ``[0, num_experts)``.
        num_experts: E; block_size: the grouped GEMM's row block.
    Returns:
        ``(sorted_slots [S_max] int32, block_expert [S_max / block_size] int32, num_padded [1] int32,
        counts [E] int32)`` with ``S_max = ceil((T*K + min(E, T*K) * (block_size - 1)) / block_size) * block_size``.
    """
    check_tensor("moe_align", "expert_ids", expert_ids, ndim=2, dtypes=(torch.int32, torch.int64))
    if num_experts <= 0 or block_size <= 0:
        raise ValueError(f"r1kernels.ops.moe_align: num_experts and block_size must be positive, got "
                         f"{num_experts}, {block_size}")
    return MOE_ALIGN(backend, expert_ids, int(num_experts), int(block_size))


def moe_experts(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor,
    expert_ids: torch.Tensor,
    *,
    deterministic: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Routed experts: ``y[t] = sum_k weights[t,k] * W2_e(silu(W1_e x[t]) * W3_e x[t])``, e = expert_ids[t,k].

    Args:
        x: ``[T, D]`` fp32 / fp16 / bf16.
        w13: ``[E, 2I, D]`` (W1 = gate rows ``[:I]``, then W3 = up rows ``[I:]``), x's dtype.
        w2: ``[E, D, I]``, x's dtype.
        weights: ``[T, K]`` fp32.
        expert_ids: ``[T, K]`` int32 / int64 in ``[0, E)``.
        deterministic: accumulate without atomics (bitwise reproducible, a little slower) where a backend
            would otherwise use them.
    Returns:
        ``[T, D]`` in x's dtype. Differentiable in x, w13, w2 and weights.
    """
    check_tensor("moe_experts", "x", x, ndim=2, dtypes=FLOAT_DTYPES)
    t, d = x.shape
    check_tensor("moe_experts", "w13", w13, ndim=3, dtypes=(x.dtype,), device=x.device)
    e, two_i, _ = w13.shape
    if two_i % 2 or w13.shape[2] != d:
        raise ValueError(f"r1kernels.ops.moe_experts: w13 must be [E, 2I, D={d}], got {tuple(w13.shape)}")
    check_tensor("moe_experts", "w2", w2, shape=(e, d, two_i // 2), dtypes=(x.dtype,), device=x.device)
    check_tensor("moe_experts", "expert_ids", expert_ids, ndim=2, dtypes=(torch.int32, torch.int64), device=x.device)
    if expert_ids.shape[0] != t:
        raise ValueError(f"r1kernels.ops.moe_experts: expert_ids must be [T={t}, K], got {tuple(expert_ids.shape)}")
    check_tensor("moe_experts", "weights", weights, shape=tuple(expert_ids.shape), dtypes=(torch.float32,), device=x.device)
    return MOE_EXPERTS(backend, x, w13, w2, weights, expert_ids, bool(deterministic))


def update_routing_bias(bias: torch.Tensor, counts: torch.Tensor, gamma: float = 1e-3) -> torch.Tensor:
    """Aux-loss-free balancing step, in place and without gradient: ``bias += gamma * sign(mean(counts) - counts)``.

    Args:
        bias: ``[E]`` fp32 ``e_score_correction_bias`` (updated in place and returned).
        counts: ``[E]`` tokens per expert over the step (from ``moe_route(..., return_counts=True)``).
        gamma: the bias update speed (1e-3 in DeepSeek-V3).
    """
    check_tensor("update_routing_bias", "bias", bias, ndim=1, dtypes=(torch.float32,))
    check_tensor("update_routing_bias", "counts", counts, shape=(bias.shape[0],), device=bias.device)
    return reference.update_routing_bias(bias, counts, gamma)


def sequence_balance_loss(scores: torch.Tensor, expert_ids: torch.Tensor, *, alpha: float = 1e-4,
                          mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss ``alpha * sum_i f_i P_i`` (see the reference), differentiable in scores.

    Args:
        scores: ``[B, S, E]`` unbiased affinity scores; expert_ids: ``[B, S, K]``; mask: ``[B, S]`` bool or None.
    Returns:
        Scalar fp32.
    """
    check_tensor("sequence_balance_loss", "scores", scores, ndim=3, dtypes=FLOAT_DTYPES)
    b, s, e = scores.shape
    check_tensor("sequence_balance_loss", "expert_ids", expert_ids, shape=(b, s, None),
                 dtypes=(torch.int32, torch.int64), device=scores.device)
    if mask is not None:
        check_tensor("sequence_balance_loss", "mask", mask, shape=(b, s), dtypes=(torch.bool,), device=scores.device)
    return reference.sequence_balance_loss(scores, expert_ids, alpha=alpha, mask=mask)
