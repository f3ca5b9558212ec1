"""Public MLA attention ops: packed varlen attention (training / prefill) and absorbed paged decode.

Reference backend here; the MLA issue brings the Triton flash-attention and the sm_90 decode kernels
behind the same signatures.
"""
from __future__ import annotations

import torch

from .. import reference
from .._dispatch import Impl, Op, always, triton_check
from ._mla_cpu import MLA_ATTENTION_CPU, MLA_DECODE_CPU
from ._native import MLA_DECODE_CUDA
from ._validate import FLOAT_DTYPES, check_tensor


def _attn_ref(q, k, v, cu_seqlens, max_seqlen, scale, causal, return_lse):
    return reference.mla_attention(q, k, v, cu_seqlens, max_seqlen, softmax_scale=scale, causal=causal,
                                   return_lse=return_lse)


class _MLAAttentionTriton(torch.autograd.Function):
    """The Triton flash-attention path: the forward keeps out and lse (fp32 [H, T]) for the backward.

    Differentiable in q, k, v through out and through lse (d lse / d s = p enters the backward's delta).
    """

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, scale, causal):
        from ..triton.mla import mla_attention_fwd  # lazily: `import r1kernels` never imports triton

        out, lse = mla_attention_fwd(q, k, v, cu_seqlens, max_seqlen, scale, causal)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.args = (max_seqlen, scale, causal)
        ctx.set_materialize_grads(False)  # an unused out or lse gets None, not a buffer of zeros
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dlse):
        from ..triton.mla import mla_attention_bwd

        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        if dout is None and dlse is None:
            return None, None, None, None, None, None, None
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = mla_attention_bwd(dout, q, k, v, out, lse, cu_seqlens, *ctx.args, dlse=dlse)
        need = ctx.needs_input_grad
        return (dq if need[0] else None), (dk if need[1] else None), (dv if need[2] else None), None, None, None, None


def _attn_triton(q, k, v, cu_seqlens, max_seqlen, scale, causal, return_lse):
    out, lse = _MLAAttentionTriton.apply(q, k, v, cu_seqlens, max_seqlen, scale, causal)
    return (out, lse) if return_lse else out


def _attn_triton_check(q, k, v, cu_seqlens, max_seqlen, scale, causal, return_lse):
    why = triton_check(q)
    if why is None:
        from ..triton.mla import head_dims_reason  # triton is importable once triton_check passed

        why = head_dims_reason(q.shape[-1], v.shape[-1])
    return why


def _decode_ref(q, kv_cache, block_table, cache_seqlens, scale, causal, head_dim_v):
    return reference.mla_decode(q, kv_cache, block_table, cache_seqlens, softmax_scale=scale, causal=causal,
                                head_dim_v=head_dim_v)


def _cache_append_triton(kv_cache, block_table, cache_seqlens, c_kv, k_pe):
    from ..triton.mla_decode import mla_cache_append  # lazily: `import r1kernels` never imports triton

    mla_cache_append(kv_cache, block_table, cache_seqlens, c_kv, k_pe)


def _decode_triton(q, kv_cache, block_table, cache_seqlens, scale, causal, head_dim_v):
    from ..triton.mla_decode import mla_decode

    return mla_decode(q, kv_cache, block_table, cache_seqlens, scale, causal, head_dim_v)


MLA_ATTENTION = Op("mla_attention", {"reference": Impl(_attn_ref, always),
                                     "triton": Impl(_attn_triton, _attn_triton_check),
                                     "cpu": MLA_ATTENTION_CPU})
MLA_CACHE_APPEND = Op("mla_cache_append", {"reference": Impl(reference.mla_cache_append, always),
                                           "triton": Impl(_cache_append_triton, triton_check)})
MLA_DECODE = Op("mla_decode", {"reference": Impl(_decode_ref, always),
                               "triton": Impl(_decode_triton, triton_check),
                               "cuda": MLA_DECODE_CUDA,
                               "cpu": MLA_DECODE_CPU})


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
    backend: str = "auto",
):
    """Packed variable-length attention (the expanded MLA form).

    Args:
        q, k: ``[T, H, Dqk]``; v: ``[T, H, Dv]``; one float dtype, one device.
        cu_seqlens: ``[B+1]`` int32, non-decreasing, ``cu_seqlens[0] == 0``, ``cu_seqlens[-1] == T``.
        max_seqlen: the longest sequence length.
        softmax_scale: multiplies q.k; causal: each token sees its sequence's tokens up to itself.
    Returns:
        ``out [T, H, Dv]`` in q's dtype, and with ``return_lse`` ``lse [H, T]`` fp32 (natural log).
    Differentiable in q, k, v through out and lse. Backends: ``reference``; ``cpu`` (padded batch, one SDPA
    call; ``max_seqlen`` must bound every sequence); ``triton`` (flash attention,
    Dqk and Dv multiples of 16 up to 256; ``max_seqlen`` must bound every sequence, it sizes the grid).
    """
    check_tensor("mla_attention", "q", q, ndim=3, dtypes=FLOAT_DTYPES)
    t, h, dqk = q.shape
    check_tensor("mla_attention", "k", k, shape=(t, h, dqk), dtypes=(q.dtype,), device=q.device)
    check_tensor("mla_attention", "v", v, shape=(t, h, None), dtypes=(q.dtype,), device=q.device)
    check_tensor("mla_attention", "cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,), device=q.device)
    return MLA_ATTENTION(backend, q, k, v, cu_seqlens, int(max_seqlen), float(softmax_scale), bool(causal),
                         bool(return_lse))


def mla_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    softmax_scale: float,
    causal: bool = True,
    head_dim_v: int = 512,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbed MLA attention over the paged latent cache (semantics: ``r1kernels.reference.mla.mla_decode``).

    Args:
        q: ``[B, Sq, H, C]`` (C = kv_lora_rank + qk_rope_head_dim, 576 in V3).
        kv_cache: ``[N, P, C]`` pages of latent rows, q's dtype.
        block_table: ``[B, M]`` int32; cache_seqlens: ``[B]`` int32 (the Sq new tokens included).
        head_dim_v: value width = the first ``head_dim_v`` columns of a cache row (kv_lora_rank).
    Returns:
        ``(out [B, Sq, H, head_dim_v] in q's dtype, lse [B, H, Sq] fp32)``.
    """
    check_tensor("mla_decode", "q", q, ndim=4, dtypes=FLOAT_DTYPES)
    b, _, _, c = q.shape
    check_tensor("mla_decode", "kv_cache", kv_cache, shape=(None, None, c), dtypes=(q.dtype,), device=q.device)
    check_tensor("mla_decode", "block_table", block_table, shape=(b, None), dtypes=(torch.int32,), device=q.device)
    check_tensor("mla_decode", "cache_seqlens", cache_seqlens, shape=(b,), dtypes=(torch.int32,), device=q.device)
    if not 0 < head_dim_v <= c:
        raise ValueError(f"r1kernels.ops.mla_decode: head_dim_v={head_dim_v} must be in (0, C={c}]")
    return MLA_DECODE(backend, q, kv_cache, block_table, cache_seqlens, float(softmax_scale), bool(causal),
                      int(head_dim_v))


def mla_cache_append(
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    c_kv: torch.Tensor,
    k_pe: torch.Tensor,
    *,
    backend: str = "auto",
) -> None:
    """Write S new tokens' latent rows ``[c_kv, k_pe]`` into the paged cache in place (see the reference).

    Args:
        kv_cache: ``[N, P, C]`` with C = L + R; block_table: ``[B, M]`` int32;
        cache_seqlens: ``[B]`` int32 tokens cached before the new ones;
        c_kv: ``[B, S, L]`` normalised latents; k_pe: ``[B, S, R]`` rotated keys (float, any strides).
    """
    check_tensor("mla_cache_append", "kv_cache", kv_cache, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("mla_cache_append", "c_kv", c_kv, ndim=3, dtypes=FLOAT_DTYPES, device=kv_cache.device)
    b, s, lr = c_kv.shape
    check_tensor("mla_cache_append", "k_pe", k_pe, shape=(b, s, kv_cache.shape[2] - lr), dtypes=FLOAT_DTYPES,
                 device=kv_cache.device)
    check_tensor("mla_cache_append", "block_table", block_table, shape=(b, None), dtypes=(torch.int32,),
                 device=kv_cache.device)
    check_tensor("mla_cache_append", "cache_seqlens", cache_seqlens, shape=(b,), dtypes=(torch.int32,),
                 device=kv_cache.device)
    MLA_CACHE_APPEND(backend, kv_cache, block_table, cache_seqlens, c_kv, k_pe)
