"""Public Native Sparse Attention (NSA) ops: validation, backend dispatch, autograd.

Semantics, letters and defaults: ``r1kernels.reference.sparse`` (l = 32, d = 16, l' = 64, n = 16 counting
1 initial + 2 local blocks, w = 512). Backends: ``reference`` (any device, small inputs) and ``triton``
(``r1kernels.triton.sparse``; D and Dv multiples of 16 up to 256; the score kernel needs l' a multiple of d
with l'/d a power of two). ``backend="auto"`` runs Triton on CUDA tensors and the reference on the CPU.

``max_seqlen`` (the longest sequence of ``cu_seqlens``) sizes the kernels' grids and the score tensor's
block axis; when it is None it is read from ``cu_seqlens`` — one device-to-host sync. Training and serving
loops pass it (``nsa_attention`` reads it once for all its pieces).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..reference import sparse as ref
from .._dispatch import Impl, Op, always, triton_check
from ._validate import FLOAT_DTYPES, check_tensor

_INT_DTYPES = (torch.int32, torch.int64)


# ------------------------------------------------------------------------------------------------------
# Validation


def _check_geometry(op: str, **values: int) -> None:
    for name, v in values.items():
        low = 0 if name in ("num_init", "num_local") else 1
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise ValueError(f"r1kernels.ops.{op}: {name} must be an int >= {low}, got {v!r}")


def _check_heads(op: str, q: torch.Tensor, kv_name: str, kv: torch.Tensor) -> None:
    h, hk = q.shape[-2], kv.shape[-2]
    if hk == 0 or h % hk:
        raise ValueError(f"r1kernels.ops.{op}: the query heads H = {h} must be a multiple of {kv_name}'s KV heads "
                         f"Hk = {hk} (G = H / Hk query heads share a KV head)")


def _check_cu(op: str, name: str, cu: torch.Tensor, device: torch.device, b1: Optional[int] = None) -> None:
    check_tensor(op, name, cu, ndim=1, dtypes=(torch.int32,), device=device,
                 shape=None if b1 is None else (b1,))
    if cu.numel() < 1:
        raise ValueError(f"r1kernels.ops.{op}: {name} must have B + 1 >= 1 entries, got an empty tensor")


def _max_seqlen(cu_seqlens: torch.Tensor, max_seqlen: Optional[int]) -> int:
    """The longest sequence: ``max_seqlen`` as given, else read from cu_seqlens (a device-to-host sync)."""
    if max_seqlen is not None:
        if int(max_seqlen) < 0:
            raise ValueError(f"r1kernels.ops: max_seqlen must be >= 0, got {max_seqlen}")
        return int(max_seqlen)
    if cu_seqlens.numel() < 2:
        return 0
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


def _check_qkv(op: str, q, k, v, k_name: str = "k", v_name: str = "v", same_rows: bool = True) -> None:
    check_tensor(op, "q", q, ndim=3, dtypes=FLOAT_DTYPES)
    t, _, d = q.shape
    check_tensor(op, k_name, k, shape=(t if same_rows else None, None, d), dtypes=(q.dtype,), device=q.device)
    check_tensor(op, v_name, v, shape=(k.shape[0], k.shape[1], None), dtypes=(q.dtype,), device=q.device)
    _check_heads(op, q, k_name, k)


def _triton_why(q: torch.Tensor, dv: int, block_size: int = ref.BLOCK_SIZE, stride: int = ref.STRIDE,
                select_block_size: int = ref.SELECT_BLOCK_SIZE) -> Optional[str]:
    why = triton_check(q)
    if why is None:
        from ..triton.sparse import triton_reason  # triton is importable once triton_check passed

        why = triton_reason(q.shape[-1], dv, block_size, stride, select_block_size)
    return why


# ------------------------------------------------------------------------------------------------------
# Autograd


class _BandAttention(torch.autograd.Function):
    """Compressed or sliding-window attention through the banded Triton kernels. Returns ``(o, lse [H, T])``;
    differentiable in q, k, v through o and lse."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, off, stride, window, scale):
        from ..triton.sparse import band_fwd

        o, lse = band_fwd(q, k, v, cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:], None, max_q, off, stride, window, scale)
        ctx.save_for_backward(q, k, v, o, lse, cu_q, cu_k)
        ctx.args = (max_q, max_k, off, stride, window, scale)
        ctx.set_materialize_grads(False)
        return o, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, dlse):
        from ..triton.sparse import band_bwd

        q, k, v, o, lse, cu_q, cu_k = ctx.saved_tensors
        if do is None and dlse is None:
            return (None,) * 11
        if do is None:
            do = torch.zeros_like(o)
        dq, dk, dv = band_bwd(do, q, k, v, o, lse, cu_q, cu_k, *ctx.args, dlse=dlse)
        need = ctx.needs_input_grad
        return (dq if need[0] else None), (dk if need[1] else None), (dv if need[2] else None), *(None,) * 8


class _SelectedAttention(torch.autograd.Function):
    """Selected-block attention through the Triton kernels; differentiable in q, k, v (not in the indices)."""

    @staticmethod
    def forward(ctx, q, k, v, block_idx, cu_seqlens, select_block_size, scale):
        from ..triton.sparse import selected_fwd, token_positions

        _, pos, kstart = token_positions(cu_seqlens, q.shape[0])
        o, lse = selected_fwd(q, k, v, block_idx, pos, kstart, select_block_size, scale)
        ctx.save_for_backward(q, k, v, o, lse, block_idx, cu_seqlens)
        ctx.args = (select_block_size, scale)
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, _dlse):
        from ..triton.sparse import selected_bwd

        q, k, v, o, lse, block_idx, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = selected_bwd(do, q, k, v, o, lse, block_idx, cu_seqlens, *ctx.args)
        need = ctx.needs_input_grad
        return (dq if need[0] else None), (dk if need[1] else None), (dv if need[2] else None), None, None, None, None


class _GateCombine(torch.autograd.Function):
    """o = g_cmp·o_cmp + g_sel·o_sel + g_win·o_win in one fused Triton pass, forward and backward."""

    @staticmethod
    def forward(ctx, gates, a, b, c):
        from ..triton.sparse import gate_combine_fwd

        ctx.save_for_backward(gates, a, b, c)
        return gate_combine_fwd(gates, a, b, c)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        from ..triton.sparse import gate_combine_bwd

        gates, a, b, c = ctx.saved_tensors
        grads = gate_combine_bwd(do, gates, a, b, c)
        return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad))


# ------------------------------------------------------------------------------------------------------
# Backends. Every function takes the op's arguments in one order (dispatch passes them positionally).


def _compress_ref(q, k_cmp, v_cmp, cu, cu_cmp, block_size, stride, scale, max_seqlen):
    return ref.nsa_compress_attention(q, k_cmp, v_cmp, cu, cu_cmp, block_size=block_size, stride=stride,
                                      softmax_scale=scale)


def _compress_triton(q, k_cmp, v_cmp, cu, cu_cmp, block_size, stride, scale, max_seqlen):
    from ..triton.sparse import compressed_max_len

    o, lse = _BandAttention.apply(q, k_cmp, v_cmp, cu, cu_cmp, max_seqlen,
                                  compressed_max_len(max_seqlen, block_size, stride), block_size - 1, stride, None,
                                  scale)
    return o, lse.t()  # [T, H], a view of the kernels' [H, T]


def _compress_check(q, k_cmp, v_cmp, cu, cu_cmp, block_size, stride, scale, max_seqlen):
    return _triton_why(q, v_cmp.shape[-1])


def _scores_ref(q, k_cmp, lse, cu, cu_cmp, block_size, stride, select_block_size, scale, max_seqlen):
    return ref.nsa_block_scores(q, k_cmp, lse, cu, cu_cmp, block_size=block_size, stride=stride,
                                select_block_size=select_block_size, softmax_scale=scale, max_seqlen=max_seqlen)


def _scores_triton(q, k_cmp, lse, cu, cu_cmp, block_size, stride, select_block_size, scale, max_seqlen):
    from ..triton.sparse import block_scores

    nb = -(-max_seqlen // select_block_size)
    return block_scores(q.detach(), k_cmp.detach(), lse.detach(), cu[:-1], cu[1:], cu_cmp[:-1], cu_cmp[1:], None,
                        max_seqlen, nb, block_size, stride, select_block_size, scale)


def _scores_check(q, k_cmp, lse, cu, cu_cmp, block_size, stride, select_block_size, scale, max_seqlen):
    return _triton_why(q, q.shape[-1], block_size, stride, select_block_size)


def _topk_ref(scores, cu, num_selected, select_block_size, num_init, num_local):
    return ref.nsa_topk_blocks(scores, cu, num_selected=num_selected, select_block_size=select_block_size,
                               num_init=num_init, num_local=num_local)


def _topk_triton(scores, cu, num_selected, select_block_size, num_init, num_local):
    from ..triton.sparse import token_positions, topk_blocks

    _, pos, _ = token_positions(cu, scores.shape[0])
    return topk_blocks(scores.detach(), pos, num_selected, select_block_size, num_init, num_local)


def _selected_ref(q, k, v, block_idx, cu, select_block_size, scale):
    return ref.nsa_selected_attention(q, k, v, block_idx, cu, select_block_size=select_block_size, softmax_scale=scale)


def _selected_triton(q, k, v, block_idx, cu, select_block_size, scale):
    return _SelectedAttention.apply(q, k, v, block_idx.to(torch.int32), cu, select_block_size, scale)[0]


def _selected_check(q, k, v, block_idx, cu, select_block_size, scale):
    return _triton_why(q, v.shape[-1])


def _window_ref(q, k, v, cu, window, scale, max_seqlen):
    return ref.sliding_window_attention(q, k, v, cu, window=window, softmax_scale=scale)


def _window_triton(q, k, v, cu, window, scale, max_seqlen):
    return _BandAttention.apply(q, k, v, cu, cu, max_seqlen, max_seqlen, 0, 1, window, scale)[0]


def _window_check(q, k, v, cu, window, scale, max_seqlen):
    return _triton_why(q, v.shape[-1])


def _nsa_ref(q, k, v, k_cmp, v_cmp, gates, cu, cu_cmp, block_size, stride, select_block_size, num_selected, window,
             num_init, num_local, scale, max_seqlen):
    return ref.nsa_attention(q, k, v, k_cmp, v_cmp, gates, cu, cu_cmp, block_size=block_size, stride=stride,
                             select_block_size=select_block_size, num_selected=num_selected, window=window,
                             num_init=num_init, num_local=num_local, softmax_scale=scale)


def _nsa_triton(q, k, v, k_cmp, v_cmp, gates, cu, cu_cmp, block_size, stride, select_block_size, num_selected,
                window, num_init, num_local, scale, max_seqlen):
    o_cmp, lse = _compress_triton(q, k_cmp, v_cmp, cu, cu_cmp, block_size, stride, scale, max_seqlen)
    with torch.no_grad():
        scores = _scores_triton(q, k_cmp, lse, cu, cu_cmp, block_size, stride, select_block_size, scale, max_seqlen)
        block_idx = _topk_triton(scores, cu, num_selected, select_block_size, num_init, num_local)
        del scores
    o_sel = _selected_triton(q, k, v, block_idx, cu, select_block_size, scale)
    o_win = _window_triton(q, k, v, cu, window, scale, max_seqlen)
    return _GateCombine.apply(gates, o_cmp, o_sel, o_win)


def _nsa_check(q, k, v, k_cmp, v_cmp, gates, cu, cu_cmp, block_size, stride, select_block_size, *rest):
    return _triton_why(q, v.shape[-1], block_size, stride, select_block_size)


def _decode_ref(q, k_cache, v_cache, k_cmp_cache, v_cmp_cache, seqlens, cmp_lens, gates, block_size, stride,
                select_block_size, num_selected, window, num_init, num_local, scale):
    return ref.nsa_decode(q, k_cache, v_cache, k_cmp_cache, v_cmp_cache, seqlens, cmp_lens, gates,
                          block_size=block_size, stride=stride, select_block_size=select_block_size,
                          num_selected=num_selected, window=window, num_init=num_init, num_local=num_local,
                          softmax_scale=scale)


def _decode_triton(*args):
    from ..triton.sparse import nsa_decode

    return nsa_decode(*args)


def _decode_check(q, k_cache, v_cache, k_cmp_cache, v_cmp_cache, seqlens, cmp_lens, gates, block_size, stride,
                  select_block_size, *rest):
    return _triton_why(q, v_cache.shape[-1], block_size, stride, select_block_size)


NSA_COMPRESS_ATTENTION = Op("nsa_compress_attention", {"reference": Impl(_compress_ref, always),
                                                       "triton": Impl(_compress_triton, _compress_check)})
NSA_BLOCK_SCORES = Op("nsa_block_scores", {"reference": Impl(_scores_ref, always),
                                           "triton": Impl(_scores_triton, _scores_check)})
NSA_TOPK_BLOCKS = Op("nsa_topk_blocks", {"reference": Impl(_topk_ref, always),
                                         "triton": Impl(_topk_triton, triton_check)})
NSA_SELECTED_ATTENTION = Op("nsa_selected_attention", {"reference": Impl(_selected_ref, always),
                                                       "triton": Impl(_selected_triton, _selected_check)})
SLIDING_WINDOW_ATTENTION = Op("sliding_window_attention", {"reference": Impl(_window_ref, always),
                                                           "triton": Impl(_window_triton, _window_check)})
NSA_ATTENTION = Op("nsa_attention", {"reference": Impl(_nsa_ref, always),
                                     "triton": Impl(_nsa_triton, _nsa_check)})
NSA_DECODE = Op("nsa_decode", {"reference": Impl(_decode_ref, always),
                               "triton": Impl(_decode_triton, _decode_check)})

# Every NSA op, for ALL_OPS.
SPARSE_NSA_OPS = (NSA_COMPRESS_ATTENTION, NSA_BLOCK_SCORES, NSA_TOPK_BLOCKS, NSA_SELECTED_ATTENTION,
                  SLIDING_WINDOW_ATTENTION, NSA_ATTENTION, NSA_DECODE)


# ------------------------------------------------------------------------------------------------------
# Public API


def nsa_compress_attention(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    cu_seqlens: torch.Tensor,
    cu_seqlens_cmp: torch.Tensor,
    *,
    block_size: int = ref.BLOCK_SIZE,
    stride: int = ref.STRIDE,
    softmax_scale: Optional[float] = None,
    max_seqlen: Optional[int] = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """NSA's compressed branch: each query attends over the complete, causal compressed tokens of its sequence.

    Args:
        q: ``[T, H, D]`` fp32 / fp16 / bf16, packed by ``cu_seqlens``.
        k_cmp: ``[Tc, Hk, D]``; v_cmp: ``[Tc, Hk, Dv]``: compressed tokens packed by ``cu_seqlens_cmp``
            (token i of sequence b, row ``cu_seqlens_cmp[b] + i``, summarises positions [i·d, i·d + l); see
            ``reference.sparse.compressed_cu_seqlens``). q's dtype and device; H a multiple of Hk.
        cu_seqlens, cu_seqlens_cmp: ``[B+1]`` int32, ``cu_seqlens[-1] == T``.
        block_size l, stride d; softmax_scale (None: D^-1/2); max_seqlen (None: read from cu_seqlens, a sync).
    Returns:
        ``(o [T, H, Dv] in q's dtype, lse [T, H] fp32 natural log)``. Query t sees compressed token i iff
        i·d + l − 1 <= t. Queries that see no compressed token (t < l − 1) get o = 0 and lse = −inf.
    Differentiable in q, k_cmp, v_cmp through o and lse.
    """
    op = "nsa_compress_attention"
    _check_qkv(op, q, k_cmp, v_cmp, "k_cmp", "v_cmp", same_rows=False)
    _check_cu(op, "cu_seqlens", cu_seqlens, q.device)
    _check_cu(op, "cu_seqlens_cmp", cu_seqlens_cmp, q.device, cu_seqlens.numel())
    _check_geometry(op, block_size=block_size, stride=stride)
    scale = ref.default_scale(q.shape[-1], softmax_scale)
    return NSA_COMPRESS_ATTENTION(backend, q, k_cmp, v_cmp, cu_seqlens, cu_seqlens_cmp, block_size, stride, scale,
                                  _max_seqlen(cu_seqlens, max_seqlen))


def nsa_block_scores(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor,
    cu_seqlens_cmp: torch.Tensor,
    *,
    block_size: int = ref.BLOCK_SIZE,
    stride: int = ref.STRIDE,
    select_block_size: int = ref.SELECT_BLOCK_SIZE,
    softmax_scale: Optional[float] = None,
    max_seqlen: Optional[int] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Importance of every selection block for every query and KV group (no gradient).

    scores[t, kh, j] = sum over the G heads of group kh and the compressed tokens i that t sees of
    p_cmp[t, h, i] · W[i, j], W[i, j] = |[i·d, i·d + l) ∩ [j·l', (j+1)·l')| / d (the paper's eq. 9; with
    l = 32, d = 16, l' = 64 block j gets tokens 4j − 1 .. 4j + 3 weighted 1, 2, 2, 2, 1).

    Args:
        q ``[T, H, D]``, k_cmp ``[Tc, Hk, D]``, cu_seqlens / cu_seqlens_cmp: as for
        :func:`nsa_compress_attention`; lse: its ``[T, H]`` fp32 output (any strides).
        max_seqlen: NB = ceil(max_seqlen / l') columns (None: read from cu_seqlens, a sync).
    Returns:
        ``scores [T, Hk, NB]`` fp32; blocks after a query's own block score 0.
    """
    op = "nsa_block_scores"
    check_tensor(op, "q", q, ndim=3, dtypes=FLOAT_DTYPES)
    t, h, d = q.shape
    check_tensor(op, "k_cmp", k_cmp, shape=(None, None, d), dtypes=(q.dtype,), device=q.device)
    _check_heads(op, q, "k_cmp", k_cmp)
    check_tensor(op, "lse", lse, shape=(t, h), dtypes=(torch.float32,), device=q.device)
    _check_cu(op, "cu_seqlens", cu_seqlens, q.device)
    _check_cu(op, "cu_seqlens_cmp", cu_seqlens_cmp, q.device, cu_seqlens.numel())
    _check_geometry(op, block_size=block_size, stride=stride, select_block_size=select_block_size)
    scale = ref.default_scale(d, softmax_scale)
    return NSA_BLOCK_SCORES(backend, q, k_cmp, lse, cu_seqlens, cu_seqlens_cmp, block_size, stride, select_block_size,
                            scale, _max_seqlen(cu_seqlens, max_seqlen))


def nsa_topk_blocks(
    scores: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    num_selected: int = ref.NUM_SELECTED,
    select_block_size: int = ref.SELECT_BLOCK_SIZE,
    num_init: int = ref.NUM_INIT,
    num_local: int = ref.NUM_LOCAL,
    backend: str = "auto",
) -> torch.Tensor:
    """The n blocks each query and KV group attends to in the selected branch (no gradient).

    Args:
        scores: ``[T, Hk, NB]`` float, no NaN (:func:`nsa_block_scores`).
        cu_seqlens: ``[B+1]`` int32; query t's own block is t // l'.
        num_selected n >= 1 (counting the forced blocks), select_block_size l', num_init, num_local >= 0.
    Returns:
        ``block_idx [T, Hk, n]`` int32: the first ``num_init`` blocks and the ``num_local`` most recent ones
        (t // l' and the one before by default) always, then the highest-scoring causal blocks (equal scores:
        the lower index first), listed in ascending order; −1 pads when fewer than n causal blocks exist.
    """
    op = "nsa_topk_blocks"
    check_tensor(op, "scores", scores, ndim=3, dtypes=FLOAT_DTYPES)
    _check_cu(op, "cu_seqlens", cu_seqlens, scores.device)
    _check_geometry(op, num_selected=num_selected, select_block_size=select_block_size, num_init=num_init,
                    num_local=num_local)
    return NSA_TOPK_BLOCKS(backend, scores, cu_seqlens, num_selected, select_block_size, num_init, num_local)


def nsa_selected_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_idx: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    select_block_size: int = ref.SELECT_BLOCK_SIZE,
    softmax_scale: Optional[float] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """NSA's selected branch: attention over the union of each query's selected blocks, causal inside them.

    Args:
        q ``[T, H, D]``; k ``[T, Hk, D]``, v ``[T, Hk, Dv]``: one float dtype and device, H a multiple of Hk.
        block_idx: ``[T, Hk, S]`` int32 / int64, distinct block indices per row (−1: padding), as
            :func:`nsa_topk_blocks` gives them; blocks past the query are empty for it.
        cu_seqlens ``[B+1]`` int32 (``cu_seqlens[-1] == T``), select_block_size l', softmax_scale (None: D^-1/2).
    Returns:
        ``o [T, H, Dv]`` in q's dtype (0 for a query with no selected key). Differentiable in q, k, v. The
        Triton kernel loads each selected K/V block once per (query, KV group) for all G heads.
    """
    op = "nsa_selected_attention"
    _check_qkv(op, q, k, v)
    t, _, _ = q.shape
    check_tensor(op, "block_idx", block_idx, shape=(t, k.shape[1], None), dtypes=_INT_DTYPES, device=q.device)
    _check_cu(op, "cu_seqlens", cu_seqlens, q.device)
    _check_geometry(op, select_block_size=select_block_size)
    scale = ref.default_scale(q.shape[-1], softmax_scale)
    return NSA_SELECTED_ATTENTION(backend, q, k, v, block_idx, cu_seqlens, select_block_size, scale)


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    window: int = ref.WINDOW,
    softmax_scale: Optional[float] = None,
    max_seqlen: Optional[int] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Causal sliding-window attention: query t sees positions t − w < p <= t of its sequence.

    Args:
        q ``[T, H, D]``; k ``[T, Hk, D]``, v ``[T, Hk, Dv]`` (GQA: H a multiple of Hk); cu_seqlens ``[B+1]``
        int32; window w >= 1; softmax_scale (None: D^-1/2); max_seqlen (None: read from cu_seqlens, a sync).
    Returns:
        ``o [T, H, Dv]`` in q's dtype. Differentiable in q, k, v.
    """
    op = "sliding_window_attention"
    _check_qkv(op, q, k, v)
    _check_cu(op, "cu_seqlens", cu_seqlens, q.device)
    _check_geometry(op, window=window)
    scale = ref.default_scale(q.shape[-1], softmax_scale)
    return SLIDING_WINDOW_ATTENTION(backend, q, k, v, cu_seqlens, window, scale, _max_seqlen(cu_seqlens, max_seqlen))


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
    block_size: int = ref.BLOCK_SIZE,
    stride: int = ref.STRIDE,
    select_block_size: int = ref.SELECT_BLOCK_SIZE,
    num_selected: int = ref.NUM_SELECTED,
    window: int = ref.WINDOW,
    num_init: int = ref.NUM_INIT,
    num_local: int = ref.NUM_LOCAL,
    softmax_scale: Optional[float] = None,
    max_seqlen: Optional[int] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Native Sparse Attention (training / prefill): o = g_cmp·o_cmp + g_sel·o_sel + g_win·o_win.

    Args:
        q ``[T, H, D]``; k ``[T, Hk, D]``, v ``[T, Hk, Dv]``; k_cmp ``[Tc, Hk, D]``, v_cmp ``[Tc, Hk, Dv]``
        (packed by ``cu_seqlens_cmp``); gates ``[T, H, 3]`` float (g_cmp, g_sel, g_win, already activated);
        cu_seqlens / cu_seqlens_cmp ``[B+1]`` int32. Geometry and budget as in the module docstring;
        max_seqlen (None: read from cu_seqlens once, a sync).
    Returns:
        ``o [T, H, Dv]`` in q's dtype. Differentiable in q, k, v, k_cmp, v_cmp and gates; the block selection
        (scores, top-n) carries no gradient. Triton: compressed attention, its block scores, top-n, selected
        attention, window attention, and the fused gated sum.
    """
    op = "nsa_attention"
    _check_qkv(op, q, k, v)
    _check_qkv(op, q, k_cmp, v_cmp, "k_cmp", "v_cmp", same_rows=False)
    t, h, _ = q.shape
    if k_cmp.shape[1] != k.shape[1] or v_cmp.shape[2] != v.shape[2]:
        raise ValueError(f"r1kernels.ops.{op}: k_cmp / v_cmp must have k's KV heads and v's Dv: k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}, k_cmp {tuple(k_cmp.shape)}, v_cmp {tuple(v_cmp.shape)}")
    check_tensor(op, "gates", gates, shape=(t, h, 3), dtypes=FLOAT_DTYPES, device=q.device)
    _check_cu(op, "cu_seqlens", cu_seqlens, q.device)
    _check_cu(op, "cu_seqlens_cmp", cu_seqlens_cmp, q.device, cu_seqlens.numel())
    _check_geometry(op, block_size=block_size, stride=stride, select_block_size=select_block_size,
                    num_selected=num_selected, window=window, num_init=num_init, num_local=num_local)
    scale = ref.default_scale(q.shape[-1], softmax_scale)
    return NSA_ATTENTION(backend, q, k, v, k_cmp, v_cmp, gates, cu_seqlens, cu_seqlens_cmp, block_size, stride,
                         select_block_size, num_selected, window, num_init, num_local, scale,
                         _max_seqlen(cu_seqlens, max_seqlen))


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
    block_size: int = ref.BLOCK_SIZE,
    stride: int = ref.STRIDE,
    select_block_size: int = ref.SELECT_BLOCK_SIZE,
    num_selected: int = ref.NUM_SELECTED,
    window: int = ref.WINDOW,
    num_init: int = ref.NUM_INIT,
    num_local: int = ref.NUM_LOCAL,
    softmax_scale: Optional[float] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """One NSA decode step per sequence (forward only): the last row of :func:`nsa_attention` for the token
    just appended at position t = seqlens[b] − 1.

    Args:
        q: ``[B, H, D]`` the new tokens' queries.
        k_cache ``[B, Smax, Hk, D]``, v_cache ``[B, Smax, Hk, Dv]``: raw keys / values, the new token's
            included; k_cmp_cache ``[B, Cmax, Hk, D]``, v_cmp_cache ``[B, Cmax, Hk, Dv]``: compressed tokens.
            q's dtype and device; any strides whose batch stride is a multiple of the token stride.
        seqlens ``[B]`` int32 valid raw rows (<= Smax); cmp_lens ``[B]`` int32 valid compressed rows (<= Cmax;
            normally (seqlens − l) // d + 1). Rows past them are never read: they may hold anything, NaN
            included. The bounds are not checked (that would read the lengths on the host). gates ``[B, H, 3]``.
    Returns:
        ``o [B, H, Dv]`` in q's dtype.

    Bytes read per step (Triton, e bytes per element, per sequence with L = seqlens[b], Nc = cmp_lens[b]):
    Hk·Nc·(2D + Dv)·e for the compressed branch (k_cmp twice: attention, then the block scores, which need
    the final lse), Hk·min(n·l', L)·(D + Dv)·e for the selected blocks (only their causal part),
    Hk·min(w, L)·(D + Dv)·e for the window, plus H·(D + 3)·e of queries and gates and Hk·NB·4·2 bytes of
    scores written and read back (NB = ceil(Smax / l')). At L = 64k with the defaults, Hk = 4, D = Dv = 128,
    bf16: 4·4095·384·2 + 4·1024·256·2 + 4·512·256·2 ≈ 15.7 MB, against 134 MB for dense attention.
    """
    op = "nsa_decode"
    check_tensor(op, "q", q, ndim=3, dtypes=FLOAT_DTYPES)
    b, h, d = q.shape
    check_tensor(op, "k_cache", k_cache, shape=(b, None, None, d), dtypes=(q.dtype,), device=q.device)
    smax, hk = k_cache.shape[1], k_cache.shape[2]
    check_tensor(op, "v_cache", v_cache, shape=(b, smax, hk, None), dtypes=(q.dtype,), device=q.device)
    check_tensor(op, "k_cmp_cache", k_cmp_cache, shape=(b, None, hk, d), dtypes=(q.dtype,), device=q.device)
    check_tensor(op, "v_cmp_cache", v_cmp_cache, shape=(b, k_cmp_cache.shape[1], hk, v_cache.shape[3]),
                 dtypes=(q.dtype,), device=q.device)
    _check_heads(op, q, "k_cache", k_cache)
    check_tensor(op, "seqlens", seqlens, shape=(b,), dtypes=(torch.int32,), device=q.device)
    check_tensor(op, "cmp_lens", cmp_lens, shape=(b,), dtypes=(torch.int32,), device=q.device)
    check_tensor(op, "gates", gates, shape=(b, h, 3), dtypes=FLOAT_DTYPES, device=q.device)
    _check_geometry(op, block_size=block_size, stride=stride, select_block_size=select_block_size,
                    num_selected=num_selected, window=window, num_init=num_init, num_local=num_local)
    scale = ref.default_scale(d, softmax_scale)
    return NSA_DECODE(backend, q, k_cache, v_cache, k_cmp_cache, v_cmp_cache, seqlens, cmp_lens, gates, block_size,
                      stride, select_block_size, num_selected, window, num_init, num_local, scale)
