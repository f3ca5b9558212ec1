"""The one benchmark harness (DESIGN "Benchmarks").

A kernel family describes what to time as :class:`Case` objects: one shape, one pass (``fwd`` or
``fwd+bwd``), the FLOP and byte counts from the formulas written next to the bench, and the
implementations to compare (:class:`Impl`): the torch baselines (what a user would write instead), the
r1kernels backends and any peer library that is importable. :func:`run_cases` checks every implementation
against the first torch baseline, times it, and turns it into :class:`Row` records with TFLOP/s, GB/s, the
fraction of the device ceilings measured in the same run (:func:`measure_ceilings`) and the speedup over
the fastest torch baseline and the fastest peer of the same case. :func:`write_results` writes
``bench.json`` and ``bench.md``.

Timing:

* CUDA: ``triton.testing.do_bench`` (CUDA events, the median, ``warmup=25`` / ``rep=100`` ms as the
  baseline script ``shared/baselines/torch_baselines.py`` uses). Since triton 3.2 do_bench zeroes a
  256 MB buffer before every timed call (``runtime.driver.active.clear_cache``) and takes no flush
  argument (triton-lang/triton#4485), so triton 3.6 (the H200) and 3.9 (CI) need none; older releases had
  ``fast_flush`` (default True), which :func:`do_bench_kwargs` passes only where the signature has it. The H200's L2 is
  60 MB, so 256 MB evicts it.
* CPU: a wall clock around each call, warm-up calls, then three rounds of calls within a time budget;
  the row's time is the median of the quietest round (see :func:`time_stats`). There is no cache flush
  on CPU: these numbers are for smoke tests and relative comparisons.
"""
from __future__ import annotations

import datetime as _dt
import inspect
import json
import math
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from .shapes import ShapeSet, shape_set

REPO = Path(__file__).resolve().parent.parent

# Relative error ‖out − ref‖ / ‖ref‖ above which a row is marked "mismatch" (the implementation computes
# something else, so its time means nothing). Both sides compute in fp32 and round once to the output
# dtype, so fp32 differs by reordered sums (~1e-7) and half precision by about one rounding (2^-9, 2^-12).
REL_TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}

# do_bench's warm-up and repetition budgets in milliseconds (the baseline script's values).
DO_BENCH_WARMUP_MS = 25
DO_BENCH_REP_MS = 100


# ------------------------------------------------------------------------------------------------------
# Context


@dataclass
class Context:
    """Where and how one run times: the device, the shapes, the dtype of the activations."""

    device: torch.device
    shapes: ShapeSet
    dtype: torch.dtype
    cpu_budget_s: float = 0.2  # CPU timer: wall time of the timed calls of one implementation, all rounds
    cpu_min_runs: int = 5
    cpu_warmup: int = 2
    seed: int = 0

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def __post_init__(self):
        # One generator per run, on the device itself (drawing GPU-sized inputs on the host and copying
        # them over would cost seconds per case): the inputs of a case depend on the seed and on which
        # cases ran before it.
        self._gen = torch.Generator(device=self.device).manual_seed(self.seed)

    def randn(self, *shape: int, dtype: Optional[torch.dtype] = None, scale: float = 1.0) -> torch.Tensor:
        """Random normal data (never zeros: METHOD, they hide bugs and run faster than real data)."""
        t = torch.randn(*shape, generator=self._gen, device=self.device, dtype=torch.float32)
        if scale != 1.0:
            t.mul_(scale)
        return t.to(dtype or self.dtype)


def make_context(device: str, shapes: Optional[str] = None) -> Context:
    """``device`` "cuda" or "cpu"; ``shapes`` a name in :data:`benchmarks.shapes.SHAPE_SETS` (default: v3 on
    CUDA, cpu on CPU). CUDA runs bf16 (the model's dtype); CPU runs fp32 (CPU bf16 arithmetic is emulated
    and slow, and the references compute in fp32 anyway)."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: torch sees no CUDA device")
    if dev.type not in ("cuda", "cpu"):
        raise ValueError(f"device must be cuda or cpu, got {device!r}")
    name = shapes or ("v3" if dev.type == "cuda" else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    return Context(device=dev, shapes=shape_set(name), dtype=dtype)


# ------------------------------------------------------------------------------------------------------
# Timing


def do_bench_kwargs(do_bench: Callable) -> dict[str, Any]:
    """The keyword arguments for ``triton.testing.do_bench`` in the installed triton: median of the timed
    calls, L2 flushed before each. triton >= 3.2 (triton-lang/triton#4485) always flushes (a 256 MB
    buffer zeroed through the driver's ``clear_cache``) and rejects ``fast_flush``; triton 2.1 to 3.1 had
    ``fast_flush`` (True, the default: zero a 256 MB int32 buffer; False: zero it byte by byte, slower)."""
    params = inspect.signature(do_bench).parameters
    kw: dict[str, Any] = {"warmup": DO_BENCH_WARMUP_MS, "rep": DO_BENCH_REP_MS}
    # triton 2.0 has no return_mode and returns (median, q20, q80); _cuda_time_ms takes the first
    if "return_mode" in params:
        kw["return_mode"] = "median"
    if "fast_flush" in params:
        kw["fast_flush"] = True
    return kw


def _cuda_time_ms(fn: Callable[[], Any]) -> float:
    import triton.testing

    ms = triton.testing.do_bench(fn, **do_bench_kwargs(triton.testing.do_bench))
    return float(ms[0] if isinstance(ms, (tuple, list)) else ms)


CPU_ROUNDS = 3


def _cpu_rounds_ms(fn: Callable[[], Any], ctx: Context) -> list[list[float]]:
    """Per-call wall times in ms, in :data:`CPU_ROUNDS` rounds of ``cpu_budget_s / CPU_ROUNDS`` each (and at
    least ``cpu_min_runs`` calls), each round after its own warm-up calls."""
    # The first warm-up lasts at least 25 ms (do_bench's warm-up): the first calls of a shape pay for fresh
    # allocations and for waking the intra-op thread pool.
    start = time.perf_counter()
    n = 0
    while n < ctx.cpu_warmup or (time.perf_counter() - start) < 0.025:
        fn()
        n += 1
        if n >= 1000:
            break
    rounds: list[list[float]] = []
    for _ in range(CPU_ROUNDS):
        for _ in range(ctx.cpu_warmup if rounds else 0):
            fn()
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < ctx.cpu_min_runs or (time.perf_counter() - start) < ctx.cpu_budget_s / CPU_ROUNDS:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            if len(times) >= 1000:
                break
        rounds.append(times)
    return rounds


def time_stats(fn: Callable[[], Any], ctx: Context) -> tuple[float, Optional[float]]:
    """``(ms, min ms)`` of one call of ``fn`` on ``ctx.device``.

    CUDA: do_bench's median; no min. CPU: the median of the quietest of :data:`CPU_ROUNDS` rounds, and the
    fastest call. On a small shared machine another job can stall the intra-op threads for whole rounds
    (calls then take multiples of the scheduler tick, tens of ms); the quietest round's median is what the
    call costs when the machine is not shared, and the min bounds it from below.
    """
    if ctx.is_cuda:
        return _cuda_time_ms(fn), None
    rounds = _cpu_rounds_ms(fn, ctx)
    return min(statistics.median(r) for r in rounds), min(min(r) for r in rounds)


def time_ms(fn: Callable[[], Any], ctx: Context) -> float:
    """Median milliseconds of one call of ``fn`` on ``ctx.device`` (see the module docstring)."""
    return time_stats(fn, ctx)[0]


def r1kernels_backends(ctx: Context) -> tuple[str, ...]:
    """The r1kernels backends a family times on ``ctx.device``. CUDA: the Triton kernels and the compiled
    extension. CPU: the C++ kernels and the reference; Triton is left out on the CPU because it runs there
    only under its interpreter, whose times say nothing about the kernel."""
    return ("triton", "cuda") if ctx.is_cuda else ("cpu", "reference")


# ------------------------------------------------------------------------------------------------------
# Device ceilings


def measure_ceilings(ctx: Context) -> dict[str, Any]:
    """The device's own ceilings, measured like ``shared/baselines/torch_baselines.py`` does.

    * copy: ``b.copy_(a)`` of a 1 GiB uint8 buffer, GB/s counting bytes read plus bytes written (2 n);
    * matmul: ``x @ y`` of two random 8192 x 8192 bf16 matrices, TFLOP/s = 2 m^3 / time.

    On CPU the sizes shrink so this takes about a second (256 MiB copy, 8 times the 32 MiB L3 of the CI VMs;
    512^3 fp32 matmul, fp32 because the CPU rows are fp32), and the smoke shapes shrink them further.
    """
    if ctx.is_cuda:
        n, m, mm_dtype = 1 << 30, 8192, torch.bfloat16
    elif ctx.shapes.name == "smoke":
        n, m, mm_dtype = 1 << 22, 128, torch.float32
    else:
        n, m, mm_dtype = 1 << 28, 512, torch.float32
    a = torch.empty(n, dtype=torch.uint8, device=ctx.device)
    # Random bytes rather than the baseline script's untouched torch.empty: on the CPU, pages never written
    # all map the one zero page, so reading them runs from cache at several times memory bandwidth. On the
    # GPU the copy's speed does not depend on the data; filling it costs one pass.
    a.random_(0, 256, generator=ctx._gen)
    b = torch.empty_like(a)
    b.copy_(a)  # touch the destination's pages too, outside the timing
    copy_ms = time_ms(lambda: b.copy_(a), ctx)
    del a, b
    x = ctx.randn(m, m, dtype=mm_dtype)
    y = ctx.randn(m, m, dtype=mm_dtype)
    mm_ms = time_ms(lambda: x @ y, ctx)
    del x, y
    if ctx.is_cuda:
        torch.cuda.empty_cache()
    return {
        "copy_bytes": n,
        "copy_ms": copy_ms,
        "copy_GBps": 2 * n / copy_ms / 1e6,
        "matmul_m": m,
        "matmul_dtype": str(mm_dtype).replace("torch.", ""),
        "matmul_ms": mm_ms,
        "matmul_TFLOPs": 2 * m**3 / mm_ms / 1e9,
    }


# ------------------------------------------------------------------------------------------------------
# Cases and rows

KINDS = ("torch", "r1kernels", "peer")


@dataclass
class Impl:
    """One implementation of a case.

    ``fn()`` runs it once and returns its output tensor(s) (for ``fwd+bwd``: the output and the input
    gradients), which are compared with the first torch baseline's. ``fn`` may raise
    ``r1kernels.BackendUnavailable`` (the row is recorded as unavailable with the reason). ``why_not``
    set instead of ``fn`` records an implementation that cannot run here (a peer not installed).
    """

    name: str
    kind: str  # "torch" (a baseline), "r1kernels" (one backend), "peer" (another library)
    fn: Optional[Callable[[], Any]] = None
    why_not: Optional[str] = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Impl {self.name}: kind must be one of {KINDS}, got {self.kind!r}")
        if (self.fn is None) == (self.why_not is None):
            raise ValueError(f"Impl {self.name}: give exactly one of fn and why_not")


@dataclass
class Case:
    """One shape and pass of one op. ``flops`` and ``nbytes`` come from the bench's written formulas
    (``nbytes``: the fewest bytes the pass must move through device memory, each input read once and
    each output written once)."""

    family: str
    op: str
    label: str
    shape: str
    mode: str  # "fwd" or "fwd+bwd"
    dtype: torch.dtype
    flops: float
    nbytes: float
    impls: list[Impl]
    # Bytes the pass cannot avoid reading however it computes (MoE: the touched experts' weights); each
    # row then shows the time they take at this run's copy ceiling (``floor_ms``). 0: no such floor.
    floor_bytes: float = 0.0


@dataclass
class Row:
    """One line of the results. Throughputs are ``None`` when the case has no formula for them; every
    time and ratio is ``None`` when the implementation did not run (``status`` says why)."""

    family: str
    op: str
    case: str
    shape: str
    mode: str
    dtype: str
    impl: str
    kind: str
    status: str = "ok"  # "ok", "unavailable", "error", "mismatch"
    note: str = ""
    ms: Optional[float] = None  # median (CPU: of the quietest round, see time_stats)
    ms_min: Optional[float] = None  # CPU only: the fastest call
    TFLOPs: Optional[float] = None
    GBps: Optional[float] = None
    frac_copy: Optional[float] = None  # GBps / the copy ceiling of this run
    frac_matmul: Optional[float] = None  # TFLOPs / the matmul ceiling of this run
    floor_ms: Optional[float] = None  # the case's floor_bytes at this run's copy ceiling
    vs_torch: Optional[float] = None  # fastest torch baseline's ms / this ms (> 1: faster than torch)
    torch_ref: Optional[str] = None  # which baseline that was
    vs_peer: Optional[float] = None  # fastest peer's ms / this ms
    peer_ref: Optional[str] = None
    rel_err: Optional[float] = None  # ‖out − ref‖ / ‖ref‖ against the first torch baseline, worst tensor
    max_abs_diff: Optional[float] = None  # model rows: max |logits − transformers' logits|
    tokens_per_s: Optional[float] = None  # model rows
    cache_bytes_per_token: Optional[float] = None  # generation rows: KV-cache bytes one token adds (all layers)
    flops: Optional[float] = None
    nbytes: Optional[float] = None


def _as_tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _as_tensors(o)]
    raise TypeError(f"a benchmark implementation must return tensors, got {type(out).__name__}")


# Elements per fp64 chunk in rel_err (256 MB): a V3 expert weight gradient has 7.5e9 elements, 60 GB in fp64.
REL_ERR_CHUNK = 1 << 25


def rel_err(got: Any, ref: Any) -> float:
    """Worst ‖got − ref‖ / ‖ref‖ over the returned tensors, in fp64 on their device (a chunk at a time, so
    the fp64 copies stay small); inf on NaN or a shape mismatch."""
    g, r = _as_tensors(got), _as_tensors(ref)
    if len(g) != len(r):
        return math.inf
    worst = 0.0
    for a, b in zip(g, r):
        if a.shape != b.shape:
            return math.inf
        a, b = a.detach().reshape(-1), b.detach().to(a.device).reshape(-1)
        num_sq = den_sq = 0.0
        for start in range(0, a.numel(), REL_ERR_CHUNK):
            a64 = a[start:start + REL_ERR_CHUNK].to(torch.float64)
            b64 = b[start:start + REL_ERR_CHUNK].to(torch.float64)
            num_sq += (a64 - b64).square().sum().item()
            den_sq += b64.square().sum().item()
            del a64, b64
        num, den = math.sqrt(num_sq), math.sqrt(den_sq)
        e = num / den if den > 0 else num
        if not math.isfinite(e):
            return math.inf
        worst = max(worst, e)
    return worst


def _sync(ctx: Context) -> None:
    if ctx.is_cuda:
        torch.cuda.synchronize()


def _unavailable_types() -> tuple[type, ...]:
    try:
        from r1kernels import BackendUnavailable

        return (BackendUnavailable,)
    except Exception:  # r1kernels broken: every r1kernels row then shows up as an error with the cause
        return ()


def run_case(ctx: Context, case: Case, ceilings: dict[str, Any],
             timer: Optional[Callable[[Callable[[], Any], Context], tuple[float, Optional[float]]]] = None) -> list[Row]:
    """Check and time every implementation of ``case``; returns one row per implementation.

    ``timer(fn, ctx) -> (ms, ms_min)`` replaces :func:`time_stats` (a family whose calls take seconds times
    them once instead of through ``do_bench``'s repetitions)."""
    timer = timer or time_stats
    unavailable = _unavailable_types()
    rows: list[Row] = []
    ref_out: Any = None
    ref_name = ""
    for impl in case.impls:
        row = Row(
            family=case.family, op=case.op, case=case.label, shape=case.shape, mode=case.mode,
            dtype=str(case.dtype).replace("torch.", ""), impl=impl.name, kind=impl.kind,
            flops=case.flops or None, nbytes=case.nbytes or None,
        )
        if case.floor_bytes and ceilings.get("copy_GBps"):
            row.floor_ms = case.floor_bytes / ceilings["copy_GBps"] / 1e6
        rows.append(row)
        if impl.fn is None:
            row.status, row.note = "unavailable", impl.why_not or ""
            continue
        try:
            out = impl.fn()  # also the warm-up that compiles Triton kernels and loads the extension
            _sync(ctx)
        except unavailable as exc:  # type: ignore[misc]
            row.status, row.note = "unavailable", str(exc)
            continue
        except Exception as exc:  # an implementation that crashes is reported, not fatal to the run
            row.status, row.note = "error", f"{type(exc).__name__}: {exc}"[:400]
            continue
        if ref_out is None and impl.kind == "torch":
            ref_out, ref_name, row.rel_err = out, impl.name, 0.0
        elif ref_out is not None:
            row.rel_err = rel_err(out, ref_out)
            if row.rel_err > REL_TOL[case.dtype]:
                row.status = "mismatch"
                row.note = f"rel err {row.rel_err:.2e} > {REL_TOL[case.dtype]:.0e} against {ref_name}"
        del out
        try:
            row.ms, row.ms_min = timer(impl.fn, ctx)
        except Exception as exc:
            row.status, row.note = "error", f"while timing: {type(exc).__name__}: {exc}"[:400]
            continue
        fill_throughput(row, ceilings)
    fill_speedups(rows)
    del ref_out
    if ctx.is_cuda:
        torch.cuda.empty_cache()
    return rows


def fill_throughput(row: Row, ceilings: dict[str, Any]) -> None:
    """TFLOP/s, GB/s and the fractions of this run's ceilings, from ``row.ms`` and the case's formulas."""
    if row.ms is None or row.ms <= 0:
        return
    if row.flops:
        row.TFLOPs = row.flops / row.ms / 1e9
        if ceilings.get("matmul_TFLOPs"):
            row.frac_matmul = row.TFLOPs / ceilings["matmul_TFLOPs"]
    if row.nbytes:
        row.GBps = row.nbytes / row.ms / 1e6
        if ceilings.get("copy_GBps"):
            row.frac_copy = row.GBps / ceilings["copy_GBps"]


def fill_speedups(rows: Sequence[Row]) -> None:
    """Speedup of every timed row of one case over the fastest torch baseline and the fastest peer."""

    def fastest(kind: str) -> Optional[Row]:
        timed = [r for r in rows if r.kind == kind and r.status == "ok" and r.ms]
        return min(timed, key=lambda r: r.ms) if timed else None  # type: ignore[arg-type, return-value]

    base, peer = fastest("torch"), fastest("peer")
    for r in rows:
        if r.ms is None:
            continue
        if base is not None:
            r.vs_torch, r.torch_ref = base.ms / r.ms, base.impl  # type: ignore[operator]
        if peer is not None:
            r.vs_peer, r.peer_ref = peer.ms / r.ms, peer.impl  # type: ignore[operator]


def run_cases(
    ctx: Context, cases: Iterable[Case], ceilings: dict[str, Any], log: Callable[[str], None] = print
) -> list[Row]:
    """Run a family's cases one after the other (cases are generated lazily, so only one case's tensors
    are alive at a time) and log each row as it lands."""
    rows: list[Row] = []
    for case in cases:
        case_rows = run_case(ctx, case, ceilings)
        for r in case_rows:
            log(format_row_line(r))
        rows.extend(case_rows)
    return rows


def format_row_line(r: Row) -> str:
    if r.ms is None:
        return f"{r.family:<6} {r.case:<22} {r.mode:<8} {r.impl:<18} {r.status}: {r.note[:120]}"
    parts = [f"{r.family:<6} {r.case:<22} {r.mode:<8} {r.impl:<18} {r.ms:9.4f} ms"]
    if r.GBps is not None:
        parts.append(f"{r.GBps:8.1f} GB/s")
    if r.tokens_per_s is not None:
        parts.append(f"{r.tokens_per_s:9.0f} tok/s")
    if r.cache_bytes_per_token is not None:
        parts.append(f"cache {r.cache_bytes_per_token:,.0f} B/tok")
    if r.floor_ms is not None:
        parts.append(f"floor {r.floor_ms:.4f} ms")
    if r.vs_torch is not None:
        parts.append(f"x{r.vs_torch:.2f} vs {r.torch_ref}")
    if r.status != "ok":
        parts.append(f"[{r.status}: {r.note[:80]}]")
    return "  ".join(parts)


def bench_with_pytest(benchmark: Any, case: Case, impl: Impl) -> None:
    """The pytest-benchmark path (CPU): skip what cannot run here, check ``impl`` against the case's first
    torch baseline like :func:`run_case` does, then time it with the ``benchmark`` fixture and attach the
    throughputs from the case's formulas to ``benchmark.extra_info``."""
    import pytest

    if impl.fn is None:
        pytest.skip(impl.why_not or "unavailable")
    unavailable = _unavailable_types()
    try:
        out = impl.fn()
    except unavailable as exc:  # type: ignore[misc]
        pytest.skip(str(exc))
    ref_impl = next(i for i in case.impls if i.kind == "torch" and i.fn is not None)
    err = rel_err(out, ref_impl.fn())  # type: ignore[misc]
    assert err <= REL_TOL[case.dtype], f"{impl.name}: rel err {err:.2e} against {ref_impl.name}"
    benchmark.group = f"{case.op} {case.label} {case.shape} {case.mode}"  # the impls of a case side by side
    benchmark(impl.fn)
    benchmark.extra_info.update({"shape": case.shape, "pass": case.mode, "impl": impl.name, "rel_err": err})
    if benchmark.stats is None:  # --benchmark-disable: the call ran once as a test, nothing was timed
        return
    median_ms = benchmark.stats.stats.median * 1e3
    if case.nbytes:
        benchmark.extra_info["GBps"] = case.nbytes / median_ms / 1e6
    if case.flops:
        benchmark.extra_info["TFLOPs"] = case.flops / median_ms / 1e9


def case_id(case: Case, impl: Impl) -> str:
    """A pytest id: ``hidden-decode-fwd-triton``."""
    return "-".join(case.label.split() + [case.mode, impl.name])


# ------------------------------------------------------------------------------------------------------
# Environment and output


def git_state() -> dict[str, Any]:
    """``git rev-parse HEAD`` and whether the tree has uncommitted changes; never fails (no git, no repo:
    the fields say so), because the GPU machine may receive a copy of the tree without ``.git``."""
    out: dict[str, Any] = {}
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        out["commit"] = r.stdout.strip() if r.returncode == 0 else f"unknown ({r.stderr.strip()[:120]})"
        if r.returncode == 0:
            s = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, timeout=10)
            out["dirty"] = bool(s.stdout.strip()) if s.returncode == 0 else None
    except Exception as exc:  # git not installed, or a timeout
        out["commit"] = f"unknown ({type(exc).__name__}: {exc})"[:160]
    return out


def _dist_version(name: str) -> str:
    # Read from the installed metadata rather than importing: importing triton on a CPU-only run is slow
    # and reads TRITON_INTERPRET at import time.
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return "absent"


def versions() -> dict[str, str]:
    try:
        import r1kernels

        r1k = r1kernels.__version__
    except Exception as exc:
        r1k = f"import failed ({type(exc).__name__})"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda (torch)": torch.version.cuda or "none",
        "triton": _dist_version("triton"),
        "r1kernels": r1k,
        "transformers": _dist_version("transformers"),
    }


def device_info(ctx: Context) -> dict[str, Any]:
    if ctx.is_cuda:
        idx = ctx.device.index if ctx.device.index is not None else torch.cuda.current_device()
        p = torch.cuda.get_device_properties(idx)
        return {
            "type": "cuda",
            "name": p.name,
            "capability": f"{p.major}.{p.minor}",
            "sms": p.multi_processor_count,
            "memory_GB": round(p.total_memory / 1e9, 1),
            "l2_MB": round(getattr(p, "L2_cache_size", 0) / 1e6, 1),
        }
    return {
        "type": "cpu",
        "name": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # other jobs on the machine when the run started (1-minute load average): CPU times are only as
        # good as the machine was quiet
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def _fmt(v: Any, spec: str) -> str:
    if v is None:
        return ""
    if isinstance(v, str):  # "inf" / "nan" as stored in JSON
        return v
    return format(v, spec)


# Markdown columns: header, row -> text. A column is left out of a family's table when no row fills it.
_COLUMNS: list[tuple[str, Callable[[Row], str]]] = [
    ("case", lambda r: r.case),
    ("shape", lambda r: r.shape),
    ("dtype", lambda r: r.dtype),
    ("pass", lambda r: r.mode),
    ("impl", lambda r: r.impl if r.kind != "peer" else f"{r.impl} (peer)"),
    ("ms", lambda r: _fmt(r.ms, ".4f") if r.ms is not None else r.status),
    ("min ms", lambda r: _fmt(r.ms_min, ".4f")),
    ("tok/s", lambda r: _fmt(r.tokens_per_s, ",.0f")),
    ("cache B/tok", lambda r: _fmt(r.cache_bytes_per_token, ",.0f")),
    ("TFLOP/s", lambda r: _fmt(r.TFLOPs, ".3g")),
    ("GB/s", lambda r: _fmt(r.GBps, ".1f")),
    ("% copy", lambda r: _fmt(None if r.frac_copy is None else 100 * r.frac_copy, ".1f")),
    ("% matmul", lambda r: _fmt(None if r.frac_matmul is None else 100 * r.frac_matmul, ".2f")),
    ("floor ms", lambda r: _fmt(r.floor_ms, ".4f")),
    ("× torch", lambda r: _fmt(r.vs_torch, ".2f")),
    ("× peer", lambda r: _fmt(r.vs_peer, ".2f")),
    ("rel err", lambda r: _fmt(r.rel_err, ".1e")),
    ("max abs diff", lambda r: _fmt(r.max_abs_diff, ".1e")),
    ("status", lambda r: "" if r.status == "ok" else r.status),
]


def markdown(result: dict[str, Any]) -> str:
    """The markdown rendering of a result dict (as written to bench.json)."""
    rows = [Row(**r) for r in result["rows"]]
    dev, ceil, ver, git = result["device"], result["ceilings"], result["versions"], result["git"]
    commit = git.get("commit", "unknown") + (" (+ uncommitted changes)" if git.get("dirty") else "")
    lines = [
        f"# r1kernels benchmarks: {dev.get('name', dev['type'])} ({dev['type']})",
        "",
        f"- date: {result['created']}",
        f"- commit: {commit}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in ver.items()),
        "- device: " + ", ".join(f"{k} {v}" for k, v in dev.items()),
        f"- shapes: `{result['shape_set']}`, activations {result['dtype']}",
        f"- ceilings (this run): copy {ceil['copy_GBps']:.1f} GB/s ({ceil['copy_bytes'] / 2**20:.0f} MiB d2d, read + write); "
        f"matmul {ceil['matmul_TFLOPs']:.3g} TFLOP/s ({ceil['matmul_m']}^3 {ceil['matmul_dtype']})",
        f"- timing: {result['timing']}",
        "- × torch: the fastest torch baseline of the same case in this run over this row's time (> 1 is faster); "
        "rel err: ‖out − ref‖ / ‖ref‖ against the first torch baseline (outputs and gradients, worst)",
    ]
    if result.get("partial"):
        lines.append("- partial: the run had not finished every family when this was written")
    if result.get("peers"):
        lines.append("- peers: " + ", ".join(f"{k} {v}" for k, v in result["peers"].items()))
    for fam, why in result.get("skipped", {}).items():
        lines.append(f"- {fam}: skipped ({why})")
    families = list(dict.fromkeys(r.family for r in rows))
    notes: dict[str, int] = {}
    for fam in families:
        fam_rows = [r for r in rows if r.family == fam]
        cols = [(h, f) for h, f in _COLUMNS if h in ("case", "impl", "ms") or any(f(r) for r in fam_rows)]
        lines += ["", f"## {fam}", "", "| " + " | ".join(h for h, _ in cols) + " |", "|" + "---|" * len(cols)]
        for r in fam_rows:
            cells = [f(r).replace("|", "\\|") for _, f in cols]
            if r.status != "ok" and r.note:
                n = notes.setdefault(r.note, len(notes) + 1)
                cells[-1] = (cells[-1] + f" [{n}]").strip()
            lines.append("| " + " | ".join(cells) + " |")
    if notes:
        lines += ["", "Notes:", ""]
        lines += [f"{n}. {text}" for text, n in notes.items()]
    return "\n".join(lines) + "\n"


def result_dict(ctx: Context, rows: Sequence[Row], ceilings: dict[str, Any], **extra: Any) -> dict[str, Any]:
    timing = (
        f"triton.testing.do_bench median, warmup {DO_BENCH_WARMUP_MS} ms, rep {DO_BENCH_REP_MS} ms, L2 flushed"
        if ctx.is_cuda
        else f"wall clock after >= {ctx.cpu_warmup} warm-up calls and 25 ms; {CPU_ROUNDS} rounds of >= {ctx.cpu_min_runs} calls "
        f"and {ctx.cpu_budget_s / CPU_ROUNDS:.3g} s each; ms = the median of the quietest round, min ms = the fastest call; "
        "no cache flush"
    )
    return {
        "schema": 1,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device_info(ctx),
        "ceilings": ceilings,
        "versions": versions(),
        "git": git_state(),
        "shape_set": ctx.shapes.name,
        "dtype": str(ctx.dtype).replace("torch.", ""),
        "timing": timing,
        **extra,
        "rows": [asdict(r) for r in rows],
    }


def write_results(out_dir: os.PathLike | str, result: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``bench.json`` and ``bench.md`` into ``out_dir`` (created); returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / "bench.json", out / "bench.md"

    def clean(v: Any) -> Any:  # JSON has no inf / nan
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    js.write_text(json.dumps(clean(result), indent=1) + "\n")
    md.write_text(markdown(result))
    return js, md


__all__ = [
    "CPU_ROUNDS", "Case", "Context", "Impl", "REL_TOL", "Row", "bench_with_pytest", "case_id", "device_info",
    "do_bench_kwargs", "fill_speedups", "fill_throughput", "git_state", "make_context", "markdown",
    "measure_ceilings", "r1kernels_backends", "rel_err", "result_dict", "run_case", "run_cases", "time_ms",
    "time_stats", "versions", "write_results",
]
