"""The benchmark suite on the CPU: the shape registry, the harness's pieces, and one smoke run of
``python -m benchmarks.run`` with the smallest shapes (the whole CLI, as the GPU suite calls it)."""
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `benchmarks` is a folder of the repository, not an installed package

from benchmarks import bench_mla, bench_moe, bench_norm, bench_rope, harness, shapes  # noqa: E402


def test_v3_dims_match_transformers_defaults():
    # transformers' DeepseekV3Config() defaults are DeepSeek-V3's config: a check of the registry by code
    # nobody here wrote.
    transformers = pytest.importorskip("transformers")
    hf = transformers.DeepseekV3Config()
    v3 = shapes.V3
    pairs = {
        "hidden_size": v3.hidden, "q_lora_rank": v3.q_lora_rank, "kv_lora_rank": v3.kv_lora_rank,
        "qk_rope_head_dim": v3.qk_rope_head_dim, "qk_nope_head_dim": v3.qk_nope_head_dim,
        "v_head_dim": v3.v_head_dim, "num_attention_heads": v3.heads, "vocab_size": v3.vocab,
        "moe_intermediate_size": v3.moe_inter, "intermediate_size": v3.dense_inter,
        "n_routed_experts": v3.experts, "n_shared_experts": v3.shared_experts,
        "num_experts_per_tok": v3.top_k, "n_group": v3.n_group, "topk_group": v3.topk_group,
        "num_hidden_layers": v3.layers, "first_k_dense_replace": v3.first_k_dense, "rms_norm_eps": v3.rms_norm_eps,
    }
    for key, ours in pairs.items():
        assert getattr(hf, key) == ours, key


def test_shape_sets_cover_the_model_tensors():
    v3 = shapes.shape_set("v3")
    assert [t for _, t in v3.tokens] == [128, 4096, 8192]
    norms = {(n.where, n.dim, n.row_stride) for n in shapes.norm_shapes(v3)}
    assert norms == {("hidden", 7168, 7168), ("q_a", 1536, 1536), ("kv_a", 512, 576)}
    ropes = {(r.where, r.heads, r.dim, r.parent_dim, r.offset) for r in shapes.rope_shapes(v3)}
    assert ropes == {("q_pe", 128, 64, 192, 128), ("k_pe", 1, 64, 576, 512)}


def test_moe_shapes_match_the_model_configs():
    # the MoE registry against r1kernels' presets (V3's against transformers' defaults above)
    import r1kernels

    for dims, preset in ((shapes.V3_MOE, "v3"), (shapes.V2_LITE_MOE, "v2-lite"), (shapes.TINY_MOE, "tiny")):
        cfg = r1kernels.ModelConfig.preset(preset)
        assert (dims.hidden, dims.inter, dims.experts, dims.top_k) == (
            cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts, cfg.num_experts_per_tok), preset
        assert (dims.n_group, dims.topk_group) == tuple(cfg.routing_groups), preset
        assert (dims.score_func, dims.group_score, dims.norm_topk_prob) == (
            cfg.scoring_func, cfg.group_score, cfg.norm_topk_prob), preset
        assert dims.routed_scaling_factor == cfg.routed_scaling_factor, preset
    v3 = shapes.shape_set("v3")
    assert [g.tokens for g in shapes.moe_gate_shapes(v3)] == [1, 128, 4096, 16384]
    layers = {(m.dims.name, m.tokens) for m in shapes.moe_layer_shapes(v3)}
    assert layers == {("v3", 128), ("v3", 4096), ("v2-lite", 128), ("v2-lite", 4096)}
    assert {m.dims.name for m in shapes.moe_layer_shapes(shapes.shape_set("cpu"))} == {"tiny"}


def test_formulas():
    # [4096, 7168] bf16 with a bf16 weight: 2 N D 2 + 2 D bytes forward, 5 N D 2 + 3 D 2 forward+backward
    n, d = 4096, 7168
    assert bench_norm.norm_bytes(n, d, 2, 2, "fwd") == 2 * n * d * 2 + d * 2
    assert bench_norm.norm_bytes(n, d, 2, 2, "fwd+bwd") == 5 * n * d * 2 + 3 * d * 2
    assert bench_norm.norm_flops(n, d, "fwd") == 4 * n * d
    # q_pe [4096, 128, 64] bf16, fp32 cos / sin [4096, 32]
    assert bench_rope.rope_bytes(4096, 128, 64, 2, "fwd") == 2 * 4096 * 128 * 64 * 2 + 2 * 4096 * 32 * 4
    assert bench_rope.rope_bytes(4096, 128, 64, 2, "fwd+bwd") == 2 * bench_rope.rope_bytes(4096, 128, 64, 2, "fwd")
    assert bench_rope.rope_flops(4096, 128, 64, "fwd") == 3 * 4096 * 128 * 64
    # the V3 MoE layer at T=4096, bf16, every expert touched: 6 S I D FLOP; DESIGN's 22.5 GB / 5.3 ms floor
    v3 = shapes.V3_MOE
    s = 4096 * 8
    assert bench_moe.layer_flops(4096, v3, "fwd") == 6 * s * 2048 * 7168
    assert bench_moe.layer_flops(4096, v3, "fwd+bwd") == 18 * s * 2048 * 7168
    w_all = 256 * 3 * 2048 * 7168 * 2
    assert bench_moe.layer_weight_bytes(256, v3, 2, "fwd") == w_all
    assert w_all / 4225 / 1e6 == pytest.approx(5.33, abs=0.01)  # ms at the H200's copy ceiling
    assert bench_moe.layer_weight_bytes(10, v3, 2, "fwd+bwd") == 2 * 10 * 3 * 2048 * 7168 * 2 + w_all
    assert bench_moe.layer_bytes(4096, 256, v3, 2, "fwd") == w_all + 2 * 4096 * 7168 * 2 + 8 * 4096 * 8
    assert bench_moe.layer_bytes(4096, 256, v3, 2, "fwd+bwd") == 3 * w_all + 4 * 4096 * 7168 * 2 + 12 * 4096 * 8
    assert bench_moe.gate_bytes(4096, 256, 8) == 4 * 4096 * 256 + 4 * 256 + 8 * 4096 * 8


def test_do_bench_kwargs_old_and_new_triton():
    def new(fn, warmup=25, rep=100, grad_to_none=None, quantiles=None, return_mode="mean"):  # triton >= 3.2
        pass

    def old(fn, warmup=25, rep=100, grad_to_none=None, quantiles=None, fast_flush=True, return_mode="mean"):
        pass

    assert harness.do_bench_kwargs(new) == {"warmup": 25, "rep": 100, "return_mode": "median"}
    assert harness.do_bench_kwargs(old) == {"warmup": 25, "rep": 100, "return_mode": "median", "fast_flush": True}
    # whatever triton is installed here accepts what the harness passes
    tt = pytest.importorskip("triton.testing")
    inspect.signature(tt.do_bench).bind(lambda: None, **harness.do_bench_kwargs(tt.do_bench))


def test_torch_baselines_match_the_reference():
    # fp32 throughout: the baselines, like the reference, compute in fp32 (x.float())
    import r1kernels

    x = torch.randn(5, 3, 64)
    cos, sin = torch.rand(5, 32), torch.rand(5, 32)
    want = r1kernels.reference.apply_rope(x, cos, sin, interleaved=True)
    torch.testing.assert_close(bench_rope.torch_real(x, cos, sin), want)
    torch.testing.assert_close(bench_rope.torch_complex(x, torch.complex(cos, sin)), want)
    h, w = torch.randn(7, 33), torch.randn(33)
    torch.testing.assert_close(bench_norm.torch_formula(h, w, 1e-6), r1kernels.reference.rms_norm(h, w, 1e-6))
    # the MoE baselines (shared/baselines/torch_baselines.py) compute what the references compute
    d = shapes.TINY_MOE
    logits, bias = torch.randn(9, d.experts), torch.randn(d.experts) * 0.1
    assert not bench_moe.tied_rows(logits, bias, d).any()
    got_w, got_ids = bench_moe.torch_route(logits, bias, d)
    want_w, want_ids = r1kernels.reference.moe_route(
        logits, bias, top_k=d.top_k, n_group=d.n_group, topk_group=d.topk_group,
        routed_scaling_factor=d.routed_scaling_factor)
    assert torch.equal(got_ids.int(), want_ids)
    torch.testing.assert_close(got_w, want_w)
    x, w13, w2 = torch.randn(9, d.hidden), torch.randn(d.experts, 2 * d.inter, d.hidden) * 0.05, torch.randn(
        d.experts, d.hidden, d.inter) * 0.05
    want = r1kernels.reference.moe_experts(x, w13, w2, want_w, want_ids)
    torch.testing.assert_close(bench_moe.torch_loop(x, w13, w2, want_w, want_ids.long()), want)
    torch.testing.assert_close(bench_moe.torch_grouped(x, w13, w2, want_w, want_ids.long()), want)
    tie = torch.zeros(1, d.experts)  # every score equal: a tied row
    assert bench_moe.tied_rows(tie, torch.zeros(d.experts), d).all()


def test_run_case_records_unavailable_errors_and_mismatches():
    import r1kernels

    ctx = harness.make_context("cpu", "smoke")
    ctx.cpu_budget_s, ctx.cpu_min_runs = 0.0, 3
    x = torch.randn(64, 64)

    def unavailable():
        raise r1kernels.BackendUnavailable("no such backend here")

    case = harness.Case(
        family="t", op="scale", label="s", shape="[64, 64]", mode="fwd", dtype=torch.float32, flops=64 * 64,
        nbytes=2 * 64 * 64 * 4,
        impls=[
            harness.Impl("torch", "torch", lambda: x * 2),
            harness.Impl("good", "r1kernels", lambda: x + x),
            harness.Impl("wrong", "r1kernels", lambda: x * 2.1),
            harness.Impl("gone", "r1kernels", unavailable),
            harness.Impl("crash", "r1kernels", lambda: 1 / 0),
            harness.Impl("absent", "peer", why_not="not installed"),
        ],
    )
    rows = {r.impl: r for r in harness.run_case(ctx, case, {"copy_GBps": 10.0, "matmul_TFLOPs": 1.0})}
    assert rows["torch"].status == "ok" and rows["torch"].vs_torch == 1.0
    assert rows["good"].status == "ok" and rows["good"].rel_err == 0.0 and rows["good"].ms > 0
    assert rows["good"].GBps == pytest.approx(case.nbytes / rows["good"].ms / 1e6)
    assert rows["good"].frac_copy == pytest.approx(rows["good"].GBps / 10.0)
    assert rows["wrong"].status == "mismatch" and rows["wrong"].ms > 0
    assert rows["gone"].status == "unavailable" and "no such backend" in rows["gone"].note
    assert rows["crash"].status == "error" and "ZeroDivisionError" in rows["crash"].note
    assert rows["absent"].status == "unavailable" and rows["absent"].ms is None


def test_git_state_without_git(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no git on the PATH: the field says so, nothing raises
    assert harness.git_state()["commit"].startswith("unknown")


def test_cli_smoke(tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "benchmarks.run", "--device", "cpu", "--shapes", "smoke", "--cpu-budget-ms", "5",
           "--only", "norm,rope,moe,mla,model", "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "bench.json").read_text())
    md = (out / "bench.md").read_text()

    assert result["device"]["type"] == "cpu" and result["shape_set"] == "smoke"
    assert result["ceilings"]["copy_GBps"] > 0 and result["ceilings"]["matmul_TFLOPs"] > 0
    assert set(result["versions"]) >= {"python", "torch", "triton", "r1kernels"}
    assert "commit" in result["git"]
    rows = result["rows"]
    smoke = shapes.shape_set("smoke")
    want = {("norm", n.label, m) for n in shapes.norm_shapes(smoke) for m in ("fwd", "fwd+bwd")}
    want |= {("rope", r.label, m) for r in shapes.rope_shapes(smoke) for m in ("fwd", "fwd+bwd")}
    want |= {("moe", g.label, "fwd") for g in shapes.moe_gate_shapes(smoke)}
    want |= {("moe", m.label, p) for m in shapes.moe_layer_shapes(smoke) for p in ("fwd", "fwd+bwd")}
    want |= {("mla", d.label, "fwd") for d in shapes.mla_decode_shapes(smoke)}
    want |= {("mla", p.label, m) for p in shapes.mla_prefill_shapes(smoke) for m in ("fwd", "fwd+bwd")}
    want |= {("mla", shapes.mla_generate_shape(smoke).label, "fwd")}
    want |= {("model", "tiny model", "fwd")}
    assert {(r["family"], r["case"], r["mode"]) for r in rows} == want
    for r in rows:
        assert r["status"] in ("ok", "unavailable"), r
        if r["status"] == "ok":
            assert r["ms"] > 0, r
        if r["kind"] == "torch" or r["impl"] == "reference":  # these always run on the CPU
            assert r["status"] == "ok", r
    impls = {r["impl"] for r in rows if r["family"] == "norm"}
    assert {"torch formula", "cpu", "reference"} <= impls
    layer = [r for r in rows if r["op"] == "moe_experts"]
    assert {r["impl"] for r in layer} == {"torch loop", "torch _grouped_mm", "triton", "cuda", "cpu", "reference"}
    for r in layer:
        assert r["floor_ms"] > 0, r
        if r["impl"] in ("torch _grouped_mm", "cpu"):  # fp32 tiny-preset experts: both run on this CPU
            assert r["status"] == "ok", r
    gate_impls = {r["impl"] for r in rows if r["op"] == "moe_route"}
    assert gate_impls == {"torch formula", "triton", "cuda", "cpu", "reference"}
    mla = {r["impl"] for r in rows if r["family"] == "mla"}
    assert {"torch bmm", "torch sdpa (mqa)", "torch sdpa", "reference", "latent cache", "expanded cache"} <= mla
    for header in ("## norm", "## rope", "## moe", "## mla", "## model", "| case |", "GB/s", "× torch", "floor ms",
                   "cache B/tok"):
        assert header in md


def test_mla_shapes_and_formulas():
    v3 = shapes.shape_set("v3")
    dec = shapes.mla_decode_shapes(v3)
    # FlashMLA's grid: b=128, s 4096 / 8192 / 16384, h 16 / 128, Sq 1 / 2, C=576, Dv=512, pages of 64
    assert {(d.batch, d.seqlen, d.heads, d.sq) for d in dec} == {
        (128, s, h, sq) for s in (4096, 8192, 16384) for h in (16, 128) for sq in (1, 2)}
    assert {(d.latent, d.dv, d.page) for d in dec} == {(576, 512, 64)}
    pre = shapes.mla_prefill_shapes(v3)
    assert [(p.seqlen, p.heads, p.dqk, p.dv) for p in pre] == [(1024, 128, 192, 128), (8192, 128, 192, 128)]
    # the anchor case: 2 b sq h s (C + Dv) FLOP; its bmm baseline, 0.9831 ms, is 148.5 TFLOP/s
    # (shared/baselines/h200-torch-2026-11-29.json)
    anchor = next(d for d in dec if (d.seqlen, d.heads, d.sq) == (4096, 128, 1))
    assert bench_mla.decode_flops(anchor) == 2 * 128 * 1 * 128 * 4096 * (576 + 512)
    assert bench_mla.decode_flops(anchor) / 0.9831 / 1e9 == pytest.approx(148.5, abs=0.1)
    cache, q, out = 128 * 4096 * 576 * 2, 128 * 128 * 576 * 2, 128 * 128 * 512 * 2
    assert bench_mla.decode_bytes(anchor, 2) == cache + q + out + 4 * 128 * 64 + 4 * 128
    # prefill at S=8192: the causal half; the anchor's SDPA, 4.8557 ms forward and 20.2986 ms forward+backward,
    # is 566.1 and 474.0 TFLOP/s (same file)
    p8k = pre[1]
    fwd = 2 * 128 * 8192 * 8192 * (192 + 128) / 2
    assert bench_mla.prefill_flops(p8k, "fwd") == fwd
    assert fwd / 4.8557 / 1e9 == pytest.approx(566.1, abs=0.1)
    assert bench_mla.prefill_flops(p8k, "fwd+bwd") == 3.5 * fwd
    assert 3.5 * fwd / 20.2986 / 1e9 == pytest.approx(474.0, abs=0.1)
    t = 8192 * 128
    assert bench_mla.prefill_bytes(p8k, 2, "fwd") == t * 2 * (2 * 192 + 2 * 128)
    assert bench_mla.prefill_bytes(p8k, 2, "fwd+bwd") == 6 * t * 2 * (192 + 128) + 8 * t
    # the cache sizes of the generation goal: tiny caches L + R = 80 floats per layer, expanded H (Dqk + Dv)
    import r1kernels

    tiny = r1kernels.ModelConfig.preset("tiny")
    assert bench_mla.latent_bytes_per_token(tiny, 4) == tiny.num_hidden_layers * 80 * 4
    assert bench_mla.ExpandedKVCache.bytes_per_token(tiny, 4) == tiny.num_hidden_layers * 8 * (48 + 32) * 4  # 8 heads
    assert bench_mla.v3_cache_ratio() == pytest.approx(128 * 320 / 576)


def test_mla_torch_baselines_match_the_reference():
    # the decode baselines (bmm over the gathered cache; SDPA as MQA) with the causal rule of Sq > 1, and the
    # paged cache's contiguous copy, against r1kernels.reference.mla_decode on the paged layout
    import r1kernels

    ctx = harness.make_context("cpu", "smoke")
    b, s, h, sq, c, dv = 3, 100, 4, 2, 72, 64  # s: one full page of 64 and part of a second
    cache = bench_mla.make_paged_cache(ctx, b, s, c, 64)
    assert sorted(cache.block_table.flatten().tolist()) == list(range(b * 2))
    q = ctx.randn(b, sq, h, c)
    want, _ = r1kernels.reference.mla_decode(q, cache.kv, cache.block_table, cache.seqlens, softmax_scale=0.1,
                                             causal=True, head_dim_v=dv)
    mask = bench_mla.decode_mask(s, sq, ctx.device)
    assert mask[0, -1].item() is False and mask[1].all()
    torch.testing.assert_close(bench_mla.torch_bmm_decode(q, cache.contiguous, 0.1, dv, mask), want)
    got = bench_mla.torch_sdpa_decode(q, cache.contiguous, 0.1, dv, mask.repeat_interleave(h, dim=0))
    torch.testing.assert_close(got, want)


def test_mla_family_smoke():
    # every case of the smoke set runs its torch baselines and the reference backend, which agree; the
    # backends that are not there are recorded as unavailable, never as errors
    ctx = harness.make_context("cpu", "smoke")
    ctx.cpu_budget_s, ctx.cpu_min_runs, ctx.cpu_warmup = 0.0, 1, 0
    rows = harness.run_cases(ctx, bench_mla.cases(ctx), {"copy_GBps": 10.0, "matmul_TFLOPs": 1.0}, log=lambda _: None)
    smoke = shapes.shape_set("smoke")
    want = {("mla_decode", d.label, "fwd") for d in shapes.mla_decode_shapes(smoke)}
    want |= {("mla_attention", p.label, m) for p in shapes.mla_prefill_shapes(smoke) for m in ("fwd", "fwd+bwd")}
    assert {(r.op, r.case, r.mode) for r in rows} == want
    for r in rows:
        assert r.status in ("ok", "unavailable"), (r.case, r.impl, r.status, r.note)
        if r.kind == "torch" or r.impl == "reference":
            assert r.status == "ok" and r.ms > 0 and r.TFLOPs > 0 and r.GBps > 0, r
    impls = {r.impl for r in rows if r.op == "mla_decode"}
    assert impls == {"torch bmm", "torch sdpa (mqa)", "triton", "cuda", "cpu", "reference"}
    assert {r.impl for r in rows if r.op == "mla_attention"} == {"torch sdpa", "triton", "cuda", "cpu", "reference"}


def test_mla_expanded_cache_generation_matches_the_latent_cache():
    # the model-decode baseline: the expanded per-head cache gives the latent cache's logits (teacher-forced),
    # also for a multi-token step after cached tokens (the masked SDPA branch), and the model's own
    # cache-free forward's; the rows carry tokens/s and the cache sizes
    import r1kernels

    shape = shapes.mla_generate_shape(shapes.shape_set("smoke"))
    setup = bench_mla.build_generation(shape)
    assert setup.max_abs_diff <= bench_mla.MODEL_ATOL
    model, prompt = setup.model, setup.prompt
    ids = torch.cat([prompt, torch.randint(0, model.config.vocab_size, (shape.batch, 5))], dim=1)
    with torch.no_grad():
        full = model(ids)  # the expanded MLA over the whole sequence, no cache
        cache = bench_mla.ExpandedKVCache(model.config, shape.batch, ids.shape[1], torch.float32, torch.device("cpu"))
        steps = torch.cat([bench_mla.expanded_forward(model, ids[:, :3], cache),
                           bench_mla.expanded_forward(model, ids[:, 3:7], cache),  # 4 tokens after 3 cached
                           bench_mla.expanded_forward(model, ids[:, 7:], cache)], dim=1)
    assert cache.length == ids.shape[1]
    torch.testing.assert_close(steps, full, rtol=0, atol=bench_mla.MODEL_ATOL)
    assert bench_mla.generate(setup.expanded, prompt, shape.new).shape == (shape.batch, shape.new)

    ctx = harness.make_context("cpu", "smoke")
    ctx.cpu_budget_s, ctx.cpu_min_runs, ctx.cpu_warmup = 0.0, 1, 0
    rows = bench_mla.generation_rows(ctx, log=lambda _: None)
    assert [(r.op, r.impl) for r in rows] == [("model-decode", "latent cache"), ("model-decode", "expanded cache")]
    cfg = r1kernels.ModelConfig.preset("tiny")
    for r in rows:
        assert r.status == "ok" and r.ms > 0 and r.tokens_per_s > 0, r
    assert rows[0].cache_bytes_per_token == bench_mla.latent_bytes_per_token(cfg, 4)
    assert rows[1].cache_bytes_per_token == 8 * rows[0].cache_bytes_per_token  # tiny: H (Dqk + Dv) = 8 (L + R)
    assert rows[0].max_abs_diff <= bench_mla.MODEL_ATOL and rows[0].vs_torch > 0
