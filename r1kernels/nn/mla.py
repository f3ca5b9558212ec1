"""Multi-head latent attention (DeepSeek-V2 section 2.1) and its paged latent cache.

Letters: B batch, S new tokens, H heads, D hidden, L = kv_lora_rank (c_kv width), R = qk_rope_head_dim,
C = L + R (a cached latent row), Dn = qk_nope_head_dim, Dqk = Dn + R, Dv = v_head_dim, N pages, P page size,
M pages per request.

Two formulations with the same result:
* expanded (training, prefill): k_nope and v are materialised per head from c_kv through W_UK / W_UV
  (the halves of ``kv_b_proj``), then packed varlen attention (``ops.mla_attention``);
* absorbed (decode): W_UK is folded into the query (q_nope W_UK gives an L-wide query) and W_UV into the
  output, so attention runs directly over the cached latent rows [c_kv, k_pe] as one shared head
  (``ops.mla_decode``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .. import ops
from ..config import ModelConfig
from .norm import RMSNorm

# DeepSeek's latent norms (q_a_layernorm, kv_a_layernorm) use RMSNorm's default eps, not rms_norm_eps
# (true of DeepSeek's reference code and of transformers).
_LATENT_NORM_EPS = 1e-6


class LatentKVCache:
    """Paged cache of latent rows ``[c_kv, rope(k_pe)]`` for every layer.

    Tensors:
        kv: ``[num_layers, N, P, C]``; block_table: ``[B, M]`` int32 (page ids of each request);
        seqlens: ``[B]`` int32, tokens committed per request.
    A forward step over S new tokens writes their rows at positions ``seqlens + [0, S)`` in every layer,
    attends with ``cache_seqlens = seqlens + S``, and then ``advance(S)`` commits them. Capacity is tracked
    on the host (``capacity``, ``max_committed``) so that overflow is caught without a device sync.
    """

    def __init__(self, num_layers: int, batch_size: int, max_seqlen: int, width: int, *, page_size: int = 64,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", first_layer: int = 0,
                 index_dim: int = 0):
        if page_size <= 0 or max_seqlen <= 0 or batch_size <= 0:
            raise ValueError(f"LatentKVCache: page_size, max_seqlen and batch_size must be positive, got "
                             f"{page_size}, {max_seqlen}, {batch_size}")
        pages = math.ceil(max_seqlen / page_size)
        self.page_size = page_size
        self.capacity = pages * page_size
        # Layers first_layer .. first_layer + num_layers - 1 live here (an MTP module's cache holds only its
        # own block, whose layer index follows the main layers').
        self.first_layer = first_layer
        self.num_layers = num_layers
        self.kv = torch.zeros(num_layers, batch_size * pages, page_size, width, dtype=dtype, device=device)
        # DSA (attention="mla_dsa"): the lightning indexer's key per token, [num_layers, N, P, index_dim],
        # paged like the latent rows; None for dense MLA.
        self.index_keys = (torch.zeros(num_layers, batch_size * pages, page_size, index_dim, dtype=dtype, device=device)
                           if index_dim > 0 else None)
        self.block_table = torch.arange(batch_size * pages, dtype=torch.int32, device=device).view(batch_size, pages)
        self.seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.max_committed = 0  # host-side upper bound of seqlens

    @property
    def batch_size(self) -> int:
        return self.block_table.shape[0]

    def _slot(self, layer: int) -> int:
        """The index of model layer ``layer`` in this cache's tensors."""
        i = layer - self.first_layer
        if not 0 <= i < self.num_layers:
            raise IndexError(f"LatentKVCache: layer {layer} is not held here (layers {self.first_layer}.."
                             f"{self.first_layer + self.num_layers - 1})")
        return i

    def layer_kv(self, layer: int) -> torch.Tensor:
        """``[N, P, C]``: the pages of model layer ``layer``."""
        return self.kv[self._slot(layer)]

    def layer_index_keys(self, layer: int) -> torch.Tensor:
        """``[N, P, index_dim]``: the indexer-key pages of model layer ``layer`` (DSA caches only)."""
        if self.index_keys is None:
            raise ValueError("LatentKVCache: this cache holds no indexer keys (built with index_dim=0)")
        return self.index_keys[self._slot(layer)]

    def check_room(self, new_tokens: int) -> None:
        if self.max_committed + new_tokens > self.capacity:
            raise ValueError(f"LatentKVCache: {new_tokens} new tokens do not fit: {self.max_committed} cached, "
                             f"capacity {self.capacity}")

    def positions(self, new_tokens: int) -> torch.Tensor:
        """``[B, S]`` absolute positions of the next ``new_tokens`` tokens of each request."""
        return self.seqlens[:, None].long() + torch.arange(new_tokens, device=self.seqlens.device)

    def write(self, layer: int, c_kv: torch.Tensor, k_pe: torch.Tensor) -> None:
        """Store the rows ``[c_kv [B, S, L], k_pe [B, S, R]]`` at positions ``seqlens + [0, S)`` of ``layer``
        (not yet committed)."""
        ops.mla_cache_append(self.layer_kv(layer), self.block_table, self.seqlens, c_kv, k_pe)

    def write_index(self, layer: int, k_idx: torch.Tensor) -> None:
        """Store DSA's indexer keys ``k_idx [B, S, index_dim]`` at positions ``seqlens + [0, S)`` of ``layer``
        (not yet committed), in the same pages and rows as the latent rows (device-side indexing, no sync)."""
        pages = self.layer_index_keys(layer)  # [N, P, index_dim]
        b, s, di = k_idx.shape
        if b != self.batch_size or di != pages.shape[-1]:
            raise ValueError(f"LatentKVCache.write_index: k_idx must be [{self.batch_size}, S, {pages.shape[-1]}], "
                             f"got {tuple(k_idx.shape)}")
        pos = self.positions(s)  # [B, S]
        page_ids = self.block_table.long().gather(1, pos // self.page_size)  # [B, S]
        pages[page_ids, pos % self.page_size] = k_idx.to(pages.dtype)

    def advance(self, new_tokens: int) -> None:
        """Commit ``new_tokens`` more tokens in every request."""
        self.seqlens += new_tokens
        self.max_committed += new_tokens

    def set_lengths(self, seqlens: torch.Tensor, max_len: int) -> None:
        """Set the committed lengths per request (``seqlens [B]`` int, on the cache's device) after a padded
        prefill, or to roll back or accept speculative tokens. Rows past a request's length are left in place
        and never read (attention masks by length); the next write overwrites them.

        ``max_len`` is a host-side upper bound of ``seqlens`` (the caller knows it without a device sync).
        """
        if seqlens.shape != self.seqlens.shape:
            raise ValueError(f"LatentKVCache.set_lengths: seqlens must be [{self.seqlens.shape[0]}], got {tuple(seqlens.shape)}")
        if max_len > self.capacity:
            raise ValueError(f"LatentKVCache.set_lengths: max_len {max_len} exceeds the capacity {self.capacity}")
        self.seqlens.copy_(seqlens)
        self.max_committed = int(max_len)


class MLA(nn.Module):
    """Multi-head latent attention; parameter names follow DeepSeek's checkpoints."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, h = cfg.hidden_size, cfg.num_attention_heads
        self.n_heads, self.q_lora_rank, self.kv_lora_rank = h, cfg.q_lora_rank, cfg.kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.qk_head_dim = cfg.qk_head_dim
        self.softmax_scale = cfg.softmax_scale
        self.rope_interleave = cfg.rope_interleave
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(d, h * self.qk_head_dim, bias=False)  # W_Q
        else:
            self.q_a_proj = nn.Linear(d, cfg.q_lora_rank, bias=cfg.attention_bias)  # W_DQ
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, _LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, h * self.qk_head_dim, bias=False)  # W_UQ (+ W_QR)
        self.kv_a_proj_with_mqa = nn.Linear(d, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=cfg.attention_bias)  # W_DKV, W_KR
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, _LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)  # W_UK, W_UV
        self.o_proj = nn.Linear(h * cfg.v_head_dim, d, bias=cfg.attention_bias)

    def q_latent(self, x: torch.Tensor) -> torch.Tensor:
        """The input of the query up-projection: ``norm(W_DQ x)`` ``[B, S, q_lora_rank]``, or x ``[B, S, D]``
        itself when ``q_lora_rank`` is None (DSA's indexer reads its query from the same tensor)."""
        return x if self.q_lora_rank is None else self.q_a_layernorm(self.q_a_proj(x))

    def _project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 q_in: Optional[torch.Tensor] = None):
        """Queries and the latent of x ``[B, S, D]``: q_nope ``[B,S,H,Dn]``, q_pe ``[B,S,H,R]`` (rotated),
        c_kv ``[B,S,L]`` (normalised), k_pe ``[B,S,1,R]`` (rotated). ``q_in``: ``self.q_latent(x)`` when the
        caller already has it."""
        b, s, _ = x.shape
        q_in = self.q_latent(x) if q_in is None else q_in
        q = self.q_proj(q_in) if self.q_lora_rank is None else self.q_b_proj(q_in)
        q = q.view(b, s, self.n_heads, self.qk_head_dim)  # [B, S, H, Dqk]
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        kv = self.kv_a_proj_with_mqa(x)  # [B, S, L + R]
        c_kv, k_pe = kv.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)
        q_pe = ops.apply_rope(q_pe, cos, sin, interleaved=self.rope_interleave)
        k_pe = ops.apply_rope(k_pe.unsqueeze(2), cos, sin, interleaved=self.rope_interleave)  # [B, S, 1, R]
        return q_nope, q_pe, c_kv, k_pe

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                cache: Optional[LatentKVCache] = None, layer_idx: int = 0, absorbed: bool = False) -> torch.Tensor:
        """x ``[B, S, D]``, cos/sin ``[B, S, R/2]`` -> ``[B, S, D]``.

        Without a cache: the expanded form over the S tokens (causal). With a cache: the S tokens' latent
        rows are written at the cache's next positions; a prefill into an empty cache then uses the expanded
        form (unless ``absorbed``), later steps the absorbed form over everything cached.
        """
        b, s, _ = x.shape
        h, dn, dv, lr = self.n_heads, self.qk_nope_head_dim, self.v_head_dim, self.kv_lora_rank
        q_nope, q_pe, c_kv, k_pe = self._project(x, cos, sin)
        # A prefill into an empty cache (known on the host, no sync) attends only among the new tokens:
        # the expanded form does that with flash attention, cheaper than the absorbed one for long prompts
        # (per head Dqk + Dv = 320 wide instead of 576 + 512); the rows still go to the cache.
        prefill = cache is not None and cache.max_committed == 0 and not absorbed
        if prefill:
            cache.write(layer_idx, c_kv, k_pe.squeeze(2))
        if cache is None or prefill:
            kv = self.kv_b_proj(c_kv).view(b, s, h, dn + dv)  # [B, S, H, Dn + Dv]
            k_nope, v = kv.split([dn, dv], dim=-1)
            q = torch.cat([q_nope, q_pe], dim=-1)  # [B, S, H, Dqk]
            k = torch.cat([k_nope, k_pe.expand(b, s, h, self.qk_rope_head_dim)], dim=-1)
            cu = torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=x.device)  # b equal-length sequences
            o = ops.mla_attention(q.reshape(b * s, h, -1), k.reshape(b * s, h, -1), v.reshape(b * s, h, dv),
                                  cu, s, softmax_scale=self.softmax_scale, causal=True)  # [B*S, H, Dv]
            return self.o_proj(o.reshape(b, s, h * dv))
        q_full = self._absorbed_query(q_nope, q_pe)  # [B, S, H, C]
        cache.write(layer_idx, c_kv, k_pe.squeeze(2))
        o_lat, _ = ops.mla_decode(q_full.to(cache.kv.dtype), cache.layer_kv(layer_idx), cache.block_table,
                                  cache.seqlens + s, softmax_scale=self.softmax_scale, causal=True, head_dim_v=lr)
        return self._absorbed_output(o_lat.to(x.dtype))

    def _up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W_UK [H, Dn, L], W_UV [H, Dv, L])``: views of ``kv_b_proj.weight``."""
        h, dn, dv = self.n_heads, self.qk_nope_head_dim, self.v_head_dim
        w = self.kv_b_proj.weight.view(h, dn + dv, self.kv_lora_rank)  # [H, Dn + Dv, L]
        return w[:, :dn], w[:, dn:]

    def _absorbed_query(self, q_nope: torch.Tensor, q_pe: torch.Tensor) -> torch.Tensor:
        """q_nope ``[B,S,H,Dn]``, q_pe ``[B,S,H,R]`` -> ``[B, S, H, C]``: ``[q_nope W_UK, q_pe]``, the query of
        one shared latent head."""
        w_uk, _ = self._up_weights()
        q_lat = torch.einsum("bshn,hnl->bshl", q_nope, w_uk)  # [B, S, H, L]: W_UK absorbed into the query
        return torch.cat([q_lat, q_pe], dim=-1)  # [B, S, H, C]

    def _absorbed_output(self, o_lat: torch.Tensor) -> torch.Tensor:
        """The latent attention output ``[B, S, H, L]`` -> ``[B, S, D]`` through W_UV and ``o_proj``."""
        b, s, h, _ = o_lat.shape
        _, w_uv = self._up_weights()
        o = torch.einsum("bshl,hvl->bshv", o_lat, w_uv)  # [B, S, H, Dv]: W_UV absorbed into the output
        return self.o_proj(o.reshape(b, s, h * self.v_head_dim))
