"""``nn.Module`` building blocks over ``r1kernels.ops``."""
from .block import Block, MTPModule
from .mla import MLA, LatentKVCache
from .moe import MLP, Experts, Gate, MoE
from .norm import RMSNorm
from .rope import RotaryEmbedding

__all__ = ["Block", "Experts", "Gate", "LatentKVCache", "MLA", "MLP", "MTPModule", "MoE", "RMSNorm", "RotaryEmbedding"]
