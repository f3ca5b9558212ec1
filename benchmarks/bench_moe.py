"""MoE at DeepSeek shapes: the routing gate (``r1kernels.ops.moe_route``) and the routed-expert layer
(``r1kernels.ops.moe_experts``).

Shapes: :func:`benchmarks.shapes.moe_gate_shapes` (V3's router, E=256, groups 8/4, top-8, at T = 1, 128,
4096, 16384) and :func:`benchmarks.shapes.moe_layer_shapes` (GPU: V3, D=7168 I=2048 E=256 top-8, and
V2-Lite, D=2048 I=1408 E=64 top-6, at T = 128 and 4096; CPU: the tiny preset's experts and V2-Lite's
widths with 8 experts). Passes: the gate ``fwd`` (it has no gradient); the layer ``fwd`` and ``fwd+bwd``
(the output, then the gradients of x, W13, W2 and the routing weights for a random upstream gradient).

Formulas. Gate, with T tokens, E experts, K chosen:

* FLOP: none counted (per logit a sigmoid and a few comparisons: the gate is bound by latency and bytes).
* bytes: read the fp32 logits and bias, write the fp32 weights and int32 ids = 4 T E + 4 E + 8 T K.

Layer, with S = T K routing slots, D the hidden size, I an expert's width, s the bytes per element of x and
the weights, n the touched experts (those at least one slot chose) and W = 3 I D s one expert's weights:

* FLOP, fwd: 6 S I D (the gate/up GEMM 2 S (2I) D and the down GEMM 2 S I D; SiLU, the product and the
  weighting left out).
* FLOP, fwd+bwd: 18 S I D (every GEMM once forward and twice backward: its input and its weight gradient).
* bytes, fwd: the touched experts' weights, x read, y written, the routing weights and ids read
  = n W + 2 T D s + 8 T K (the [S, 2I] intermediate is left out: a fused kernel keeps it on chip).
* bytes, fwd+bwd: the touched weights read forward and again backward, the weight gradients written (dense
  tensors: all E experts), x, y, dy, dx, the routing weights and ids, their gradient
  = 2 n W + E W + 4 T D s + 12 T K.
* floor (``floor ms``): the weight bytes of those formulas (fwd: n W; fwd+bwd: 2 n W + E W) at this run's
  copy ceiling: no implementation can be faster than reading them once. DESIGN's anchor: V3 at T=4096
  touches all 256 experts, 22.5 GB in bf16, 5.3 ms at the H200's 4,225 GB/s.

Compared: the torch baselines of ``shared/baselines/torch_baselines.py``: "torch formula" (the routing as
plain torch ops on the logits; on the GPU also "torch formula + linear", the baseline script's function
with the router's fp32 linear, what its 0.61 ms anchor at T=4096 measured), "torch loop" (the loop over
experts that HF-style code runs, with a host sync per expert) and "torch _grouped_mm" (sort the slots,
``torch._grouped_mm`` per run; bf16 only on CUDA, rows 16-byte aligned); every r1kernels backend (triton,
cuda, cpu, reference), unavailable ones recorded with the reason.

GPU time (H200, estimated from the baseline figures; do_bench runs a slow call 5 times to estimate it, then
at least one warm-up and one timed call): the V3 layer rows take about 9 calls of the 42 ms loop and 15 of
the 13 ms grouped GEMM forward, about 7 calls of a ~150 ms loop forward+backward; the whole family about
15 s plus the weights' allocation (22.5 GB for V3) and the Triton compilations. The V3 forward+backward
holds the weights, two sets of gradients (the first baseline's, kept to compare, and the running one's)
and, in the loop baseline, its per-expert gradients before they are stacked: about 90 GB at peak.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from .harness import Case, Context, Impl, Row, run_cases
from .shapes import MoEDims, moe_gate_shapes, moe_layer_shapes

FAMILY = "moe"
DEVICES = ("cuda", "cpu")
BACKENDS = ("triton", "cuda", "cpu", "reference")
WEIGHT_SCALE = 0.02  # the baseline script's initialisation of the expert and router weights


def gate_bytes(tokens: int, experts: int, top_k: int) -> float:
    return 4 * tokens * experts + 4 * experts + 8 * tokens * top_k


def layer_flops(tokens: int, dims: MoEDims, mode: str) -> float:
    fwd = 6 * tokens * dims.top_k * dims.inter * dims.hidden
    return fwd if mode == "fwd" else 3 * fwd


def layer_weight_bytes(touched: int, dims: MoEDims, elem_bytes: int, mode: str) -> float:
    """The weight bytes a pass must move: the floor's numerator."""
    if mode == "fwd":
        return dims.weight_bytes(touched, elem_bytes)
    return 2 * dims.weight_bytes(touched, elem_bytes) + dims.weight_bytes(dims.experts, elem_bytes)


def layer_bytes(tokens: int, touched: int, dims: MoEDims, elem_bytes: int, mode: str) -> float:
    td, tk = tokens * dims.hidden * elem_bytes, tokens * dims.top_k
    if mode == "fwd":
        return layer_weight_bytes(touched, dims, elem_bytes, mode) + 2 * td + 8 * tk
    return layer_weight_bytes(touched, dims, elem_bytes, mode) + 4 * td + 12 * tk


# ------------------------------------------------------------------------------------------------------
# The torch baselines (shared/baselines/torch_baselines.py, with the dims as arguments)


def torch_route(logits: torch.Tensor, bias: Optional[torch.Tensor], d: MoEDims) -> tuple[torch.Tensor, torch.Tensor]:
    """The baseline script's ``route`` after the router's linear: sigmoid scores, biased selection, groups
    scored by their top-2 sum, the dropped groups masked with -inf, top-K, renormalised and scaled (V3)."""
    g, tg, e, k = d.n_group, d.topk_group, d.experts, d.top_k
    s = torch.sigmoid(logits)
    sb = s + bias if bias is not None else s
    gs = sb.view(-1, g, e // g).topk(2, dim=-1)[0].sum(-1)
    gi = gs.topk(tg, dim=-1)[1]
    mask = torch.ones(logits.shape[0], g, dtype=torch.bool, device=logits.device).scatter_(1, gi, False)
    sb = sb.view(-1, g, e // g).masked_fill(mask[..., None], float("-inf")).flatten(1)
    idx = sb.topk(k, dim=-1)[1]
    w = s.gather(1, idx)
    w = w / w.sum(-1, keepdim=True) * d.routed_scaling_factor
    return w, idx


def torch_loop(x, w13, w2, w, idx):
    """The baseline script's ``loop_experts`` (what HF-style and DeepSeek's reference code do). The
    per-expert weights come from ``unbind``, like the separate ``nn.Linear`` weights of such code: the
    backward then builds each expert's gradient and stacks them once, where indexing ``w13[e]`` would
    materialise a zero gradient of all of W13 per expert (256 x 15 GB at V3)."""
    e_total = w13.shape[0]
    w13s, w2s = w13.unbind(0), w2.unbind(0)
    y = torch.zeros_like(x)
    counts = torch.bincount(idx.flatten(), minlength=e_total).tolist()
    for e in range(e_total):
        if counts[e] == 0:
            continue
        t, k = torch.where(idx == e)
        h = x[t] @ w13s[e].t()
        g, u = h.chunk(2, -1)
        y.index_add_(0, t, ((F.silu(g) * u) @ w2s[e].t()) * w[t, k, None].to(x.dtype))
    return y


def torch_grouped(x, w13, w2, w, idx):
    """The baseline script's ``grouped``: slots sorted by expert, ``torch._grouped_mm`` with cumulative
    offsets, weighted, scattered back with index_add."""
    k = idx.shape[1]
    order = idx.flatten().argsort(stable=True)
    tok = order // k
    counts = torch.bincount(idx.flatten(), minlength=w13.shape[0])
    offs = counts.cumsum(0).to(torch.int32)
    xs = x[tok]
    h = torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs)
    g, u = h.chunk(2, -1)
    o = torch._grouped_mm(F.silu(g) * u, w2.transpose(1, 2), offs=offs)
    o = o * w.flatten()[order, None].to(o.dtype)
    return torch.zeros_like(x).index_add_(0, tok, o)


def grouped_mm_why_not(device: torch.device, dtype: torch.dtype, dims: MoEDims) -> Optional[str]:
    """Why the ``torch._grouped_mm`` baseline cannot run here (None when it can)."""
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    if device.type == "cuda" and dtype != torch.bfloat16:
        return f"torch._grouped_mm takes bfloat16 on CUDA, the run is {str(dtype).replace('torch.', '')}"
    if device.type == "cpu" and dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"torch._grouped_mm on CPU takes float32 / bfloat16 / float16, not {dtype}"
    align = 16 // torch.empty(0, dtype=dtype).element_size()
    if dims.hidden % align or dims.inter % align:
        return f"torch._grouped_mm needs rows of 16 bytes: D={dims.hidden}, I={dims.inter} are not multiples of {align}"
    return None


# ------------------------------------------------------------------------------------------------------
# Cases


def peers(ctx: Context) -> dict[str, str]:
    # vLLM's fused_moe and DeepGEMM (DESIGN's peers) are not installed on either machine.
    return {}


def _backend_impls(ctx: Context, call: Callable[[str], Callable[[], Any]],
                   gpu_reference_why: Optional[str] = None) -> list[Impl]:
    """One Impl per r1kernels backend; ``call(b)`` is the timed closure for backend b. A backend that cannot
    run raises BackendUnavailable from inside the closure and the harness records why."""
    impls = []
    for b in BACKENDS:
        if b == "triton" and not ctx.is_cuda:
            impls.append(Impl(b, "r1kernels", why_not="Triton runs on the CPU only under its interpreter, whose "
                                                        "times say nothing about the kernel"))
        elif b == "reference" and ctx.is_cuda and gpu_reference_why:
            impls.append(Impl(b, "r1kernels", why_not=gpu_reference_why))
        else:
            impls.append(Impl(b, "r1kernels", call(b)))
    return impls


def tied_rows(logits: torch.Tensor, bias: torch.Tensor, d: MoEDims) -> torch.Tensor:
    """``[T]`` bool: the rows where two biased scores, or two groups' top-2 sums, are exactly equal.

    The r1kernels backends break ties towards the lower expert index and the baseline's ``topk`` breaks
    them as it likes, so on such a row the two may list the same experts in another order (or pick another
    of two equal experts): a difference in the tie rule, which the tests check, not a wrong result. In fp32,
    16384 x 256 random scores hold a few such rows; the gate cases draw their rows again until none is left.
    """
    sb = torch.sigmoid(logits) + bias
    srt = sb.sort(-1).values
    tied = (srt[:, 1:] == srt[:, :-1]).any(-1)
    if d.n_group > 1:
        gs = sb.view(-1, d.n_group, d.experts // d.n_group).topk(2, dim=-1)[0].sum(-1).sort(-1).values
        tied |= (gs[:, 1:] == gs[:, :-1]).any(-1)
    return tied


def gate_cases(ctx: Context) -> Iterator[Case]:
    import r1kernels

    for sh in moe_gate_shapes(ctx.shapes):
        d = sh.dims
        bias = ctx.randn(d.experts, dtype=torch.float32, scale=0.01)
        x = gate_w = None
        if ctx.is_cuda:
            # the router's input and fp32 weight, as the baseline script draws them
            x = ctx.randn(sh.tokens, d.hidden)
            gate_w = ctx.randn(d.experts, d.hidden, scale=WEIGHT_SCALE)
            logits = F.linear(x.float(), gate_w.float())
        else:
            # the same scale without the [T, 7168] input (0.02 * sqrt(7168) = 1.7): the CPU rows time the gate
            logits = ctx.randn(sh.tokens, d.experts, dtype=torch.float32, scale=WEIGHT_SCALE * d.hidden ** 0.5)
        for _ in range(20):  # ~2e-3 of 16384 random rows tie (measured): one redraw clears them nearly always
            tied = tied_rows(logits, bias, d).nonzero().flatten()
            if tied.numel() == 0:
                break
            if ctx.is_cuda:
                # new input rows, then the logits of all rows again: the linear of a few rows may round
                # differently from the same rows inside the full GEMM that the "+ linear" row runs
                x[tied] = ctx.randn(tied.numel(), d.hidden)
                logits = F.linear(x.float(), gate_w.float())
            else:
                logits[tied] = ctx.randn(tied.numel(), d.experts, dtype=torch.float32,
                                         scale=WEIGHT_SCALE * d.hidden ** 0.5)
        else:
            raise RuntimeError(f"moe gate {sh.label}: rows with tied scores keep coming back")

        def call(b: str, logits=logits, bias=bias, d=d) -> Callable[[], Any]:
            return lambda: r1kernels.ops.moe_route(
                logits, bias, top_k=d.top_k, n_group=d.n_group, topk_group=d.topk_group, score_func=d.score_func,
                group_score=d.group_score, norm_topk_prob=d.norm_topk_prob,
                routed_scaling_factor=d.routed_scaling_factor, backend=b)

        impls = [Impl("torch formula", "torch", lambda logits=logits, bias=bias, d=d: torch_route(logits, bias, d))]
        if ctx.is_cuda:
            def with_linear(x=x, gw=gate_w, bias=bias, d=d):
                return torch_route(F.linear(x.float(), gw.float()), bias, d)

            impls.append(Impl("torch formula + linear", "torch", with_linear))
        impls += _backend_impls(ctx, call)
        yield Case(family=FAMILY, op="moe_route", label=sh.label, shape=sh.shape, mode="fwd", dtype=torch.float32,
                   flops=0.0, nbytes=gate_bytes(sh.tokens, d.experts, d.top_k), impls=impls)
        del x, gate_w, logits, bias, impls


def _fill_weights(ctx: Context, shape: tuple[int, ...], scale: float) -> torch.Tensor:
    """A random [E, ...] weight in the run's dtype, drawn a few experts at a time (ctx.randn draws fp32
    first: 30 GB at once for V3's W13)."""
    out = torch.empty(shape, dtype=ctx.dtype, device=ctx.device)
    chunk = max(1, (1 << 28) // max(1, out[0].numel()))  # ~1 GiB of fp32 per draw
    for s in range(0, shape[0], chunk):
        n = min(chunk, shape[0] - s)
        out[s:s + n] = ctx.randn(n, *shape[1:], scale=scale)
    return out


# The reference backend is not timed on the GPU: its forward is the loop over experts that the "torch loop"
# baseline times, and its backward indexes w13[e] per expert (a full-size zero gradient per expert).
_GPU_REFERENCE_WHY = ("not timed on the GPU: it runs the loop that 'torch loop' times, and its backward builds a "
                      "full-size weight gradient per expert (256 x 22.5 GB at V3)")


def _runners(x, w13, w2, weights, ids, dy):
    """``(fwd, fwd_bwd)``: each turns ``f(x, w13, w2, weights, ids)`` into a case's timed closure (forward;
    forward then the gradients of x, w13, w2 and weights for ``dy``). A function of its own so that every
    case's closures hold that case's tensors (the pytest entry builds all cases before running any)."""
    leaves = [t.detach().requires_grad_(True) for t in (x, w13, w2, weights)]

    def fwd(f):
        return lambda: f(x, w13, w2, weights, ids)

    def fwd_bwd(f):
        def step():
            y = f(*leaves, ids)
            return (y, *torch.autograd.grad(y, leaves, dy))

        return step

    return fwd, fwd_bwd


def layer_cases(ctx: Context) -> Iterator[Case]:
    import r1kernels

    weights_of: dict[MoEDims, tuple[torch.Tensor, torch.Tensor]] = {}
    for sh in moe_layer_shapes(ctx.shapes):
        d = sh.dims
        if d not in weights_of:  # the cases of one model share its weights (V3: 22.5 GB in bf16)
            weights_of.clear()
            if ctx.is_cuda:
                torch.cuda.empty_cache()
            weights_of[d] = (_fill_weights(ctx, (d.experts, 2 * d.inter, d.hidden), WEIGHT_SCALE),
                             _fill_weights(ctx, (d.experts, d.hidden, d.inter), WEIGHT_SCALE))
        w13, w2 = weights_of[d]
        x = ctx.randn(sh.tokens, d.hidden)
        logits = ctx.randn(sh.tokens, d.experts, dtype=torch.float32)
        bias = ctx.randn(d.experts, dtype=torch.float32, scale=0.01) if d.score_func == "sigmoid" else None
        weights, ids = r1kernels.reference.moe_route(
            logits, bias, top_k=d.top_k, n_group=d.n_group, topk_group=d.topk_group, score_func=d.score_func,
            group_score=d.group_score, norm_topk_prob=d.norm_topk_prob, routed_scaling_factor=d.routed_scaling_factor)
        touched = int(torch.unique(ids).numel())
        fwd, fwd_bwd = _runners(x, w13, w2, weights, ids, ctx.randn(sh.tokens, d.hidden))
        grouped_why = grouped_mm_why_not(ctx.device, ctx.dtype, d)
        es = x.element_size()
        for mode, run in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
            def call(b: str, run=run) -> Callable[[], Any]:
                return run(lambda *a, b=b: r1kernels.ops.moe_experts(*a, backend=b))

            impls = [
                Impl("torch loop", "torch", run(torch_loop)),
                Impl("torch _grouped_mm", "torch", why_not=grouped_why) if grouped_why
                else Impl("torch _grouped_mm", "torch", run(torch_grouped)),
            ]
            impls += _backend_impls(ctx, call, _GPU_REFERENCE_WHY)
            yield Case(
                family=FAMILY, op="moe_experts", label=sh.label, shape=f"{sh.shape}, {touched} touched", mode=mode,
                dtype=ctx.dtype, flops=layer_flops(sh.tokens, d, mode),
                nbytes=layer_bytes(sh.tokens, touched, d, es, mode),
                floor_bytes=layer_weight_bytes(touched, d, es, mode), impls=impls,
            )
    weights_of.clear()


def cases(ctx: Context) -> Iterator[Case]:
    yield from gate_cases(ctx)
    yield from layer_cases(ctx)


def speedup_lines(rows: list[Row], fast: str = "cpu", slow: str = "reference") -> list[str]:
    """Per layer case, the ``fast`` backend's speedup over the ``slow`` one (the CPU goal: the cpu backend
    over the loop-over-experts reference on the tiny preset's layer)."""
    out = []
    by_case: dict[tuple[str, str], dict[str, Row]] = {}
    for r in rows:
        if r.op == "moe_experts" and r.ms is not None and r.status == "ok":
            by_case.setdefault((r.case, r.mode), {})[r.impl] = r
    for (case, mode), impls in by_case.items():
        if fast in impls and slow in impls:
            out.append(f"moe    {case} {mode}: {fast} {impls[fast].ms:.4f} ms, {slow} {impls[slow].ms:.4f} ms: "
                       f"x{impls[slow].ms / impls[fast].ms:.2f}")
    return out


def run(ctx: Context, ceilings: dict[str, Any], log: Callable[[str], None] = print) -> list[Row]:
    rows = run_cases(ctx, cases(ctx), ceilings, log)
    for line in speedup_lines(rows):
        log(line)
    return rows
