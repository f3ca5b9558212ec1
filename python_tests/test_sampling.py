"""Sampling: the Triton kernels (interpreter here, GPU on the device suite) against the reference.

* kept sets: the Triton search finds exactly the reference's filtered set (ties, -inf, per-row parameters,
  odd V, the short-row and the long-row / candidate paths);
* sample: chi-square of 20,000 seeded draws against ``filtered_probs``, reproducibility per (seed, row);
* speculative_verify: the emitted tokens follow the target distribution and the accept counts their exact
  law (chi-square), greedy verification is exact, padding; a deliberately broken rule fails the same check.

Letters: B rows, V vocabulary, N drafts. Chi-square p-values use a fixed threshold of 1e-3 and fixed seeds,
so each check is deterministic (no reruns).
"""

import pytest
import torch

import r1kernels
from r1kernels.ops import sampling as ops  # the family's module (r1kernels.ops re-exports its functions)
from r1kernels.reference import sampling as ref

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
P_MIN = 1e-3  # chi-square p-value threshold
DRAWS = 20_000
BACKENDS = ["reference", "triton"]


def _triton():
    from r1kernels.triton import sampling as tsampling

    return tsampling


def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square p-value of ``counts`` against ``probs`` (categories of probability 0 must be
    empty; they are asserted so and left out of the statistic)."""
    counts, probs = counts.double().cpu(), probs.double().cpu()
    assert counts[probs == 0].sum() == 0, f"draws in zero-probability categories: {counts[probs == 0].tolist()}"
    keep = probs > 0
    n = counts.sum()
    expected = probs[keep] / probs[keep].sum() * n
    stat = ((counts[keep] - expected) ** 2 / expected).sum()
    df = int(keep.sum()) - 1
    if df == 0:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), stat / 2.0))


# ----------------------------------------------------------------------------------------------------
# Kept sets


def _rows(v: int, seed: int) -> torch.Tensor:
    """[8, V] logits with the awkward cases: plain, coarse ties, some -inf, all equal, one finite token,
    all -inf, a greedy row, a peaked row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, v, generator=g) * 2
    x[1] = (x[1] * 2).round() / 2  # many exact ties
    x[2, torch.rand(v, generator=g) < 0.4] = float("-inf")
    x[3] = 0.25
    x[4] = float("-inf")
    x[4, v // 2] = 1.0
    x[5] = float("-inf")
    x[7] = torch.randn(v, generator=g) * 8
    return x


def _row_params(v: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    b = 8
    pick = lambda options: torch.tensor(options)[torch.randint(len(options), (b,), generator=g)]  # noqa: E731
    return dict(
        temperature=torch.tensor([0.7, 1.0, 1.3, 1.0, 0.9, 1.0, 0.0, 0.5]),
        top_k=pick([0, 1, 2, max(1, v // 3), v, v + 3]),
        top_p=pick([1.0, 0.95, 0.8, 0.5, 0.3, 0.0]),
        min_p=pick([0.0, 0.0, 0.02, 0.2]),
    )


def _off_boundaries(x: torch.Tensor, params: dict) -> dict:
    """Move each row's top_p and min_p off the values where the reference's kept set changes within 1e-4.

    At such a boundary the kept set depends on the last bit of an fp32 sum (top-p) or exp (min-p), which
    the kernel and torch round differently; away from it (by far more than fp32 rounding) the set is exact.
    """
    p = dict(params)
    for name in ("top_p", "min_p"):
        val = p[name].clone().float()
        for _ in range(50):
            lo = ref.filtered_probs(x, **{**p, name: val - 1e-4}) > 0
            hi = ref.filtered_probs(x, **{**p, name: val + 1e-4}) > 0
            moving = (lo != hi).any(dim=1) & (val > 0) & (val < 1)
            if not moving.any():
                break
            val = torch.where(moving, val + 3e-4, val)
        p[name] = val
    return p


def _to(params: dict, dev) -> dict:
    return {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in params.items()}


# (V, block_v): block_v None is the short-row path (one chunk per row); a small block_v forces the
# long-row path (chunked passes, candidates copied once they fit in block_v).
KEPT_CASES = [(1, None), (3, None), (17, None), (17, 16), (1000, None), (1000, 128), (4099, None), (4099, 1024)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("v,block_v", KEPT_CASES)
def test_kept_set_matches_reference_per_row_params(v, block_v, dtype):
    x = _rows(v, seed=v).to(dtype)
    params = _off_boundaries(x, _row_params(v, seed=v + 1))
    want = ref.filtered_probs(x, **params) > 0
    got = _triton().filter_mask(x.to(DEV), **_to(params, DEV), block_v=block_v).cpu()
    assert torch.equal(got, want), f"rows differ: {(got != want).any(dim=1).nonzero().flatten().tolist()}"


@pytest.mark.parametrize("v,block_v", [(17, None), (1000, None), (1000, 128)])
@pytest.mark.parametrize("params", [
    dict(temperature=1.0),
    dict(temperature=0.8, top_k=5),
    dict(temperature=1.2, top_p=0.6),
    dict(temperature=0.9, min_p=0.1),
    dict(temperature=1.0, top_k=50, top_p=0.9, min_p=0.05),
    dict(temperature=0.0, top_k=5, top_p=0.5),
], ids=["plain", "topk", "topp", "minp", "all", "greedy"])
def test_kept_set_matches_reference_scalar_params(params, v, block_v):
    x = _rows(v, seed=3 * v)
    full = {**dict(top_k=0, top_p=1.0, min_p=0.0), **params}
    rowwise = _off_boundaries(x, {k: torch.full((8,), float(val)) for k, val in full.items()})
    # the nudged per-row values differ only where a boundary was hit; scalars keep the first row's
    scalars = {k: (int(val[0]) if k == "top_k" else float(val[0])) for k, val in rowwise.items()}
    want = ref.filtered_probs(x, **scalars) > 0
    got = _triton().filter_mask(x.to(DEV), **scalars, block_v=block_v).cpu()
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_is_lowest_index_argmax(backend):
    x = torch.tensor([[1.0, 3.0, 3.0, -1.0], [float("-inf")] * 4, [2.0, 2.0, 2.0, 2.0], [0.0, -0.0, -1.0, -0.0]])
    tok = ops.sample(x.to(DEV), temperature=0.0, top_k=2, top_p=0.1, seed=0, backend=backend)
    assert tok.cpu().tolist() == [1, 0, 0, 0]
    probs = ops.filtered_probs(x, temperature=torch.zeros(4))
    assert torch.equal(probs.argmax(dim=1), torch.tensor([1, 0, 0, 0])) and torch.equal(probs.sum(1), torch.ones(4))


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_inf_row_draws_minus_one(backend):
    x = torch.full((2, 5), float("-inf"))
    x[1, 3] = 0.0
    tok = ops.sample(x.to(DEV), temperature=1.0, top_p=0.5, seed=3, backend=backend)
    assert tok.cpu().tolist() == [-1, 3]
    assert torch.equal(ops.filtered_probs(x, temperature=1.0)[0], torch.zeros(5))


# ----------------------------------------------------------------------------------------------------
# sample: distribution and reproducibility

FREQ_SETTINGS = {
    "plain": dict(temperature=1.0),
    "topk_topp": dict(temperature=0.7, top_k=6, top_p=0.85),
    "topp_minp_ties": dict(temperature=1.3, top_p=0.7, min_p=0.1),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("setting", list(FREQ_SETTINGS))
def test_sample_frequencies_chi_square(setting, backend):
    g = torch.Generator().manual_seed(11)
    row = torch.randn(1, 10, generator=g)
    if setting == "topp_minp_ties":
        row[0, 5] = row[0, 2]  # a tie that the filters must keep or drop together
    params = FREQ_SETTINGS[setting]
    probs = ops.filtered_probs(row, **params)[0]
    seeds = torch.arange(DRAWS, dtype=torch.int64) * 1_000_003 + 17  # distinct per-row seeds
    tok = ops.sample(row.expand(DRAWS, 10).to(DEV), **params, seed=seeds.to(DEV), backend=backend).cpu()
    pval = _chi2_pvalue(torch.bincount(tok, minlength=10), probs)
    assert pval > P_MIN, f"{setting} {backend}: p = {pval:.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_reproducible_per_row(backend):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 50, generator=g).to(DEV)
    seeds = torch.tensor([3, 1, 4, 1, 5, 9], device=DEV)
    kw = dict(temperature=torch.tensor([1.0, 0.8, 1.5, 1.0, 0.6, 1.0], device=DEV), top_k=20, top_p=0.9,
              backend=backend)
    a = ops.sample(x, **kw, seed=seeds)
    assert torch.equal(a, ops.sample(x, **kw, seed=seeds))
    # rows 1 and 3 share a seed and (here) their logits: the same token
    x2 = x.clone()
    x2[3] = x2[1]
    kw2 = dict(kw, temperature=torch.tensor([1.0, 0.8, 1.5, 0.8, 0.6, 1.0], device=DEV))
    b = ops.sample(x2, **kw2, seed=seeds)
    assert b[1] == b[3]
    # row 2 alone, or among other rows with other logits and seeds: the same token
    other = torch.randn(6, 50, generator=g).to(DEV)
    other[2] = x[2]
    c = ops.sample(other, **kw, seed=torch.tensor([7, 7, 4, 7, 7, 7], device=DEV))
    alone = ops.sample(x[2:3], temperature=1.5, top_k=20, top_p=0.9, seed=seeds[2:3], backend=backend)
    assert c[2] == a[2] and alone[0] == a[2]
    # an int seed: rows told apart by their index, reproducible
    d1 = ops.sample(x, **kw, seed=1234)
    assert torch.equal(d1, ops.sample(x, **kw, seed=1234)) and len(set(d1.tolist())) > 1


def test_triton_and_reference_draw_the_same_tokens():
    # The same Philox stream and the same race: the tokens agree except where two race scores tie to the
    # last bit (fp32 exp / log in torch vs Triton), which these rows never hit.
    g = torch.Generator().manual_seed(8)
    b = 24
    x = torch.randn(b, 300, generator=g) * 3
    kw = dict(temperature=torch.rand(b, generator=g) + 0.3, top_k=torch.randint(0, 60, (b,), generator=g),
              top_p=torch.rand(b, generator=g) * 0.5 + 0.5, min_p=0.01, seed=torch.arange(b) * 31 + 1)
    want = ops.sample(x, **kw, backend="reference")
    short = ops.sample(x.to(DEV), **_to(kw, DEV), backend="triton").cpu()
    long = _triton().sample(x.to(DEV), **_to(kw, DEV), block_v=128).cpu()  # chunked rows, the candidate path
    assert torch.equal(short, want) and torch.equal(short, long)


def test_long_rows_copy_candidates_after_one_search_pass():
    # LLM-like rows (a Gaussian bulk and a few large logits): the first pivot (mean + z std) already leaves
    # fewer than block_v candidates, so the logits are read by the statistics pass, one search pass, the copy
    # and nothing else; the draw reads the candidates.
    g = torch.Generator().manual_seed(2)
    v = 8192
    x = torch.randn(2, v, generator=g) * 2
    x[:, torch.randint(0, v, (30,), generator=g)] += torch.rand(30, generator=g) * 12
    tok, passes = _triton().sample(x.to(DEV), 0.8, 40, 0.9, 0.0, seed=1, block_v=512, return_passes=True)
    assert passes[:, 0].tolist() == [3, 3] and (passes[:, 1] <= 40).all()
    assert torch.equal(tok.cpu(), ref.sample(x, 0.8, 40, 0.9, 0.0, seed=1))


# ----------------------------------------------------------------------------------------------------
# speculative_verify

SPEC_B, SPEC_N, SPEC_V = DRAWS, 2, 7
SPEC_PARAMS = dict(temperature=0.9, top_k=6, top_p=0.95)


def _spec_problem(greedy_draft: bool):
    """One (target logits, q) pair repeated over B rows, drafts drawn from q per row (greedy drafts: q is
    one-hot at a per-row draft token drawn from another distribution)."""
    g = torch.Generator().manual_seed(21)
    logits = torch.randn(1, SPEC_N + 1, SPEC_V, generator=g) * 1.5
    q = torch.softmax(torch.randn(1, SPEC_N, SPEC_V, generator=g) * 1.5, dim=-1)
    drafts = torch.multinomial(q[0], SPEC_B, replacement=True, generator=g).T.contiguous()  # [B, N]
    target = logits.expand(SPEC_B, -1, -1)
    p = ops.filtered_probs(logits[0], **SPEC_PARAMS)  # [N+1, V]
    q_rows = None if greedy_draft else q.expand(SPEC_B, -1, -1)
    return target, q_rows, drafts, p, q[0]


def _expected_accepts(p, q, drafts, greedy_draft):
    """Exact law of num_accepted given the drafts: sum over rows of prod_{j<a} alpha_j (1 - alpha_a)."""
    pj = p[:SPEC_N].T.gather(0, drafts)  # [B, N]: p_j(x_j)
    alpha = pj if greedy_draft else torch.minimum(torch.ones(()), pj / q.T.gather(0, drafts))
    law = torch.zeros(SPEC_N + 1, dtype=torch.float64)
    prefix = torch.ones(drafts.shape[0], dtype=torch.float64)
    for a in range(SPEC_N + 1):
        stop = (1 - alpha[:, a].double()) if a < SPEC_N else torch.ones_like(prefix)
        law[a] = (prefix * stop).sum()
        if a < SPEC_N:
            prefix = prefix * alpha[:, a].double()
    return law / law.sum()


def _spec_pvalues(tokens, nacc, p, q, drafts, greedy_draft) -> dict:
    first = _chi2_pvalue(torch.bincount(tokens[:, 0], minlength=SPEC_V), p[0])
    second_rows = nacc >= 1  # x_0 accepted: position 1 holds an accepted x_1 or the correction from p_1
    second = _chi2_pvalue(torch.bincount(tokens[second_rows, 1], minlength=SPEC_V), p[1])
    bonus_rows = nacc == SPEC_N
    bonus = _chi2_pvalue(torch.bincount(tokens[bonus_rows, SPEC_N], minlength=SPEC_V), p[SPEC_N])
    accepts = _chi2_pvalue(torch.bincount(nacc, minlength=SPEC_N + 1), _expected_accepts(p, q, drafts, greedy_draft))
    return dict(first=first, second=second, bonus=bonus, accepts=accepts)


def _assert_layout(tokens, nacc, drafts):
    cols = torch.arange(tokens.shape[1])[None, :]
    a = nacc[:, None]
    padded = torch.cat([drafts, drafts[:, :1]], dim=1)  # [B, N+1]
    assert torch.equal(torch.where(cols < a, tokens, 0), torch.where(cols < a, padded, 0))
    assert (tokens.gather(1, a) >= 0).all()
    assert (torch.where(cols > a, tokens, -1) == -1).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("greedy_draft", [False, True], ids=["draft_probs", "one_hot"])
def test_speculative_emits_target_distribution(greedy_draft, backend):
    target, q_rows, drafts, p, q = _spec_problem(greedy_draft)
    seeds = torch.arange(SPEC_B, dtype=torch.int64) * 7919 + 5
    tokens, nacc = ops.speculative_verify(drafts.to(DEV), None if q_rows is None else q_rows.to(DEV), target.to(DEV),
                                          **SPEC_PARAMS, seed=seeds.to(DEV), backend=backend)
    tokens, nacc = tokens.cpu(), nacc.cpu()
    _assert_layout(tokens, nacc, drafts)
    pvals = _spec_pvalues(tokens, nacc, p, q, drafts, greedy_draft)
    assert min(pvals.values()) > P_MIN, pvals


def test_speculative_check_rejects_broken_rules():
    # The check above has power: two classic mistakes, built from the reference's own pieces, fail it.
    target, q_rows, drafts, p, q = _spec_problem(False)
    seeds = torch.arange(SPEC_B, dtype=torch.int64) * 7919 + 5
    tokens, nacc = ref.speculative_verify(drafts, q_rows, target, **SPEC_PARAMS, seed=seeds)
    p_rows = p[None].expand(SPEC_B, -1, -1)
    # (1) on rejection, draw the correction from p_j instead of max(0, p_j - q_j)
    rejected = nacc < SPEC_N
    stop = nacc.clamp(max=SPEC_N)
    wrong = ref.race(p_rows.gather(1, stop[:, None, None].expand(-1, 1, SPEC_V))[:, 0], seeds, stop)
    broken = tokens.clone()
    broken[rejected, nacc[rejected]] = wrong[rejected]
    p_residual = _spec_pvalues(broken, nacc, p, q, drafts, False)["first"]
    # (2) accept with probability p_j(x_j), ignoring q (the residual rule kept)
    u = ref.uniforms(seeds, SPEC_B, torch.zeros(1, dtype=torch.int64), torch.zeros(SPEC_B, dtype=torch.int64), 1)[:, 0]
    accept0 = u < p[0][drafts[:, 0]]
    resid = (p[0] - q[0]).clamp(min=0)
    corr = ref.race(resid[None].expand(SPEC_B, -1), seeds, 0)
    first = torch.where(accept0, drafts[:, 0], corr)
    p_accept = _chi2_pvalue(torch.bincount(first, minlength=SPEC_V), p[0])
    assert p_residual < P_MIN and p_accept < P_MIN, (p_residual, p_accept)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_probs", [False, True])
def test_speculative_greedy_is_exact(with_probs, backend):
    g = torch.Generator().manual_seed(4)
    b, n, v = 5, 4, 33
    target = torch.randn(b, n + 1, v, generator=g)
    am = target.argmax(dim=-1)  # [B, N+1]
    drafts = am[:, :n].clone()
    drafts[0, 0] = (am[0, 0] + 1) % v  # rejects at once
    drafts[1, 2] = (am[1, 2] + 3) % v  # accepts two
    drafts[2, 3] = -5  # an id outside the vocabulary: rejected
    # rows 3, 4: every draft is the argmax, so all are accepted plus the bonus argmax
    q = torch.softmax(torch.randn(b, n, v, generator=g), dim=-1) if with_probs else None
    tokens, nacc = ops.speculative_verify(drafts.to(DEV), None if q is None else q.to(DEV), target.to(DEV),
                                          temperature=0.0, top_p=0.5, seed=None, backend=backend)
    assert nacc.cpu().tolist() == [0, 2, 3, 4, 4]
    want = torch.full((b, n + 1), -1)
    for r, a in enumerate([0, 2, 3, 4, 4]):
        want[r, :a] = am[r, :a]
        want[r, a] = am[r, a]
    assert torch.equal(tokens.cpu(), want)


@pytest.mark.parametrize("block_v", [None, 16])
def test_speculative_triton_matches_reference(block_v):
    g = torch.Generator().manual_seed(9)
    b, n, v = 5, 2, 40
    target = torch.randn(b, n + 1, v, generator=g) * 2
    target[1, 1] = float("-inf")  # nothing to draw at that position
    q = torch.softmax(torch.randn(b, n, v, generator=g), dim=-1)
    drafts = torch.multinomial(q.view(-1, v), 1, generator=g).view(b, n)
    drafts[4] = target[4, :n].argmax(dim=-1)  # likely accepted: reaches the bonus draw
    kw = dict(temperature=torch.tensor([1.0, 1.0, 0.5, 0.0, 0.9]), top_k=torch.tensor([3, 0, 1, 2, 40]),
              top_p=0.8, min_p=0.05, seed=11)
    for probs in (q, None):
        want = ref.speculative_verify(drafts, probs, target, **kw)
        got = _triton().speculative_verify(drafts.to(DEV), None if probs is None else probs.to(DEV), target.to(DEV),
                                           **_to(kw, DEV), block_v=block_v)
        assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])


def test_non_contiguous_inputs():
    # logits with a column stride of 3, and target logits / draft probabilities that are transposed views
    g = torch.Generator().manual_seed(12)
    x = torch.randn(40, 3, generator=g).t()  # [3, 40], strides (1, 3)
    kw = dict(temperature=0.7, top_k=10, top_p=0.9, seed=4)
    want = ops.sample(x.contiguous(), **kw, backend="reference")
    assert torch.equal(ops.sample(x.to(DEV), **kw, backend="triton").cpu(), want)
    target = torch.randn(3, 4, 30, generator=g).transpose(0, 1)  # [B=4, N+1=3, V], not mergeable to rows
    q = torch.softmax(torch.randn(2, 4, 30, generator=g), dim=-1).transpose(0, 1)  # [4, 2, V]
    drafts = torch.randint(0, 30, (2, 4), generator=g).t()  # [4, 2]
    want = ops.speculative_verify(drafts.contiguous(), q.contiguous(), target.contiguous(), **kw, backend="reference")
    got = ops.speculative_verify(drafts.to(DEV), q.to(DEV), target.to(DEV), **kw, backend="triton")
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])


def test_speculative_without_drafts_draws_the_bonus():
    x = torch.randn(3, 1, 12)
    tokens, nacc = ops.speculative_verify(torch.zeros(3, 0, dtype=torch.int64), None, x, temperature=1.0, seed=2)
    assert tokens.shape == (3, 1) and nacc.tolist() == [0, 0, 0]
    assert torch.equal(tokens[:, 0], ops.sample(x[:, 0], temperature=1.0, seed=2, backend="reference"))


# ----------------------------------------------------------------------------------------------------
# Validation and dispatch


def test_errors_name_the_argument():
    x = torch.randn(4, 10)
    with pytest.raises(ValueError, match="logits must have 2 dims"):
        ops.sample(x[0], temperature=1.0)
    with pytest.raises(TypeError, match="logits must be float32"):
        ops.sample(x.long(), temperature=1.0)
    with pytest.raises(ValueError, match=r"temperature must have shape \[4\]"):
        ops.sample(x, temperature=torch.ones(3))
    with pytest.raises(TypeError, match="top_k must be int"):
        ops.sample(x, temperature=1.0, top_k=torch.ones(4))
    with pytest.raises(TypeError, match="top_k must be an int"):
        ops.sample(x, temperature=1.0, top_k=2.5)
    with pytest.raises(ValueError, match="temperature must be finite and >= 0"):
        ops.sample(x, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p is NaN"):
        ops.filtered_probs(x, temperature=1.0, top_p=float("nan"))
    with pytest.raises(TypeError, match="seed must be int64"):
        ops.sample(x, temperature=1.0, seed=torch.ones(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="min_p is on meta"):
        ops.sample(x, temperature=1.0, min_p=torch.zeros(4, device="meta"))
    with pytest.raises(ValueError, match="vocabulary of at least 1"):
        ops.sample(torch.zeros(2, 0), temperature=1.0)
    d, q, t = torch.zeros(4, 2, dtype=torch.int64), torch.full((4, 2, 10), 0.1), torch.randn(4, 3, 10)
    with pytest.raises(TypeError, match="draft_tokens must be int64"):
        ops.speculative_verify(d.float(), q, t, temperature=1.0)
    with pytest.raises(ValueError, match=r"draft_probs must have shape \[4, 2, 10\]"):
        ops.speculative_verify(d, q[:, :1], t, temperature=1.0)
    with pytest.raises(ValueError, match=r"target_logits must have shape \[4, 3, 10\]"):
        ops.speculative_verify(d, q, t[:, :2], temperature=1.0)
    with pytest.raises(ValueError, match="target_logits is on meta"):
        ops.speculative_verify(d, None, t.to("meta"), temperature=1.0)


def test_dispatch_and_empty_batch():
    assert ops.SAMPLE.select("auto", torch.zeros(1, 3))[0] == ("triton" if DEV.type == "cuda" else "reference")
    with r1kernels.use_backend("triton"):
        tok = ops.sample(torch.randn(2, 5).to(DEV), temperature=1.0, seed=0)
    assert tok.shape == (2,) and ((tok >= 0) & (tok < 5)).all()
    assert ops.sample(torch.zeros(0, 7), temperature=1.0).shape == (0,)
    tokens, nacc = ops.speculative_verify(torch.zeros(0, 2, dtype=torch.int64), None, torch.zeros(0, 3, 7),
                                          temperature=1.0)
    assert tokens.shape == (0, 3) and nacc.shape == (0,)


def test_seed_none_draws_on_device_without_sync():
    x = torch.randn(3, 20).to(DEV)
    torch.manual_seed(0)
    a = ops.sample(x, temperature=1.0)
    torch.manual_seed(0)
    b = ops.sample(x, temperature=1.0)
    assert torch.equal(a, b)  # seeds come from torch's default generator


def test_philox_matches_random123_and_triton():
    # Random123's known-answer vectors for philox4x32-10, then triton's own tl.randint4x (interpreter / GPU).
    z, f = torch.tensor(0), torch.tensor(0xFFFFFFFF)
    assert [int(w) for w in ref.philox4x32(z, z, z, z, z, z)] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert [int(w) for w in ref.philox4x32(f, f, f, f, f, f)] == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    triton, tl = pytest.importorskip("triton"), pytest.importorskip("triton.language")

    @triton.jit
    def words(out_ptr, seed, n: tl.constexpr):
        off = tl.arange(0, n)
        a, _, _, _ = tl.randint4x(seed, off)
        tl.store(out_ptr + off, a.to(tl.int32, bitcast=True))

    seed = 2**40 + 12345
    out = torch.zeros(16, dtype=torch.int32, device=DEV)
    words[(1,)](out, seed, n=16)
    want = ref.philox4x32(torch.arange(16), z, z, z, torch.tensor(seed & 0xFFFFFFFF), torch.tensor(seed >> 32))[0]
    assert torch.equal(out.cpu().to(torch.int64) & 0xFFFFFFFF, want)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_v3_vocab_kept_sets_and_tokens(dtype):
    # DeepSeek-V3's vocabulary on the GPU: the long-row path with the real chunk, LLM-like and flat rows.
    g = torch.Generator().manual_seed(0)
    v = 129_280
    x = torch.randn(8, v, generator=g) * 2
    x[:4, torch.randint(0, v, (40,), generator=g)] += torch.rand(40, generator=g) * 12
    x = x.to(dtype)
    params = _off_boundaries(x, dict(temperature=torch.full((8,), 0.8), top_k=torch.tensor([0, 50, 0, 1000] * 2),
                                     top_p=torch.tensor([0.9, 0.95, 1.0, 0.8] * 2), min_p=torch.full((8,), 0.02)))
    want = ref.filtered_probs(x, **params) > 0
    got = _triton().filter_mask(x.cuda(), **_to(params, "cuda")).cpu()
    assert torch.equal(got, want)
    seeds = torch.arange(8) + 100
    tok = ops.sample(x.cuda(), **_to(params, "cuda"), seed=seeds.cuda(), backend="triton").cpu()
    assert (tok == ref.sample(x, **params, seed=seeds)).float().mean() >= 0.75
    assert want.gather(1, tok[:, None]).all()
