"""The public functional API. Every op validates its inputs, picks a backend (see ``r1kernels._dispatch``)
and is differentiable where the docstring says so."""
from .activation import SWIGLU, swiglu
from .loss import (FUSED_LINEAR_CROSS_ENTROPY, FUSED_LINEAR_KD_LOSS, FUSED_LINEAR_LOGPROBS, GRPO_LOSS,
                   fused_linear_cross_entropy, fused_linear_kd_loss, fused_linear_logprobs, grpo_loss)
from .mla import MLA_ATTENTION, MLA_CACHE_APPEND, MLA_DECODE, mla_attention, mla_cache_append, mla_decode
from .moe import (MOE_ALIGN, MOE_EXPERTS, MOE_ROUTE, SEQUENCE_BALANCE_LOSS, UPDATE_ROUTING_BIAS, moe_align, moe_experts, moe_route, sequence_balance_loss,
                  update_routing_bias)
from .norm import RMS_NORM, rms_norm
from .quant import FP8_BLOCK_DEQUANT, fp8_block_dequant
from .sampling import SAMPLE, SPECULATIVE_VERIFY, filtered_probs, sample, speculative_verify
from .rope import APPLY_ROPE, apply_rope, rope_cos_sin, rope_inv_freq, yarn_get_mscale
from .sparse import (NSA_ATTENTION, NSA_BLOCK_SCORES, NSA_COMPRESS_ATTENTION, NSA_DECODE, NSA_SELECTED_ATTENTION,
                     NSA_TOPK_BLOCKS, SLIDING_WINDOW_ATTENTION, nsa_attention, nsa_block_scores, nsa_compress_attention,
                     nsa_decode, nsa_selected_attention, nsa_topk_blocks, sliding_window_attention)
from .sparse_dsa import (DSA_MLA_DECODE, DSA_MLA_PREFILL, DSA_TOPK, INDEXER_KL_LOSS, LIGHTNING_INDEXER,
                         dsa_mla_decode, dsa_mla_prefill, dsa_topk, indexer_kl_loss, lightning_indexer)

# Every dispatched op, for r1kernels.info() and the tests that walk all of them.
ALL_OPS = (RMS_NORM, APPLY_ROPE, SWIGLU, FP8_BLOCK_DEQUANT, MOE_ROUTE, MOE_ALIGN, MOE_EXPERTS, UPDATE_ROUTING_BIAS, SEQUENCE_BALANCE_LOSS, MLA_ATTENTION, MLA_CACHE_APPEND, MLA_DECODE,
           FUSED_LINEAR_CROSS_ENTROPY, FUSED_LINEAR_LOGPROBS, GRPO_LOSS, FUSED_LINEAR_KD_LOSS,
           LIGHTNING_INDEXER, DSA_TOPK, DSA_MLA_PREFILL, DSA_MLA_DECODE, INDEXER_KL_LOSS, SAMPLE, SPECULATIVE_VERIFY,
           NSA_COMPRESS_ATTENTION, NSA_BLOCK_SCORES, NSA_TOPK_BLOCKS, NSA_SELECTED_ATTENTION, SLIDING_WINDOW_ATTENTION,
           NSA_ATTENTION, NSA_DECODE)

__all__ = [
    "ALL_OPS", "apply_rope", "fp8_block_dequant", "mla_attention", "mla_cache_append", "mla_decode", "moe_align", "moe_experts", "moe_route", "sequence_balance_loss", "update_routing_bias", "rms_norm", "rope_cos_sin", "rope_inv_freq", "swiglu",
    "yarn_get_mscale",
    "fused_linear_cross_entropy", "fused_linear_kd_loss", "fused_linear_logprobs", "grpo_loss",
    "dsa_mla_decode", "dsa_mla_prefill", "dsa_topk", "indexer_kl_loss", "lightning_indexer",
    "filtered_probs", "sample", "speculative_verify",
    "nsa_attention", "nsa_block_scores", "nsa_compress_attention", "nsa_decode", "nsa_selected_attention",
    "nsa_topk_blocks", "sliding_window_attention",
]
