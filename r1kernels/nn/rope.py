"""Rotary embedding tables for a model config (YaRN included)."""
from __future__ import annotations

import torch
from torch import nn

from .. import ops


class RotaryEmbedding(nn.Module):
    """Holds ``inv_freq [R/2]`` for the config's rotary dim and scaling; ``forward(positions)`` gives cos/sin.

    ``inv_freq`` is a non-persistent buffer: it is derived from the config, never loaded from a
    checkpoint; ``reset_parameters`` recomputes it (needed after building on the meta device).
    """

    def __init__(self, dim: int, base: float, rope_kwargs: dict):
        super().__init__()
        self.dim, self.base, self.rope_kwargs = dim, base, dict(rope_kwargs)
        inv_freq, self.attention_factor = ops.rope_inv_freq(dim, base, **self.rope_kwargs)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def reset_parameters(self) -> None:
        inv_freq, self.attention_factor = ops.rope_inv_freq(self.dim, self.base, **self.rope_kwargs)
        self.inv_freq = inv_freq.to(self.inv_freq.device)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions ``[B, S]`` int -> ``(cos, sin)`` each ``[B, S, R/2]`` fp32 (YaRN factor folded in)."""
        return ops.rope_cos_sin(positions, self.inv_freq, self.attention_factor)
