"""Feed-forward layers: the dense SwiGLU MLP and the DeepSeek MoE (gate, stacked routed experts, shared experts).

Letters: B batch, S sequence, T = B*S tokens, D hidden, E routed experts, K experts per token, I expert
intermediate size.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..config import ModelConfig


class MLP(nn.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))``: the dense layers' MLP and the shared experts."""

    def __init__(self, dim: int, inter_dim: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter_dim, bias=bias)
        self.up_proj = nn.Linear(dim, inter_dim, bias=bias)
        self.down_proj = nn.Linear(inter_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.swiglu(self.gate_proj(x), self.up_proj(x)))


class Gate(nn.Module):
    """The router: fp32 logits ``x W_g^T`` then group-limited top-k (``ops.moe_route``).

    ``weight [E, D]`` is kept in fp32 (as DeepSeek and transformers do) whatever the model dtype;
    ``e_score_correction_bias [E]`` (fp32, V3 only) steers selection and is updated without gradient by
    aux-loss-free balancing.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.routing_groups
        self.score_func = cfg.scoring_func
        self.group_score = cfg.group_score
        self.norm_topk_prob = cfg.norm_topk_prob
        self.routed_scaling_factor = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size, dtype=torch.float32))
        if cfg.topk_method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None
        # Tokens routed to each expert since the last bias update, accumulated in training mode on the
        # device (no host sync); read and cleared by update_bias().
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.n_routed_experts, dtype=torch.int64), persistent=False)

    def forward(self, x: torch.Tensor, return_logits: bool = False):
        """x ``[T, D]`` -> ``(weights [T, K] fp32, expert_ids [T, K] int32)`` (and the router logits
        ``[T, E]`` fp32 when ``return_logits``, for the sequence-wise balance loss)."""
        logits = F.linear(x.float(), self.weight.float())  # [T, E] fp32, routing is precision-sensitive
        weights, expert_ids, counts = ops.moe_route(
            logits, self.e_score_correction_bias, top_k=self.top_k, n_group=self.n_group,
            topk_group=self.topk_group, score_func=self.score_func, group_score=self.group_score,
            norm_topk_prob=self.norm_topk_prob, routed_scaling_factor=self.routed_scaling_factor, return_counts=True,
        )
        if self.training:
            self.tokens_per_expert += counts
        return (weights, expert_ids, logits) if return_logits else (weights, expert_ids)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Router logits ``[..., E]`` -> the unbiased affinity scores (sigmoid for V3, softmax for V2)."""
        return torch.sigmoid(logits) if self.score_func == "sigmoid" else torch.softmax(logits, dim=-1)

    def update_bias(self, gamma: float = 1e-3) -> None:
        """One aux-loss-free balancing step from the loads seen since the last call (then cleared).

        Called by the trainer after each optimiser step (DeepSeek-V3: gamma = 1e-3). A no-op for routers
        without a selection bias (V2).
        """
        if self.e_score_correction_bias is not None:
            ops.update_routing_bias(self.e_score_correction_bias, self.tokens_per_expert, gamma)
        self.tokens_per_expert.zero_()


class Experts(nn.Module):
    """The routed experts, stacked: ``w13 [E, 2I, D]`` (gate_proj rows then up_proj rows), ``w2 [E, D, I]``.

    Stacked so that grouped-GEMM kernels read one tensor; checkpoints' per-expert tensors load into slices.
    """

    def __init__(self, n_experts: int, dim: int, inter_dim: int):
        super().__init__()
        self.w13 = nn.Parameter(torch.empty(n_experts, 2 * inter_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, inter_dim))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        return ops.moe_experts(x, self.w13, self.w2, weights, expert_ids)


class MoE(nn.Module):
    """DeepSeekMoE: ``sum_k w_k * expert_k(x) + shared(x)`` (the shared experts are not scaled)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Gate(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, bias=cfg.mlp_bias)
            if cfg.n_shared_experts > 0 else None
        )

    def forward(self, x: torch.Tensor, balance: Optional[list] = None) -> torch.Tensor:
        """x ``[B, S, D]`` -> ``[B, S, D]``. ``balance``: when a list, the layer appends
        ``(scores [B, S, E], expert_ids [B, S, K])`` for the sequence-wise balance loss (training)."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [B, S, D] -> [T, D]
        if balance is None:
            weights, expert_ids = self.gate(flat)
        else:
            weights, expert_ids, logits = self.gate(flat, return_logits=True)
            balance.append((self.gate.scores(logits).view(*shape[:-1], -1), expert_ids.view(*shape[:-1], -1)))
        y = self.experts(flat, weights, expert_ids).view(shape)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y
