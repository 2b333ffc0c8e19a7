"""Tokenizers for the synthetic reasoning tasks, behind one small interface.

`CharTokenizer` is the default for toy models: every character is a token and the R1-Zero tags
(`<think>`, `</think>`, `<answer>`, `</answer>`) are single tokens, so the vocabulary fits in
tiny-moe's 256 ids and a completion's format is visible token by token. `HFTokenizer` wraps a
Hugging Face `tokenizer.json` for larger models. `load_tokenizer` picks one from a name or path
and never touches the network.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<think>", "</think>", "<answer>", "</answer>")

# Printable ASCII (space through '~') plus newline: enough for arithmetic, countdown and the
# prompt templates, and 7 + 96 = 103 ids, well under tiny-moe's 256.
DEFAULT_ALPHABET = "".join(chr(c) for c in range(ord(" "), ord("~") + 1)) + "\n"

# Decoding an id outside the vocabulary yields this instead of raising: a model whose embedding
# table is larger than the tokenizer (tiny-moe: 256 vs 103) can sample such ids before it is
# trained, and a crash in the middle of an eval or RL rollout helps nobody. The replacement
# character is visible in logs and can never complete a well-formed answer.
UNKNOWN_ID_TEXT = "\ufffd"


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipelines and the RL loop need from a tokenizer."""

    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of `text`, optionally framed by bos/eos."""
        ...

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        """Text of `ids`, all of them (it does not stop at eos). `skip_special` drops pad, bos
        and eos only; the think/answer tags stay in the text because the reward parses them."""
        ...

    def token_id(self, token: str) -> int:
        """Id of a single token such as "<answer>"; KeyError if it is not one token."""
        ...


class CharTokenizer:
    """Character-level tokenizer: ids 0..6 are `SPECIAL_TOKENS` (pad=0, bos=1, eos=2), then one
    id per alphabet character in alphabet order.

    Encoding matches special-token strings before single characters, so "<answer>" in the text
    is one id. That includes "<pad>", "<bos>" and "<eos>" written as text, which keeps
    decode(encode(s)) == s for every string over the alphabet.
    """

    def __init__(self, alphabet: str = DEFAULT_ALPHABET):
        if not alphabet:
            raise ValueError("alphabet must not be empty")
        duplicates = sorted({c for c in alphabet if alphabet.count(c) > 1})
        if duplicates:
            raise ValueError(f"alphabet has repeated characters: {duplicates}")
        self.alphabet = alphabet
        self._id_to_token = list(SPECIAL_TOKENS) + list(alphabet)
        self._token_to_id = {tok: i for i, tok in enumerate(self._id_to_token)}
        self.vocab_size = len(self._id_to_token)
        self.pad_id, self.bos_id, self.eos_id = (self._token_to_id[t] for t in ("<pad>", "<bos>", "<eos>"))
        # Longest specials first, so that a special is never cut short by another that is its
        # prefix (none of the current ones is; this keeps it true if the list grows).
        specials = sorted(SPECIAL_TOKENS, key=len, reverse=True)
        self._pieces = re.compile("|".join(map(re.escape, specials)) + "|.", re.DOTALL)

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = [self.bos_id] if add_bos else []
        for match in self._pieces.finditer(text):
            token_id = self._token_to_id.get(match.group())
            if token_id is None:
                raise ValueError(f"character {match.group()!r} at position {match.start()} is not in "
                                 f"the tokenizer's alphabet")
            ids.append(token_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        skipped = {self.pad_id, self.bos_id, self.eos_id} if skip_special else set()
        return "".join(self._id_to_token[i] if 0 <= i < self.vocab_size else UNKNOWN_ID_TEXT
                       for i in map(int, ids) if i not in skipped)

    def token_id(self, token: str) -> int:
        """Id of a special token or of a single alphabet character."""
        if token not in self._token_to_id:
            raise KeyError(f"{token!r} is not a token of this CharTokenizer; special tokens are "
                           f"{list(SPECIAL_TOKENS)}, other tokens are single alphabet characters")
        return self._token_to_id[token]


class HFTokenizer:
    """A Hugging Face `tokenizer.json` (via the `tokenizers` library) behind `Tokenizer`.

    Ids of pad/bos/eos come from the first of these token strings the file contains (as
    ordinary or added tokens):
      eos: "<eos>", "</s>", "<|endoftext|>", "<|end_of_text|>", "<|im_end|>", "<|eot_id|>"
           (ValueError if none is present: sequences must be able to end);
      bos: "<bos>", "<s>", "<|begin_of_text|>", "<|startoftext|>", else eos (GPT-2 style);
      pad: "<pad>", "<|pad|>", "[PAD]", "<|padding|>", else eos (pad positions are masked anyway).
    Base-model end markers come before chat-turn ones (e.g. Qwen's "<|endoftext|>" before
    "<|im_end|>") because these tasks are plain text, not chat.

    `encode` never applies the file's own post-processor (templates that add bos/eos): framing is
    controlled by `add_bos`/`add_eos` only, as for `CharTokenizer`.
    """

    EOS_NAMES = ("<eos>", "</s>", "<|endoftext|>", "<|end_of_text|>", "<|im_end|>", "<|eot_id|>")
    BOS_NAMES = ("<bos>", "<s>", "<|begin_of_text|>", "<|startoftext|>")
    PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]", "<|padding|>")

    def __init__(self, path: str | Path):
        # Imported here so that `moe_jax` (and the char tokenizer) work without `tokenizers`.
        import tokenizers

        self.path = Path(path)
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(self.path))
        except Exception as e:  # the library raises a bare Exception for unreadable files
            raise ValueError(f"could not load {self.path} as a Hugging Face tokenizer.json: {e}") from e
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        eos_id = self._first_id(self.EOS_NAMES)
        if eos_id is None:
            raise ValueError(f"{self.path} has no end-of-sequence token; looked for {list(self.EOS_NAMES)}")
        self.eos_id = eos_id
        bos_id, pad_id = self._first_id(self.BOS_NAMES), self._first_id(self.PAD_NAMES)
        self.bos_id = eos_id if bos_id is None else bos_id
        self.pad_id = eos_id if pad_id is None else pad_id

    def _first_id(self, names: Sequence[str]) -> int | None:
        for name in names:
            token_id = self._tok.token_to_id(name)
            if token_id is not None:
                return token_id
        return None

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        skipped = {self.pad_id, self.bos_id, self.eos_id} if skip_special else set()
        ids = [i for i in map(int, ids) if i not in skipped]
        # The library silently drops ids past the vocabulary (and overflows on negative ones);
        # mark them like CharTokenizer does by decoding the valid runs between them separately.
        text, run = [], []
        for i in ids:
            if 0 <= i < self.vocab_size:
                run.append(i)
                continue
            text += [self._tok.decode(run, skip_special_tokens=False), UNKNOWN_ID_TEXT]
            run = []
        return "".join(text) + self._tok.decode(run, skip_special_tokens=False)

    def token_id(self, token: str) -> int:
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise KeyError(f"{token!r} is not a single token in {self.path}; text that the tokenizer "
                           f"splits into several tokens has no single id (add it as a special token)")
        return token_id


def load_tokenizer(name_or_path: str) -> Tokenizer:
    """"char" -> `CharTokenizer()`; a tokenizer.json file, or a directory containing one ->
    `HFTokenizer`. Local files only: nothing is downloaded."""
    if name_or_path == "char":
        return CharTokenizer()
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return HFTokenizer(path)
    if (path / "tokenizer.json").is_file():
        return HFTokenizer(path / "tokenizer.json")
    raise ValueError(f"unknown tokenizer {name_or_path!r}: expected 'char', a path to a tokenizer.json "
                     f"file, or a directory containing tokenizer.json (hub names are not downloaded)")
