"""Training losses (``r1kernels.ops.loss``): fused linear cross entropy against the unfused torch head, with
time and peak extra memory; on the GPU also the fused log-probabilities, the distillation loss and GRPO.

Shapes (DeepSeek-V3's head, :data:`benchmarks.shapes.V3`): GPU (``v3``) 8192 tokens x 7168 x V = 129,280 in
bf16 (DESIGN's anchor: torch 75.8 ms and 15.78 GiB extra, Liger 78.2 ms and 1.96 GiB); CPU (``cpu``) 1024
tokens x 256 x 32,000 in fp32, where the memory ratio is measured; ``smoke`` 64 x 64 x 1000. GRPO: 64
sequences of 4096 positions on the GPU. Every case is ``fwd+bwd``: the loss, then the gradients of hidden and
weight (GRPO: of the log-probabilities) through ``torch.autograd.grad``.

Formulas, with T tokens, D hidden, V vocabulary, e bytes per element of hidden and weight:

* FLOP (cross entropy, log-probabilities, distillation): 6 T V D, the logits matmul and the two gradient
  matmuls (softmax work left out; the fused log-probabilities' backward recomputes the logits, 2 T V D more,
  counted as overhead, not work).
* bytes: read hidden and the weight, write their gradients, read the labels = 2 (T D + V D) e + 8 T
  (distillation: plus the teacher's logits, T V e_t). GRPO (B S positions, fp32 inputs, bool mask): read
  logprobs, old, ref, mask, write the gradient = 17 B S (+ 4 B advantages); FLOP: about 20 per position.

Peak extra memory: the most memory the fwd+bwd step held at once beyond what was allocated before it,
outputs (loss, gradients) included. CUDA: ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats``, minus ``memory_allocated`` before. CPU: the allocator's allocation and free
events recorded by ``torch.profiler`` (``profile_memory=True``), summed in time order; the peak of the running
sum (:func:`peak_extra_bytes`). The figure goes into each row's ``note`` (``peak extra ... GiB``, and the ratio
to the first torch baseline's), printed with the row.

Compared: "torch linear+CE" (``F.cross_entropy(F.linear(h, W).float(), y)``, what a model's head does);
the r1kernels backends of the device that the op has (GPU: triton, plus "triton 64 MiB chunks", the same
with half the chunk budget, 256 V3 rows instead of 512: the memory / time trade-off of the budget; CPU: cpu,
the chunked torch path, and reference, the unfused spec); Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss``
on CUDA when ``liger_kernel`` imports.

GPU time (H200, from DESIGN's anchors): a cross-entropy call is about 75 ms, do_bench runs each
implementation about 10 times, plus one call each for the memory: the family takes about 20 s plus the
Triton compilations; the torch baseline's 15.8 GiB is the peak.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from .harness import Case, Context, Impl, Row, r1kernels_backends, run_case
from .shapes import TOKENS_PREFILL, TOKENS_PREFILL_LONG, V3

FAMILY = "loss"
DEVICES = ("cuda", "cpu")
GIB = float(1 << 30)


@dataclass(frozen=True)
class HeadShape:
    """One output-head loss call: ``tokens`` rows of width ``hidden`` against a ``vocab``-row weight."""

    tokens: int
    hidden: int
    vocab: int

    @property
    def label(self) -> str:
        return f"T={self.tokens}"

    @property
    def shape(self) -> str:
        return f"[{self.tokens}, {self.hidden}] x [{self.vocab}, {self.hidden}]"


def ce_shape(set_name: str) -> HeadShape:
    """The cross-entropy shape of a shape set (see the module docstring)."""
    if set_name == "smoke":
        return HeadShape(64, 64, 1000)
    if set_name == "cpu":
        return HeadShape(1024, 256, 32000)
    return HeadShape(TOKENS_PREFILL_LONG, V3.hidden, V3.vocab)


def head_flops(tokens: int, hidden: int, vocab: int) -> float:
    return 6.0 * tokens * vocab * hidden


def head_bytes(tokens: int, hidden: int, vocab: int, elem: int, teacher_elem: int = 0) -> float:
    return 2.0 * (tokens * hidden + vocab * hidden) * elem + 8.0 * tokens + float(tokens) * vocab * teacher_elem


def grpo_bytes(b: int, s: int) -> float:
    return 17.0 * b * s + 4.0 * b


# ------------------------------------------------------------------------------------------------------
# Peak extra memory


def _cpu_peak_extra(fn: Callable[[], Any]) -> Optional[int]:
    """Peak of the running sum of the CPU allocator's events while ``fn`` runs (None if the profiler's
    event tree is not readable in this torch)."""
    try:
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile
    except Exception:
        return None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out  # the outputs' frees are not counted against the peak (they are in it already)
    try:
        tree = prof.profiler.kineto_results.experimental_event_tree()
    except Exception:
        return None
    events: list[tuple[int, int]] = []
    stack = list(tree)
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and str(node.extra_fields.device).startswith("cpu"):
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    running = peak = 0
    for _, size in sorted(events):
        running += size
        peak = max(peak, running)
    return peak


def peak_extra_bytes(fn: Callable[[], Any], device: torch.device) -> Optional[int]:
    """Bytes ``fn()`` holds at its peak beyond what was allocated before it (outputs included)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return int(peak)
    return _cpu_peak_extra(fn)


# ------------------------------------------------------------------------------------------------------
# Implementations


def torch_linear_ce(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The unfused head: bf16 (or fp32) logits, upcast to fp32, cross entropy (what a model's head runs)."""
    return F.cross_entropy(F.linear(h, w).float(), y)


def torch_linear_logprobs(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, temperature: float) -> torch.Tensor:
    logp = torch.log_softmax(F.linear(h, w).float() / temperature, dim=-1)
    return logp.gather(1, y[:, None]).squeeze(1)


def torch_linear_kd(h: torch.Tensor, w: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    ls = torch.log_softmax(F.linear(h, w).float() / temperature, dim=-1)
    lt = torch.log_softmax(teacher.float() / temperature, dim=-1)
    return F.kl_div(ls, lt, log_target=True, reduction="sum") / h.shape[0]


def _liger_ce() -> tuple[Optional[Callable], str]:
    try:
        import liger_kernel
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception as exc:
        return None, f"absent ({type(exc).__name__})"
    loss_mod = LigerFusedLinearCrossEntropyLoss()

    def fn(h, w, y):
        out = loss_mod(w, h, y)  # (lin_weight, input, target)
        return out[0] if isinstance(out, (tuple, list)) else getattr(out, "loss", out)

    return fn, getattr(liger_kernel, "__version__", "present")


def peers(ctx: Context) -> dict[str, str]:
    fn, why = _liger_ce()
    if fn is not None and not ctx.is_cuda:
        why = f"{why}, CUDA only"
    return {"liger_kernel": why}


def _grad_step(f: Callable[..., torch.Tensor], leaves: tuple[torch.Tensor, ...], *rest: Any,
               upstream: Optional[torch.Tensor] = None) -> Callable[[], Any]:
    """The timed fwd+bwd closure: ``f(*leaves, *rest)``, then its gradients with respect to the leaves."""

    def step():
        out = f(*leaves, *rest)
        grads = torch.autograd.grad(out, leaves, upstream)
        return (out.detach(),) + tuple(grads)

    return step


def _backends(ctx: Context, op_name: str) -> tuple[str, ...]:
    """The device's r1kernels backends that the op has (none of these ops has a ``cuda`` backend)."""
    from r1kernels.ops import loss as ops_loss

    op = {o.name: o for o in (ops_loss.FUSED_LINEAR_CROSS_ENTROPY, ops_loss.FUSED_LINEAR_LOGPROBS,
                              ops_loss.GRPO_LOSS, ops_loss.FUSED_LINEAR_KD_LOSS)}[op_name]
    return tuple(b for b in r1kernels_backends(ctx) if b in op.impls)


def _with_chunk_cap(cap: int, fn: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
    """``fn(*args, **kwargs)`` with ``r1kernels.ops.loss.LOGITS_CHUNK_MAX_BYTES`` set to ``cap`` for the call
    (the chunk size is read when the forward runs; the gradients are computed there too)."""
    from r1kernels.ops import loss as ops_loss

    saved = ops_loss.LOGITS_CHUNK_MAX_BYTES
    ops_loss.LOGITS_CHUNK_MAX_BYTES = cap
    try:
        return fn(*args, **kwargs)
    finally:
        ops_loss.LOGITS_CHUNK_MAX_BYTES = saved


def _ce_case(ctx: Context, sh: HeadShape) -> Case:
    from r1kernels.ops import loss as ops_loss

    h = ctx.randn(sh.tokens, sh.hidden).requires_grad_(True)
    w = ctx.randn(sh.vocab, sh.hidden, scale=sh.hidden ** -0.5).requires_grad_(True)
    y = torch.randint(0, sh.vocab, (sh.tokens,), generator=ctx._gen, device=ctx.device)
    impls = [Impl("torch linear+CE", "torch", _grad_step(torch_linear_ce, (h, w), y))]
    for b in _backends(ctx, "fused_linear_cross_entropy"):
        impls.append(Impl(b, "r1kernels", _grad_step(
            lambda hh, ww, yy, b=b: ops_loss.fused_linear_cross_entropy(hh, ww, yy, backend=b), (h, w), y)))
    if ctx.is_cuda:
        # The chunk budget's trade-off (r1kernels.ops.loss): half the default cap, 256 V3 rows instead of 512,
        # takes 66 MB less memory and runs twice as many smaller gradient matmuls.
        half = ops_loss.LOGITS_CHUNK_MAX_BYTES // 2
        impls.append(Impl(f"triton {half >> 20} MiB chunks", "r1kernels", _grad_step(
            lambda hh, ww, yy: _with_chunk_cap(half, ops_loss.fused_linear_cross_entropy, hh, ww, yy, backend="triton"),
            (h, w), y)))
    liger, why = _liger_ce()
    if ctx.is_cuda:  # a Triton library: CUDA only
        impls.append(Impl("liger", "peer", _grad_step(liger, (h, w), y)) if liger is not None
                     else Impl("liger", "peer", why_not=f"liger_kernel {why}"))
    return Case(FAMILY, "fused_linear_cross_entropy", sh.label, sh.shape, "fwd+bwd", ctx.dtype,
                head_flops(sh.tokens, sh.hidden, sh.vocab), head_bytes(sh.tokens, sh.hidden, sh.vocab, h.element_size()),
                impls)


def _logprobs_case(ctx: Context, sh: HeadShape) -> Case:
    from r1kernels.ops import loss as ops_loss

    temp = 0.7
    h = ctx.randn(sh.tokens, sh.hidden).requires_grad_(True)
    w = ctx.randn(sh.vocab, sh.hidden, scale=sh.hidden ** -0.5).requires_grad_(True)
    y = torch.randint(0, sh.vocab, (sh.tokens,), generator=ctx._gen, device=ctx.device)
    g = ctx.randn(sh.tokens, dtype=torch.float32)
    impls = [Impl("torch linear+log_softmax", "torch", _grad_step(torch_linear_logprobs, (h, w), y, temp, upstream=g))]
    for b in _backends(ctx, "fused_linear_logprobs"):
        impls.append(Impl(b, "r1kernels", _grad_step(
            lambda hh, ww, yy, t, b=b: ops_loss.fused_linear_logprobs(hh, ww, yy, t, backend=b),
            (h, w), y, temp, upstream=g)))
    return Case(FAMILY, "fused_linear_logprobs", sh.label, sh.shape, "fwd+bwd", ctx.dtype,
                head_flops(sh.tokens, sh.hidden, sh.vocab), head_bytes(sh.tokens, sh.hidden, sh.vocab, h.element_size()),
                impls)


def _kd_case(ctx: Context, sh: HeadShape) -> Case:
    from r1kernels.ops import loss as ops_loss

    temp = 2.0
    h = ctx.randn(sh.tokens, sh.hidden).requires_grad_(True)
    w = ctx.randn(sh.vocab, sh.hidden, scale=sh.hidden ** -0.5).requires_grad_(True)
    teacher = ctx.randn(sh.tokens, sh.vocab, scale=2.0)
    impls = [Impl("torch linear+kl_div", "torch", _grad_step(torch_linear_kd, (h, w), teacher, temp))]
    for b in _backends(ctx, "fused_linear_kd_loss"):
        impls.append(Impl(b, "r1kernels", _grad_step(
            lambda hh, ww, tt, t, b=b: ops_loss.fused_linear_kd_loss(hh, ww, tt, temperature=t, backend=b),
            (h, w), teacher, temp)))
    return Case(FAMILY, "fused_linear_kd_loss", sh.label, sh.shape + " forward_kl", "fwd+bwd", ctx.dtype,
                head_flops(sh.tokens, sh.hidden, sh.vocab),
                head_bytes(sh.tokens, sh.hidden, sh.vocab, h.element_size(), teacher.element_size()), impls)


def _grpo_case(ctx: Context, b: int, s: int) -> Case:
    from r1kernels.ops import loss as ops_loss
    from r1kernels.reference import loss as ref

    lp = (ctx.randn(b, s, dtype=torch.float32, scale=0.5) - 1.0).requires_grad_(True)
    old = (lp.detach() + ctx.randn(b, s, dtype=torch.float32, scale=0.1))
    ref_lp = (lp.detach() + ctx.randn(b, s, dtype=torch.float32, scale=0.1))
    adv = ctx.randn(b, dtype=torch.float32)
    mask = ctx.randn(b, s, dtype=torch.float32) > -1.0

    def torch_grpo(x, *rest):
        return ref.grpo_loss(x, *rest)[0]

    def ours(backend):
        return lambda x, *rest: ops_loss.grpo_loss(x, *rest, backend=backend)[0]

    args = (old, ref_lp, adv, mask)
    impls = [Impl("torch formula", "torch", _grad_step(torch_grpo, (lp,), *args))]
    impls += [Impl(bk, "r1kernels", _grad_step(ours(bk), (lp,), *args)) for bk in _backends(ctx, "grpo_loss")]
    return Case(FAMILY, "grpo_loss", f"B={b} S={s}", f"[{b}, {s}] fp32, bool mask", "fwd+bwd", torch.float32,
                20.0 * b * s, grpo_bytes(b, s), impls)


def cases(ctx: Context) -> Iterator[Case]:
    """The cross-entropy case of the run; on the GPU (``v3``) also log-probabilities, distillation (4096
    tokens: the teacher's logits are 1 GiB) and GRPO."""
    sh = ce_shape(ctx.shapes.name)
    yield _ce_case(ctx, sh)
    if ctx.is_cuda and ctx.shapes.name == "v3":
        yield _logprobs_case(ctx, sh)
        yield _kd_case(ctx, HeadShape(TOKENS_PREFILL, sh.hidden, sh.vocab))
        yield _grpo_case(ctx, 64, 4096)


def _fmt_gib(n: Optional[int]) -> str:
    return "n/a" if n is None else f"{n / GIB:.3f} GiB"


_ROW_FIELDS = {f.name for f in fields(Row)}


def measure_memory(ctx: Context, case: Case, rows: list[Row]) -> dict[str, Optional[int]]:
    """Peak extra bytes of every implementation of ``case`` that ran; written into the rows' notes, with
    the ratio to the first torch baseline's."""
    peaks: dict[str, Optional[int]] = {}
    for impl, row in zip(case.impls, rows):
        if impl.fn is None or row.status in ("unavailable", "error"):
            continue
        try:
            peaks[impl.name] = peak_extra_bytes(impl.fn, ctx.device)
        except Exception as exc:  # measuring must not sink the row's time
            row.note = (row.note + "; " if row.note else "") + f"memory not measured: {type(exc).__name__}: {exc}"[:200]
    base = next((peaks.get(i.name) for i in case.impls if i.kind == "torch"), None)
    for impl, row in zip(case.impls, rows):
        if impl.name not in peaks:
            continue
        p = peaks[impl.name]
        if p is not None and "peak_extra_bytes" in _ROW_FIELDS:  # a harness with a memory column shows it
            setattr(row, "peak_extra_bytes", float(p))
        text = f"peak extra {_fmt_gib(p)}"
        if p is not None and base:
            text += f" ({p / base:.3f} of {case.impls[0].name}'s {_fmt_gib(base)})"
        row.note = f"{row.note}; {text}" if row.note else text
    return peaks


def run(ctx: Context, ceilings: dict[str, Any], log: Callable[[str], None] = print) -> list[Row]:
    from .harness import format_row_line

    rows: list[Row] = []
    for case in cases(ctx):
        case_rows = run_case(ctx, case, ceilings)
        measure_memory(ctx, case, case_rows)
        for r in case_rows:
            log(format_row_line(r) + (f"  [{r.note}]" if r.status == "ok" and r.note else ""))
        rows.extend(case_rows)
        del case
        if ctx.is_cuda:
            torch.cuda.empty_cache()
    return rows


__all__ = ["DEVICES", "FAMILY", "HeadShape", "ce_shape", "cases", "grpo_bytes", "head_bytes", "head_flops",
           "measure_memory", "peak_extra_bytes", "peers", "run", "torch_linear_ce"]
