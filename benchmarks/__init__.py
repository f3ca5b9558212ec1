"""r1kernels' microbenchmarks: one harness (``harness``), one registry of DeepSeek-V3 shapes (``shapes``)
and one module per kernel family (``bench_*``). Run ``python -m benchmarks.run --out DIR``; see RESULTS.md."""
