"""Multi-head latent attention references: packed varlen prefill attention and absorbed paged decode.

Letters: T packed tokens, B sequences / requests, H heads, Dqk query/key head dim (qk_nope + qk_rope,
192 in V3), Dv value head dim (128), L = kv_lora_rank (512), R = qk_rope_head_dim (64), C = L + R (576),
N cache pages, P page size, M pages per request, Sq new query tokens per request, S new tokens per request.
"""
from __future__ import annotations

import torch


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float):
    """Softmax attention in fp32 with a boolean keep-mask; fully masked rows give 0 output and -inf lse.

    q ``[H, Sq, D]``, k ``[H or 1, Sk, D]``, v ``[H or 1, Sk, Dv]``, mask ``[Sq, Sk]``.
    Returns out ``[H, Sq, Dv]`` fp32 and lse ``[H, Sq]`` fp32 (natural log).
    """
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # [H, Sq, Sk]
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [H, Sq]; -inf where the row is fully masked
    p = torch.exp(s - lse[..., None].clamp_min(torch.finfo(torch.float32).min))
    p = torch.where(mask, p, torch.zeros((), dtype=p.dtype, device=p.device))
    return torch.matmul(p, v.float()), lse


def mla_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    softmax_scale: float,
    causal: bool = True,
    return_lse: bool = False,
):
    """Variable-length (packed) attention, the expanded MLA form used for training and prefill.

    Args:
        q: ``[T, H, Dqk]``; k: ``[T, H, Dqk]``; v: ``[T, H, Dv]``; fp32 / fp16 / bf16.
        cu_seqlens: ``[B+1]`` int32, sequence b is tokens ``cu_seqlens[b]:cu_seqlens[b+1]`` (may be empty).
        max_seqlen: the longest sequence (unused by the reference; kernels size their grid with it).
        softmax_scale: multiplies q.k (``ModelConfig.softmax_scale``).
        causal: token i of a sequence sees tokens 0..i of the same sequence.
    Returns:
        out ``[T, H, Dv]`` in ``q.dtype``; with ``return_lse`` also lse ``[H, T]`` fp32 (natural log).
    """
    t, h, _ = q.shape
    out = torch.zeros(t, h, v.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.full((h, t), float("-inf"), dtype=torch.float32, device=q.device)
    bounds = cu_seqlens.tolist()
    for b in range(len(bounds) - 1):
        s0, s1 = bounds[b], bounds[b + 1]
        n = s1 - s0
        if n == 0:
            continue
        mask = torch.ones(n, n, dtype=torch.bool, device=q.device)
        if causal:
            mask = torch.tril(mask)
        o, l = _attend(q[s0:s1].transpose(0, 1), k[s0:s1].transpose(0, 1), v[s0:s1].transpose(0, 1), mask, softmax_scale)
        out[s0:s1] = o.transpose(0, 1)  # [H, n, Dv] -> [n, H, Dv]
        lse[:, s0:s1] = l
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def mla_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    softmax_scale: float,
    causal: bool = True,
    head_dim_v: int = 512,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbed MLA attention over a paged latent cache (one shared K/V "head" of width C).

    Args:
        q: ``[B, Sq, H, C]``: ``[q_nope . W_UK, rope(q_pe)]`` per head.
        kv_cache: ``[N, P, C]``: per token ``[c_kv (L), rope(k_pe) (R)]``.
        block_table: ``[B, M]`` int32, page ids of each request in order.
        cache_seqlens: ``[B]`` int32, tokens cached per request, the Sq new ones included (already appended).
        softmax_scale: multiplies q.k.
        causal: new query i sees positions ``< cache_seqlens - Sq + i + 1``; otherwise all ``< cache_seqlens``.
        head_dim_v: values are the first ``head_dim_v`` (= L) columns of each cache row.
    Returns:
        out ``[B, Sq, H, head_dim_v]`` in ``q.dtype`` (0 for a row that sees nothing) and lse ``[B, H, Sq]`` fp32.
    Cache rows at positions ``>= cache_seqlens`` are never read, so whatever they hold (NaN) cannot leak.
    """
    b, sq, h, _ = q.shape
    page = kv_cache.shape[1]
    out = torch.zeros(b, sq, h, head_dim_v, dtype=torch.float32, device=q.device)
    lse = torch.full((b, h, sq), float("-inf"), dtype=torch.float32, device=q.device)
    for i, n in enumerate(cache_seqlens.tolist()):
        if n <= 0:
            continue
        pos = torch.arange(n, device=q.device)
        rows = kv_cache[block_table[i, pos // page].long(), pos % page]  # [n, C]
        qpos = n - sq + torch.arange(sq, device=q.device)  # absolute position of each new query
        mask = pos[None, :] <= qpos[:, None] if causal else torch.ones(sq, n, dtype=torch.bool, device=q.device)
        o, l = _attend(q[i].transpose(0, 1), rows[None], rows[None, :, :head_dim_v], mask, softmax_scale)
        out[i] = o.transpose(0, 1)  # [H, Sq, L] -> [Sq, H, L]
        lse[i] = l
    return out.to(q.dtype), lse


def mla_cache_append(
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    c_kv: torch.Tensor,
    k_pe: torch.Tensor,
) -> None:
    """Write the latent rows of S new tokens per request into the paged cache, in place.

    Args:
        kv_cache: ``[N, P, C]`` pages (C = L + R), written in place.
        block_table: ``[B, M]`` int32 page ids of each request.
        cache_seqlens: ``[B]`` int32 tokens already cached per request, *before* the new ones: token s of
            request b goes to position ``cache_seqlens[b] + s``, i.e. page ``block_table[b, pos // P]``,
            row ``pos % P``.
        c_kv: ``[B, S, L]`` the normalised latents (any float dtype; cast to the cache's dtype).
        k_pe: ``[B, S, R]`` the rotated decoupled keys.
    The caller keeps positions inside the pages its block table owns (no check: that would sync).
    """
    b, s, lr = c_kv.shape
    page = kv_cache.shape[1]
    pos = cache_seqlens.long()[:, None] + torch.arange(s, device=c_kv.device)  # [B, S]
    pages = block_table.long().gather(1, pos // page)  # [B, S]
    kv_cache[pages, pos % page] = torch.cat([c_kv, k_pe], dim=-1).to(kv_cache.dtype)
