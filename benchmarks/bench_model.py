"""Whole-model forward on the CPU: r1kernels against transformers' DeepseekV3ForCausalLM.

Both run the same config (``r1kernels.ModelConfig.preset("tiny")``, handed to transformers through
``cfg.to_hf_dict()``) and the same weights: transformers' model is built with a seeded random init, saved
with ``save_pretrained`` and loaded by ``r1kernels.load_pretrained``, so the comparison also checks the
checkpoint path. Before timing, the logits of the two must agree (max |difference| printed; above
:data:`MODEL_ATOL` the rows are marked "mismatch"). Then each forward (fp32, ``torch.inference_mode``,
no KV cache) is timed: warm-up calls, then the median of several; tokens/s = batch x seq / median time.

    python -m benchmarks.bench_model [--batch 4] [--seq 128] [--preset tiny]

prints ``r1kernels X tok/s | transformers Y tok/s | ratio Z`` (ratio = r1kernels / transformers).
Through ``python -m benchmarks.run --device cpu --only model`` the two become rows of bench.json / bench.md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from .harness import Context, Row, fill_speedups
from .shapes import ModelShape, model_shape, shape_set

FAMILY = "model"
# CPU only: the point is the whole tiny model against transformers on the machines CI has; the GPU suite's
# few minutes go to the kernels.
DEVICES = ("cpu",)

# The model-level bound of the test suite (python_tests/conftest.py MODEL_ATOL): fp32 logits of the two
# implementations differ by reordered sums only.
MODEL_ATOL = 1e-4


def peers(ctx: Context) -> dict[str, str]:
    return {}


@dataclass
class Pair:
    """The two models on the same weights, the input, and the check of their logits."""

    r1k: Callable[[torch.Tensor], torch.Tensor]
    hf: Callable[[torch.Tensor], torch.Tensor]
    ids: torch.Tensor
    max_abs_diff: float
    attn_impl: str
    r1k_model: Any = None  # the r1kernels Transformer (bench_generate uses the models themselves)
    hf_model: Any = None  # transformers' DeepseekV3ForCausalLM


def missing_api() -> Optional[str]:
    """Why the model benchmark cannot run with this r1kernels / transformers (None when it can)."""
    try:
        import transformers
    except Exception as exc:
        return f"transformers is not importable ({type(exc).__name__}: {exc})"
    if not hasattr(transformers, "DeepseekV3ForCausalLM"):
        return f"transformers {transformers.__version__} has no DeepseekV3ForCausalLM"
    import r1kernels

    gone = [n for n in ("ModelConfig", "load_pretrained") if not hasattr(r1kernels, n)]
    if gone:
        return f"r1kernels {r1kernels.__version__} has no {' / '.join(gone)}"
    return None


def build(shape: ModelShape, device: torch.device = torch.device("cpu"), seed: int = 0) -> Pair:
    """transformers' model with seeded random weights, saved and reloaded by r1kernels; logits compared."""
    import r1kernels
    import transformers

    transformers.utils.logging.disable_progress_bar()  # save_pretrained's shard bar would fill the logs
    cfg = r1kernels.ModelConfig.preset(shape.preset)
    hf_cfg = transformers.DeepseekV3Config(**cfg.to_hf_dict())
    torch.manual_seed(seed)
    hf = transformers.DeepseekV3ForCausalLM(hf_cfg).to(device).eval()
    with tempfile.TemporaryDirectory(prefix="r1k_bench_model_") as tmp:
        hf.save_pretrained(tmp)
        with warnings.catch_warnings():
            # transformers' DeepseekV3ForCausalLM has no MTP modules, so the checkpoint holds none although
            # the config counts them; r1kernels warns and loads the main model, which is what is compared.
            warnings.filterwarnings("ignore", message=".*MTP module.*")
            model = r1kernels.load_pretrained(tmp, dtype=None, device=str(device))
    if isinstance(model, torch.nn.Module):
        model.eval()
    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, hf_cfg.vocab_size, (shape.batch, shape.seq), generator=gen).to(device)

    def run_hf(t: torch.Tensor) -> torch.Tensor:
        return hf(input_ids=t, use_cache=False).logits

    def run_r1k(t: torch.Tensor) -> torch.Tensor:
        return model(t)

    with torch.inference_mode():
        got, want = run_r1k(ids).float(), run_hf(ids).float()
    if got.shape != want.shape:
        raise RuntimeError(f"r1kernels logits have shape {tuple(got.shape)}, transformers' {tuple(want.shape)}")
    diff = (got - want).abs().max().item()
    return Pair(run_r1k, run_hf, ids, diff, getattr(hf.config, "_attn_implementation", "?"), model, hf)


def _timed(fn: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor) -> Callable[[], Any]:
    def call():
        with torch.inference_mode():
            return fn(ids)

    return call


def time_alternating(calls: list[Callable[[], Any]], budget_s: float, min_runs: int = 5, warmup: int = 2) -> list[list[float]]:
    """Per-call wall times in ms of each of ``calls``, run in turns (A, B, A, B, ...) so that a change in
    the machine's load during the run hits both models alike and the ratio stays fair."""
    for _ in range(warmup):
        for c in calls:
            c()
    times: list[list[float]] = [[] for _ in calls]
    start = time.perf_counter()
    while len(times[0]) < min_runs or (time.perf_counter() - start) < budget_s:
        for c, t in zip(calls, times):
            t0 = time.perf_counter()
            c()
            t.append((time.perf_counter() - t0) * 1e3)
        if len(times[0]) >= 200:
            break
    return times


def run(ctx: Context, ceilings: dict[str, Any], log: Callable[[str], None] = print) -> list[Row]:
    """Two rows (r1kernels, transformers as the torch baseline) with ms, tokens/s and the ratio."""
    shape = model_shape(ctx.shapes)
    base = dict(
        family=FAMILY, op="forward", case=f"{shape.preset} model", shape=f"[{shape.batch}, {shape.seq}] tokens",
        mode="fwd", dtype="float32",
    )
    rows = [Row(**base, impl="r1kernels", kind="r1kernels"), Row(**base, impl="transformers", kind="torch")]
    why = missing_api()
    if why is not None:
        for r in rows:
            r.status, r.note = "unavailable", why
        log(f"model: unavailable: {why}")
        return rows
    try:
        pair = build(shape, ctx.device, ctx.seed)
    except Exception as exc:
        for r in rows:
            r.status, r.note = "error", f"building the models: {type(exc).__name__}: {exc}"[:400]
        log(f"model: error: {rows[0].note}")
        return rows
    rows[0].max_abs_diff = pair.max_abs_diff
    if pair.max_abs_diff > MODEL_ATOL:
        rows[0].status = "mismatch"
        rows[0].note = f"max |logits diff| {pair.max_abs_diff:.2e} > {MODEL_ATOL:.0e}"
    rows[1].note = f"attn_implementation={pair.attn_impl}"
    # A whole forward takes milliseconds: five times the kernels' wall-time budget (1 s by default) so the
    # median is over several calls of each.
    try:
        times = time_alternating([_timed(pair.r1k, pair.ids), _timed(pair.hf, pair.ids)], 5 * ctx.cpu_budget_s)
    except Exception as exc:
        for r in rows:
            r.status, r.note = "error", f"while timing: {type(exc).__name__}: {exc}"[:400]
        return rows
    for row, t in zip(rows, times):
        row.ms, row.ms_min = statistics.median(t), min(t)
        row.tokens_per_s = shape.tokens / (row.ms / 1e3)
    fill_speedups(rows)
    r, h = rows
    if r.tokens_per_s and h.tokens_per_s:
        log(
            f"r1kernels {r.tokens_per_s:,.0f} tok/s | transformers {h.tokens_per_s:,.0f} tok/s | "
            f"ratio {r.tokens_per_s / h.tokens_per_s:.2f}  (max |logits diff| {pair.max_abs_diff:.2e}, "
            f"batch {shape.batch} x seq {shape.seq}, preset {shape.preset})"
        )
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_model", description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=None, help="sequences per forward (default: the cpu shape set's)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: the cpu shape set's)")
    p.add_argument("--preset", default=None, help="r1kernels.ModelConfig preset (default: tiny)")
    p.add_argument("--budget-s", type=float, default=2.0, help="wall time for the timed calls of both (default 2)")
    args = p.parse_args(argv)
    why = missing_api()
    if why is not None:
        print(f"cannot run the model benchmark: {why}", file=sys.stderr)
        return 2
    default = model_shape(shape_set("cpu"))
    shape = ModelShape(args.preset or default.preset, args.batch or default.batch, args.seq or default.seq)
    pair = build(shape)
    print(
        f"logits agree to max |diff| {pair.max_abs_diff:.2e} (bound {MODEL_ATOL:.0e}); "
        f"transformers attention: {pair.attn_impl}"
    )
    r_times, h_times = time_alternating([_timed(pair.r1k, pair.ids), _timed(pair.hf, pair.ids)], args.budget_s)
    r_ms, h_ms = statistics.median(r_times), statistics.median(h_times)
    r_tok, h_tok = shape.tokens / (r_ms / 1e3), shape.tokens / (h_ms / 1e3)
    print(
        f"r1kernels {r_tok:,.0f} tok/s | transformers {h_tok:,.0f} tok/s | ratio {r_tok / h_tok:.2f}"
        f"   (median {r_ms:.2f} ms vs {h_ms:.2f} ms per forward of {shape.batch} x {shape.seq} tokens over "
        f"{len(r_times)} calls each, taken in turns; preset {shape.preset}, {torch.get_num_threads()} threads)"
    )
    return 0 if pair.max_abs_diff <= MODEL_ATOL else 1


if __name__ == "__main__":
    sys.exit(main())
