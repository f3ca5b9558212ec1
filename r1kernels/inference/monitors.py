"""Per-step monitors for :func:`r1kernels.generate`.

A monitor is any callable ``monitor(row, new_tokens, tokens) -> reason | None``, called on the host after
every decode step (or speculative round) for each row that produced tokens: ``row`` is the prompt index,
``new_tokens`` the ids produced this step, ``tokens`` all ids produced so far (including the new ones). A
non-empty reason stops that row; it is reported in ``GenerationStats.stop_reasons``. Monitors run on the one
host copy the engine makes per step anyway, so they add no device sync.
"""
from __future__ import annotations

import re
from typing import Callable, Iterable, Optional, Protocol, Sequence


class Monitor(Protocol):
    def __call__(self, row: int, new_tokens: list[int], tokens: list[int]) -> Optional[str]: ...


class StopStrings:
    """Stops a row once its decoded text contains one of ``strings``; reason ``"stop_string:<s>"``.

    Args:
        decode: token ids -> text (e.g. a tokenizer's ``decode``).
        strings: the stop strings.
        window: how many of the last tokens are decoded each step (a stop string must fit in them).
    """

    def __init__(self, decode: Callable[[list[int]], str], strings: Sequence[str], window: int = 64):
        if not strings or any(not s for s in strings):
            raise ValueError(f"StopStrings: strings must be non-empty strings, got {list(strings)!r}")
        self.decode, self.strings, self.window = decode, list(strings), int(window)

    def __call__(self, row: int, new_tokens: list[int], tokens: list[int]) -> Optional[str]:
        text = self.decode(tokens[-self.window:])
        for s in self.strings:
            if s in text:
                return f"stop_string:{s}"
        return None


class ContentMonitor:
    """A rule-based content monitor: stops a row whose decoded text matches a banned pattern.

    ``rules`` maps a rule name to a regular expression (case-insensitive); the reason is
    ``"content:<name>"``. The whole output is decoded every ``every`` tokens, so a match that spans steps is
    still caught.
    """

    DEFAULT_RULES = {
        "weapons": r"\b(build|make|assemble)\s+(a\s+)?(bomb|explosive|gun)\b",
        "malware": r"\b(write|create)\s+(a\s+)?(virus|ransomware|keylogger)\b",
    }

    def __init__(self, decode: Callable[[list[int]], str], rules: Optional[dict] = None):
        self.decode = decode
        self.rules = {name: re.compile(rx, re.IGNORECASE) for name, rx in (rules or self.DEFAULT_RULES).items()}

    def __call__(self, row: int, new_tokens: list[int], tokens: list[int]) -> Optional[str]:
        text = self.decode(tokens)
        for name, rx in self.rules.items():
            if rx.search(text):
                return f"content:{name}"
        return None


class TokenStream:
    """Streams one row's tokens as they come (``r1k generate``); never stops a row.

    ``emit(text_piece)`` receives the newly decoded text of ``row`` (decoded incrementally, so multi-token
    characters come out whole).
    """

    def __init__(self, decode: Callable[[list[int]], str], emit: Callable[[str], None], row: int = 0):
        self.decode, self.emit, self.row = decode, emit, row
        self._printed = 0

    def __call__(self, row: int, new_tokens: list[int], tokens: list[int]) -> Optional[str]:
        if row == self.row:
            text = self.decode(tokens)
            if len(text) > self._printed:
                self.emit(text[self._printed:])
                self._printed = len(text)
        return None
