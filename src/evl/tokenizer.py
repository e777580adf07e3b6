"""CLIP's byte-level BPE tokenizer, fully offline.

Text goes through CLIP's pipeline: clean (html-unescape, collapse whitespace, lowercase) -> split into
words (letter runs, single digits, runs of other symbols, English contractions) -> UTF-8 bytes of each word
mapped to printable characters -> BPE merges applied by rank -> ids. ``tokenizer(texts)`` then frames each
row as OpenAI's ``clip.tokenize`` does: ``[start-of-text, ids..., end-of-text, 0, 0, ...]``.

The vocabulary (``data/bpe_simple_vocab_16e6.txt.gz``) is OpenAI CLIP's, MIT licensed; see
``data/LICENSE-clip-bpe.txt``.
"""

from __future__ import annotations

import functools
import gzip
import html
import itertools
import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path

import torch

DEFAULT_VOCAB_PATH = Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"
END_OF_WORD = "</w>"
# CLIP keeps the first 49152 - 256 - 2 merges of the file: with 2 x 256 byte tokens and the two specials
# that makes its 49408-token vocabulary.
NUM_MERGES = 49152 - 256 - 2
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")

try:  # CLIP runs ftfy first; it is optional here.
    from ftfy import fix_text as _fix_text
except ImportError:

    def _fix_text(text: str) -> str:
        # ftfy.fix_text ends with NFC normalisation; keep that part so composed and decomposed accents agree.
        return unicodedata.normalize("NFC", text)


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """Byte -> printable character, so BPE can work on str: printable Latin-1 bytes stand for themselves,
    the other 68 bytes are moved to chr(256), chr(257), ... in byte order.

    The dict's order (kept bytes first, then moved ones) is the order of CLIP's first 256 vocabulary entries.
    """
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in kept}
    moved = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(moved)})
    return table


def clean_text(text: str) -> str:
    """CLIP's text cleaning: ftfy (or NFC), html-unescape twice, collapse whitespace, strip, lowercase."""
    text = html.unescape(html.unescape(_fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip().lower()


def _char_class(char: str) -> str:
    """'L' letter, 'N' number (as regex \\p{L} / \\p{N}), ' ' whitespace, 'O' anything else."""
    if char.isspace():
        return " "
    major = unicodedata.category(char)[0]
    return major if major in "LN" else "O"


def split_words(text: str) -> list[str]:
    """Cleaned text -> words, as CLIP's pattern
    ``<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+``:
    at each position the first alternative that matches wins, runs are greedy, whitespace is dropped.
    """
    classes = [_char_class(c) for c in text]
    words: list[str] = []
    i, n = 0, len(text)
    while i < n:
        kind = classes[i]
        if kind == " ":
            i += 1
            continue
        fixed = next((s for s in (START_OF_TEXT, END_OF_TEXT, *_CONTRACTIONS) if text.startswith(s, i)), None)
        if fixed is not None:
            end = i + len(fixed)
        elif kind == "N":
            end = i + 1  # digits are single words
        else:
            end = i + 1
            while end < n and classes[end] == kind:
                end += 1
        words.append(text[i:end])
        i = end
    return words


def _read_merges(path: Path) -> list[tuple[str, str]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        # The first line is a version header; CLIP ignores the merges past NUM_MERGES.
        lines = list(itertools.islice(f, 1 + NUM_MERGES))
    merges = []
    for number, line in enumerate(lines[1:], start=2):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise ValueError(f"{path}:{number}: a BPE merge must be two symbols, got {line!r}")
        merges.append((parts[0], parts[1]))
    if not merges:
        raise ValueError(f"{path}: holds no BPE merges")
    return merges


class CLIPTokenizer:
    """CLIP's BPE tokenizer.

    ``encode(text)`` gives the BPE ids alone; calling the tokenizer gives the model input, a LongTensor
    [N, context_length] of ``[sot, ids..., eot]`` rows padded with zeros, as OpenAI's ``clip.tokenize``.
    """

    def __init__(self, vocab_path: str | Path | None = None) -> None:
        path = Path(vocab_path) if vocab_path is not None else DEFAULT_VOCAB_PATH
        merges = _read_merges(path)
        self._byte_chars = bytes_to_unicode()
        self._char_bytes = {c: b for b, c in self._byte_chars.items()}
        chars = list(self._byte_chars.values())
        tokens = [*chars, *(c + END_OF_WORD for c in chars), *(a + b for a, b in merges)]
        tokens += [START_OF_TEXT, END_OF_TEXT]
        self._encoder = {token: index for index, token in enumerate(tokens)}
        self._decoder = dict(enumerate(tokens))
        self._ranks = {pair: rank for rank, pair in enumerate(merges)}
        # BPE results per (byte-mapped) word; the special tokens are whole words of their own.
        self._cache: dict[str, tuple[str, ...]] = {
            START_OF_TEXT: (START_OF_TEXT,),
            END_OF_TEXT: (END_OF_TEXT,),
        }

    @property
    def vocab_size(self) -> int:
        return len(self._decoder)

    @property
    def sot_token_id(self) -> int:
        return self._encoder[START_OF_TEXT]

    @property
    def eot_token_id(self) -> int:
        return self._encoder[END_OF_TEXT]

    def bpe(self, word: str) -> tuple[str, ...]:
        """One byte-mapped word -> its BPE tokens; the last carries the ``</w>`` end-of-word mark."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        parts = [*word[:-1], word[-1] + END_OF_WORD]
        while len(parts) > 1:
            # Merge the lowest-ranked adjacent pair, everywhere it occurs, left to right.
            rank, pair = min((self._ranks.get(p, len(self._ranks)), p) for p in itertools.pairwise(parts))
            if rank == len(self._ranks):
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self._cache[word] = result = tuple(parts)
        return result

    def encode(self, text: str) -> list[int]:
        """Text -> BPE ids, without start- or end-of-text.

        NOTE(ref): as in CLIP, the literal strings ``<|startoftext|>`` / ``<|endoftext|>`` inside a text
        become the special ids.
        """
        ids: list[int] = []
        for word in split_words(clean_text(text)):
            mapped = "".join(self._byte_chars[b] for b in word.encode("utf-8"))
            ids.extend(self._encoder[token] for token in self.bpe(mapped))
        return ids

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Ids -> text: words separated by single spaces (end-of-word marks), special tokens spelled out.

        Unlike CLIP's ``decode`` the trailing space is stripped.
        """
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        try:
            chars = "".join(self._decoder[int(i)] for i in ids)
        except KeyError as err:
            raise ValueError(
                f"token id {err.args[0]} is outside the vocabulary of {self.vocab_size}"
            ) from None
        data = bytes(self._char_bytes[c] for c in chars)
        return data.decode("utf-8", errors="replace").replace(END_OF_WORD, " ").strip()

    def __call__(
        self, texts: str | Sequence[str], context_length: int = 77, truncate: bool = True
    ) -> torch.Tensor:
        """Texts -> token ids [N, context_length]: ``[sot, ids..., eot]`` then zero padding.

        A row longer than ``context_length`` is cut with its last id set to end-of-text (``truncate``),
        or refused with a ValueError naming the text.
        """
        if isinstance(texts, str):
            texts = [texts]
        if context_length < 2:
            raise ValueError(
                f"context_length must be at least 2 (start and end of text), got {context_length}"
            )
        out = torch.zeros(len(texts), context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts must be strings, got {type(text).__name__} at index {row}")
            ids = [self.sot_token_id, *self.encode(text), self.eot_token_id]
            if len(ids) > context_length:
                if not truncate:
                    shown = text if len(text) <= 80 else text[:77] + "..."
                    raise ValueError(
                        f"text {shown!r} is {len(ids)} tokens long with start and end of text, more than the "
                        f"context length {context_length}; shorten it or pass truncate=True"
                    )
                ids = [*ids[: context_length - 1], self.eot_token_id]
            out[row, : len(ids)] = torch.tensor(ids)
        return out


@functools.cache
def default_tokenizer() -> CLIPTokenizer:
    """The tokenizer with CLIP's own vocabulary, built once per process."""
    return CLIPTokenizer()
