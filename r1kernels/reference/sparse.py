"""Native Sparse Attention (NSA, DeepSeek, arXiv 2502.11089) references: the three branches, the block
selection that links them, their gated sum, and one decode step. The spec every NSA kernel is tested against.

Letters:
    T packed tokens, B sequences (``cu_seqlens [B+1]`` int32: sequence b owns tokens
    ``cu_seqlens[b]:cu_seqlens[b+1]``), t a query's position inside its sequence, L a sequence's length.
    H query heads, Hk KV heads, G = H / Hk query heads per KV group (head h reads KV head h // G).
    D query/key head dim, Dv value head dim.
    l compression block (``block_size``), d compression stride (``stride``): compressed token i of a sequence
        summarises raw positions [i·d, i·d + l); a sequence of L tokens has Nc = (L − l) // d + 1 of them
        (0 when L < l). ``cu_seqlens_cmp [B+1]`` packs them like ``cu_seqlens`` packs the tokens (Tc in all).
    l' selection block (``select_block_size``): selection block j covers positions [j·l', (j+1)·l').
    NB selection blocks per row of a score tensor (ceil(max_seqlen / l')).
    n selected blocks per query and KV head (``num_selected``), w sliding window (``window``).

The branches (each a softmax attention with its own visible set, scaled by ``softmax_scale``):
    compressed: query t sees compressed token i iff i·d + l − 1 <= t (the whole block is in its past);
    selected:   query t sees position p iff p's selection block is among its n selected blocks and p <= t;
    window:     query t sees position p iff t − w < p <= t.
A query that sees nothing in a branch gets 0 from it (and lse = −inf).

Block selection: the compressed attention probabilities of the G heads of a group are summed and spread over
the selection blocks with the overlap weights of the paper's eq. 9 (see :func:`overlap_weights`); per query
and group the first ``num_init`` blocks and the ``num_local`` most recent ones are always kept, the rest of
the n slots go to the highest-scoring causal blocks (see :func:`nsa_topk_blocks`).

Defaults (the paper's): l = 32, d = 16, l' = 64, n = 16 (counting 1 initial + 2 local blocks), w = 512.

These functions loop over sequences and build dense [t, keys] masks: clear, differentiable through torch
autograd (except the integer block selection), and only for small inputs.
"""
from __future__ import annotations

from typing import Optional

import torch

# The paper's hyper-parameters, the defaults of every function here and in r1kernels.ops.sparse.
BLOCK_SIZE = 32  # l
STRIDE = 16  # d
SELECT_BLOCK_SIZE = 64  # l'
NUM_SELECTED = 16  # n, counting the initial and local blocks
NUM_INIT = 1
NUM_LOCAL = 2
WINDOW = 512  # w


def default_scale(head_dim: int, softmax_scale: Optional[float]) -> float:
    """``softmax_scale``, or D^-1/2 when it is None."""
    return head_dim ** -0.5 if softmax_scale is None else float(softmax_scale)


def compressed_counts(seqlens: torch.Tensor, block_size: int = BLOCK_SIZE, stride: int = STRIDE) -> torch.Tensor:
    """Compressed tokens per sequence, ``(L − l) // d + 1`` (0 when L < l), for ``seqlens`` of any int dtype."""
    s = seqlens.long()
    return torch.where(s >= block_size, torch.div(s - block_size, stride, rounding_mode="floor") + 1, 0)


def compressed_cu_seqlens(cu_seqlens: torch.Tensor, block_size: int = BLOCK_SIZE, stride: int = STRIDE) -> torch.Tensor:
    """``cu_seqlens_cmp [B+1]`` int32 for the compressed tokens of the sequences of ``cu_seqlens`` (device ops
    only: no host sync). The compression module emits k_cmp / v_cmp packed this way."""
    counts = compressed_counts(cu_seqlens[1:] - cu_seqlens[:-1], block_size, stride)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)


def overlap_weights(num_cmp: int, num_blocks: int, block_size: int, stride: int, select_block_size: int,
                    device=None) -> torch.Tensor:
    """``W [num_cmp, num_blocks]`` fp32: W[i, j] = |[i·d, i·d + l) ∩ [j·l', (j+1)·l')| / d.

    The weight of compressed token i in selection block j is its overlap with the block counted in strides.
    For l' a multiple of d and l a multiple of d this is the paper's eq. 9,
    ``p_slc[j] = sum_{m < l'/d} sum_{n < l/d} p_cmp[(l'/d)·j + m − n]`` (the index aligned so that compressed
    token i starts at position i·d): with l = 32, d = 16, l' = 64 block j receives tokens 4j − 1 .. 4j + 3 with
    weights 1, 2, 2, 2, 1 — the two tokens that straddle a block boundary count half. Defined the same way for
    any l, d, l'.
    """
    i = torch.arange(num_cmp, device=device, dtype=torch.float64)[:, None]
    j = torch.arange(num_blocks, device=device, dtype=torch.float64)[None, :]
    lo = torch.maximum(i * stride, j * select_block_size)
    hi = torch.minimum(i * stride + block_size, (j + 1) * select_block_size)
    return ((hi - lo).clamp_min(0) / stride).to(torch.float32)


# ------------------------------------------------------------------------------------------------------
# Visible sets: boolean masks [n queries, ..., m keys] from the queries' positions ``pos [n]``.


def _cmp_visible(pos: torch.Tensor, num_cmp: int, block_size: int, stride: int) -> torch.Tensor:
    """[n, num_cmp]: compressed token i is visible to position t iff i·d + l − 1 <= t."""
    i = torch.arange(num_cmp, device=pos.device)
    return (i[None, :] * stride + block_size - 1) <= pos[:, None]


def _window_visible(pos: torch.Tensor, num_keys: int, window: int) -> torch.Tensor:
    """[n, num_keys]: position p is visible to position t iff t − w < p <= t."""
    p = torch.arange(num_keys, device=pos.device)[None, :]
    return (p <= pos[:, None]) & (p > pos[:, None] - window)


def _selected_visible(pos: torch.Tensor, block_idx: torch.Tensor, num_keys: int,
                      select_block_size: int) -> torch.Tensor:
    """[n, Hk, num_keys]: position p is visible iff its block is listed in ``block_idx [n, Hk, S]`` and p <= t.

    Entries < 0 are padding; a block listed twice counts once (the union of the listed blocks).
    """
    n, hk, _ = block_idx.shape
    nb = -(-num_keys // select_block_size)
    listed = torch.zeros(n, hk, nb + 1, dtype=torch.bool, device=pos.device)  # column nb collects the padding
    idx = block_idx.long()
    idx = torch.where((idx >= 0) & (idx < nb), idx, nb)
    listed.scatter_(2, idx, True)
    p = torch.arange(num_keys, device=pos.device)
    by_pos = listed[:, :, p // select_block_size]  # [n, Hk, num_keys]
    return by_pos & (p[None, None, :] <= pos[:, None, None])


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, scale: float):
    """Softmax attention in fp32 with grouped KV heads and a keep-mask.

    q ``[n, H, D]``, k ``[m, Hk, D]``, v ``[m, Hk, Dv]``, keep ``[n, m]`` or ``[n, Hk, m]`` (shared by the G
    heads of a group). Returns o ``[n, H, Dv]`` fp32 and lse ``[n, H]`` fp32 (natural log); a row that keeps
    nothing gives o = 0 and lse = −inf.
    """
    n, h, _ = q.shape
    hk = k.shape[1]
    g = h // hk
    s = torch.einsum("nkgd,mkd->nkgm", q.float().view(n, hk, g, -1), k.float()) * scale  # [n, Hk, G, m]
    keep = keep[:, None, None, :] if keep.dim() == 2 else keep[:, :, None, :]
    s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [n, Hk, G]
    p = torch.exp(s - lse[..., None].clamp_min(torch.finfo(torch.float32).min))
    p = torch.where(keep, p, torch.zeros((), dtype=p.dtype, device=p.device))
    o = torch.einsum("nkgm,mkd->nkgd", p, v.float())
    return o.reshape(n, h, -1), lse.reshape(n, h)


def _bounds(cu: torch.Tensor) -> list[tuple[int, int]]:
    b = cu.tolist()
    return list(zip(b[:-1], b[1:]))


def _max_seqlen(cu_seqlens: torch.Tensor) -> int:
    return max([e - s for s, e in _bounds(cu_seqlens)], default=0)


# ------------------------------------------------------------------------------------------------------
# The ops


def nsa_compress_attention(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    cu_seqlens: torch.Tensor,
    cu_seqlens_cmp: torch.Tensor,
    *,
    block_size: int = BLOCK_SIZE,
    stride: int = STRIDE,
    softmax_scale: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of every query over the compressed keys of its own sequence that are complete and causal.

    Args:
        q: ``[T, H, D]`` fp32 / fp16 / bf16.
        k_cmp: ``[Tc, Hk, D]``, v_cmp: ``[Tc, Hk, Dv]``: compressed tokens packed by ``cu_seqlens_cmp``
            (compressed token i of sequence b is row ``cu_seqlens_cmp[b] + i``, covering raw positions
            [i·d, i·d + l) of that sequence).
        cu_seqlens, cu_seqlens_cmp: ``[B+1]`` int32.
        block_size l, stride d: the compression geometry.
        softmax_scale: multiplies q.k (None: D^-1/2).
    Returns:
        ``o [T, H, Dv]`` in q's dtype and ``lse [T, H]`` fp32 (natural log). Query t sees compressed token i
        iff i·d + l − 1 <= t (and i < the sequence's compressed count); a query that sees none — every t < l − 1
        — gets o = 0 and lse = −inf.
    """
    t_all, h, d = q.shape
    scale = default_scale(d, softmax_scale)
    o = torch.zeros(t_all, h, v_cmp.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.full((t_all, h), float("-inf"), dtype=torch.float32, device=q.device)
    for (s0, s1), (c0, c1) in zip(_bounds(cu_seqlens), _bounds(cu_seqlens_cmp)):
        if s1 == s0:
            continue
        pos = torch.arange(s1 - s0, device=q.device)
        keep = _cmp_visible(pos, c1 - c0, block_size, stride)
        o[s0:s1], lse[s0:s1] = _attend(q[s0:s1], k_cmp[c0:c1], v_cmp[c0:c1], keep, scale)
    return o.to(q.dtype), lse


def _block_scores_rows(q, pos, k_cmp, lse, block_size, stride, select_block_size, num_blocks, scale):
    """Scores ``[n, Hk, num_blocks]`` fp32 of queries ``q [n, H, D]`` at positions ``pos`` over one sequence's
    compressed keys ``k_cmp [m, Hk, D]``, from their compressed-attention ``lse [n, H]``."""
    n, h, _ = q.shape
    m, hk, _ = k_cmp.shape
    g = h // hk
    keep = _cmp_visible(pos, m, block_size, stride)[:, None, None, :]  # [n, 1, 1, m]
    s = torch.einsum("nkgd,mkd->nkgm", q.float().view(n, hk, g, -1), k_cmp.float()) * scale
    p = torch.exp(s - lse.view(n, hk, g, 1))
    p = torch.where(keep, p, torch.zeros((), dtype=p.dtype, device=p.device))  # also rows with lse = -inf
    w = overlap_weights(m, num_blocks, block_size, stride, select_block_size, device=q.device)
    return torch.einsum("nkgm,mj->nkj", p, w)


def nsa_block_scores(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor,
    cu_seqlens_cmp: torch.Tensor,
    *,
    block_size: int = BLOCK_SIZE,
    stride: int = STRIDE,
    select_block_size: int = SELECT_BLOCK_SIZE,
    softmax_scale: Optional[float] = None,
    max_seqlen: Optional[int] = None,
) -> torch.Tensor:
    """Importance of every selection block for every query and KV group (no gradient).

    scores[t, kh, j] = sum over the G heads h of group kh, and over the compressed tokens i visible to t, of
    p_cmp[t, h, i] · W[i, j], with p_cmp = exp(scale · q.k_cmp − lse) the compressed attention probabilities
    and W :func:`overlap_weights` (the paper's eq. 9).

    Args:
        q ``[T, H, D]``, k_cmp ``[Tc, Hk, D]``, cu_seqlens / cu_seqlens_cmp ``[B+1]`` int32: as for
        :func:`nsa_compress_attention`; lse ``[T, H]`` fp32: its second output.
        max_seqlen: sizes the block axis, NB = ceil(max_seqlen / l') (None: the longest sequence).
    Returns:
        ``scores [T, Hk, NB]`` fp32; blocks past a query's own (j > t // l') score 0, and so does every
        block of a query that sees no compressed token.
    """
    t_all, h, d = q.shape
    hk = k_cmp.shape[1]
    scale = default_scale(d, softmax_scale)
    max_len = _max_seqlen(cu_seqlens) if max_seqlen is None else int(max_seqlen)
    nb = -(-max_len // select_block_size)
    scores = torch.zeros(t_all, hk, nb, dtype=torch.float32, device=q.device)
    with torch.no_grad():
        for (s0, s1), (c0, c1) in zip(_bounds(cu_seqlens), _bounds(cu_seqlens_cmp)):
            if s1 == s0:
                continue
            pos = torch.arange(s1 - s0, device=q.device)
            scores[s0:s1] = _block_scores_rows(q[s0:s1], pos, k_cmp[c0:c1], lse[s0:s1].float(), block_size, stride,
                                               select_block_size, nb, scale)
    return scores


def _topk_rows(scores: torch.Tensor, pos: torch.Tensor, num_selected: int, select_block_size: int, num_init: int,
               num_local: int) -> torch.Tensor:
    """Block indices ``[n, Hk, num_selected]`` int32 for score rows ``[n, Hk, NB]`` of queries at ``pos [n]``."""
    n, hk, nb = scores.shape
    j = torch.arange(nb, device=scores.device)[None, :]  # [1, NB]
    cur = (pos // select_block_size)[:, None]  # [n, 1] the block holding t
    causal = j <= cur
    forced = causal & ((j < num_init) | (j > cur - num_local))
    key = scores.float().masked_fill(~causal[:, None, :], float("-inf"))
    key = key.masked_fill(forced[:, None, :], float("inf"))
    # Stable descending sort: equal keys keep index order, so ties go to the lower block index, and causal
    # blocks scoring -inf still come before the non-causal ones (which all sit above them).
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices[..., :num_selected]  # [n, Hk, <=S]
    count = torch.minimum(cur + 1, torch.full_like(cur, nb))[:, :, None]  # causal blocks that exist
    slot = torch.arange(order.shape[-1], device=scores.device)
    order = torch.where(slot < count, order, nb)  # drop the non-causal picks, sorted last
    order = torch.sort(order, dim=-1).values
    out = torch.full((n, hk, num_selected), -1, dtype=torch.int32, device=scores.device)
    out[..., :order.shape[-1]] = torch.where(order < nb, order, -1).to(torch.int32)
    return out


def nsa_topk_blocks(
    scores: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    num_selected: int = NUM_SELECTED,
    select_block_size: int = SELECT_BLOCK_SIZE,
    num_init: int = NUM_INIT,
    num_local: int = NUM_LOCAL,
) -> torch.Tensor:
    """The n selection blocks of every query and KV group (no gradient).

    Args:
        scores: ``[T, Hk, NB]`` float (:func:`nsa_block_scores`; no NaN).
        cu_seqlens: ``[B+1]`` int32; a token's position t in its sequence gives its block t // l'.
        num_selected n (>= 1), select_block_size l', num_init, num_local.
    Returns:
        ``block_idx [T, Hk, n]`` int32. The candidates of query t are the causal blocks
        0 .. min(t // l', NB − 1). Always kept: blocks j < ``num_init`` and the ``num_local`` most recent,
        t // l' − num_local < j <= t // l' (the block holding t and the one before it by default). The other
        slots take the highest-scoring candidates; equal scores go to the lower block index (the forced blocks
        too, when n is smaller than their number). The chosen blocks are listed in ascending order, then
        −1 padding when there are fewer than n candidates.
    """
    t_all = scores.shape[0]
    out = torch.full((t_all, scores.shape[1], num_selected), -1, dtype=torch.int32, device=scores.device)
    for s0, s1 in _bounds(cu_seqlens):
        if s1 > s0:
            pos = torch.arange(s1 - s0, device=scores.device)
            out[s0:s1] = _topk_rows(scores[s0:s1], pos, num_selected, select_block_size, num_init, num_local)
    return out


def nsa_selected_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_idx: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    select_block_size: int = SELECT_BLOCK_SIZE,
    softmax_scale: Optional[float] = None,
    return_lse: bool = False,
):
    """Attention of every query over the union of its selected blocks, causal inside them.

    Args:
        q ``[T, H, D]``, k ``[T, Hk, D]``, v ``[T, Hk, Dv]``: one float dtype.
        block_idx: ``[T, Hk, S]`` int, the blocks of each query and KV group (:func:`nsa_topk_blocks`);
            entries < 0 are padding, blocks past the sequence or the query are empty.
        cu_seqlens ``[B+1]`` int32, select_block_size l', softmax_scale (None: D^-1/2).
    Returns:
        ``o [T, H, Dv]`` in q's dtype (0 for a query with nothing selected); with ``return_lse`` also
        ``lse [T, H]`` fp32.
    """
    t_all, h, d = q.shape
    scale = default_scale(d, softmax_scale)
    o = torch.zeros(t_all, h, v.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.full((t_all, h), float("-inf"), dtype=torch.float32, device=q.device)
    for s0, s1 in _bounds(cu_seqlens):
        if s1 == s0:
            continue
        pos = torch.arange(s1 - s0, device=q.device)
        keep = _selected_visible(pos, block_idx[s0:s1], s1 - s0, select_block_size)
        o[s0:s1], lse[s0:s1] = _attend(q[s0:s1], k[s0:s1], v[s0:s1], keep, scale)
    o = o.to(q.dtype)
    return (o, lse) if return_lse else o


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    window: int = WINDOW,
    softmax_scale: Optional[float] = None,
    return_lse: bool = False,
):
    """Causal attention over the last ``window`` positions: query t sees positions t − w < p <= t.

    Args:
        q ``[T, H, D]``, k ``[T, Hk, D]``, v ``[T, Hk, Dv]``, cu_seqlens ``[B+1]`` int32, window w >= 1.
    Returns:
        ``o [T, H, Dv]`` in q's dtype; with ``return_lse`` also ``lse [T, H]`` fp32.
    """
    t_all, h, d = q.shape
    scale = default_scale(d, softmax_scale)
    o = torch.zeros(t_all, h, v.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.full((t_all, h), float("-inf"), dtype=torch.float32, device=q.device)
    for s0, s1 in _bounds(cu_seqlens):
        if s1 == s0:
            continue
        pos = torch.arange(s1 - s0, device=q.device)
        o[s0:s1], lse[s0:s1] = _attend(q[s0:s1], k[s0:s1], v[s0:s1], _window_visible(pos, s1 - s0, window), scale)
    o = o.to(q.dtype)
    return (o, lse) if return_lse else o


def gate_combine(gates: torch.Tensor, o_cmp: torch.Tensor, o_sel: torch.Tensor, o_win: torch.Tensor) -> torch.Tensor:
    """o = g_cmp·o_cmp + g_sel·o_sel + g_win·o_win in fp32, in o_cmp's dtype. gates ``[..., H, 3]`` (the
    gate values themselves, e.g. sigmoid outputs: no activation is applied here), outputs ``[..., H, Dv]``."""
    g = gates.float()
    o = g[..., 0:1] * o_cmp.float() + g[..., 1:2] * o_sel.float() + g[..., 2:3] * o_win.float()
    return o.to(o_cmp.dtype)


def nsa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    gates: torch.Tensor,
    cu_seqlens: torch.Tensor,
    cu_seqlens_cmp: torch.Tensor,
    *,
    block_size: int = BLOCK_SIZE,
    stride: int = STRIDE,
    select_block_size: int = SELECT_BLOCK_SIZE,
    num_selected: int = NUM_SELECTED,
    window: int = WINDOW,
    num_init: int = NUM_INIT,
    num_local: int = NUM_LOCAL,
    softmax_scale: Optional[float] = None,
) -> torch.Tensor:
    """Native Sparse Attention: the gated sum of the compressed, selected and sliding-window branches.

    Args:
        q ``[T, H, D]``; k ``[T, Hk, D]``, v ``[T, Hk, Dv]`` (the selected and window branches' keys and
        values); k_cmp ``[Tc, Hk, D]``, v_cmp ``[Tc, Hk, Dv]`` (the compressed tokens, packed by
        ``cu_seqlens_cmp``); gates ``[T, H, 3]`` (g_cmp, g_sel, g_win per head, already activated);
        cu_seqlens / cu_seqlens_cmp ``[B+1]`` int32. The geometry and budget as in the module docstring.
    Returns:
        ``o [T, H, Dv]`` in q's dtype = g_cmp·o_cmp + g_sel·o_sel + g_win·o_win, where the selected branch
        attends over the blocks :func:`nsa_topk_blocks` picks from :func:`nsa_block_scores` of the compressed
        branch. Differentiable in q, k, v, k_cmp, v_cmp and gates (the selection itself carries no gradient).
    """
    scale = default_scale(q.shape[-1], softmax_scale)
    geo = dict(block_size=block_size, stride=stride)
    o_cmp, lse = nsa_compress_attention(q, k_cmp, v_cmp, cu_seqlens, cu_seqlens_cmp, softmax_scale=scale, **geo)
    scores = nsa_block_scores(q.detach(), k_cmp.detach(), lse.detach(), cu_seqlens, cu_seqlens_cmp,
                              select_block_size=select_block_size, softmax_scale=scale, **geo)
    block_idx = nsa_topk_blocks(scores, cu_seqlens, num_selected=num_selected, select_block_size=select_block_size,
                                num_init=num_init, num_local=num_local)
    o_sel = nsa_selected_attention(q, k, v, block_idx, cu_seqlens, select_block_size=select_block_size,
                                   softmax_scale=scale)
    o_win = sliding_window_attention(q, k, v, cu_seqlens, window=window, softmax_scale=scale)
    return gate_combine(gates, o_cmp, o_sel, o_win)


def nsa_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_cmp_cache: torch.Tensor,
    v_cmp_cache: torch.Tensor,
    seqlens: torch.Tensor,
    cmp_lens: torch.Tensor,
    gates: torch.Tensor,
    *,
    block_size: int = BLOCK_SIZE,
    stride: int = STRIDE,
    select_block_size: int = SELECT_BLOCK_SIZE,
    num_selected: int = NUM_SELECTED,
    window: int = WINDOW,
    num_init: int = NUM_INIT,
    num_local: int = NUM_LOCAL,
    softmax_scale: Optional[float] = None,
) -> torch.Tensor:
    """One NSA decode step per sequence: the last row of :func:`nsa_attention` for the token just appended.

    Args:
        q: ``[B, H, D]`` the new token's queries; it sits at position t = seqlens[b] − 1.
        k_cache ``[B, Smax, Hk, D]``, v_cache ``[B, Smax, Hk, Dv]``: raw keys / values, the new token's
            included (rows at or past seqlens[b] are never read).
        k_cmp_cache ``[B, Cmax, Hk, D]``, v_cmp_cache ``[B, Cmax, Hk, Dv]``: compressed tokens, the first
            cmp_lens[b] valid (rows past it are never read).
        seqlens ``[B]``, cmp_lens ``[B]`` int32; gates ``[B, H, 3]``.
    Returns:
        ``o [B, H, Dv]`` in q's dtype. A sequence of length 0 gives 0.
    """
    b_all, h, d = q.shape
    scale = default_scale(d, softmax_scale)
    out = torch.zeros(b_all, h, v_cache.shape[-1], dtype=q.dtype, device=q.device)
    for b, (n, c) in enumerate(zip(seqlens.tolist(), cmp_lens.tolist())):
        if n <= 0:
            continue
        pos = torch.tensor([n - 1], device=q.device)
        qb = q[b:b + 1]
        kc, vc = k_cmp_cache[b, :c], v_cmp_cache[b, :c]
        o_cmp, lse = _attend(qb, kc, vc, _cmp_visible(pos, c, block_size, stride), scale)
        nb = -(-n // select_block_size)
        scores = _block_scores_rows(qb, pos, kc, lse, block_size, stride, select_block_size, nb, scale)
        block_idx = _topk_rows(scores, pos, num_selected, select_block_size, num_init, num_local)
        k, v = k_cache[b, :n], v_cache[b, :n]
        o_sel, _ = _attend(qb, k, v, _selected_visible(pos, block_idx, n, select_block_size), scale)
        o_win, _ = _attend(qb, k, v, _window_visible(pos, n, window), scale)
        # each branch rounded to q's dtype before the gated sum, as nsa_attention's branches are
        branches = [o.to(q.dtype) for o in (o_cmp, o_sel, o_win)]
        out[b] = gate_combine(gates[b:b + 1], *branches)[0]
    return out
