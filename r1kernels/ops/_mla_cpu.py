"""The ``cpu`` backend of ``mla_decode``: the whole batch in a few batched torch ops.

Letters: B requests, Sq new queries per request, H heads, C latent row width (L + R), V = head_dim_v, M pages
per request, P page size, S = M * P positions the block table can address.

The reference loops over requests and reads each request's length on the host; here every request's pages
are gathered at once ([B, S, C], sizes from shapes only) and positions past a request's visible length are
masked in the scores and zeroed in the rows before any product, so NaN in unused slots cannot leak. Page ids
of pages past a request's length are never dereferenced (replaced by page 0 before the gather), since a
block table's unused entries may hold anything. Measured on the tiny preset's generation benchmark
(benchmarks/bench_mla.py --cpu-decode): the reference's per-request loop made a decode step 0.27 ms per
layer against 0.03 ms for SDPA over an expanded cache.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._dispatch import Impl


def mla_decode_batched(q, kv_cache, block_table, cache_seqlens, scale, causal, head_dim_v):
    """Same contract as ``reference.mla_decode``: ``(out [B, Sq, H, V] in q's dtype, lse [B, H, Sq] fp32)``."""
    b, sq, h, _ = q.shape
    page = kv_cache.shape[1]
    m = block_table.shape[1]
    dev = q.device
    lens = cache_seqlens.long()  # [B]
    pos = torch.arange(m * page, device=dev)  # [S]
    page_used = torch.arange(m, device=dev)[None, :] * page < lens[:, None]  # [B, M]
    pages = torch.where(page_used, block_table.long(), torch.zeros((), dtype=torch.long, device=dev))
    rows = kv_cache[pages].reshape(b, m * page, -1)  # [B, M, P, C] -> [B, S, C]
    if causal:
        limit = lens[:, None] - sq + 1 + torch.arange(sq, device=dev)[None, :]  # [B, Sq]: query i sees pos < limit
    else:
        limit = lens[:, None].expand(b, sq)
    visible = pos[None, None, :] < limit[:, :, None]  # [B, Sq, S]
    any_row = pos[None, :] < lens[:, None]  # [B, S]: rows that hold data
    rows = torch.where(any_row[..., None], rows.float(), torch.zeros((), device=dev))
    scores = torch.einsum("bqhc,bsc->bhqs", q.float(), rows) * scale  # [B, H, Sq, S]
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, H, Sq]; -inf for a row that sees nothing
    # exp(-inf - lse) is exactly 0 for hidden positions, and the clamp keeps a row that sees nothing at
    # exp(-inf) = 0 instead of NaN, so no second mask is needed.
    p = torch.exp(scores - lse[..., None].clamp_min(torch.finfo(torch.float32).min))
    out = torch.einsum("bhqs,bsv->bqhv", p, rows[..., :head_dim_v])  # [B, Sq, H, V]
    return out.to(q.dtype), lse


def _check(q, kv_cache, block_table, cache_seqlens, scale, causal, head_dim_v) -> Optional[str]:
    if q.device.type != "cpu":
        return f"this backend takes cpu tensors, got {q.device.type} tensors"
    return None


def _device_reason(device: torch.device) -> Optional[str]:
    return None if device.type == "cpu" else "runs on CPU tensors only"


MLA_DECODE_CPU = Impl(mla_decode_batched, _check, _device_reason)


def mla_attention_padded(q, k, v, cu_seqlens, max_seqlen, scale, causal, return_lse):
    """The ``cpu`` backend of ``mla_attention``: sequences scattered into a padded ``[B, H, max_seqlen, D]``
    batch, one SDPA call (differentiable), gathered back. Same contract as ``reference.mla_attention``.

    Padding sits after each sequence's tokens, so under the causal mask no real query sees it; without the
    causal mask a key-padding mask hides it. Measured on the tiny preset's training step (32 sequences of 29
    tokens, 2 cores): the reference's per-sequence loop took 40% of the step (968 bmm calls), this path one
    SDPA call per layer.
    """
    t, h, dqk = q.shape
    b = cu_seqlens.numel() - 1
    dev = q.device
    tok = torch.arange(t, device=dev)
    seq = torch.searchsorted(cu_seqlens[1:].long(), tok, right=True)  # [T]: the sequence of each token
    pos = tok - cu_seqlens.long()[seq]  # [T]: its position in the sequence
    slot = seq * max_seqlen + pos  # [T] into the flattened [B * S]

    def padded(x):  # [T, H, D] -> [B, H, S, D]
        out = x.new_zeros(b * max_seqlen, h, x.shape[-1]).index_copy(0, slot, x)
        return out.view(b, max_seqlen, h, -1).transpose(1, 2)

    qp, kp, vp = padded(q.float()), padded(k.float()), padded(v.float())
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()  # [B]
    key_ok = torch.arange(max_seqlen, device=dev)[None, :] < lens[:, None]  # [B, S]
    if return_lse:
        scores = torch.einsum("bhqd,bhkd->bhqk", qp, kp) * scale  # [B, H, S, S]
        mask = key_ok[:, None, None, :]
        if causal:
            mask = mask & torch.ones(max_seqlen, max_seqlen, dtype=torch.bool, device=dev).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)  # [B, H, S]
        p = torch.exp(scores - lse[..., None].clamp_min(torch.finfo(torch.float32).min))
        o = p @ vp
    else:
        attn_mask = None if causal else key_ok[:, None, None, :]
        o = torch.nn.functional.scaled_dot_product_attention(qp, kp, vp, attn_mask=attn_mask, is_causal=causal,
                                                             scale=scale)  # [B, H, S, Dv]
    out = o.transpose(1, 2).reshape(b * max_seqlen, h, -1).index_select(0, slot).to(q.dtype)  # [T, H, Dv]
    if not return_lse:
        return out
    return out, lse.transpose(0, 1).reshape(h, b * max_seqlen).index_select(1, slot)  # [H, T]


def _attention_check(q, k, v, cu_seqlens, max_seqlen, scale, causal, return_lse) -> Optional[str]:
    if q.device.type != "cpu":
        return f"this backend takes cpu tensors, got {q.device.type} tensors"
    return None


MLA_ATTENTION_CPU = Impl(mla_attention_padded, _attention_check, _device_reason)
