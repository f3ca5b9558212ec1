"""The model-level training losses: next-token cross entropy, DeepSeek-V3's MTP loss, LayerSkip's
early-exit loss and the sequence-wise MoE balance loss, on the fused loss kernels.

Letters: B sequences, S tokens per sequence, D hidden, V vocabulary, L layers, e an exit layer count,
k an MTP depth.

    total = CE(head(h_L))                                   main next-token loss
          + Σ_e w_e · CE(head(norm(h_e)))                   early exit (LayerSkip), the shared norm and head
          + λ / n · Σ_k CE_k(head(mtp_k))                    MTP, depth k predicts token i + k + 1
          + α · Σ_layers Σ_i f_i P_i                          sequence-wise balance (DeepSeek-V3 eq. 17-20)
          + w_aux · Σ_layers aux                              attention modules' own losses (DSA's indexer KL)

Every cross entropy is ``ops.fused_linear_cross_entropy`` over the flattened tokens, so no ``[B·S, V]``
logits tensor is ever alive.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .. import ops

IGNORE_INDEX = -100


@dataclass
class LossConfig:
    """Which auxiliary losses to add and how much.

    Attributes:
        mtp_weight: λ of the MTP loss (DeepSeek-V3 used 0.3 then 0.1); 0 turns it off.
        exit_layers: layer counts e (1 .. L-1) whose normalised hidden state is trained through the shared
            head (LayerSkip), so the model can draft from its first e layers.
        exit_weight: the weight of each early-exit loss (scaled per step by the trainer's schedule).
        balance_alpha: α of the sequence-wise balance loss (DeepSeek-V3: 1e-4); 0 turns it off.
        aux_weight: weight of the attention modules' own losses (DSA's indexer KL), when the model has them.
    """

    mtp_weight: float = 0.0
    exit_layers: tuple = ()
    exit_weight: float = 0.0
    balance_alpha: float = 0.0
    aux_weight: float = 1.0


@dataclass
class LossOutput:
    """``total``: the scalar to minimise; ``parts``: each term (detached) for logging; ``hidden``: the main
    model's final-normed hidden states ``[B, S, D]`` (for a caller's extra loss on the same forward)."""

    total: torch.Tensor
    parts: dict = field(default_factory=dict)
    hidden: Optional[torch.Tensor] = None


def shifted_labels(input_ids: torch.Tensor, labels: Optional[torch.Tensor], shift: int) -> torch.Tensor:
    """The targets of positions ``0 .. S-1-shift``: ``labels[:, shift:]`` flattened (``labels`` defaults to
    the input ids; positions to skip carry ``IGNORE_INDEX``)."""
    lab = input_ids if labels is None else labels
    return lab[:, shift:].reshape(-1)


def causal_lm_loss(model, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                   config: LossConfig = LossConfig(), *, exit_scale: float = 1.0) -> LossOutput:
    """The training loss of a :class:`r1kernels.Transformer` on a batch.

    Args:
        input_ids: ``[B, S]`` int64.
        labels: ``[B, S]`` int64 aligned with ``input_ids`` (token i's own id, or ``IGNORE_INDEX`` where it
            must not be learnt, e.g. the prompt and the padding); the loss at position i predicts labels[i+1].
            None: every token is learnt.
        config: the auxiliary losses.
        exit_scale: multiplies ``config.exit_weight`` (the trainer's early-exit schedule).
    Returns:
        :class:`LossOutput` with ``parts``: ``ce``, ``exit_<e>``, ``mtp_<k>``, ``attention_aux``, ``balance`` as
        present.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"causal_lm_loss: input_ids must be [B, S], got {tuple(input_ids.shape)}")
    if labels is not None and labels.shape != input_ids.shape:
        raise ValueError(f"causal_lm_loss: labels must have input_ids' shape {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
    w = model.head_weight()
    d = w.shape[1]
    balance = [] if config.balance_alpha > 0 else None
    exit_layers = tuple(config.exit_layers) if config.exit_weight * exit_scale > 0 else ()
    aux = [] if config.aux_weight > 0 and any(getattr(m, "has_aux_loss", False) for m in model.modules()) else None
    hidden, exits = model.forward_train(input_ids, exit_layers=exit_layers, balance=balance, aux=aux)  # [B, S, D]
    target = shifted_labels(input_ids, labels, 1)

    def ce(h: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        return ops.fused_linear_cross_entropy(h.reshape(-1, d), w, tgt, IGNORE_INDEX)

    main = ce(hidden[:, :-1], target)
    total = main
    parts = {"ce": main.detach()}
    for e, h in exits.items():
        loss = ce(h[:, :-1], target)
        total = total + config.exit_weight * exit_scale * loss
        parts[f"exit_{e}"] = loss.detach()
    if config.mtp_weight > 0 and len(model.mtp):
        depths = model.mtp_hidden(hidden, input_ids, balance=balance)
        for k, h in enumerate(depths, start=1):
            # depth k's row i predicts token i + k + 1; its last row has no target
            if h.shape[1] <= 1:
                continue
            loss = ce(h[:, :-1], shifted_labels(input_ids, labels, k + 1))
            total = total + config.mtp_weight / len(model.mtp) * loss
            parts[f"mtp_{k}"] = loss.detach()
    if aux:
        extra = sum(aux)
        total = total + config.aux_weight * extra
        parts["attention_aux"] = extra.detach()
    if balance:
        bal = sum(ops.sequence_balance_loss(scores, ids, alpha=config.balance_alpha) for scores, ids in balance)
        total = total + bal
        parts["balance"] = bal.detach()
    return LossOutput(total, parts, hidden)
