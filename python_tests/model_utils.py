"""Helpers for the model tests: random transformers DeepSeek models saved as HF directories."""
from __future__ import annotations

import torch


def hf_model(kind: str, seed: int = 0, **overrides):
    """A transformers DeepseekV3/V2ForCausalLM with every parameter and buffer randomised (fp32, eval mode).

    Norm weights are 1 + noise, the routing bias is N(0, 0.5) (negative values included), matrices N(0, 0.3/sqrt(fan_in))-ish
    so activations stay O(1) and a 1e-4 logit tolerance is meaningful.
    """
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

    base = dict(
        vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, n_shared_experts=1, n_routed_experts=16, kv_lora_rank=32, q_lora_rank=48,
        qk_rope_head_dim=16, v_head_dim=24, qk_nope_head_dim=16, n_group=4, topk_group=2, num_experts_per_tok=4,
        first_k_dense_replace=1, max_position_embeddings=256, norm_topk_prob=True, routed_scaling_factor=2.5,
    )
    base.update(overrides)
    torch.manual_seed(seed)
    if kind == "v3":
        model = DeepseekV3ForCausalLM(DeepseekV3Config(**base))
    else:
        model = DeepseekV2ForCausalLM(DeepseekV2Config(**base))
    model.eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1] if p.dim() > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g) * (1.5 / fan_in ** 0.5))
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.copy_(0.5 * torch.randn(b.shape, generator=g))
    return model
