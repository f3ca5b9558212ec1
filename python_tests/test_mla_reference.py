"""MLA references: varlen attention against per-sequence SDPA, paged decode against the varlen form."""
import pytest
import torch
import torch.nn.functional as F

from r1kernels import ops


def test_varlen_attention_matches_sdpa_per_sequence():
    g = torch.Generator().manual_seed(0)
    lens = [5, 0, 17, 1]
    t, h = sum(lens), 3
    q, k = torch.randn(t, h, 24, generator=g), torch.randn(t, h, 24, generator=g)
    v = torch.randn(t, h, 16, generator=g)
    cu = torch.tensor([0, 5, 5, 22, 23], dtype=torch.int32)
    out, lse = ops.mla_attention(q, k, v, cu, 17, softmax_scale=0.3, causal=True, return_lse=True)
    for b, n in enumerate(lens):
        s0 = int(cu[b])
        if n == 0:
            continue
        sl = slice(s0, s0 + n)
        want = F.scaled_dot_product_attention(q[sl].transpose(0, 1), k[sl].transpose(0, 1), v[sl].transpose(0, 1),
                                              is_causal=True, scale=0.3).transpose(0, 1)
        torch.testing.assert_close(out[sl], want, atol=1e-5, rtol=1e-5)
        scores = (q[sl].transpose(0, 1) @ k[sl].transpose(0, 1).transpose(1, 2)) * 0.3
        scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        torch.testing.assert_close(lse[:, sl], scores.logsumexp(-1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sq", [1, 2, 4])
def test_paged_decode_matches_dense_and_ignores_poisoned_slots(sq):
    g = torch.Generator().manual_seed(sq)
    b, h, c, lv, page = 3, 4, 40, 32, 16
    lens = torch.tensor([sq, 17 + sq, 40], dtype=torch.int32)
    kv = torch.full((12, page, c), float("nan"))
    table = torch.tensor([[3, 0, 7], [5, 1, 2], [4, 6, 8]], dtype=torch.int32)
    rows = [torch.randn(int(n), c, generator=g) for n in lens]
    for i, r in enumerate(rows):
        for p in range(r.shape[0]):
            kv[table[i, p // page], p % page] = r[p]
    q = torch.randn(b, sq, h, c, generator=g)
    out, lse = ops.mla_decode(q, kv, table, lens, softmax_scale=0.2, causal=True, head_dim_v=lv)
    assert torch.isfinite(out).all()
    for i, r in enumerate(rows):
        n = r.shape[0]
        s = (q[i].transpose(0, 1) @ r.T) * 0.2  # [H, Sq, n]
        mask = torch.arange(n)[None, :] <= (n - sq + torch.arange(sq))[:, None]
        s = s.masked_fill(~mask, float("-inf"))
        want = (s.softmax(-1) @ r[:, :lv]).transpose(0, 1)
        torch.testing.assert_close(out[i], want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse[i], s.logsumexp(-1), atol=1e-5, rtol=1e-5)


def test_decode_empty_request_gives_zero_not_nan():
    kv = torch.full((2, 16, 8), float("nan"))
    out, lse = ops.mla_decode(torch.randn(2, 1, 2, 8), kv, torch.tensor([[0], [1]], dtype=torch.int32),
                              torch.tensor([0, 0], dtype=torch.int32), softmax_scale=1.0, head_dim_v=4)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isinf(lse).all()


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("sq", [1, 2, 4])
def test_cpu_batched_decode_matches_reference(sq, causal):
    """The `cpu` backend (batched torch) against the reference on a random paged layout with NaN-poisoned
    unused slots, garbage block-table entries past each request's pages, and a request of length 0."""
    g = torch.Generator().manual_seed(10 + sq)
    b, h, c, lv, page, m = 4, 3, 40, 32, 16, 4
    lens = torch.tensor([0, sq, 17 + sq, 61], dtype=torch.int32)
    kv = torch.full((20, page, c), float("nan"))
    table = torch.randperm(20, generator=g)[: b * m].view(b, m).to(torch.int32)
    for i, n in enumerate(lens.tolist()):
        for p in range(n):
            kv[table[i, p // page], p % page] = torch.randn(c, generator=g)
        used = -(-n // page)
        table[i, used:] = 10_000  # never dereferenced
    q = torch.randn(b, sq, h, c, generator=g)
    out, lse = ops.mla_decode(q, kv, table, lens, softmax_scale=0.3, causal=causal, head_dim_v=lv, backend="cpu")
    table_ok = torch.where(table < 20, table, torch.zeros_like(table))
    want, want_lse = ops.mla_decode(q, kv, table_ok, lens, softmax_scale=0.3, causal=causal, head_dim_v=lv,
                                    backend="reference")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)
