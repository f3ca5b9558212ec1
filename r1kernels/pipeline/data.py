"""Token batches for the stages: prompt + completion sequences with the prompt masked out of the loss.

Letters: B sequences, S padded length.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..training.losses import IGNORE_INDEX


@dataclass
class Batch:
    """``input_ids [B, S]`` int64 (right-padded), ``labels [B, S]`` (IGNORE_INDEX on prompt and padding),
    ``num_tokens``: the tokens that carry a label."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    num_tokens: int


def encode_pair(tokenizer, prompt: str, completion: str, max_len: int) -> tuple[list[int], list[int]]:
    """``bos + prompt`` (no loss) then ``completion + eos`` (loss), cut to ``max_len`` tokens."""
    p = tokenizer.encode(prompt, add_bos=True)
    c = tokenizer.encode(completion, add_bos=False, add_eos=True)
    ids = (p + c)[:max_len]
    labels = ([IGNORE_INDEX] * len(p) + c)[:max_len]
    return ids, labels


def collate(pairs: Sequence[tuple[list[int], list[int]]], pad_id: int, device="cpu") -> Batch:
    """Right-pad ``(ids, labels)`` pairs into a :class:`Batch`."""
    width = max(len(ids) for ids, _ in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.int64)
    labels = torch.full((len(pairs), width), IGNORE_INDEX, dtype=torch.int64)
    for i, (x, y) in enumerate(pairs):
        ids[i, :len(x)] = torch.tensor(x)
        labels[i, :len(y)] = torch.tensor(y)
    n = int((labels[:, 1:] != IGNORE_INDEX).sum())
    return Batch(ids.to(device), labels.to(device), n)
