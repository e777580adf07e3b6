"""Text towers other than CLIP's: SigLIP / SigLIP 2 and MetaCLIP 2, with the tokenizers their folders ship.

Towers: parity with transformers on tiny random models written by ``save_pretrained``. Tokenizers: parity with
transformers' tokenizers on tiny ones trained here (``tokenizers`` / ``sentencepiece``) and written as the
released repositories lay them out: SigLIP's ``spiece.model``, SigLIP 2's Gemma ``tokenizer.json`` (BPE with
byte fallback, EOS appended by its post-processor), MetaCLIP 2's XLM-R ``tokenizer.json`` (Unigram with
SentencePiece's precompiled normaliser and ``<s> $A </s>``).
"""

from __future__ import annotations

import io
import json
import random
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import (
    AutoTokenizer,
    CLIPConfig,
    CLIPModel,
    MetaClip2Config,
    MetaClip2Model,
    MetaClip2TextConfig,
    MetaClip2TextModelWithProjection,
    MetaClip2VisionConfig,
    MetaClip2VisionModel,
    Siglip2Config,
    Siglip2Model,
    Siglip2Tokenizer,
    SiglipConfig,
    SiglipModel,
    SiglipTextConfig,
    SiglipTextModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from evl.models.registry import create_backbone, load_clip_text, load_siglip_text, load_text_tower
from evl.text_tokenizers import TokenizerFormatError, load_tokenizer
from evl.weights import WeightFormatError, read_clip_text, read_siglip_text
from evl.weights.siglip_text import SIGLIP_LOGIT_BIAS_INIT, SIGLIP_LOGIT_SCALE_INIT

spm = pytest.importorskip("sentencepiece")

# Odd sizes everywhere: head widths 10 and 9, MLP ratio 1.8, a 13-token context, projections of another width
# (SigLIP's text head maps onto the image tower's width).
TEXT = dict(
    vocab_size=97,
    hidden_size=40,
    intermediate_size=72,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=13,
)
VISION = dict(
    hidden_size=36,
    intermediate_size=72,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=48,
    patch_size=16,
)
SIGLIP_TEXT = dict(TEXT, projection_size=VISION["hidden_size"])
# MetaCLIP 2's released configs: pad 1, BOS 0 and EOS 2 (``<s>``, ``</s>`` of XLM-R), pooled at EOS.
METACLIP_TEXT = dict(TEXT, bos_token_id=0, eos_token_id=2, pad_token_id=1)


def _randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Replace transformers' near-identity initialisation (LayerNorm 1/0, zero biases) with noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            elif name.endswith("bias") or (p.ndim < 2 and "logit" not in name):
                p.copy_(0.05 * noise)
            elif "logit" in name:
                p.copy_(noise)
            elif "embedding" in name:
                p.copy_(0.5 * noise)
            else:
                p.copy_(noise * p[0].numel() ** -0.5)


def _save(model: torch.nn.Module, folder: Path) -> torch.nn.Module:
    _randomize(model.eval())
    model.save_pretrained(folder)
    return model


def _pooled(output) -> torch.Tensor:
    """transformers 5 returns a model output from ``get_text_features``, transformers 4 the tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------------------ tiny tokenizers

random.seed(0)
_VOCABULARY = (
    "a photo of the cat dog playing guitar running jumping swimming riding bike horse skiing surfing cooking "
    "eating drinking coffee tea making cake video person people man woman child kids ball soccer Hello World "
    "café naïve résumé Über 数字 123 4567 2024 e-mail it's don't , . ! ? ( ) ' \" -"
)
_WORDS = _VOCABULARY.split()
CORPUS = [" ".join(random.choice(_WORDS) for _ in range(random.randint(3, 12))) for _ in range(300)]

# Case, punctuation, digits, whitespace of every kind, unicode (accents composed and not, CJK, emoji, width
# and ligature forms), the models' own special tokens written out, the empty string and texts far longer
# than any context.
STRINGS = [
    "a photo of a cat",
    "Hello, World!",
    "",
    "   ",
    "UPPER lower MiXeD",
    "It's 2024: 12.5% off!!",
    "naïve café résumé Über",
    "数字 123 and 4567",
    "tab\tnew\nline",
    "  leading and trailing  ",
    "double  space",
    "\u2581already\u2581marked",
    "a</s>b",
    "</s>",
    "x </s> y",
    "<unk> token",
    "<eos> and <bos>",
    "<s> x </s>",
    "<pad>",
    "e-mail: a@b.c",
    "quotes \"double\" 'single'",
    "emoji 😀 here",
    "ﬁ ligature ＦＵＬＬ width",
    "ÀÉÎÕÜ àéîõü",
    "a\u0301 combining",
    "snow\u00a0nbsp",
    "zero\u200bwidth",
    "Ωmega ∑um",
    "1,000,000",
    "...",
    "!!!",
    "a-b_c",
    "Don't STOP",
    "playing guitar.",
    "dog " * 80,
    "a" * 300,
    "riding a horse " * 20,
]


def _train_sentencepiece(**options) -> bytes:
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=out,
        hard_vocab_limit=False,
        character_coverage=1.0,
        minloglevel=2,
        **options,
    )
    return out.getvalue()


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2))


def write_siglip_tokenizer(folder: Path) -> None:
    """SigLIP's layout: a T5-style SentencePiece model (pad 0, ``</s>`` 1, ``<unk>`` 2) as ``spiece.model``,
    written by transformers' SiglipTokenizer with its ``tokenizer_config.json``, and a special tokens map."""
    from transformers import SiglipTokenizer

    raw = folder / "trained.model"
    raw.write_bytes(
        _train_sentencepiece(vocab_size=150, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
    )
    SiglipTokenizer(vocab_file=str(raw)).save_pretrained(folder)
    raw.unlink()
    _write_json(
        folder / "special_tokens_map.json", {"eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>"}
    )


def write_gemma_tokenizer(folder: Path) -> None:
    """SigLIP 2's layout: Gemma's BPE with byte fallback (``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>``
    3, ``<mask>`` 4, byte tokens), spaces made ``▁`` by the normaliser, and the post-processor transformers 4
    wrote for ``add_bos_token: false, add_eos_token: true``: ``$A <eos>``."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    tok.train_from_iterator(
        CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False)
    )
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    tok = Tokenizer.from_str(json.dumps(data))
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="$A <eos>", pair="$A <eos> $B <eos>", special_tokens=[("<eos>", 1)]
    )
    tok.save(str(folder / "tokenizer.json"))
    names = dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    _write_json(
        folder / "tokenizer_config.json",
        {
            "tokenizer_class": "GemmaTokenizer",
            "add_bos_token": False,
            "add_eos_token": True,
            "mask_token": "<mask>",
            "model_max_length": 1000000000000000019884624838656,
            **names,
        },
    )
    _write_json(folder / "special_tokens_map.json", names)


def write_xlmr_tokenizer(folder: Path) -> None:
    """MetaCLIP 2's layout: XLM-R's Unigram (``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3, ..., ``<mask>``)
    with SentencePiece's precompiled normaliser, the Metaspace pre-tokeniser and ``<s> $A </s>``."""
    from sentencepiece import sentencepiece_model_pb2

    raw = _train_sentencepiece(vocab_size=150, model_type="unigram", bos_id=0, pad_id=1, eos_id=2, unk_id=3)
    (folder / "sentencepiece.bpe.model").write_bytes(raw)
    proto = sentencepiece_model_pb2.ModelProto.FromString(raw)
    vocab = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(p.piece, p.score) for p in proto.pieces[4:]] + [("<mask>", 0.0)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=3, byte_fallback=False))
    tok.normalizer = normalizers.Sequence(
        [
            normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap),
            normalizers.Replace(Regex(" {2,}"), " "),
        ]
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in ("<s>", "<pad>", "</s>", "<unk>")]
        + [AddedToken("<mask>", special=True, normalized=False, lstrip=True)]
    )
    tok.save(str(folder / "tokenizer.json"))
    mask = {"__type": "AddedToken", "content": "<mask>", "lstrip": True, "normalized": False}
    mask.update(rstrip=False, single_word=False, special=True)
    names = dict(bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>", unk_token="<unk>")
    names.update(pad_token="<pad>", mask_token=mask)
    _write_json(
        folder / "tokenizer_config.json",
        {"tokenizer_class": "XLMRobertaTokenizer", "model_max_length": 512, **names},
    )
    _write_json(folder / "special_tokens_map.json", names)


WRITERS = {"siglip": write_siglip_tokenizer, "gemma": write_gemma_tokenizer, "xlmr": write_xlmr_tokenizer}


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory) -> dict[str, Path]:
    """One folder of tokenizer files per kind, trained once for the module."""
    folders = {}
    for kind, write in WRITERS.items():
        folders[kind] = tmp_path_factory.mktemp(f"{kind}-tokenizer")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            write(folders[kind])
    return folders


def _with_tokenizer(folder: Path, tokenizer_files: dict[str, Path], kind: str) -> Path:
    shutil.copytree(tokenizer_files[kind], folder, dirs_exist_ok=True)
    return folder


def _hf_ids(folder: Path, texts: list[str], context: int, tokenizer=None) -> list[list[int]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = tokenizer or AutoTokenizer.from_pretrained(folder)
        # NOTE(ref): padded on the right to the full context, as SigLIP was trained; Gemma's tokenizer
        # classes default to the left.
        return hf(texts, padding="max_length", max_length=context, truncation=True, padding_side="right")[
            "input_ids"
        ]


# ------------------------------------------------------------------------------------------- tokenizers

# (kind, config class of the folder's config.json, text context, lowercase argument, transformers class
# compared when not the one AutoTokenizer picks)
TOKENIZER_CASES = {
    "siglip-spiece": ("siglip", SiglipConfig, 64, None, None),
    # SigLIP 2 NaFlex folders: AutoTokenizer gives Siglip2Tokenizer (Gemma + lowercasing).
    "siglip2-gemma": ("gemma", Siglip2Config, 64, None, None),
    # SigLIP 2 fixed-resolution folders say model_type "siglip": AutoTokenizer gives GemmaTokenizer, which
    # does not lowercase; lowercased by default here, as Siglip2Tokenizer and the model's training.
    "siglip-gemma": ("gemma", SiglipConfig, 64, None, Siglip2Tokenizer),
    "siglip-gemma-cased": ("gemma", SiglipConfig, 64, False, None),
    "metaclip2-xlmr": ("xlmr", MetaClip2Config, 77, None, None),
}


@pytest.mark.parametrize("case", TOKENIZER_CASES)
def test_tokenizer_ids_equal_transformers(tmp_path, tokenizer_files, case):
    kind, config_class, context, lowercase, hf_class = TOKENIZER_CASES[case]
    folder = _with_tokenizer(tmp_path, tokenizer_files, kind)
    config_class(text_config={"max_position_embeddings": context}).save_pretrained(folder)
    ours = load_tokenizer(folder, lowercase=lowercase)
    assert ours.context_length == context
    hf = hf_class.from_pretrained(folder) if hf_class else None
    ids = ours(STRINGS)
    assert ids.shape == (len(STRINGS), context) and ids.dtype == torch.long
    theirs = _hf_ids(folder, STRINGS, context, hf)
    for text, row, expected in zip(STRINGS, ids.tolist(), theirs, strict=True):
        assert row == expected, text
    # Long texts are cut with their end-of-text kept, as the towers pool there or were trained so.
    for long in ("dog " * 80, "a" * 300):
        assert ids[STRINGS.index(long), -1] == ours.eos_token_id


def test_tokenizer_special_ids_and_framing(tokenizer_files):
    siglip = load_tokenizer(tokenizer_files["siglip"], context_length=8)
    assert (siglip.bos_token_id, siglip.eos_token_id, siglip.pad_token_id) == (None, 1, 1)
    row = siglip("A cat")[0].tolist()
    assert row[row.index(1) :] == [1] * (8 - row.index(1))  # EOS, then </s> as padding
    gemma = load_tokenizer(tokenizer_files["gemma"], context_length=8)
    assert (gemma.bos_token_id, gemma.eos_token_id, gemma.pad_token_id) == (None, 1, 0)
    xlmr = load_tokenizer(tokenizer_files["xlmr"], context_length=8)
    assert (xlmr.bos_token_id, xlmr.eos_token_id, xlmr.pad_token_id) == (0, 2, 1)
    assert xlmr("").tolist() == [[0, 2, 1, 1, 1, 1, 1, 1]]
    assert xlmr.encode("a cat") == xlmr("a cat")[0, 1 : 1 + len(xlmr.encode("a cat"))].tolist()


def test_tokenizer_refusals_are_one_line(tmp_path, tokenizer_files):
    with pytest.raises(ValueError, match="pass context_length"):
        load_tokenizer(tokenizer_files["gemma"])("no context known")  # no config.json, no model_max_length
    xlmr = load_tokenizer(tokenizer_files["xlmr"])
    with pytest.raises(ValueError, match=r"dog dog.*more than the context length 8"):
        xlmr(["short", "dog " * 20], context_length=8, truncate=False)
    with pytest.raises(ValueError, match="at least 2"):
        xlmr("x", context_length=1)
    with pytest.raises(TypeError, match="index 1"):
        xlmr(["ok", 3], context_length=8)
    with pytest.raises(TokenizerFormatError) as err:
        load_tokenizer(tmp_path)
    assert "no tokenizer found" in _one_line(err)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerFormatError) as err:
        load_tokenizer(tmp_path)
    assert "not a readable tokenizers file" in _one_line(err)


# ------------------------------------------------------------------------------------------ SigLIP towers


def _siglip_model(kind: str, folder: Path, text: dict | None = None) -> torch.nn.Module:
    text = text or SIGLIP_TEXT
    if kind == "SiglipModel":
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=VISION))
    elif kind == "Siglip2Model":
        model = Siglip2Model(Siglip2Config(text_config=text, vision_config=dict(VISION, num_patches=9)))
    else:
        model = SiglipTextModel(SiglipTextConfig(**text))
    return _save(model, folder)


def _siglip_embeddings(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(model, SiglipTextModel):
            return model(input_ids=ids).pooler_output
        return _pooled(model.get_text_features(input_ids=ids))


@pytest.mark.parametrize("kind", ["SiglipModel", "Siglip2Model", "SiglipTextModel"])
def test_siglip_text_matches_transformers(tmp_path, kind):
    hf = _siglip_model(kind, tmp_path)
    ours, logit_scale, logit_bias = load_siglip_text(tmp_path)
    assert ours.config.activation == "gelu_tanh" and ours.config.heads == 4
    g = torch.Generator().manual_seed(1)
    full = torch.randint(0, TEXT["vocab_size"], (5, 13), generator=g)
    with torch.no_grad():
        # The full context (as SigLIP's rows always are), and a shorter row: the last position either way.
        for ids in (full, full[:, :9]):
            assert _max_diff(ours(ids), _siglip_embeddings(hf, ids)) <= 1e-5
    if kind == "SiglipTextModel":
        assert (logit_scale, logit_bias) == (SIGLIP_LOGIT_SCALE_INIT, SIGLIP_LOGIT_BIAS_INIT)
    else:
        assert logit_scale == pytest.approx(hf.logit_scale.item(), abs=0)
        assert logit_bias == pytest.approx(hf.logit_bias.item(), abs=0)


def test_siglip_text_tower_scores_like_transformers(tmp_path):
    hf = _siglip_model("SiglipModel", tmp_path)
    ours, logit_scale, logit_bias = load_siglip_text(tmp_path)
    images = torch.randn(2, 3, 48, 48)
    ids = torch.randint(0, TEXT["vocab_size"], (3, 13))
    with torch.no_grad():
        expected = hf(input_ids=ids, pixel_values=images).logits_per_text
        image = torch.nn.functional.normalize(_pooled(hf.get_image_features(pixel_values=images)), dim=-1)
        text = torch.nn.functional.normalize(ours(ids), dim=-1)
    assert _max_diff(text @ image.t() * torch.tensor(logit_scale).exp() + logit_bias, expected) <= 1e-5


# ------------------------------------------------------------------------------------------- MetaCLIP 2


def _metaclip_ids(lengths: list[int], context: int = 13, vocab: int = TEXT["vocab_size"]) -> torch.Tensor:
    """``<s> ... </s>`` rows padded with 1, the last filling the context; ids 3.. stand for words."""
    g = torch.Generator().manual_seed(2)
    ids = torch.ones(len(lengths), context, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, :length] = torch.randint(3, vocab, (length,), generator=g)
        ids[row, 0], ids[row, length - 1] = 0, 2
    return ids


@pytest.mark.parametrize("kind", ["MetaClip2Model", "MetaClip2TextModelWithProjection"])
def test_metaclip2_text_matches_transformers(tmp_path, kind):
    if kind == "MetaClip2Model":
        config = MetaClip2Config(text_config=METACLIP_TEXT, vision_config=VISION, projection_dim=24)
        hf = _save(MetaClip2Model(config), tmp_path)
    else:
        hf = _save(
            MetaClip2TextModelWithProjection(MetaClip2TextConfig(**METACLIP_TEXT, projection_dim=24)),
            tmp_path,
        )
    ours, logit_scale = load_clip_text(tmp_path)
    assert ours.config.eot_token_id == 2 and ours.config.output_dim == 24
    ids = _metaclip_ids([13, 7, 2, 4])
    with torch.no_grad():
        if kind == "MetaClip2Model":
            expected = _pooled(hf.get_text_features(input_ids=ids))
            assert logit_scale == pytest.approx(hf.logit_scale.item(), abs=0)
        else:
            expected = hf(input_ids=ids).text_embeds
        assert _max_diff(ours(ids), expected) <= 1e-5


@pytest.mark.parametrize("kind", ["MetaClip2Model", "MetaClip2VisionModel"])
def test_metaclip2_image_tower_loads_as_clip_every_block_and_embedding(tmp_path, kind):
    if kind == "MetaClip2Model":
        config = MetaClip2Config(text_config=METACLIP_TEXT, vision_config=VISION, projection_dim=24)
        hf = _save(MetaClip2Model(config), tmp_path)
        vision = hf.vision_model
    else:
        hf = vision = _save(MetaClip2VisionModel(MetaClip2VisionConfig(**VISION)), tmp_path)
    ours, _ = create_backbone(tmp_path)
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        out = vision(pixel_values=images, output_hidden_states=True)
        blocks = ours.eval().forward_intermediates(images, blocks=[0, 1])
        embedding = ours(images)
        expected = (
            _pooled(hf.get_image_features(pixel_values=images))
            if kind == "MetaClip2Model"
            else out.pooler_output
        )
    for i, features in enumerate(blocks):
        assert _max_diff(features.out, out.hidden_states[i + 1]) <= 1e-5, f"block {i}"
    assert _max_diff(embedding, expected) <= 1e-5


# ---------------------------------------------------------------------------------- from texts, end to end

# (tokenizer files, the transformers class written beside them; its vocabulary is the tokenizer's)
TOWER_CASES = {
    "siglip": ("siglip", "SiglipModel"),
    "siglip2": ("gemma", "Siglip2Model"),
    "metaclip2": ("xlmr", "MetaClip2Model"),
}


@pytest.mark.parametrize("case", TOWER_CASES)
def test_load_text_tower_embeds_texts_as_transformers(tmp_path, tokenizer_files, case):
    kind, model_kind = TOWER_CASES[case]
    _with_tokenizer(tmp_path, tokenizer_files, kind)
    vocab = load_tokenizer(tmp_path, context_length=13).vocab_size
    if model_kind == "MetaClip2Model":
        config = MetaClip2Config(
            text_config=dict(METACLIP_TEXT, vocab_size=vocab), vision_config=VISION, projection_dim=24
        )
        hf = _save(MetaClip2Model(config), tmp_path)
    else:
        hf = _siglip_model(model_kind, tmp_path, dict(SIGLIP_TEXT, vocab_size=vocab))
    tower = load_text_tower(tmp_path)
    texts = ["a photo of a cat", "Hello, World!", "", "riding a horse " * 20]
    ids = tower.tokenizer(texts)
    assert ids.shape == (4, 13) and ids.tolist() == _hf_ids(tmp_path, texts, 13)
    with torch.no_grad():
        expected = _pooled(hf.get_text_features(input_ids=ids))
        assert _max_diff(tower.text(ids), expected) <= 1e-5
    assert tower.logit_scale == pytest.approx(hf.logit_scale.item(), abs=0)
    if case == "metaclip2":
        assert tower.logit_bias is None
    else:
        assert tower.logit_bias == pytest.approx(hf.logit_bias.item(), abs=0)


def test_load_text_tower_of_a_clip_folder_uses_clips_tokenizer(tmp_path):
    from evl.tokenizer import default_tokenizer

    config = CLIPConfig(text_config=dict(TEXT, eos_token_id=96), vision_config=VISION, projection_dim=24)
    _save(CLIPModel(config), tmp_path)
    tower = load_text_tower(tmp_path)
    assert tower.tokenizer is default_tokenizer() and tower.logit_bias is None


# ------------------------------------------------------------------------------------------------ refusals


def test_mismatched_or_unsupported_checkpoints_are_one_line_errors(tmp_path, tokenizer_files):
    siglip, clip, vision_only, metaclip = (tmp_path / n for n in ("siglip", "clip", "vision", "metaclip"))
    _siglip_model("SiglipModel", siglip)
    _save(CLIPModel(CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=24)), clip)
    _save(SiglipVisionModel(SiglipVisionConfig(**VISION)), vision_only)
    config = MetaClip2Config(text_config=METACLIP_TEXT, vision_config=VISION, projection_dim=24)
    _save(MetaClip2Model(config), metaclip)
    cases = [
        (lambda: read_siglip_text(clip), "model_type 'clip' holds no SigLIP text tower"),
        (lambda: read_clip_text(siglip), "holds a SigLIP text tower"),
        (lambda: load_siglip_text(vision_only), "'siglip_vision_model' holds no SigLIP text tower"),
        (lambda: load_siglip_text(siglip, heads=7), "not divisible by heads 7"),
        (lambda: read_siglip_text(clip / "model.safetensors"), "read from Hugging Face folders"),
        (lambda: load_text_tower(metaclip), "no tokenizer found"),  # a folder without its tokenizer
    ]
    for load, message in cases:
        with pytest.raises(WeightFormatError) as err:
            load()
        assert message in _one_line(err)
    # A tokenizer that is not the tower's: more ids than the tower embeds.
    _with_tokenizer(metaclip, tokenizer_files, "gemma")
    with pytest.raises(WeightFormatError) as err:
        load_text_tower(metaclip)
    assert "do not belong together" in _one_line(err)
    # A text tower whose tensors do not fit its config.
    state = {"text_model.embeddings.token_embedding.weight": torch.zeros(5, 40)}
    save_file(state, str(siglip / "model.safetensors"))
    with pytest.raises(WeightFormatError) as err:
        load_siglip_text(siglip)
    assert "is missing" in _one_line(err)
