"""COCO mAP on hand-made cases with known answers."""

from __future__ import annotations

import pytest
import torch

from train.metrics import coco_map, detections_from_rows

GT = [{"image_id": 1, "width": 400, "height": 300, "boxes": [[100, 100, 200, 200]], "labels": [1]}]


def _det(box, score=0.9, label=1, image_id=1):
    return {"image_id": image_id, "boxes": [box], "scores": [score], "labels": [label]}


def test_perfect_predictions_score_one():
    assert coco_map(GT, [_det([100, 100, 200, 200])], num_classes=1) == pytest.approx(
        {"map": 1.0, "map50": 1.0}
    )


def test_shifted_box_scores_known_lower_value():
    # Shifted 10 px: IoU = 90*100 / (110*100) = 0.818, which passes the thresholds .50 ... .80 (7 of 10).
    scores = coco_map(GT, [_det([110, 100, 210, 200])], num_classes=1)
    assert scores["map50"] == pytest.approx(1.0)
    assert scores["map"] == pytest.approx(0.7)


def test_wrong_class_scores_zero_and_empty_is_zero():
    assert coco_map(GT, [_det([100, 100, 200, 200], label=2)], num_classes=2)["map"] == 0.0
    assert coco_map(GT, [], num_classes=1) == {"map": 0.0, "map50": 0.0}


def test_false_positive_ranked_first_halves_precision_at_full_recall():
    dets = {
        "image_id": 1,
        "boxes": [[300, 200, 350, 250], [100, 100, 200, 200]],
        "scores": [0.9, 0.8],
        "labels": [1, 1],
    }
    # precision 0.5 at recall 1: the 101-point interpolated AP is 0.5
    assert coco_map(GT, [dets], num_classes=1)["map50"] == pytest.approx(0.5)


def test_detections_from_rows_drops_padding():
    rows = torch.tensor([[1, 2, 3, 4, 0.9, 2], [0, 0, 0, 0, 0, 0]])
    d = detections_from_rows(5, rows)
    assert d == {"image_id": 5, "boxes": [[1, 2, 3, 4]], "scores": [pytest.approx(0.9)], "labels": [2]}
