#!/usr/bin/env bash
# The GPU device suite (DESIGN "The GPU device suite"): on a machine with a CUDA GPU, build the extension in
# place, record the environment and `r1k info`, run the GPU tests, run the GPU benchmarks, then the rest of
# the test suite while time is left; everything in under 8 minutes, every log in OUTDIR.
#
#     bash scripts/gpu_suite.sh OUTDIR
#
# It uses the machine's python3 (PYTHON overrides) and installs nothing: GPU access is short and the GPU
# machines have no network. Each step runs under `timeout` and a failing step does not stop the next ones;
# OUTDIR/summary.txt lists each step's exit code (124: stopped at its time limit) and seconds. The script
# exits 0 only when every step that ran did (the last step, the rest of the tests, is skipped when no time
# is left). R1K_SUITE_SECONDS changes the budget (default 560).
#
# Files written (eight, the most a device call brings back): summary.txt, info.txt (environment and
# `r1k info`), build.log, test_gpu.log, bench.log, bench.json, bench.md, test_rest.log.
set -u

PY=${PYTHON:-python3}

# The environment: read-only queries only (METHOD: leave the card's settings alone).
environment() {
    echo "--- nvidia-smi"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,clocks.max.sm,temperature.gpu,power.draw \
        --format=csv 2>&1 || echo "nvidia-smi failed"
    echo "--- nvcc"
    nvcc --version 2>&1 | tail -n 2 || echo "nvcc not found"
    echo "--- cmake"
    cmake --version 2>&1 | head -n 1 || echo "cmake not found"
    echo "--- python packages"
    "$PY" - <<'EOF'
import importlib.metadata as md
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs", round(p.total_memory / 1e9, 1), "GB")
for name in ("triton", "transformers", "pybind11", "pytest", "safetensors", "liger-kernel", "fla-core"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "absent")
EOF
    echo "--- r1k info"
    "$PY" -m r1kernels.cli info
}

# The suite runs the environment step as its own process so that `timeout` can bound it.
if [ "${1:-}" = "--environment" ]; then
    environment
    exit $?
fi

if [ $# -ne 1 ]; then
    echo "usage: bash scripts/gpu_suite.sh OUTDIR" >&2
    exit 2
fi
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)

TOTAL_S=${R1K_SUITE_SECONDS:-560}  # the whole suite's budget: under the 600 s call limit, less the kill grace and a margin
START=$SECONDS
SUMMARY=$OUT/summary.txt
FAILED=0

# Python flushes its output line by line, so a step stopped by `timeout` still leaves its log.
export PYTHONUNBUFFERED=1
# The H200 is sm_90a; demand the CUDA part so a missing nvcc fails the build step instead of quietly
# building CPU-only kernels (both knobs are setup.py's; the caller's values win).
export R1K_CUDA_ARCHS=${R1K_CUDA_ARCHS:-90a}
export R1K_REQUIRE_CUDA=${R1K_REQUIRE_CUDA:-1}

: >"$SUMMARY"
{
    echo "r1kernels GPU device suite"
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "repo: $ROOT"
    echo "commit: $(git -C "$ROOT" rev-parse --verify -q HEAD 2>/dev/null || echo 'unknown (no git or no commit)')"
    echo "python: $(command -v "$PY") ($("$PY" --version 2>&1))"
    echo "budget: ${TOTAL_S} s"
    echo
    printf '%-10s %-5s %-7s %-7s %s\n' step rc seconds limit log
} >>"$SUMMARY"

# step NAME LIMIT_S RESERVE_S LOG CMD...: run CMD with its output in LOG for at most LIMIT_S seconds, and
# never into the last RESERVE_S seconds of the budget (kept for the steps after it); record the exit code.
step() {
    local name=$1 limit=$2 reserve=$3 log=$4
    shift 4
    local left=$((TOTAL_S - (SECONDS - START) - reserve))
    if [ "$left" -lt 20 ]; then
        # only the last, optional step can get here: the reserves keep time for the ones before it
        printf '%-10s %-5s %-7s %-7s %s\n' "$name" skip 0 0 "(suite budget spent)" >>"$SUMMARY"
        return 0
    fi
    if [ "$limit" -gt "$left" ]; then
        limit=$left
    fi
    local t0=$SECONDS
    echo "== $name (limit ${limit} s): $*" | tee "$OUT/$log"
    timeout -k 10 "$limit" "$@" >>"$OUT/$log" 2>&1
    local rc=$?
    local took=$((SECONDS - t0))
    echo "== $name: rc=$rc after ${took} s" | tee -a "$OUT/$log"
    printf '%-10s %-5s %-7s %-7s %s\n' "$name" "$rc" "$took" "$limit" "$log" >>"$SUMMARY"
    if [ "$rc" -ne 0 ]; then
        FAILED=1
    fi
    return 0
}

# Limits and reserves: the build may take what the benchmarks and GPU tests leave (a pybind11 sm_90a module
# built in 10 s on the H200; CUDA templates take longer); the benchmarks need about 2 minutes, of which the
# MoE family is estimated at 15-30 s plus its Triton compilations (benchmarks/bench_moe.py: 22.5 GB of V3
# expert weights, slow calls run about 8 times by do_bench) and the MLA family at about 30 s with its
# compilations (benchmarks/bench_mla.py: 12 decode and 4 prefill cases); the sparse family adds about a minute
# with its compilations, and the sampling / loss families tens of seconds each (their authors' estimates; the
# GPU tests of sampling alone compile ~50 kernel variants, hence the longer test_gpu step). With a 30 s build
# the GPU tests get their 180 s and the benchmarks their 300 s; test_rest takes what is left. benchmarks.run
# rewrites bench.json / bench.md
# after every family, so a bench step stopped at its limit still leaves the tables of the families that
# finished.
step build 200 380 build.log "$PY" setup.py build_ext --inplace
step info 45 360 info.txt bash "$ROOT/scripts/gpu_suite.sh" --environment
# -v: one line per test as it finishes, so a run cut by its time limit still says what passed
step test_gpu 180 180 test_gpu.log "$PY" -m pytest python_tests -m gpu -v -rfEs -p no:cacheprovider
step bench 300 0 bench.log "$PY" -m benchmarks.run --device cuda --out "$OUT"
# The rest of the suite (the GPU tests already ran) with whatever time is left.
step test_rest 600 0 test_rest.log "$PY" -m pytest python_tests -m "not gpu" -q -rfE -p no:cacheprovider

{
    echo
    echo "total: $((SECONDS - START)) s; $([ "$FAILED" -eq 0 ] && echo 'every step passed' || echo 'some steps failed or were skipped')"
} >>"$SUMMARY"

# The table first and the summary last: a caller that keeps only the end of the output sees the summary.
if [ -f "$OUT/bench.md" ]; then
    cat "$OUT/bench.md"
fi
echo
cat "$SUMMARY"
exit "$FAILED"
