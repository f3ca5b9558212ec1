"""Native Sparse Attention in the model (``ModelConfig.attention = "nsa"``, arXiv 2502.11089): the attention
module :class:`NSAttention` and its decode cache :class:`NSACache`.

Letters: B batch, S new tokens, D hidden, H query heads, Hk KV heads (``nsa_num_kv_heads``), G = H / Hk,
Dh head width of queries, keys and values (``nsa_head_dim``), R = qk_rope_head_dim (rotated channels),
l compression block (``nsa_compress_block``), d compression stride (``nsa_compress_stride``), l' selection
block (``nsa_select_block``), n selected blocks (``nsa_num_selected``), w window (``nsa_window``),
Smax cache capacity in tokens, Cmax compressed tokens that fit in Smax, Nc compressed tokens of S tokens,
J compressed tokens that can complete during one step of S tokens (ceil(S / d)).

Geometry (``r1kernels.reference.sparse``): compressed token i of a sequence summarises raw positions
[i·d, i·d + l) and exists once position i·d + l − 1 is known; a sequence of L tokens has
Nc = (L − l) // d + 1 of them (0 when L < l).

One layer::

    q = RoPE(q_proj(x)), k = RoPE(k_proj(x)), v = v_proj(x)        # [B,S,H,Dh], [B,S,Hk,Dh], [B,S,Hk,Dh]
    k_cmp = φ_k(blocks of k), v_cmp = φ_v(blocks of v)              # [B,Nc,Hk,Dh]
    gates = sigmoid(gate_proj(x))                                   # [B,S,H,3]: g_cmp, g_sel, g_win
    o = o_proj(nsa(q, k, v, k_cmp, v_cmp, gates))                   # ops.nsa_attention / ops.nsa_decode

The compressed keys are built from the rotated keys (the ones the selected and window branches see and the
cache holds), so a compressed token is a function of cached rows only and can be rebuilt from the cache.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from .. import ops
from ..config import ModelConfig
from ..ops import sparse as nsa_ops  # the NSA ops, whether or not ``ops`` re-exports them
from ..reference.sparse import compressed_counts


class NSACache:
    """Decode cache of NSA layers: raw keys / values and compressed keys / values per layer and sequence.

    Tensors (layer slot first; one slot per model layer ``first_layer .. first_layer + num_layers − 1``):
        k: ``[num_layers, B, Smax, Hk, Dh]``, v: ``[num_layers, B, Smax, Hk, Dh]``: rotated keys and values
            by position;
        k_cmp, v_cmp: ``[num_layers, B, Cmax + 1, Hk, Dh]``: compressed token i in row i; the last row is a
            scratch row that absorbs the writes of candidates that did not complete (see
            :meth:`completed_blocks`) and is never read;
        seqlens: ``[B]`` int32, tokens committed per sequence; ``max_committed``: a host-side upper bound.

    The interface is :class:`r1kernels.nn.LatentKVCache`'s: a step over S new tokens writes them at positions
    ``seqlens + [0, S)`` without committing; ``advance`` / ``set_lengths`` commit, roll back or accept
    speculative tokens. Rows at or past a sequence's length are never read. A compressed token is written
    when the write that completes its block happens (its last position i·d + l − 1 is among the written
    ones), recomputed from the raw rows: after a rollback, the tokens whose block was (partly) rolled back
    are rebuilt when their block completes again, and until then lie past ``cmp_lens`` (never read).

    ``page_size`` only rounds the capacity up to a multiple of it (like the paged latent cache's); the
    storage is contiguous per sequence, the layout the NSA decode kernels read.
    """

    def __init__(self, num_layers: int, batch_size: int, max_seqlen: int, cfg: ModelConfig, *, page_size: int = 64,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", first_layer: int = 0):
        if page_size <= 0 or max_seqlen <= 0 or batch_size <= 0 or num_layers <= 0:
            raise ValueError(f"NSACache: num_layers, batch_size, max_seqlen and page_size must be positive, got "
                             f"{num_layers}, {batch_size}, {max_seqlen}, {page_size}")
        self.page_size = page_size
        self.capacity = math.ceil(max_seqlen / page_size) * page_size
        self.first_layer = first_layer
        self.num_layers = num_layers
        self.block_size, self.stride = cfg.nsa_compress_block, cfg.nsa_compress_stride
        hk, dh = cfg.nsa_num_kv_heads, cfg.nsa_head_dim
        # compressed tokens of a full cache; at least one row so that every tensor has a row to point at
        l, d = self.block_size, self.stride
        self.max_compressed = max(1, (self.capacity - l) // d + 1 if self.capacity >= l else 0)
        raw = (num_layers, batch_size, self.capacity, hk, dh)
        cmp = (num_layers, batch_size, self.max_compressed + 1, hk, dh)  # + the scratch row
        self.k = torch.zeros(raw, dtype=dtype, device=device)
        self.v = torch.zeros(raw, dtype=dtype, device=device)
        self.k_cmp = torch.zeros(cmp, dtype=dtype, device=device)
        self.v_cmp = torch.zeros(cmp, dtype=dtype, device=device)
        self.seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.max_committed = 0  # host-side upper bound of seqlens

    @property
    def batch_size(self) -> int:
        return self.seqlens.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Every storage tensor ``(k, v, k_cmp, v_cmp)`` (e.g. to poison them in tests)."""
        return self.k, self.v, self.k_cmp, self.v_cmp

    def _slot(self, layer: int) -> int:
        """The index of model layer ``layer`` in this cache's tensors."""
        i = layer - self.first_layer
        if not 0 <= i < self.num_layers:
            raise IndexError(f"NSACache: layer {layer} is not held here (layers {self.first_layer}.."
                             f"{self.first_layer + self.num_layers - 1})")
        return i

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views of model layer ``layer``: ``k, v [B, Smax, Hk, Dh]`` and ``k_cmp, v_cmp [B, Cmax, Hk, Dh]``
        (the scratch row left out)."""
        i = self._slot(layer)
        return self.k[i], self.v[i], self.k_cmp[i, :, :-1], self.v_cmp[i, :, :-1]

    def check_room(self, new_tokens: int) -> None:
        if self.max_committed + new_tokens > self.capacity:
            raise ValueError(f"NSACache: {new_tokens} new tokens do not fit: {self.max_committed} cached, "
                             f"capacity {self.capacity}")

    def positions(self, new_tokens: int) -> torch.Tensor:
        """``[B, S]`` absolute positions of the next ``new_tokens`` tokens of each sequence."""
        return self.seqlens[:, None].long() + torch.arange(new_tokens, device=self.seqlens.device)

    def cmp_lens(self, seqlens: torch.Tensor) -> torch.Tensor:
        """``[B]`` int32: the compressed tokens complete in sequences of lengths ``seqlens [B]``."""
        return compressed_counts(seqlens, self.block_size, self.stride).to(torch.int32)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k [B, S, Hk, Dh]``, ``v [B, S, Hk, Dh]`` at positions ``seqlens + [0, S)`` of ``layer``
        (not committed; device-side indexing, no sync). The caller checked the room (:meth:`check_room`)."""
        kl, vl, _, _ = self.layer(layer)
        b, s = k.shape[:2]
        if b != self.batch_size or k.shape[2:] != kl.shape[2:] or v.shape != k.shape:
            raise ValueError(f"NSACache.write: k and v must be [{self.batch_size}, S, {kl.shape[2]}, {kl.shape[3]}], "
                             f"got k {tuple(k.shape)}, v {tuple(v.shape)}")
        rows = torch.arange(b, device=k.device)[:, None]  # [B, 1]
        pos = self.positions(s)  # [B, S]
        kl[rows, pos] = k.to(kl.dtype)
        vl[rows, pos] = v.to(vl.dtype)

    def write_compressed_prefix(self, layer: int, k_cmp: torch.Tensor, v_cmp: torch.Tensor) -> None:
        """Store ``k_cmp, v_cmp [B, Nc, Hk, Dh]`` as compressed tokens 0 .. Nc − 1 of ``layer`` (a prefill
        into an empty cache, whose compressed tokens the caller already computed from the same keys)."""
        _, _, kc, vc = self.layer(layer)
        nc = k_cmp.shape[1]
        kc[:, :nc] = k_cmp.to(kc.dtype)
        vc[:, :nc] = v_cmp.to(vc.dtype)

    def completed_blocks(self, layer: int, new_tokens: int):
        """The raw blocks of the compressed tokens that the write of positions ``seqlens + [0, S)`` completes.

        Candidates per sequence (p = seqlens[b], S = ``new_tokens``): compressed tokens i = i0 + j, j < J,
        J = ceil(S / d), with i0 the first token whose block ends at or after p; a candidate completes iff its
        last position i·d + l − 1 < p + S (at most J do). Returns ``(k_blocks, v_blocks [B, J, Hk, l, Dh],
        slots [B, J] int64)``: a candidate that completes gets its own row i, the others the scratch row
        (their blocks, read at clamped positions, may hold anything and are dropped there).
        """
        i = self._slot(layer)
        l, d = self.block_size, self.stride
        j_all = -(-new_tokens // d)
        p = self.seqlens.long()  # [B]
        first = torch.div(p - (l - 1) + (d - 1), d, rounding_mode="floor").clamp_min(0)  # ceil((p − l + 1) / d)
        idx = first[:, None] + torch.arange(j_all, device=p.device)  # [B, J] candidate compressed tokens
        done = idx * d + (l - 1) < (p + new_tokens)[:, None]  # [B, J]
        pos = (idx[..., None] * d + torch.arange(l, device=p.device)).clamp_max(self.capacity - 1)  # [B, J, l]
        rows = torch.arange(self.batch_size, device=p.device)[:, None, None]  # [B, 1, 1]
        k_blocks = self.k[i][rows, pos].transpose(2, 3)  # [B, J, l, Hk, Dh] -> [B, J, Hk, l, Dh]
        v_blocks = self.v[i][rows, pos].transpose(2, 3)
        slots = torch.where(done, idx, self.max_compressed)  # [B, J]; max_compressed is the scratch row
        return k_blocks, v_blocks, slots

    def store_compressed(self, layer: int, slots: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor) -> None:
        """Store ``k_cmp, v_cmp [B, J, Hk, Dh]`` in the compressed rows ``slots [B, J]`` of ``layer`` (from
        :meth:`completed_blocks`; several may name the scratch row)."""
        i = self._slot(layer)
        rows = torch.arange(self.batch_size, device=slots.device)[:, None]  # [B, 1]
        self.k_cmp[i][rows, slots] = k_cmp.to(self.k_cmp.dtype)
        self.v_cmp[i][rows, slots] = v_cmp.to(self.v_cmp.dtype)

    def advance(self, new_tokens: int) -> None:
        """Commit ``new_tokens`` more tokens in every sequence."""
        self.seqlens += new_tokens
        self.max_committed += new_tokens

    def set_lengths(self, seqlens: torch.Tensor, max_len: int) -> None:
        """Set the committed lengths (``seqlens [B]`` int, on the cache's device) after a padded prefill, or to
        roll back or accept speculative tokens; ``max_len`` is a host-side upper bound of ``seqlens``. Rows
        past a length stay in place and are never read: raw rows are overwritten by the next write, compressed
        tokens rebuilt when their block completes again."""
        if seqlens.shape != self.seqlens.shape:
            raise ValueError(f"NSACache.set_lengths: seqlens must be [{self.seqlens.shape[0]}], "
                             f"got {tuple(seqlens.shape)}")
        if max_len > self.capacity:
            raise ValueError(f"NSACache.set_lengths: max_len {max_len} exceeds the capacity {self.capacity}")
        self.seqlens.copy_(seqlens)
        self.max_committed = int(max_len)


class BlockCompressor(nn.Module):
    """φ of the paper's compressed branch: one block of l rows ``[..., l, Dh]`` -> one row ``[..., Dh]``.

    φ(X) = fc2(SiLU(fc1(vec(X + E)))), E ``[l, Dh]`` a learned intra-block position embedding (row m is added
    to the block's m-th row), vec flattening the block to l·Dh, fc1: l·Dh -> Dh, fc2: Dh -> Dh. The same φ
    serves every KV head (each head's block is compressed separately). A hidden width of Dh keeps φ at
    about (l + 1)·Dh² parameters, small next to the projections.
    """

    def __init__(self, block_size: int, head_dim: int):
        super().__init__()
        self.block_size, self.head_dim = block_size, head_dim
        self.pos_emb = nn.Parameter(torch.zeros(block_size, head_dim))
        self.fc1 = nn.Linear(block_size * head_dim, head_dim, bias=False)
        self.fc2 = nn.Linear(head_dim, head_dim, bias=False)

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:
        """blocks ``[..., l, Dh]`` -> ``[..., Dh]`` in the parameters' dtype."""
        x = blocks.to(self.fc1.weight.dtype) + self.pos_emb
        x = x.flatten(-2)  # [..., l * Dh]
        return self.fc2(F.silu(self.fc1(x)))


class NSAttention(nn.Module):
    """Native Sparse Attention with GQA: the gated sum of compressed, selected and sliding-window attention.

    Parameters: q_proj D -> H·Dh, k_proj / v_proj D -> Hk·Dh, o_proj H·Dh -> D (biases per
    ``attention_bias``), compress_k / compress_v (:class:`BlockCompressor`), gate_proj D -> H·3 (the gates are
    its sigmoid: g_cmp, g_sel, g_win per head). RoPE rotates the first R channels of q and k (pairs per
    ``rope_interleave``); the softmax scale is Dh^-1/2. The first block and the 2 most recent ones are always
    among the n selected blocks (the ops' defaults).
    """

    has_aux_loss = False

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, h, hk, dh = cfg.hidden_size, cfg.num_attention_heads, cfg.nsa_num_kv_heads, cfg.nsa_head_dim
        if h % hk:
            raise ValueError(f"NSAttention: num_attention_heads ({h}) must be a multiple of nsa_num_kv_heads ({hk})")
        if dh < cfg.qk_rope_head_dim:
            raise ValueError(f"NSAttention: nsa_head_dim ({dh}) must be >= qk_rope_head_dim ({cfg.qk_rope_head_dim}): "
                             f"RoPE rotates the first qk_rope_head_dim channels")
        self.n_heads, self.n_kv_heads, self.head_dim, self.rope_dim = h, hk, dh, cfg.qk_rope_head_dim
        self.rope_interleave = cfg.rope_interleave
        self.softmax_scale = dh ** -0.5
        self.geometry = dict(block_size=cfg.nsa_compress_block, stride=cfg.nsa_compress_stride,
                             select_block_size=cfg.nsa_select_block, num_selected=cfg.nsa_num_selected,
                             window=cfg.nsa_window)
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(d, h * dh, bias=bias)
        self.k_proj = nn.Linear(d, hk * dh, bias=bias)
        self.v_proj = nn.Linear(d, hk * dh, bias=bias)
        self.o_proj = nn.Linear(h * dh, d, bias=bias)
        self.compress_k = BlockCompressor(cfg.nsa_compress_block, dh)
        self.compress_v = BlockCompressor(cfg.nsa_compress_block, dh)
        self.gate_proj = nn.Linear(d, h * 3, bias=bias)

    def _rope(self, t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate the first R channels of ``t [B, S, heads, Dh]``."""
        pe, rest = t.split([self.rope_dim, self.head_dim - self.rope_dim], dim=-1)
        return torch.cat([ops.apply_rope(pe, cos, sin, interleaved=self.rope_interleave), rest], dim=-1)

    def _project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x ``[B, S, D]`` -> q ``[B, S, H, Dh]``, k ``[B, S, Hk, Dh]`` (both rotated), v ``[B, S, Hk, Dh]``,
        gates ``[B, S, H, 3]``."""
        b, s, _ = x.shape
        q = self._rope(self.q_proj(x).view(b, s, self.n_heads, self.head_dim), cos, sin)
        k = self._rope(self.k_proj(x).view(b, s, self.n_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(b, s, self.n_kv_heads, self.head_dim)
        gates = torch.sigmoid(self.gate_proj(x)).view(b, s, self.n_heads, 3)
        return q, k, v, gates

    def compress(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The compressed tokens of whole sequences: k, v ``[B, S, Hk, Dh]`` -> ``[B, Nc, Hk, Dh]`` each,
        token i from positions [i·d, i·d + l)."""
        l, d = self.geometry["block_size"], self.geometry["stride"]
        b, s, hk, dh = k.shape
        if s < l:  # no complete block (unfold needs at least one)
            return k.new_zeros(b, 0, hk, dh), v.new_zeros(b, 0, hk, dh)
        # unfold gives [B, Nc, Hk, Dh, l]: the block's rows last; φ wants them before Dh
        k_blocks = k.unfold(1, l, d).transpose(-1, -2)  # [B, Nc, Hk, l, Dh]
        v_blocks = v.unfold(1, l, d).transpose(-1, -2)
        return self.compress_k(k_blocks), self.compress_v(v_blocks)

    def _packed(self, q, k, v, k_cmp, v_cmp, gates) -> torch.Tensor:
        """``ops.nsa_attention`` over B equal-length sequences: q ``[B, S, H, Dh]`` ... -> ``[B, S, H, Dh]``."""
        b, s = q.shape[:2]
        nc = k_cmp.shape[1]
        h, hk, dh = self.n_heads, self.n_kv_heads, self.head_dim
        steps = torch.arange(b + 1, dtype=torch.int32, device=q.device)
        o = nsa_ops.nsa_attention(
            q.reshape(b * s, h, dh), k.reshape(b * s, hk, dh), v.reshape(b * s, hk, dh),
            k_cmp.reshape(b * nc, hk, dh), v_cmp.reshape(b * nc, hk, dh), gates.reshape(b * s, h, 3),
            steps * s, steps * nc,  # cu_seqlens, cu_seqlens_cmp: b sequences of s tokens, nc compressed each
            softmax_scale=self.softmax_scale, max_seqlen=s, **self.geometry)  # [B*S, H, Dh]
        return o.view(b, s, h, dh)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                cache: Optional[NSACache] = None, layer_idx: int = 0, absorbed: bool = False) -> torch.Tensor:
        """x ``[B, S, D]``, cos/sin ``[B, S, R/2]`` (the tokens' positions) -> ``[B, S, D]``.

        Without a cache: each of the B sequences attends causally among its S tokens (``ops.nsa_attention``,
        differentiable). With a cache: the tokens' keys and values are written at the cache's next positions
        (not committed) together with the compressed tokens they complete; a prefill into an empty cache
        then attends among the new tokens (``ops.nsa_attention``), a later step runs ``ops.nsa_decode`` once
        per new token i over everything cached up to it (lengths ``seqlens + i + 1``). ``absorbed`` is
        accepted for MLA's interface and ignored (weight absorption is an MLA notion; NSA caches per-head
        keys and values).
        """
        b, s, _ = x.shape
        q, k, v, gates = self._project(x, cos, sin)
        if cache is None:
            k_cmp, v_cmp = self.compress(k, v)
            o = self._packed(q, k, v, k_cmp, v_cmp, gates)
            return self.o_proj(o.reshape(b, s, -1))
        cache.check_room(s)
        cache.write(layer_idx, k, v)
        if cache.max_committed == 0:  # every sequence is empty (host bound, no sync): a prefill
            k_cmp, v_cmp = self.compress(k, v)
            cache.write_compressed_prefix(layer_idx, k_cmp, v_cmp)
            o = self._packed(q, k, v, k_cmp, v_cmp, gates)
            return self.o_proj(o.reshape(b, s, -1))
        k_blocks, v_blocks, slots = cache.completed_blocks(layer_idx, s)  # [B, J, Hk, l, Dh] x 2, [B, J]
        cache.store_compressed(layer_idx, slots, self.compress_k(k_blocks), self.compress_v(v_blocks))
        k_all, v_all, k_cmp_all, v_cmp_all = cache.layer(layer_idx)
        q, gates = q.to(cache.dtype), gates.to(cache.dtype)
        outs = []
        for i in range(s):  # S is 1 in plain decoding, N + 1 in a speculative verification
            lens = cache.seqlens + (i + 1)  # [B] int32: query i sees positions < seqlens + i + 1
            outs.append(nsa_ops.nsa_decode(q[:, i], k_all, v_all, k_cmp_all, v_cmp_all, lens, cache.cmp_lens(lens),
                                           gates[:, i], softmax_scale=self.softmax_scale, **self.geometry))
        o = torch.stack(outs, dim=1).to(x.dtype)  # [B, S, H, Dh]
        return self.o_proj(o.reshape(b, s, -1))
