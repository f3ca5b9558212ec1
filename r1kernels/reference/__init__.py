"""Pure-PyTorch references: one readable implementation per op, the spec that every kernel is tested against.

They run on any device in fp32 (and in the input dtype where noted), have no dependency beyond torch, and
favour clarity over speed. Tests and benchmarks import them from here; nobody copies them.
"""
from .activation import swiglu, swiglu_backward
from .loss import fused_linear_cross_entropy, fused_linear_kd_loss, fused_linear_logprobs, grpo_loss, head_logits, kd_row_loss
from .mla import mla_attention, mla_cache_append, mla_decode
from .moe import expert_counts, moe_align, moe_experts, moe_route, sequence_balance_loss, update_routing_bias
from .norm import rms_norm, rms_norm_backward
from .quant import fp8_block_dequant
from .sampling import filtered_probs, sample, speculative_verify
from .rope import apply_rope, rope_cos_sin, rope_inv_freq, yarn_get_mscale
from .sparse import compressed_cu_seqlens, nsa_attention, nsa_decode
from .sparse_dsa import dsa_mla_decode, dsa_mla_prefill, dsa_topk, indexer_kl_loss, lightning_indexer

__all__ = [
    "apply_rope", "expert_counts", "fp8_block_dequant", "moe_align", "sequence_balance_loss", "update_routing_bias", "mla_attention", "mla_cache_append", "mla_decode", "moe_experts", "moe_route",
    "rms_norm", "rms_norm_backward", "rope_cos_sin", "rope_inv_freq", "swiglu", "swiglu_backward",
    "yarn_get_mscale",
    "fused_linear_cross_entropy", "fused_linear_kd_loss", "fused_linear_logprobs", "grpo_loss", "head_logits", "kd_row_loss",
    "dsa_mla_decode", "dsa_mla_prefill", "dsa_topk", "indexer_kl_loss", "lightning_indexer",
    "filtered_probs", "sample", "speculative_verify",
    "compressed_cu_seqlens", "nsa_attention", "nsa_decode",
]
