"""ModelConfig: reading DeepSeek's config.json files, presets, derived quantities, validation."""
import json
import math

import pytest
import torch

import r1kernels
from r1kernels import ModelConfig

# The fields of DeepSeek's released config.json files that ModelConfig reads (values as published).
V3_JSON = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_nextn_predict_layers": 1, "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1,
    "n_routed_experts": 256, "ep_size": 1, "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8,
    "topk_group": 4, "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3,
    "norm_topk_prob": True, "scoring_func": "sigmoid", "hidden_act": "silu", "max_position_embeddings": 163840,
    "rms_norm_eps": 1e-06, "rope_theta": 10000, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "bos_token_id": 0, "eos_token_id": 1,
}
V2_LITE_JSON = {
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "vocab_size": 102400,
    "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
    "num_attention_heads": 16, "num_key_value_heads": 16, "n_shared_experts": 2, "n_routed_experts": 64,
    "routed_scaling_factor": 1.0, "kv_lora_rank": 512, "q_lora_rank": None, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "greedy", "n_group": 1, "topk_group": 1,
    "num_experts_per_tok": 6, "moe_layer_freq": 1, "first_k_dense_replace": 1, "norm_topk_prob": False,
    "scoring_func": "softmax", "aux_loss_alpha": 0.001, "seq_aux": True, "hidden_act": "silu",
    "max_position_embeddings": 163840, "rms_norm_eps": 1e-06, "rope_theta": 10000, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "bos_token_id": 100000, "eos_token_id": 100001,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
}
V2_JSON = dict(V2_LITE_JSON, hidden_size=5120, intermediate_size=12288, num_hidden_layers=60,
               num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536, n_routed_experts=160,
               routed_scaling_factor=16.0, topk_method="group_limited_greedy", n_group=8, topk_group=3,
               moe_intermediate_size=1536, first_k_dense_replace=1)


def test_v3_and_r1_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(V3_JSON))
    cfg = ModelConfig.from_hf(tmp_path)
    assert cfg == ModelConfig.preset("v3") == ModelConfig.preset("r1")
    assert cfg.qk_head_dim == 192 and cfg.group_score == "top2_sum" and cfg.routing_groups == (8, 4)
    m = 0.1 * math.log(40) + 1
    assert cfg.softmax_scale == pytest.approx(192 ** -0.5 * m * m)
    assert [cfg.is_moe_layer(i) for i in (0, 2, 3, 60)] == [False, False, True, True]
    # 671B in the main model, 14B more in the MTP module (whose embedding and head are shared here)
    main = dataclass_replace(cfg, num_nextn_predict_layers=0).num_parameters()
    assert 670e9 < main < 672e9


def dataclass_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def test_v2_lite_and_v2_configs():
    lite = ModelConfig.from_hf(V2_LITE_JSON)
    assert lite == ModelConfig.preset("v2-lite")
    assert lite.q_lora_rank is None and lite.scoring_func == "softmax" and lite.routing_groups == (1, 1)
    assert 15.5e9 < lite.num_parameters() < 15.9e9  # V2-Lite: 15.7B
    v2 = ModelConfig.from_hf(V2_JSON)
    assert v2.group_score == "max" and v2.routing_groups == (8, 3) and v2.norm_topk_prob is False
    assert 234e9 < v2.num_parameters() < 238e9  # V2: 236B


def test_transformers_written_config_roundtrip(tmp_path):
    transformers = pytest.importorskip("transformers")
    tiny = ModelConfig.preset("tiny")
    hf_cfg = transformers.DeepseekV3Config(**tiny.to_hf_dict())
    hf_cfg.save_pretrained(tmp_path)  # transformers 5 writes rope_parameters, not rope_scaling
    back = ModelConfig.from_hf(tmp_path / "config.json")
    for field in ("hidden_size", "q_lora_rank", "kv_lora_rank", "n_group", "topk_group", "first_k_dense_replace",
                  "rope_interleave", "norm_topk_prob", "routed_scaling_factor", "rope_theta"):
        assert getattr(back, field) == getattr(tiny, field), field
    assert back.rope_kwargs["factor"] == tiny.rope_kwargs["factor"]
    assert back.softmax_scale == pytest.approx(tiny.softmax_scale)


def test_v3_preset_builds_on_meta():
    with torch.device("meta"):
        model = r1kernels.Transformer(ModelConfig.preset("v3"))
    n = sum(p.numel() for p in model.parameters())
    assert n == ModelConfig.preset("v3").num_parameters()
    assert model.layers[3].mlp.experts.w13.shape == (256, 4096, 7168)
    assert model.layers[0].self_attn.kv_b_proj.weight.shape == (128 * 256, 512)


def test_tiny_parameter_count_and_forward():
    cfg = ModelConfig.preset("tiny")
    model = r1kernels.Transformer(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_parameters()
    assert 2e6 < cfg.num_parameters() < 10e6
    with torch.no_grad():
        logits = model(torch.randint(0, cfg.vocab_size, (2, 11)))
    assert logits.shape == (2, 11, cfg.vocab_size) and logits.dtype == torch.float32 and torch.isfinite(logits).all()


@pytest.mark.parametrize("bad,match", [
    (dict(n_routed_experts=10, n_group=4), "divisible by n_group"),
    (dict(topk_group=9), "topk_group"),
    (dict(qk_rope_head_dim=15), "even"),
    (dict(topk_method="random"), "topk_method"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "not supported"),
])
def test_invalid_configs_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        dataclass_replace(ModelConfig.preset("tiny"), **bad)


def test_unknown_preset_and_model_type():
    with pytest.raises(ValueError, match="unknown preset"):
        ModelConfig.preset("v4")
    with pytest.raises(ValueError, match="model_type"):
        ModelConfig.from_hf(dict(V3_JSON, model_type="llama"))


def test_model_input_errors():
    model = r1kernels.Transformer(ModelConfig.preset("tiny"))
    with pytest.raises(ValueError, match=r"input_ids must be \[B, S\]"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="int32 / int64"):
        model(torch.zeros(1, 5))
