"""Tokenizers for the R1 pipeline: a built-in character tokenizer and a wrapper over HF ``tokenizers``.

Both expose one interface (:class:`Tokenizer`): ``vocab_size``, ``pad_id``, ``bos_id``, ``eos_id``,
``encode(text, add_bos=True, add_eos=False) -> list[int]`` and ``decode(ids, skip_special=False) -> str``.

:class:`CharTokenizer` needs no file and no download. Its id layout is fixed (so a checkpoint trained with
it stays readable by any later version of this file):

====  ==============================================================================
id    token
====  ==============================================================================
0     ``<pad>``
1     ``<bos>``
2     ``<eos>``
3     ``<unk>``
4..7  ``<think>``, ``</think>``, ``<answer>``, ``</answer>`` (the R1 tags, one id each)
8     ``"\\n"``; 9 ``"\\t"``
10..  printable ASCII, space (0x20) to ``~`` (0x7E), in code-point order (95 ids)
====  ==============================================================================

105 ids in all, far below the tiny model's vocabulary of 1024.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Protocol, runtime_checkable

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE = "<think>", "</think>", "<answer>", "</answer>"
# Control tokens are added by the API (add_bos / add_eos, padding, unknown characters), never read from
# text: a literal "<eos>" inside a prompt is spelled out character by character, so user text cannot end
# a sequence or fake padding. Tag tokens are part of the text and are matched wherever they occur.
CONTROL_TOKENS = (PAD, BOS, EOS, UNK)
TAG_TOKENS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
# Characters, in id order: newline and tab, then printable ASCII. Covers every built-in task's text.
ALPHABET = "\n\t" + "".join(chr(c) for c in range(0x20, 0x7F))


@runtime_checkable
class Tokenizer(Protocol):
    """What the pipeline needs from a tokenizer."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def pad_id(self) -> int: ...

    @property
    def bos_id(self) -> int | None: ...

    @property
    def eos_id(self) -> int: ...

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]: ...

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str: ...


class CharTokenizer:
    """Character-level tokenizer over :data:`ALPHABET` plus control and tag tokens (layout in the module doc).

    Args:
        strict: what to do with a character outside :data:`ALPHABET` (any non-ASCII character, control
            characters other than newline / tab). ``False`` (default): encode it as ``<unk>`` (id 3), so a
            model's stray output can always be re-encoded; ``True``: raise ``ValueError`` naming the character
            and its position.

    Round trip: for any ``text`` made of :data:`ALPHABET` characters (tags included),
    ``decode(encode(text, add_bos=False)) == text`` and ``decode(encode(text), skip_special=True) == text``.
    """

    def __init__(self, strict: bool = False):
        self.strict = strict
        self._id_to_token = list(CONTROL_TOKENS) + list(TAG_TOKENS) + list(ALPHABET)
        self._char_to_id = {ch: i for i, ch in enumerate(self._id_to_token) if len(ch) == 1}
        self._tag_to_id = {tag: self._id_to_token.index(tag) for tag in TAG_TOKENS}

    @property
    def vocab_size(self) -> int:
        return len(self._id_to_token)

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def bos_id(self) -> int:
        return 1

    @property
    def eos_id(self) -> int:
        return 2

    @property
    def unk_id(self) -> int:
        return 3

    def token_to_id(self, token: str) -> int:
        """Id of one token: a control or tag token (``"<think>"``) or one alphabet character."""
        if token in self._tag_to_id:
            return self._tag_to_id[token]
        if token in CONTROL_TOKENS:
            return CONTROL_TOKENS.index(token)
        if token in self._char_to_id:
            return self._char_to_id[token]
        raise KeyError(f"token_to_id: {token!r} is not a token of CharTokenizer")

    def id_to_token(self, idx: int) -> str:
        if not 0 <= idx < self.vocab_size:
            raise ValueError(f"id_to_token: id {idx} is outside [0, {self.vocab_size})")
        return self._id_to_token[idx]

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        """``text`` -> ids: ``[bos] + one id per character or tag + [eos]``.

        Args:
            text: any ``str``; the four tags become one id each wherever they occur.
            add_bos / add_eos: prepend ``bos_id`` / append ``eos_id``.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode: text must be a str, got {type(text).__name__}")
        ids = [self.bos_id] if add_bos else []
        i, n = 0, len(text)
        while i < n:
            ch = text[i]
            if ch == "<":
                # All four tags start with "<" and none is a prefix of another, so the first match is it.
                tag = next((t for t in TAG_TOKENS if text.startswith(t, i)), None)
                if tag is not None:
                    ids.append(self._tag_to_id[tag])
                    i += len(tag)
                    continue
            idx = self._char_to_id.get(ch)
            if idx is None:
                if self.strict:
                    raise ValueError(
                        f"encode: character {ch!r} (U+{ord(ch):04X}) at position {i} is not in the alphabet"
                    )
                idx = self.unk_id
            ids.append(idx)
            i += 1
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """ids -> text. ``skip_special`` drops the control tokens (pad, bos, eos, unk); tags always decode.

        ``ids`` may be a list of ints or a 1-d integer tensor. An id outside ``[0, vocab_size)`` raises.
        """
        if hasattr(ids, "tolist"):  # a tensor or numpy array, decoded off the hot path
            ids = ids.tolist()
        out = []
        for idx in ids:
            idx = int(idx)
            if not 0 <= idx < self.vocab_size:
                raise ValueError(f"decode: id {idx} is outside [0, {self.vocab_size})")
            if skip_special and idx < len(CONTROL_TOKENS):
                continue
            out.append(self._id_to_token[idx])
        return "".join(out)

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size}, strict={self.strict})"


def _import_tokenizers():
    try:
        import tokenizers  # noqa: PLC0415 - optional dependency, imported only when a file is given
    except ImportError as e:
        raise ImportError(
            "HFTokenizer needs the `tokenizers` package (pip install tokenizers); "
            "without it use CharTokenizer (load_tokenizer(None))"
        ) from e
    return tokenizers


def _token_content(entry) -> str | None:
    """tokenizer_config.json stores a special token as a string or as {"content": ...}."""
    if isinstance(entry, dict):
        return entry.get("content")
    return entry if isinstance(entry, str) else None


class HFTokenizer:
    """A HF ``tokenizers`` ``tokenizer.json`` behind the :class:`Tokenizer` interface.

    Args:
        path: a ``tokenizer.json`` file, or a directory holding one (e.g. a HF model directory). A
            ``tokenizer_config.json`` next to it, when present, names the bos / eos / pad tokens.
        bos_token / eos_token / pad_token: override those names. Otherwise they come from
            ``tokenizer_config.json``, else from the first of the common spellings found in the vocabulary.
            A tokenizer without a BOS token has ``bos_id None`` (``add_bos`` then adds nothing); EOS is
            required; PAD falls back to EOS.

    ``encode`` never lets the file's post-processor add tokens (BOS / EOS come only from ``add_bos`` /
    ``add_eos``); ``decode(skip_special=True)`` drops every token the file marks special.
    """

    _BOS_NAMES = ("<bos>", "<s>", "<|begin_of_text|>", "<｜begin▁of▁sentence｜>", "[CLS]", "<|startoftext|>")
    _EOS_NAMES = ("<eos>", "</s>", "<|end_of_text|>", "<｜end▁of▁sentence｜>", "<|endoftext|>", "[SEP]",
                  "<|im_end|>")
    _PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<｜▁pad▁｜>", "<|finetune_right_pad_id|>")

    def __init__(self, path: str | os.PathLike, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None):
        tokenizers = _import_tokenizers()
        path = os.fspath(path)
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(
                f"HFTokenizer: path {path!r} is not a tokenizer.json file nor a directory holding one"
            )
        self.path = file
        self._tok = tokenizers.Tokenizer.from_file(file)
        config = {}
        config_file = os.path.join(os.path.dirname(file), "tokenizer_config.json")
        if os.path.isfile(config_file):
            with open(config_file, encoding="utf-8") as f:
                config = json.load(f)
        self._bos_id = self._resolve("bos_token", bos_token, config, self._BOS_NAMES, required=False)
        self._eos_id = self._resolve("eos_token", eos_token, config, self._EOS_NAMES, required=True)
        pad = self._resolve("pad_token", pad_token, config, self._PAD_NAMES, required=False)
        self._pad_id = self._eos_id if pad is None else pad

    def _resolve(self, name: str, given: str | None, config: dict, candidates: tuple, required: bool) -> int | None:
        if given is not None:
            idx = self._tok.token_to_id(given)
            if idx is None:
                raise ValueError(f"HFTokenizer: {name}={given!r} is not in the vocabulary of {self.path}")
            return idx
        from_config = _token_content(config.get(name))
        for token in ((from_config,) if from_config else ()) + candidates:
            idx = self._tok.token_to_id(token)
            if idx is not None:
                return idx
        if required:
            raise ValueError(
                f"HFTokenizer: no {name} found in {self.path} (looked for {', '.join(candidates)}); pass {name}=..."
            )
        return None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    def token_to_id(self, token: str) -> int:
        idx = self._tok.token_to_id(token)
        if idx is None:
            raise KeyError(f"token_to_id: {token!r} is not in the vocabulary of {self.path}")
        return idx

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode: text must be a str, got {type(text).__name__}")
        ids = list(self._tok.encode(text, add_special_tokens=False).ids)
        if add_bos and self._bos_id is not None:
            ids.insert(0, self._bos_id)
        if add_eos:
            ids.append(self._eos_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"


def load_tokenizer(path_or_none: str | os.PathLike | None = None) -> CharTokenizer | HFTokenizer:
    """``None`` or ``"char"`` -> :class:`CharTokenizer`; a path -> :class:`HFTokenizer` over that file / directory."""
    if path_or_none is None or (isinstance(path_or_none, str) and path_or_none == "char"):
        return CharTokenizer()
    return HFTokenizer(path_or_none)
