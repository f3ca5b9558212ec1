"""Verifiable tasks for the R1 pipeline: generators, verifiers, the registry and dataset builder.

Every generated :class:`Sample` carries a prompt, the reference answer, and a worked solution in R1's
format ``<think>trace</think><answer>answer</answer>``. Problems are sized for a tiny (4-layer) model:
compact prompts (``"47+85="``), traces of a few dozen characters.

Tasks (:data:`TASKS`; difficulty ``"easy" | "medium" | "hard"``, see each task's ``levels``):

* ``arithmetic``: ``a+b=``, ``a-b=``, ``a*b=`` with 1..4-digit operands; the trace works column by column,
  carry by carry (``47+85=`` -> ``7+5=12,4+8+1=13`` -> ``132``). Verifier: integer equality.
* ``countdown``: reach a target from 3-4 numbers with ``+ - * /`` (exact division only), each number used
  at most once (``8,3,5,2->21``). The generator builds the target from a random expression over the numbers,
  so a solution exists; the trace is that expression's steps. Verifier: a safe recursive-descent parser
  (no ``eval``) with exact rational arithmetic.
* ``zebra``: a logic grid (2-4 houses in a row, 2-3 attributes) with a unique solution, proved by brute
  force over all assignments while the clues are drawn; the question asks one attribute of one value.
  The trace is an elimination log from a propagation solver. Verifier: normalised exact match.
* ``jsonl``: user data read by :func:`load_jsonl`; verifier: normalised exact match.
* ``safety``: prompts that must be refused (built by ``rewards.SafetyChecker.samples``); exact match
  against the canonical refusal answer.

Train / test: :func:`make_dataset` draws each split from its own seed stream and keeps only the problems
whose prompt hashes into that split, so the two splits never share a prompt, whatever the seeds.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import random
import re
import unicodedata
from collections import Counter
from fractions import Fraction
from types import MappingProxyType
from typing import Callable, Mapping, Sequence

from .tokenizer import ANSWER_CLOSE, ANSWER_OPEN, THINK_CLOSE, THINK_OPEN

LEVELS = ("easy", "medium", "hard")
SPLITS = ("train", "test")
# Share of all problems (by prompt hash) that belong to the test split.
TEST_PERCENT = 20


@dataclasses.dataclass
class Sample:
    """One problem.

    Attributes:
        prompt: what the model sees, e.g. ``"47+85="``.
        answer: the reference answer text, e.g. ``"132"``.
        solution: a worked solution, ``"<think>...</think><answer>...</answer>"`` (SFT target).
        task: the :data:`TASKS` key whose verifier judges answers.
        meta: task-specific facts (operands, numbers and target, the zebra grid...), JSON-serialisable.
    """

    prompt: str
    answer: str
    solution: str
    task: str
    meta: dict = dataclasses.field(default_factory=dict)


def format_solution(trace: str, answer: str) -> str:
    """R1's output format: ``<think>trace</think><answer>answer</answer>``."""
    return f"{THINK_OPEN}{trace}{THINK_CLOSE}{ANSWER_OPEN}{answer}{ANSWER_CLOSE}"


# ---------------------------------------------------------------------------------------------------------
# Answer normalisation shared by the exact-match verifiers
# ---------------------------------------------------------------------------------------------------------

def normalize_answer(text: str) -> str:
    """NFKC, case-folded, whitespace collapsed, surrounding whitespace and one trailing period removed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = " ".join(text.split())
    if text.endswith("."):
        text = text[:-1].rstrip()
    return text


_NUMBER_RE = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)")


def _as_number(text: str) -> Fraction | None:
    return Fraction(text) if _NUMBER_RE.fullmatch(text) else None


def verify_exact(sample: Sample, answer_text: str | None) -> bool:
    """Normalised exact match against ``sample.answer``; two numbers compare by value (``3.0`` == ``3``)."""
    if answer_text is None:
        return False
    got, want = normalize_answer(answer_text), normalize_answer(sample.answer)
    if got == want:
        return True
    got_n, want_n = _as_number(got), _as_number(want)
    return got_n is not None and got_n == want_n


# ---------------------------------------------------------------------------------------------------------
# Arithmetic
# ---------------------------------------------------------------------------------------------------------

def _rand_operand(rng: random.Random, max_digits: int) -> int:
    """Digit count uniform in 1..max_digits, then the value uniform among numbers with that many digits,
    so short operands are as common as long ones (0 counts as a 1-digit number)."""
    d = rng.randint(1, max_digits)
    lo = 0 if d == 1 else 10 ** (d - 1)
    return rng.randint(lo, 10**d - 1)


def _digits(n: int) -> list[int]:
    """Decimal digits of n >= 0, least significant first."""
    return [int(c) for c in reversed(str(n))]


def _add_trace(a: int, b: int) -> str:
    """Column-wise addition, units first: ``"7+5=12,4+8+1=13"`` (``+1`` is the carry in)."""
    da, db = _digits(a), _digits(b)
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x = da[i] if i < len(da) else 0
        y = db[i] if i < len(db) else 0
        s = x + y + carry
        steps.append(f"{x}+{y}" + (f"+{carry}" if carry else "") + f"={s}")
        carry = s // 10
    return ",".join(steps)


def _sub_trace(a: int, b: int) -> str:
    """Column-wise a-b for a >= b, units first: ``"12-7=5,5-1-1=3"`` for 52-17 (a borrowed ten shows as the
    ``1`` in front of the top digit; ``-1`` is the borrow paid back in the next column)."""
    da, db = _digits(a), _digits(b)
    steps, borrow = [], 0
    for i in range(len(da)):
        x = da[i]
        y = db[i] if i < len(db) else 0
        d = x - y - borrow
        top = x + 10 if d < 0 else x
        steps.append(f"{top}-{y}" + (f"-{borrow}" if borrow else "") + f"={top - y - borrow}")
        borrow = 1 if d < 0 else 0
    return ",".join(steps)


def _mul1_trace(a: int, d: int) -> str:
    """a times one digit d, units first: ``"7*5=35,4*5+3=23"`` for 47*5 (``+3`` is the carry in)."""
    steps, carry = [], 0
    for x in _digits(a):
        p = x * d + carry
        steps.append(f"{x}*{d}" + (f"+{carry}" if carry else "") + f"={p}")
        carry = p // 10
    return ",".join(steps)


def _mul_trace(a: int, b: int) -> str:
    """One-digit b: the column steps. Longer b: one partial product per digit of b (units first), then
    the shifted partials summed: ``"47*5=235,47*3=141,235+1410=1645"``."""
    if b < 10:
        return _mul1_trace(a, b)
    db = _digits(b)
    steps = [f"{a}*{d}={a * d}" for d in db]
    total = a * db[0]
    for i, d in enumerate(db[1:], start=1):
        shifted = a * d * 10**i
        steps.append(f"{total}+{shifted}={total + shifted}")
        total += shifted
    return ",".join(steps)


def arithmetic_sample(rng: random.Random, max_digits: int = 2, ops: str = "+-", allow_negative: bool = False,
                      mul_digits: int = 1) -> Sample:
    """One ``a<op>b=`` problem.

    Args:
        rng: the stream to draw from.
        max_digits: operands have 1..max_digits digits (1..4 in the built-in levels).
        ops: the operators to draw from, a subset of ``"+-*"``.
        allow_negative: for ``-``, allow a < b (answer negative); else the operands are ordered a >= b.
        mul_digits: for ``*``, the second operand has 1..mul_digits digits.
    """
    if not ops or set(ops) - set("+-*"):
        raise ValueError(f"arithmetic_sample: ops must be a non-empty subset of '+-*', got {ops!r}")
    if max_digits < 1 or mul_digits < 1:
        raise ValueError(f"arithmetic_sample: max_digits and mul_digits must be >= 1, got {max_digits}, {mul_digits}")
    op = rng.choice(ops)
    a = _rand_operand(rng, max_digits)
    b = _rand_operand(rng, min(mul_digits, max_digits) if op == "*" else max_digits)
    if op == "+":
        value, trace = a + b, _add_trace(a, b)
    elif op == "-":
        if a < b and not allow_negative:
            a, b = b, a
        value = a - b
        trace = _sub_trace(a, b) if a >= b else f"-({b}-{a}):" + _sub_trace(b, a)
    else:
        value, trace = a * b, _mul_trace(a, b)
    answer = str(value)
    return Sample(f"{a}{op}{b}=", answer, format_solution(trace, answer), "arithmetic",
                  {"a": a, "b": b, "op": op})


_INT_RE = re.compile(r"[+-]?\d+")


def verify_arithmetic(sample: Sample, answer_text: str | None) -> bool:
    """The answer, stripped, is an integer (optional sign, no separators) equal to the reference."""
    if answer_text is None:
        return False
    text = answer_text.strip()
    return bool(_INT_RE.fullmatch(text)) and int(text) == int(sample.answer)


# ---------------------------------------------------------------------------------------------------------
# Countdown
# ---------------------------------------------------------------------------------------------------------

_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}
_ATOM = 3  # precedence of a number or parenthesised group


def _combine(op: str, left: tuple, right: tuple) -> tuple:
    """(value, text, precedence) of ``left op right``, with only the parentheses the precedence needs:
    a lower-precedence child, or a same-precedence right child under ``-`` or ``/``."""
    lv, lt, lp = left
    rv, rt, rp = right
    p = _PREC[op]
    if lp < p:
        lt = f"({lt})"
    if rp < p or (rp == p and op in "-/"):
        rt = f"({rt})"
    value = {"+": lv + rv, "-": lv - rv, "*": lv * rv, "/": lv // rv}[op]
    return value, f"{lt}{op}{rt}", p


def countdown_sample(rng: random.Random, n_numbers: int = 3, max_number: int = 10, ops: str = "+-*",
                     max_target: int = 100, max_tries: int = 1000) -> Sample:
    """One countdown problem: ``"8,3,5,2->21"``; answer an expression such as ``"8*3-5+2"``.

    The numbers are drawn in 1..max_number; two random entries of the pool are combined with a random
    operator that keeps every intermediate a positive integer (``-`` takes the larger first, ``/`` only
    divides exactly and by more than 1) until one value is left: the target. Targets above
    ``max_target`` or equal to one of the numbers are redrawn.
    """
    if n_numbers < 2:
        raise ValueError(f"countdown_sample: n_numbers must be >= 2, got {n_numbers}")
    if not ops or set(ops) - set("+-*/"):
        raise ValueError(f"countdown_sample: ops must be a non-empty subset of '+-*/', got {ops!r}")
    for _ in range(max_tries):
        numbers = [rng.randint(1, max_number) for _ in range(n_numbers)]
        pool = [(n, str(n), _ATOM) for n in numbers]
        steps = []
        while len(pool) > 1:
            i, j = rng.sample(range(len(pool)), 2)
            x, y = pool[i], pool[j]
            if x[0] < y[0]:
                x, y = y, x
            feasible = [op for op in ops if op in "+*" or (op == "-" and x[0] > y[0])
                        or (op == "/" and y[0] > 1 and x[0] % y[0] == 0)]
            if not feasible:
                break
            op = rng.choice(feasible)
            if op in "+*" and rng.random() < 0.5:  # commutative: either order
                x, y = y, x
            node = _combine(op, x, y)
            steps.append(f"{x[0]}{op}{y[0]}={node[0]}")
            pool = [p for k, p in enumerate(pool) if k not in (i, j)] + [node]
        if len(pool) != 1:
            continue
        target, expr, _ = pool[0]
        if target > max_target or target in numbers:
            continue
        prompt = ",".join(map(str, numbers)) + f"->{target}"
        return Sample(prompt, expr, format_solution(",".join(steps), expr), "countdown",
                      {"numbers": numbers, "target": target})
    raise RuntimeError(
        f"countdown_sample: no target <= {max_target} in {max_tries} tries with n_numbers={n_numbers}, "
        f"max_number={max_number}, ops={ops!r}"
    )


class ExpressionError(ValueError):
    """A countdown answer that is not a well-formed expression over integers."""


_EXPR_MAX_CHARS = 256
_EXPR_MAX_DEPTH = 32


def _tokenize_expression(text: str) -> list[str]:
    if len(text) > _EXPR_MAX_CHARS:
        raise ExpressionError(f"expression longer than {_EXPR_MAX_CHARS} characters")
    tokens, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch.isspace():
            i += 1
        elif ch in "0123456789":
            j = i
            while j < len(text) and text[j] in "0123456789":
                j += 1
            if text[i] == "0" and j - i > 1:
                raise ExpressionError(f"number with a leading zero at position {i}")
            tokens.append(text[i:j])
            i = j
        elif ch in "+-*/()":
            tokens.append(ch)
            i += 1
        else:
            raise ExpressionError(f"unexpected character {ch!r} at position {i}")
    return tokens


def parse_expression(text: str) -> tuple[Fraction, list[int]]:
    """Evaluate ``text`` exactly; return (value, the integer literals used, in order).

    Grammar: ``expr := term (('+'|'-') term)*``, ``term := factor (('*'|'/') factor)*``,
    ``factor := INT | '(' expr ')'``. Non-negative decimal integers only (no unary sign, no leading zeros),
    at most 256 characters and 32 nested parentheses. Raises :class:`ExpressionError` on anything else,
    including division by zero.
    """
    tokens = _tokenize_expression(text)
    pos = 0
    used: list[int] = []

    def peek():
        return tokens[pos] if pos < len(tokens) else None

    def expr(depth):
        nonlocal pos
        value = term(depth)
        while peek() in ("+", "-"):
            op = tokens[pos]
            pos += 1
            rhs = term(depth)
            value = value + rhs if op == "+" else value - rhs
        return value

    def term(depth):
        nonlocal pos
        value = factor(depth)
        while peek() in ("*", "/"):
            op = tokens[pos]
            pos += 1
            rhs = factor(depth)
            if op == "/" and rhs == 0:
                raise ExpressionError("division by zero")
            value = value * rhs if op == "*" else value / rhs
        return value

    def factor(depth):
        nonlocal pos
        tok = peek()
        if tok is None:
            raise ExpressionError("expression ends early")
        if tok == "(":
            if depth >= _EXPR_MAX_DEPTH:
                raise ExpressionError(f"more than {_EXPR_MAX_DEPTH} nested parentheses")
            pos += 1
            value = expr(depth + 1)
            if peek() != ")":
                raise ExpressionError("missing ')'")
            pos += 1
            return value
        if tok.isdigit():
            pos += 1
            used.append(int(tok))
            return Fraction(int(tok))
        raise ExpressionError(f"unexpected {tok!r}")

    value = expr(0)
    if pos != len(tokens):
        raise ExpressionError(f"unexpected {tokens[pos]!r} after the expression")
    return value, used


def verify_countdown(sample: Sample, answer_text: str | None) -> bool:
    """The answer parses (:func:`parse_expression`), uses only the given numbers, each at most as often as
    it is given, and evaluates exactly to the target."""
    if answer_text is None:
        return False
    try:
        value, used = parse_expression(answer_text)
    except ExpressionError:
        return False
    if Counter(used) - Counter(sample.meta["numbers"]):
        return False
    return value == sample.meta["target"]


# ---------------------------------------------------------------------------------------------------------
# Zebra puzzles
#
# Letters: N houses numbered 1..N left to right, K attributes (categories), each with N of its values
# placed one per house. A candidate assigns every value a house: one permutation of 1..N per category,
# P = N! permutations, C = P^K candidates. Candidate c picks permutation d_k of category k, where
# c = sum_k d_k * P^(K-1-k). Sets of candidates are Python ints used as C-bit bitsets (bit c = candidate
# c), so the brute force over all C candidates is a handful of big-integer ANDs per clue.
# ---------------------------------------------------------------------------------------------------------

# Value names are short, lower-case and distinct across categories, so a clue "red=cat" is unambiguous.
ZEBRA_CATEGORIES = (
    ("color", ("red", "blue", "green", "white")),
    ("pet", ("cat", "dog", "fox", "owl")),
    ("drink", ("tea", "milk", "soda", "juice")),
    ("sport", ("golf", "judo", "polo", "chess")),
)
# Clue kinds with their notation and draw weights (relations over two values make the deduction longer).
#   at: red=2     not_at: red!=2     same: red=cat     diff: red!=cat
#   left: red<cat (red's house is somewhere left of cat's)     next: red~cat (neighbouring houses)
_CLUE_WEIGHTS = (("at", 1), ("not_at", 1), ("same", 2), ("diff", 1), ("left", 2), ("next", 1))


def _clue_text(clue: tuple) -> str:
    kind, u, v = clue
    sym = {"at": "=", "not_at": "!=", "same": "=", "diff": "!=", "left": "<", "next": "~"}[kind]
    return f"{u}{sym}{v}"


def _house_bitsets(k: int, n: int) -> list[list[int]]:
    """``bits[x][h - 1]``: the candidates that put value x (= category * N + index in category) in house h."""
    perms = list(itertools.permutations(range(1, n + 1)))
    p = len(perms)
    bits = []
    for cat in range(k):
        inner = p ** (k - 1 - cat)  # consecutive candidates sharing this category's permutation
        period = p * inner  # the pattern of this category's digit repeats every `period` candidates
        repeat = ((1 << (period * p**cat)) - 1) // ((1 << period) - 1)  # bit 0 of each period set
        block = (1 << inner) - 1
        for j in range(n):
            row = []
            for h in range(1, n + 1):
                one_period = 0
                for d, perm in enumerate(perms):
                    if perm[j] == h:
                        one_period |= block << (d * inner)
                row.append(one_period * repeat)  # copies never overlap: one_period < 2**period
            bits.append(row)
    return bits


_RELATIONS = {"same": lambda h, g: h == g, "diff": lambda h, g: h != g, "left": lambda h, g: h < g,
              "next": lambda h, g: abs(h - g) == 1}


def _clue_bits(clue: tuple, index: Mapping[str, int], bits: list[list[int]], everyone: int) -> int:
    """The candidates (a bitset) satisfying ``clue``; ``everyone`` is the set of all candidates."""
    kind, u, v = clue
    bu = bits[index[u]]
    if kind == "at":
        return bu[v - 1]
    if kind == "not_at":
        return everyone ^ bu[v - 1]
    bv, rel, n = bits[index[v]], _RELATIONS[kind], len(bu)
    out = 0
    for h in range(n):
        for g in range(n):
            if rel(h, g):
                out |= bu[h] & bv[g]
    return out


def _random_true_clue(rng: random.Random, cats: Sequence[Sequence[str]], pos: Mapping[str, int], n: int):
    """A clue that holds for the solution ``pos``, drawn by kind weight; None when the draw cannot be
    completed (no pair of values fits the kind)."""
    kind = rng.choices([k for k, _ in _CLUE_WEIGHTS], weights=[w for _, w in _CLUE_WEIGHTS])[0]
    values = [v for vals in cats for v in vals]
    u = rng.choice(values)
    cat_of = {v: ci for ci, vals in enumerate(cats) for v in vals}
    if kind == "at":
        return ("at", u, pos[u])
    if kind == "not_at":
        return ("not_at", u, rng.choice([h for h in range(1, n + 1) if h != pos[u]]))
    others = [v for v in values if cat_of[v] != cat_of[u]]
    if kind == "same":
        fits = [v for v in others if pos[v] == pos[u]]
    elif kind == "diff":
        fits = [v for v in others if pos[v] != pos[u]]
    elif kind == "left":
        fits = [v for v in values if pos[v] != pos[u]]
    else:
        fits = [v for v in values if abs(pos[v] - pos[u]) == 1]
    if not fits:
        return None
    v = rng.choice(fits)
    if kind == "left" and pos[u] > pos[v]:
        u, v = v, u
    return (kind, u, v)


def _drop_implied(clues: list, clue_bits: list[int], everyone: int) -> list:
    """The clues minus those the others imply: each in turn goes when the clues still kept without it leave
    exactly one candidate (the solution)."""
    kept = list(range(len(clues)))
    for b in range(len(clues)):
        rest = everyone
        for i in kept:
            if i != b:
                rest &= clue_bits[i]
        if rest.bit_count() == 1:
            kept.remove(b)
    return [clues[i] for i in kept]


def _propagate(dom: dict[str, set], clues, cats, log: list[str], fixed: set[str]) -> None:
    """Shrink the house domains ``dom[value]`` to a fixpoint under the clues and one-value-per-house, in
    place; append ``"value=house"`` to ``log`` when the house of a value not yet in ``fixed`` becomes known
    (and add it there)."""

    def restrict(v, allowed):
        new = dom[v] & allowed
        if not new:  # the clues hold for the solution, so its house never leaves a domain
            raise RuntimeError(f"zebra: clues contradict each other at {v!r}")
        if new != dom[v]:
            dom[v] = new
            return True
        return False

    changed = True
    while changed:
        changed = False
        for kind, u, v in clues:
            if kind == "at":
                changed |= restrict(u, {v})
            elif kind == "not_at":
                changed |= restrict(u, dom[u] - {v})
            elif kind == "same":
                both = dom[u] & dom[v]
                changed |= restrict(u, both) | restrict(v, both)
            elif kind == "diff":
                if len(dom[u]) == 1:
                    changed |= restrict(v, dom[v] - dom[u])
                if len(dom[v]) == 1:
                    changed |= restrict(u, dom[u] - dom[v])
            elif kind == "left":
                changed |= restrict(u, {p for p in dom[u] if p < max(dom[v])})
                changed |= restrict(v, {q for q in dom[v] if q > min(dom[u])})
            else:
                changed |= restrict(u, {p for p in dom[u] if dom[v] & {p - 1, p + 1}})
                changed |= restrict(v, {q for q in dom[v] if dom[u] & {q - 1, q + 1}})
        for vals in cats:
            for v in vals:  # a value whose house is known leaves that house to no one else
                if len(dom[v]) == 1:
                    for w in vals:
                        if w != v:
                            changed |= restrict(w, dom[w] - dom[v])
            for h in set().union(*(dom[v] for v in vals)):
                holders = [v for v in vals if h in dom[v]]
                if len(holders) == 1:  # the only value of its category that can take house h
                    changed |= restrict(holders[0], {h})
        for v in (v for vals in cats for v in vals):
            if len(dom[v]) == 1 and v not in fixed:
                fixed.add(v)
                log.append(f"{v}={next(iter(dom[v]))}")


def _zebra_trace(clues, cats, solution: Mapping[str, int], done: Callable[[dict], bool]) -> list[str]:
    """Elimination log until ``done(dom)``: the facts propagation derives, in order; where it stalls, the
    value with the fewest candidate houses has its wrong houses eliminated (``"red!=2"``; each one is
    contradictory - the solution is unique) and propagation resumes."""
    n = len(cats[0])
    dom = {v: set(range(1, n + 1)) for vals in cats for v in vals}
    log: list[str] = []
    fixed: set[str] = set()
    _propagate(dom, clues, cats, log, fixed)
    while not done(dom):
        open_values = [v for vals in cats for v in vals if len(dom[v]) > 1]
        v = min(open_values, key=lambda x: len(dom[x]))
        for h in sorted(dom[v] - {solution[v]}):
            dom[v].discard(h)
            log.append(f"{v}!={h}")
        fixed.add(v)
        log.append(f"{v}={solution[v]}")
        _propagate(dom, clues, cats, log, fixed)
    return log


def zebra_sample(rng: random.Random, n_houses: int = 2, n_attributes: int = 2, max_clues: int = 32) -> Sample:
    """One logic-grid puzzle with a unique solution.

    Prompt: the values of each attribute (sorted, so their order tells nothing), the clues, the question::

        color:blue,red pet:cat,dog. red=cat,blue<dog. pet of red?

    Clues are drawn true of a random solution and kept only when they rule out some remaining candidate,
    until one candidate is left (brute force over all (N!)^K assignments); clues that the others imply are
    then dropped, keeping the puzzle unique. The question asks another attribute of one value, or its house
    (``house of red?``, answered with the house number).
    """
    if not 2 <= n_houses <= 4:
        raise ValueError(f"zebra_sample: n_houses must be in 2..4, got {n_houses}")
    if not 2 <= n_attributes <= len(ZEBRA_CATEGORIES):
        raise ValueError(f"zebra_sample: n_attributes must be in 2..{len(ZEBRA_CATEGORIES)}, got {n_attributes}")
    chosen = sorted(rng.sample(range(len(ZEBRA_CATEGORIES)), n_attributes))
    names = [ZEBRA_CATEGORIES[c][0] for c in chosen]
    cats = [sorted(rng.sample(ZEBRA_CATEGORIES[c][1], n_houses)) for c in chosen]
    solution = {}
    for vals in cats:
        for v, h in zip(vals, rng.sample(range(1, n_houses + 1), n_houses)):
            solution[v] = h
    index = {v: ci * n_houses + j for ci, vals in enumerate(cats) for j, v in enumerate(vals)}
    bits = _house_bitsets(n_attributes, n_houses)
    everyone = (1 << math.factorial(n_houses) ** n_attributes) - 1
    candidates = everyone  # bitset of the candidates every clue so far allows
    clues: list[tuple] = []
    clue_bits: list[int] = []
    for _ in range(max_clues * 8):
        if candidates.bit_count() == 1 or len(clues) >= max_clues:
            break
        clue = _random_true_clue(rng, cats, solution, n_houses)
        if clue is None or clue in clues:
            continue
        allowed = _clue_bits(clue, index, bits, everyone)
        if candidates & allowed != candidates:  # the clue rules out some remaining candidate
            clues.append(clue)
            clue_bits.append(allowed)
            candidates &= allowed
    if candidates.bit_count() != 1:
        raise RuntimeError(f"zebra_sample: no unique puzzle within {max_clues} clues")
    clues = _drop_implied(clues, clue_bits, everyone)
    rng.shuffle(clues)

    q_cat = rng.randrange(n_attributes)
    q_value = rng.choice(cats[q_cat])
    targets = [ci for ci in range(n_attributes) if ci != q_cat] + [None]  # None: ask for the house
    t_cat = rng.choice(targets)
    if t_cat is None:
        question, answer = f"house of {q_value}?", str(solution[q_value])

        def done(dom):
            return len(dom[q_value]) == 1
    else:
        question = f"{names[t_cat]} of {q_value}?"
        answer = next(v for v in cats[t_cat] if solution[v] == solution[q_value])

        def done(dom):
            return len(dom[q_value]) == 1 and len(dom[answer]) == 1

    header = " ".join(f"{name}:{','.join(vals)}" for name, vals in zip(names, cats))
    prompt = f"{header}. {','.join(_clue_text(c) for c in clues)}. {question}"
    trace = ",".join(_zebra_trace(clues, cats, solution, done))
    meta = {"houses": n_houses, "categories": dict(zip(names, cats)), "solution": solution,
            "clues": [list(c) for c in clues], "question": [q_value, "house" if t_cat is None else names[t_cat]]}
    return Sample(prompt, answer, format_solution(trace, answer), "zebra", meta)


# ---------------------------------------------------------------------------------------------------------
# User data
# ---------------------------------------------------------------------------------------------------------

def load_jsonl(path: str | os.PathLike) -> list[Sample]:
    """Samples from a JSON-lines file: one object per line with string ``"prompt"`` and ``"answer"``; an
    optional ``"solution"`` (else ``<think></think><answer>{answer}</answer>``, no trace) and ``"meta"``
    object. Blank lines are skipped. ``task`` is ``"jsonl"`` (normalised exact-match verifier)."""
    samples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"load_jsonl: {path}:{lineno}: not valid JSON ({e.msg})") from e
            if not isinstance(row, dict):
                raise ValueError(f"load_jsonl: {path}:{lineno}: expected an object, got {type(row).__name__}")
            for key in ("prompt", "answer"):
                if not isinstance(row.get(key), str):
                    raise ValueError(
                        f"load_jsonl: {path}:{lineno}: field {key!r} must be a string, got {row.get(key)!r}"
                    )
            solution = row.get("solution")
            if solution is None:
                solution = format_solution("", row["answer"])
            meta = dict(row.get("meta") or {})
            meta.update(source=os.fspath(path), line=lineno)
            samples.append(Sample(row["prompt"], row["answer"], solution, "jsonl", meta))
    return samples


# ---------------------------------------------------------------------------------------------------------
# Registry, datasets, verification
# ---------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Task:
    """A task: ``generate(rng, **levels[difficulty]) -> Sample`` (None: no generator, data comes from
    elsewhere) and ``verify(sample, answer_text) -> bool``."""

    name: str
    verify: Callable[[Sample, str | None], bool]
    generate: Callable[..., Sample] | None = None
    levels: Mapping[str, Mapping] = dataclasses.field(default_factory=dict)


TASKS: Mapping[str, Task] = MappingProxyType({
    "arithmetic": Task("arithmetic", verify_arithmetic, arithmetic_sample, MappingProxyType({
        "easy": MappingProxyType(dict(max_digits=2, ops="+-", allow_negative=False, mul_digits=1)),
        "medium": MappingProxyType(dict(max_digits=3, ops="+-*", allow_negative=True, mul_digits=1)),
        "hard": MappingProxyType(dict(max_digits=4, ops="+-*", allow_negative=True, mul_digits=2)),
    })),
    "countdown": Task("countdown", verify_countdown, countdown_sample, MappingProxyType({
        "easy": MappingProxyType(dict(n_numbers=3, max_number=10, ops="+-*", max_target=100)),
        "medium": MappingProxyType(dict(n_numbers=4, max_number=15, ops="+-*/", max_target=200)),
        "hard": MappingProxyType(dict(n_numbers=4, max_number=50, ops="+-*/", max_target=999)),
    })),
    "zebra": Task("zebra", verify_exact, zebra_sample, MappingProxyType({
        "easy": MappingProxyType(dict(n_houses=2, n_attributes=2)),
        "medium": MappingProxyType(dict(n_houses=3, n_attributes=2)),
        "hard": MappingProxyType(dict(n_houses=4, n_attributes=3)),
    })),
    "jsonl": Task("jsonl", verify_exact),
    "safety": Task("safety", verify_exact),
})


def split_of(prompt: str) -> str:
    """``"test"`` for the :data:`TEST_PERCENT` % of prompts whose SHA-256 falls there, else ``"train"``."""
    bucket = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big") % 100
    return "test" if bucket < TEST_PERCENT else "train"


def make_dataset(task_names: str | Sequence[str], n: int, seed: int = 0, difficulty: str = "easy",
                 split: str = "train", max_draws_per_sample: int = 1000) -> list[Sample]:
    """``n`` samples, the tasks taking turns (sample i is of ``task_names[i % len(task_names)]``).

    Args:
        task_names: one name or a list of :data:`TASKS` names that have a generator.
        n: number of samples (>= 0).
        seed: the same (task_names, n, seed, difficulty, split) always gives the same list.
        difficulty: ``"easy" | "medium" | "hard"`` (each task's ``levels``).
        split: ``"train" | "test"``. Each (task, split) draws from its own stream, seeded by
            ``"task/split/difficulty/seed"``, and keeps only problems of that split (:func:`split_of`),
            so train and test share no prompt. Duplicates within a split are possible on easy levels,
            whose problem space is small.
    """
    names = [task_names] if isinstance(task_names, str) else list(task_names)
    if not names:
        raise ValueError("make_dataset: task_names is empty")
    for name in names:
        if name not in TASKS:
            raise ValueError(f"make_dataset: unknown task {name!r}; known: {', '.join(TASKS)}")
        if TASKS[name].generate is None:
            raise ValueError(f"make_dataset: task {name!r} has no generator (its samples come from data)")
    if difficulty not in LEVELS:
        raise ValueError(f"make_dataset: difficulty must be one of {LEVELS}, got {difficulty!r}")
    if split not in SPLITS:
        raise ValueError(f"make_dataset: split must be one of {SPLITS}, got {split!r}")
    if n < 0:
        raise ValueError(f"make_dataset: n must be >= 0, got {n}")
    rngs = {name: random.Random(f"{name}/{split}/{difficulty}/{seed}") for name in dict.fromkeys(names)}
    out = []
    for i in range(n):
        task = TASKS[names[i % len(names)]]
        for _ in range(max_draws_per_sample):
            sample = task.generate(rngs[task.name], **task.levels[difficulty])
            if split_of(sample.prompt) == split:
                sample.meta["difficulty"] = difficulty
                out.append(sample)
                break
        else:
            raise RuntimeError(f"make_dataset: no {split} problem for {task.name} in {max_draws_per_sample} draws")
    return out


def verify(sample: Sample, answer_text: str | None) -> bool:
    """Whether ``answer_text`` (the content of ``<answer>``, not the whole output) answers ``sample``."""
    task = TASKS.get(sample.task)
    if task is None:
        raise ValueError(f"verify: sample.task {sample.task!r} is not a known task; known: {', '.join(TASKS)}")
    return bool(task.verify(sample, answer_text))
