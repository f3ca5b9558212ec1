"""The ``cpu`` backend of ``moe_experts``: grouped GEMMs through ``torch._grouped_mm``, with a backward.

No Python loop over experts and nothing read back from the tensors (no ``.item()``, no data-dependent
shapes); every size follows from the shapes, so the same code would run asynchronously on any device.

Forward, with S = T*K routing slots (slot ``s = t*K + k`` is token t's k-th choice):

1. ``order``: the slots stably sorted by expert; ``tok = order // K`` the token of each sorted slot;
   ``offs [E]`` int32, the end of each expert's run (``searchsorted`` of the sorted ids; an expert with no
   slots has an empty run);
2. ``xs = x[tok]`` (the token rows gathered once), ``h = xs @ W13_e^T`` per run (``_grouped_mm``, 2-D x 3-D);
3. ``a = silu(h[:, :I]) * h[:, I:]``, ``o = a @ W2_e^T`` per run;
4. ``y[t] = sum_k weights[t, k] * o[inv[t*K + k]]`` in fp32 (``inv`` = the inverse of ``order``), one
   ``bmm`` of ``[T, 1, K] x [T, K, D]``: every token sums its own K rows, in slot order, so the result does
   not depend on thread scheduling (deterministic; no atomics, no index_add).

Backward (``dy [T, D]``), the same runs:

* ``g = dy[tok] @ W2_e`` (2-D x 3-D); ``dweights[slot] = <g, a>`` (= ``<dy[t], o>``, so ``o`` is not kept);
* ``da = weights * g``; ``dW2_e = (dy[tok])_e^T (weights * a)_e`` (2-D x 2-D with offs: the sum runs over
  the expert's slots);
* ``dh`` from the SwiGLU derivative of the saved ``h``; ``dxs = dh @ W13_e`` (2-D x 3-D) combined per
  token like the forward; ``dW13_e = dh_e^T xs_e`` (2-D x 2-D).

Saved for backward: x, w13, w2, the routing weights, ``h [S, 2I]``, ``order``, ``inv`` and ``offs``; ``a``
is recomputed.

What ``torch._grouped_mm`` takes (torch 2.13, ``aten/src/ATen/native/GroupedMMUtils.h``, checked here):
fp32, bf16 and fp16 on CPU, the output in the input dtype (bf16 GEMMs accumulate in fp32 inside the CPU
GEMM and round once); every operand's last two dims must have one stride 1 and the other a multiple of
16 bytes (so D and I must be multiples of 4 fp32 / 8 half elements); int32 offsets. On CPU it loops over
the groups in C++ and calls ``at::mm`` per expert. Its own autograd formula fails on an expanded upstream
gradient (``y.sum().backward()``: "Invalid strides/sizes, got [0, 0] for strides"), one reason the
backward here is explicit. Its meta kernel (what ``torch.compile`` traces) accepts bf16 only, so under
compilation other dtypes fall back (see :func:`reason`).

Speed (2-core CPU, fp32, the tiny preset's experts D=256, I=128, E=16, top-4; ``python -m benchmarks.run
--device cpu --only moe``, 2026-11-29, medians against the loop-over-experts reference): forward T=1
0.105 vs 0.174 ms (x1.7), T=16 0.356 vs 0.753 ms (x2.1), T=512 2.65 vs 3.12 ms (x1.2); forward+backward
T=16 1.12 vs 5.51 ms (x4.9), T=512 9.1 vs 15.0 ms (x1.6). At T=512 the forward is bound by its GEMMs (0.40
GFLOP; this backend runs at 70% of the run's 0.216 TFLOP/s fp32 matmul ceiling, the loop at 60%, so no
implementation gains more than x1.7 there); at small T by MKL's cost per few-row GEMM (about 12 us for a
[4, 256] x [256, 256] product, two per expert), which ``_grouped_mm`` pays per expert as the loop does,
while the ~25 us of indexing per expert that the loop adds are gone.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_ALIGN_BYTES = 16  # torch._grouped_mm's stride rule: the non-unit stride of each operand, in bytes


def _probe_grouped_mm() -> Optional[str]:
    """Why ``torch._grouped_mm`` cannot run on CPU tensors in this torch (None when it can).

    A tiny real call rather than a version test: the CPU kernel (a C++ loop of ``at::mm``) arrived after the
    CUDA one, and a torch that has the function may still lack it."""
    fn = getattr(torch, "_grouped_mm", None)
    if fn is None:
        return f"torch {torch.__version__} has no torch._grouped_mm"
    try:
        out = fn(torch.ones(2, 4), torch.ones(2, 4, 4), offs=torch.tensor([1, 2], dtype=torch.int32))
    except Exception as exc:  # NotImplementedError (no CPU kernel) or a RuntimeError from an older check
        why = f"{type(exc).__name__}: {exc}"[:200]
        return f"torch {torch.__version__}'s torch._grouped_mm does not run on CPU tensors ({why})"
    if tuple(out.shape) != (2, 4) or not bool((out == 4).all()):
        return f"torch {torch.__version__}'s torch._grouped_mm gave a wrong result on a 2 x 4 probe"
    return None


_PROBED: dict[str, Optional[str]] = {}  # the probe's answer, once per process


def _grouped_mm_missing() -> Optional[str]:
    """:func:`_probe_grouped_mm`, run once. Under torch.compile the answer is read as a constant: tracing the
    probe would run it on fake tensors (as ``_dispatch._ambient_backend`` is marked, without importing
    torch._dynamo at ``import r1kernels``)."""
    if "cpu" not in _PROBED:
        _PROBED["cpu"] = _probe_grouped_mm()
    return _PROBED["cpu"]


_grouped_mm_missing._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _stride_reason(name: str, sizes, strides, elem: int) -> Optional[str]:
    """``torch._grouped_mm``'s rule for one operand's last two dims (``check_valid_strides_and_return_
    transposed``): one stride is 1 and the other, at least the extent it steps over, is a multiple of
    16 bytes. None when the operand passes, else a sentence."""
    align = _ALIGN_BYTES // elem
    s_row, s_col = strides[-2], strides[-1]
    if s_row == 1 and s_col >= max(1, sizes[-2]):
        bad = s_col
    elif s_col == 1 and s_row >= max(1, sizes[-1]):
        bad = s_row
    else:
        return f"{name} (sizes {tuple(sizes)}, strides {tuple(strides)}) has no unit stride in its last two dims"
    if bad % align:
        return (f"{name} (sizes {tuple(sizes)}, strides {tuple(strides)}) has a row stride of {bad} elements, not a "
                f"multiple of 16 bytes ({align} elements)")
    return None


def device_reason(device: torch.device) -> Optional[str]:
    """Why this backend cannot run on ``device`` at all (for ``r1kernels.info()``); None when it can."""
    if device.type != "cpu":
        return "runs on CPU tensors only"
    return _grouped_mm_missing()


def reason(x, w13, w2, weights, expert_ids, deterministic=False) -> Optional[str]:
    """Why this backend cannot run the call (None when it can): the ``check`` of the dispatch table.

    Args as ``r1kernels.ops.moe_experts`` passes them (already validated: shapes, dtypes, one device).
    """
    tensors = (x, w13, w2, weights, expert_ids)
    if any(t.device.type != "cpu" for t in tensors):
        return f"this backend takes CPU tensors, got {x.device.type} tensors"
    missing = _grouped_mm_missing()
    if missing is not None:
        return missing
    if x.dtype not in DTYPES:
        return f"torch._grouped_mm takes float32 / bfloat16 / float16, got {str(x.dtype).replace('torch.', '')}"
    if x.dtype != torch.bfloat16 and torch.compiler.is_compiling():
        return (f"under torch.compile: torch {torch.__version__}'s meta kernel of torch._grouped_mm accepts bfloat16 "
                f"only, got {str(x.dtype).replace('torch.', '')}")
    d = x.shape[1]
    e, two_i, _ = w13.shape
    inter = two_i // 2
    if d == 0 or inter == 0 or e == 0:
        return f"empty weights (D={d}, I={inter}, E={e})"
    elem = x.element_size()
    align = _ALIGN_BYTES // elem
    for what, n in (("D (hidden size)", d), ("I (expert intermediate size)", inter)):
        if n % align:
            return (f"{what} = {n} is not a multiple of {align}: torch._grouped_mm needs the rows of every operand "
                    f"16-byte aligned ({align} x {elem}-byte elements)")
    # The weights are read as given (backward) and transposed (forward); the rule is symmetric in the last
    # two dims, but both layouts are checked so that no corner case of the rule slips through.
    for name, w in (("w13", w13), ("w2", w2)):
        for label, view in ((name, w), (f"{name}.transpose(1, 2)", w.transpose(1, 2))):
            why = _stride_reason(label, view.shape, view.stride(), elem)
            if why is not None:
                return f"torch._grouped_mm cannot read {why}"
    return None


def _combine(rows: torch.Tensor, inv: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """``out[t] = sum_k coef[t, k] * rows[inv[t*K + k]]`` in fp32: ``rows [S, D]`` sorted by expert, ``coef
    [T, K]`` fp32. A bmm of [T, 1, K] x [T, K, D]: each token reduces its own K rows, deterministic.

    Measured at T=512, K=4, D=256 on 2 cores: 0.05 ms, against 0.07 ms for an fp32 index_add_ and up to
    1 ms for ``(rows * coef).sum(1)`` (a reduction over the middle dim, slow whenever its temporaries miss
    glibc's heap)."""
    t, k = coef.shape
    per_token = rows.index_select(0, inv).view(t, k, rows.shape[1])
    return torch.bmm(coef.unsqueeze(1), per_token.float()).squeeze(1)


def _route_runs(expert_ids: torch.Tensor, num_experts: int):
    """``(order, tok, inv, offs)`` of the slots sorted by expert (stable: slot order within an expert)."""
    k = expert_ids.shape[1]
    flat = expert_ids.reshape(-1)
    sorted_ids, order = torch.sort(flat, stable=True)
    bounds = torch.arange(1, num_experts + 1, dtype=sorted_ids.dtype, device=flat.device)
    offs = torch.searchsorted(sorted_ids, bounds, out_int32=True)  # [E] end of each expert's run
    tok = torch.div(order, k, rounding_mode="floor")
    inv = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return order, tok, inv, offs


class _GroupedExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w13, w2, weights, expert_ids):
        inter = w2.shape[2]
        order, tok, inv, offs = _route_runs(expert_ids, w13.shape[0])
        xs = x.index_select(0, tok)  # [S, D]
        h = torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs)  # [S, 2I]
        a = F.silu(h[:, :inter]).mul_(h[:, inter:])  # [S, I]
        o = torch._grouped_mm(a, w2.transpose(1, 2), offs=offs)  # [S, D]
        y = _combine(o, inv, weights.float())
        ctx.save_for_backward(x, w13, w2, weights, h, order, inv, offs)
        return y.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, w13, w2, weights, h, order, inv, offs = ctx.saved_tensors
        need_x, need_w13, need_w2, need_wts, _ = ctx.needs_input_grad
        dx = dw13 = dw2 = dwts = None
        t, k = weights.shape
        inter = w2.shape[2]
        tok = torch.div(order, k, rounding_mode="floor")
        ws = weights.reshape(-1).index_select(0, order).float()[:, None]  # [S, 1] fp32
        gate, up = h[:, :inter].float(), h[:, inter:].float()  # fp32 math (no copy when h is fp32)
        sig = torch.sigmoid(gate)
        silu = gate * sig
        a = silu * up  # [S, I] fp32, the forward's activation recomputed
        dys = dy.to(x.dtype).index_select(0, tok)  # [S, D]
        if need_w2:
            # dW2_e = sum over e's slots of weight * dy ⊗ a: 2-D x 2-D, the runs split the contraction dim
            dw2 = torch._grouped_mm(dys.t(), (a * ws).to(x.dtype), offs=offs)  # [E, D, I]
        if need_x or need_w13 or need_wts:
            g = torch._grouped_mm(dys, w2, offs=offs)  # [S, I] = dy W2_e
            if need_wts:
                dws = (g.float() * a).sum(-1)  # [S] = <dy[t], W2_e a>
                dwts = dws.index_select(0, inv).view(t, k)
            if need_x or need_w13:
                da = g.float() * ws
                # d silu(z)/dz = sig * (1 + z * (1 - sig))
                dgate = da * up * (sig * (1 + gate * (1 - sig)))
                dup = da * silu
                dh = torch.cat((dgate, dup), dim=1).to(x.dtype)  # [S, 2I]
                if need_x:
                    dxs = torch._grouped_mm(dh, w13, offs=offs)  # [S, D]
                    dx = _combine(dxs, inv, torch.ones(t, k, dtype=torch.float32, device=dy.device)).to(x.dtype)
                if need_w13:
                    dw13 = torch._grouped_mm(dh.t(), x.index_select(0, tok), offs=offs)  # [E, 2I, D]
        return dx, dw13, dw2, dwts, None


def moe_experts_grouped(x, w13, w2, weights, expert_ids, deterministic=False):
    """The ``cpu`` backend of ``r1kernels.ops.moe_experts`` (arguments as there; check with :func:`reason`).

    Always deterministic: no step accumulates through atomics or in a scheduling-dependent order, so
    ``deterministic`` changes nothing here. ``expert_ids`` must lie in ``[0, E)`` (not checked: that would
    read the data); double backward is not supported (the backward is written out).
    """
    return _GroupedExperts.apply(x, w13, w2, weights, expert_ids)
