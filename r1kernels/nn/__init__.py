"""``nn.Module`` building blocks over ``r1kernels.ops``."""
from .block import Block, MTPModule
from .mla import MLA, LatentKVCache
from .moe import MLP, Experts, Gate, MoE
from .norm import RMSNorm
from .rope import RotaryEmbedding
from .sparse import BlockCompressor, NSACache, NSAttention
from .sparse_dsa import MLADSA, LightningIndexer

__all__ = ["Block", "BlockCompressor", "Experts", "Gate", "LatentKVCache", "LightningIndexer", "MLA", "MLADSA", "MLP",
           "MTPModule", "MoE", "NSACache", "NSAttention", "RMSNorm", "RotaryEmbedding"]
