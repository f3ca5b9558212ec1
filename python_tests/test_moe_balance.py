"""Load balancing: the aux-loss-free bias update and the sequence-wise balance loss."""
import pytest
import torch

import r1kernels
from r1kernels import ops, reference


def test_update_routing_bias_moves_toward_balance():
    bias = torch.tensor([0.1, -0.2, 0.0, 0.3])
    counts = torch.tensor([10, 2, 4, 4], dtype=torch.int32)  # mean 5
    out = ops.update_routing_bias(bias, counts, gamma=0.01)
    assert out is bias
    torch.testing.assert_close(bias, torch.tensor([0.09, -0.19, 0.01, 0.31]))
    with pytest.raises(ValueError, match="counts must have shape"):
        ops.update_routing_bias(bias, torch.zeros(3))


def test_sequence_balance_loss_matches_definition_and_grad():
    g = torch.Generator().manual_seed(0)
    b, s, e, k = 2, 6, 8, 2
    scores = torch.rand(b, s, e, generator=g).requires_grad_()
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(b * s)]).view(b, s, k)
    loss = ops.sequence_balance_loss(scores, ids, alpha=0.1)
    want = 0.0
    for i in range(b):
        f = torch.zeros(e)
        for t in range(s):
            for j in ids[i, t]:
                f[j] += e / (k * s)
        p = (scores[i] / scores[i].sum(-1, keepdim=True)).mean(0)
        want = want + 0.1 * (f * p).sum() / b
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert scores.grad is not None and scores.grad.abs().sum() > 0
    # a perfectly balanced uniform router gives alpha * 1 per sequence (sum f_i = E, P_i = 1/E)
    uni = torch.ones(1, 4, 4)
    ids = torch.tensor([[[0, 1], [2, 3], [0, 1], [2, 3]]])
    torch.testing.assert_close(ops.sequence_balance_loss(uni, ids, alpha=1.0), torch.tensor(1.0))


def test_sequence_balance_loss_mask_drops_padding():
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(1, 5, 4, generator=g)
    ids = torch.randint(0, 4, (1, 5, 1), generator=g)
    mask = torch.tensor([[True, True, True, False, False]])
    torch.testing.assert_close(ops.sequence_balance_loss(scores, ids, mask=mask),
                               ops.sequence_balance_loss(scores[:, :3], ids[:, :3]))


def test_model_accumulates_loads_in_training_and_updates_biases():
    torch.manual_seed(0)
    model = r1kernels.Transformer(r1kernels.ModelConfig.preset("tiny"))
    gate = model.layers[1].mlp.gate
    ids = torch.randint(0, 1024, (2, 8))
    with torch.no_grad():
        model.eval()
        model(ids)
        assert int(gate.tokens_per_expert.sum()) == 0  # eval mode does not count
        model.train()
        model(ids)
    k = model.config.num_experts_per_tok
    assert int(gate.tokens_per_expert.sum()) == 2 * 8 * k
    loads = gate.tokens_per_expert.clone()
    before = gate.e_score_correction_bias.clone()
    model.update_routing_biases(gamma=1e-3)
    step = gate.e_score_correction_bias - before
    torch.testing.assert_close(step, 1e-3 * torch.sign(loads.float().mean() - loads.float()))
    assert int(gate.tokens_per_expert.sum()) == 0
    # the counters are not part of checkpoints
    assert not any("tokens_per_expert" in k for k in model.state_dict())


def test_reference_counts_match_bincount():
    ids = torch.randint(0, 7, (50, 3), dtype=torch.int32)
    torch.testing.assert_close(reference.expert_counts(ids, 9), torch.bincount(ids.flatten().long(), minlength=9).int())
