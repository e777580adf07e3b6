"""CLIP's BPE tokenizer: identical ids to transformers' CLIPTokenizer built from the same vocabulary."""

from __future__ import annotations

import gzip
import json

import pytest
import torch
from transformers import CLIPTokenizer as HFCLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode as hf_bytes_to_unicode

from evl.tokenizer import (
    DEFAULT_VOCAB_PATH,
    CLIPTokenizer,
    clean_text,
    default_tokenizer,
    split_words,
)

# Class names, prompts and the awkward cases: case, punctuation, digits, contractions, accents (composed and
# decomposed), emoji with modifiers and joiners, other scripts, odd whitespace, the empty string.
# Html entities are left out: CLIP unescapes them, transformers' tokenizer does not (tested separately).
STRINGS = [
    "playing guitar",
    "Apply Eye Makeup",
    "a photo of a {}.".format("riding mechanical bull"),
    "YoYo",
    "push-ups",
    "don't",
    "DON'T WE'LL I'D THEY'RE you've I'm",
    "o'clock rock'n'roll ?'s",
    "café",
    "cafe\u0301",
    "naïve résumé",
    "İstanbul",
    "3.14159 and 42nd 2024",
    "Ⅻ ² 一二",
    "😀👍🏽 👨\u200d👩\u200d👧",
    "«quoted» — dash…",
    "e-mail @user #tag 100%",
    "hello   world\n\t x",
    "  leading and trailing  ",
    "x\u00a0y",
    "ﬁne",
    "α β γ δ",
    "日本語のテキスト",
    "привет мир",
    "!!!???...",
    "a<|endoftext|>b",
    "",
    "supercalifragilisticexpialidocious",
    "ab" * 60,
    " ".join(["blowing out candles"] * 30),  # longer than the context: truncated
]


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    return default_tokenizer()


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory) -> HFCLIPTokenizer:
    """transformers' CLIPTokenizer from vocab.json + merges.txt written from our .gz, as CLIP builds them."""
    folder = tmp_path_factory.mktemp("hf_clip_tokenizer")
    with gzip.open(DEFAULT_VOCAB_PATH, "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1 : 49152 - 256 - 2 + 1]
    chars = list(hf_bytes_to_unicode().values())
    vocab = [*chars, *(c + "</w>" for c in chars), *(m.replace(" ", "") for m in merges)]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    hf = HFCLIPTokenizer.from_pretrained(str(folder))
    assert len(hf) == 49408
    return hf


@pytest.mark.parametrize("text", STRINGS, ids=range(len(STRINGS)))
def test_encode_matches_transformers(tokenizer, hf_tokenizer, text):
    assert tokenizer.encode(text) == hf_tokenizer(text, add_special_tokens=False)["input_ids"]


def test_batch_matches_transformers_with_truncation(tokenizer, hf_tokenizer):
    ours = tokenizer(STRINGS)
    assert ours.shape == (len(STRINGS), 77) and ours.dtype == torch.long
    for row, text in enumerate(STRINGS):
        theirs = hf_tokenizer(text, truncation=True, max_length=77)["input_ids"]
        assert ours[row, : len(theirs)].tolist() == theirs, text
        assert not ours[row, len(theirs) :].any(), text  # zero padding, as clip.tokenize
    assert ours[-1, -1] == tokenizer.eot_token_id  # the long text kept its end-of-text


def test_short_context_matches_transformers_truncation(tokenizer, hf_tokenizer):
    text = "apply eye makeup before a long night of playing guitar"
    theirs = hf_tokenizer(text, truncation=True, max_length=6)["input_ids"]
    assert tokenizer(text, context_length=6)[0].tolist() == theirs
    assert theirs[-1] == 49407


def test_known_clip_ids_and_structure(tokenizer):
    assert (tokenizer.vocab_size, tokenizer.sot_token_id, tokenizer.eot_token_id) == (49408, 49406, 49407)
    ids = tokenizer(["a photo of a cat", ""], context_length=10)
    assert ids.tolist() == [
        [49406, 320, 1125, 539, 320, 2368, 49407, 0, 0, 0],
        [49406, 49407, 0, 0, 0, 0, 0, 0, 0, 0],
    ]
    # The end-of-text position is the length + 1: what the text encoder pools.
    assert int((ids[0] == 49407).nonzero()) == len(tokenizer.encode("a photo of a cat")) + 1


def test_single_string_gives_one_row(tokenizer):
    assert tokenizer("playing guitar").shape == (1, 77)
    assert tokenizer(("a", "b"), context_length=5).shape == (2, 5)


def test_decode_round_trip(tokenizer):
    assert tokenizer.decode(tokenizer.encode("Apply  Eye\tMakeup")) == "apply eye makeup"
    assert tokenizer.decode(tokenizer.encode("naïve café 😀")) == "naïve café 😀"
    assert tokenizer.decode(tokenizer.encode("don't")) == "don 't"  # words split as CLIP splits them
    assert (
        tokenizer.decode(torch.tensor([49406, 1629, 5084, 49407]))
        == "<|startoftext|>playing guitar <|endoftext|>"
    )
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.decode([49408])


def test_html_entities_are_unescaped_as_clip_does(tokenizer):
    assert tokenizer.encode("rock &amp; roll") == tokenizer.encode("rock & roll")
    assert tokenizer.encode("rock &amp;amp; roll") == tokenizer.encode("rock & roll")  # twice, as CLIP
    assert clean_text("  Rock &lt;3\n\n Roll ") == "rock <3 roll"


def test_no_truncation_raises_naming_the_text(tokenizer):
    text = " ".join(["juggling balls"] * 40)
    with pytest.raises(ValueError, match=r"juggling balls.*more than the context length 77"):
        tokenizer(["short", text], truncate=False)
    assert tokenizer("cat", context_length=3, truncate=False)[0].tolist() == [49406, 2368, 49407]
    with pytest.raises(ValueError, match="context_length must be at least 2"):
        tokenizer("x", context_length=1)
    with pytest.raises(TypeError, match="index 1"):
        tokenizer(["ok", 3])


def test_word_split_matches_clip_pattern():
    regex = pytest.importorskip("regex")
    pattern = regex.compile(
        r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
        regex.IGNORECASE,
    )
    for text in [*STRINGS, "it.'s", "x'''y", "<|startoftext|>hi!<|endoftext|>", "!<|endoftext|>"]:
        cleaned = clean_text(text)
        assert split_words(cleaned) == pattern.findall(cleaned), text


def test_other_vocabulary_file(tmp_path):
    path = tmp_path / "tiny_merges.txt"
    path.write_text("#version: 0.2\nh e\nl l\nll o</w>\nhe llo</w>\n")
    tok = CLIPTokenizer(vocab_path=path)
    # 256 byte tokens, 256 with '</w>', 4 merges, 2 specials.
    assert (tok.vocab_size, tok.sot_token_id, tok.eot_token_id) == (518, 516, 517)
    # "hello" merges all the way; "hell" stops at he + l + l</w> ('l' is byte token 108 - 33 = 75).
    assert tok.encode("Hello hell") == [515, 512, 75, 256 + 75]
    assert tok.decode(tok.encode("Hello hell")) == "hello hell"
    bad = tmp_path / "bad.txt"
    bad.write_text("#version\na b c\n")
    with pytest.raises(ValueError, match=r"bad\.txt:2"):
        CLIPTokenizer(vocab_path=bad)


def test_default_tokenizer_is_cached():
    assert default_tokenizer() is default_tokenizer()
