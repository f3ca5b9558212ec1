"""Sampling references: filtered distributions, seeded sampling, exact speculative verification.

Letters: B rows, V vocabulary, N drafted tokens per row, j a position (0..N), i a token id.

These functions are the spec of ``r1kernels.ops.sample`` / ``filtered_probs`` / ``speculative_verify``.
A row's parameters may be Python scalars or per-row tensors ``[B]``; they are read per row as follows.

Row semantics (``filtered_probs``), with x = logits in fp32 and t the temperature:

* ``t <= 0``: greedy. The distribution is one-hot at argmax(x), the lowest index among equal maxima; the
  filters are ignored.
* otherwise p = softmax(x / t) in fp32, then the filters in this order:

  1. top-k (``k <= 0`` or ``k >= V``: off): keep token i iff x_i >= the k-th largest logit (ties at the
     boundary are all kept); renormalise.
  2. top-p (``top_p >= 1``: off): keep token i iff the renormalised mass of the tokens whose probability is
     strictly greater than p_i is < top_p. This is the smallest set of most likely tokens whose mass
     reaches top_p, the crossing token included and ties at the crossing all kept; it is defined without
     sorting. ``top_p <= 0`` keeps only the most likely token(s) (strictly-greater mass 0). Renormalise.
  3. min-p (``min_p <= 0``: off): keep tokens with p_i >= min(min_p, 1) * max_j p_j; renormalise.

  Tokens of probability 0 (logit -inf, or exp underflow) are never kept. A row whose logits are all -inf
  has nothing to draw: its filtered distribution is all zeros (greedy rows still return argmax = 0).
  Logits must not hold NaN or +inf.

Randomness (``sample`` and ``speculative_verify``) is counter-based, so a row's draw depends only on its
seed, its row index (for an int seed) and its own logits, never on other rows or on the launch shape:

* r = word 0 of Philox4x32-10 (Salmon et al. 2011; the same rounds as Random123 and ``tl.randint4x``) with
  key = the 64-bit seed and counter (c0, c1, c2, c3) = (token id i, position j, stream, salt), where
  stream 0 draws tokens and stream 1 the acceptance test of speculative verification, and salt = row + 1
  for an int seed (one key, distinct rows) or 0 for a per-row seed tensor;
* U = (2 * (r >> 9) + 1) / 2^24, uniform on (0, 1) and exact in fp32;
* a token is drawn by an exponential race: argmax_i w_i / E_i with E_i = -ln U_i over the tokens of
  weight w_i > 0, which picks i with probability w_i / sum(w) (Gumbel-max in ratio form). Nothing to draw
  (all weights 0) gives -1.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

Param = Union[float, int, torch.Tensor]
Seed = Union[int, torch.Tensor]

_MASK32 = 0xFFFFFFFF
# Philox4x32 multipliers and Weyl key increments (Random123).
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
STREAM_TOKEN = 0  # noise of the exponential race that draws a token
STREAM_ACCEPT = 1  # the uniform of a speculative acceptance test


# ----------------------------------------------------------------------------------------------------
# Counter-based random numbers


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of a * b for a 32-bit constant a and int64 tensors b holding uint32 values.

    a * b reaches 2^64, beyond int64; a is split in 16-bit halves so every partial product stays below 2^49.
    """
    a_hi, a_lo = a >> 16, a & 0xFFFF
    p_hi, p_lo = a_hi * b, a_lo * b  # < 2^48 each
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK32
    return hi, lo


def philox4x32(c0, c1, c2, c3, k0, k1, rounds: int = 10) -> tuple[torch.Tensor, ...]:
    """Philox4x32-``rounds`` of counters (c0, c1, c2, c3) under key (k0, k1); all int64 tensors (broadcast)
    holding uint32 values. Returns the four output words as int64 tensors in [0, 2^32)."""
    c0, c1, c2, c3, k0, k1 = torch.broadcast_tensors(c0, c1, c2, c3, k0, k1)
    for _ in range(rounds):
        hi0, lo0 = _mulhilo32(_PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(_PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _PHILOX_W0) & _MASK32
        k1 = (k1 + _PHILOX_W1) & _MASK32
    return c0, c1, c2, c3


def as_int64(seed: int) -> int:
    """An int seed as the int64 holding its low 64 bits (two's complement): -1 and 2^64 - 1 are one key."""
    s = int(seed) % 2**64
    return s - 2**64 if s >= 2**63 else s


def seed_keys(seed: Seed, rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(k0, k1, salt)``, each int64 ``[rows]``: the Philox key halves and the salt counter of each row.

    ``seed``: an int (one key for all rows, salt = row + 1) or an int64 tensor ``[rows]`` (per-row keys, salt 0).
    """
    if isinstance(seed, torch.Tensor):
        s = seed.to(device=device, dtype=torch.int64)
        salt = torch.zeros(rows, dtype=torch.int64, device=device)
    else:
        s = torch.full((rows,), as_int64(seed), dtype=torch.int64, device=device)
        salt = torch.arange(1, rows + 1, dtype=torch.int64, device=device)
    return s & _MASK32, (s >> 32) & _MASK32, salt


def uniforms(seed: Seed, rows: int, ids: torch.Tensor, position: Union[int, torch.Tensor], stream: int) -> torch.Tensor:
    """U ``[rows, n]`` fp32 in (0, 1) for token ids ``ids`` (``[n]`` or ``[rows, n]``) at ``position``
    (int or int64 ``[rows]``) of ``stream``: U = (2 (r >> 9) + 1) / 2^24, r = Philox word 0 (module docstring)."""
    k0, k1, salt = seed_keys(seed, rows, ids.device)
    pos = torch.as_tensor(position, dtype=torch.int64, device=ids.device)
    pos = pos[:, None] if pos.dim() == 1 else pos
    ids = ids.to(torch.int64)
    ids = ids[None, :] if ids.dim() == 1 else ids
    r = philox4x32(ids, pos, torch.tensor(stream, device=ids.device), salt[:, None], k0[:, None], k1[:, None])[0]
    return ((r >> 9) * 2 + 1).to(torch.float32) * (1.0 / 2**24)


def race(weights: torch.Tensor, seed: Seed, position: Union[int, torch.Tensor] = 0) -> torch.Tensor:
    """The exponential race over ``weights [B, V]`` (>= 0, any scale): argmax_i w_i / E_i, E_i = -ln U_i,
    U from stream 0 at ``position``; -1 for rows of all-zero weights. Returns int64 ``[B]``."""
    b, v = weights.shape
    e = -torch.log(uniforms(seed, b, torch.arange(v, device=weights.device), position, STREAM_TOKEN))  # [B, V]
    score = torch.where(weights > 0, weights.float() / e, torch.full_like(e, -1.0))
    tok = score.argmax(dim=-1)  # the first maximum: the lowest id among equal scores
    return torch.where((weights > 0).any(dim=-1), tok, torch.full_like(tok, -1))


# ----------------------------------------------------------------------------------------------------
# Filters


def _per_row(value: Param, rows: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A scalar or ``[rows]`` tensor parameter as a ``[rows]`` tensor of ``dtype``."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype).reshape(rows)
    return torch.full((rows,), value, dtype=dtype, device=device)


def _strictly_greater_mass(p: torch.Tensor) -> torch.Tensor:
    """For each token, the sum of the probabilities strictly greater than its own: ``[B, V]`` fp32.

    Computed by sorting (this is the reference; the kernel never sorts): with the row in descending order
    and c its exclusive prefix sum, the tokens strictly greater than p_i are the first n_gt(i) of the order,
    n_gt(i) = V - #(p <= p_i), so the mass is c[n_gt(i)]. Summing from the largest keeps it accurate.
    """
    v = p.shape[-1]
    p = p.contiguous()  # searchsorted wants contiguous rows
    asc = p.sort(dim=-1).values  # [B, V]
    n_le = torch.searchsorted(asc, p, right=True)  # [B, V]: how many are <= p_i
    desc = asc.flip(-1)
    excl = torch.cat([torch.zeros_like(desc[:, :1]), desc.cumsum(-1)], dim=-1)  # [B, V + 1]
    return excl.gather(1, v - n_le)


def filtered_probs(logits: torch.Tensor, temperature: Param, top_k: Param = 0, top_p: Param = 1.0,
                   min_p: Param = 0.0) -> torch.Tensor:
    """The renormalised distribution after temperature, top-k, top-p and min-p (module docstring).

    Args:
        logits: ``[B, V]`` fp32 / fp16 / bf16 (upcast to fp32).
        temperature, top_k, top_p, min_p: Python scalars or per-row tensors ``[B]``.
    Returns:
        ``[B, V]`` fp32, each row summing to 1 (one-hot for greedy rows; all zeros for a sampled row of all
        -inf logits).
    """
    x = logits.float()
    b, v = x.shape
    dev = x.device
    t = _per_row(temperature, b, dev, torch.float32)
    k = _per_row(top_k, b, dev, torch.int64)
    tp = _per_row(top_p, b, dev, torch.float32)
    mp = _per_row(min_p, b, dev, torch.float32)
    greedy = t <= 0

    s = x / torch.where(greedy, torch.ones_like(t), t)[:, None]  # [B, V]
    p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)  # rows of all -inf: nothing to draw

    # 1. top-k on the logits: keep x_i >= the k-th largest.
    k_on = (k > 0) & (k < v)
    kth = x.sort(dim=-1, descending=True).values.gather(1, (k.clamp(1, v) - 1)[:, None])  # [B, 1]
    p = torch.where(k_on[:, None] & (x < kth), torch.zeros_like(p), p)
    p = _renormalise(p)

    # 2. top-p: keep i iff mass(p_j > p_i) < top_p; top_p <= 0 keeps the tokens of greatest probability.
    above = _strictly_greater_mass(p)
    keep_p = (above < tp[:, None]) | (above == 0)
    p = torch.where((tp < 1)[:, None] & ~keep_p, torch.zeros_like(p), p)
    p = _renormalise(p)

    # 3. min-p relative to the most likely remaining token.
    pmax = p.max(dim=-1, keepdim=True).values
    keep_m = p >= mp.clamp(max=1.0)[:, None] * pmax
    p = torch.where((mp > 0)[:, None] & ~keep_m, torch.zeros_like(p), p)
    p = _renormalise(p)

    onehot = torch.nn.functional.one_hot(x.argmax(dim=-1), v).to(torch.float32)
    return torch.where(greedy[:, None], onehot, p)


def _renormalise(p: torch.Tensor) -> torch.Tensor:
    z = p.sum(dim=-1, keepdim=True)
    return torch.where(z > 0, p / torch.where(z > 0, z, torch.ones_like(z)), p)


def sample(logits: torch.Tensor, temperature: Param, top_k: Param = 0, top_p: Param = 1.0, min_p: Param = 0.0,
           seed: Seed = 0) -> torch.Tensor:
    """One token per row from :func:`filtered_probs` by the exponential race with Philox noise.

    Args:
        logits: ``[B, V]`` fp32 / fp16 / bf16.
        temperature, top_k, top_p, min_p: scalars or per-row tensors ``[B]``.
        seed: an int or an int64 tensor ``[B]`` of per-row seeds (module docstring).
    Returns:
        int64 ``[B]``: argmax(logits) (lowest index) for greedy rows; else
        argmax_i p_i / E_i over p_i > 0 with E_i = -ln U_i, U from (seed, row, token i, position 0,
        stream 0); -1 for a sampled row of all -inf logits.
    """
    p = filtered_probs(logits, temperature, top_k, top_p, min_p)
    tok = race(p, seed, 0)
    greedy = _per_row(temperature, logits.shape[0], logits.device, torch.float32) <= 0
    return torch.where(greedy, logits.float().argmax(dim=-1), tok)


def speculative_verify(draft_tokens: torch.Tensor, draft_probs: Optional[torch.Tensor], target_logits: torch.Tensor,
                       temperature: Param, top_k: Param = 0, top_p: Param = 1.0, min_p: Param = 0.0,
                       seed: Seed = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact speculative sampling (Leviathan et al. 2023; Chen et al. 2023).

    With p_j = :func:`filtered_probs` of ``target_logits[:, j]`` (same parameters for every position) and
    q_j the draft distribution at position j (``draft_probs[:, j]``; one-hot at x_j when ``draft_probs`` is
    None, a greedy draft):

    * for j = 0..N-1: accept x_j iff U_j * q_j(x_j) < p_j(x_j), U_j from (seed, row, counter (0, j, stream 1,
      salt)); that is with probability min(1, p_j(x_j) / q_j(x_j)) (q_j(x_j) = 0: accepted iff p_j(x_j) > 0).
      A draft id outside [0, V) has p = 0 and is rejected.
    * at the first rejection j: emit the race winner (position j) over max(0, p_j - q_j); if that residual
      has no mass (p_j = q_j: only reachable with probability 0 of rejecting) over p_j instead; then stop.
    * if all N are accepted: emit the race winner over p_N (position N).

    Greedy rows (t <= 0) reduce to: accept while x_j == argmax target_j; the emitted token is the target
    argmax at the stop position. Every emitted token is distributed as the target's filtered distribution.

    Args:
        draft_tokens: int64 ``[B, N]``.
        draft_probs: fp32 ``[B, N, V]`` or None.
        target_logits: ``[B, N + 1, V]`` fp32 / fp16 / bf16.
        temperature, top_k, top_p, min_p, seed: as in :func:`sample` (per batch row).
    Returns:
        ``(tokens int64 [B, N + 1], num_accepted int64 [B])``: ``tokens[b, :a]`` the accepted drafts,
        ``tokens[b, a]`` the correction or bonus token (-1 if the target row at that position has only -inf
        logits), -1 after it; ``a = num_accepted[b]`` in 0..N.
    """
    b, n = draft_tokens.shape
    v = target_logits.shape[-1]
    dev = target_logits.device

    def rows(value: Param) -> Param:  # the batch row's parameter at each of its N + 1 positions
        return value.repeat_interleave(n + 1) if isinstance(value, torch.Tensor) else value

    p = filtered_probs(target_logits.reshape(b * (n + 1), v), rows(temperature), rows(top_k), rows(top_p),
                       rows(min_p)).view(b, n + 1, v)  # [B, N+1, V]
    x = draft_tokens.to(torch.int64)
    valid = (x >= 0) & (x < v)
    xc = x.clamp(0, v - 1)[..., None]  # [B, N, 1]
    p_x = torch.where(valid, p[:, :n].gather(2, xc)[..., 0], torch.zeros((), device=dev))  # [B, N]
    q = draft_probs.float() if draft_probs is not None else None
    q_x = q.gather(2, xc)[..., 0] if q is not None else torch.ones_like(p_x)  # [B, N]

    k0, k1, salt = seed_keys(seed, b, dev)
    j = torch.arange(n, device=dev, dtype=torch.int64)
    r = philox4x32(torch.zeros((), dtype=torch.int64, device=dev), j[None, :], torch.tensor(STREAM_ACCEPT, device=dev),
                   salt[:, None], k0[:, None], k1[:, None])[0]  # [B, N]
    u_acc = ((r >> 9) * 2 + 1).to(torch.float32) * (1.0 / 2**24)
    accept = u_acc * q_x < p_x
    num_acc = accept.to(torch.int64).cumprod(dim=1).sum(dim=1)  # [B]: accepted prefix length

    stop = num_acc.clamp(max=n)  # the position that emits
    p_stop = p.gather(1, stop[:, None, None].expand(b, 1, v))[:, 0]  # [B, V]
    if n > 0:
        pos = num_acc.clamp(max=n - 1)[:, None, None]
        q_stop = q.gather(1, pos.expand(b, 1, v))[:, 0] if q is not None else \
            torch.nn.functional.one_hot(x.gather(1, pos[..., 0]).clamp(0, v - 1)[:, 0], v).to(torch.float32) \
            * valid.gather(1, pos[..., 0]).float()
        residual = (p_stop - q_stop).clamp(min=0)
        residual = torch.where((residual > 0).any(dim=-1, keepdim=True), residual, p_stop)
        weights = torch.where((num_acc < n)[:, None], residual, p_stop)
    else:
        weights = p_stop
    emitted = race(weights, seed, stop)  # [B]

    cols = torch.arange(n + 1, device=dev)[None, :]
    drafts = torch.cat([x, torch.full((b, 1), -1, dtype=torch.int64, device=dev)], dim=1)  # [B, N+1]
    tokens = torch.where(cols < num_acc[:, None], drafts, torch.full_like(drafts, -1))
    tokens = torch.where(cols == num_acc[:, None], emitted[:, None], tokens)
    return tokens, num_acc
