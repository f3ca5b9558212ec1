"""Native Sparse Attention (the ``sparse`` family, NSA part): ``r1kernels.ops.nsa_attention`` (prefill /
training, forward and forward+backward) and ``r1kernels.ops.nsa_decode`` (one decode step), against dense
causal attention through torch SDPA and against fla's ``parallel_nsa`` when it is importable.

Shapes (:func:`nsa_shapes`, :func:`decode_shapes`; kept here until the shared registry grows an NSA entry):
GPU: one sequence of S = 8k, 16k, 32k, 64k tokens, H = 64 query / Hk = 4 KV heads, D = Dv = 128, the paper's
geometry (l = 32, d = 16, l' = 64, n = 16 blocks with 1 initial + 2 local, w = 512); decode: B = 16 sequences
with S cached tokens each. CPU: S = 128, H = 8, Hk = 2, D = 64 (decode B = 2); smoke: S = 64, H = 4, Hk = 1, D = 32.

Rows and comparisons. NSA and dense attention compute different things, so they are separate cases of the
same shape: "nsa" (r1kernels backends; on the CPU also "torch nsa (reference)", the pure-torch spec, which
checks the reference backend), "dense" (``torch sdpa``, causal, GQA, the baseline a user would keep) and
"fla nsa" (the peer). After the run every NSA row's ``× torch`` is the dense SDPA time of the same shape and
pass over its own (``torch_ref`` says so), and ``× peer`` fla's time over its own. fla computes its own NSA
variant (compression by mean pooling with l = d = l' = 64, its own selection, and no window branch: it needs
flash-attn for that, absent on the H200), so its rows time a peer's NSA of the same size, not the same
output. On the GPU the NSA rows carry no rel err: no torch implementation of NSA fits these lengths (the
reference builds [S, H, S] masks); python_tests/test_sparse_nsa.py checks the kernels (bf16 on the GPU).

FLOP formulas, for one sequence of S tokens (counted exactly over positions t = 0 .. S-1):

* compressed keys seen by t: C(t) = max(0, floor((t - l + 1) / d) + 1); selected keys: with c = t // l',
  Sel(t) = (min(n, c + 1) - 1) l' + (t mod l') + 1 (the block holding t is causal); window: W(t) = min(w, t+1).
* fwd: 2 H (D + Dv) sum_t (C + Sel + W)  (q.k and p.v of every visible key)  +  2 H D sum_t C  (the
  block-score pass recomputes q.k_cmp after the softmax statistics are known).
* fwd+bwd: 3.5 x the attention part (FlashAttention's convention: the backward recomputes q.k and runs
  four more products) + the score pass once (it has no backward).
* dense causal (SDPA): 2 H S (S + 1) / 2 (D + Dv) fwd, 3.5 x that fwd+bwd.
* decode, per sequence of L cached tokens (t = L - 1): 2 H (D + Dv) (C + Sel + W) + 2 H D C; dense
  2 H L (D + Dv).

Byte formulas (e bytes per element; the fewest bytes each pass must move):

* fwd: read q, k, v, k_cmp, v_cmp, gates, write o: S H (D + Dv + 3) e + (S + Sc) Hk (D + Dv) e,
  Sc = C(S - 1) compressed tokens.
* fwd+bwd: the forward's, then read them again with o and d_o, write their gradients:
  S H (3 D + 4 Dv + 6) e + 3 (S + Sc) Hk (D + Dv) e.
* dense: S (H + Hk) (D + Dv) e fwd (q, k, v, o), 3 x fwd+bwd.
* decode (bytes read per step, the figure ``nsa_decode`` documents): B Hk [C (2 D + Dv) + (Sel + W)(D + Dv)] e
  + B H (D + 3) e + 8 B Hk NB; dense: B Hk L (D + Dv) e + B H D e.

GPU time (H200, estimated): dense SDPA is the slowest row (446 ms fwd+bwd at 64k); do_bench runs each
implementation ~2-10 times after a call that compiles, so the family takes well under a minute once the
Triton kernels are compiled (a few seconds each, 8 kernels).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from .harness import Case, Context, Impl, Row, run_cases
from .shapes import ShapeSet

FAMILY = "sparse"
DEVICES = ("cuda", "cpu")

# The paper's geometry (r1kernels.reference.sparse defaults).
GEOMETRY = dict(block_size=32, stride=16, select_block_size=64, num_selected=16, window=512, num_init=1, num_local=2)
GPU_SEQLENS = (8192, 16384, 32768, 65536)
DECODE_BATCH = 16
DENSE = "torch sdpa (dense causal)"
PEER = "fla parallel_nsa"


@dataclass(frozen=True)
class NSAShape:
    """``batch`` sequences of ``seqlen`` tokens (one packed batch for prefill; decode: one new token each,
    ``seqlen`` cached), ``heads`` query heads over ``kv_heads`` KV heads of width ``dim`` (q / k) and ``dv``."""

    batch: int
    seqlen: int
    heads: int
    kv_heads: int
    dim: int
    dv: int

    @property
    def label(self) -> str:
        return f"S={self.seqlen}" if self.batch == 1 else f"B={self.batch} S={self.seqlen}"

    @property
    def shape(self) -> str:
        g = GEOMETRY
        return (f"B={self.batch} S={self.seqlen} H={self.heads} Hk={self.kv_heads} D={self.dim} Dv={self.dv} "
                f"l={g['block_size']} d={g['stride']} l'={g['select_block_size']} n={g['num_selected']} "
                f"w={g['window']}")


def nsa_shapes(s: ShapeSet) -> list[NSAShape]:
    if s.name == "smoke":
        return [NSAShape(1, 64, 4, 1, 32, 32)]
    if s.name == "cpu":
        return [NSAShape(1, 128, 8, 2, 64, 64)]
    return [NSAShape(1, sl, 64, 4, 128, 128) for sl in GPU_SEQLENS]


def decode_shapes(s: ShapeSet) -> list[NSAShape]:
    if s.name == "smoke":
        return [NSAShape(1, 64, 4, 1, 32, 32)]
    if s.name == "cpu":
        return [NSAShape(2, 128, 8, 2, 64, 64)]
    return [NSAShape(DECODE_BATCH, sl, 64, 4, 128, 128) for sl in GPU_SEQLENS]


# ------------------------------------------------------------------------------------------------------
# Formulas


def visible_counts(seqlen: int) -> tuple[int, int, int]:
    """(sum_t C(t), sum_t Sel(t), sum_t W(t)) over the positions of one sequence (module docstring)."""
    g = GEOMETRY
    t = torch.arange(seqlen, dtype=torch.float64)
    c = torch.clamp(torch.floor((t - g["block_size"] + 1) / g["stride"]) + 1, min=0)
    lsel = g["select_block_size"]
    blk = torch.floor(t / lsel)
    sel = (torch.clamp(blk + 1, max=g["num_selected"]) - 1) * lsel + (t - blk * lsel) + 1
    win = torch.clamp(t + 1, max=g["window"])
    return int(c.sum()), int(sel.sum()), int(win.sum())


def decode_counts(seqlen: int) -> tuple[int, int, int, int]:
    """(C, Sel, W, NB) of the query at position seqlen - 1."""
    g = GEOMETRY
    t = seqlen - 1
    c = max(0, (t - g["block_size"] + 1) // g["stride"] + 1) if t >= g["block_size"] - 1 else 0
    lsel = g["select_block_size"]
    blk = t // lsel
    sel = (min(blk + 1, g["num_selected"]) - 1) * lsel + t % lsel + 1
    return c, sel, min(g["window"], t + 1), math.ceil(seqlen / lsel)


def nsa_flops(sh: NSAShape, mode: str) -> float:
    c, sel, win = visible_counts(sh.seqlen)
    attn = 2 * sh.heads * (sh.dim + sh.dv) * (c + sel + win)
    score = 2 * sh.heads * sh.dim * c
    return sh.batch * ((attn if mode == "fwd" else 3.5 * attn) + score)


def dense_flops(sh: NSAShape, mode: str) -> float:
    fwd = 2 * sh.batch * sh.heads * sh.seqlen * (sh.seqlen + 1) / 2 * (sh.dim + sh.dv)
    return fwd if mode == "fwd" else 3.5 * fwd


def nsa_bytes(sh: NSAShape, e: int, mode: str) -> float:
    g = GEOMETRY
    tok = sh.batch * sh.seqlen
    sc = sh.batch * (max(0, (sh.seqlen - g["block_size"]) // g["stride"] + 1) if sh.seqlen >= g["block_size"] else 0)
    kv = (tok + sc) * sh.kv_heads * (sh.dim + sh.dv) * e
    if mode == "fwd":
        return tok * sh.heads * (sh.dim + sh.dv + 3) * e + kv
    return tok * sh.heads * (3 * sh.dim + 4 * sh.dv + 6) * e + 3 * kv


def dense_bytes(sh: NSAShape, e: int, mode: str) -> float:
    fwd = sh.batch * sh.seqlen * (sh.heads + sh.kv_heads) * (sh.dim + sh.dv) * e
    return fwd if mode == "fwd" else 3 * fwd


def decode_flops(sh: NSAShape) -> float:
    c, sel, win, _ = decode_counts(sh.seqlen)
    return sh.batch * (2 * sh.heads * (sh.dim + sh.dv) * (c + sel + win) + 2 * sh.heads * sh.dim * c)


def decode_bytes(sh: NSAShape, e: int) -> float:
    """Bytes one NSA decode step reads (and the few it writes), as ``ops.nsa_decode`` documents them."""
    c, sel, win, nb = decode_counts(sh.seqlen)
    kv = sh.kv_heads * (c * (2 * sh.dim + sh.dv) + (sel + win) * (sh.dim + sh.dv)) * e
    return sh.batch * (kv + sh.heads * (sh.dim + 3) * e + 8 * sh.kv_heads * nb)


def dense_decode_flops(sh: NSAShape) -> float:
    return sh.batch * 2 * sh.heads * sh.seqlen * (sh.dim + sh.dv)


def dense_decode_bytes(sh: NSAShape, e: int) -> float:
    return sh.batch * (sh.kv_heads * sh.seqlen * (sh.dim + sh.dv) + sh.heads * sh.dim) * e


# ------------------------------------------------------------------------------------------------------
# Implementations


def _fla() -> tuple[Optional[Callable], str]:
    """fla's parallel_nsa and its version, or None and why."""
    try:
        import fla
        from fla.ops.nsa import parallel_nsa
    except Exception as exc:
        return None, f"absent ({type(exc).__name__})"
    return parallel_nsa, getattr(fla, "__version__", "present")


def peers(ctx: Context) -> dict[str, str]:
    fn, why = _fla()
    if fn is not None and not ctx.is_cuda:
        why = f"{why}, CUDA only"
    return {"fla": why}


def _gpu_reference_why(what: str) -> str:
    return (f"not run on the GPU: the pure-torch {what} builds dense [S, H, S] masks and probabilities per sequence "
            f"(64 GB in fp32 at S = 16k, H = 64)")


@dataclass
class Inputs:
    """One prefill problem: packed [T, *] tensors for r1kernels, [1, H, S, D] copies for SDPA, [1, S, H, D]
    views for fla, gradient leaves of each, and the upstream gradient."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    k_cmp: torch.Tensor
    v_cmp: torch.Tensor
    gates: torch.Tensor
    cu: torch.Tensor
    cu_cmp: torch.Tensor
    do: torch.Tensor


def _inputs(ctx: Context, sh: NSAShape) -> Inputs:
    from r1kernels.reference.sparse import compressed_cu_seqlens

    t = sh.batch * sh.seqlen
    cu = torch.arange(0, t + 1, sh.seqlen, dtype=torch.int32, device=ctx.device)
    cu_cmp = compressed_cu_seqlens(cu, GEOMETRY["block_size"], GEOMETRY["stride"])
    tc = sh.batch * max(0, (sh.seqlen - GEOMETRY["block_size"]) // GEOMETRY["stride"] + 1)
    gates = torch.sigmoid(ctx.randn(t, sh.heads, 3, dtype=torch.float32)).to(ctx.dtype)
    return Inputs(ctx.randn(t, sh.heads, sh.dim), ctx.randn(t, sh.kv_heads, sh.dim), ctx.randn(t, sh.kv_heads, sh.dv),
                  ctx.randn(tc, sh.kv_heads, sh.dim), ctx.randn(tc, sh.kv_heads, sh.dv), gates, cu, cu_cmp,
                  ctx.randn(t, sh.heads, sh.dv))


def _fwd_bwd(f: Callable[..., torch.Tensor], leaves: list[torch.Tensor], do: torch.Tensor) -> Callable[[], Any]:
    def step():
        o = f(*leaves)
        return (o, *torch.autograd.grad(o, leaves, do))

    return step


def prefill_cases(ctx: Context) -> Iterator[Case]:
    for sh in nsa_shapes(ctx.shapes):
        yield from _prefill_shape_cases(ctx, sh)


def _prefill_shape_cases(ctx: Context, sh: NSAShape) -> Iterator[Case]:
    """The NSA, dense and fla cases of one shape, both passes. A function of its own so that the closures
    hold this shape's tensors and free them when the run moves on."""
    from r1kernels.ops import sparse as nsa_ops
    from r1kernels.reference import sparse as ref

    x = _inputs(ctx, sh)
    scale = sh.dim ** -0.5
    es = x.q.element_size()
    nsa_in = [x.q, x.k, x.v, x.k_cmp, x.v_cmp, x.gates]
    nsa_leaves = [a.detach().requires_grad_(True) for a in nsa_in]

    def nsa(backend: Optional[str]) -> Callable[..., torch.Tensor]:
        def f(q, k, v, kc, vc, g):
            if backend is None:  # the pure-torch spec, called directly
                return ref.nsa_attention(q, k, v, kc, vc, g, x.cu, x.cu_cmp, softmax_scale=scale, **GEOMETRY)
            return nsa_ops.nsa_attention(q, k, v, kc, vc, g, x.cu, x.cu_cmp, softmax_scale=scale,
                                         max_seqlen=sh.seqlen, backend=backend, **GEOMETRY)
        return f

    # SDPA's layout: [B, H, S, D] contiguous copies (GQA through enable_gqa), compared as packed views
    b, s = sh.batch, sh.seqlen
    q4, k4, v4, do4 = (a.view(b, s, a.shape[1], a.shape[2]).transpose(1, 2).contiguous() for a in (x.q, x.k, x.v, x.do))
    dense_leaves = [a.detach().requires_grad_(True) for a in (q4, k4, v4)]

    def dense(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)

    fla, fla_why = _fla()
    fla_in = [a.view(b, s, *a.shape[1:]) for a in (x.q, x.k, x.v)]
    fla_gates = [x.gates[..., i].reshape(b, s, sh.heads).contiguous() for i in range(3)]
    fla_leaves = [a.detach().requires_grad_(True) for a in fla_in]

    def fla_nsa(q, k, v):
        # fla's own NSA of the same size: l = d = l' = 64, n = 16 (block_counts), no window (needs flash-attn)
        return fla(q, k, v, *fla_gates, block_counts=GEOMETRY["num_selected"], block_size=64, window_size=0)

    for mode in ("fwd", "fwd+bwd"):
        def run(f, mode=mode):
            return (lambda: f(*nsa_in)) if mode == "fwd" else _fwd_bwd(f, nsa_leaves, x.do)

        impls = [Impl("torch nsa (reference)", "torch", why_not=_gpu_reference_why("reference"))
                 if ctx.is_cuda else Impl("torch nsa (reference)", "torch", run(nsa(None)))]
        if ctx.is_cuda:
            impls.append(Impl("triton", "r1kernels", run(nsa("triton"))))
            impls.append(Impl("reference", "r1kernels", why_not=_gpu_reference_why("reference backend")))
        else:
            impls.append(Impl("triton", "r1kernels", why_not="Triton runs on the CPU only under its interpreter, "
                                                                "whose times say nothing about the kernel"))
            impls.append(Impl("reference", "r1kernels", run(nsa("reference"))))
        yield Case(family=FAMILY, op="nsa_attention", label=f"nsa {sh.label}", shape=sh.shape, mode=mode,
                   dtype=ctx.dtype, flops=nsa_flops(sh, mode), nbytes=nsa_bytes(sh, es, mode), impls=impls)

        if mode == "fwd":
            dense_fn = lambda: dense(q4, k4, v4)  # noqa: E731
        else:
            def dense_fn():
                o = dense(*dense_leaves)
                return (o, *torch.autograd.grad(o, dense_leaves, do4))
        yield Case(family=FAMILY, op="dense_attention", label=f"dense {sh.label}", shape=sh.shape, mode=mode,
                   dtype=ctx.dtype, flops=dense_flops(sh, mode), nbytes=dense_bytes(sh, es, mode),
                   impls=[Impl(DENSE, "torch", dense_fn)])

        if fla is not None and ctx.is_cuda:
            if mode == "fwd":
                fla_impl = Impl(PEER, "peer", lambda: fla_nsa(*fla_in))
            else:
                do3 = x.do.view(b, s, sh.heads, sh.dv)

                def fla_step():
                    o = fla_nsa(*fla_leaves)
                    return (o, *torch.autograd.grad(o, fla_leaves, do3))
                fla_impl = Impl(PEER, "peer", fla_step)
        else:
            fla_impl = Impl(PEER, "peer", why_not=fla_why if fla is None else "CUDA only")
        yield Case(family=FAMILY, op="fla_nsa", label=f"fla nsa {sh.label}", shape=sh.shape, mode=mode,
                   dtype=ctx.dtype, flops=0.0, nbytes=0.0, impls=[fla_impl])


def decode_cases(ctx: Context) -> Iterator[Case]:
    for sh in decode_shapes(ctx.shapes):
        yield from _decode_shape_cases(ctx, sh)


def _decode_shape_cases(ctx: Context, sh: NSAShape) -> Iterator[Case]:
    from r1kernels.ops import sparse as nsa_ops
    from r1kernels.reference import sparse as ref

    g = GEOMETRY
    b, s = sh.batch, sh.seqlen
    cmax = max(1, (s - g["block_size"]) // g["stride"] + 1)
    q = ctx.randn(b, sh.heads, sh.dim)
    caches = (ctx.randn(b, s, sh.kv_heads, sh.dim), ctx.randn(b, s, sh.kv_heads, sh.dv),
              ctx.randn(b, cmax, sh.kv_heads, sh.dim), ctx.randn(b, cmax, sh.kv_heads, sh.dv))
    seqlens = torch.full((b,), s, dtype=torch.int32, device=ctx.device)
    cmp_lens = torch.full((b,), cmax if s >= g["block_size"] else 0, dtype=torch.int32, device=ctx.device)
    gates = torch.sigmoid(ctx.randn(b, sh.heads, 3, dtype=torch.float32)).to(ctx.dtype)
    scale = sh.dim ** -0.5
    args = (q, *caches, seqlens, cmp_lens, gates)

    impls = [Impl("torch nsa decode (reference)", "torch", why_not=_gpu_reference_why("reference"))
             if ctx.is_cuda else
             Impl("torch nsa decode (reference)", "torch", lambda: ref.nsa_decode(*args, softmax_scale=scale, **g))]
    for backend in ("triton", "reference"):
        if (backend == "triton") != ctx.is_cuda:
            why = ("Triton runs on the CPU only under its interpreter" if backend == "triton"
                   else "not timed on the GPU: a Python loop over the sequences with a host sync")
            impls.append(Impl(backend, "r1kernels", why_not=why))
        else:
            impls.append(Impl(backend, "r1kernels", lambda backend=backend: nsa_ops.nsa_decode(
                *args, softmax_scale=scale, backend=backend, **g)))
    es = q.element_size()
    yield Case(family=FAMILY, op="nsa_decode", label=f"nsa decode {sh.label}", shape=sh.shape, mode="fwd",
               dtype=ctx.dtype, flops=decode_flops(sh), nbytes=decode_bytes(sh, es), impls=impls)

    # dense decode: the new token over the whole cache, [B, Hk, S, D] contiguous copies made outside the timing
    k4, v4 = (c.transpose(1, 2).contiguous() for c in caches[:2])
    q4 = q[:, :, None, :]

    def dense_decode():
        return F.scaled_dot_product_attention(q4, k4, v4, scale=scale, enable_gqa=True)[:, :, 0]

    yield Case(family=FAMILY, op="dense_decode", label=f"dense decode {sh.label}", shape=sh.shape, mode="fwd",
               dtype=ctx.dtype, flops=dense_decode_flops(sh), nbytes=dense_decode_bytes(sh, es),
               impls=[Impl(DENSE, "torch", dense_decode)])


def cases(ctx: Context) -> Iterator[Case]:
    yield from prefill_cases(ctx)
    yield from decode_cases(ctx)


def link_speedups(rows: list[Row]) -> None:
    """Set ``× torch`` of every NSA and fla row to the dense SDPA time of the same shape and pass over its own,
    and ``× peer`` of the NSA rows to fla's (the cases are separate because their outputs differ)."""

    def key(r: Row) -> tuple[str, str, bool]:  # prefill and decode shapes can print alike (the smoke set)
        return r.shape, r.mode, "decode" in r.op

    dense = {key(r): r for r in rows if r.impl == DENSE and r.ms}
    fla = {key(r): r for r in rows if r.impl == PEER and r.ms}
    for r in rows:
        if r.ms is None or r.impl == DENSE:
            continue
        d = dense.get(key(r))
        if d is not None:
            r.vs_torch, r.torch_ref = d.ms / r.ms, DENSE
        p = fla.get(key(r))
        if p is not None and r.impl != PEER:
            r.vs_peer, r.peer_ref = p.ms / r.ms, PEER


def run(ctx: Context, ceilings: dict[str, Any], log: Callable[[str], None] = print) -> list[Row]:
    rows = run_cases(ctx, cases(ctx), ceilings, log)
    link_speedups(rows)
    for r in rows:
        if r.vs_torch is not None and r.impl != DENSE and r.kind != "torch":
            log(f"{FAMILY:<6} {r.case:<22} {r.mode:<8} {r.impl:<18} x{r.vs_torch:.2f} vs dense SDPA"
                + (f", x{r.vs_peer:.2f} vs fla" if r.vs_peer is not None else ""))
    return rows
