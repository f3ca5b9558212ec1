"""The DeepSeek-V2 / V3 / R1 transformer, top to bottom.

Letters: B batch, S sequence, D hidden, V vocabulary.

    h = embed_tokens(input_ids)
    for each layer:  h = h + MLA(norm(h));  h = h + (MoE or MLP)(norm(h))
    logits = lm_head(norm(h))                                  (float32)
    MTP depth k (optional): h_k = MTP_k(h_{k-1}[:, :-k], embed(input_ids[:, k:]))  -> logits of token i+k+1
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ..config import ModelConfig
from ..nn import Block, LatentKVCache, MTPModule, RMSNorm, RotaryEmbedding


class Transformer(nn.Module):
    """A complete DeepSeek model. Build the full-size presets under ``torch.device("meta")``.

    ``forward(input_ids [B, S]) -> logits [B, S, V]`` float32. Parameter names follow DeepSeek's
    checkpoints without the ``model.`` prefix (``layers.3.self_attn.kv_b_proj.weight``), except the routed
    experts, stacked as ``layers.i.mlp.experts.w13 [E, 2I, D]`` / ``w2 [E, D, I]``, and the MTP modules,
    ``mtp.k.*`` (layer ``num_hidden_layers + k`` in checkpoints).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPModule(config, k) for k in range(config.num_nextn_predict_layers))
        self.rotary = RotaryEmbedding(config.qk_rope_head_dim, config.rope_theta, config.rope_kwargs)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    # ------------------------------------------------------------------ parameters
    def init_weights(self, std: float = 0.02) -> None:
        """Normal(0, std) for matrices and embeddings, ones for norms, zeros for biases and the routing bias."""
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.zero_()
                else:
                    p.normal_(0.0, std)
        for name, buf in self.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.zero_()
        self.reset_derived_buffers()

    def reset_derived_buffers(self) -> None:
        """Recompute the buffers that checkpoints do not hold (RoPE tables, load counters), e.g. after the
        model was built on the meta device and materialised with ``to_empty``."""
        self.rotary.reset_parameters()
        for name, buf in self.named_buffers():
            if name.endswith("tokens_per_expert"):
                buf.zero_()

    def head_weight(self) -> torch.Tensor:
        """``[V, D]``: the output projection (the embedding when tied)."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden ``[..., D]`` -> float32 logits ``[..., V]``."""
        return nn.functional.linear(hidden, self.head_weight()).float()

    def update_routing_biases(self, gamma: float = 1e-3) -> None:
        """Aux-loss-free balancing for every MoE layer (main and MTP) from the loads seen in training mode."""
        for mod in self.modules():
            if hasattr(mod, "update_bias") and hasattr(mod, "tokens_per_expert"):
                mod.update_bias(gamma)

    def save_pretrained(self, path, **kwargs) -> None:
        """Write a Hugging Face directory atomically (see ``r1kernels.model.checkpoint.save_pretrained``)."""
        from .checkpoint import save_pretrained

        save_pretrained(self, path, **kwargs)

    # ------------------------------------------------------------------ forward passes
    def _make_cache(self, num_layers: int, first_layer: int, batch_size: int, max_seqlen: int, page_size: int,
                    dtype: Optional[torch.dtype]):
        cfg = self.config
        p = self.embed_tokens.weight
        kw = dict(page_size=page_size, dtype=dtype or p.dtype, device=p.device, first_layer=first_layer)
        if cfg.attention == "nsa":
            from ..nn.sparse import NSACache

            return NSACache(num_layers, batch_size, max_seqlen, cfg, **kw)
        index_dim = cfg.index_head_dim if cfg.attention == "mla_dsa" else 0
        return LatentKVCache(num_layers, batch_size, max_seqlen, cfg.kv_lora_rank + cfg.qk_rope_head_dim,
                             index_dim=index_dim, **kw)

    def new_cache(self, batch_size: int, max_seqlen: int, *, page_size: int = 64,
                  dtype: Optional[torch.dtype] = None):
        """The decode cache of the main layers: a paged latent cache ``[num_hidden_layers, pages, page_size,
        kv_lora_rank + qk_rope_head_dim]`` (with the indexer keys for ``mla_dsa``), or NSA's key/value and
        compressed caches for ``attention="nsa"``."""
        return self._make_cache(self.config.num_hidden_layers, 0, batch_size, max_seqlen, page_size, dtype)

    def new_mtp_cache(self, batch_size: int, max_seqlen: int, *, page_size: int = 64,
                      dtype: Optional[torch.dtype] = None):
        """A cache for the MTP modules' blocks (layers ``num_hidden_layers + k``), used when they draft."""
        cfg = self.config
        if cfg.num_nextn_predict_layers == 0:
            raise ValueError("Transformer.new_mtp_cache: this model has no MTP module (num_nextn_predict_layers = 0)")
        return self._make_cache(cfg.num_nextn_predict_layers, cfg.num_hidden_layers, batch_size, max_seqlen,
                                page_size, dtype)

    def run_layers(self, h: torch.Tensor, start: int, end: int, *, cache: Optional[LatentKVCache] = None,
                   absorbed: bool = False) -> torch.Tensor:
        """Layers ``start .. end-1`` over the residual stream ``h [B, S, D]`` (no final norm).

        With a cache, the S tokens sit at the cache's next positions and each layer writes its latent rows
        there; the cache is NOT advanced (the caller commits with ``cache.advance`` or ``set_lengths``), so a
        speculative step can run the first layers, then the rest, on the same positions.
        """
        b, s, _ = h.shape
        if cache is not None:
            cache.check_room(s)
            positions = cache.positions(s)  # [B, S]
        else:
            positions = torch.arange(s, device=h.device).expand(b, s)
        cos, sin = self.rotary(positions)  # [B, S, R/2] each
        for layer in self.layers[start:end]:
            h = layer(h, cos, sin, cache=cache, absorbed=absorbed)
        return h

    def _check_ids(self, input_ids: torch.Tensor) -> None:
        if input_ids.dim() != 2:
            raise ValueError(f"Transformer: input_ids must be [B, S], got shape {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"Transformer: input_ids must be int32 / int64, got {input_ids.dtype}")

    def forward_hidden(self, input_ids: torch.Tensor, *, cache: Optional[LatentKVCache] = None,
                       absorbed: bool = False) -> torch.Tensor:
        """input_ids ``[B, S]`` -> final-normed hidden states ``[B, S, D]``.

        ``cache``: the tokens continue the cached ones and the cache is advanced by S; a prefill into an empty
        cache attends with the expanded formulation, later calls with the absorbed one over the latent cache.
        ``absorbed=True`` forces the absorbed formulation (without a cache, on a scratch cache): used to
        check that both formulations agree. Without either, the expanded formulation.
        """
        self._check_ids(input_ids)
        b, s = input_ids.shape
        if absorbed and cache is None:
            cache = self.new_cache(b, s, page_size=16)
        h = self.run_layers(self.embed_tokens(input_ids), 0, len(self.layers), cache=cache, absorbed=absorbed)  # [B, S, D]
        if cache is not None:
            cache.advance(s)
        return self.norm(h)

    def forward(self, input_ids: torch.Tensor, *, cache: Optional[LatentKVCache] = None,
                absorbed: bool = False) -> torch.Tensor:
        """input_ids ``[B, S]`` int -> logits ``[B, S, V]`` float32 (see :meth:`forward_hidden`)."""
        return self.logits(self.forward_hidden(input_ids, cache=cache, absorbed=absorbed))

    def forward_train(self, input_ids: torch.Tensor, *, exit_layers: Sequence[int] = (),
                      balance: Optional[list] = None, aux: Optional[list] = None) -> tuple[torch.Tensor, dict]:
        """The training forward: input_ids ``[B, S]`` -> ``(hidden [B, S, D], exits)``.

        ``hidden`` is final-normed; ``exits`` maps each layer count e in ``exit_layers`` (1 .. L-1) to the
        final-normed hidden state after the first e layers (``[B, S, D]``), which the shared head turns into
        early-exit predictions (LayerSkip). ``balance``: a list the MoE layers append their routing to;
        ``aux``: a list attention modules append their own training losses to (DSA's indexer loss).
        """
        self._check_ids(input_ids)
        b, s = input_ids.shape
        want = set(int(e) for e in exit_layers)
        bad = sorted(e for e in want if not 1 <= e < len(self.layers))
        if bad:
            raise ValueError(f"Transformer.forward_train: exit_layers must be in [1, {len(self.layers) - 1}], got {bad}")
        cos, sin = self.rotary(torch.arange(s, device=input_ids.device).expand(b, s))  # [B, S, R/2] each
        h = self.embed_tokens(input_ids)  # [B, S, D]
        exits = {}
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, balance=balance, aux=aux)
            if i + 1 in want:
                exits[i + 1] = self.norm(h)
        return self.norm(h), exits

    def mtp_hidden(self, hidden: torch.Tensor, input_ids: torch.Tensor, *,
                   balance: Optional[list] = None) -> list[torch.Tensor]:
        """Multi-token prediction over a training sequence, before the head.

        Args:
            hidden: ``[B, S, D]`` the main model's final-normed hidden states for ``input_ids``.
            input_ids: ``[B, S]``.
        Returns:
            One tensor per depth k = 1..n: ``[B, S - k, D]``, the depth's hidden state after its
            ``shared_head.norm``; row i predicts token i + k + 1 through the shared head.
        """
        out = []
        h = hidden
        b, s = input_ids.shape
        for k, module in enumerate(self.mtp, start=1):
            n = s - k
            if n <= 0:
                break
            positions = torch.arange(n, device=input_ids.device).expand(b, n)
            cos, sin = self.rotary(positions)
            h = module(h[:, :n], self.embed_tokens(input_ids[:, k:]), cos, sin, balance=balance)  # [B, S-k, D]
            out.append(module.shared_head(h))
        return out

    def mtp_forward(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """Multi-token prediction logits: one float32 tensor per depth k = 1..n, ``[B, S - k, V]``, row i
        predicting token i + k + 1 (see :meth:`mtp_hidden`)."""
        return [self.logits(h) for h in self.mtp_hidden(hidden, input_ids)]

    def mtp_step(self, hidden: torch.Tensor, next_ids: torch.Tensor, cache: LatentKVCache, depth: int = 0):
        """One MTP module over new positions, on its latent cache (speculative drafting).

        Args:
            hidden: ``[B, S, D]`` the hidden state feeding the module at each position (the main model's
                final-normed hidden, or the module's own previous output when it drafts recursively).
            next_ids: ``[B, S]`` the token that follows each position.
            cache: from :meth:`new_mtp_cache`; the S positions are written at its next positions and NOT
                committed (the caller advances it).
        Returns:
            ``(h [B, S, D], logits [B, S, V] float32)``: the module's hidden state and its prediction of the
            token two places after each position.
        """
        self._check_ids(next_ids)
        module = self.mtp[depth]
        b, s = next_ids.shape
        cache.check_room(s)
        cos, sin = self.rotary(cache.positions(s))  # [B, S, R/2] each
        h = module(hidden, self.embed_tokens(next_ids), cos, sin, cache=cache)  # [B, S, D]
        return h, self.logits(module.shared_head(h))
