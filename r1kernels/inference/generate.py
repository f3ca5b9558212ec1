"""Batched generation on the MLA latent cache: prefill, decode one token, and the speculative loops.

Letters: B prompts in the batch, P longest prompt, V vocabulary, D hidden, N drafted tokens per round.

    prefill:   all prompts at once, right-padded to P, into an empty cache (expanded attention, causal, so a
               prompt never sees its padding); the cache lengths are then set to each prompt's own length
               and the first token is sampled from each prompt's last position.
    decode:    one token per row per step through the absorbed MLA decode over the latent cache.
    speculative (``speculative="early_exit" | "mtp"``, :mod:`.speculative`): a drafter proposes N tokens,
               the full model scores all of them in one pass, ``ops.speculative_verify`` keeps an exact
               prefix plus one token from the target distribution.

Host syncs: one per step (or speculative round): a single packed device->host copy of the rows' new
tokens, counts, stop flags and cache lengths, which drives stop strings, monitors, streaming and the host
bound of the cache lengths. Nothing else waits on the device.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch

from .monitors import Monitor

Number = Union[int, float, torch.Tensor]

# Stop-reason codes kept on the device (a monitor's reason is a host string).
_RUNNING, _STOP_TOKEN, _LENGTH = 0, 1, 2
_REASONS = {_STOP_TOKEN: "stop_token", _LENGTH: "length"}


@dataclass
class GenerationStats:
    """What one :func:`generate` call did.

    Attributes:
        new_tokens: tokens generated over all rows (stop tokens included).
        prefill_s / decode_s: wall time of the prefill (up to the first sampled token) and of the rest.
        tokens_per_s: ``new_tokens / (prefill_s + decode_s)``; decode_tokens_per_s: the tokens after the
            first one per row over ``decode_s``.
        target_passes / draft_passes: forward passes of the full model / of the drafter (each over a batch).
        rounds: speculative rounds (0 for plain decoding); drafted / accepted: draft tokens proposed and
            accepted over running rows; acceptance_rate = accepted / drafted; mean_accepted_length: tokens
            emitted per row per round (accepted drafts + the one token from the target), the expected
            speedup in passes of the full model.
        accepted_histogram: ``[N + 1]`` counts of row-rounds in which exactly k drafts were accepted.
        acceptance_by_position: ``[N]`` the fraction of row-rounds whose draft at position j was accepted.
        stop_reasons: per prompt, ``"stop_token"``, ``"length"`` or the reason a monitor gave.
    """

    num_prompts: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    tokens_per_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    target_passes: int = 0
    draft_passes: int = 0
    speculative: Optional[str] = None
    num_draft: int = 0
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    acceptance_rate: float = 0.0
    mean_accepted_length: float = 0.0
    accepted_histogram: list = field(default_factory=list)
    acceptance_by_position: list = field(default_factory=list)
    stop_reasons: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class GenerationOutput:
    """``tokens``: per prompt, the generated token ids (not the prompt); ``stats``: :class:`GenerationStats`."""

    tokens: list
    stats: GenerationStats


@dataclass
class SamplingParams:
    """The sampling filters of one call; each a scalar or a per-row tensor ``[B]`` (see ``ops.sample``)."""

    temperature: Number = 0.0
    top_k: Number = 0
    top_p: Number = 1.0
    min_p: Number = 0.0
    vocab_limit: Optional[int] = None

    def restrict(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits ``[..., V]`` with the ids >= ``vocab_limit`` removed (-inf), e.g. a model vocabulary padded
        past its tokenizer's."""
        if self.vocab_limit is None or self.vocab_limit >= logits.shape[-1]:
            return logits
        return logits.index_fill(-1, torch.arange(self.vocab_limit, logits.shape[-1], device=logits.device),
                                 float("-inf"))

    @property
    def greedy(self) -> bool:
        """True when every row is greedy (temperature 0): drafts are then one-hot argmax tokens."""
        t = self.temperature
        if isinstance(t, torch.Tensor):
            return False  # per-row temperatures: treat as sampled (argmax rows stay exact either way)
        return float(t) == 0.0

    def kwargs(self) -> dict:
        """The filters as keyword arguments of ``ops.sample`` / ``ops.speculative_verify``."""
        return dict(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p)


class SeedStream:
    """Per-row seeds for successive sampling calls, on the device, without host syncs.

    Row b's seed for call c is a mix of (base_b, c) only, so a row's draws do not depend on the other rows
    of the batch: generating a prompt alone with the same base seed gives the same tokens.
    """

    _MUL = 6364136223846793005  # Knuth's LCG multiplier: odd, so the map is a bijection mod 2^64
    _INC = 1442695040888963407

    def __init__(self, base: torch.Tensor):
        self.base = base  # [B] int64
        self.calls = 0

    @classmethod
    def make(cls, seed, batch: int, device: torch.device) -> "SeedStream":
        if seed is None:
            base = torch.randint(0, 2**62, (batch,), dtype=torch.int64, device=device)
        elif isinstance(seed, int):
            # prompt i of a batch seeded s gets base s * 1_000_003 + i: distinct streams per prompt
            base = seed * 1_000_003 + torch.arange(batch, dtype=torch.int64, device=device)
        else:
            base = torch.as_tensor(list(seed) if not isinstance(seed, torch.Tensor) else seed, dtype=torch.int64)
            if base.shape != (batch,):
                raise ValueError(f"generate: seed must be None, an int or one int per prompt ([{batch}]), "
                                 f"got shape {tuple(base.shape)}")
            base = base.to(device)
        return cls(base)

    def next(self) -> torch.Tensor:
        self.calls += 1
        inc = (self.calls * self._INC) % 2**64
        inc = inc - 2**64 if inc >= 2**63 else inc  # as a signed int64
        x = self.base * self._MUL + inc  # wraps mod 2^64 (two's complement int64)
        x = x ^ (x >> 29)
        return x & (2**62 - 1)  # non-negative


class Tracker:
    """The rows' outputs and stop state on the device, mirrored on the host once per step.

    ``emit(new [B, n], n_new [B])`` appends each running row's first n_new tokens, cut at a stop token or at
    ``max_new_tokens``; then one packed copy to the host feeds the monitors. ``all_done`` is the host view.
    """

    def __init__(self, batch: int, max_new_tokens: int, stop_tokens: Sequence[int], monitors: Sequence[Monitor],
                 device: torch.device):
        self.batch, self.max_new = batch, max_new_tokens
        self.device = device
        self.stop = torch.tensor(sorted(set(int(t) for t in stop_tokens)), dtype=torch.int64, device=device)
        self.count = torch.zeros(batch, dtype=torch.int64, device=device)
        self.reason = torch.zeros(batch, dtype=torch.int64, device=device)  # _RUNNING / _STOP_TOKEN / _LENGTH
        self.monitors = list(monitors)
        self.tokens: list[list[int]] = [[] for _ in range(batch)]
        self.host_reason: list[Optional[str]] = [None] * batch
        self.all_done = max_new_tokens == 0
        if self.all_done:
            self.host_reason = ["length"] * batch

    @property
    def running(self) -> torch.Tensor:
        """``[B]`` bool on the device."""
        return self.reason == _RUNNING

    def emit(self, new: torch.Tensor, n_new: torch.Tensor, cache_lengths: Optional[torch.Tensor] = None) -> Optional[int]:
        """Append ``new [B, n]`` (first ``n_new [B]`` valid per row). Returns the host max of
        ``cache_lengths [B]`` when given (read in the same copy)."""
        b, n = new.shape
        j = torch.arange(n, device=new.device)
        n_eff = torch.where(self.running, torch.minimum(n_new, self.max_new - self.count), torch.zeros_like(n_new))
        valid = j[None, :] < n_eff[:, None]  # [B, n]
        if self.stop.numel():
            hit = torch.isin(new, self.stop) & valid
            any_hit = hit.any(dim=1)
            first = torch.where(hit, j[None, :], n).amin(dim=1)  # first stop position, n if none
            n_eff = torch.where(any_hit, first + 1, n_eff)
            self.reason = torch.where(any_hit & (self.reason == _RUNNING), _STOP_TOKEN, self.reason)
        self.count = self.count + n_eff
        self.reason = torch.where((self.count >= self.max_new) & (self.reason == _RUNNING), _LENGTH, self.reason)
        parts = [n_eff[:, None], self.reason[:, None], new.long()]
        if cache_lengths is not None:
            parts.append(cache_lengths.long()[:, None])
        host = torch.cat(parts, dim=1).cpu()  # the one device->host copy of the step
        rows = host.tolist()
        stopped = []
        for r, row in enumerate(rows):
            k = row[0]
            if k:
                fresh = row[2:2 + k]
                self.tokens[r].extend(fresh)
                for mon in self.monitors:
                    why = mon(r, fresh, self.tokens[r])
                    if why and row[1] == _RUNNING:
                        self.host_reason[r] = str(why)
                        stopped.append(r)
                        row[1] = -1
                        break
            if row[1] > 0 and self.host_reason[r] is None:
                self.host_reason[r] = _REASONS[row[1]]
        if stopped:
            self.reason[torch.tensor(stopped, device=self.device)] = -1  # stopped by a monitor
        self.all_done = all(r is not None for r in self.host_reason)
        return max(row[-1] for row in rows) if cache_lengths is not None else None


def _as_prompts(prompts) -> list[list[int]]:
    if isinstance(prompts, torch.Tensor):
        prompts = [prompts] if prompts.dim() == 1 else list(prompts)
    elif len(prompts) and isinstance(prompts[0], int):
        prompts = [prompts]
    out = [p.tolist() if isinstance(p, torch.Tensor) else [int(t) for t in p] for p in prompts]
    if not out:
        raise ValueError("generate: prompts is empty; give at least one prompt (a list of token ids)")
    for i, p in enumerate(out):
        if not p:
            raise ValueError(f"generate: prompt {i} is empty; every prompt needs at least one token")
    return out


def _check_tokens(name: str, prompts: list[list[int]], vocab: int) -> None:
    for i, p in enumerate(prompts):
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"generate: {name} {i} holds token ids outside [0, {vocab}): {bad[:5]}")


def prefill(model, ids: torch.Tensor, lengths: torch.Tensor, cache, *, max_len: int) -> torch.Tensor:
    """Run right-padded prompts ``ids [B, P]`` (true ``lengths [B]``) into an empty cache.

    Returns the final-normed hidden states ``[B, P, D]``; the cache holds every prompt's rows with its
    length set to the prompt's own (the padded rows past it are never read and get overwritten).
    """
    h = model.run_layers(model.embed_tokens(ids), 0, len(model.layers), cache=cache)  # [B, P, D]
    cache.set_lengths(lengths.to(torch.int32), max_len)
    return model.norm(h)


def last_positions(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x [B, S, ...]``, ``index [B]`` -> ``x[b, index[b]]`` ``[B, ...]``."""
    idx = index.long().view(-1, *([1] * (x.dim() - 1))).expand(x.shape[0], 1, *x.shape[2:])
    return x.gather(1, idx).squeeze(1)


def decode_one_token(model, x: torch.Tensor, cache) -> torch.Tensor:
    """The last tokens ``x [B]`` -> logits ``[B, V]`` of the next ones; the cache advances by 1."""
    return model(x[:, None], cache=cache)[:, -1]


@torch.no_grad()
def generate(model, prompts, *, max_new_tokens: int, temperature: Number = 0.0, top_k: Number = 0,
             top_p: Number = 1.0, min_p: Number = 0.0, stop_tokens: Sequence[int] = (), seed=None,
             speculative: Optional[str] = None, num_draft: int = 4, exit_layer: Optional[int] = None,
             monitors: Sequence[Monitor] = (), vocab_limit: Optional[int] = None,
             page_size: int = 64) -> GenerationOutput:
    """Generate continuations of a batch of prompts with a :class:`r1kernels.Transformer`.

    Args:
        model: a ``Transformer`` (its device and dtype are used; it runs in eval mode during the call).
        prompts: one prompt (a sequence / 1-D tensor of token ids) or a list of them, of any lengths.
        max_new_tokens: at most this many new tokens per prompt (a stop token counts as one).
        temperature, top_k, top_p, min_p: the sampling filters of ``ops.sample`` (scalars or per-prompt
            tensors ``[B]``); temperature 0 is greedy.
        stop_tokens: token ids that end a row (the stop token is kept in its output).
        seed: None (torch's generator), an int (prompt i uses stream ``seed * 1_000_003 + i``) or one int per
            prompt; a row's draws depend only on its own seed.
        speculative: None (plain decoding), ``"early_exit"`` (the first ``exit_layer`` layers + the final norm
            and head draft) or ``"mtp"`` (the model's first MTP module drafts). Both are exact: greedy output
            equals plain greedy output; sampled output follows the full model's distribution.
        num_draft: N, tokens drafted per speculative round.
        exit_layer: early exit: the layer count of the drafter (1 .. num_hidden_layers - 1; default half).
        monitors: callables ``monitor(row, new_tokens, all_tokens) -> reason | None`` run after each step on
            the host; a reason stops that row and is reported in ``stats.stop_reasons``.
        vocab_limit: only ids below it are generated (None: the whole vocabulary).
        page_size: tokens per page of the latent cache.
    Returns:
        :class:`GenerationOutput` with the new tokens per prompt and :class:`GenerationStats`.
    """
    from ..ops.sampling import sample
    from . import speculative as spec

    cfg = model.config
    prompts = _as_prompts(prompts)
    _check_tokens("prompt", prompts, cfg.vocab_size)
    if int(max_new_tokens) < 0:
        raise ValueError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
    max_new_tokens = int(max_new_tokens)
    if speculative not in (None, "early_exit", "mtp"):
        raise ValueError(f"generate: speculative must be None, 'early_exit' or 'mtp', got {speculative!r}")
    if speculative is not None and num_draft < 1:
        raise ValueError(f"generate: num_draft must be >= 1, got {num_draft}")
    if speculative == "early_exit":
        exit_layer = cfg.num_hidden_layers // 2 if exit_layer is None else int(exit_layer)
        if not 1 <= exit_layer < cfg.num_hidden_layers:
            raise ValueError(f"generate: exit_layer must be in [1, {cfg.num_hidden_layers - 1}] "
                             f"(num_hidden_layers = {cfg.num_hidden_layers}), got {exit_layer}")
    if speculative == "mtp" and len(model.mtp) == 0:
        raise ValueError("generate: speculative='mtp' needs a model with an MTP module (num_nextn_predict_layers >= 1)")
    _check_tokens("stop_tokens", [list(stop_tokens)], cfg.vocab_size) if stop_tokens else None

    device = model.embed_tokens.weight.device
    b = len(prompts)
    lens = [len(p) for p in prompts]
    p_max = max(lens)
    if vocab_limit is not None and not 1 <= int(vocab_limit) <= cfg.vocab_size:
        raise ValueError(f"generate: vocab_limit must be in [1, {cfg.vocab_size}], got {vocab_limit}")
    params = SamplingParams(temperature, top_k, top_p, min_p, vocab_limit)
    seeds = SeedStream.make(seed, b, device)
    stats = GenerationStats(num_prompts=b, speculative=speculative, num_draft=num_draft if speculative else 0)
    tracker = Tracker(b, max_new_tokens, stop_tokens, monitors, device)
    if tracker.all_done:
        stats.stop_reasons = list(tracker.host_reason)
        return GenerationOutput([[] for _ in range(b)], stats)

    was_training = model.training
    model.eval()
    try:
        t0 = time.perf_counter()
        ids = torch.zeros(b, p_max, dtype=torch.int64)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = torch.tensor(p)
        ids = ids.to(device)
        lengths = torch.tensor(lens, dtype=torch.int64, device=device)
        # room for every prompt, every new token, and one speculative round's overhang
        extra = num_draft + 2 if speculative else 1
        cache = model.new_cache(b, p_max + max_new_tokens + extra, page_size=page_size)
        hidden = prefill(model, ids, lengths, cache, max_len=p_max)  # [B, P, D]
        logits = params.restrict(model.logits(last_positions(hidden, lengths - 1)))  # [B, V]
        x = sample(logits, **params.kwargs(), seed=seeds.next())  # [B]
        stats.target_passes += 1
        tracker.emit(x[:, None], torch.ones_like(x))
        t1 = time.perf_counter()
        stats.prefill_s = t1 - t0
        if speculative is None:
            while not tracker.all_done:
                logits = params.restrict(decode_one_token(model, x, cache))
                x = sample(logits, **params.kwargs(), seed=seeds.next())
                stats.target_passes += 1
                tracker.emit(x[:, None], torch.ones_like(x))
        elif speculative == "early_exit":
            spec.early_exit_loop(model, x, cache, tracker, params, seeds, stats, num_draft=num_draft,
                                 exit_layer=exit_layer)
        else:
            spec.mtp_loop(model, x, ids, lengths, hidden, cache, tracker, params, seeds, stats,
                          num_draft=num_draft, page_size=page_size)
        stats.decode_s = time.perf_counter() - t1
    finally:
        model.train(was_training)

    stats.new_tokens = sum(len(t) for t in tracker.tokens)
    total = stats.prefill_s + stats.decode_s
    stats.tokens_per_s = stats.new_tokens / total if total > 0 else math.inf
    rest = stats.new_tokens - sum(1 for t in tracker.tokens if t)
    stats.decode_tokens_per_s = rest / stats.decode_s if stats.decode_s > 0 else 0.0
    stats.stop_reasons = list(tracker.host_reason)
    spec.finish_stats(stats)
    return GenerationOutput(tracker.tokens, stats)
