"""MLA at DeepSeek-V3 shapes: absorbed paged decode (``r1kernels.ops.mla_decode``), prefill / training
attention (``r1kernels.ops.mla_attention``), and greedy generation on the tiny model with the latent cache
against an expanded per-head cache (family rows ``model-decode``, CPU only).

Shapes: :func:`benchmarks.shapes.mla_decode_shapes` (GPU: FlashMLA's grid, b=128, s 4096 / 8192 / 16384,
h 16 / 128, Sq 1 / 2, C=576, Dv=512, pages of 64; CPU: b=4, s=256, h=16),
:func:`benchmarks.shapes.mla_prefill_shapes` (GPU: one causal sequence of S = 1024 and 8192 tokens, H=128,
Dqk=192, Dv=128; CPU: S=256, H=4) and :func:`benchmarks.shapes.mla_generate_shape` (tiny preset, 4 prompts of
64 tokens, 64 new tokens).

Formulas. Decode, with b requests, s cached tokens per request (the Sq new ones included), h heads, Sq new
tokens, C = 576 the latent row (512 c_kv + 64 rotated k_pe), Dv = 512 the value columns, P the page size,
e the bytes per element:

* FLOP: 2 b Sq h s (C + Dv) (scores q.k over C, then p.v over Dv; the softmax left out). With Sq = 2 the
  causal mask hides the last position from the first new token; that one position is not subtracted (the
  FlashMLA convention, and the anchor's).
* bytes: the cache rows read once, the queries read, the output written, the block table and lengths read
  = b s C e + b Sq h C e + b Sq h Dv e + 4 b ceil(s / P) + 4 b. (The lse output, 4 b h Sq bytes, is left
  out: the torch baselines do not produce it.) The cache rows dominate: decode is bound by bandwidth at
  h = 16 and, with the FLOP above, close to balanced at h = 128 on an H200.

Prefill, with T = B S packed tokens, H heads, Dqk = 192, Dv = 128:

* FLOP, fwd: 2 B H S^2 (Dqk + Dv) / 2 (the causal half of q.k^T and p.v, FlashAttention's convention and
  the baseline script's; the diagonal's S extra pairs are left out).
* FLOP, fwd+bwd: 3.5 times the forward's (the backward recomputes q.k^T and runs four more matmuls of the
  same size: dv, dp, dq, dk; the baseline script's factor).
* bytes, fwd: read q, k, v, write out = T H e (2 Dqk + 2 Dv).
* bytes, fwd+bwd: the forward's, then read q, k, v, out, d_out and write dq, dk, dv, plus the fp32 lse
  written forward and read backward = 6 T H e (Dqk + Dv) + 8 H T.

Compared: the torch baselines of ``shared/baselines/torch_baselines.py``, measured in the same run.
Decode: "torch bmm" (q as [b, Sq h, C] against a contiguous [b, s, C] copy of the paged cache, gathered once
outside the timing as the baseline script's contiguous cache is: ``bmm``, fp32 softmax, ``bmm`` with the
first 512 columns; the 0.98 ms anchor at s=4096, h=128, Sq=1) and "torch sdpa (mqa)" (the same data as one
K/V head with Sq h query rows through ``scaled_dot_product_attention``); for Sq = 2 both mask the positions a
new token must not see, as ``mla_decode``'s causal rule says. Prefill: "torch sdpa" (causal
``scaled_dot_product_attention`` on contiguous [B, H, S, D] tensors, the anchor's 4.86 ms forward at
S=8192), forward and forward+backward. Then every r1kernels backend (triton, cuda, cpu, reference); one
that cannot run raises BackendUnavailable and is recorded as unavailable with the reason.

GPU time (H200, estimated from the anchors; do_bench spends its 25 ms warm-up and 100 ms of repetitions per
implementation, each call after a 256 MB L2 flush of ~0.1 ms): the 12 decode cases x 4 implementations take
about 0.2 s each, ~10 s, plus one gather of the contiguous copy per s (2.4 GB at s=16384) and the Triton
compilations; prefill is 2 S x 2 passes x 2 timed implementations (SDPA and Triton; fwd+bwd at S=8192 is
20.3 ms a call for SDPA, so do_bench runs it about 5 times after its warm-up), ~3 s plus compilations. The
family stays near 30 s, well under a minute. Memory peaks at the s=16384, h=128, Sq=2 bmm baseline: the
paged cache and its contiguous copy (2 x 2.4 GB) and the fp32 scores [128, 256, 16384] (2.1 GB) with their
softmax.

Generation (``model-decode``, CPU only: the GPU suite's minutes go to the kernels): on the tiny preset
(fp32, eval, no_grad), prefill B prompts then decode one token at a time, greedily, (a) through the model's
own latent cache (``model.new_cache``; ``model(ids, cache=cache)``: the absorbed MLA over [c_kv, k_pe],
``ops.mla_decode`` with backend auto) and (b) through :class:`ExpandedKVCache`, written here: the same
weights and modules, but k = [k_nope, k_pe] and v of every head computed through ``kv_b_proj`` and cached,
attention by SDPA over the cache (what transformers' DeepseekV3 does with its cache). Before timing, both are
run teacher-forced over the same tokens and their logits must agree within :data:`MODEL_ATOL`.
tokens/s = B x new / the wall time of one whole generation (cache allocation, prefill and the new - 1
decode steps). The cache per token, all layers: latent n_layers (L + R) e; expanded n_layers H (Dqk + Dv) e.

    python -m benchmarks.bench_mla --cpu-decode     # prints the generation figures and the cache sizes
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from .harness import Case, Context, Impl, Row, fill_speedups, run_cases
from .shapes import (GenerateShape, MLADecodeShape, MLAPrefillShape, mla_decode_shapes, mla_generate_shape,
                     mla_prefill_shapes, shape_set)

FAMILY = "mla"
DEVICES = ("cuda", "cpu")
BACKENDS = ("triton", "cuda", "cpu", "reference")
# The model-level bound of the test suite (python_tests/conftest.py MODEL_ATOL): the two caches compute the
# same fp32 logits up to reordered sums.
MODEL_ATOL = 1e-4
# The CPU goal of the MLA issue: the latent cache at least as fast as the expanded one, and >= 5x smaller.
GOAL_SPEED_RATIO = 1.0
GOAL_CACHE_RATIO = 5.0

# Why the reference backend is not timed on the GPU: it is the torch baselines done request by request.
_GPU_REFERENCE_WHY = {
    "decode": "not timed on the GPU: a Python loop over the 128 requests, each the 'torch bmm' baseline's work "
              "in fp32 (with a host sync for the lengths)",
    "prefill": "not timed on the GPU: it materialises the fp32 scores [H, S, S] (34 GB at S=8192, H=128), the "
               "work 'torch sdpa' does without them",
}


# ------------------------------------------------------------------------------------------------------
# Formulas


def decode_flops(sh: MLADecodeShape) -> float:
    return 2 * sh.batch * sh.sq * sh.heads * sh.seqlen * (sh.latent + sh.dv)


def decode_bytes(sh: MLADecodeShape, elem_bytes: int) -> float:
    cache = sh.batch * sh.seqlen * sh.latent * elem_bytes
    q = sh.batch * sh.sq * sh.heads * sh.latent * elem_bytes
    out = sh.batch * sh.sq * sh.heads * sh.dv * elem_bytes
    return cache + q + out + 4 * sh.batch * math.ceil(sh.seqlen / sh.page) + 4 * sh.batch


def prefill_flops(sh: MLAPrefillShape, mode: str) -> float:
    fwd = 2 * sh.batch * sh.heads * sh.seqlen * sh.seqlen * (sh.dqk + sh.dv) / 2
    return fwd if mode == "fwd" else 3.5 * fwd


def prefill_bytes(sh: MLAPrefillShape, elem_bytes: int, mode: str) -> float:
    t, h = sh.batch * sh.seqlen, sh.heads
    if mode == "fwd":
        return t * h * elem_bytes * (2 * sh.dqk + 2 * sh.dv)
    return 6 * t * h * elem_bytes * (sh.dqk + sh.dv) + 8 * h * t


def softmax_scale(ctx: Context) -> float:
    """The baseline script's scale, 192^-0.5: V3's (Dn + R)^-0.5 without YaRN's mscale (a constant factor
    that changes no timing)."""
    return ctx.shapes.dims.qk_head_dim ** -0.5


# ------------------------------------------------------------------------------------------------------
# Torch baselines (shared/baselines/torch_baselines.py, with the causal mask of Sq > 1 added)


def decode_mask(seqlen: int, sq: int, device: torch.device) -> torch.Tensor:
    """``[Sq, s]`` bool, True where new token i may look: positions < s - Sq + i + 1 (mla_decode's rule)."""
    pos = torch.arange(seqlen, device=device)
    return pos[None, :] <= (seqlen - sq + torch.arange(sq, device=device))[:, None]


def torch_bmm_decode(q: torch.Tensor, kv: torch.Tensor, scale: float, dv: int,
                     mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The baseline script's ``naive``: q ``[b, Sq, h, C]`` viewed as ``[b, Sq h, C]`` rows against the
    contiguous cache ``kv [b, s, C]``; fp32 softmax, probabilities rounded to q's dtype, then ``bmm`` with
    the first ``dv`` columns. ``mask [Sq, s]`` (None for Sq = 1, where every row sees every position)."""
    b, sq, h, c = q.shape
    s = kv.shape[1]
    scores = torch.bmm(q.view(b, sq * h, c), kv.transpose(1, 2)).float() * scale  # [b, Sq h, s]
    if mask is not None:
        scores = scores.view(b, sq, h, s).masked_fill(~mask[None, :, None, :], float("-inf")).view(b, sq * h, s)
    p = scores.softmax(-1).to(q.dtype)
    return torch.bmm(p, kv[..., :dv]).view(b, sq, h, dv)


def torch_sdpa_decode(q: torch.Tensor, kv: torch.Tensor, scale: float, dv: int,
                      mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The baseline script's ``sdpa``: one K/V head (the latent rows) and Sq h query rows, as MQA.
    ``mask [Sq h, s]`` bool (True: attend) or None."""
    b, sq, h, c = q.shape
    o = F.scaled_dot_product_attention(q.view(b, 1, sq * h, c), kv.unsqueeze(1), kv[..., :dv].unsqueeze(1),
                                       attn_mask=mask, scale=scale)  # [b, 1, Sq h, dv]
    return o.view(b, sq, h, dv)


# ------------------------------------------------------------------------------------------------------
# Cases


def peers(ctx: Context) -> dict[str, str]:
    # FlashMLA and flash-attn (DESIGN's peers for these kernels) are not installed on either machine, and
    # neither is pure Python, so none can be carried to the GPU machine.
    return {}


def _backend_impls(ctx: Context, call: Callable[[str], Callable[[], Any]], gpu_reference_why: str) -> list[Impl]:
    """One Impl per r1kernels backend; ``call(b)`` is the timed closure for backend b (it raises
    BackendUnavailable when b cannot run, and the harness records why)."""
    impls = []
    for b in BACKENDS:
        if b == "triton" and not ctx.is_cuda:
            impls.append(Impl(b, "r1kernels", why_not="Triton runs on the CPU only under its interpreter, whose "
                                                        "times say nothing about the kernel"))
        elif b == "reference" and ctx.is_cuda:
            impls.append(Impl(b, "r1kernels", why_not=gpu_reference_why))
        else:
            impls.append(Impl(b, "r1kernels", call(b)))
    return impls


@dataclass
class PagedCache:
    """One decode cache of ``batch`` requests x ``seqlen`` tokens: the pages ``kv [N, P, C]`` in a shuffled
    order (``block_table [b, M]`` int32, so a kernel reads scattered pages as a serving system's cache makes
    it), ``seqlens [b]`` int32, and the same rows gathered into a contiguous ``[b, s, C]`` copy for the
    torch baselines."""

    kv: torch.Tensor
    block_table: torch.Tensor
    seqlens: torch.Tensor
    contiguous: torch.Tensor


def make_paged_cache(ctx: Context, batch: int, seqlen: int, latent: int, page: int) -> PagedCache:
    pages = math.ceil(seqlen / page)
    kv = ctx.randn(batch * pages, page, latent)
    order = ctx.randn(batch * pages, dtype=torch.float32).argsort()  # a random permutation of the pages
    block_table = order.view(batch, pages).to(torch.int32)
    seqlens = torch.full((batch,), seqlen, dtype=torch.int32, device=ctx.device)
    contiguous = kv[block_table.long()].view(batch, pages * page, latent)[:, :seqlen].contiguous()
    return PagedCache(kv, block_table, seqlens, contiguous)


def decode_cases(ctx: Context) -> Iterator[Case]:
    import r1kernels

    scale = softmax_scale(ctx)
    cache: Optional[PagedCache] = None
    cache_key: Optional[tuple[int, int]] = None
    for sh in mla_decode_shapes(ctx.shapes):
        if cache_key != (sh.batch, sh.seqlen):  # the cases of one s share its cache (2.4 GB at s=16384)
            cache = None
            if ctx.is_cuda:
                torch.cuda.empty_cache()
            cache = make_paged_cache(ctx, sh.batch, sh.seqlen, sh.latent, sh.page)
            cache_key = (sh.batch, sh.seqlen)
        q = ctx.randn(sh.batch, sh.sq, sh.heads, sh.latent)
        # the [Sq, s] causal mask, and its [Sq h, s] rows for SDPA; built once, outside the timing
        mask = decode_mask(sh.seqlen, sh.sq, ctx.device) if sh.sq > 1 else None
        sdpa_mask = mask.repeat_interleave(sh.heads, dim=0) if mask is not None else None

        def call(b: str, q=q, c=cache, sh=sh) -> Callable[[], Any]:
            # the output only: the torch baselines, which every backend is compared with, return no lse
            return lambda: r1kernels.ops.mla_decode(q, c.kv, c.block_table, c.seqlens, softmax_scale=scale,
                                                    causal=True, head_dim_v=sh.dv, backend=b)[0]

        impls = [
            Impl("torch bmm", "torch",
                 lambda q=q, c=cache, sh=sh, m=mask: torch_bmm_decode(q, c.contiguous, scale, sh.dv, m)),
            Impl("torch sdpa (mqa)", "torch",
                 lambda q=q, c=cache, sh=sh, m=sdpa_mask: torch_sdpa_decode(q, c.contiguous, scale, sh.dv, m)),
        ]
        impls += _backend_impls(ctx, call, _GPU_REFERENCE_WHY["decode"])
        yield Case(family=FAMILY, op="mla_decode", label=sh.label, shape=sh.shape, mode="fwd", dtype=ctx.dtype,
                   flops=decode_flops(sh), nbytes=decode_bytes(sh, q.element_size()), impls=impls)
        del q, impls
    cache = None


def _prefill_inputs(ctx: Context, sh: MLAPrefillShape):
    """The inputs of one prefill shape in the two layouts: contiguous ``[B, H, S, D]`` q, k, v, d_out and
    their gradient leaves for SDPA (the baseline script's layout), packed ``[T, H, D]`` copies of the same
    values and their leaves for ``mla_attention``; and ``as_packed``, which views an SDPA result as
    ``[T, H, D]`` so that outputs and gradients compare element for element."""
    b, s, h = sh.batch, sh.seqlen, sh.heads
    q4, k4 = ctx.randn(b, h, s, sh.dqk), ctx.randn(b, h, s, sh.dqk)
    v4, do4 = ctx.randn(b, h, s, sh.dv), ctx.randn(b, h, s, sh.dv)

    def packed(t: torch.Tensor) -> torch.Tensor:  # [B, H, S, D] -> [B S, H, D], a contiguous copy
        return t.transpose(1, 2).reshape(b * s, h, t.shape[-1]).contiguous()

    def as_packed(t: torch.Tensor) -> torch.Tensor:  # the same, as a view (B = 1: the flatten is free)
        return t.transpose(1, 2).flatten(0, 1)

    q, k, v, do = packed(q4), packed(k4), packed(v4), packed(do4)
    leaves4 = [t.detach().requires_grad_(True) for t in (q4, k4, v4)]
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    return (q4, k4, v4, do4, leaves4), (q, k, v, do, leaves), as_packed


def prefill_cases(ctx: Context) -> Iterator[Case]:
    for sh in mla_prefill_shapes(ctx.shapes):
        yield from _prefill_shape_cases(ctx, sh)


def _prefill_shape_cases(ctx: Context, sh: MLAPrefillShape) -> Iterator[Case]:
    """The fwd and fwd+bwd cases of one prefill shape. A function of its own so that every shape's closures
    hold that shape's tensors (the pytest entry builds all cases before running any), and the tensors are
    released when the run moves on to the next shape."""
    import r1kernels

    scale = softmax_scale(ctx)
    (q4, k4, v4, do4, leaves4), (q, k, v, do, leaves), as_packed = _prefill_inputs(ctx, sh)
    cu = torch.arange(0, (sh.batch + 1) * sh.seqlen, sh.seqlen, dtype=torch.int32, device=ctx.device)

    def sdpa(a, b_, c):
        return F.scaled_dot_product_attention(a, b_, c, is_causal=True, scale=scale)

    def attn(a, b_, c, backend):
        return r1kernels.ops.mla_attention(a, b_, c, cu, sh.seqlen, softmax_scale=scale, causal=True,
                                           backend=backend)

    def sdpa_fwd():
        return as_packed(sdpa(q4, k4, v4))

    def sdpa_fwd_bwd():
        o = sdpa(*leaves4)
        grads = torch.autograd.grad(o, leaves4, do4)
        return (as_packed(o), *(as_packed(g) for g in grads))

    def backend_fwd(b: str) -> Callable[[], Any]:
        return lambda: attn(q, k, v, b)

    def backend_fwd_bwd(b: str) -> Callable[[], Any]:
        def step():
            o = attn(*leaves, b)
            return (o, *torch.autograd.grad(o, leaves, do))

        return step

    es = q.element_size()
    for mode, base, call in (("fwd", sdpa_fwd, backend_fwd), ("fwd+bwd", sdpa_fwd_bwd, backend_fwd_bwd)):
        impls = [Impl("torch sdpa", "torch", base)]
        impls += _backend_impls(ctx, call, _GPU_REFERENCE_WHY["prefill"])
        yield Case(family=FAMILY, op="mla_attention", label=sh.label, shape=sh.shape, mode=mode, dtype=ctx.dtype,
                   flops=prefill_flops(sh, mode), nbytes=prefill_bytes(sh, es, mode), impls=impls)


def cases(ctx: Context) -> Iterator[Case]:
    yield from decode_cases(ctx)
    yield from prefill_cases(ctx)


# ------------------------------------------------------------------------------------------------------
# Generation on the tiny model: the latent cache against an expanded per-head cache


class ExpandedKVCache:
    """The per-head KV cache a model without MLA's absorption keeps (transformers' DeepseekV3 caches this).

    Per layer ``k [B, H, Smax, Dqk]`` (k_nope from ``kv_b_proj``, then the rotated k_pe repeated on every
    head) and ``v [B, H, Smax, Dv]``, preallocated like transformers' StaticCache: a step writes its S rows
    at ``[length, length + S)`` and attends over the first ``length + S``. The [B, H, S, D] layout is the
    one SDPA reads without a copy (a [B, S, H, D] buffer holds the same bytes but hands SDPA strided heads).
    Every request of the batch has the same length (greedy generation from equal-length prompts).
    """

    def __init__(self, cfg, batch: int, max_len: int, dtype: torch.dtype, device: torch.device):
        h = cfg.num_attention_heads
        n = cfg.num_hidden_layers
        self.k = torch.zeros(n, batch, h, max_len, cfg.qk_head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(n, batch, h, max_len, cfg.v_head_dim, dtype=dtype, device=device)
        self.length = 0

    @staticmethod
    def bytes_per_token(cfg, elem_bytes: int) -> int:
        """Bytes one cached token takes over all layers: H (Dqk + Dv) elements per layer."""
        return cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * elem_bytes

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


def latent_bytes_per_token(cfg, elem_bytes: int) -> int:
    """Bytes one cached token takes in the latent cache over all layers: L + R elements per layer."""
    return cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * elem_bytes


def expanded_attention(attn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: ExpandedKVCache,
                       layer: int) -> torch.Tensor:
    """MLA's expanded form with a per-head cache: x ``[B, S, D]`` -> ``[B, S, D]``.

    The projections are the model's own (``attn._project``: q, the normalised c_kv, the rotated k_pe), so the
    two generation paths differ only in what they cache and how they attend."""
    b, s, _ = x.shape
    h, dn, dv, r = attn.n_heads, attn.qk_nope_head_dim, attn.v_head_dim, attn.qk_rope_head_dim
    q_nope, q_pe, c_kv, k_pe = attn._project(x, cos, sin)  # k_pe [B, S, 1, R]
    k_nope, v = attn.kv_b_proj(c_kv).view(b, s, h, dn + dv).split([dn, dv], dim=-1)
    q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # [B, H, S, Dqk]
    k = torch.cat([k_nope, k_pe.expand(b, s, h, r)], dim=-1)  # [B, S, H, Dqk]
    start, end = cache.length, cache.length + s
    cache.k[layer, :, :, start:end] = k.transpose(1, 2)
    cache.v[layer, :, :, start:end] = v.transpose(1, 2)
    keys, values = cache.k[layer, :, :, :end], cache.v[layer, :, :, :end]
    if s == 1:  # one new token sees the whole cache: no mask
        o = F.scaled_dot_product_attention(q, keys, values, scale=attn.softmax_scale)
    elif start == 0:  # a prompt into an empty cache: plain causal
        o = F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=attn.softmax_scale)
    else:  # S new tokens after `start` cached ones: new token i sees positions <= start + i
        keep = torch.arange(end, device=x.device)[None, :] <= (start + torch.arange(s, device=x.device))[:, None]
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=keep, scale=attn.softmax_scale)
    return attn.o_proj(o.transpose(1, 2).reshape(b, s, h * dv))


def expanded_forward(model, ids: torch.Tensor, cache: ExpandedKVCache) -> torch.Tensor:
    """``Transformer.forward(ids, cache=...)`` with the expanded cache: ids ``[B, S]`` continuing the cached
    tokens -> fp32 logits ``[B, S, V]``; the block is ``Block.forward``'s pre-norm residual pair."""
    b, s = ids.shape
    h = model.embed_tokens(ids)
    positions = (cache.length + torch.arange(s, device=ids.device)).expand(b, s)
    cos, sin = model.rotary(positions)
    for layer in model.layers:
        h = h + expanded_attention(layer.self_attn, layer.input_layernorm(h), cos, sin, cache, layer.layer_idx)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    cache.length += s
    return model.logits(model.norm(h))


@dataclass
class Generator:
    """One way of generating: a fresh cache for B sequences of ``max_len`` tokens, and one step
    ``step(ids [B, S], cache) -> logits [B, S, V]`` that continues the cached tokens."""

    name: str
    new_cache: Callable[[int, int], Any]
    step: Callable[[torch.Tensor, Any], torch.Tensor]


def generators(model) -> tuple[Generator, Generator]:
    """(latent, expanded) for ``model``: the model's own LatentKVCache path, and :func:`expanded_forward`."""
    p = model.embed_tokens.weight
    latent = Generator("latent cache", lambda b, n: model.new_cache(b, n),
                       lambda ids, cache: model(ids, cache=cache))
    expanded = Generator("expanded cache", lambda b, n: ExpandedKVCache(model.config, b, n, p.dtype, p.device),
                         lambda ids, cache: expanded_forward(model, ids, cache))
    return latent, expanded


def generate(gen: Generator, prompt: torch.Tensor, new: int) -> torch.Tensor:
    """Greedy generation: the prompt's forward gives the first new token, then ``new - 1`` one-token steps.
    Returns the ``[B, new]`` new tokens."""
    b, p = prompt.shape
    with torch.no_grad():
        cache = gen.new_cache(b, p + new)
        nxt = gen.step(prompt, cache)[:, -1].argmax(-1, keepdim=True)
        out = [nxt]
        for _ in range(new - 1):
            nxt = gen.step(nxt, cache)[:, -1].argmax(-1, keepdim=True)
            out.append(nxt)
    return torch.cat(out, dim=1)


def forced_logits(gen: Generator, prompt: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Teacher-forced: the prompt, then each of ``tokens [B, n]`` one step at a time; the logits of every
    step concatenated, ``[B, P + n, V]``. Both paths see the same inputs, so their logits compare directly
    (free-running greedy generations may part at a near-tie of random weights' flat logits)."""
    b, p = prompt.shape
    with torch.no_grad():
        cache = gen.new_cache(b, p + tokens.shape[1])
        out = [gen.step(prompt, cache)]
        for i in range(tokens.shape[1]):
            out.append(gen.step(tokens[:, i:i + 1], cache))
    return torch.cat(out, dim=1)


@dataclass
class GenerationSetup:
    model: Any
    prompt: torch.Tensor
    shape: GenerateShape
    latent: Generator
    expanded: Generator
    max_abs_diff: float  # max |logits latent - logits expanded|, teacher-forced over prompt + new - 1 tokens
    same_tokens: bool  # whether the two greedy generations chose the same tokens


def build_generation(shape: GenerateShape, seed: int = 0,
                     device: torch.device = torch.device("cpu")) -> GenerationSetup:
    """The tiny model (seeded init, fp32, eval), a random prompt, both generators, and the logits check."""
    import r1kernels

    torch.manual_seed(seed)
    model = r1kernels.Transformer(r1kernels.ModelConfig.preset(shape.preset)).to(device).float().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    prompt = torch.randint(0, model.config.vocab_size, (shape.batch, shape.prompt), generator=gen).to(device)
    latent, expanded = generators(model)
    toks = generate(latent, prompt, shape.new)
    forced = toks[:, :-1]  # the last token's step would only predict past the generation
    diff = (forced_logits(latent, prompt, forced) - forced_logits(expanded, prompt, forced)).abs().max().item()
    same = bool(torch.equal(toks, generate(expanded, prompt, shape.new)))
    return GenerationSetup(model, prompt, shape, latent, expanded, diff, same)


def time_generation(setup: GenerationSetup, budget_s: float, min_runs: int = 5, warmup: int = 1) -> list[list[float]]:
    """Per-generation wall times in ms, ``[latent, expanded]``, run in turns so a change of the machine's
    load hits both alike (``bench_model.time_alternating``)."""
    from .bench_model import time_alternating

    calls = [lambda g=g: generate(g, setup.prompt, setup.shape.new) for g in (setup.latent, setup.expanded)]
    return time_alternating(calls, budget_s, min_runs=min_runs, warmup=warmup)


@dataclass
class GenerationFigures:
    latent_tok_s: float
    expanded_tok_s: float
    latent_ms: float
    expanded_ms: float
    latent_bytes: int  # per token, all layers
    expanded_bytes: int
    latent_floats_per_layer: int
    expanded_floats_per_layer: int

    @property
    def speed_ratio(self) -> float:
        return self.latent_tok_s / self.expanded_tok_s

    @property
    def cache_ratio(self) -> float:
        return self.expanded_bytes / self.latent_bytes


def generation_figures(setup: GenerationSetup, times: list[list[float]]) -> GenerationFigures:
    cfg = setup.model.config
    e = setup.model.embed_tokens.weight.element_size()
    sh = setup.shape
    lat_ms, exp_ms = statistics.median(times[0]), statistics.median(times[1])
    return GenerationFigures(
        latent_tok_s=sh.batch * sh.new / (lat_ms / 1e3), expanded_tok_s=sh.batch * sh.new / (exp_ms / 1e3),
        latent_ms=lat_ms, expanded_ms=exp_ms,
        latent_bytes=latent_bytes_per_token(cfg, e), expanded_bytes=ExpandedKVCache.bytes_per_token(cfg, e),
        latent_floats_per_layer=cfg.kv_lora_rank + cfg.qk_rope_head_dim,
        expanded_floats_per_layer=cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim),
    )


def goal_line(setup: GenerationSetup, f: GenerationFigures) -> str:
    """The CPU goal's figures in one line, each against its bound."""
    sh, cfg = setup.shape, setup.model.config
    speed_ok = "met" if f.speed_ratio >= GOAL_SPEED_RATIO else "NOT met"
    cache_ok = "met" if f.cache_ratio >= GOAL_CACHE_RATIO else "NOT met"
    return (
        f"{sh.preset} generation, {sh.shape}: latent cache {f.latent_tok_s:,.0f} tok/s ({f.latent_ms:.1f} ms) | "
        f"expanded cache {f.expanded_tok_s:,.0f} tok/s ({f.expanded_ms:.1f} ms) | speed ratio {f.speed_ratio:.2f} "
        f"(goal >= {GOAL_SPEED_RATIO:g}: {speed_ok}); cache per token {f.latent_bytes:,} B "
        f"({f.latent_floats_per_layer} floats/layer = L + R) vs {f.expanded_bytes:,} B "
        f"({f.expanded_floats_per_layer} floats/layer = H (Dqk + Dv), H={cfg.num_attention_heads}): "
        f"{f.cache_ratio:.2f}x smaller (goal >= {GOAL_CACHE_RATIO:g}: {cache_ok}); "
        f"max |logits diff| {setup.max_abs_diff:.1e} (bound {MODEL_ATOL:.0e}), same greedy tokens: {setup.same_tokens}"
    )


def v3_cache_ratio() -> float:
    """The expanded / latent cache ratio at DeepSeek-V3's widths (H (Dqk + Dv) / (L + R) = 128 x 320 / 576):
    the ratio depends only on the config, so the tiny preset's 4 heads give 4x where V3 gives 71x."""
    from .shapes import V3

    return V3.heads * (V3.qk_head_dim + V3.v_head_dim) / (V3.kv_lora_rank + V3.qk_rope_head_dim)


def generation_rows(ctx: Context, log: Callable[[str], None]) -> list[Row]:
    """Two ``model-decode`` rows (latent cache as the r1kernels row, expanded cache as the torch baseline)
    with ms per generation, tokens/s, cache bytes per token and the logits check."""
    shape = mla_generate_shape(ctx.shapes)
    base = dict(family=FAMILY, op="model-decode", case=shape.label, shape=shape.shape, mode="fwd", dtype="float32")
    rows = [Row(**base, impl="latent cache", kind="r1kernels"), Row(**base, impl="expanded cache", kind="torch")]
    try:
        setup = build_generation(shape, ctx.seed, ctx.device)
        # a whole generation takes a fraction of a second: five times the kernels' wall-time budget, and the
        # run's minimum count of calls and warm-ups (5 and 2 unless a caller changed them) of each
        times = time_generation(setup, 5 * ctx.cpu_budget_s, min_runs=ctx.cpu_min_runs, warmup=ctx.cpu_warmup)
    except Exception as exc:
        for r in rows:
            r.status, r.note = "error", f"{type(exc).__name__}: {exc}"[:400]
        log(f"mla    model-decode: error: {rows[0].note}")
        return rows
    f = generation_figures(setup, times)
    for r, t, tok_s, nb in ((rows[0], times[0], f.latent_tok_s, f.latent_bytes),
                            (rows[1], times[1], f.expanded_tok_s, f.expanded_bytes)):
        r.ms, r.ms_min, r.tokens_per_s, r.cache_bytes_per_token = statistics.median(t), min(t), tok_s, nb
    rows[0].max_abs_diff = setup.max_abs_diff
    if setup.max_abs_diff > MODEL_ATOL:
        rows[0].status = "mismatch"
        rows[0].note = f"max |logits diff| {setup.max_abs_diff:.2e} > {MODEL_ATOL:.0e} against the expanded cache"
    fill_speedups(rows)
    log("mla    " + goal_line(setup, f))
    return rows


def run(ctx: Context, ceilings: dict[str, Any], log: Callable[[str], None] = print) -> list[Row]:
    rows = run_cases(ctx, cases(ctx), ceilings, log)
    if not ctx.is_cuda:
        rows += generation_rows(ctx, log)
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_mla", description=__doc__.split("\n")[0])
    p.add_argument("--cpu-decode", action="store_true", required=True,
                   help="greedy generation on the tiny preset, latent cache against an expanded per-head cache")
    p.add_argument("--batch", type=int, default=None, help="prompts (default: the cpu shape set's, 4)")
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 64)")
    p.add_argument("--new", type=int, default=None, help="new tokens (default 64)")
    p.add_argument("--budget-s", type=float, default=3.0,
                   help="wall time for the timed generations of both (default 3)")
    args = p.parse_args(argv)
    d = mla_generate_shape(shape_set("cpu"))
    shape = GenerateShape(d.preset, args.batch or d.batch, args.prompt or d.prompt, args.new or d.new)
    setup = build_generation(shape)
    times = time_generation(setup, args.budget_s)
    f = generation_figures(setup, times)
    print(goal_line(setup, f))
    print(f"(medians over {len(times[0])} generations of each, taken in turns, {torch.get_num_threads()} threads; "
          f"tokens/s = {shape.batch} x {shape.new} / one generation's wall time; at DeepSeek-V3's widths the "
          f"cache ratio is {v3_cache_ratio():.1f}x)")
    return 0 if setup.max_abs_diff <= MODEL_ATOL else 1


if __name__ == "__main__":
    sys.exit(main())
