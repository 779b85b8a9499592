"""model.json as ``ModelCard``: a round trip keeps every byte, and a broken card names its key."""

from __future__ import annotations

import json

import pytest

from handler.card import DEFAULT_IOU_THRESHOLD, DEFAULT_SCORE_THRESHOLD, CardError, ModelCard
from handler.geometry import Geometry
from train.config import build_config, model_card


@pytest.fixture(scope="module")
def card_dict() -> dict:
    card = model_card("run", build_config("small", 3), ["a", "b", "c"], metrics={"m": 1})
    return json.loads(json.dumps(card.to_dict()))


def test_round_trip_is_exact(card_dict, tmp_path):
    card = ModelCard.from_dict(card_dict)
    assert card.to_dict() == card_dict
    card.save(tmp_path / "model.json")
    assert ModelCard.load(tmp_path) == card
    assert json.loads((tmp_path / "model.json").read_text()) == card_dict


def test_what_the_handler_reads(card_dict):
    card = ModelCard.from_dict(card_dict)
    assert card.num_classes == 3 and card.labels == {1: "a", 2: "b", 3: "c"}
    assert card.index_to_name() == {"1": "a", "2": "b", "3": "c"}
    assert card.max_det_per_image == card_dict["effdet_config"]["max_det_per_image"]
    assert card.preprocessing == Geometry(size=(256, 256))
    assert (card.score_threshold, card.iou_threshold) == (DEFAULT_SCORE_THRESHOLD, DEFAULT_IOU_THRESHOLD)


def test_export_block_added_and_kept(card_dict):
    card = ModelCard.from_dict(card_dict).with_export({"method": "script"})
    assert card.to_dict()["export"] == {"method": "script"}
    assert ModelCard.from_dict(card.to_dict()) == card


def test_defaults_when_postprocessing_is_absent(card_dict):
    d = {k: v for k, v in card_dict.items() if k != "postprocessing"}
    card = ModelCard.from_dict(d)
    assert (card.score_threshold, card.iou_threshold) == (0.05, 0.5)


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda d: d.pop("classes"), "x/model.json: missing key 'classes'"),
        (lambda d: d["effdet_config"].pop("max_det_per_image"), "effdet_config lacks max_det_per_image"),
        (lambda d: d["classes"].pop(), "2 class names for num_classes=3"),
        (lambda d: d["preprocessing"].update(resize="stretch"), "unsupported resize policy 'stretch'"),
    ],
)
def test_broken_cards_name_the_key(card_dict, breakage, message):
    d = json.loads(json.dumps(card_dict))
    breakage(d)
    with pytest.raises(ValueError, match=message):
        ModelCard.from_dict(d, "x/model.json")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "model.json")):
        ModelCard.load(tmp_path)
    (tmp_path / "model.json").write_text("{}")
    with pytest.raises(CardError, match="missing key 'effdet_config'"):
        ModelCard.load(tmp_path)
