"""The Triton entries of the ``moe_route`` and ``moe_align`` dispatch tables (the native ones are in
``_native``). Letters: T tokens, E experts, K experts per token.

Routing's kernels are forward-only: training differentiates the routing weights through the scores, so a
call whose logits require grad (with grad mode on) is left to the reference, which autograd follows.
"""
from __future__ import annotations

from typing import Optional

from .._dispatch import Impl, triton_check
from ._native import forward_only_reason


def _route_triton(logits, bias, top_k, n_group, topk_group, score_func, group_score, norm, scale):
    from ..triton.moe_route import moe_route_fwd

    return moe_route_fwd(logits, bias, top_k, n_group, topk_group, score_func, group_score, norm, scale)


def _route_triton_check(logits, bias, top_k, n_group, topk_group, score_func, group_score, norm, scale) -> Optional[str]:
    why = triton_check(logits) or forward_only_reason("moe_route", logits)
    if why is None:
        from ..triton.moe_route import route_problem  # triton is importable once triton_check passed

        why = route_problem(logits, bias, top_k, n_group, topk_group)
    return why


def _align_triton(expert_ids, num_experts, block_size):
    from ..triton.moe_route import moe_align_fwd

    return moe_align_fwd(expert_ids, num_experts, block_size)


MOE_ROUTE_TRITON = Impl(_route_triton, _route_triton_check)
MOE_ALIGN_TRITON = Impl(_align_triton, triton_check)
