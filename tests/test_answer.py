"""The answer contract (``handler/answer.py``): one definition that producers and readers share."""

from __future__ import annotations

import json

import pytest
import torch

from handler.answer import Answer, AnswerError, Detection, ModelInfo
from handler.request import Params

ANSWER = Answer(
    640,
    480,
    (
        Detection((1.5, 2.0, 30.25, 40.0), 0.93, 2, "square"),
        Detection((5.0, 6.0, 7.0, 8.0), 0.5, 1, "circle"),
    ),
    ModelInfo("effdet_demo", "1.0"),
    "abc-123",
)


def test_json_round_trip_and_key_order():
    """Catches: a producer and a reader disagreeing on a key or on the order the docs show."""
    doc = json.loads(json.dumps(ANSWER.to_json()))
    assert list(doc) == ["model", "image", "detections", "request_id"]
    assert doc["detections"][0] == {
        "box": [1.5, 2.0, 30.25, 40.0],
        "score": 0.93,
        "class_id": 2,
        "label": "square",
    }
    assert Answer.from_json(doc) == ANSWER
    bare = Answer(3, 4, ())
    assert bare.to_json() == {"image": {"width": 3, "height": 4}, "detections": []}
    assert bare.served(ModelInfo("m", "2"), "r").to_json()["model"] == {"name": "m", "version": "2"}


@pytest.mark.parametrize(
    "doc, message",
    [
        ({"detections": []}, "lacks 'image'"),
        ({"image": {"width": 1, "height": 2}}, "lacks 'detections'"),
        ({"image": {"width": 1}, "detections": []}, "lacks 'height'"),
        ({"image": {"width": 1, "height": 2}, "detections": [{"box": [1, 2, 3, 4], "score": 0.5, "label": "x"}]},
         "lacks 'class_id'"),
        ({"image": {"width": 1, "height": 2}, "detections": [{"box": [1, 2], "score": 0.5, "class_id": 1, "label": "x"}]},
         "malformed"),
        ({"error": {"code": "invalid_image", "message": "no"}}, "an error answer"),
        ([], "JSON object"),
    ],
)  # fmt: skip
def test_what_is_not_an_answer_is_named(doc, message):
    """Catches: a reader that takes an error answer or a truncated one for an empty detection list."""
    with pytest.raises(AnswerError, match=message):
        Answer.from_json(doc)


def test_detector_answers_are_the_contract(detector, val_images):
    """Catches: the serving core building JSON by hand that the contract's reader would refuse."""
    docs = detector.predict(val_images[:2], score_threshold=0.0)
    for doc in docs:
        answer = Answer.from_json(doc)
        assert answer.to_json() == doc and answer.model is None  # the handler adds the model
        assert answer.detections and all(d.score >= 0.0 and d.label for d in answer.detections)
    rows = torch.tensor([[[1.0, 2.0, 3.0, 4.0, 0.9, 1.0], [0, 0, 0, 0, 0.0, 0.0]]])
    (one,) = detector.answers(rows, [(10, 20)], [Params(0.5, 0.5, 5)])
    assert one == Answer(10, 20, (Detection((1.0, 2.0, 3.0, 4.0), 0.9, 1, detector.labels[1]),))
