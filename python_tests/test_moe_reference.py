"""The MoE routing reference against DESIGN's semantics, checked by brute force on small cases."""
import itertools

import pytest
import torch

from r1kernels import ops, reference


def _brute_force_route(logits, bias, top_k, n_group, topk_group, score_func, group_score, norm, scale):
    """Enumerate the rules literally, one token at a time, in float64."""
    t, e = logits.shape
    per = e // n_group
    weights, ids = [], []
    for row in range(t):
        s = logits[row].double()
        s = s.sigmoid() if score_func == "sigmoid" else s.softmax(-1)
        choice = s + (bias.double() if bias is not None else 0)
        groups = []
        for g in range(n_group):
            vals = sorted(choice[g * per:(g + 1) * per].tolist(), reverse=True)
            groups.append(sum(vals[:2]) if group_score == "top2_sum" else vals[0])
        kept = sorted(range(n_group), key=lambda g: (-groups[g], g))[:topk_group]
        cand = [i for i in range(e) if i // per in kept]
        chosen = sorted(cand, key=lambda i: (-choice[i].item(), i))[:top_k]
        w = torch.tensor([s[i].item() for i in chosen], dtype=torch.float64)
        if norm:
            w = w / w.sum()
        weights.append(w * scale)
        ids.append(chosen)
    return torch.stack(weights).float(), torch.tensor(ids, dtype=torch.int32)


@pytest.mark.parametrize("e,n_group,topk_group,k", [(8, 1, 1, 2), (16, 4, 2, 4), (64, 8, 3, 6), (160, 8, 3, 6)])
@pytest.mark.parametrize("score_func,group_score", [("sigmoid", "top2_sum"), ("softmax", "max")])
@pytest.mark.parametrize("norm", [True, False])
def test_route_matches_brute_force(e, n_group, topk_group, k, score_func, group_score, norm):
    g = torch.Generator().manual_seed(e + k)
    logits = torch.randn(7, e, generator=g) * 2
    bias = torch.randn(e, generator=g) - 0.7  # mostly negative: -inf vs 0.0 masking differs here
    w, ids = ops.moe_route(logits, bias, top_k=k, n_group=n_group, topk_group=topk_group, score_func=score_func,
                           group_score=group_score, norm_topk_prob=norm, routed_scaling_factor=2.5)
    w_ref, ids_ref = _brute_force_route(logits, bias, k, n_group, topk_group, score_func, group_score, norm, 2.5)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w, w_ref, atol=1e-6, rtol=1e-6)


def test_negative_bias_masking_is_minus_inf_not_zero():
    """With all biased scores negative, masking dropped groups with 0.0 would select dropped experts."""
    logits = torch.full((1, 8), -6.0)
    logits[0, 0] = -5.0  # group 0 wins
    bias = torch.full((8,), -1.0)
    w, ids = ops.moe_route(logits, bias, top_k=2, n_group=4, topk_group=1, routed_scaling_factor=1.0)
    assert sorted(ids[0].tolist()) == [0, 1]


def test_ties_resolve_to_lower_expert_index():
    logits = torch.zeros(3, 16)  # every score ties
    w, ids = ops.moe_route(logits, None, top_k=3, n_group=4, topk_group=2)
    assert ids.tolist() == [[0, 1, 2]] * 3
    torch.testing.assert_close(w, torch.full((3, 3), 1 / 3))


def test_route_errors_name_arguments():
    with pytest.raises(ValueError, match="not divisible by n_group"):
        ops.moe_route(torch.zeros(2, 10), None, top_k=2, n_group=4)
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.moe_route(torch.zeros(2, 8), torch.zeros(4), top_k=2)
    with pytest.raises(TypeError, match="bias must be float32"):
        ops.moe_route(torch.zeros(2, 8), torch.zeros(8, dtype=torch.float16), top_k=2)
    with pytest.raises(ValueError, match="top_k=9"):
        ops.moe_route(torch.zeros(2, 8), None, top_k=9)


def test_experts_reference_matches_dense_formula_and_skips_empty_experts():
    g = torch.Generator().manual_seed(0)
    t, d, inter, e, k = 5, 12, 7, 6, 2
    x = torch.randn(t, d, generator=g)
    w13, w2 = torch.randn(e, 2 * inter, d, generator=g), torch.randn(e, d, inter, generator=g)
    ids = torch.tensor([[0, 1], [1, 0], [3, 0], [1, 3], [0, 3]], dtype=torch.int32)  # experts 2, 4, 5 get nothing
    wts = torch.rand(t, k, generator=g)
    y = ops.moe_experts(x, w13, w2, wts, ids)
    want = torch.zeros(t, d)
    for i, j in itertools.product(range(t), range(k)):
        ex = ids[i, j]
        h = w13[ex] @ x[i]
        want[i] += wts[i, j] * (w2[ex] @ (torch.nn.functional.silu(h[:inter]) * h[inter:]))
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="w2 must have shape"):
        ops.moe_experts(x, w13, w2[:, :, :3], wts, ids)
