"""DeepSeek Sparse Attention (the ``dsa`` family, DeepSeek-V3.2): ``r1kernels.ops.dsa_mla_prefill`` (forward and
forward+backward) over the positions ``dsa_topk`` selected from ``lightning_indexer``'s scores, the indexer and
its top-k as rows of their own, and ``dsa_mla_decode`` (one decode step over the paged latent cache), each set
against dense absorbed MLA of the same shape: causal SDPA prefill and ``ops.mla_decode``.

Letters: B sequences (prefill: 1) or decode requests, S tokens of the sequence (prefill) or cached per request
(decode), T = B S packed prefill tokens, H query heads, C the latent row (kv_lora_rank + qk_rope_head_dim),
Dv the value columns (kv_lora_rank), K selected positions per query, Hi / Di indexer heads / head dim, P page
size, e bytes per element.

Shapes (:func:`prefill_shapes`, :func:`decode_shapes`; kept here until the shared registry grows a DSA entry):
GPU (bf16): one causal sequence of S = 8k, 16k, 32k, 64k tokens, H = 128, C = 576 (512 + 64), Dv = 512,
K = 2048, indexer 64 heads x 128 (V3.2's); decode: B = 16 requests, one new token each, S cached tokens, pages
of 64 in a shuffled order. CPU (fp32): S = 512, H = 8, C = 96, Dv = 64, K = 64, indexer 4 x 32 (decode B = 4);
smoke: S = 256, H = 4, C = 48, Dv = 32, K = 32, indexer 4 x 16 (decode B = 2).

Inputs: random q [T, H, C] (per head [q_nope . W_UK, rope(q_pe)]), one latent row kv [T, C] per token (the
shared K/V head: keys all C columns, values the first Dv), random indexer queries / keys / weights. The
selection idx [T, K] is computed once per shape with the ``auto`` backends, outside every timing; it is the
one the indexer row times.

Rows per prefill shape (cases of their own, since they compute different things):

* ``dsa_indexer``: ``lightning_indexer`` then ``dsa_topk`` (scores [B, S, S] fp32, then idx), the cost DSA adds.
* ``dsa_mla_prefill``: the sparse attention; torch baseline "torch gather (chunked)" (:func:`torch_sparse_prefill`:
  per chunk of queries, gather the selected rows, bmm, fp32 softmax, bmm: what a user would write), forward only
  on the GPU (its autograd keeps every chunk's gathered rows, T K C e bytes: 154 GB at 64k).
* ``dense_mla_prefill``: the dense baseline, "torch sdpa (mqa)": causal ``scaled_dot_product_attention`` with the
  576-wide latent row as one K/V head expanded (stride 0) over the H query heads; on CUDA the math backend is
  excluded (it would materialise [H, S, S] scores), so a fused kernel runs or the row says why not (today the
  memory-efficient one: flash and cuDNN stop at head dim 256). Then r1kernels' ``mla_attention`` in the same
  absorbed form: its Triton kernels take head dims up to 256, so on the GPU the row is recorded unavailable with
  the dispatcher's reason (Dqk = 576); on the CPU its ``cpu`` and ``reference`` backends run and are checked
  against SDPA.

Per decode shape: ``dsa_indexer`` (one query per request over S index keys), ``dsa_mla_decode`` (torch baseline:
the reference, a gather of [B, K, C]) and ``mla_decode`` (dense over all S cached rows; torch baselines "torch
bmm" and "torch sdpa (mqa)" of ``bench_mla`` over a contiguous copy of the cache, made outside the timing).

Speedups: after the run every DSA row's ``x torch`` is the dense time of the same shape and pass over its own
(prefill: "torch sdpa (mqa)"; decode: the fastest ``ops.mla_decode`` backend), and ``torch_ref`` says which. The
log adds the totals with the indexer (prefill fwd+bwd: the attention's fwd+bwd plus the indexer's forward; the
indexer's own gradient comes from its KL loss, not from the attention) and the goal (DSA prefill >= 4x dense
MLA prefill at 64k).

FLOP formulas (the diagonal and the masked -1 slots of early queries counted as the kernels run them):

* sparse prefill fwd: 2 T H K (C + Dv); dense causal fwd: 2 T (T + 1) / 2 H (C + Dv) (q.k over C, p.v over Dv).
* fwd+bwd: 3.5 x the forward, the repository's FlashAttention convention (the backward recomputes q.k and runs
  four more products; exactly, 2 T H K (4 C + 3 Dv) for the sparse pair, 0.8% more at V3.2's widths).
* indexer: 2 Hi (Di + 1) per visible (query, key) pair (the Hi dots, the ReLU-weighted sum); prefill
  B S (S + 1) / 2 pairs, decode B S.
* decode: sparse 2 B H min(K, S) (C + Dv); dense 2 B H S (C + Dv) (``bench_mla.decode_flops``).

Byte formulas (the fewest bytes a pass moves: each input read once, each output written once):

* sparse prefill fwd: read q, kv, idx, write out, lse = T H (C + Dv) e + T C e + 4 T K + 4 T H;
  fwd+bwd: that, then read q, out, d_out, kv, idx, lse and write dq, dkv: + T H (2 C + 2 Dv) e + 2 T C e
  + 4 T K + 4 T H.
* dense prefill fwd: T H (C + Dv) e + T C e (q, the shared rows, out); fwd+bwd: + T H (2 C + 2 Dv) e + 2 T C e
  + 8 T H (the fp32 lse written forward and read backward).
* indexer: read q_idx, k_idx, weights, write the fp32 scores, read them back for the top-k, write idx:
  B [Sq Hi Di e + S Di e + Sq Hi e + 8 Sq S + 4 Sq K] with Sq = S (prefill) or 1 (decode).
* decode, per step: sparse reads the selected rows, q, idx and their page ids and writes out:
  B [min(K, S) C e + H C e + H Dv e + 8 K + 4]; dense reads every cached row (``bench_mla.decode_bytes``:
  B S C e + B H C e + B H Dv e + 4 B ceil(S / P) + 4 B).

Timing: ``harness.run_case`` with :func:`time_call` as its timer: on CUDA a call that takes at least :data:`LONG_CALL_MS`
(measured once with CUDA events after the check call, which also compiles) keeps that one measurement instead
of going through ``do_bench``, whose first call, estimate, warm-up and repetition make at least 8 more calls:
dense SDPA fwd+bwd at 64k is tens of seconds a call, where one call's spread is far below 1%. A shorter call
goes through ``do_bench`` after that one extra call.

GPU time (H200, estimated, not measured yet): dense SDPA dominates, head dim 576 has no flash kernel; at 64k
about 6 s forward and 25 s forward+backward a call, 2 calls each with the rule above; 32k a quarter of that.
The family takes about 2.5 minutes, more than the GPU suite's bench step leaves after the other families, so
run it on its own: ``python -m benchmarks.run --device cuda --only dsa --out DIR``. Memory peaks in dense
fwd+bwd at 64k: q, d_out, out, dq and the expanded key / value gradients (~60 GB) plus the kernel's fp32
workspace.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from .bench_mla import decode_bytes as dense_decode_bytes
from .bench_mla import decode_flops as dense_decode_flops
from .bench_mla import make_paged_cache, softmax_scale, torch_bmm_decode, torch_sdpa_decode
from .harness import Case, Context, Impl, Row, format_row_line, run_case, time_stats
from .shapes import MLA_PAGE, MLADecodeShape, ShapeSet

FAMILY = "dsa"
DEVICES = ("cuda", "cpu")

GPU_SEQLENS = (8192, 16384, 32768, 65536)
DECODE_BATCH = 16
TOPK = 2048  # V3.2's index_topk
INDEX_HEADS, INDEX_DIM = 64, 128  # V3.2's index_n_heads, index_head_dim
# Queries per step of the torch gather baseline: [1024, K, C] gathered bf16 rows are 2.4 GB at V3.2's widths.
PREFILL_CHUNK = 1024
# A CUDA call at least this long is timed once (module docstring).
LONG_CALL_MS = 1000.0
# The goal: DSA prefill at least this many times faster than dense MLA prefill at the longest S.
GOAL_SPEEDUP = 4.0

DENSE = "torch sdpa (mqa)"
TRITON_ON_CPU = "Triton runs on the CPU only under its interpreter, whose times say nothing about the kernel"


@dataclass(frozen=True)
class DSAShape:
    """``batch`` sequences of ``seqlen`` tokens (prefill: one, causal) or ``batch`` requests with ``seqlen``
    cached tokens and one new query each (decode); ``heads`` query heads over one shared latent row of
    ``latent`` columns, the first ``dv`` of them the values; ``topk`` selected positions per query;
    ``index_heads`` x ``index_dim`` indexer; cache pages of ``page`` rows (decode)."""

    batch: int
    seqlen: int
    heads: int
    latent: int
    dv: int
    topk: int
    index_heads: int
    index_dim: int
    page: int
    decode: bool

    @property
    def tokens(self) -> int:
        return self.batch * self.seqlen

    @property
    def label(self) -> str:
        return f"decode B={self.batch} S={self.seqlen}" if self.decode else f"S={self.seqlen}"

    @property
    def shape(self) -> str:
        s = (f"B={self.batch} S={self.seqlen} H={self.heads} C={self.latent} Dv={self.dv} K={self.topk} "
             f"idx {self.index_heads}x{self.index_dim}")
        return s + (f" page {self.page}" if self.decode else " causal")


# (S, H, C, Dv, K, Hi, Di, decode B) of the CPU shape sets
_CPU_SHAPES = {"smoke": (256, 4, 48, 32, 32, 4, 16, 2), "cpu": (512, 8, 96, 64, 64, 4, 32, 4)}


def _shapes(s: ShapeSet, decode: bool) -> list[DSAShape]:
    if s.name in _CPU_SHAPES:
        sl, h, c, dv, k, hi, di, b = _CPU_SHAPES[s.name]
        return [DSAShape(b if decode else 1, sl, h, c, dv, k, hi, di, MLA_PAGE, decode)]
    d = s.dims
    c = d.kv_lora_rank + d.qk_rope_head_dim
    b = DECODE_BATCH if decode else 1
    return [DSAShape(b, sl, d.heads, c, d.kv_lora_rank, TOPK, INDEX_HEADS, INDEX_DIM, MLA_PAGE, decode)
            for sl in GPU_SEQLENS]


def prefill_shapes(s: ShapeSet) -> list[DSAShape]:
    return _shapes(s, decode=False)


def decode_shapes(s: ShapeSet) -> list[DSAShape]:
    return _shapes(s, decode=True)


# ------------------------------------------------------------------------------------------------------
# Formulas (module docstring)


def sparse_flops(sh: DSAShape, mode: str) -> float:
    fwd = 2 * sh.tokens * sh.heads * sh.topk * (sh.latent + sh.dv)
    return fwd if mode == "fwd" else 3.5 * fwd


def dense_flops(sh: DSAShape, mode: str) -> float:
    fwd = 2 * sh.batch * sh.seqlen * (sh.seqlen + 1) / 2 * sh.heads * (sh.latent + sh.dv)
    return fwd if mode == "fwd" else 3.5 * fwd


def sparse_bytes(sh: DSAShape, e: int, mode: str) -> float:
    t, h, c, dv, k = sh.tokens, sh.heads, sh.latent, sh.dv, sh.topk
    fwd = t * h * (c + dv) * e + t * c * e + 4 * t * k + 4 * t * h
    if mode == "fwd":
        return fwd
    return fwd + t * h * (2 * c + 2 * dv) * e + 2 * t * c * e + 4 * t * k + 4 * t * h


def dense_bytes(sh: DSAShape, e: int, mode: str) -> float:
    t, h, c, dv = sh.tokens, sh.heads, sh.latent, sh.dv
    fwd = t * h * (c + dv) * e + t * c * e
    if mode == "fwd":
        return fwd
    return fwd + t * h * (2 * c + 2 * dv) * e + 2 * t * c * e + 8 * t * h


def indexer_flops(sh: DSAShape) -> float:
    pairs = sh.batch * (sh.seqlen if sh.decode else sh.seqlen * (sh.seqlen + 1) / 2)
    return 2 * sh.index_heads * (sh.index_dim + 1) * pairs


def indexer_bytes(sh: DSAShape, e: int) -> float:
    sq, s, hi, di = (1 if sh.decode else sh.seqlen), sh.seqlen, sh.index_heads, sh.index_dim
    return sh.batch * (sq * hi * di * e + s * di * e + sq * hi * e + 8 * sq * s + 4 * sq * sh.topk)


def _mla_decode_shape(sh: DSAShape) -> MLADecodeShape:
    return MLADecodeShape(sh.batch, sh.seqlen, sh.heads, 1, sh.latent, sh.dv, sh.page)


def sparse_decode_flops(sh: DSAShape) -> float:
    return 2 * sh.batch * sh.heads * min(sh.topk, sh.seqlen) * (sh.latent + sh.dv)


def sparse_decode_bytes(sh: DSAShape, e: int) -> float:
    rows = min(sh.topk, sh.seqlen)
    return sh.batch * (rows * sh.latent * e + sh.heads * sh.latent * e + sh.heads * sh.dv * e + 8 * sh.topk + 4)


# ------------------------------------------------------------------------------------------------------
# Torch baselines


def torch_sparse_prefill(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, scale: float, dv: int,
                         chunk: int = PREFILL_CHUNK) -> torch.Tensor:
    """Sparse absorbed-MLA prefill of one sequence as a user would write it in torch, ``chunk`` queries at a time.

    q ``[T, H, C]``, kv ``[T, C]``, idx ``[T, K]`` int32 positions (``-1``: unused slot; every query has at least
    one valid one, as ``dsa_topk`` gives for a causal sequence). Returns out ``[T, H, Dv]`` in q's dtype:
    bmm for q.k, softmax in fp32, probabilities rounded to q's dtype, bmm with the first ``dv`` columns.
    Differentiable through torch autograd (which keeps every chunk's gathered rows).
    """
    outs = []
    for s0 in range(0, q.shape[0], chunk):
        pos = idx[s0:s0 + chunk].long()  # [c, K]
        rows = kv[pos.clamp(min=0)]  # [c, K, C]
        s = torch.bmm(q[s0:s0 + chunk], rows.transpose(1, 2)).float() * scale  # [c, H, K]
        s = s.masked_fill((pos < 0)[:, None, :], float("-inf"))
        p = s.softmax(-1).to(q.dtype)
        outs.append(torch.bmm(p, rows[..., :dv]))  # [c, H, Dv]
    return torch.cat(outs)


def _fused_sdpa(ctx: Context):
    """On CUDA, SDPA without its math backend (module docstring); on the CPU, SDPA as it is."""
    if not ctx.is_cuda:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])


def torch_dense_prefill(ctx: Context, q: torch.Tensor, kv: torch.Tensor, scale: float, dv: int) -> torch.Tensor:
    """Dense causal absorbed MLA of one sequence through SDPA: q ``[T, H, C]`` viewed as ``[1, H, T, C]``, the
    latent rows ``kv [T, C]`` as one K/V head expanded over the H heads (a stride-0 view, no copy). Returns
    ``[T, H, Dv]`` (a view of SDPA's output)."""
    t, h, c = q.shape
    k = kv[None, None].expand(1, h, t, c)  # [1, H, T, C]
    v = kv[None, None, :, :dv].expand(1, h, t, dv)  # [1, H, T, Dv]
    with _fused_sdpa(ctx):
        o = F.scaled_dot_product_attention(q.unsqueeze(0).transpose(1, 2), k, v, is_causal=True, scale=scale)
    return o[0].transpose(0, 1)  # [1, H, T, Dv] -> [T, H, Dv]


# ------------------------------------------------------------------------------------------------------
# Cases


def peers(ctx: Context) -> dict[str, str]:
    # The published peers (FlashMLA's sparse kernels, DeepSeek's own for V3.2, and vLLM's) are compiled CUDA
    # extensions, installed on neither machine and not carriable as pure-Python wheels.
    return {}


def _backend_impls(ctx: Context, backends: tuple[str, ...], call: Callable[[str], Callable[[], Any]],
                   gpu_reference_why: Optional[str] = None) -> list[Impl]:
    """One Impl per backend of ``backends`` that belongs on ``ctx``'s device (a native backend of the other
    device type is left out); ``call(b)`` is the timed closure. The reference runs on the GPU unless
    ``gpu_reference_why`` says why not."""
    impls = []
    for b in backends:
        if (b == "cuda" and not ctx.is_cuda) or (b == "cpu" and ctx.is_cuda):
            continue
        if b == "triton" and not ctx.is_cuda:
            impls.append(Impl(b, "r1kernels", why_not=TRITON_ON_CPU))
        elif b == "reference" and ctx.is_cuda and gpu_reference_why:
            impls.append(Impl(b, "r1kernels", why_not=gpu_reference_why))
        else:
            impls.append(Impl(b, "r1kernels", call(b)))
    return impls


@dataclass
class IndexerInputs:
    """q_idx ``[B, Sq, Hi, Di]``, k_idx ``[B, S, Di]``, weights ``[B, Sq, Hi]``, q_positions ``[B, Sq]`` int64,
    lengths ``[B]`` int32 (S): Sq = S causal queries (prefill) or the one new token at S - 1 (decode)."""

    q: torch.Tensor
    k: torch.Tensor
    w: torch.Tensor
    pos: torch.Tensor
    lengths: torch.Tensor


def _indexer_inputs(ctx: Context, sh: DSAShape) -> IndexerInputs:
    b, s, hi, di = sh.batch, sh.seqlen, sh.index_heads, sh.index_dim
    sq = 1 if sh.decode else s
    pos = torch.arange(s - sq, s, device=ctx.device).expand(b, sq).contiguous()
    # weights carry V3.2's folded scale factors (Hi^-0.5 Di^-0.5) so the scores stay O(1)
    return IndexerInputs(ctx.randn(b, sq, hi, di), ctx.randn(b, s, di), ctx.randn(b, sq, hi, scale=(hi * di) ** -0.5),
                         pos, torch.full((b,), s, dtype=torch.int32, device=ctx.device))


def _indexer_case(ctx: Context, sh: DSAShape, x: IndexerInputs, gpu_reference_why: Optional[str]) -> Case:
    from r1kernels import ops
    from r1kernels.reference import sparse_dsa as ref

    k = sh.topk

    def torch_select():
        return ref.dsa_topk(ref.lightning_indexer(x.q, x.k, x.w, q_positions=x.pos), k, lengths=x.lengths)

    def call(b: str) -> Callable[[], Any]:
        return lambda: ops.dsa_topk(ops.lightning_indexer(x.q, x.k, x.w, q_positions=x.pos, backend=b), k,
                                    lengths=x.lengths, backend=b)

    name = "torch indexer+topk (reference)"
    impls = [Impl(name, "torch", why_not=gpu_reference_why) if (ctx.is_cuda and gpu_reference_why)
             else Impl(name, "torch", torch_select)]
    impls += _backend_impls(ctx, ("triton", "reference"), call, gpu_reference_why)
    return Case(family=FAMILY, op="dsa_indexer", label=f"indexer {sh.label}", shape=sh.shape, mode="fwd",
                dtype=ctx.dtype, flops=indexer_flops(sh), nbytes=indexer_bytes(sh, x.q.element_size()), impls=impls)


def _select(x: IndexerInputs, k: int) -> torch.Tensor:
    """The selection the attention rows use: ``[B, Sq, K]`` int32, ``auto`` backends, outside any timing."""
    from r1kernels import ops

    return ops.dsa_topk(ops.lightning_indexer(x.q, x.k, x.w, q_positions=x.pos), k, lengths=x.lengths)


def prefill_cases(ctx: Context) -> Iterator[Case]:
    for sh in prefill_shapes(ctx.shapes):
        yield from _prefill_shape_cases(ctx, sh)


def _prefill_shape_cases(ctx: Context, sh: DSAShape) -> Iterator[Case]:
    """The indexer, sparse and dense cases of one prefill shape, both passes. A function of its own so that the
    closures hold this shape's tensors and free them when the run moves on."""
    from r1kernels import ops

    t, h, c, dv, k = sh.tokens, sh.heads, sh.latent, sh.dv, sh.topk
    scale = softmax_scale(ctx)
    x = _indexer_inputs(ctx, sh)
    idx = _select(x, k).view(t, k)  # [1, S, K] -> [T, K]
    q, kv, do = ctx.randn(t, h, c), ctx.randn(t, c), ctx.randn(t, h, dv)
    cu = torch.tensor([0, t], dtype=torch.int32, device=ctx.device)
    leaves = [q.detach().requires_grad_(True), kv.detach().requires_grad_(True)]
    es = q.element_size()

    yield _indexer_case(ctx, sh, x, f"not run on the GPU: the pure-torch indexer builds fp32 dots [S, Hi, S] "
                                    f"({sh.seqlen ** 2 * sh.index_heads * 4 / 1e9:.0f} GB here)")

    def fwd_bwd(f: Callable[..., torch.Tensor]) -> Callable[[], Any]:
        def step():
            o = f(*leaves)
            return (o, *torch.autograd.grad(o, leaves, do))
        return step

    def sparse(b: str) -> Callable[..., torch.Tensor]:
        return lambda qq, kk: ops.dsa_mla_prefill(qq, kk, idx, cu, softmax_scale=scale, head_dim_v=dv, backend=b)[0]

    def gathered(qq, kk):
        return torch_sparse_prefill(qq, kk, idx, scale, dv)

    ref_why = (f"not run on the GPU: the reference gathers every query's selected rows at once, [T, K, C] fp32 "
               f"({t * k * c * 4 / 1e9:.0f} GB here)")
    for mode in ("fwd", "fwd+bwd"):
        def timed(f, mode=mode):
            return (lambda: f(q, kv)) if mode == "fwd" else fwd_bwd(f)

        if mode == "fwd+bwd" and ctx.is_cuda:
            torch_impl = Impl("torch gather (chunked)", "torch",
                              why_not=f"not run on the GPU for fwd+bwd: autograd keeps every chunk's gathered rows, "
                                      f"T K C e = {t * k * c * es / 1e9:.0f} GB here")
        else:
            torch_impl = Impl("torch gather (chunked)", "torch", timed(gathered))
        impls = [torch_impl] + _backend_impls(ctx, ("triton", "reference"), lambda b: timed(sparse(b)), ref_why)
        yield Case(family=FAMILY, op="dsa_mla_prefill", label=f"dsa {sh.label}", shape=sh.shape, mode=mode,
                   dtype=ctx.dtype, flops=sparse_flops(sh, mode), nbytes=sparse_bytes(sh, es, mode), impls=impls)

    def dense_sdpa(qq, kk):
        return torch_dense_prefill(ctx, qq, kk, scale, dv)

    def dense_mla(b: str) -> Callable[..., torch.Tensor]:
        # the absorbed form through mla_attention: the shared row expanded over the heads (views, no copies)
        return lambda qq, kk: ops.mla_attention(qq, kk[:, None].expand(t, h, c), kk[:, None, :dv].expand(t, h, dv),
                                                cu, sh.seqlen, softmax_scale=scale, causal=True, backend=b)

    mla_ref_why = (f"not run on the GPU: the reference materialises fp32 scores [H, S, S] "
                   f"({h * sh.seqlen ** 2 * 4 / 1e9:.0f} GB here)")
    for mode in ("fwd", "fwd+bwd"):
        def timed(f, mode=mode):
            return (lambda: f(q, kv)) if mode == "fwd" else fwd_bwd(f)

        impls = [Impl(DENSE, "torch", timed(dense_sdpa))]
        impls += _backend_impls(ctx, ("triton", "cpu", "reference"), lambda b: timed(dense_mla(b)), mla_ref_why)
        yield Case(family=FAMILY, op="dense_mla_prefill", label=f"dense {sh.label}", shape=sh.shape, mode=mode,
                   dtype=ctx.dtype, flops=dense_flops(sh, mode), nbytes=dense_bytes(sh, es, mode), impls=impls)


def decode_cases(ctx: Context) -> Iterator[Case]:
    for sh in decode_shapes(ctx.shapes):
        yield from _decode_shape_cases(ctx, sh)


def _decode_shape_cases(ctx: Context, sh: DSAShape) -> Iterator[Case]:
    """The indexer, sparse and dense decode cases of one shape, over one paged cache they share."""
    from r1kernels import ops
    from r1kernels.reference import sparse_dsa as ref

    b, h, c, dv = sh.batch, sh.heads, sh.latent, sh.dv
    scale = softmax_scale(ctx)
    x = _indexer_inputs(ctx, sh)
    idx = _select(x, sh.topk)  # [B, 1, K] absolute cache positions
    cache = make_paged_cache(ctx, b, sh.seqlen, c, sh.page)
    q = ctx.randn(b, 1, h, c)
    es = q.element_size()

    yield _indexer_case(ctx, sh, x, None)

    def sparse(backend: str) -> Callable[[], Any]:
        # the output only: the dense cases' torch baselines return no lse, and the sparse one follows them
        return lambda: ops.dsa_mla_decode(q, cache.kv, cache.block_table, cache.seqlens, idx, softmax_scale=scale,
                                          head_dim_v=dv, backend=backend)[0]

    impls = [Impl("torch dsa decode (reference)", "torch", lambda: ref.dsa_mla_decode(
        q, cache.kv, cache.block_table, cache.seqlens, idx, softmax_scale=scale, head_dim_v=dv)[0])]
    impls += _backend_impls(ctx, ("triton", "reference"), sparse)
    yield Case(family=FAMILY, op="dsa_mla_decode", label=f"dsa {sh.label}", shape=sh.shape, mode="fwd",
               dtype=ctx.dtype, flops=sparse_decode_flops(sh), nbytes=sparse_decode_bytes(sh, es), impls=impls)

    def dense(backend: str) -> Callable[[], Any]:
        return lambda: ops.mla_decode(q, cache.kv, cache.block_table, cache.seqlens, softmax_scale=scale, causal=True,
                                      head_dim_v=dv, backend=backend)[0]

    impls = [Impl("torch bmm", "torch", lambda: torch_bmm_decode(q, cache.contiguous, scale, dv, None)),
             Impl("torch sdpa (mqa)", "torch", lambda: torch_sdpa_decode(q, cache.contiguous, scale, dv, None))]
    impls += _backend_impls(ctx, ("triton", "cuda", "cpu", "reference"), dense,
                            "not timed on the GPU: a Python loop over the requests with a host sync for the lengths")
    msh = _mla_decode_shape(sh)
    yield Case(family=FAMILY, op="mla_decode", label=f"dense {sh.label}", shape=sh.shape, mode="fwd",
               dtype=ctx.dtype, flops=dense_decode_flops(msh), nbytes=dense_decode_bytes(msh, es), impls=impls)


def cases(ctx: Context) -> Iterator[Case]:
    yield from prefill_cases(ctx)
    yield from decode_cases(ctx)


# ------------------------------------------------------------------------------------------------------
# Running


def _event_ms(fn: Callable[[], Any]) -> float:
    """One call of ``fn`` timed with CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def time_call(fn: Callable[[], Any], ctx: Context) -> tuple[float, Optional[float]]:
    """``harness.time_stats``, except that a CUDA call of :data:`LONG_CALL_MS` or more keeps its one measurement
    (module docstring)."""
    if ctx.is_cuda:
        ms = _event_ms(fn)
        if ms >= LONG_CALL_MS:
            return ms, None
    return time_stats(fn, ctx)


def _fastest(rows: list[Row], op: str, shape: str, mode: str, kinds: tuple[str, ...] = ("r1kernels",),
             impl: Optional[str] = None) -> Optional[Row]:
    ok = [r for r in rows if r.op == op and r.shape == shape and r.mode == mode and r.kind in kinds
          and r.status == "ok" and r.ms and (impl is None or r.impl == impl)]
    return min(ok, key=lambda r: r.ms) if ok else None  # type: ignore[arg-type, return-value]


def _dense_row(rows: list[Row], r: Row) -> Optional[Row]:
    """The dense row a DSA row of the same shape is set against: for a decode shape (the indexer and the
    sparse decode) the fastest ``ops.mla_decode`` backend; for a prefill shape SDPA of the same pass (the
    indexer: the forward). Decode and prefill shapes print differently, so the shape string tells them apart."""
    d = _fastest(rows, "mla_decode", r.shape, "fwd")
    if d is None:
        mode = "fwd" if r.op == "dsa_indexer" else r.mode
        d = _fastest(rows, "dense_mla_prefill", r.shape, mode, ("torch",), DENSE)
    return d


def link_speedups(rows: list[Row]) -> None:
    """Set ``x torch`` of every DSA row (indexer, sparse attention; every implementation) to the time of its
    dense counterpart (:func:`_dense_row`) over its own; ``torch_ref`` names the counterpart."""
    for r in rows:
        if r.ms is None or r.op not in ("dsa_indexer", "dsa_mla_prefill", "dsa_mla_decode"):
            continue
        d = _dense_row(rows, r)
        if d is not None:
            r.vs_torch = d.ms / r.ms  # type: ignore[operator]
            r.torch_ref = d.impl if d.op == "dense_mla_prefill" else f"mla_decode {d.impl}"


def summary_lines(ctx: Context, rows: list[Row]) -> list[str]:
    """Per shape and pass, the fastest r1kernels DSA time against dense, alone and with the indexer + top-k; the
    goal at the longest prefill; decode bytes per step."""
    lines = []
    pre = prefill_shapes(ctx.shapes)
    longest = max(sh.seqlen for sh in pre)
    for sh in pre:
        for mode in ("fwd", "fwd+bwd"):
            d = _fastest(rows, "dense_mla_prefill", sh.shape, mode, ("torch",), DENSE)
            s = _fastest(rows, "dsa_mla_prefill", sh.shape, mode)
            ix = _fastest(rows, "dsa_indexer", sh.shape, "fwd")
            if d is None or s is None:
                continue
            x = d.ms / s.ms  # type: ignore[operator]
            line = f"{FAMILY:<6} prefill {sh.label} {mode}: dsa_mla_prefill ({s.impl}) x{x:.2f} vs {DENSE}"
            if ix is not None:
                line += f"; with indexer+topk ({ix.impl}) x{d.ms / (s.ms + ix.ms):.2f}"  # type: ignore[operator]
            if ctx.is_cuda and sh.seqlen == longest:  # the goal is stated for the GPU shapes
                line += f"  [goal >= {GOAL_SPEEDUP:g}x at S={longest}: {'met' if x >= GOAL_SPEEDUP else 'NOT met'}]"
            lines.append(line)
    for sh in decode_shapes(ctx.shapes):
        s = _fastest(rows, "dsa_mla_decode", sh.shape, "fwd")
        m = _fastest(rows, "mla_decode", sh.shape, "fwd")
        ix = _fastest(rows, "dsa_indexer", sh.shape, "fwd")
        if s is None or m is None:
            continue
        x = m.ms / s.ms  # type: ignore[operator]
        line = f"{FAMILY:<6} {sh.label}: dsa_mla_decode ({s.impl}) x{x:.2f} vs mla_decode ({m.impl})"
        if ix is not None:
            line += f"; with indexer+topk x{m.ms / (s.ms + ix.ms):.2f}"  # type: ignore[operator]
        if s.nbytes and m.nbytes:
            line += (f"; bytes per step {s.nbytes / 1e6:.2f} MB vs {m.nbytes / 1e6:.2f} MB "
                     f"({m.nbytes / s.nbytes:.1f}x fewer)")
        lines.append(line)
    return lines


def run(ctx: Context, ceilings: dict[str, Any], log: Callable[[str], None] = print) -> list[Row]:
    rows: list[Row] = []
    for case in cases(ctx):
        case_rows = run_case(ctx, case, ceilings, timer=time_call)
        for r in case_rows:
            log(format_row_line(r))
        rows.extend(case_rows)
    link_speedups(rows)
    for line in summary_lines(ctx, rows):
        log(line)
    return rows
