"""Generation on the CPU: r1kernels' engine (plain, early-exit and MTP speculative decoding) against
transformers' ``generate`` on the same weights.

The models are the model benchmark's pair (:func:`benchmarks.bench_model.build`: transformers' tiny
DeepseekV3 with seeded random weights, saved and reloaded by r1kernels, logits checked). Each prompt is
``prompt_len`` random tokens; every implementation generates exactly ``new_tokens`` tokens greedily (no stop
token), and r1kernels' output must equal transformers' token for token, else the row is "mismatch".

    tokens/s = batch x new_tokens / wall time of the whole call (prefill included), median of the runs.

The speculative rows also report the acceptance. On random weights the drafters agree with the model
rarely, so these rows show the cost of a round rather than a speedup; ``--fit-steps N`` first trains the
model for N steps with the early-exit and MTP losses on the pipeline's arithmetic traces (a quick fit, so that
drafts are accepted) and then compares plain and speculative decoding of that model on held-out prompts.

    python -m benchmarks.bench_generate [--batch 1,32] [--new-tokens 64] [--fit-steps 0] [--long-context 4096]

``--long-context N`` adds one decode step at N cached tokens for the tiny preset with dense MLA, NSA and DSA
attention (the sparse attention issue's CPU goal).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any, Callable, Optional

import torch

from .bench_model import build, missing_api
from .harness import Context, Row, fill_speedups
from .shapes import ModelShape

FAMILY = "generate"
DEVICES = ("cpu",)

MODES = (None, "early_exit", "mtp")


def peers(ctx: Context) -> dict[str, str]:
    return {}


def hf_generate(hf, ids: torch.Tensor, new_tokens: int) -> list:
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                      min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[:, ids.shape[1]:].tolist()


def timed_runs(fn: Callable[[], Any], budget_s: float, min_runs: int = 3) -> tuple[list[float], Any]:
    """Wall times (s) of repeated calls after one warm-up call, and the last result."""
    result = fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < budget_s:
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 50:
            break
    return times, result


def decode_rows(model, hf, prompts: torch.Tensor, new_tokens: int, budget_s: float, *, num_draft: int = 4,
                exit_layer: Optional[int] = None, label: str = "random weights") -> list[Row]:
    """Rows for plain / early-exit / MTP decoding of ``prompts [B, P]`` and (when ``hf``) transformers'."""
    from r1kernels import generate

    b, p = prompts.shape
    base = dict(family=FAMILY, op="generate", case=f"tiny, {label}", shape=f"batch {b}, prompt {p}, +{new_tokens}",
                mode="greedy", dtype="float32")
    rows = []
    want = None
    if hf is not None:
        times, want = timed_runs(lambda: hf_generate(hf, prompts, new_tokens), budget_s)
        rows.append(Row(**base, impl="transformers generate", kind="torch", ms=statistics.median(times) * 1e3,
                        ms_min=min(times) * 1e3, tokens_per_s=b * new_tokens / statistics.median(times)))
    plain_tokens = None
    # transformers' DeepseekV3 checkpoints hold no MTP module, so the shared-weights model drafts by early exit only
    for mode in [m for m in MODES if m != "mtp" or len(model.mtp)]:
        def call(mode=mode):
            return generate(model, prompts, max_new_tokens=new_tokens, speculative=mode, num_draft=num_draft,
                            exit_layer=exit_layer)

        with torch.inference_mode():
            times, out = timed_runs(call, budget_s)
        med = statistics.median(times)
        row = Row(**base, impl=f"r1kernels {mode or 'plain'}", kind="r1kernels", ms=med * 1e3, ms_min=min(times) * 1e3,
                  tokens_per_s=b * new_tokens / med)
        st = out.stats
        if mode:
            row.note = (f"acceptance {st.acceptance_rate:.2f}, {st.mean_accepted_length:.2f} tokens/round, "
                        f"N={num_draft}" + (f", exit layer {exit_layer or len(model.layers) // 2}" if mode == "early_exit" else ""))
        reference = want if want is not None else plain_tokens
        if reference is not None and out.tokens != reference:
            row.status = "mismatch"
            row.note = (row.note + "; " if row.note else "") + "tokens differ from " + (
                "transformers'" if want is not None else "plain decoding's")
        if mode is None:
            plain_tokens = out.tokens
        rows.append(row)
    fill_speedups(rows)
    return rows


def quick_fit(model, steps: int, *, seed: int = 0, batch: int = 16, log: Callable[[str], None] = print):
    """Train ``model`` in place for ``steps`` AdamW steps on arithmetic traces with the early-exit (layer 1
    and half the layers) and MTP losses; returns (held-out prompts [B, P] as one tensor per length, tokenizer)."""
    from r1kernels.pipeline.tasks import make_dataset
    from r1kernels.pipeline.tokenizer import CharTokenizer
    from r1kernels.training import LossConfig, causal_lm_loss

    tok = CharTokenizer()
    train = make_dataset(["arithmetic"], steps * batch, seed=seed, split="train")
    texts = [tok.encode(s.prompt + s.solution, add_eos=True) for s in train]
    n_layers = len(model.layers)
    cfg = LossConfig(mtp_weight=0.3, exit_layers=tuple(sorted({1, n_layers // 2})), exit_weight=0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        chunk = texts[step * batch:(step + 1) * batch]
        width = max(len(t) for t in chunk)
        ids = torch.tensor([t + [tok.pad_id] * (width - len(t)) for t in chunk])
        labels = torch.tensor([t + [-100] * (width - len(t)) for t in chunk])
        lr = 3e-3 * min(1.0, (step + 1) / 20)
        for g in opt.param_groups:
            g["lr"] = lr
        out = causal_lm_loss(model, ids, labels, cfg)
        opt.zero_grad(set_to_none=True)
        out.total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        model.update_routing_biases()
        if step % 50 == 0 or step == steps - 1:
            log(f"  fit step {step}: " + ", ".join(f"{k} {v.item():.3f}" for k, v in out.parts.items()))
    model.eval()
    log(f"  fitted in {time.perf_counter() - t0:.0f} s")
    test = make_dataset(["arithmetic"], 64, seed=seed, split="test")
    return [tok.encode(s.prompt) for s in test], tok


def long_context_rows(context: int, log: Callable[[str], None] = print, *, steps: int = 16) -> list[Row]:
    """Decode cost per token at ``context`` cached tokens, batch 1, for the tiny preset with dense MLA, NSA and
    DSA attention (random weights, the same seed): prefill ``context`` random tokens, then time ``steps``
    single-token steps (the median step is reported)."""
    from r1kernels import ModelConfig, Transformer

    rows = []
    for preset in ("tiny", "tiny-nsa", "tiny-dsa"):
        torch.manual_seed(0)
        model = Transformer(ModelConfig.preset(preset)).eval()
        cache = model.new_cache(1, context + steps + 2)
        ids = torch.randint(0, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            t0 = time.perf_counter()
            model(ids, cache=cache)
            prefill_s = time.perf_counter() - t0
            x = torch.tensor([[5]])
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                model(x, cache=cache)
                times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        row = Row(family=FAMILY, op="decode step", case=f"{preset}, {context} cached tokens", shape="batch 1",
                  mode="fwd", dtype="float32", impl=f"r1kernels {model.config.attention}", kind="r1kernels",
                  ms=med * 1e3, ms_min=min(times) * 1e3, tokens_per_s=1 / med, note=f"prefill {prefill_s:.1f} s")
        rows.append(row)
        log(f"  {preset:<9} {context} cached: decode {med * 1e3:.2f} ms/token (prefill {prefill_s:.1f} s)")
    dense = rows[0].ms
    for r in rows[1:]:
        r.vs_torch, r.torch_ref = dense / r.ms, "dense MLA decode (tiny)"
    return rows


def run(ctx: Context, ceilings: dict[str, Any], log: Callable[[str], None] = print, *, batches=(1, 32),
        new_tokens: int = 32, prompt_len: int = 16, fit_steps: int = 0) -> list[Row]:
    why = missing_api()
    if why is not None:
        row = Row(family=FAMILY, op="generate", case="tiny", shape="-", mode="greedy", dtype="float32",
                  impl="r1kernels", kind="r1kernels", status="unavailable", note=why)
        return [row]
    pair = build(ModelShape("tiny", 1, prompt_len), ctx.device, ctx.seed)
    model, hf = pair.r1k_model, pair.hf_model
    g = torch.Generator().manual_seed(ctx.seed + 7)
    rows = []
    budget = 3 * ctx.cpu_budget_s
    for b in batches:
        prompts = torch.randint(0, model.config.vocab_size, (b, prompt_len), generator=g)
        rows += decode_rows(model, hf, prompts, new_tokens, budget)
        for r in rows[-3:]:
            log(f"  {r.shape:<28} {r.impl:<26} {r.tokens_per_s:>9,.0f} tok/s  {r.note} {'' if r.status == 'ok' else r.status}")
    if fit_steps > 0:
        log(f"quick fit: {fit_steps} steps with early-exit and MTP losses")
        test_prompts, _ = quick_fit(model, fit_steps, seed=ctx.seed, log=log)
        for b in batches:
            # prompts of one length per batch so transformers needs no padding (same-length held-out prompts)
            by_len: dict = {}
            for p in test_prompts:
                by_len.setdefault(len(p), []).append(p)
            same = max(by_len.values(), key=len)
            batch = torch.tensor((same * ((b + len(same) - 1) // len(same)))[:b])
            for exit_layer in (1,):
                rows += decode_rows(model, None, batch, new_tokens, budget, exit_layer=exit_layer,
                                    label=f"fitted {fit_steps} steps")
                for r in rows[-3:]:
                    log(f"  {r.shape:<28} {r.impl:<26} {r.tokens_per_s:>9,.0f} tok/s  {r.note} "
                        f"{'' if r.status == 'ok' else r.status}")
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_generate", description=__doc__.split("\n")[0])
    p.add_argument("--batch", default="1,32", help="comma-separated batch sizes (default 1,32)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--fit-steps", type=int, default=0, help="quick-fit steps before the speculative rows (default 0)")
    p.add_argument("--budget-s", type=float, default=0.6, help="timed wall time per row (default 0.6)")
    p.add_argument("--long-context", type=int, default=0,
                   help="also time one decode step at this context for dense / NSA / DSA attention (e.g. 4096)")
    args = p.parse_args(argv)
    from .harness import make_context

    ctx = make_context("cpu", "cpu")
    ctx.cpu_budget_s = args.budget_s / 3
    torch.manual_seed(0)
    rows = run(ctx, {}, batches=tuple(int(x) for x in args.batch.split(",")), new_tokens=args.new_tokens,
               prompt_len=args.prompt_len, fit_steps=args.fit_steps)
    if args.long_context:
        rows += long_context_rows(args.long_context)
    return 0 if all(r.status == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
