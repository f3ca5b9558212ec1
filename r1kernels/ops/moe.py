"""Public MoE ops: routing gate, token alignment, routed experts, load balancing.

Letters: T tokens, D hidden, E routed experts, K experts per token, I expert intermediate size.

Backends: ``moe_route`` reference / Triton / C++ CPU / CUDA (the kernels are forward-only; a call whose
logits need a gradient goes to the reference); ``moe_align`` reference / Triton / CUDA; ``moe_experts``
reference / Triton grouped GEMMs with a backward (``r1kernels.triton.moe``) / ``cpu`` (sorted grouped
GEMMs in torch, ``_moe_grouped``). The Triton and native dispatch entries live in ``_moe_route`` and
``_native``; the Triton experts' autograd.Function is here.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from .._dispatch import Impl, Op, always, triton_check
from . import _moe_grouped
from ._moe_route import MOE_ALIGN_TRITON, MOE_ROUTE_TRITON
from ._native import MOE_ALIGN_CUDA, MOE_ROUTE_CPU, MOE_ROUTE_CUDA
from ._validate import FLOAT_DTYPES, check_tensor


def _route_ref(logits, bias, top_k, n_group, topk_group, score_func, group_score, norm, scale):
    return reference.moe_route(
        logits, bias, top_k=top_k, n_group=n_group, topk_group=topk_group, score_func=score_func,
        group_score=group_score, norm_topk_prob=norm, routed_scaling_factor=scale, return_counts=True,
    )


def _experts_ref(x, w13, w2, weights, expert_ids, deterministic):
    return reference.moe_experts(x, w13, w2, weights, expert_ids)


def _experts_triton_align(w13, expert_ids):
    """``(block_m, (sorted_slots, block_expert, num_padded, counts))`` for the Triton grouped GEMMs."""
    from ..triton.moe import moe_block_m

    t, k = expert_ids.shape
    e = w13.shape[0]
    block_m = moe_block_m(t * k, e)
    if t * k == 0:  # nothing routed: the empty list moe_align would describe (S_max = 0)
        dev = expert_ids.device
        i32 = dict(dtype=torch.int32, device=dev)
        return block_m, (torch.empty(0, **i32), torch.empty(0, **i32), torch.zeros(1, **i32), torch.zeros(e, **i32))
    return block_m, moe_align(expert_ids, e, block_m)


class _MoEExpertsTriton(torch.autograd.Function):
    """The Triton path with a backward: the forward keeps H, the gate/up pre-activations ([S_max, 2I] in x's
    dtype), and the align outputs; the backward recomputes the activation from H (see r1kernels.triton.moe)."""

    @staticmethod
    def forward(ctx, x, w13, w2, weights, expert_ids, deterministic):
        from ..triton.moe import moe_experts_fwd

        block_m, (sorted_slots, block_expert, num_padded, counts) = _experts_triton_align(w13, expert_ids)
        y, h = moe_experts_fwd(x, w13, w2, weights, sorted_slots, block_expert, num_padded, block_m,
                               deterministic=deterministic, save_h=True)
        ctx.save_for_backward(x, w13, w2, weights, h, sorted_slots, block_expert, num_padded, counts)
        ctx.block_m = block_m
        ctx.deterministic = deterministic
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        from ..triton.moe import moe_experts_bwd

        x, w13, w2, weights, h, sorted_slots, block_expert, num_padded, counts = ctx.saved_tensors
        grads = moe_experts_bwd(dy, x, w13, w2, weights, h, sorted_slots, block_expert, num_padded, counts,
                                ctx.block_m, deterministic=ctx.deterministic, needs=tuple(ctx.needs_input_grad[:4]))
        return (*grads, None, None)


def _experts_triton(x, w13, w2, weights, expert_ids, deterministic):
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, w13, w2, weights)):
        return _MoEExpertsTriton.apply(x, w13, w2, weights, expert_ids, deterministic)
    # No backward will follow: skip the autograd.Function and do not write H.
    from ..triton.moe import moe_experts_fwd

    block_m, (sorted_slots, block_expert, num_padded, _) = _experts_triton_align(w13, expert_ids)
    return moe_experts_fwd(x, w13, w2, weights, sorted_slots, block_expert, num_padded, block_m,
                           deterministic=deterministic)[0]


# Every moe_route backend returns (weights, expert_ids, counts); the public op drops counts unless asked.
MOE_ROUTE = Op("moe_route", {
    "reference": Impl(_route_ref, always),
    "triton": MOE_ROUTE_TRITON,
    "cuda": MOE_ROUTE_CUDA,
    "cpu": MOE_ROUTE_CPU,
})
MOE_ALIGN = Op("moe_align", {
    "reference": Impl(reference.moe_align, always),
    "triton": MOE_ALIGN_TRITON,
    "cuda": MOE_ALIGN_CUDA,
})
MOE_EXPERTS = Op("moe_experts", {
    "reference": Impl(_experts_ref, always),
    "triton": Impl(_experts_triton, triton_check),
    # torch._grouped_mm over the slots sorted by expert (CPU, torch only; see ops/_moe_grouped.py)
    "cpu": Impl(_moe_grouped.moe_experts_grouped, _moe_grouped.reason, _moe_grouped.device_reason),
})


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


def _bias_ref(bias, counts, gamma):
    return reference.update_routing_bias(bias, counts, gamma)


def _balance_ref(scores, expert_ids, alpha, mask):
    return reference.sequence_balance_loss(scores, expert_ids, alpha=alpha, mask=mask)


# Both are a handful of element-wise ops over [E] or [B, S, E]: the reference is the only backend.
UPDATE_ROUTING_BIAS = Op("update_routing_bias", {"reference": Impl(_bias_ref, always)})
SEQUENCE_BALANCE_LOSS = Op("sequence_balance_loss", {"reference": Impl(_balance_ref, always)})


def update_routing_bias(bias: torch.Tensor, counts: torch.Tensor, gamma: float = 1e-3, *,
                        backend: str = "auto") -> torch.Tensor:
    """Aux-loss-free balancing step, in place and without gradient: ``bias += gamma * sign(mean(counts) - counts)``.

    Args:
        bias: ``[E]`` fp32 ``e_score_correction_bias`` (updated in place and returned).
        counts: ``[E]`` tokens per expert over the step (from ``moe_route(..., return_counts=True)``).
        gamma: the bias update speed (1e-3 in DeepSeek-V3).
    """
    check_tensor("update_routing_bias", "bias", bias, ndim=1, dtypes=(torch.float32,))
    check_tensor("update_routing_bias", "counts", counts, shape=(bias.shape[0],), device=bias.device)
    return UPDATE_ROUTING_BIAS(backend, bias, counts, float(gamma))


def sequence_balance_loss(scores: torch.Tensor, expert_ids: torch.Tensor, *, alpha: float = 1e-4,
                          mask: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
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
    return SEQUENCE_BALANCE_LOSS(backend, scores, expert_ids, float(alpha), mask)
