"""Training losses (r1kernels.ops.loss): the fused backends (triton, cpu) against the reference, forward and
backward, and the reference against hand-computed values and torch's own formulations.

Runs on the GPU when there is one, else under the Triton interpreter (conftest sets TRITON_INTERPRET);
bf16 only on the GPU.
"""
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_reduction_close, tol

from r1kernels import BackendUnavailable
from r1kernels.ops import loss as L
from r1kernels.reference import loss as R

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `benchmarks` is a folder of the repository
from benchmarks.bench_loss import peak_extra_bytes  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERP_DTYPES = [torch.float32, torch.float16]
FUSED = ["triton", "cpu"] if DEV.type == "cpu" else ["triton"]


def _rand(*shape, dtype=torch.float32, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device=DEV, dtype=dtype)


def _labels(t, v, seed=0, ignore_every=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, v, (t,), generator=g)
    if ignore_every:
        y[::ignore_every] = -100
    return y.to(DEV)


def _head(t, d, v, dtype, seed=0):
    """hidden [T, D] and weight [V, D] scaled so the logits spread over a few units (a trained head's range)."""
    return _rand(t, d, dtype=dtype, seed=seed), _rand(v, d, dtype=dtype, seed=seed + 1, scale=2.0 / math.sqrt(d))


def _grads(fn, h, w, upstream=None):
    """``(out, grad_hidden, grad_weight)`` of ``fn(h, w)`` for fresh leaves and the given upstream gradient."""
    h = h.detach().requires_grad_(True)
    w = w.detach().requires_grad_(True)
    out = fn(h, w)
    gh, gw = torch.autograd.grad(out, (h, w), upstream if upstream is not None else torch.ones_like(out))
    return out.detach(), gh, gw


def _dlogits_abs(loss_of_logits, h, w, upstream=None):
    """|d loss / d logits| of the reference, for the reduction bounds of the two gradient matmuls."""
    x = R.head_logits(h, w).detach().requires_grad_(True)
    out = loss_of_logits(x)
    (g,) = torch.autograd.grad(out, (x,), upstream if upstream is not None else torch.ones_like(out))
    return g.abs()


def assert_head_grads_close(gh, gw, ref_gh, ref_gw, dl_abs, h, w):
    """Both gradients are sums (over V for hidden, over T for weight): the table's reduction rule."""
    assert gh.dtype == h.dtype and gw.dtype == w.dtype
    assert_reduction_close(gh, ref_gh, dl_abs @ w.float().abs(), h.dtype)
    assert_reduction_close(gw, ref_gw, dl_abs.t() @ h.float().abs(), w.dtype)


# ------------------------------------------------------------------------------------------------------
# fused_linear_cross_entropy


def _ce_of_logits(y, reduction="mean"):
    return lambda x: F.cross_entropy(x, y, ignore_index=-100, reduction=reduction)


def assert_ce_matches_reference(h, w, y, backend, reduction="mean", upstream=0.75):
    up = torch.tensor(upstream, device=DEV)
    loss, gh, gw = _grads(lambda a, b: L.fused_linear_cross_entropy(a, b, y, reduction=reduction, backend=backend), h, w, up)
    ref_loss, ref_gh, ref_gw = _grads(lambda a, b: R.fused_linear_cross_entropy(a, b, y, reduction=reduction), h, w, up)
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, ref_loss, **tol(h.dtype))
    assert_head_grads_close(gh, gw, ref_gh, ref_gw, _dlogits_abs(_ce_of_logits(y, reduction), h, w, up), h, w)


@pytest.mark.parametrize("dtype", INTERP_DTYPES)
@pytest.mark.parametrize("t", [1, 3, 17, 129])
@pytest.mark.parametrize("v", [1, 3, 1000, 4099])
def test_ce_matches_reference(t, v, dtype):
    h, w = _head(t, 24, v, dtype, seed=t + v)
    y = _labels(t, v, seed=t, ignore_every=5 if t > 3 else 0)
    assert_ce_matches_reference(h, w, y, "triton")


@pytest.mark.parametrize("dtype", INTERP_DTYPES + [torch.bfloat16])  # torch code: bf16 runs on the CPU too
@pytest.mark.parametrize("t,v", [(1, 3), (17, 1000), (129, 4099)])
def test_ce_cpu_backend_matches_reference(t, v, dtype):
    if DEV.type != "cpu":
        pytest.skip("the cpu backend takes CPU tensors")
    h, w = _head(t, 24, v, dtype, seed=t)
    assert_ce_matches_reference(h, w, _labels(t, v, seed=t, ignore_every=4), "cpu")


def test_ce_reference_is_torch_cross_entropy():
    h, w = _head(17, 16, 100, torch.float32)
    y = _labels(17, 100, ignore_every=3)
    logits = h @ w.t()
    for red in ("mean", "sum"):
        torch.testing.assert_close(R.fused_linear_cross_entropy(h, w, y, reduction=red),
                                   F.cross_entropy(logits, y, ignore_index=-100, reduction=red), **tol(torch.float32))


@pytest.mark.parametrize("backend", FUSED + ["reference"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ce_all_ignored_is_zero_with_zero_grads(backend, reduction):
    h, w = _head(5, 8, 11, torch.float32)
    y = torch.full((5,), -7, dtype=torch.long, device=DEV)
    loss, gh, gw = _grads(lambda a, b: L.fused_linear_cross_entropy(a, b, y, -7, reduction=reduction, backend=backend), h, w)
    assert torch.equal(loss, torch.zeros((), device=DEV))
    assert torch.equal(gh, torch.zeros_like(h)) and torch.equal(gw, torch.zeros_like(w))


@pytest.mark.parametrize("backend", FUSED + ["reference"])
def test_int32_labels_and_no_tokens(backend):
    h, w = _head(6, 8, 11, torch.float32)
    y = _labels(6, 11)
    torch.testing.assert_close(L.fused_linear_cross_entropy(h, w, y.int(), backend=backend),
                               R.fused_linear_cross_entropy(h, w, y), **tol(torch.float32))
    torch.testing.assert_close(L.fused_linear_logprobs(h, w, y.int(), backend=backend),
                               R.fused_linear_logprobs(h, w, y), **tol(torch.float32))
    # T = 0: a zero loss, empty / zero gradients
    loss, gh, gw = _grads(lambda a, b: L.fused_linear_cross_entropy(a, b, y[:0], backend=backend), h[:0], w)
    assert float(loss) == 0.0 and gh.shape == (0, 8) and torch.equal(gw, torch.zeros_like(w))
    assert L.fused_linear_logprobs(h[:0], w, y[:0], backend=backend).shape == (0,)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", INTERP_DTYPES)
def test_ce_chunk_boundaries(backend, dtype, monkeypatch):
    # A 5-row budget (V=40, 4 bytes): T=17 is 5 + 5 + 5 + 2, so the last chunk is partial.
    monkeypatch.setattr(L, "LOGITS_CHUNK_MIN_BYTES", 5 * 40 * 4)
    monkeypatch.setattr(L, "LOGITS_CHUNK_MAX_BYTES", 5 * 40 * 4)
    assert L.logits_chunk_rows(17, 40, 8, 4) == 5
    h, w = _head(17, 8, 40, dtype)
    assert_ce_matches_reference(h, w, _labels(17, 40, ignore_every=6), backend, reduction="sum")


def test_chunk_rows_budget():
    # DeepSeek-V3's head in bf16: 128 MiB of logits at most, rounded to 64 rows -> 512 tokens.
    assert L.logits_chunk_rows(8192, 129280, 7168, 2) == 512
    assert 512 * 129280 * 2 <= L.LOGITS_CHUNK_MAX_BYTES
    # A small head: the budget is 1/8 of the weight, at least the floor; never more rows than tokens.
    c = L.logits_chunk_rows(1024, 32000, 256, 4)
    assert c * 32000 * 4 <= max(32000 * 256 * 4 // 8, L.LOGITS_CHUNK_MIN_BYTES) and c >= 1
    assert L.logits_chunk_rows(3, 10, 4, 4) == 3


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", INTERP_DTYPES)
def test_ce_non_contiguous_inputs(backend, dtype):
    h = _rand(24, 33, dtype=dtype).t()  # [33, 24], columns strided
    w = _rand(2 * 129, 24, dtype=dtype, seed=1, scale=0.4)[::2]  # [129, 24], rows every other one
    y = _labels(66, 129, seed=2, ignore_every=7)[::2]  # [33], stride 2
    assert not (h.is_contiguous() or w.is_contiguous() or y.is_contiguous())
    assert_ce_matches_reference(h, w, y, backend)


@pytest.mark.parametrize("backend", FUSED)
def test_ce_frozen_weight_and_no_grad(backend):
    h, w = _head(9, 8, 30, torch.float32)
    y = _labels(9, 30)
    hg = h.clone().requires_grad_(True)
    L.fused_linear_cross_entropy(hg, w, y, backend=backend).backward()
    ref_h = h.clone().requires_grad_(True)
    R.fused_linear_cross_entropy(ref_h, w, y).backward()
    torch.testing.assert_close(hg.grad, ref_h.grad, **tol(torch.float32))
    assert w.grad is None
    with torch.no_grad():
        loss = L.fused_linear_cross_entropy(hg, w.requires_grad_(True), y, backend=backend)
    torch.testing.assert_close(loss, R.fused_linear_cross_entropy(h, w, y).detach(), **tol(torch.float32))
    assert not loss.requires_grad


@pytest.mark.parametrize("backend", FUSED)
def test_ce_ignores_ambient_autocast(backend):
    h, w = _head(9, 8, 30, torch.float32)
    y = _labels(9, 30)
    with torch.autocast(device_type=DEV.type, dtype=torch.bfloat16):
        got = _grads(lambda a, b: L.fused_linear_cross_entropy(a, b, y, backend=backend), h, w)
    want = _grads(lambda a, b: R.fused_linear_cross_entropy(a, b, y), h, w)
    for g, r in zip(got, want):
        assert g.dtype == r.dtype
        torch.testing.assert_close(g, r, **tol(torch.float32))


@pytest.mark.parametrize("backend", FUSED)
def test_ce_second_backward_raises(backend):
    h, w = _head(4, 8, 10, torch.float32)
    hg = h.requires_grad_(True)
    loss = L.fused_linear_cross_entropy(hg, w, _labels(4, 10), backend=backend)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


def test_auto_picks_the_chunked_cpu_path_on_cpu():
    h, w = _head(3, 4, 5, torch.float32)
    y = _labels(3, 5)
    if DEV.type == "cpu":
        assert L.FUSED_LINEAR_CROSS_ENTROPY.select("auto", h, w, y, -100, "mean")[0] == "cpu"
    else:
        assert L.FUSED_LINEAR_CROSS_ENTROPY.select("auto", h, w, y, -100, "mean")[0] == "triton"
        with pytest.raises(BackendUnavailable, match="CPU tensors only"):
            L.fused_linear_cross_entropy(h, w, y, backend="cpu")


def test_fused_memory_is_an_eighth_of_unfused():
    """The requirement, measured on the CPU allocator at T=1024, D=256, V=32,000 (fp32): the chunked path's
    peak extra bytes (gradients included) against the reference's (full fp32 logits and softmax)."""
    if DEV.type != "cpu":
        pytest.skip("the CPU allocator measurement; the GPU one is test_gpu_memory_ratio")
    h, w = _head(1024, 256, 32000, torch.float32)
    y = _labels(1024, 32000)
    hg, wg = h.requires_grad_(True), w.requires_grad_(True)

    def step(backend):
        return lambda: torch.autograd.grad(L.fused_linear_cross_entropy(hg, wg, y, backend=backend), (hg, wg))

    fused = peak_extra_bytes(step("cpu"), DEV)
    unfused = peak_extra_bytes(step("reference"), DEV)
    if fused is None or unfused is None:
        pytest.skip("this torch's profiler does not expose allocation events")
    grads = (1024 * 256 + 32000 * 256) * 4
    assert fused >= grads  # the measurement sees the gradients it returns
    assert fused * 8 <= unfused, f"fused {fused / 2**20:.1f} MiB vs unfused {unfused / 2**20:.1f} MiB"


# ------------------------------------------------------------------------------------------------------
# fused_linear_logprobs


def assert_logprobs_match_reference(h, w, tokens, temperature, backend):
    up = _rand(h.shape[0], seed=9)
    lp, gh, gw = _grads(lambda a, b: L.fused_linear_logprobs(a, b, tokens, temperature, backend=backend), h, w, up)
    ref_lp, ref_gh, ref_gw = _grads(lambda a, b: R.fused_linear_logprobs(a, b, tokens, temperature), h, w, up)
    assert lp.dtype == torch.float32 and lp.shape == tokens.shape
    torch.testing.assert_close(lp, ref_lp, **tol(h.dtype))

    def of_logits(x):
        return torch.log_softmax(x / temperature, -1).gather(1, tokens[:, None]).squeeze(1)

    assert_head_grads_close(gh, gw, ref_gh, ref_gw, _dlogits_abs(of_logits, h, w, up), h, w)


@pytest.mark.parametrize("dtype", INTERP_DTYPES)
@pytest.mark.parametrize("t,v", [(1, 1), (3, 3), (17, 1000), (129, 4099)])
@pytest.mark.parametrize("backend", FUSED)
def test_logprobs_match_reference(t, v, dtype, backend):
    h, w = _head(t, 20, v, dtype, seed=v)
    assert_logprobs_match_reference(h, w, _labels(t, v, seed=t), 0.7 if t % 2 else 1.3, backend)


def test_logprobs_reference_is_log_softmax():
    h, w = _head(7, 8, 50, torch.float32)
    tok = _labels(7, 50)
    want = torch.log_softmax(h @ w.t() / 0.5, -1)[torch.arange(7), tok]
    torch.testing.assert_close(R.fused_linear_logprobs(h, w, tok, 0.5), want, **tol(torch.float32))


@pytest.mark.parametrize("backend", FUSED)
def test_logprobs_chunks_and_strides(backend, monkeypatch):
    monkeypatch.setattr(L, "LOGITS_CHUNK_MIN_BYTES", 4 * 64 * 4)
    monkeypatch.setattr(L, "LOGITS_CHUNK_MAX_BYTES", 4 * 64 * 4)
    h = _rand(16, 17, dtype=torch.float32).t()  # [17, 16]
    w = _rand(64, 32, seed=1, scale=0.5)[:, ::2]  # [64, 16], strided columns
    assert_logprobs_match_reference(h, w, _labels(17, 64, seed=3), 1.0, backend)
    # an upstream gradient with stride 0 (logp.sum().backward())
    hg = h.detach().requires_grad_(True)
    L.fused_linear_logprobs(hg, w, _labels(17, 64, seed=3), backend=backend).sum().backward()
    ref_h = h.detach().requires_grad_(True)
    R.fused_linear_logprobs(ref_h, w, _labels(17, 64, seed=3)).sum().backward()
    torch.testing.assert_close(hg.grad, ref_h.grad, **tol(torch.float32))


# ------------------------------------------------------------------------------------------------------
# grpo_loss

# Two sequences, epsilon 0.2, epsilon_high 0.28, beta 0.1, old log-probs -1 and log-probs -1 + ln(ratio):
#   seq 0, A = +1, mask [1, 1, 0]: ratio 1.5 -> clipped, objective 1.28; ratio 0.5 -> objective 0.5;
#          the third position is masked and holds NaN. KL: ref - lp = ln 2 on the first token -> 1 - ln 2.
#   seq 1, A = -2, mask [1, 1, 1]: ratio 1 -> -2; ratio 0.5 -> clipped, 0.8 * -2 = -1.6; ratio 2 -> -4.
# Per-token loss -(objective - 0.1 kl): -1.28 + 0.1 (1 - ln 2), -0.5 | 2, 1.6, 4.
# d loss / d lp: clipped tokens 0 (plus the KL's 0.1 (1 - e^(ref - lp)) = -0.1 on the first); else -ratio A.
_KL0 = 1.0 - math.log(2.0)
_TOK = [[-1.28 + 0.1 * _KL0, -0.5], [2.0, 1.6, 4.0]]
_DTOK = [[-0.1, -0.5], [2.0, 0.0, 4.0]]
_HAND = {
    "grpo": ((sum(_TOK[0]) / 2 + sum(_TOK[1]) / 3) / 2, [[d / 4 for d in _DTOK[0]], [d / 6 for d in _DTOK[1]]]),
    "dapo": ((sum(_TOK[0]) + sum(_TOK[1])) / 5, [[d / 5 for d in _DTOK[0]], [d / 5 for d in _DTOK[1]]]),
    "dr_grpo": ((sum(_TOK[0]) + sum(_TOK[1])) / 6, [[d / 6 for d in _DTOK[0]], [d / 6 for d in _DTOK[1]]]),
}


def _grpo_hand_inputs():
    nan = float("nan")
    ratio = [[1.5, 0.5, 1.0], [1.0, 0.5, 2.0]]
    lp = torch.tensor([[-1.0 + math.log(r) for r in row] for row in ratio], device=DEV)
    lp[0, 2] = nan
    old = torch.full((2, 3), -1.0, device=DEV)
    old[0, 2] = nan
    ref = lp.clone()
    ref[0, 0] += math.log(2.0)
    adv = torch.tensor([1.0, -2.0], device=DEV)
    mask = torch.tensor([[True, True, False], [True, True, True]], device=DEV)
    return lp, old, ref, adv, mask


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_grpo_hand_computed(loss_type, backend):
    lp, old, ref, adv, mask = _grpo_hand_inputs()
    x = lp.clone().requires_grad_(True)
    loss, metrics = L.grpo_loss(x, old, ref, adv, mask, epsilon=0.2, epsilon_high=0.28, beta=0.1,
                                loss_type=loss_type, backend=backend)
    loss.backward()
    want_loss, want_grad = _HAND[loss_type]
    torch.testing.assert_close(loss, torch.tensor(want_loss, device=DEV), **tol(torch.float32))
    want = torch.tensor([want_grad[0] + [0.0], want_grad[1]], device=DEV)
    torch.testing.assert_close(x.grad, want, **tol(torch.float32))
    torch.testing.assert_close(metrics["kl"], torch.tensor(_KL0 / 5, device=DEV), **tol(torch.float32))
    torch.testing.assert_close(metrics["clip_fraction"], torch.tensor(2 / 5, device=DEV), **tol(torch.float32))
    assert not metrics["kl"].requires_grad


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_grpo_dr_grpo_max_tokens_and_no_kl(backend):
    lp, old, ref, adv, mask = _grpo_hand_inputs()
    loss, _ = L.grpo_loss(lp, old, ref, adv, mask, epsilon_high=0.28, beta=0.1, loss_type="dr_grpo", max_tokens=10,
                          backend=backend)
    torch.testing.assert_close(loss, torch.tensor(_HAND["dr_grpo"][0] * 6 / 20, device=DEV), **tol(torch.float32))
    # beta 0 or no ref: the KL term leaves the loss; without ref the kl metric is 0
    no_kl = (sum(_TOK[0]) + sum(_TOK[1]) - 0.1 * _KL0) / 5
    for r, b in ((ref, 0.0), (None, 0.1)):
        loss, m = L.grpo_loss(lp, old, r, adv, mask, epsilon_high=0.28, beta=b, loss_type="dapo", backend=backend)
        torch.testing.assert_close(loss, torch.tensor(no_kl, device=DEV), **tol(torch.float32))
    assert float(m["kl"]) == 0.0


@pytest.mark.parametrize("dtype", INTERP_DTYPES)
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("b,s", [(1, 1), (3, 17), (4, 129), (2, 1500)])
def test_grpo_triton_matches_reference(b, s, loss_type, dtype):
    lp = (_rand(b, s, seed=1, scale=0.3) - 1.0).to(dtype)
    old = (lp.float() + _rand(b, s, seed=2, scale=0.3)).to(dtype)
    ref = lp.float() + _rand(b, s, seed=3, scale=0.2)
    adv = _rand(b, s, seed=4) if s % 2 else _rand(b, seed=4)  # per-token and per-sequence advantages
    mask = (_rand(b, s, seed=5) > -0.8).float() * (1.0 + (_rand(b, s, seed=6) > 0).float())  # weights 0, 1, 2
    mask[0, 0] = 1.0
    lp[mask == 0] = float("nan")  # never read
    kw = dict(epsilon=0.2, epsilon_high=0.3, beta=0.05, loss_type=loss_type)
    outs = {}
    for backend in ("reference", "triton"):
        x = lp.clone().requires_grad_(True)
        loss, m = L.grpo_loss(x, old, ref, adv, mask, backend=backend, **kw)
        loss.backward(torch.tensor(1.5, device=DEV))
        outs[backend] = (loss, m["kl"], m["clip_fraction"], x.grad)
    for got, want in zip(outs["triton"], outs["reference"]):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, **tol(torch.float32 if got.dim() == 0 else dtype))
    assert outs["triton"][3].dtype == dtype


def test_grpo_non_contiguous_and_inference():
    base = _rand(40, 6, seed=1, scale=0.3) - 1.0
    lp = base.t()[:, ::2]  # [6, 20], both strides odd
    old = (base + 0.1).t()[:, ::2]
    adv = _rand(12, seed=2)[::2]
    mask = (_rand(20, 6, seed=3) > -1).t()
    args = (old, None, adv, mask)
    want, wm = L.grpo_loss(lp, *args, loss_type="dapo", backend="reference")
    got, gm = L.grpo_loss(lp, *args, loss_type="dapo", backend="triton")
    torch.testing.assert_close(got, want, **tol(torch.float32))
    torch.testing.assert_close(gm["clip_fraction"], wm["clip_fraction"], **tol(torch.float32))
    assert not got.requires_grad


# ------------------------------------------------------------------------------------------------------
# fused_linear_kd_loss


def _kl_div_formulation(h, w, teacher, kind, temperature, beta, mask):
    """torch.nn.functional.kl_div's terms, independent of the reference's code."""
    ls = torch.log_softmax(R.head_logits(h, w) / temperature, -1)
    lt = torch.log_softmax(teacher.float() / temperature, -1)
    if kind == "forward_kl":
        rows = F.kl_div(ls, lt, log_target=True, reduction="none").sum(-1)
    elif kind == "reverse_kl":
        rows = F.kl_div(lt, ls, log_target=True, reduction="none").sum(-1)
    else:
        lm = torch.log(beta * lt.exp() + (1 - beta) * ls.exp())
        rows = (beta * F.kl_div(lm, lt, log_target=True, reduction="none").sum(-1)
                + (1 - beta) * F.kl_div(lm, ls, log_target=True, reduction="none").sum(-1))
    wts = torch.ones_like(rows) if mask is None else mask.float()
    return (rows * wts).sum() / wts.sum().clamp(min=1)


def assert_kd_matches_reference(h, w, teacher, kind, temperature, beta, mask, backend):
    up = torch.tensor(1.25, device=DEV)

    def run(fn):
        return _grads(lambda a, b: fn(a, b, teacher, kind=kind, temperature=temperature, beta=beta, mask=mask), h, w, up)

    loss, gh, gw = run(lambda *a, **k: L.fused_linear_kd_loss(*a, **k, backend=backend))
    ref_loss, ref_gh, ref_gw = run(R.fused_linear_kd_loss)
    torch.testing.assert_close(loss, ref_loss, **tol(h.dtype))
    torch.testing.assert_close(ref_loss, _kl_div_formulation(h, w, teacher, kind, temperature, beta, mask), **tol(torch.float32))

    def of_logits(x):
        rows = R.kd_row_loss(x, teacher, kind, temperature, beta)
        wts = torch.ones_like(rows) if mask is None else mask.float()
        return (rows * wts).sum() / wts.sum().clamp(min=1)

    assert_head_grads_close(gh, gw, ref_gh, ref_gw, _dlogits_abs(of_logits, h, w, up), h, w)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("dtype", INTERP_DTYPES)
@pytest.mark.parametrize("t,v", [(1, 3), (17, 1000), (129, 4099)])
def test_kd_matches_reference_and_kl_div(t, v, dtype, kind):
    h, w = _head(t, 16, v, dtype, seed=t)
    teacher = _rand(t, v, seed=7, scale=2.0).to(dtype)
    mask = (torch.arange(t, device=DEV) % 4 != 1) if t > 1 else None
    for backend in FUSED:
        assert_kd_matches_reference(h, w, teacher, kind, 1.5, 0.3, mask, backend)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_kd_jsd_beta_edges_and_chunks(beta, backend, monkeypatch):
    monkeypatch.setattr(L, "LOGITS_CHUNK_MIN_BYTES", 3 * 50 * 4)
    monkeypatch.setattr(L, "LOGITS_CHUNK_MAX_BYTES", 3 * 50 * 4)
    h, w = _head(10, 8, 50, torch.float32)
    teacher = _rand(50, 10, seed=3).t()  # [10, 50], strided
    assert_kd_matches_reference(h, w, teacher, "jsd", 1.0, beta, _rand(10, seed=4).abs(), backend)  # float mask weights
    if beta in (0.0, 1.0):  # m equals one of the two: the divergence vanishes
        assert float(L.fused_linear_kd_loss(h, w, teacher, kind="jsd", beta=beta, backend=backend)) == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("backend", FUSED)
def test_kd_masked_tokens_may_hold_garbage(backend):
    h, w = _head(6, 8, 20, torch.float32)
    teacher = _rand(6, 20, seed=2)
    mask = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool, device=DEV)
    poisoned = teacher.clone()
    poisoned[~mask] = float("nan")
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        clean = _grads(lambda a, b: L.fused_linear_kd_loss(a, b, teacher, kind=kind, mask=mask, backend=backend), h, w)
        dirty = _grads(lambda a, b: L.fused_linear_kd_loss(a, b, poisoned, kind=kind, mask=mask, backend=backend), h, w)
        for x, y in zip(dirty, clean):
            assert torch.isfinite(x).all()
            torch.testing.assert_close(x, y, **tol(torch.float32))


# ------------------------------------------------------------------------------------------------------
# Validation


def test_errors_name_the_argument():
    h, w = _head(4, 8, 10, torch.float32)
    y = _labels(4, 10)
    ce = L.fused_linear_cross_entropy
    with pytest.raises(ValueError, match=r"fused_linear_cross_entropy: weight must have shape \[\*, 8\]"):
        ce(h, w[:, :7], y)
    with pytest.raises(TypeError, match=r"weight must have hidden's dtype \(float32\), got float16"):
        ce(h, w.half(), y)
    with pytest.raises(ValueError, match=r"labels must have shape \[4\]"):
        ce(h, w, y[:3])
    with pytest.raises(TypeError, match=r"labels must be int64 / int32, got float32"):
        ce(h, w, y.float())
    with pytest.raises(ValueError, match=r"hidden must have 2 dims"):
        ce(h[None], w, y)
    with pytest.raises(ValueError, match=r"reduction must be 'mean' or 'sum', got 'none'"):
        ce(h, w, y, reduction="none")
    with pytest.raises(ValueError, match=r"weight must have at least one row"):
        ce(h, w[:0], y)
    with pytest.raises(ValueError, match=r"fused_linear_logprobs: temperature must be a number > 0, got 0"):
        L.fused_linear_logprobs(h, w, y, 0)
    with pytest.raises(ValueError, match=r"fused_linear_logprobs: tokens must have shape \[4\]"):
        L.fused_linear_logprobs(h, w, y[:2])
    t = _rand(4, 10)
    with pytest.raises(ValueError, match=r"fused_linear_kd_loss: teacher_logits must have shape \[4, 10\]"):
        L.fused_linear_kd_loss(h, w, t[:, :9])
    with pytest.raises(ValueError, match=r"kind must be one of forward_kl, reverse_kl, jsd, got 'kl'"):
        L.fused_linear_kd_loss(h, w, t, kind="kl")
    with pytest.raises(ValueError, match=r"beta must be a number in \[0, 1\], got 1.5"):
        L.fused_linear_kd_loss(h, w, t, beta=1.5)
    with pytest.raises(ValueError, match=r"mask must have shape \[4\]"):
        L.fused_linear_kd_loss(h, w, t, mask=y[:2] > 0)
    with pytest.raises(ValueError, match=r"student_weight must have shape \[\*, 8\]"):
        L.fused_linear_kd_loss(h, w[:, :3], t)
    lp, old, ref, adv, mask = _grpo_hand_inputs()
    with pytest.raises(ValueError, match=r"grpo_loss: old_logprobs must have shape \[2, 3\]"):
        L.grpo_loss(lp, old[:, :2], ref, adv, mask)
    with pytest.raises(ValueError, match=r"grpo_loss: advantages must have shape \[2\] or \[2, 3\]"):
        L.grpo_loss(lp, old, ref, adv[:1], mask)
    with pytest.raises(TypeError, match=r"grpo_loss: mask must be bool / float32"):
        L.grpo_loss(lp, old, ref, adv, mask.long())
    with pytest.raises(ValueError, match=r"loss_type must be one of grpo, dr_grpo, dapo, got 'ppo'"):
        L.grpo_loss(lp, old, ref, adv, mask, loss_type="ppo")
    with pytest.raises(ValueError, match=r"epsilon_high must be a number >= 0, got -0.1"):
        L.grpo_loss(lp, old, ref, adv, mask, epsilon_high=-0.1)
    with pytest.raises(ValueError, match=r"max_tokens must be an int >= 1 or None, got 0"):
        L.grpo_loss(lp, old, ref, adv, mask, max_tokens=0)
    # the launchers check too, for callers that bypass the op
    from r1kernels.triton.loss import ce_rows_, kd_rows_

    with pytest.raises(ValueError, match=r"ce_rows_: labels must be \[4\]"):
        ce_rows_(torch.zeros(4, 10, device=DEV), y[:3], -100, torch.ones((), device=DEV), torch.zeros(4, device=DEV), True)
    with pytest.raises(ValueError, match=r"kd_rows_: kind must be one of"):
        kd_rows_(torch.zeros(4, 10, device=DEV), t, torch.ones(4, device=DEV), "l2", 1.0, 0.5, torch.zeros(4, device=DEV), True)


# ------------------------------------------------------------------------------------------------------
# GPU: bf16 and the memory requirement at a head with V3's vocabulary


@pytest.mark.gpu
@pytest.mark.parametrize("t,d,v", [(17, 128, 4099), (512, 1024, 129280)])
def test_bf16_on_gpu(t, d, v):
    h, w = _head(t, d, v, torch.bfloat16)
    y = _labels(t, v, ignore_every=9)
    assert_ce_matches_reference(h, w, y, "triton")
    assert_logprobs_match_reference(h, w, _labels(t, v, seed=1), 0.8, "triton")
    assert_kd_matches_reference(h, w, _rand(t, v, seed=5, dtype=torch.bfloat16), "jsd", 2.0, 0.5, None, "triton")


@pytest.mark.gpu
def test_gpu_memory_ratio():
    h, w = _head(4096, 2048, 129280, torch.bfloat16)
    y = _labels(4096, 129280)
    hg, wg = h.requires_grad_(True), w.requires_grad_(True)
    def fused_step():
        return torch.autograd.grad(L.fused_linear_cross_entropy(hg, wg, y, backend="triton"), (hg, wg))

    def unfused_step():  # the head as models run it: bf16 logits, upcast, cross entropy
        return torch.autograd.grad(F.cross_entropy((hg @ wg.t()).float(), y), (hg, wg))

    fused, unfused = peak_extra_bytes(fused_step, DEV), peak_extra_bytes(unfused_step, DEV)
    assert fused * 8 <= unfused, f"fused {fused / 2**30:.2f} GiB vs unfused {unfused / 2**30:.2f} GiB"
