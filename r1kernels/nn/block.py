"""The transformer block and the multi-token-prediction (MTP) module of DeepSeek-V3.

Letters: B batch, S sequence, D hidden.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..config import ModelConfig
from .mla import MLA, LatentKVCache
from .moe import MLP, MoE
from .norm import RMSNorm


def _attention(cfg: ModelConfig) -> nn.Module:
    """The attention module ``cfg.attention`` names (the sparse ones are imported only when used)."""
    if cfg.attention == "nsa":
        from .sparse import NSAttention

        return NSAttention(cfg)
    if cfg.attention == "mla_dsa":
        from .sparse_dsa import MLADSA

        return MLADSA(cfg)
    return MLA(cfg)


class Block(nn.Module):
    """Pre-norm block: ``h = h + MLA(norm(h))``, ``h = h + FFN(norm(h))``; FFN is MoE or a dense MLP."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = _attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                cache: Optional[LatentKVCache] = None, absorbed: bool = False,
                balance: Optional[list] = None, aux: Optional[list] = None) -> torch.Tensor:
        """h ``[B, S, D]`` -> ``[B, S, D]``; with a cache, this block uses its slot ``layer_idx``.
        ``balance``: a list that MoE layers append their routing to (see ``MoE.forward``); ``aux``: a list
        that attention modules with a training loss of their own (DSA's indexer) append it to."""
        extra = {"aux": aux} if aux is not None and getattr(self.self_attn, "has_aux_loss", False) else {}
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, cache=cache, layer_idx=self.layer_idx,
                               absorbed=absorbed, **extra)
        x = self.post_attention_layernorm(h)
        return h + (self.mlp(x, balance) if balance is not None and isinstance(self.mlp, MoE) else self.mlp(x))


class SharedHeadNorm(nn.Module):
    """The MTP module's own final norm (``shared_head.norm`` in checkpoints); the head itself is the model's."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h)


class MTPModule(nn.Module):
    """Multi-token prediction depth k (DeepSeek-V3 section 2.2).

    ``h_k = Block(eh_proj([enorm(Emb(t_{i+k})); hnorm(h_{k-1, i})]))``; logits = head(shared_head.norm(h_k))
    predict token i+k+1. The embedding and the output head are the main model's (shared); the concatenation
    order (embedding first) is the checkpoints' ``eh_proj`` layout.
    """

    def __init__(self, cfg: ModelConfig, depth: int):
        super().__init__()
        d = cfg.hidden_size
        self.enorm = RMSNorm(d, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(d, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * d, d, bias=False)
        self.block = Block(cfg, cfg.num_hidden_layers + depth)
        self.shared_head = SharedHeadNorm(cfg)

    def forward(self, h_prev: torch.Tensor, emb_next: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                cache: Optional[LatentKVCache] = None, balance: Optional[list] = None) -> torch.Tensor:
        """h_prev, emb_next ``[B, S, D]`` -> the depth's hidden state ``[B, S, D]`` (before shared_head.norm).
        ``cache`` (drafting): the block writes and attends through it like a main layer; ``balance``: see
        ``Block.forward``."""
        x = self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h_prev)], dim=-1))  # [B, S, 2D] -> [B, S, D]
        return self.block(x, cos, sin, cache=cache, balance=balance)
