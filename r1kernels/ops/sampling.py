"""Public sampling ops: filtered distributions, seeded sampling, exact speculative verification.

Letters: B rows, V vocabulary, N drafted tokens per row.

Backends: ``reference`` (``r1kernels.reference.sampling``, torch on any device) and ``triton``
(``r1kernels.triton.sampling``: sort-free threshold search, one pass to draw). ``auto`` picks Triton for CUDA
tensors and the reference on the CPU. Both use the same counter-based random numbers, so they draw the same
token for the same seed, except where fp32 rounding decides (exp / log / sums differ in the last bit between
torch and Triton): two race scores within rounding of each other, or a top_p / min_p within rounding of a
kept-set boundary. Nothing here synchronises with the host: ``seed=None`` draws per-row seeds on the device.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Union

import torch

from .._dispatch import Impl, Op, always, triton_check
from ..reference import sampling as ref
from ._validate import FLOAT_DTYPES, check_tensor

Param = Union[float, int, torch.Tensor]
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _check_param(op: str, name: str, value, rows: int, device: torch.device, integer: bool) -> Param:
    """A filter parameter: a Python number, or a ``[rows]`` tensor on ``device`` (integer dtype for top_k,
    floating otherwise). Scalars are checked for sense here; tensors are not read (that would sync)."""
    if isinstance(value, torch.Tensor):
        dtypes = _INT_DTYPES if integer else FLOAT_DTYPES
        check_tensor(op, name, value, shape=(rows,), dtypes=dtypes, device=device)
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        kind = "an int" if integer else "a float"
        raise TypeError(f"r1kernels.ops.{op}: {name} must be {kind} or a [{rows}] tensor, got {type(value).__name__}")
    if integer:
        if not isinstance(value, numbers.Integral):
            raise TypeError(f"r1kernels.ops.{op}: {name} must be an int (0 = off) or a [{rows}] tensor, got {value!r}")
        return int(value)
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"r1kernels.ops.{op}: {name} is NaN")
    if name == "temperature" and not (0.0 <= value < math.inf):
        raise ValueError(f"r1kernels.ops.{op}: temperature must be finite and >= 0 (0 = greedy), got {value}")
    return value


def _check_seed(op: str, seed, rows: int, device: torch.device):
    """None -> per-row int64 seeds drawn on ``device`` from torch's default generator (no host sync);
    an int (one key, rows told apart by their index); an int64 ``[rows]`` tensor of per-row seeds."""
    if seed is None:
        return torch.randint(-(2**63), 2**63 - 1, (rows,), dtype=torch.int64, device=device)
    if isinstance(seed, torch.Tensor):
        check_tensor(op, "seed", seed, shape=(rows,), dtypes=(torch.int64,), device=device)
        return seed
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"r1kernels.ops.{op}: seed must be None, an int or an int64 [{rows}] tensor, "
                        f"got {type(seed).__name__}")
    return int(seed)


def _check_filters(op: str, rows: int, device: torch.device, temperature, top_k, top_p, min_p) -> tuple:
    return (
        _check_param(op, "temperature", temperature, rows, device, integer=False),
        _check_param(op, "top_k", top_k, rows, device, integer=True),
        _check_param(op, "top_p", top_p, rows, device, integer=False),
        _check_param(op, "min_p", min_p, rows, device, integer=False),
    )


def _check_logits(op: str, name: str, logits, ndim: int) -> None:
    check_tensor(op, name, logits, ndim=ndim, dtypes=FLOAT_DTYPES)
    if logits.shape[-1] == 0:
        raise ValueError(f"r1kernels.ops.{op}: {name} must have a vocabulary of at least 1, "
                         f"got shape {tuple(logits.shape)}")


# ----------------------------------------------------------------------------------------------------
# Dispatch entries: positional (logits, temperature, top_k, top_p, min_p, seed), already checked.


def _sample_reference(logits, temperature, top_k, top_p, min_p, seed):
    return ref.sample(logits, temperature, top_k, top_p, min_p, seed)


def _sample_triton(logits, temperature, top_k, top_p, min_p, seed):
    from ..triton.sampling import sample as triton_sample

    return triton_sample(logits, temperature, top_k, top_p, min_p, seed)


def _verify_reference(draft_tokens, draft_probs, target_logits, temperature, top_k, top_p, min_p, seed):
    return ref.speculative_verify(draft_tokens, draft_probs, target_logits, temperature, top_k, top_p, min_p, seed)


def _verify_triton(draft_tokens, draft_probs, target_logits, temperature, top_k, top_p, min_p, seed):
    from ..triton.sampling import speculative_verify as triton_verify

    return triton_verify(draft_tokens, draft_probs, target_logits, temperature, top_k, top_p, min_p, seed)


SAMPLE = Op("sample", {
    "reference": Impl(_sample_reference, always),
    "triton": Impl(_sample_triton, triton_check),
})

SPECULATIVE_VERIFY = Op("speculative_verify", {
    "reference": Impl(_verify_reference, always),
    "triton": Impl(_verify_triton, triton_check),
})


# ----------------------------------------------------------------------------------------------------
# Public API


def filtered_probs(logits: torch.Tensor, *, temperature: Param, top_k: Param = 0, top_p: Param = 1.0,
                   min_p: Param = 0.0) -> torch.Tensor:
    """The distribution that :func:`sample` draws from: temperature, then top-k, top-p and min-p, each
    followed by renormalisation (exact rules: ``r1kernels.reference.sampling``).

    Args:
        logits: ``[B, V]`` fp32 / fp16 / bf16.
        temperature: >= 0 (0: greedy, a one-hot argmax row); a Python float or a ``[B]`` float tensor.
        top_k: keep the tokens whose logit is >= the k-th largest (<= 0 or >= V: off); int or ``[B]`` int tensor.
        top_p: keep the smallest most-likely set reaching mass top_p, ties at the crossing kept (>= 1: off).
        min_p: keep tokens with p >= min_p * max p (<= 0: off).
    Returns:
        ``[B, V]`` fp32 rows summing to 1 (all zeros for a sampled row whose logits are all -inf).
    """
    _check_logits("filtered_probs", "logits", logits, 2)
    params = _check_filters("filtered_probs", logits.shape[0], logits.device, temperature, top_k, top_p, min_p)
    return ref.filtered_probs(logits, *params)


def sample(logits: torch.Tensor, *, temperature: Param, top_k: Param = 0, top_p: Param = 1.0, min_p: Param = 0.0,
           seed: Union[None, int, torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """One token per row drawn from :func:`filtered_probs` (argmax for greedy rows).

    Args:
        logits: ``[B, V]`` fp32 / fp16 / bf16, any strides.
        temperature, top_k, top_p, min_p: as in :func:`filtered_probs`; scalars or ``[B]`` tensors on
            the logits' device.
        seed: None (per-row seeds drawn on the device from torch's default generator), an int, or an int64
            ``[B]`` tensor of per-row seeds. A row's token depends only on its seed (and, for an int seed, its
            row index) and its own logits: the same seed gives the same token, whatever the other rows.
        backend: ``"auto"``, ``"reference"`` or ``"triton"``.
    Returns:
        int64 ``[B]``; -1 for a sampled row whose logits are all -inf (nothing to draw; raising would need a
        host sync).
    """
    _check_logits("sample", "logits", logits, 2)
    b = logits.shape[0]
    params = _check_filters("sample", b, logits.device, temperature, top_k, top_p, min_p)
    seed = _check_seed("sample", seed, b, logits.device)
    if b == 0:
        return torch.empty(0, dtype=torch.int64, device=logits.device)
    if backend == "auto" and not isinstance(temperature, torch.Tensor) and float(temperature) == 0.0:
        # every row greedy: what every backend returns (the first maximum), without the filter and RNG work
        # (measured 0.9 ms -> 0.02 ms per decode step of the tiny preset on CPU through the reference)
        return logits.argmax(dim=-1)
    return SAMPLE(backend, logits, *params, seed)


def speculative_verify(draft_tokens: torch.Tensor, draft_probs: Optional[torch.Tensor], target_logits: torch.Tensor,
                       *, temperature: Param, top_k: Param = 0, top_p: Param = 1.0, min_p: Param = 0.0,
                       seed: Union[None, int, torch.Tensor] = None, backend: str = "auto"
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact speculative sampling (Leviathan et al. 2023; Chen et al. 2023) of N drafted tokens per row.

    p_j = :func:`filtered_probs` of ``target_logits[:, j]``, q_j = ``draft_probs[:, j]`` (one-hot at the
    draft when None: a greedy draft). Draft x_j is accepted with probability min(1, p_j(x_j) / q_j(x_j)); at
    the first rejection a token is drawn from normalise(max(0, p_j - q_j)) and the row stops; if all N are
    accepted a bonus token is drawn from p_N. Each emitted token is distributed as the target's filtered
    distribution; at temperature 0 this is greedy verification (accept while x_j == argmax, emit the argmax).

    Args:
        draft_tokens: int64 / int32 ``[B, N]`` (an id outside [0, V) is rejected).
        draft_probs: ``[B, N, V]`` fp32 (fp16 / bf16 accepted) or None.
        target_logits: ``[B, N + 1, V]`` fp32 / fp16 / bf16.
        temperature, top_k, top_p, min_p, seed, backend: as in :func:`sample` (per batch row).
    Returns:
        ``(tokens int64 [B, N + 1], num_accepted int64 [B])``: ``tokens[b, :a]`` the accepted drafts,
        ``tokens[b, a]`` the correction or bonus token, -1 after it (a = num_accepted[b] in 0..N). The
        emitted token is -1 if the target logits at that position are all -inf.
    """
    op = "speculative_verify"
    check_tensor(op, "draft_tokens", draft_tokens, ndim=2, dtypes=(torch.int64, torch.int32))
    b, n = draft_tokens.shape
    dev = draft_tokens.device
    _check_logits(op, "target_logits", target_logits, 3)
    v = target_logits.shape[-1]
    check_tensor(op, "target_logits", target_logits, shape=(b, n + 1, v), device=dev)
    if draft_probs is not None:
        check_tensor(op, "draft_probs", draft_probs, shape=(b, n, v), dtypes=FLOAT_DTYPES, device=dev)
    params = _check_filters(op, b, dev, temperature, top_k, top_p, min_p)
    seed = _check_seed(op, seed, b, dev)
    if b == 0:
        return torch.empty((0, n + 1), dtype=torch.int64, device=dev), torch.empty(0, dtype=torch.int64, device=dev)
    return SPECULATIVE_VERIFY(backend, draft_tokens, draft_probs, target_logits, *params, seed)
