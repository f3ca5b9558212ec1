"""DeepSeek Sparse Attention (DSA, DeepSeek-V3.2): MLA whose queries attend only to the K latent rows a
lightning indexer selects (``ModelConfig.attention = "mla_dsa"``).

Letters: B batch, S new tokens, T key positions (visible tokens: the S new ones, plus the cached ones),
D hidden, H heads, Hi indexer heads (``index_n_heads``), Di indexer head dim (``index_head_dim``),
L = kv_lora_rank, R = qk_rope_head_dim, C = L + R (a latent row), K = min(index_topk, T) selected rows,
N pages, P page size, M pages per request, Qr = the query's input (q_lora_rank, or D without a q latent).

One layer::

    q_idx, w = indexer.query(Qr, x)        k_idx = indexer.key(x)             # [B,S,Hi,Di], [B,S,Hi], [B,T,Di]
    scores = lightning_indexer(q_idx, k_idx, w)                               # [B, S, T], causal
    idx = dsa_topk(scores, K)                                                 # [B, S, K] positions
    out = absorbed MLA over the latent rows at idx                            # dsa_mla_prefill / dsa_mla_decode

Without a cache (training, a plain forward) the B equal-length sequences are packed (``cu_seqlens``) and go
through ``ops.dsa_mla_prefill`` (differentiable). With a cache, the new latent rows and indexer keys are
written first, then every call (a prefill into an empty cache as well as later steps) attends through
``ops.dsa_mla_decode`` over the paged cache. With ``index_topk >= T`` every visible row is selected and
the layer computes dense MLA (in its absorbed form).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from .. import ops
from ..config import ModelConfig
from ..ops import sparse_dsa as dsa_ops  # the DSA ops, whether or not ``ops`` re-exports them
from .mla import MLA, LatentKVCache

# V3.2's indexer LayerNorm (``k_norm``) uses eps 1e-6, like the latent RMSNorms.
_INDEX_NORM_EPS = 1e-6


class LayerNorm(nn.Module):
    """LayerNorm with weight and bias, computed in fp32 and cast back (V3.2's ``indexer.k_norm``)."""

    def __init__(self, dim: int, eps: float = _INDEX_NORM_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.weight.shape, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class LightningIndexer(nn.Module):
    """V3.2's lightning indexer: ``I[s, t] = sum_j w[s, j] * relu(q[s, j] . k[t])`` (``ops.lightning_indexer``).

    Parameters (V3.2-Exp checkpoint names under ``self_attn.indexer.``):
        wq_b: Qr -> Hi * Di, the query from MLA's normalised q latent (from the hidden state when the model
            has no q latent, ``q_lora_rank`` None; V3.2 always has one);
        wk: D -> Di, one key per token shared by the heads; k_norm: LayerNorm(Di);
        weights_proj: D -> Hi, the per-head weights, scaled by ``(Hi * Di)^-1/2`` as V3.2 does.
    RoPE: as in V3.2, the first R channels of every indexer query and key are rotated by the token's
    position, with the NeoX (half-split, non-interleaved) pairing, unlike MLA's interleaved pairs; the other
    ``Di - R`` channels carry no position. V3.2's Hadamard rotation of q and k and its FP8 quantisation are
    left out: the rotation is orthogonal (q.k unchanged) and only serves the FP8 cast.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hi, di, r = cfg.index_n_heads, cfg.index_head_dim, cfg.qk_rope_head_dim
        if di < r:
            raise ValueError(f"MLADSA: index_head_dim ({di}) must be >= qk_rope_head_dim ({r}): the indexer "
                             f"rotates its first qk_rope_head_dim channels")
        self.n_heads, self.head_dim, self.rope_dim = hi, di, r
        q_in = cfg.hidden_size if cfg.q_lora_rank is None else cfg.q_lora_rank
        self.wq_b = nn.Linear(q_in, hi * di, bias=False)
        self.wk = nn.Linear(cfg.hidden_size, di, bias=False)
        self.k_norm = LayerNorm(di)
        self.weights_proj = nn.Linear(cfg.hidden_size, hi, bias=False)
        self.weight_scale = (hi * di) ** -0.5

    def _rope(self, t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate the first R channels of ``t [B, S, G, Di]`` (NeoX pairs)."""
        pe, rest = t.split([self.rope_dim, self.head_dim - self.rope_dim], dim=-1)
        return torch.cat([ops.apply_rope(pe, cos, sin, interleaved=False), rest], dim=-1)

    def query(self, q_in: torch.Tensor, x: torch.Tensor, cos: torch.Tensor,
              sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q_in ``[B, S, Qr]``, x ``[B, S, D]``, cos/sin ``[B, S, R/2]`` -> ``(q_idx [B, S, Hi, Di],
        weights [B, S, Hi])``."""
        b, s, _ = x.shape
        q = self.wq_b(q_in).view(b, s, self.n_heads, self.head_dim)  # [B, S, Hi, Di]
        return self._rope(q, cos, sin), self.weights_proj(x) * self.weight_scale

    def key(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x ``[B, S, D]`` -> the tokens' indexer keys ``[B, S, Di]``."""
        k = self.k_norm(self.wk(x)).unsqueeze(2)  # [B, S, 1, Di]
        return self._rope(k, cos, sin).squeeze(2)


def _gather_pages(pages: torch.Tensor, block_table: torch.Tensor, t: int) -> torch.Tensor:
    """Positions ``[0, t)`` of every request from a paged tensor: pages ``[N, P, W]``, block_table ``[B, M]``
    int32 -> ``[B, t, W]`` (t is a host-side bound, at most ``M * P``)."""
    b, p = block_table.shape[0], pages.shape[1]
    m = -(-t // p)  # pages covering [0, t)
    rows = pages[block_table[:, :m].long()]  # [B, m, P, W]
    return rows.reshape(b, m * p, pages.shape[-1])[:, :t]


class MLADSA(MLA):
    """MLA with DeepSeek Sparse Attention: MLA's parameters plus ``indexer`` (a :class:`LightningIndexer`).

    Each query attends, in MLA's absorbed form, to the ``index_topk`` latent rows its indexer scores
    highest among the visible (causal) tokens. The indexer's inputs are detached from the main model, as
    in V3.2's training: the main model learns from the LM loss through the selected attention, the indexer
    only from its own loss (``aux``, see :meth:`forward`).
    """

    has_aux_loss = True

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.index_topk = cfg.index_topk
        self.indexer = LightningIndexer(cfg)

    def _select(self, q_idx: torch.Tensor, k_idx: torch.Tensor, weights: torch.Tensor, positions: torch.Tensor,
                lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Index scores ``[B, S, T]`` fp32 (causal: ``-inf`` past each query's position) and the selected
        positions ``[B, S, K]`` int32 (ascending, ``-1`` padded) of the queries at ``positions [B, S]``
        among keys ``k_idx [B, T, Di]``; ``lengths [B]`` int32: the keys present per request."""
        scores = dsa_ops.lightning_indexer(q_idx, k_idx, weights, q_positions=positions)  # [B, S, T]
        k = min(self.index_topk, k_idx.shape[1])  # never more slots than keys
        return scores, dsa_ops.dsa_topk(scores, k, lengths=lengths)

    def _indexer_loss(self, scores: torch.Tensor, q_full: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """V3.2's dense warm-up loss: KL(main attention || indexer) per query. The target is the dense causal
        absorbed attention of q_full ``[B, S, H, C]`` over kv ``[B, S, C]`` (every visible token, not only the
        selected ones), its probabilities summed over the H heads, computed without gradient (O(B H S^2)
        memory: meant for warm-up and small models)."""
        s = kv.shape[1]
        with torch.no_grad():
            logits = torch.einsum("bshc,btc->bsht", q_full.float(), kv.float()) * self.softmax_scale  # [B, S, H, T]
            later = torch.ones(s, s, dtype=torch.bool, device=kv.device).triu(1)  # [S, T]: t > s
            probs = torch.softmax(logits.masked_fill(later[None, :, None, :], float("-inf")), dim=-1)
            target = probs.sum(dim=2)  # [B, S, T]
        return dsa_ops.indexer_kl_loss(scores, target)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                cache: Optional[LatentKVCache] = None, layer_idx: int = 0, absorbed: bool = False,
                aux: Optional[list] = None) -> torch.Tensor:
        """x ``[B, S, D]``, cos/sin ``[B, S, R/2]`` (the tokens' positions) -> ``[B, S, D]``.

        Without a cache: the S tokens of each of the B sequences attend causally among themselves. With a
        cache (built with ``index_dim = index_head_dim``): the tokens' latent rows and indexer keys are
        written at the cache's next positions (not committed), then each query selects among everything
        cached up to itself. The absorbed form is always used (``absorbed`` is accepted for MLA's interface).
        ``aux`` (training, no cache): a list the indexer's KL loss (fp32 0-d) is appended to.
        """
        b, s, _ = x.shape
        lr = self.kv_lora_rank
        q_in = self.q_latent(x)  # [B, S, Qr]
        q_nope, q_pe, c_kv, k_pe = self._project(x, cos, sin, q_in=q_in)
        q_full = self._absorbed_query(q_nope, q_pe)  # [B, S, H, C]
        # The indexer reads detached inputs: its gradient comes from its own loss only (V3.2).
        q_idx, w_idx = self.indexer.query(q_in.detach(), x.detach(), cos, sin)  # [B, S, Hi, Di], [B, S, Hi]
        k_new = self.indexer.key(x.detach(), cos, sin)  # [B, S, Di]
        if cache is None:
            kv = torch.cat([c_kv, k_pe.squeeze(2)], dim=-1)  # [B, S, C]
            positions = torch.arange(s, device=x.device).expand(b, s)  # [B, S]
            lengths = torch.full((b,), s, dtype=torch.int32, device=x.device)
            scores, idx = self._select(q_idx, k_new, w_idx, positions, lengths)  # [B, S, T=S], [B, S, K]
            if aux is not None:
                aux.append(self._indexer_loss(scores, q_full, kv))
            cu = torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=x.device)  # b equal-length sequences
            o_lat, _ = dsa_ops.dsa_mla_prefill(q_full.reshape(b * s, self.n_heads, -1), kv.reshape(b * s, -1),
                                               idx.reshape(b * s, -1), cu, softmax_scale=self.softmax_scale,
                                               head_dim_v=lr)  # [B*S, H, L]
            return self._absorbed_output(o_lat.reshape(b, s, self.n_heads, lr))
        if aux is not None:
            raise ValueError("MLADSA: aux (the indexer's training loss) is for the cache-free training forward")
        if cache.index_keys is None:
            raise ValueError("MLADSA: the cache holds no indexer keys; build it with index_dim=index_head_dim "
                             "(Transformer.new_cache does for attention='mla_dsa')")
        cache.write(layer_idx, c_kv, k_pe.squeeze(2))
        cache.write_index(layer_idx, k_new)
        t = cache.max_committed + s  # host bound of the visible positions (no sync)
        lengths = cache.seqlens + s  # [B] int32
        positions = cache.positions(s)  # [B, S]
        keys = _gather_pages(cache.layer_index_keys(layer_idx), cache.block_table, t)  # [B, T, Di]
        # Slots past a request's length hold stale rows (or anything): zero them so nothing there can reach
        # a score, whatever the backend does with masked positions.
        present = torch.arange(t, device=x.device)[None, :] < lengths[:, None]  # [B, T]
        keys = torch.where(present[..., None], keys, torch.zeros((), dtype=keys.dtype, device=keys.device))
        _, idx = self._select(q_idx.to(keys.dtype), keys, w_idx, positions, lengths)  # idx [B, S, K] absolute
        o_lat, _ = dsa_ops.dsa_mla_decode(q_full.to(cache.kv.dtype), cache.layer_kv(layer_idx), cache.block_table,
                                          lengths, idx, softmax_scale=self.softmax_scale, head_dim_v=lr)  # [B, S, H, L]
        return self._absorbed_output(o_lat.to(x.dtype))
