"""Logit parity with transformers' DeepseekV3 / DeepseekV2 (an implementation nobody here wrote).

Random tiny models with every parameter randomised (norm weights and negative routing biases included)
are saved with ``save_pretrained``, loaded with ``r1kernels.load_pretrained`` and compared in fp32 on CPU.
"""
import warnings

import pytest
import torch
from conftest import MODEL_ATOL
from model_utils import hf_model

import r1kernels

pytest.importorskip("transformers")

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 0.8}
YARN_V2 = {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
           "mscale": 0.707, "mscale_all_dim": 0.707}

# (id, kind, overrides): together they cover q_lora_rank None and set, yarn, n_group 1 and > 1, norm_topk_prob
# on and off, first_k_dense_replace 0 and 1, both RoPE layouts, tied embeddings, V2 greedy and group-limited.
CONFIGS = [
    ("v3-qlora-yarn-groups", "v3", dict(rope_scaling=YARN)),
    ("v3-noqlora-1group-nonorm-dense0", "v3", dict(q_lora_rank=None, n_group=1, topk_group=1, norm_topk_prob=False,
                                                   first_k_dense_replace=0)),
    ("v3-8groups-halfsplit-tied", "v3", dict(n_group=8, topk_group=3, num_experts_per_tok=5, rope_interleave=False,
                                             tie_word_embeddings=True, first_k_dense_replace=2, num_hidden_layers=4,
                                             rope_scaling=dict(YARN, mscale_all_dim=0.0))),
    ("v3-allgroups-scale1-nonorm", "v3", dict(topk_group=4, routed_scaling_factor=1.0, norm_topk_prob=False,
                                              n_shared_experts=2, rope_scaling=dict(YARN, factor=16.0, mscale=0.9,
                                                                                    mscale_all_dim=1.3))),
    ("v3-all-dense", "v3", dict(first_k_dense_replace=3)),
    ("v2-lite-like-greedy-yarn", "v2", dict(q_lora_rank=None, topk_method="greedy", n_group=None, topk_group=None,
                                            norm_topk_prob=False, routed_scaling_factor=1.0, n_shared_experts=2,
                                            num_experts_per_tok=6, rope_scaling=YARN_V2)),
    ("v2-group-limited-qlora-dense0", "v2", dict(topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                                 norm_topk_prob=False, routed_scaling_factor=16.0,
                                                 first_k_dense_replace=0)),
    ("v2-group-limited-dense1-noyarn", "v2", dict(topk_method="group_limited_greedy", n_group=8, topk_group=3,
                                                  norm_topk_prob=False, routed_scaling_factor=1.0)),
]


def _load(tmp_path, hf):
    hf.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no MTP layers in transformers' checkpoints: expected
        return r1kernels.load_pretrained(tmp_path, dtype=torch.float32)


@pytest.mark.parametrize("name,kind,overrides", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_logits_match_transformers(tmp_path, name, kind, overrides):
    hf = hf_model(kind, seed=len(name), **overrides)
    ours = _load(tmp_path, hf)
    ids = torch.randint(0, hf.config.vocab_size, (2, 37), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = hf(ids).logits.float()
        out = ours(ids)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    # the comparison must not be trivial: logits vary
    assert ref.std() > 0.1
    torch.testing.assert_close(out, ref, atol=MODEL_ATOL, rtol=0)


@pytest.mark.parametrize("name,kind,overrides", CONFIGS[:2] + CONFIGS[5:6], ids=[c[0] for c in CONFIGS[:2] + CONFIGS[5:6]])
def test_absorbed_and_cached_decode_match_expanded(tmp_path, name, kind, overrides):
    """The absorbed (latent-cache) formulation equals the expanded one, in one pass and token by token."""
    ours = _load(tmp_path, hf_model(kind, seed=3, **overrides))
    ids = torch.randint(0, ours.config.vocab_size, (3, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = ours(ids)
        absorbed = ours(ids, absorbed=True)
        cache = ours.new_cache(3, 32, page_size=16)
        steps = [ours(ids[:, :9], cache=cache)]  # prefill 9, then 3 + 1 + ... tokens
        pos = 9
        for n in (3, 1, 1, 5, 2):
            steps.append(ours(ids[:, pos:pos + n], cache=cache))
            pos += n
    torch.testing.assert_close(absorbed, full, atol=MODEL_ATOL, rtol=0)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=MODEL_ATOL, rtol=0)
    assert cache.seqlens.tolist() == [21, 21, 21]


def test_cache_poisoned_slots_do_not_leak(tmp_path):
    """Cache rows past each request's length hold NaN; decoding must not read them."""
    ours = _load(tmp_path, hf_model("v3", seed=5))
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(2))
    cache = ours.new_cache(2, 40, page_size=16)
    cache.kv.fill_(float("nan"))
    with torch.no_grad():
        a = torch.cat([ours(ids[:, :7], cache=cache), ours(ids[:, 7:], cache=cache)], dim=1)
        full = ours(ids)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, full, atol=MODEL_ATOL, rtol=0)


def test_cache_overflow_is_an_error(tmp_path):
    ours = r1kernels.Transformer(r1kernels.ModelConfig.preset("tiny"))
    cache = ours.new_cache(1, 16, page_size=16)
    with torch.no_grad():
        ours(torch.zeros(1, 10, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="do not fit"):
            ours(torch.zeros(1, 7, dtype=torch.long), cache=cache)


@pytest.mark.parametrize("rope", [YARN, YARN_V2, dict(YARN, mscale=None, mscale_all_dim=None), None])
def test_rope_tables_match_transformers(rope):
    """Our YaRN inverse frequencies and attention factor against transformers' rope initialisation."""
    from transformers import DeepseekV3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    kw = {} if rope is None else {"rope_scaling": {k: v for k, v in rope.items() if v is not None}}
    hf_cfg = DeepseekV3Config(qk_rope_head_dim=64, max_position_embeddings=4096, **kw)
    ours = r1kernels.ModelConfig.from_hf(hf_cfg.to_dict())
    inv, factor = r1kernels.ops.rope_inv_freq(64, ours.rope_theta, **ours.rope_kwargs)
    if rope is None:
        want_inv = 1.0 / (10000 ** (torch.arange(0, 64, 2, dtype=torch.float) / 64))
        want_factor = 1.0
    else:
        want_inv, want_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg)
    torch.testing.assert_close(inv, want_inv, atol=0, rtol=1e-6)
    assert factor == pytest.approx(want_factor, rel=1e-12)


def test_our_checkpoints_load_in_transformers(tmp_path):
    """save_pretrained writes DeepSeek's format: transformers loads it and gives the same logits."""
    from transformers import DeepseekV3ForCausalLM
    from transformers.utils import logging as hf_logging

    torch.manual_seed(0)
    ours = r1kernels.Transformer(r1kernels.ModelConfig.preset("tiny"))
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if "norm" in n:
                p.add_(0.2 * torch.randn_like(p))
        for n, b in ours.named_buffers():
            if "e_score_correction_bias" in n:
                b.normal_(0, 0.5)
    ours.save_pretrained(tmp_path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # transformers does not model the MTP layer: it reports its tensors as unexpected
    try:
        hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path).eval()
    finally:
        hf_logging.set_verbosity(verbosity)
    ids = torch.randint(0, 1024, (2, 19), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits.float(), atol=MODEL_ATOL, rtol=0)
