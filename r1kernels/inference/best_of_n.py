"""Best-of-N and self-consistency (majority vote), batched through the generation engine.

Every prompt is repeated n times in one :func:`generate` batch (distinct seed streams per copy), so the N
samples share the prefill batch and the decode steps.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from .generate import GenerationStats, _as_prompts, generate


@dataclass
class BestOfN:
    """``best``: the highest-scoring sample (first on ties); ``samples`` all n, ``scores`` theirs."""

    best: list
    best_score: float
    samples: list
    scores: list


@dataclass
class MajorityVote:
    """``answer``: the most frequent extracted answer (first seen on ties; None if no sample had one);
    ``votes``: answer -> count; ``agreement``: votes of the winner / n; ``samples``: the n token lists."""

    answer: Optional[str]
    votes: dict
    agreement: float
    samples: list


def _sample_n(model, prompts, n: int, kwargs: dict):
    if n < 1:
        raise ValueError(f"best_of_n / majority_vote: n must be >= 1, got {n}")
    if float(kwargs.get("temperature", 0.0)) == 0.0 and n > 1:
        raise ValueError("best_of_n / majority_vote: n > 1 samples need temperature > 0 (greedy gives n copies)")
    seed = kwargs.pop("seed", None)
    batch = [p for p in prompts for _ in range(n)]  # prompt-major: copies of prompt i are rows i*n .. i*n+n-1
    if isinstance(seed, int):
        seed = [seed * 1_000_003 + i for i in range(len(batch))]
    out = generate(model, batch, seed=seed, **kwargs)
    return [out.tokens[i * n:(i + 1) * n] for i in range(len(prompts))], out.stats


def best_of_n(model, prompt, n: int, scorer: Callable[[list], float], **generate_kwargs):
    """Sample n continuations per prompt and keep the best by ``scorer(tokens) -> float``.

    Args:
        prompt: one prompt (token ids) or a list of prompts (all sampled in one batch).
        n: samples per prompt; temperature (a ``generate`` keyword) must be > 0 when n > 1.
        scorer: a reward model or verifier over the generated token ids.
    Returns:
        :class:`BestOfN` (a list of them for a list of prompts), and the batch's :class:`GenerationStats` as
        ``result.stats`` on each.
    """
    single = not (len(prompt) and not isinstance(prompt[0], int)) if not hasattr(prompt, "dim") else prompt.dim() == 1
    prompts = _as_prompts(prompt)
    groups, stats = _sample_n(model, prompts, n, dict(generate_kwargs))
    results = []
    for samples in groups:
        scores = [float(scorer(s)) for s in samples]
        i = max(range(n), key=lambda k: (scores[k], -k))
        r = BestOfN(samples[i], scores[i], samples, scores)
        r.stats = stats
        results.append(r)
    return results[0] if single else results


def majority_vote(model, prompt, n: int, extract: Callable[[list], Optional[str]], **generate_kwargs):
    """Self-consistency (Wang et al. 2023): sample n continuations, extract each one's answer with
    ``extract(tokens) -> str | None`` and return the most frequent answer (a list for a list of prompts)."""
    single = not (len(prompt) and not isinstance(prompt[0], int)) if not hasattr(prompt, "dim") else prompt.dim() == 1
    prompts = _as_prompts(prompt)
    groups, stats = _sample_n(model, prompts, n, dict(generate_kwargs))
    results = []
    for samples in groups:
        answers = [extract(s) for s in samples]
        votes = Counter(a for a in answers if a is not None)
        if votes:
            top = max(votes.values())
            winner = next(a for a in answers if a is not None and votes[a] == top)  # first seen among the tied
        else:
            winner, top = None, 0
        r = MajorityVote(winner, dict(votes), top / n, samples)
        r.stats = stats
        results.append(r)
    return results[0] if single else results
