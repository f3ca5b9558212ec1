"""The R1 pipeline: verifiable tasks, rule-based rewards and the tokenizer the stages build on.

``tokenizer``: :class:`CharTokenizer` (built in, no download) and :class:`HFTokenizer` (a ``tokenizer.json``).
``tasks``: arithmetic / countdown / zebra generators with verifiers, user JSONL data, :func:`make_dataset`.
``rewards``: accuracy, format, language-consistency, safety and length rewards and :class:`RewardFn`.
"""
from .rewards import (
    REFUSAL_TEXT,
    RewardFn,
    SafetyChecker,
    SafetyPolicy,
    accuracy_reward,
    extract_answer,
    format_reward,
    is_refusal,
    language_consistency_reward,
    length_penalty,
    safety_reward,
)
from .tasks import TASKS, Sample, load_jsonl, make_dataset, verify
from .tokenizer import CharTokenizer, HFTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "REFUSAL_TEXT", "RewardFn", "SafetyChecker", "SafetyPolicy", "accuracy_reward", "extract_answer",
    "format_reward", "is_refusal", "language_consistency_reward", "length_penalty", "safety_reward",
    "TASKS", "Sample", "load_jsonl", "make_dataset", "verify",
    "CharTokenizer", "HFTokenizer", "Tokenizer", "load_tokenizer",
]
