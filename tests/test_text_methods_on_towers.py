"""The text methods on SigLIP's and MetaCLIP 2's towers: zero-shot scores as transformers computes them
(SigLIP's sigmoid with its learned bias), class prompts through the folder's own tokenizer, ViFi-CLIP
tuning end to end, and X-CLIP's refusal of towers it cannot run on."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import SiglipConfig, SiglipModel

from evl.engine.evaluate import evaluate
from evl.engine.predict import Predictor
from evl.engine.run import load_run, zeroshot_run
from evl.engine.train import train
from evl.video.lists import read_list
from factories import tiny_dataset, tiny_run
from test_text_towers import SIGLIP_TEXT, VISION, _save, write_siglip_tokenizer

pytest.importorskip("sentencepiece")

NAMES = ["left", "right", "up", "down"]


@pytest.fixture(scope="module")
def siglip_folder(tmp_path_factory):
    """A tiny random SigLIP (odd sizes, 48 px frames) saved as transformers saves it, with its tokenizer."""
    folder = tmp_path_factory.mktemp("siglip")
    torch.manual_seed(0)
    text = dict(SIGLIP_TEXT, vocab_size=160)  # room for every id of the tokenizer trained below
    hf = _save(SiglipModel(SiglipConfig(text_config=text, vision_config=VISION)), folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_siglip_tokenizer(folder)
    return folder, hf


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("synth"), train_per_class=1, val_per_class=1)


def test_zero_shot_logits_are_siglips_with_its_bias(siglip_folder):
    folder, hf = siglip_folder
    loaded = zeroshot_run(folder, NAMES)
    model = loaded.model
    assert model.score_activation == "sigmoid" and model.vision_config.family == "siglip"
    # Class prompts go through the folder's SentencePiece tokenizer, padded to SigLIP's full context.
    assert model.class_tokens.shape == (4, SIGLIP_TEXT["max_position_embeddings"])
    frames = torch.randn(2, 1, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(input_ids=model.class_tokens, pixel_values=frames[:, 0]).logits_per_image
        torch.testing.assert_close(model(frames), expected, atol=1e-5, rtol=1e-5)


def test_zero_shot_predictions_are_per_class_sigmoids(siglip_folder, dataset):
    folder, _ = siglip_folder
    predictor = Predictor(zeroshot_run(folder, NAMES))
    video = dataset.root / "videos" / "val" / "up" / "0000.mp4"
    probabilities = predictor.probabilities(video)
    with torch.no_grad():
        logits = predictor.model(predictor.views.load(video))  # [views, classes]
    assert probabilities.shape == (4,) and ((probabilities > 0) & (probabilities < 1)).all()
    # Each class scored on its own: sigmoid of its logit, averaged over views (one view here).
    torch.testing.assert_close(probabilities.float(), logits.sigmoid().mean(0), atol=1e-5, rtol=0)


def test_vifi_tunes_siglip_towers_end_to_end(siglip_folder, dataset, tmp_path):
    folder, _ = siglip_folder
    run = tiny_run(dataset, "method.name=vifi", f"backbone.name={folder}", "train.lr=1e-5",
                   "data.rand_augment=null", steps=1, batch_size=2)  # fmt: skip
    result = train(run, tmp_path / "run", progress=False)
    assert result.step == 1
    loaded = load_run(tmp_path / "run")
    assert loaded.model.tokenizer is not None and loaded.model.score_activation == "sigmoid"
    entries = read_list(run.data.val_list, data_root=run.data.data_root)
    evaluation = evaluate(loaded.model, entries, run.data, batch_size=2, progress=False)
    assert evaluation.result.num_videos == 4


def test_xclip_refuses_siglip_towers_in_one_line(siglip_folder, dataset, tmp_path):
    folder, _ = siglip_folder
    run = tiny_run(dataset, "method.name=xclip", f"backbone.name={folder}", steps=1, batch_size=2)
    with pytest.raises(ValueError, match="X-CLIP is built on CLIP's image and text encoders") as err:
        train(run, tmp_path / "run", progress=False)
    assert "\n" not in str(err.value)
