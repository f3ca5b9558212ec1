"""Sampling at DeepSeek-V3's vocabulary (``r1kernels.ops.sampling``): top-p ``sample`` and ``speculative_verify``.

Shapes (V = ``shapes.V3.vocab`` = 129,280 except where noted):

* ``sample``: B = 128 rows (``shapes.TOKENS_DECODE``, a decode step), top-p 0.9, on two kinds of logits:
  "peaked" (:func:`peaked_logits`, like an LLM's next-token logits: a few tokens kept) and "randn" (N(0, 1),
  presumably DESIGN's anchor input: the top-p set holds most of the vocabulary).
* ``speculative_verify``: B = 32 rows, N = 4 drafts, peaked target logits, draft distributions from a
  perturbed copy (a drafter's), drafts drawn from them.
* CPU (``cpu`` shape set): B = 8 (verify 4), V = 32,000; ``smoke``: B = 2, V = 4,096, N = 2.

Bytes, with s the bytes per logit (the fewest a pass must move: each input read once, each output written
once): sample B V s + 8 B; verify B (N + 1) V s + 4 B N V (draft probabilities) + 8 B (N + 2). The Triton
kernel reads the logits ~3 times for peaked rows (statistics, one search pass, the candidate copy) and up to
~17 times for randn rows (the search cannot narrow a flat row to the candidate capacity quickly); GB/s here
counts one read. No FLOP formula (comparisons and exponentials, no multiply-adds worth counting).

Compared: the torch baselines "torch sort" (softmax, sort, cumsum, mask, ``torch.multinomial``: what a user
writes) and "torch argmax" (greedy decoding's cost, the floor of any sampler), the r1kernels backends, and
FlashInfer's sort-free sampler as a peer when importable. The outputs are random, so a row is checked, not
compared: every token must lie in the reference's filtered set (verify: the accepted drafts, the emitted
token in its position's set, -1 after it); a row that fails is marked "mismatch".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch

from .harness import Case, Context, Impl, Row, fill_speedups, fill_throughput, format_row_line, time_stats
from .shapes import TOKENS_DECODE, V3

FAMILY = "sampling"
DEVICES = ("cuda", "cpu")
TOP_P = 0.9
VERIFY_BATCH, VERIFY_DRAFTS = 32, 4


@dataclass(frozen=True)
class SamplingShape:
    """``batch`` rows of a ``vocab``-wide vocabulary; ``drafts`` > 0 for a speculative verification."""

    batch: int
    vocab: int
    drafts: int = 0

    @property
    def shape(self) -> str:
        return f"B={self.batch} V={self.vocab}" + (f" N={self.drafts}" if self.drafts else "")


def sampling_shapes(ctx: Context) -> tuple[SamplingShape, SamplingShape]:
    """(sample shape, verify shape) of the run's shape set."""
    name = ctx.shapes.name
    if name == "smoke":
        return SamplingShape(2, 4096), SamplingShape(2, 4096, 2)
    if name == "cpu":
        return SamplingShape(8, 32_000), SamplingShape(4, 32_000, VERIFY_DRAFTS)
    return SamplingShape(TOKENS_DECODE, V3.vocab), SamplingShape(VERIFY_BATCH, V3.vocab, VERIFY_DRAFTS)


def sample_bytes(sh: SamplingShape, elem_bytes: int) -> float:
    return sh.batch * sh.vocab * elem_bytes + 8 * sh.batch


def verify_bytes(sh: SamplingShape, elem_bytes: int) -> float:
    b, n, v = sh.batch, sh.drafts, sh.vocab
    return b * (n + 1) * v * elem_bytes + 4 * b * n * v + 8 * b * (n + 2)


def torch_sort_top_p(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The sort-based top-p sampler a user writes (HF's TopPLogitsWarper, then multinomial): ``[B]`` int64."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    outside = sorted_p.cumsum(dim=-1) - sorted_p >= top_p  # mass before the token already reaches top_p
    sorted_p = sorted_p.masked_fill(outside, 0.0)
    pick = torch.multinomial(sorted_p, 1)  # [B, 1], multinomial renormalises
    return order.gather(1, pick).squeeze(1)


def _flashinfer() -> tuple[Optional[Callable], str]:
    try:
        import flashinfer
        from flashinfer.sampling import top_p_sampling_from_probs
    except Exception as exc:
        return None, f"absent ({type(exc).__name__})"
    return top_p_sampling_from_probs, getattr(flashinfer, "__version__", "present")


def peers(ctx: Context) -> dict[str, str]:
    fn, why = _flashinfer()
    if fn is not None and not ctx.is_cuda:
        why = f"{why}, CUDA only"
    return {"flashinfer": why}


def peaked_logits(ctx: Context, *shape: int) -> torch.Tensor:
    """LLM-like logits: a N(0, 2^2) bulk and, where an independent normal exceeds 3.4 (~0.03 % of tokens, ~44
    of V3's vocabulary), a raise of 6 to 18. At t = 0.8, top-p 0.9 keeps 1 to ~10 tokens, as a confident
    decoding step does."""
    x = ctx.randn(*shape, dtype=torch.float32, scale=2.0)
    peak = ctx.randn(*shape, dtype=torch.float32) > 3.4
    raise_by = 6.0 + ctx.randn(*shape, dtype=torch.float32).abs().clamp(max=3.0) * 4.0
    return torch.where(peak, x + raise_by, x).to(ctx.dtype)


# ------------------------------------------------------------------------------------------------------
# Cases: a harness Case plus the check of its outputs


@dataclass
class CheckedCase:
    case: Case
    check: Callable[[Any], Optional[str]]  # None when the output is a valid draw, else what is wrong


def _backend_impls(ctx: Context, call: Callable[[str], Callable[[], Any]]) -> list[Impl]:
    impls = []
    for b in ("reference", "triton"):
        if b == "triton" and not ctx.is_cuda:
            impls.append(Impl(b, "r1kernels", why_not="Triton runs on the CPU only under its interpreter, whose "
                                                        "times say nothing about the kernel"))
        else:
            impls.append(Impl(b, "r1kernels", call(b)))
    return impls


def _sample_check(kept: torch.Tensor) -> Callable[[Any], Optional[str]]:
    def check(tok: Any) -> Optional[str]:
        if not isinstance(tok, torch.Tensor) or tok.shape != kept.shape[:1]:
            return f"expected tokens [{kept.shape[0]}], got {getattr(tok, 'shape', type(tok).__name__)}"
        ok = (tok >= 0) & (tok < kept.shape[1])
        inside = kept.gather(1, tok.clamp(0, kept.shape[1] - 1)[:, None])[:, 0] & ok
        bad = int((~inside).sum())
        return None if bad == 0 else f"{bad} of {tok.numel()} tokens outside the filtered set"

    return check


def sample_cases(ctx: Context) -> Iterator[CheckedCase]:
    from r1kernels.ops import sampling as ops

    sh, _ = sampling_shapes(ctx)
    for kind, temperature in (("peaked", 0.8), ("randn", 1.0)):
        if kind == "peaked":
            x = peaked_logits(ctx, sh.batch, sh.vocab)
        else:
            x = ctx.randn(sh.batch, sh.vocab)
        params = dict(temperature=temperature, top_p=TOP_P)
        kept = ops.filtered_probs(x, **params) > 0
        seeds = torch.arange(sh.batch, device=ctx.device, dtype=torch.int64)
        impls = [
            Impl("torch sort", "torch", lambda x=x, t=temperature: torch_sort_top_p(x, t, TOP_P)),
            Impl("torch argmax", "torch", lambda x=x: x.argmax(dim=-1)),
        ]
        impls += _backend_impls(ctx, lambda b, x=x, p=params: (lambda: ops.sample(x, **p, seed=seeds, backend=b)))
        fi, why = _flashinfer()
        if fi is not None and ctx.is_cuda:
            impls.append(Impl("flashinfer", "peer",
                              lambda x=x, t=temperature: fi(torch.softmax(x.float() / t, -1), TOP_P)))
        case = Case(family=FAMILY, op="sample", label=f"top-p {kind}",
                    shape=f"{sh.shape} t={temperature} top_p={TOP_P}", mode="fwd", dtype=ctx.dtype, flops=0.0,
                    nbytes=sample_bytes(sh, x.element_size()), impls=impls)
        yield CheckedCase(case, _sample_check(kept))
        del x, kept


def _verify_check(kept: torch.Tensor, drafts: torch.Tensor) -> Callable[[Any], Optional[str]]:
    """kept ``[B, N+1, V]`` bool, drafts ``[B, N]``."""
    b, n1, v = kept.shape

    def check(out: Any) -> Optional[str]:
        tokens, nacc = out
        if tokens.shape != (b, n1) or nacc.shape != (b,):
            return f"expected ([{b}, {n1}], [{b}]), got ({tuple(tokens.shape)}, {tuple(nacc.shape)})"
        cols = torch.arange(n1, device=tokens.device)[None, :]
        a = nacc[:, None]
        padded = torch.cat([drafts, drafts[:, :1]], dim=1)
        if not bool(torch.where(cols < a, tokens == padded, True).all()):
            return "accepted tokens differ from the drafts"
        if not bool(torch.where(cols > a, tokens == -1, True).all()):
            return "positions after the emitted token are not -1"
        emitted = tokens.gather(1, a)[:, 0]
        kept_at = kept.gather(1, a[:, :, None].expand(b, 1, v))[:, 0]  # [B, V]
        inside = kept_at.gather(1, emitted.clamp(0, v - 1)[:, None])[:, 0] & (emitted >= 0)
        bad = int((~inside).sum())
        return None if bad == 0 else f"{bad} of {b} emitted tokens outside their position's filtered set"

    return check


def verify_cases(ctx: Context) -> Iterator[CheckedCase]:
    from r1kernels.ops import sampling as ops

    _, sh = sampling_shapes(ctx)
    b, n, v = sh.batch, sh.drafts, sh.vocab
    params = dict(temperature=0.8, top_p=TOP_P)
    target = peaked_logits(ctx, b, n + 1, v)
    drafter = (target[:, :n].float() + ctx.randn(b, n, v, dtype=torch.float32, scale=0.5)).to(ctx.dtype)
    q = ops.filtered_probs(drafter.reshape(b * n, v), **params).view(b, n, v)
    drafts = ops.sample(drafter.reshape(b * n, v), **params, seed=7).view(b, n)
    kept = (ops.filtered_probs(target.reshape(b * (n + 1), v), **params) > 0).view(b, n + 1, v)
    seeds = torch.arange(b, device=ctx.device, dtype=torch.int64)
    from r1kernels.reference.sampling import speculative_verify as torch_verify

    impls = [Impl("torch sort", "torch", lambda: torch_verify(drafts, q, target, 0.8, 0, TOP_P, 0.0, seeds))]
    impls += _backend_impls(ctx, lambda bk: (lambda: ops.speculative_verify(drafts, q, target, **params, seed=seeds,
                                                                            backend=bk)))
    case = Case(family=FAMILY, op="speculative_verify", label="verify peaked", shape=f"{sh.shape} t=0.8 top_p={TOP_P}",
                mode="fwd", dtype=ctx.dtype, flops=0.0, nbytes=verify_bytes(sh, target.element_size()), impls=impls)
    yield CheckedCase(case, _verify_check(kept, drafts))


def cases(ctx: Context) -> Iterator[CheckedCase]:
    yield from sample_cases(ctx)
    yield from verify_cases(ctx)


# ------------------------------------------------------------------------------------------------------
# Running: the harness's run_case, with the output check in place of the comparison with a baseline


def _unavailable() -> tuple[type, ...]:
    from r1kernels import BackendUnavailable

    return (BackendUnavailable,)


def run_checked_case(ctx: Context, cc: CheckedCase, ceilings: dict[str, Any]) -> list[Row]:
    case = cc.case
    rows: list[Row] = []
    for impl in case.impls:
        row = Row(family=case.family, op=case.op, case=case.label, shape=case.shape, mode=case.mode,
                  dtype=str(case.dtype).replace("torch.", ""), impl=impl.name, kind=impl.kind,
                  flops=case.flops or None, nbytes=case.nbytes or None)
        rows.append(row)
        if impl.fn is None:
            row.status, row.note = "unavailable", impl.why_not or ""
            continue
        try:
            out = impl.fn()  # also the warm-up that compiles the Triton kernels
            if ctx.is_cuda:
                torch.cuda.synchronize()
            why = cc.check(out)
        except _unavailable() as exc:
            row.status, row.note = "unavailable", str(exc)
            continue
        except Exception as exc:
            row.status, row.note = "error", f"{type(exc).__name__}: {exc}"[:400]
            continue
        if why is not None:
            row.status, row.note = "mismatch", why
        try:
            row.ms, row.ms_min = time_stats(impl.fn, ctx)
        except Exception as exc:
            row.status, row.note = "error", f"while timing: {type(exc).__name__}: {exc}"[:400]
            continue
        fill_throughput(row, ceilings)
    fill_speedups(rows)
    return rows


def run(ctx: Context, ceilings: dict[str, Any], log: Callable[[str], None] = print) -> list[Row]:
    rows: list[Row] = []
    for cc in cases(ctx):
        case_rows = run_checked_case(ctx, cc, ceilings)
        for r in case_rows:
            log(format_row_line(r))
        rows.extend(case_rows)
        if ctx.is_cuda:
            torch.cuda.empty_cache()
    return rows
