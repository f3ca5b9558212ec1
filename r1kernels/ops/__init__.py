"""The public functional API. Every op validates its inputs, picks a backend (see ``r1kernels._dispatch``)
and is differentiable where the docstring says so."""
from .activation import SWIGLU, swiglu
from .mla import MLA_ATTENTION, MLA_CACHE_APPEND, MLA_DECODE, mla_attention, mla_cache_append, mla_decode
from .moe import (MOE_ALIGN, MOE_EXPERTS, MOE_ROUTE, SEQUENCE_BALANCE_LOSS, UPDATE_ROUTING_BIAS, moe_align, moe_experts, moe_route, sequence_balance_loss,
                  update_routing_bias)
from .norm import RMS_NORM, rms_norm
from .quant import FP8_BLOCK_DEQUANT, fp8_block_dequant
from .rope import APPLY_ROPE, apply_rope, rope_cos_sin, rope_inv_freq, yarn_get_mscale

# Every dispatched op, for r1kernels.info() and the tests that walk all of them.
ALL_OPS = (RMS_NORM, APPLY_ROPE, SWIGLU, FP8_BLOCK_DEQUANT, MOE_ROUTE, MOE_ALIGN, MOE_EXPERTS, UPDATE_ROUTING_BIAS, SEQUENCE_BALANCE_LOSS, MLA_ATTENTION, MLA_CACHE_APPEND, MLA_DECODE)

__all__ = [
    "ALL_OPS", "apply_rope", "fp8_block_dequant", "mla_attention", "mla_cache_append", "mla_decode", "moe_align", "moe_experts", "moe_route", "sequence_balance_loss", "update_routing_bias", "rms_norm", "rope_cos_sin", "rope_inv_freq", "swiglu",
    "yarn_get_mscale",
]
