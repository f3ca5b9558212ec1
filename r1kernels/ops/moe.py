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
        group_score=group_score, norm_topk_prob=norm, routed_scaling_factor=scale,
    )


MOE_ROUTE = Op("moe_route", {"reference": Impl(_route_ref, always)})
MOE_EXPERTS = Op("moe_experts", {"reference": Impl(reference.moe_experts, always)})


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
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-limited top-k routing (semantics: ``r1kernels.reference.moe.moe_route``).

    Args:
        router_logits: ``[T, E]`` fp32 / fp16 / bf16 (computed in fp32).
        bias: ``[E]`` fp32 selection bias (``e_score_correction_bias``) or None.
        top_k, n_group, topk_group, score_func (``"sigmoid"`` | ``"softmax"``), group_score
        (``"top2_sum"`` | ``"max"``), norm_topk_prob, routed_scaling_factor: see the reference.
    Returns:
        ``(weights [T, K] fp32, expert_ids [T, K] int32)``; ties go to the lower expert index.
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
    return MOE_ROUTE(backend, router_logits, bias, int(top_k), int(n_group), int(topk_group), score_func,
                     group_score, bool(norm_topk_prob), float(routed_scaling_factor))


def moe_experts(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor,
    expert_ids: torch.Tensor,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Routed experts: ``y[t] = sum_k weights[t,k] * W2_e(silu(W1_e x[t]) * W3_e x[t])``, e = expert_ids[t,k].

    Args:
        x: ``[T, D]`` fp32 / fp16 / bf16.
        w13: ``[E, 2I, D]`` (W1 = gate rows ``[:I]``, then W3 = up rows ``[I:]``), x's dtype.
        w2: ``[E, D, I]``, x's dtype.
        weights: ``[T, K]`` fp32.
        expert_ids: ``[T, K]`` int32 / int64 in ``[0, E)``.
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
    return MOE_EXPERTS(backend, x, w13, w2, weights, expert_ids)
