"""MoE routing and expert computation references (DeepSeek-V2 / V3 semantics, DESIGN "Model semantics").

Letters: T tokens, D hidden size, E routed experts, G expert groups (``n_group``), K experts per token,
I expert intermediate size.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _topk_lowest_index_on_ties(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest values along the last dim, ties resolved to the lower index.

    A stable descending sort keeps equal values in index order, which ``torch.topk`` does not promise.
    """
    return torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :k]


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-limited top-k routing.

    1. scores = sigmoid(logits) or softmax(logits) over E, in fp32;
    2. selection scores = scores + bias (bias only steers selection: DeepSeek-V3's aux-loss-free balancing);
    3. with ``n_group > 1``: a group's score is the sum of its top-2 selection scores (``"top2_sum"``, V3) or
       its max (``"max"``, V2); the ``topk_group`` best groups are kept and the other groups' experts are
       masked with -inf;
    4. the K experts with the largest selection scores are chosen (ties: the lower expert index first);
    5. weights are the *unbiased* scores of the chosen experts, divided by their sum when
       ``norm_topk_prob``, then multiplied by ``routed_scaling_factor``.

    Args:
        router_logits: ``[T, E]`` (upcast to fp32).
        bias: ``[E]`` fp32 ``e_score_correction_bias`` or None.
    Returns:
        ``(weights [T, K] fp32, expert_ids [T, K] int32)``, experts in descending selection score.
    """
    if router_logits.dim() != 2:
        raise ValueError(f"moe_route: router_logits must be [T, E], got shape {tuple(router_logits.shape)}")
    t, e = router_logits.shape
    if e % n_group:
        raise ValueError(f"moe_route: E={e} is not divisible by n_group={n_group}")
    if not 1 <= top_k <= e:
        raise ValueError(f"moe_route: top_k={top_k} must be in [1, E={e}]")
    logits = router_logits.float()
    if score_func == "sigmoid":
        scores = logits.sigmoid()
    elif score_func == "softmax":
        scores = logits.softmax(dim=-1)
    else:
        raise ValueError(f"moe_route: score_func must be 'sigmoid' or 'softmax', got {score_func!r}")
    choice = scores if bias is None else scores + bias.float()
    if n_group > 1:
        grouped = choice.view(t, n_group, e // n_group)  # [T, G, E/G]
        if group_score == "top2_sum":
            gscore = grouped.topk(min(2, e // n_group), dim=-1).values.sum(-1)  # [T, G]
        elif group_score == "max":
            gscore = grouped.max(dim=-1).values
        else:
            raise ValueError(f"moe_route: group_score must be 'top2_sum' or 'max', got {group_score!r}")
        keep = _topk_lowest_index_on_ties(gscore, topk_group)  # [T, topk_group]
        gmask = torch.zeros_like(gscore, dtype=torch.bool).scatter_(1, keep, True)  # [T, G]
        choice = grouped.masked_fill(~gmask[..., None], float("-inf")).view(t, e)
    ids = _topk_lowest_index_on_ties(choice, top_k)  # [T, K]
    weights = scores.gather(1, ids)
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor, ids.to(torch.int32)


def moe_experts(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor,
    expert_ids: torch.Tensor,
) -> torch.Tensor:
    """y[t] = sum_k weights[t, k] * W2_e (silu(W1_e x[t]) * W3_e x[t]),  e = expert_ids[t, k].

    Args:
        x: ``[T, D]``.
        w13: ``[E, 2I, D]``: rows ``[:I]`` are W1 (gate_proj), rows ``[I:]`` W3 (up_proj).
        w2: ``[E, D, I]`` (down_proj).
        weights: ``[T, K]`` routing weights (fp32).
        expert_ids: ``[T, K]`` integer expert indices in ``[0, E)``.
    Returns:
        ``[T, D]`` in ``x.dtype``; experts' outputs are accumulated in fp32.
    A readable loop over experts (it syncs with the host to find each expert's tokens): the spec, not a
    fast path.
    """
    t, d = x.shape
    e, two_i, _ = w13.shape
    inter = two_i // 2
    out = torch.zeros(t, d, dtype=torch.float32, device=x.device)
    flat_ids = expert_ids.reshape(-1).long()  # [T*K]
    token_of_slot = torch.arange(t, device=x.device).repeat_interleave(expert_ids.shape[1])  # [T*K]
    flat_w = weights.reshape(-1).float()
    for ex in range(e):
        slots = (flat_ids == ex).nonzero().flatten()
        if slots.numel() == 0:
            continue
        tok = token_of_slot[slots]
        h = x[tok] @ w13[ex].t()  # [n, 2I]
        a = F.silu(h[:, :inter]) * h[:, inter:]
        y = a @ w2[ex].t()  # [n, D]
        out.index_add_(0, tok, y.float() * flat_w[slots, None])
    return out.to(x.dtype)
