"""Run the benchmark families and write ``OUT/bench.json`` and ``OUT/bench.md``.

    python -m benchmarks.run --out DIR [--device cuda|cpu] [--only norm,rope,moe,mla,sparse,loss,sampling,model,generate,dsa] [--shapes v3|cpu|smoke]
        [--cpu-budget-ms 200]

The device ceilings (copy, matmul) are measured first, in the same process, and every row is set against
them. ``--device`` defaults to cuda when torch sees a GPU. ``--shapes`` defaults to ``v3`` on CUDA and
``cpu`` on the CPU (``smoke``: the fewest tokens, for CI). A family that does not run on the device is
listed as skipped. The output files are rewritten after every family (with ``"partial": true`` until the
run ends), so a run stopped at a time limit keeps the families that finished. Exit status: 0 when every row
that ran matched its reference without error, 1 when a row is "error" or "mismatch" (the tables are written
either way), 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Optional

import torch

from . import bench_dsa, bench_generate, bench_loss, bench_sampling, bench_sparse, bench_mla, bench_model, bench_moe, bench_norm, bench_rope
from .harness import Row, make_context, measure_ceilings, result_dict, versions, write_results

# Every benchmark family, in the order they run. A family module has FAMILY (its name), DEVICES (the
# device types it runs on), peers(ctx) -> {library: version or why absent} and
# run(ctx, ceilings, log) -> list[Row].
FAMILIES = (bench_norm, bench_rope, bench_moe, bench_mla, bench_sparse, bench_loss, bench_sampling, bench_model, bench_generate, bench_dsa)


def main(argv: Optional[list[str]] = None) -> int:
    names = [f.FAMILY for f in FAMILIES]
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", default="", help=f"comma-separated families (default: all of {','.join(names)})")
    p.add_argument("--shapes", default=None, help="shape set: v3, cpu or smoke (default: v3 on cuda, cpu on cpu)")
    p.add_argument("--cpu-budget-ms", type=float, default=200.0,
                   help="CPU only: wall time spent repeating each call after its warm-up (default 200)")
    args = p.parse_args(argv)

    only = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(only) - set(names))
    if unknown:
        p.error(f"--only: unknown families {', '.join(unknown)}; known: {', '.join(names)}")
    try:
        ctx = make_context(args.device, args.shapes)
    except (RuntimeError, ValueError) as exc:
        p.error(str(exc))
    ctx.cpu_budget_s = args.cpu_budget_ms / 1e3

    t0 = time.perf_counter()
    vers = ", ".join(f"{k} {v}" for k, v in versions().items())
    print(f"benchmarks on {args.device}, shapes {ctx.shapes.name}, {ctx.dtype}; {vers}", flush=True)
    ceilings = measure_ceilings(ctx)
    print(
        f"ceilings: copy {ceilings['copy_GBps']:.1f} GB/s, matmul {ceilings['matmul_TFLOPs']:.3g} TFLOP/s "
        f"({ceilings['matmul_m']}^3 {ceilings['matmul_dtype']})",
        flush=True,
    )

    rows: list[Row] = []
    skipped: dict[str, str] = {}
    peers: dict[str, str] = {}
    ran: list[str] = []
    for fam in FAMILIES:
        if only and fam.FAMILY not in only:
            continue
        if ctx.device.type not in fam.DEVICES:
            skipped[fam.FAMILY] = f"runs on {', '.join(fam.DEVICES)} only"
            continue
        ran.append(fam.FAMILY)
        peers.update(fam.peers(ctx))
        try:
            rows.extend(fam.run(ctx, ceilings, lambda line: print(line, flush=True)))
        except Exception as exc:  # a family that crashes outside its rows: recorded, the others still run
            rows.append(Row(family=fam.FAMILY, op="?", case="(family)", shape="", mode="", dtype="", impl="(all)",
                            kind="r1kernels", status="error", note=f"{type(exc).__name__}: {exc}"[:400]))
            print(f"{fam.FAMILY}: ERROR {type(exc).__name__}: {exc}", flush=True)
        # The tables so far, after every family: a run stopped at its time limit (the GPU suite's bench step)
        # still leaves the families that finished.
        write_results(args.out, result_dict(ctx, rows, ceilings, families=ran, skipped=skipped, peers=peers,
                                            wall_s=round(time.perf_counter() - t0, 1), partial=True))

    result = result_dict(ctx, rows, ceilings, families=ran, skipped=skipped, peers=peers,
                         wall_s=round(time.perf_counter() - t0, 1))
    js, md = write_results(args.out, result)
    print()
    print(md.read_text())
    print(f"wrote {js} and {md} in {result['wall_s']} s", flush=True)
    bad = [r for r in rows if r.status in ("error", "mismatch")]
    for r in bad:
        print(f"{r.status.upper()}: {r.family} {r.case} {r.mode} {r.impl}: {r.note}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
