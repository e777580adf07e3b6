"""The tokenizers Hugging Face checkpoint folders ship, read offline: SigLIP's SentencePiece model, SigLIP 2's
Gemma ``tokenizer.json`` and MetaCLIP 2's XLM-R ``tokenizer.json``.

Each is called as CLIP's tokenizer is (:class:`evl.tokenizer.CLIPTokenizer`):
``tokenizer(texts, context_length=None, truncate=True)`` -> LongTensor [N, context_length], every row
``[bos] ids [eos]`` (each special token only where the folder adds it) then the pad id. Rows are padded on
the right and always to the full context: SigLIP's towers attend to the padding (there is no attention mask)
and pool the last position, as they were trained; CLIP-like towers pool at the end-of-text token and never
look past it.

Where a folder says what:

* ``tokenizer_config.json`` (and ``special_tokens_map.json`` in older folders): the special tokens (the pad
  token above all), the tokenizer class, SigLIP's lowercasing (``do_lower_case``);
* ``tokenizer.json``: the ``tokenizers`` pipeline (normaliser, pre-tokeniser, model), run as written, and
  its post-processor, which says which special tokens frame a text;
* ``spiece.model``: SigLIP's SentencePiece model, run as transformers' ``SiglipTokenizer`` runs it;
* ``config.json``: the model type and the text tower's context (``max_position_embeddings``).
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, normalizers, pre_tokenizers

TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_MODEL = "spiece.model"  # SigLIP's file name
# NOTE(ref): transformers' ``SiglipTokenizer`` keeps SentencePiece's word-boundary mark out of the input
# (it stands for a space) and starts every text with it.
WORD_BOUNDARY = "\u2581"
# A ``model_max_length`` beyond this is transformers' stand-in for "no limit" (it writes 1e30).
_NO_LIMIT = 10**6
# Model types of the towers trained on lowercased text whose ``tokenizer.json`` does not lowercase itself.
# NOTE(ref): SigLIP 2's Gemma tokenizer. transformers' ``Siglip2Tokenizer`` adds the lowercasing (its model
# card: "trained with lowercased text"); ``AutoTokenizer`` picks it for ``model_type`` "siglip2" folders but
# plain ``GemmaTokenizer`` for SigLIP 2's fixed-resolution releases, whose ``config.json`` says "siglip".
# Both are lowercased here; ``lowercase=False`` gives GemmaTokenizer's ids.
_LOWERCASED_MODEL_TYPES = frozenset({"siglip", "siglip_text_model", "siglip2", "siglip2_text_model"})

# Tokenizer classes whose text is split at whitespace before the file's own pre-tokeniser runs.
# NOTE(ref): transformers 5's XLMRobertaTokenizer (MetaCLIP 2) runs a tokenizer.json's model and precompiled
# normaliser behind its own pre-tokeniser: whitespace split, then SentencePiece's word mark before each word.
# Leading, trailing and repeated spaces then vanish, as in SentencePiece itself; the Metaspace pre-tokeniser
# alone (transformers 4) leaves a lone mark for them.
_WHITESPACE_SPLIT_CLASSES = frozenset({"XLMRobertaTokenizer", "XLMRobertaTokenizerFast"})


class TokenizerFormatError(ValueError):
    """A tokenizer folder that cannot be read, or that does not say what the model needs."""


class FolderTokenizer:
    """Frames a text's ids as its model takes them; subclasses say how a text becomes ids (:meth:`encode`).

    ``bos_token_id`` / ``eos_token_id`` are None where the folder adds no such token; ``context_length`` is
    the text tower's (None when the folder does not tell it: then every call must pass one).
    """

    def __init__(
        self,
        *,
        bos_token_id: int | None,
        eos_token_id: int | None,
        pad_token_id: int,
        vocab_size: int,
        context_length: int | None,
        source: str,
    ) -> None:
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.vocab_size = vocab_size
        self.context_length = context_length
        self.source = source
        self._prefix = [] if bos_token_id is None else [bos_token_id]
        self._suffix = [] if eos_token_id is None else [eos_token_id]

    def encode(self, text: str) -> list[int]:
        """Text -> ids, without the special tokens that frame a row."""
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def _frame(self, ids: list[int], limit: int) -> list[int]:
        """``[bos] ids[:limit] [eos]``; ``limit`` leaves room for the special tokens."""
        return [*self._prefix, *ids[:limit], *self._suffix]

    def __call__(
        self, texts: str | Sequence[str], context_length: int | None = None, truncate: bool = True
    ) -> torch.Tensor:
        """Texts -> token ids [N, context_length]: ``[bos] ids [eos]`` then the pad id.

        A text too long for the context loses its last ids (the special tokens stay, as transformers
        truncates), or is refused with a ValueError naming it (``truncate=False``).
        """
        if isinstance(texts, str):
            texts = [texts]
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts must be strings, got {type(text).__name__} at index {row}")
        context = context_length or self.context_length
        if context is None:
            raise ValueError(f"{self.source} does not tell its context length; pass context_length")
        specials = len(self._prefix) + len(self._suffix)
        if context < max(specials, 1):
            raise ValueError(f"context_length must be at least {max(specials, 1)}, got {context}")
        out = torch.full((len(texts), context), self.pad_token_id, dtype=torch.long)
        for row, (text, ids) in enumerate(zip(texts, self.encode_batch(texts), strict=True)):
            if len(ids) + specials > context and not truncate:
                shown = text if len(text) <= 80 else text[:77] + "..."
                raise ValueError(
                    f"text {shown!r} is {len(ids) + specials} tokens long with its special tokens, more than "
                    f"the context length {context}; shorten it or pass truncate=True"
                )
            framed = self._frame(ids, context - specials)
            out[row, : len(framed)] = torch.tensor(framed, dtype=torch.long)
        return out


class JsonTokenizer(FolderTokenizer):
    """A ``tokenizer.json`` run by the ``tokenizers`` library (SigLIP 2's Gemma, MetaCLIP 2's XLM-R)."""

    def __init__(self, tokenizer: Tokenizer, *, lowercase: bool = False, **framing: Any) -> None:
        super().__init__(vocab_size=tokenizer.get_vocab_size(with_added_tokens=True), **framing)
        if lowercase:
            # NOTE(ref): as transformers' Siglip2Tokenizer: lowercase first, then the file's own normaliser.
            own = tokenizer.normalizer
            tokenizer.normalizer = (
                normalizers.Lowercase()
                if own is None
                else normalizers.Sequence([normalizers.Lowercase(), own])
            )
        self._tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]


class SentencePieceTokenizer(FolderTokenizer):
    """SigLIP's ``spiece.model`` with the text rules of transformers' ``SiglipTokenizer``.

    A text is lowercased (``do_lower_case``), loses ASCII punctuation and runs of whitespace, and is cut
    into pieces by SentencePiece; the special tokens' own spellings (``</s>``) stand for their ids. Rows end
    with EOS and are padded with the pad token (``</s>`` too in SigLIP's folders).
    """

    def __init__(
        self,
        model_path: Path,
        *,
        eos_token: str,
        pad_token: str,
        unk_token: str,
        special_tokens: Sequence[str],
        lowercase: bool,
        context_length: int | None,
        source: str,
    ) -> None:
        try:
            import sentencepiece
        except ImportError:
            raise TokenizerFormatError(
                f"{model_path}: reading a SentencePiece model needs the sentencepiece package "
                "(pip install 'evl[sentencepiece]')"
            ) from None
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
        except (OSError, RuntimeError) as err:
            raise TokenizerFormatError(f"{model_path}: not a readable SentencePiece model ({err})") from None
        self._specials = {
            token: self._sp.piece_to_id(token) for token in (eos_token, pad_token, *special_tokens)
        }
        super().__init__(
            bos_token_id=None,
            eos_token_id=self._specials[eos_token],
            pad_token_id=self._specials[pad_token],
            vocab_size=self._sp.get_piece_size(),
            context_length=context_length,
            source=source,
        )
        self._lowercase = lowercase
        self._unk_token = unk_token
        self._unk_pieces = len(self._sp.encode(unk_token, out_type=str))
        longest_first = sorted(self._specials, key=len, reverse=True)
        self._special_split = re.compile("(" + "|".join(re.escape(t) for t in longest_first) + ")")
        self._drop_punctuation = str.maketrans("", "", string.punctuation)

    def _canonical(self, text: str) -> str:
        """big_vision's text canonicalisation, as SiglipTokenizer applies it."""
        if self._lowercase:
            text = text.lower()
        return re.sub(r"\s+", " ", text.translate(self._drop_punctuation)).strip()

    def _pieces(self, text: str) -> list[str]:
        # NOTE(ref): SiglipTokenizer encodes "<unk>" + text and drops the pieces of "<unk>": the text is then
        # segmented as the continuation of a sentence, whatever the model's dummy-prefix setting.
        pieces = self._sp.encode(self._unk_token + self._canonical(text), out_type=str)
        return pieces[self._unk_pieces :] if len(pieces) >= self._unk_pieces else pieces

    def encode(self, text: str) -> list[int]:
        pieces: list[str] = []
        for number, part in enumerate(
            self._special_split.split(WORD_BOUNDARY + text.replace(WORD_BOUNDARY, " "))
        ):
            if number % 2:
                pieces.append(part)  # a special token's spelling
            elif part:
                pieces.extend(self._pieces(part))
        if len(pieces) > 1 and pieces[0] == WORD_BOUNDARY and pieces[1] in self._specials:
            pieces = pieces[1:]  # NOTE(ref): SiglipTokenizer drops a lone leading mark before a special token
        return [self._specials[p] if p in self._specials else self._sp.piece_to_id(p) for p in pieces]

    def _frame(self, ids: list[int], limit: int) -> list[int]:
        # NOTE(ref): SiglipTokenizer appends EOS only to ids that do not already end with it.
        ids = ids[:limit]
        return ids if ids and ids[-1] == self.eos_token_id else [*ids, *self._suffix]


# ------------------------------------------------------------------------------------------------- loading


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise TokenizerFormatError(f"{path}: damaged JSON ({err})") from None
    if not isinstance(data, dict):
        raise TokenizerFormatError(f"{path}: expected a JSON object")
    return data


def _token_name(value: Any) -> str | None:
    """A special token as tokenizer configs write it: a string, or an AddedToken's dict with ``content``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _text_model_config(model_config: dict[str, Any]) -> dict[str, Any]:
    """The text tower's part of a ``config.json`` (the whole of it for a text-only model)."""
    return {**model_config, **(model_config.get("text_config") or {})}


def _context_length(model_config: dict[str, Any], config: dict[str, Any]) -> int | None:
    length = _text_model_config(model_config).get("max_position_embeddings")
    if isinstance(length, int):
        return length
    length = config.get("model_max_length")
    return int(length) if isinstance(length, (int, float)) and length < _NO_LIMIT else None


def _post_processor_framing(post: dict[str, Any] | None, source: str) -> tuple[list[int], list[int]]:
    """The special ids a ``tokenizer.json`` post-processor puts before and after a single text."""
    if post is None or post.get("type") == "ByteLevel":
        return [], []
    kind = post.get("type")
    if kind == "Sequence":
        prefix: list[int] = []
        suffix: list[int] = []
        for part in post.get("processors", []):
            before, after = _post_processor_framing(part, source)
            prefix += before
            suffix += after
        return prefix, suffix
    if kind in ("RobertaProcessing", "BertProcessing"):
        return [post["cls"][1]], [post["sep"][1]]
    if kind == "TemplateProcessing":
        prefix, suffix, after_text = [], [], False
        for piece in post["single"]:
            if "Sequence" in piece:
                after_text = True
            elif "SpecialToken" in piece:
                ids = post["special_tokens"][piece["SpecialToken"]["id"]]["ids"]
                (suffix if after_text else prefix).extend(ids)
        return prefix, suffix
    raise TokenizerFormatError(f"{source}: tokenizer.json post-processor {kind!r} is not supported")


def _special_id(tokenizer: Tokenizer, name: str | None, what: str, source: str) -> int | None:
    if name is None:
        return None
    token_id = tokenizer.token_to_id(name)
    if token_id is None:
        raise TokenizerFormatError(f"{source}: the {what} token {name!r} is not in the vocabulary")
    return token_id


def _load_json_tokenizer(
    folder: Path, config: dict[str, Any], model_config: dict[str, Any], lowercase: bool | None, **framing: Any
) -> JsonTokenizer:
    path = folder / TOKENIZER_JSON
    source = str(path)
    try:
        tokenizer = Tokenizer.from_file(source)
        post = json.loads(path.read_text(encoding="utf-8")).get("post_processor")
    except Exception as err:  # the tokenizers library raises its own exception types for damaged files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TokenizerFormatError(f"{source}: not a readable tokenizers file ({first})") from None
    # NOTE(ref): as transformers 5, the post-processor written in tokenizer.json decides which special tokens
    # frame a text; tokenizer_config.json's add_bos_token / add_eos_token are not read. Folders saved by
    # transformers 4 carry those flags' effect in that post-processor (SigLIP 2's Gemma: no BOS, EOS added).
    prefix, suffix = _post_processor_framing(post, source)
    if len(prefix) > 1 or len(suffix) > 1:
        raise TokenizerFormatError(f"{source}: frames texts with several special tokens ({prefix}, {suffix})")
    pad_name = _token_name(config.get("pad_token"))
    if pad_name is None and tokenizer.padding is not None:
        pad_name = tokenizer.padding["pad_token"]
    pad = _special_id(tokenizer, pad_name, "pad", source)
    if pad is None:
        raise TokenizerFormatError(f"{folder}: names no pad token (tokenizer_config.json pad_token)")
    if lowercase is None:
        model_type = _text_model_config(model_config).get("model_type")
        lowercase = (
            model_type in _LOWERCASED_MODEL_TYPES or config.get("tokenizer_class") == "Siglip2Tokenizer"
        )
    if config.get("tokenizer_class") in _WHITESPACE_SPLIT_CLASSES and tokenizer.pre_tokenizer is not None:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.WhitespaceSplit(), tokenizer.pre_tokenizer]
        )
    # Truncation and padding are the caller's (per call), never the file's.
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return JsonTokenizer(
        tokenizer,
        lowercase=lowercase,
        bos_token_id=prefix[0] if prefix else None,
        eos_token_id=suffix[0] if suffix else None,
        pad_token_id=pad,
        source=str(folder),
        **framing,
    )


def _load_sentencepiece_tokenizer(
    folder: Path, config: dict[str, Any], lowercase: bool | None, **framing: Any
) -> SentencePieceTokenizer:
    # NOTE(ref): SiglipTokenizer's defaults: EOS "</s>" (also the pad token), unknown "<unk>", lowercased.
    unk = _token_name(config.get("unk_token")) or "<unk>"
    extra = [_token_name(t) for t in config.get("additional_special_tokens") or []]
    return SentencePieceTokenizer(
        folder / SENTENCEPIECE_MODEL,
        eos_token=_token_name(config.get("eos_token")) or "</s>",
        pad_token=_token_name(config.get("pad_token")) or "</s>",
        unk_token=unk,
        special_tokens=[unk, *(t for t in extra if t)],
        lowercase=config.get("do_lower_case", True) if lowercase is None else lowercase,
        source=str(folder),
        **framing,
    )


def load_tokenizer(
    folder: str | Path, context_length: int | None = None, lowercase: bool | None = None
) -> FolderTokenizer:
    """The tokenizer a Hugging Face folder ships, read offline (nothing is downloaded).

    ``tokenizer.json`` is read through the ``tokenizers`` library; SigLIP's ``spiece.model`` (when the folder
    has no ``tokenizer.json``, or names ``SiglipTokenizer``) through ``sentencepiece``. ``context_length``
    defaults to the text tower's (``config.json``), else to the tokenizer's ``model_max_length``;
    ``lowercase`` defaults to what the folder says (see the module notes for SigLIP 2).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise TokenizerFormatError(f"{folder}: not a folder; a tokenizer is read from its checkpoint folder")
    config = {
        **_read_json(folder / "tokenizer_config.json"),
        **_read_json(folder / "special_tokens_map.json"),
    }
    model_config = _read_json(folder / "config.json")
    framing = {"context_length": context_length or _context_length(model_config, config)}
    has_json = (folder / TOKENIZER_JSON).is_file()
    if (folder / SENTENCEPIECE_MODEL).is_file() and (
        not has_json or str(config.get("tokenizer_class", "")).startswith("SiglipTokenizer")
    ):
        return _load_sentencepiece_tokenizer(folder, config, lowercase, **framing)
    if has_json:
        return _load_json_tokenizer(folder, config, model_config, lowercase, **framing)
    raise TokenizerFormatError(
        f"{folder}: no tokenizer found (expected {TOKENIZER_JSON}, or {SENTENCEPIECE_MODEL} for SigLIP)"
    )
