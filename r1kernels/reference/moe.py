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
    return_counts: bool = False,
):
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
        ``(weights [T, K] fp32, expert_ids [T, K] int32)``, experts in descending selection score; with
        ``return_counts`` also ``counts [E] int32``, the number of tokens routed to each expert.
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
    ids = ids.to(torch.int32)
    if return_counts:
        return weights * routed_scaling_factor, ids, expert_counts(ids, e)
    return weights * routed_scaling_factor, ids


def expert_counts(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``counts [E] int32``: how many (token, slot) pairs of ``expert_ids [T, K]`` chose each expert.

    A scatter-add into a fixed-size buffer (``torch.bincount`` would size its output from the data and sync).
    """
    counts = torch.zeros(num_experts, dtype=torch.int32, device=expert_ids.device)
    return counts.scatter_add_(0, expert_ids.reshape(-1).long(), torch.ones_like(expert_ids.reshape(-1), dtype=torch.int32))


def moe_align(expert_ids: torch.Tensor, num_experts: int, block_size: int):
    """Sort the T*K routing slots by expert and pad each expert's run to a multiple of ``block_size``.

    Slot ``s = t * K + k`` is token t's k-th choice. The output lists, expert by expert (ascending), the
    slots that chose the expert (ascending slot order within an expert, so the result is unique), each
    expert's run padded with the sentinel ``T * K`` up to a multiple of ``block_size``; experts with no
    slots take no room. A grouped GEMM then runs one program per block of ``block_size`` rows, all of one
    expert, reading token rows through ``sorted_slots // K`` (no gathered copy of x).

    Args:
        expert_ids: ``[T, K]`` int32 / int64 in ``[0, E)``.
        num_experts: E.
        block_size: the GEMM's row block (BM), > 0.
    Returns:
        sorted_slots ``[S_max]`` int32 (sentinel-filled past ``num_padded``),
        block_expert ``[S_max / BM]`` int32 (the expert of each block; -1 for blocks past ``num_padded``),
        num_padded ``[1]`` int32 (the used length, a multiple of BM),
        counts ``[E]`` int32.
        ``S_max = ceil((T*K + min(E, T*K) * (BM - 1)) / BM) * BM``, the longest the padded list can be,
        so the sizes depend only on the shapes (no host sync).
    """
    t, k = expert_ids.shape
    n = t * k
    dev = expert_ids.device
    s_max = -(-(n + min(num_experts, n) * (block_size - 1)) // block_size) * block_size
    counts = expert_counts(expert_ids, num_experts)
    padded = (counts + block_size - 1) // block_size * block_size  # [E]
    start = torch.cumsum(padded, 0) - padded  # [E] first row of each expert's run
    flat = expert_ids.reshape(-1).long()
    order = torch.sort(flat, stable=True).indices  # slots grouped by expert, ascending within an expert
    rank = torch.arange(n, device=dev) - (torch.cumsum(counts, 0) - counts).long()[flat[order]]  # place within run
    sorted_slots = torch.full((s_max,), n, dtype=torch.int32, device=dev)
    sorted_slots[start.long()[flat[order]] + rank] = order.to(torch.int32)
    num_padded = padded.sum().reshape(1).to(torch.int32)
    block_start = torch.arange(0, s_max, block_size, device=dev)  # [S_max / BM]
    run_end = torch.cumsum(padded, 0)  # [E]
    block_expert = torch.searchsorted(run_end, block_start, right=True).to(torch.int32)
    block_expert = torch.where(block_start < num_padded, block_expert, torch.full_like(block_expert, -1))
    return sorted_slots, block_expert, num_padded, counts


def update_routing_bias(bias: torch.Tensor, counts: torch.Tensor, gamma: float = 1e-3) -> torch.Tensor:
    """Aux-loss-free load balancing (DeepSeek-V3 section 2.1.2), in place, no gradient.

    ``bias_i += gamma * sign(mean(counts) - counts_i)``: overloaded experts become less likely to be
    selected, underloaded ones more. ``bias [E]`` fp32, ``counts [E]`` tokens per expert over the step
    (any integer or float dtype). Returns ``bias``.
    """
    with torch.no_grad():
        c = counts.float()
        bias.add_(gamma * torch.sign(c.mean() - c).to(bias.dtype))
    return bias


def sequence_balance_loss(
    scores: torch.Tensor, expert_ids: torch.Tensor, *, alpha: float = 1e-4, mask=None
) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss ``alpha * sum_i f_i * P_i`` per sequence, averaged.

    Per sequence of T tokens, with E experts and K chosen per token:
    ``f_i = E / (K * T) * #{t : expert i chosen by t}`` (no gradient) and ``P_i = 1/T * sum_t s'_{i,t}``,
    ``s'_{i,t} = s_{i,t} / sum_j s_{j,t}`` (the affinity scores normalised over all experts).

    Args:
        scores: ``[B, S, E]`` the unbiased affinity scores s (sigmoid of the router logits; softmax rows
            are already normalised), differentiable.
        expert_ids: ``[B, S, K]`` the chosen experts.
        alpha: the balance factor (1e-4 in DeepSeek-V3).
        mask: optional ``[B, S]`` bool, False for padding tokens (left out of T, f and P).
    Returns:
        A scalar fp32 tensor.
    """
    b, s, e = scores.shape
    k = expert_ids.shape[-1]
    m = torch.ones(b, s, dtype=torch.float32, device=scores.device) if mask is None else mask.float()
    n_tok = m.sum(1).clamp_min(1.0)  # [B]
    chosen = torch.zeros(b, s, e, dtype=torch.float32, device=scores.device)
    chosen.scatter_(2, expert_ids.long(), 1.0)
    f = (chosen * m[..., None]).sum(1) * (e / (k * n_tok))[:, None]  # [B, E]
    p_norm = scores.float() / scores.float().sum(-1, keepdim=True)
    p = (p_norm * m[..., None]).sum(1) / n_tok[:, None]  # [B, E]
    return alpha * (f * p).sum(1).mean()


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
