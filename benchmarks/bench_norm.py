"""RMSNorm at DeepSeek-V3 shapes (``r1kernels.ops.rms_norm``).

Shapes: :func:`benchmarks.shapes.norm_shapes` (the hidden-state norm [T, 7168], MLA's q_a norm [T, 1536]
and kv_a norm [T, 512] of [T, 576], at the run's token counts). Passes: ``fwd`` and ``fwd+bwd`` (forward,
then the gradients of x and the weight for a random upstream gradient).

Formulas, with N rows, D the normalised width, s_x / s_w the bytes per element of x / the weight:

* FLOP, fwd: 4 N D (square, sum, times rstd, times weight; the N reciprocal square roots are left out).
* FLOP, bwd: 9 N D (g = dy w; g x; sum; r g; x (r^3 mean); subtract; dw: dy x r (2); sum over rows),
  so fwd+bwd = 13 N D.
* bytes, fwd: read x, read w, write y = 2 N D s_x + D s_w.
* bytes, fwd+bwd: the forward's, then read x and dy, read w, write dx and dw
  = 5 N D s_x + 3 D s_w (the fewest: a kernel that saves rstd adds 8 N bytes, left out).

Compared: the torch baselines "torch formula" (transformers' DeepseekV3RMSNorm.forward, what a user
writes) and ``torch.nn.functional.rms_norm`` where this torch has it; the r1kernels backends of the device
(:func:`benchmarks.harness.r1kernels_backends`); Liger-Kernel's RMSNorm as a peer on CUDA when
``liger_kernel`` is importable.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import torch

from .harness import Case, Context, Impl, Row, r1kernels_backends, run_cases
from .shapes import NormShape, norm_shapes

FAMILY = "norm"
DEVICES = ("cuda", "cpu")


def norm_flops(rows: int, dim: int, mode: str) -> float:
    return (4 if mode == "fwd" else 13) * rows * dim


def norm_bytes(rows: int, dim: int, x_bytes: int, w_bytes: int, mode: str) -> float:
    if mode == "fwd":
        return 2 * rows * dim * x_bytes + dim * w_bytes
    return 5 * rows * dim * x_bytes + 3 * dim * w_bytes


def torch_formula(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' DeepseekV3RMSNorm.forward: the plain PyTorch a user writes (fp32 statistics, the
    normalised x rounded to x's dtype, then the weight)."""
    xf = x.float()
    variance = xf.pow(2).mean(-1, keepdim=True)
    return weight * (xf * torch.rsqrt(variance + eps)).to(x.dtype)


def _liger() -> tuple[Callable | None, str]:
    """Liger-Kernel's functional RMSNorm (a Triton kernel, CUDA only) and its version, or None and why."""
    try:
        import liger_kernel
        from liger_kernel.transformers.functional import liger_rms_norm
    except Exception as exc:
        return None, f"absent ({type(exc).__name__})"
    return liger_rms_norm, getattr(liger_kernel, "__version__", "present")


def peers(ctx: Context) -> dict[str, str]:
    """The peer libraries of this family and whether they run here (for the result's header)."""
    fn, why = _liger()
    if fn is not None and not ctx.is_cuda:
        why = f"{why}, CUDA only"
    return {"liger_kernel": why}


def _impls(ctx: Context, run: Callable[[Callable[..., torch.Tensor]], Callable[[], Any]], eps: float) -> list[Impl]:
    """The implementations of one case; ``run(f)`` turns ``f(x, w)`` into the case's timed closure."""
    import r1kernels

    impls = [Impl("torch formula", "torch", run(lambda x, w: torch_formula(x, w, eps)))]
    if hasattr(torch.nn.functional, "rms_norm"):  # torch >= 2.4
        impls.append(Impl("F.rms_norm", "torch", run(lambda x, w: torch.nn.functional.rms_norm(x, (x.shape[-1],), w, eps))))
    for b in r1kernels_backends(ctx):
        impls.append(Impl(b, "r1kernels", run(lambda x, w, b=b: r1kernels.ops.rms_norm(x, w, eps, backend=b))))
    liger, _ = _liger()
    if liger is not None and ctx.is_cuda:
        # casting_mode "llama" is transformers' rounding (the formula above); in_place=False so the
        # backward does not overwrite dy, which every timed call reuses.
        impls.append(Impl("liger", "peer", run(lambda x, w: liger(x, w, eps, offset=0.0, casting_mode="llama", in_place=False))))
    return impls


def cases(ctx: Context) -> Iterator[Case]:
    """Every norm case of the run, generated lazily (one shape's tensors alive at a time)."""
    eps = ctx.shapes.dims.rms_norm_eps
    for sh in norm_shapes(ctx.shapes):
        yield from _shape_cases(ctx, sh, eps)


def _shape_cases(ctx: Context, sh: NormShape, eps: float) -> Iterator[Case]:
    parent = ctx.randn(sh.rows, sh.row_stride)
    x = parent[:, : sh.dim]  # the model's layout: kv_a's c_kv is a column slice
    w = 1 + ctx.randn(sh.dim, scale=0.1)  # near 1 like trained norm weights, but not all equal
    dy = ctx.randn(sh.rows, sh.dim)
    xs, ws = x.element_size(), w.element_size()

    def fwd(f):
        return lambda: f(x, w)

    xg = x.detach().requires_grad_(True)  # a leaf view with the same strides
    wg = w.detach().requires_grad_(True)

    def fwd_bwd(f):
        def step():
            y = f(xg, wg)
            dx, dw = torch.autograd.grad(y, (xg, wg), dy)
            return y, dx, dw

        return step

    for mode, run in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
        yield Case(
            family=FAMILY, op="rms_norm", label=sh.label, shape=sh.shape, mode=mode, dtype=ctx.dtype,
            flops=norm_flops(sh.rows, sh.dim, mode), nbytes=norm_bytes(sh.rows, sh.dim, xs, ws, mode),
            impls=_impls(ctx, run, eps),
        )


def run(ctx: Context, ceilings: dict[str, Any], log: Callable[[str], None] = print) -> list[Row]:
    return run_cases(ctx, cases(ctx), ceilings, log)
