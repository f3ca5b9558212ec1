"""Self-speculative decoding: early exit (LayerSkip-style) and MTP drafting, both exact.

Letters: B rows, N drafted tokens per round, D hidden, V vocabulary, E exit layer, L layers, p a row's
committed cache length at the start of a round (the token x at position p is sampled but not yet cached).

A round:
  1. draft N tokens d_1..d_N after x with a cheap model (below), keeping the draft distributions q_j
     (None when greedy: a one-hot draft);
  2. the full model scores [x, d_1, .., d_N] at positions p..p+N in one pass: target logits [B, N+1, V];
  3. ``ops.speculative_verify``: for j = 1..N accept d_j with probability min(1, p_j(d_j) / q_j(d_j)); at the
     first rejection emit one token from normalise(max(0, p_j - q_j)) and stop; if all N are accepted emit a
     bonus token from p_{N+1}. This is the rejection-sampling rule of Leviathan et al. / Chen et al. (2023):
     every emitted token is distributed exactly as the target model's (filtered) distribution, whatever q is,
     and at temperature 0 it reduces to "accept while d_j equals the target argmax", so the output is the
     plain greedy output token for token;
  4. commit: the cache length becomes p + accepted + 1 (x and the accepted drafts); rows written past it by
     rejected drafts are never read (attention masks by length) and are overwritten next round.

Early exit: layers 0..E-1, then the model's own final norm and head, draft autoregressively, writing the
same latent cache the full model uses (layers < E at positions p..p+N). The verify pass starts from the
saved layer-E hidden states and runs only layers E..L-1, so the drafted tokens' first E layers are never
recomputed. Acceptance needs a model trained with early-exit losses (LayerSkip); exactness does not.

MTP: DeepSeek-V3's MTP module k=1 maps (h_i, emb(t_{i+1})) to a prediction of t_{i+2}. After each verify
pass the module catches up over the new positions with the full model's hidden states (which also yields
d_1); d_2..d_N reuse the module on its own output hidden state (the full model's one is not known yet), as
the serving engines do with one MTP module. The module has its own latent cache, kept at the main cache's
lengths.
"""
from __future__ import annotations

import torch

from ..ops.sampling import filtered_probs, sample, speculative_verify
from .generate import GenerationStats, SamplingParams, SeedStream, Tracker, last_positions


def _draft(logits: torch.Tensor, params: SamplingParams, seeds: SeedStream, probs: list) -> torch.Tensor:
    """One draft token per row from the drafter's logits ``[B, V]``; appends its distribution to ``probs``
    when sampling (the greedy draft is one-hot, given to the verifier as None)."""
    logits = params.restrict(logits)
    if params.greedy:
        return logits.argmax(dim=-1)
    probs.append(filtered_probs(logits, **params.kwargs()))  # [B, V]
    return sample(logits, **params.kwargs(), seed=seeds.next())


class _Acceptance:
    """Per-round acceptance counts of the running rows, accumulated on the device (read once at the end)."""

    def __init__(self, n: int, batch: int, device: torch.device):
        self.hist = torch.zeros(n + 1, dtype=torch.int64, device=device)  # [N + 1]
        self.rounds = 0

    def add(self, accepted: torch.Tensor, running: torch.Tensor) -> None:
        onehot = torch.nn.functional.one_hot(accepted, self.hist.numel())  # [B, N + 1]
        self.hist += (onehot * running[:, None]).sum(dim=0)
        self.rounds += 1

    def store(self, stats: GenerationStats) -> None:
        stats.rounds = self.rounds
        stats.accepted_histogram = self.hist.tolist()


def _verify_and_commit(cache, start: torch.Tensor, drafts: list, probs: list, logits: torch.Tensor,
                       tracker: Tracker, params: SamplingParams, seeds: SeedStream, acc: _Acceptance):
    """Steps 3 and 4 of a round. Returns (tokens [B, N+1], accepted [B], running-before-emit [B])."""
    tokens, accepted = speculative_verify(torch.stack(drafts, dim=1), torch.stack(probs, dim=1) if probs else None,
                                          params.restrict(logits), **params.kwargs(), seed=seeds.next())
    running = tracker.running
    acc.add(accepted, running)
    grow = torch.where(running, accepted + 1, torch.zeros_like(accepted))  # finished rows stop growing
    new_len = start + grow
    max_len = tracker.emit(tokens, accepted + 1, cache_lengths=new_len)
    cache.set_lengths(new_len.to(torch.int32), max_len)
    return tokens, accepted, grow


def early_exit_loop(model, x: torch.Tensor, cache, tracker: Tracker, params: SamplingParams, seeds: SeedStream,
                    stats: GenerationStats, *, num_draft: int, exit_layer: int) -> None:
    """Early-exit self-speculation from the pending tokens ``x [B]`` until every row is done."""
    n, n_layers = num_draft, len(model.layers)
    acc = _Acceptance(n, x.shape[0], x.device)
    while not tracker.all_done:
        start, start_max = cache.seqlens.clone(), cache.max_committed
        exits, drafts, probs = [], [], []
        tok = x
        for j in range(n + 1):
            # the last step only computes d_N's layer-E state for the verify pass; it drafts nothing
            h = model.run_layers(model.embed_tokens(tok[:, None]), 0, exit_layer, cache=cache)  # [B, 1, D]
            cache.advance(1)
            exits.append(h)
            if j < n:
                tok = _draft(model.logits(model.norm(h[:, 0])), params, seeds, probs)  # [B]
                drafts.append(tok)
        stats.draft_passes += n + 1
        cache.set_lengths(start, start_max)  # the verify pass writes layers E.. at the same positions
        h = model.run_layers(torch.cat(exits, dim=1), exit_layer, n_layers, cache=cache)  # [B, N+1, D]
        logits = model.logits(model.norm(h))  # [B, N+1, V]
        stats.target_passes += 1
        tokens, accepted, _ = _verify_and_commit(cache, start, drafts, probs, logits, tracker, params, seeds, acc)
        x = tokens.gather(1, accepted[:, None]).squeeze(1)
    acc.store(stats)


def mtp_loop(model, x: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor, hidden: torch.Tensor, cache,
             tracker: Tracker, params: SamplingParams, seeds: SeedStream, stats: GenerationStats, *,
             num_draft: int, page_size: int) -> None:
    """MTP self-speculation after the prefill (prompt ``ids [B, P]``, ``lengths [B]``, final-normed prompt
    ``hidden [B, P, D]``, first tokens ``x [B]``) until every row is done."""
    b, p_max = ids.shape
    n = num_draft
    acc = _Acceptance(n, b, x.device)
    mcache = model.new_mtp_cache(b, cache.capacity, page_size=page_size)
    # MTP prefill: position i pairs h_i with the token after it; after a prompt's last position that is x.
    next_ids = torch.cat([ids[:, 1:], ids[:, :1]], dim=1).scatter(1, (lengths - 1)[:, None], x[:, None])  # [B, P]
    g_all, lg_all = model.mtp_step(hidden, next_ids, mcache)  # [B, P, D], [B, P, V]
    mcache.set_lengths(lengths.to(torch.int32), p_max)
    g, lg = last_positions(g_all, lengths - 1), last_positions(lg_all, lengths - 1)  # [B, D], [B, V]
    stats.draft_passes += 1
    while not tracker.all_done:
        start, start_max = cache.seqlens.clone(), cache.max_committed
        drafts, probs = [], []
        for j in range(n):
            d = _draft(lg, params, seeds, probs)  # [B]
            drafts.append(d)
            if j < n - 1:  # recursive draft on the module's own hidden state
                g3, lg3 = model.mtp_step(g[:, None], d[:, None], mcache)
                mcache.advance(1)
                g, lg = g3[:, 0], lg3[:, 0]
        stats.draft_passes += n - 1
        mcache.set_lengths(start, start_max)  # the catch-up below rewrites these positions
        hn = model.forward_hidden(torch.cat([x[:, None], torch.stack(drafts, dim=1)], dim=1), cache=cache)  # [B, N+1, D]
        logits = model.logits(hn)  # [B, N+1, V]
        stats.target_passes += 1
        tokens, accepted, grow = _verify_and_commit(cache, start, drafts, probs, logits, tracker, params, seeds, acc)
        # catch-up: position p+j pairs the full model's h_{p+j} with the token after it, tokens[:, j] (j <= accepted)
        g_all, lg_all = model.mtp_step(hn, tokens.clamp(min=0), mcache)  # [B, N+1, D], [B, N+1, V]
        stats.draft_passes += 1
        mcache.set_lengths((start + grow).to(torch.int32), cache.max_committed)
        g, lg = last_positions(g_all, accepted), last_positions(lg_all, accepted)
        x = tokens.gather(1, accepted[:, None]).squeeze(1)
    acc.store(stats)


def finish_stats(stats: GenerationStats) -> None:
    """Derived acceptance figures from the histogram (no-op for plain decoding)."""
    hist = stats.accepted_histogram
    if not hist:
        return
    row_rounds = sum(hist)
    n = len(hist) - 1
    stats.drafted = n * row_rounds
    stats.accepted = sum(k * c for k, c in enumerate(hist))
    stats.acceptance_rate = stats.accepted / stats.drafted if stats.drafted else 0.0
    stats.mean_accepted_length = (stats.accepted + row_rounds) / row_rounds if row_rounds else 0.0
    stats.acceptance_by_position = [sum(hist[j + 1:]) / row_rounds if row_rounds else 0.0 for j in range(n)]
