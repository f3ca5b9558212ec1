"""DeepSeek Sparse Attention (DSA, DeepSeek-V3.2) references: the lightning indexer, its top-k selection,
absorbed-MLA attention over the selected latent rows (packed prefill and paged decode) and the indexer's
dense warm-up KL loss.

Letters: B batch (sequences / requests), S query tokens per sequence, T key tokens (cached positions),
Hi indexer heads, Di indexer head dim, H query heads of the main attention, C latent row width (L + R,
576 in V3), L = kv_lora_rank (512; the value width, ``head_dim_v``), R = qk_rope_head_dim (64),
K selected tokens per query (top-k, 2048 in V3.2), N cache pages, P page size, M pages per request.
Packed prefill: Tt tokens of all sequences in a row, sequence b owns tokens ``cu_seqlens[b]:cu_seqlens[b+1]``.

How the pieces fit (V3.2, section 2.1): the indexer scores every visible token for every query,
``dsa_topk`` keeps the K best positions, and the main attention (absorbed MLA, MQA over the latent rows)
attends only to those. All references compute in fp32 and are differentiable through torch autograd.
"""
from __future__ import annotations

import torch

_NEG_INF = float("-inf")


def lightning_indexer(
    q_idx: torch.Tensor,
    k_idx: torch.Tensor,
    weights: torch.Tensor,
    *,
    q_positions: torch.Tensor,
) -> torch.Tensor:
    """Index scores ``I[b, s, t] = sum_j w[b, s, j] * relu(q[b, s, j] . k[b, t])``, causal.

    Args:
        q_idx: ``[B, S, Hi, Di]`` indexer queries, float.
        k_idx: ``[B, T, Di]`` indexer keys (one key per token, shared by the Hi heads), float.
        weights: ``[B, S, Hi]`` per-head weights of each query (V3.2 folds its scale factors in here).
        q_positions: ``[B, S]`` int64 position of each query among the T keys.
    Returns:
        ``[B, S, T]`` fp32; ``-inf`` where ``t > q_positions[b, s]`` (keys after the query).
    Differentiable in q_idx, k_idx and weights (masked entries have no gradient).
    """
    t = k_idx.shape[1]
    dots = torch.einsum("bsjd,btd->bsjt", q_idx.float(), k_idx.float())  # [B, S, Hi, T]
    scores = torch.einsum("bsj,bsjt->bst", weights.float(), torch.relu(dots))  # [B, S, T]
    keys = torch.arange(t, device=k_idx.device)
    visible = keys[None, None, :] <= q_positions[:, :, None]  # [B, S, T]
    return scores.masked_fill(~visible, _NEG_INF)


def dsa_topk(scores: torch.Tensor, k: int, *, lengths: torch.Tensor) -> torch.Tensor:
    """The K highest-scoring visible positions of every query, in ascending position order.

    Args:
        scores: ``[B, S, T]`` float index scores (``-inf`` marks positions a query may not see, as the
            indexer writes them for the causal mask).
        k: K, how many positions to keep (any K >= 1; K > T is allowed).
        lengths: ``[B]`` int32, keys per sequence: positions ``>= lengths[b]`` are never selected.
    Returns:
        ``[B, S, K]`` int32: the selected positions in ascending order, then ``-1`` for the slots left when
        fewer than K positions are visible. Visible = ``t < lengths[b]`` and score ``> -inf`` (so NaN scores
        are never selected). Ties are broken by the lower position; -0.0 and +0.0 are equal.
    """
    b, s, t = scores.shape
    x = scores.float()
    visible = (torch.arange(t, device=x.device)[None, None, :] < lengths.long()[:, None, None]) & (x > _NEG_INF)
    x = torch.where(visible, x, torch.full_like(x, _NEG_INF))
    n_vis = visible.sum(-1, keepdim=True)  # [B, S, 1]
    # A stable descending sort keeps equal scores in position order: the lower position wins a tie.
    order = torch.sort(x, dim=-1, descending=True, stable=True).indices  # [B, S, T]
    if k > t:
        order = torch.cat([order, order.new_zeros(b, s, k - t)], dim=-1)
    order = order[..., :k]  # [B, S, K]
    taken = torch.arange(k, device=x.device)[None, None, :] < n_vis
    sentinel = t + 1  # larger than any position: sorts after the taken ones
    chosen = torch.sort(torch.where(taken, order, torch.full_like(order, sentinel)), dim=-1).values
    return torch.where(chosen == sentinel, torch.full_like(chosen, -1), chosen).to(torch.int32)


def _sparse_attend(q: torch.Tensor, rows: torch.Tensor, valid: torch.Tensor, scale: float, head_dim_v: int):
    """Attention of each query over its own gathered latent rows, in fp32.

    q ``[Q, H, C]``, rows ``[Q, K, C]`` (the rows each query selected; the first ``head_dim_v`` columns are
    also the values), valid ``[Q, K]`` bool. Returns out ``[Q, H, V]`` and lse ``[Q, H]`` (natural log;
    out 0 and lse -inf where a query has no valid row).
    """
    # Invalid slots are zeroed before any product: a NaN row would otherwise reach dq through 0 * NaN.
    rows = torch.where(valid[..., None], rows.float(), torch.zeros((), device=rows.device))
    s = torch.einsum("qhc,qkc->qhk", q.float(), rows) * scale  # [Q, H, K]
    s = s.masked_fill(~valid[:, None, :], _NEG_INF)
    lse = torch.logsumexp(s, dim=-1)  # [Q, H]
    p = torch.exp(s - lse[..., None].clamp_min(torch.finfo(torch.float32).min))
    p = torch.where(valid[:, None, :], p, torch.zeros((), device=p.device))
    return torch.einsum("qhk,qkv->qhv", p, rows[..., :head_dim_v]), lse


def dsa_mla_prefill(
    q: torch.Tensor,
    kv: torch.Tensor,
    idx: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    softmax_scale: float,
    head_dim_v: int = 512,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse absorbed-MLA attention of packed sequences: each query attends to its K selected latent rows.

    Args:
        q: ``[Tt, H, C]``: per head ``[q_nope . W_UK, rope(q_pe)]``.
        kv: ``[Tt, C]``: one latent row ``[c_kv, rope(k_pe)]`` per token (one shared K/V head).
        idx: ``[Tt, K]`` int32 positions inside the query's own sequence (``dsa_topk``'s output); entries
            ``< 0`` or ``>= `` the sequence length are ignored. Causality is the selection's business (the
            indexer masks later keys), not re-checked here; a repeated position counts once per occurrence.
        cu_seqlens: ``[B + 1]`` int32 sequence boundaries (``cu_seqlens[0] == 0``, ``cu_seqlens[-1] == Tt``).
        softmax_scale: multiplies q.k.
        head_dim_v: values are the first ``head_dim_v`` (= L) columns of each row.
    Returns:
        out ``[Tt, H, head_dim_v]`` in q's dtype (0 for a query with no valid selection) and
        lse ``[Tt, H]`` fp32 (natural log, -inf for such a query).
    Differentiable in q and kv (through out and lse).
    """
    tt = q.shape[0]
    tok = torch.arange(tt, device=q.device)
    seq = torch.searchsorted(cu_seqlens.long(), tok, right=True) - 1  # [Tt] sequence of each token
    start = cu_seqlens.long()[seq]  # [Tt]
    n = cu_seqlens.long()[seq + 1] - start  # [Tt] its sequence's length
    pos = idx.long()
    valid = (pos >= 0) & (pos < n[:, None])  # [Tt, K]
    rows = kv[torch.where(valid, start[:, None] + pos, 0)]  # [Tt, K, C]
    out, lse = _sparse_attend(q, rows, valid, softmax_scale, head_dim_v)
    return out.to(q.dtype), lse


def dsa_mla_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    idx: torch.Tensor,
    *,
    softmax_scale: float,
    head_dim_v: int = 512,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse absorbed-MLA attention over the paged latent cache, at the positions each query selected.

    Args:
        q: ``[B, S, H, C]`` new queries per request.
        kv_cache: ``[N, P, C]`` pages of latent rows.
        block_table: ``[B, M]`` int32 page ids of each request in order.
        cache_seqlens: ``[B]`` int32 tokens cached per request (the S new ones included).
        idx: ``[B, S, K]`` int32 absolute cache positions per query; entries ``< 0`` or
            ``>= cache_seqlens[b]`` are ignored (such slots are never read, so NaN there cannot leak).
        softmax_scale, head_dim_v: as in ``dsa_mla_prefill``.
    Returns:
        out ``[B, S, H, head_dim_v]`` in q's dtype and lse ``[B, H, S]`` fp32 (``mla_decode``'s layout).
    """
    b, s, h, c = q.shape
    page = kv_cache.shape[1]
    pos = idx.long()  # [B, S, K]
    valid = (pos >= 0) & (pos < cache_seqlens.long()[:, None, None])
    pos = torch.where(valid, pos, 0)
    pages = torch.gather(block_table.long()[:, None, :].expand(b, s, -1), 2, pos // page)  # [B, S, K]
    rows = kv_cache[torch.where(valid, pages, 0), pos % page]  # [B, S, K, C]
    out, lse = _sparse_attend(q.reshape(b * s, h, c), rows.reshape(b * s, -1, c), valid.reshape(b * s, -1),
                              softmax_scale, head_dim_v)
    return out.reshape(b, s, h, head_dim_v).to(q.dtype), lse.reshape(b, s, h).transpose(1, 2)


def indexer_kl_loss(index_scores: torch.Tensor, attn_probs_target: torch.Tensor) -> torch.Tensor:
    """V3.2's dense warm-up loss: mean over queries of KL(target || softmax(index_scores)).

    Args:
        index_scores: ``[B, S, T]`` float, the indexer's scores (``-inf`` where masked).
        attn_probs_target: ``[B, S, T]`` float >= 0: the main attention's probabilities of each query
            summed over its H heads. Each row is L1-normalised here (divided by its sum), so the head sum
            can be passed as is; a row summing to 0 (a padding query) adds 0 to the loss.
    Returns:
        fp32 scalar ``(1 / (B*S)) * sum_rows sum_t p_t (log p_t - log softmax(index_scores)_t)`` with
        ``p = target / sum(target)`` and ``0 log 0 = 0``. The target must be 0 wherever the score is
        ``-inf`` (the loss is +inf otherwise, as the KL is).
    Gradient flows only into index_scores: ``(softmax(scores) - p) / (B*S)`` per element (0 on zero rows).
    """
    x = index_scores.float()
    tgt = attn_probs_target.detach().float()
    z = tgt.sum(-1, keepdim=True)  # [B, S, 1]
    p = tgt / torch.where(z > 0, z, torch.ones_like(z))
    # A fully masked row (all -inf) has no softmax; its target must be 0, so its terms are never used. Its
    # lse is taken over zeros instead, so that neither the value nor the gradient of logsumexp is NaN.
    dead = ~(x > _NEG_INF).any(dim=-1, keepdim=True)
    lse = torch.logsumexp(torch.where(dead, torch.zeros_like(x), x), dim=-1, keepdim=True)
    log_q = x - lse
    terms = torch.where(p > 0, p * (torch.log(torch.where(p > 0, p, torch.ones_like(p))) - log_q),
                        torch.zeros_like(p))
    rows = max(1, x.shape[0] * x.shape[1])
    return terms.sum() / rows
