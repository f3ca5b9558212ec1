"""Evaluation through the generation engine: accuracy, format rate, answer length, unsafe-response rate,
best-of-N and majority vote, and the speculative-decoding speedup.

Every metric is computed from generated text with the exact verifiers and rule-based checkers of
:mod:`.tasks` and :mod:`.rewards`; nothing is scored by a model.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..inference import generate, majority_vote
from .rewards import SafetyChecker, accuracy_reward, extract_answer, format_reward
from .tasks import Sample, verify


@dataclass
class Generated:
    """Completions of a batch: ``texts`` (decoded, specials dropped), ``tokens`` (ids), per prompt."""

    texts: list
    tokens: list


def complete(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, seed: Optional[int] = None, **kw) -> Generated:
    """Generate a completion for each prompt text (in batches), stopping at the tokenizer's eos."""
    texts, tokens = [], []
    for i in range(0, len(prompts), batch_size):
        chunk = [tokenizer.encode(p) for p in prompts[i:i + batch_size]]
        seeds = None if seed is None else [seed * 1_000_003 + i + j for j in range(len(chunk))]
        out = generate(model, chunk, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                       stop_tokens=[tokenizer.eos_id], seed=seeds, vocab_limit=tokenizer.vocab_size, **kw)
        for t in out.tokens:
            tokens.append(t)
            texts.append(tokenizer.decode(t, skip_special=True))
    return Generated(texts, tokens)


def evaluate(model, tokenizer, samples: Sequence[Sample], *, max_new_tokens: int,
             safety: Optional[SafetyChecker] = None, safety_split: str = "test", batch_size: int = 64) -> dict:
    """Greedy evaluation.

    Returns:
        ``accuracy`` (verified answers / samples), ``format_rate`` (well-formed ``<think>..</think><answer>..
        </answer>`` outputs), ``mean_tokens`` (generated tokens per answer), and with ``safety`` the
        ``unsafe_rate``: the fraction of the checker's unsafe prompts (of ``safety_split``) not refused.
    """
    gen = complete(model, tokenizer, [s.prompt for s in samples], max_new_tokens=max_new_tokens, batch_size=batch_size)
    n = max(1, len(samples))
    metrics = {
        "accuracy": sum(accuracy_reward(s, t) for s, t in zip(samples, gen.texts)) / n,
        "format_rate": sum(format_reward(t) for t in gen.texts) / n,
        "mean_tokens": sum(len(t) for t in gen.tokens) / n,
    }
    if safety is not None:
        prompts = safety.prompts(safety_split)
        out = complete(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
        metrics["unsafe_rate"] = sum(not safety.is_refusal(t) for t in out.texts) / max(1, len(prompts))
    return metrics


def sampled_accuracy(model, tokenizer, samples: Sequence[Sample], *, n: int, max_new_tokens: int,
                     temperature: float = 0.7, seed: int = 0) -> dict:
    """Best-of-N with the verifier as the scorer (pass@n: some sample verifies) and self-consistency (the
    majority answer over n samples verifies), both through one batched generation per prompt group."""
    best, vote = 0, 0
    for i, s in enumerate(samples):
        prompt = tokenizer.encode(s.prompt)

        def answer(tokens):
            return extract_answer(tokenizer.decode(tokens, skip_special=True))

        res = majority_vote(model, prompt, n, answer, max_new_tokens=max_new_tokens, temperature=temperature,
                            stop_tokens=[tokenizer.eos_id], seed=seed + i, vocab_limit=tokenizer.vocab_size)
        best += any(verify(s, answer(t)) for t in res.samples)
        vote += res.answer is not None and verify(s, res.answer)
    k = max(1, len(samples))
    return {"best_of_n_accuracy": best / k, "majority_vote_accuracy": vote / k, "n": n}


def speculative_speedup(model, tokenizer, samples: Sequence[Sample], *, max_new_tokens: int, num_draft: int = 4,
                        exit_layer: int = 1, repeats: int = 1) -> dict:
    """Batch-1 greedy tokens/s of plain, early-exit and MTP decoding over the prompts (same outputs checked).

    Returns ``{"plain_tokens_per_s", "<mode>": {"tokens_per_s", "speedup", "acceptance", "mean_accepted_length",
    "same_output"}}`` and, at the top level, ``speedup`` / ``acceptance`` of the faster mode.
    """
    modes = [None, "early_exit"] + (["mtp"] if len(model.mtp) else [])
    result: dict = {}
    outputs = {}
    for mode in modes:
        tokens, elapsed, acc, drafted, rounds, length = 0, 0.0, 0, 0, 0, 0.0
        outs = []
        for _ in range(repeats):
            for s in samples:
                t0 = time.perf_counter()
                out = generate(model, [tokenizer.encode(s.prompt)], max_new_tokens=max_new_tokens,
                               stop_tokens=[tokenizer.eos_id], speculative=mode, num_draft=num_draft,
                               exit_layer=exit_layer if mode == "early_exit" else None, vocab_limit=tokenizer.vocab_size)
                elapsed += time.perf_counter() - t0
                tokens += out.stats.new_tokens
                acc += out.stats.accepted
                drafted += out.stats.drafted
                rounds += out.stats.rounds
                outs.append(out.tokens[0])
        outputs[mode] = outs
        tps = tokens / elapsed if elapsed > 0 else 0.0
        if mode is None:
            result["plain_tokens_per_s"] = tps
            continue
        result[mode] = {
            "tokens_per_s": tps,
            "speedup": tps / result["plain_tokens_per_s"] if result["plain_tokens_per_s"] else 0.0,
            "acceptance": acc / drafted if drafted else 0.0,
            "mean_accepted_length": (acc + rounds) / rounds if rounds else 0.0,
            "same_output": outs == outputs[None],
            "num_draft": num_draft,
            **({"exit_layer": exit_layer} if mode == "early_exit" else {}),
        }
    best = max((m for m in modes if m), key=lambda m: result[m]["speedup"])
    result["best_mode"] = best
    result["speedup"] = result[best]["speedup"]
    result["acceptance"] = result[best]["acceptance"]
    return result


def wall_clock() -> float:
    """Seconds since an arbitrary start (perf counter), for stage timings."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()
