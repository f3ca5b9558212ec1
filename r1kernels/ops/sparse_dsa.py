"""Public DeepSeek Sparse Attention (DSA, DeepSeek-V3.2) ops: the lightning indexer, its top-k, sparse
absorbed-MLA attention over the selected latent rows (packed prefill, paged decode) and the indexer's KL
warm-up loss. Semantics: ``r1kernels.reference.sparse_dsa``; backends ``reference`` and ``triton``.

Letters: B batch, S query tokens, T key tokens, Hi indexer heads, Di indexer head dim, H query heads,
C latent row width (L + R), L = kv_lora_rank (= head_dim_v), K selected tokens, N pages, P page size,
M block-table width, Tt packed prefill tokens.

A V3.2 attention layer with these ops::

    scores = lightning_indexer(q_idx, k_idx, w, q_positions=pos)      # [B, S, T] fp32, causal
    idx = dsa_topk(scores, 2048, lengths=seqlens)                     # [B, S, K] int32
    out, lse = dsa_mla_decode(q, kv_cache, block_table, seqlens, idx, softmax_scale=..., head_dim_v=512)
    # dense warm-up: loss = indexer_kl_loss(scores, attn_probs.sum(heads))
"""
from __future__ import annotations

import torch

from .._dispatch import Impl, Op, always, triton_check
from ..reference import sparse_dsa as ref
from ._validate import FLOAT_DTYPES, check_tensor


def _triton_attn_check(q, kv, *_args):
    why = triton_check(q)
    if why is None:
        from ..triton.sparse_dsa import MAX_ROW  # triton is importable once triton_check passed

        if q.shape[-1] > MAX_ROW:
            why = f"the Triton kernels hold a latent row of at most {MAX_ROW} columns in one tile; C = {q.shape[-1]}"
    return why


# --------------------------------------------------------------------------------------------------------
# lightning_indexer


class _LightningIndexerTriton(torch.autograd.Function):
    """Triton indexer; the backward recomputes the per-head dots (nothing but the inputs is saved)."""

    @staticmethod
    def forward(ctx, q_idx, k_idx, weights, q_positions):
        from ..triton.sparse_dsa import lightning_indexer_fwd  # lazily: `import r1kernels` never imports triton

        ctx.save_for_backward(q_idx, k_idx, weights, q_positions)
        return lightning_indexer_fwd(q_idx, k_idx, weights, q_positions)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        from ..triton.sparse_dsa import lightning_indexer_bwd

        q_idx, k_idx, weights, q_positions = ctx.saved_tensors
        dq, dk, dw = lightning_indexer_bwd(g, q_idx, k_idx, weights, q_positions)
        need = ctx.needs_input_grad
        return (dq if need[0] else None), (dk if need[1] else None), (dw if need[2] else None), None


def _indexer_ref(q_idx, k_idx, weights, q_positions):
    return ref.lightning_indexer(q_idx, k_idx, weights, q_positions=q_positions)


def _indexer_triton_check(q_idx, k_idx, weights, q_positions):
    why = triton_check(q_idx)
    if why is None:
        from ..triton.sparse_dsa import MAX_INDEX_DIM

        if q_idx.shape[-1] > MAX_INDEX_DIM:
            why = f"the Triton indexer holds a head of at most {MAX_INDEX_DIM} columns; Di = {q_idx.shape[-1]}"
    return why


LIGHTNING_INDEXER = Op("lightning_indexer", {
    "reference": Impl(_indexer_ref, always),
    "triton": Impl(_LightningIndexerTriton.apply, _indexer_triton_check),
})


def lightning_indexer(
    q_idx: torch.Tensor,
    k_idx: torch.Tensor,
    weights: torch.Tensor,
    *,
    q_positions: torch.Tensor,
    backend: str = "auto",
) -> torch.Tensor:
    """DSA's lightning indexer: ``I[b, s, t] = sum_j weights[b, s, j] * relu(q_idx[b, s, j] . k_idx[b, t])``.

    Args:
        q_idx: ``[B, S, Hi, Di]`` fp32 / fp16 / bf16, any strides.
        k_idx: ``[B, T, Di]`` q_idx's dtype (one key per token shared by the Hi heads).
        weights: ``[B, S, Hi]`` any float dtype (V3.2's per-head weights with its scale factors folded in).
        q_positions: ``[B, S]`` int64, each query's position among the T keys.
    Returns:
        ``[B, S, T]`` fp32 scores, ``-inf`` where ``t > q_positions[b, s]`` (causal).
    Differentiable in q_idx, k_idx and weights (V3.2 trains the indexer with ``indexer_kl_loss``); the
    gradient arriving at masked entries is ignored. Backends: ``reference``; ``triton`` (Di <= 256).
    """
    op = "lightning_indexer"
    check_tensor(op, "q_idx", q_idx, ndim=4, dtypes=FLOAT_DTYPES)
    b, s, hi, di = q_idx.shape
    check_tensor(op, "k_idx", k_idx, shape=(b, None, di), dtypes=(q_idx.dtype,), device=q_idx.device)
    check_tensor(op, "weights", weights, shape=(b, s, hi), dtypes=FLOAT_DTYPES, device=q_idx.device)
    check_tensor(op, "q_positions", q_positions, shape=(b, s), dtypes=(torch.int64,), device=q_idx.device)
    return LIGHTNING_INDEXER(backend, q_idx, k_idx, weights, q_positions)


# --------------------------------------------------------------------------------------------------------
# dsa_topk


def _topk_ref(scores, k, lengths):
    return ref.dsa_topk(scores, k, lengths=lengths)


def _topk_triton(scores, k, lengths):
    from ..triton.sparse_dsa import dsa_topk as triton_topk

    return triton_topk(scores, k, lengths)


DSA_TOPK = Op("dsa_topk", {
    "reference": Impl(_topk_ref, always),
    "triton": Impl(_topk_triton, triton_check),
})


def dsa_topk(scores: torch.Tensor, k: int, *, lengths: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """The K best visible positions of every query (DSA's token selection).

    Args:
        scores: ``[B, S, T]`` float index scores, any strides (``-inf`` marks positions a query may not see:
            the indexer's causal mask).
        k: K >= 1 (K > T allowed).
        lengths: ``[B]`` int32 keys per sequence; positions ``>= lengths[b]`` are never selected.
    Returns:
        ``[B, S, K]`` int32 positions in ascending order, then ``-1`` where fewer than K are visible (score
        ``> -inf`` and inside the length; NaN never). Ties go to the lower position. The ``triton`` backend
        finds the K-th largest score by bisection over its bits (no sort) and returns exactly the
        reference's tensor. Not differentiable (integer output).
    """
    check_tensor("dsa_topk", "scores", scores, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("dsa_topk", "lengths", lengths, shape=(scores.shape[0],), dtypes=(torch.int32,), device=scores.device)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"r1kernels.ops.dsa_topk: k must be an int >= 1, got {k!r}")
    return DSA_TOPK(backend, scores, int(k), lengths)


# --------------------------------------------------------------------------------------------------------
# dsa_mla_prefill


class _DSAPrefillTriton(torch.autograd.Function):
    """Triton sparse prefill; the forward keeps out and lse (fp32 [Tt, H]) for the backward.

    Differentiable in q and kv through out and lse (d lse / d s = p enters the backward's delta).
    """

    @staticmethod
    def forward(ctx, q, kv, idx, cu_seqlens, scale, head_dim_v):
        from ..triton.sparse_dsa import dsa_mla_prefill_fwd

        out, lse, seq = dsa_mla_prefill_fwd(q, kv, idx, cu_seqlens, scale, head_dim_v)
        ctx.save_for_backward(q, kv, idx, cu_seqlens, seq, out, lse)
        ctx.scale = scale
        ctx.set_materialize_grads(False)  # an unused out or lse gets None, not a buffer of zeros
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dlse):
        from ..triton.sparse_dsa import dsa_mla_prefill_bwd

        q, kv, idx, cu_seqlens, seq, out, lse = ctx.saved_tensors
        if dout is None and dlse is None:
            return None, None, None, None, None, None
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dkv = dsa_mla_prefill_bwd(dout, q, kv, idx, cu_seqlens, seq, out, lse, ctx.scale, dlse=dlse)
        need = ctx.needs_input_grad
        return (dq if need[0] else None), (dkv if need[1] else None), None, None, None, None


def _prefill_ref(q, kv, idx, cu_seqlens, scale, head_dim_v):
    return ref.dsa_mla_prefill(q, kv, idx, cu_seqlens, softmax_scale=scale, head_dim_v=head_dim_v)


DSA_MLA_PREFILL = Op("dsa_mla_prefill", {
    "reference": Impl(_prefill_ref, always),
    "triton": Impl(_DSAPrefillTriton.apply, _triton_attn_check),
})


def _check_head_dim_v(op: str, head_dim_v, c: int) -> int:
    if isinstance(head_dim_v, bool) or not isinstance(head_dim_v, int) or not 0 < head_dim_v <= c:
        raise ValueError(f"r1kernels.ops.{op}: head_dim_v must be an int in (0, C={c}], got {head_dim_v!r}")
    return head_dim_v


def dsa_mla_prefill(
    q: torch.Tensor,
    kv: torch.Tensor,
    idx: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    softmax_scale: float,
    head_dim_v: int = 512,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse absorbed-MLA attention of packed sequences over each query's selected latent rows.

    Args:
        q: ``[Tt, H, C]`` fp32 / fp16 / bf16: per head ``[q_nope . W_UK, rope(q_pe)]``.
        kv: ``[Tt, C]`` q's dtype: one latent row ``[c_kv, rope(k_pe)]`` per token (the shared K/V head).
        idx: ``[Tt, K]`` int32 positions inside each query's own sequence (``dsa_topk``); entries ``< 0`` or
            past the sequence are ignored. Causality comes from the selection (not re-checked).
        cu_seqlens: ``[B + 1]`` int32, non-decreasing, ``cu_seqlens[0] == 0``, ``cu_seqlens[-1] == Tt``.
        softmax_scale: multiplies q.k; head_dim_v: values are the first ``head_dim_v`` (= L) columns.
    Returns:
        ``(out [Tt, H, head_dim_v] in q's dtype, lse [Tt, H] fp32)``; a query with no valid selection gets
        out 0 and lse -inf.
    Differentiable in q and kv through out and lse. The ``triton`` backward scatters dkv with fp32 atomic
    adds: on a GPU its last bits can vary between runs.
    """
    op = "dsa_mla_prefill"
    check_tensor(op, "q", q, ndim=3, dtypes=FLOAT_DTYPES)
    tt, _, c = q.shape
    check_tensor(op, "kv", kv, shape=(tt, c), dtypes=(q.dtype,), device=q.device)
    check_tensor(op, "idx", idx, shape=(tt, None), dtypes=(torch.int32,), device=q.device)
    check_tensor(op, "cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,), device=q.device)
    if cu_seqlens.shape[0] < 1:
        raise ValueError("r1kernels.ops.dsa_mla_prefill: cu_seqlens must have B + 1 >= 1 entries, got 0")
    v = _check_head_dim_v(op, head_dim_v, c)
    return DSA_MLA_PREFILL(backend, q, kv, idx, cu_seqlens.contiguous(), float(softmax_scale), v)


# --------------------------------------------------------------------------------------------------------
# dsa_mla_decode


def _decode_ref(q, kv_cache, block_table, cache_seqlens, idx, scale, head_dim_v):
    return ref.dsa_mla_decode(q, kv_cache, block_table, cache_seqlens, idx, softmax_scale=scale, head_dim_v=head_dim_v)


def _decode_triton(q, kv_cache, block_table, cache_seqlens, idx, scale, head_dim_v):
    from ..triton.sparse_dsa import dsa_mla_decode as triton_decode

    return triton_decode(q, kv_cache, block_table, cache_seqlens, idx, scale, head_dim_v)


DSA_MLA_DECODE = Op("dsa_mla_decode", {
    "reference": Impl(_decode_ref, always),
    "triton": Impl(_decode_triton, _triton_attn_check),
})


def dsa_mla_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    idx: torch.Tensor,
    *,
    softmax_scale: float,
    head_dim_v: int = 512,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse absorbed-MLA attention over the paged latent cache at the selected positions (``mla_decode``
    with a list of positions per query instead of a contiguous range).

    Args:
        q: ``[B, S, H, C]`` fp32 / fp16 / bf16 new queries.
        kv_cache: ``[N, P, C]`` q's dtype, pages of latent rows.
        block_table: ``[B, M]`` int32 page ids; cache_seqlens: ``[B]`` int32 (the S new tokens included).
        idx: ``[B, S, K]`` int32 absolute cache positions; ``-1`` (any negative) and positions
            ``>= cache_seqlens[b]`` are ignored and never read (NaN in such slots cannot leak).
        softmax_scale: multiplies q.k; head_dim_v: value width (the first columns of a row, L).
    Returns:
        ``(out [B, S, H, head_dim_v] in q's dtype, lse [B, H, S] fp32)`` (``mla_decode``'s layouts); a query
        with nothing valid gets out 0 and lse -inf. Inference only: the ``triton`` backend is not differentiable.
    """
    op = "dsa_mla_decode"
    check_tensor(op, "q", q, ndim=4, dtypes=FLOAT_DTYPES)
    b, s, _, c = q.shape
    check_tensor(op, "kv_cache", kv_cache, shape=(None, None, c), dtypes=(q.dtype,), device=q.device)
    check_tensor(op, "block_table", block_table, shape=(b, None), dtypes=(torch.int32,), device=q.device)
    check_tensor(op, "cache_seqlens", cache_seqlens, shape=(b,), dtypes=(torch.int32,), device=q.device)
    check_tensor(op, "idx", idx, shape=(b, s, None), dtypes=(torch.int32,), device=q.device)
    v = _check_head_dim_v(op, head_dim_v, c)
    return DSA_MLA_DECODE(backend, q, kv_cache, block_table, cache_seqlens.contiguous(), idx, float(softmax_scale), v)


# --------------------------------------------------------------------------------------------------------
# indexer_kl_loss


class _IndexerKLTriton(torch.autograd.Function):
    """Triton KL loss: the forward keeps each row's lse and target sum; the gradient goes to the scores only."""

    @staticmethod
    def forward(ctx, scores, target):
        from ..triton.sparse_dsa import indexer_kl_fwd

        loss, lse, z = indexer_kl_fwd(scores, target)
        ctx.save_for_backward(scores, target, lse, z)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        from ..triton.sparse_dsa import indexer_kl_bwd

        scores, target, lse, z = ctx.saved_tensors
        dx = indexer_kl_bwd(g, scores, target, lse, z) if ctx.needs_input_grad[0] else None
        return dx, None


def _kl_triton(scores, target):
    return _IndexerKLTriton.apply(scores, target.detach())


INDEXER_KL_LOSS = Op("indexer_kl_loss", {
    "reference": Impl(ref.indexer_kl_loss, always),
    "triton": Impl(_kl_triton, triton_check),
})


def indexer_kl_loss(index_scores: torch.Tensor, attn_probs_target: torch.Tensor, *,
                    backend: str = "auto") -> torch.Tensor:
    """V3.2's dense warm-up loss for the indexer: mean over the B*S queries of KL(target || softmax(scores)).

    Args:
        index_scores: ``[B, S, T]`` float (``lightning_indexer``'s output, ``-inf`` where masked).
        attn_probs_target: ``[B, S, T]`` float >= 0, any float dtype: the main attention's probabilities
            summed over the H heads (``probs.sum(heads)``). Each row is L1-normalised inside the op, so the
            head sum is passed as is; a row summing to 0 (padding) adds 0. It must be 0 where the score is
            ``-inf`` (else the KL is +inf).
    Returns:
        fp32 0-d loss. The gradient flows only into index_scores: ``(softmax(scores) - target / sum) / (B*S)``.
    """
    check_tensor("indexer_kl_loss", "index_scores", index_scores, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("indexer_kl_loss", "attn_probs_target", attn_probs_target, shape=tuple(index_scores.shape),
                 dtypes=FLOAT_DTYPES, device=index_scores.device)
    return INDEXER_KL_LOSS(backend, index_scores, attn_probs_target)
