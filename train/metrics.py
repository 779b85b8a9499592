"""COCO mAP with pycocotools on in-memory ground truth and detections.

Used for validation during training, for the demo's in-process vs served comparison and by
the tests. Boxes are xyxy in image pixels, classes 1-based.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval


def coco_map(ground_truth: Iterable[dict], detections: Iterable[dict], num_classes: int) -> dict[str, float]:
    """mAP@[.5:.95] and mAP@.5.

    ground_truth: ``{"image_id", "width", "height", "boxes": [[x1,y1,x2,y2]...], "labels": [...]}``
    detections: ``{"image_id", "boxes", "scores", "labels"}`` (any number per image).
    Returns zeros when there is nothing to score (no ground truth boxes or no detections).
    """
    gt = {"images": [], "annotations": [], "categories": [{"id": c} for c in range(1, num_classes + 1)]}
    for g in ground_truth:
        gt["images"].append({"id": int(g["image_id"]), "width": g["width"], "height": g["height"]})
        for box, label in zip(g["boxes"], g["labels"], strict=True):
            x1, y1, x2, y2 = (float(v) for v in box)
            gt["annotations"].append(
                {
                    "id": len(gt["annotations"]) + 1,
                    "image_id": int(g["image_id"]),
                    "category_id": int(label),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                }
            )
    dets = []
    for d in detections:
        for box, score, label in zip(d["boxes"], d["scores"], d["labels"], strict=True):
            x1, y1, x2, y2 = (float(v) for v in box)
            dets.append([int(d["image_id"]), x1, y1, x2 - x1, y2 - y1, float(score), int(label)])
    if not gt["annotations"] or not dets:
        return {"map": 0.0, "map50": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(np.array(dets, dtype=np.float64))
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"map": max(0.0, float(ev.stats[0])), "map50": max(0.0, float(ev.stats[1]))}


def detections_from_rows(image_id: int, rows) -> dict:
    """effdet-style [N, 6] rows (x1, y1, x2, y2, score, class) -> a ``coco_map`` detection entry."""
    rows = [r for r in (rows.tolist() if hasattr(rows, "tolist") else rows) if r[4] > 0]
    return {
        "image_id": image_id,
        "boxes": [r[:4] for r in rows],
        "scores": [r[4] for r in rows],
        "labels": [int(r[5]) for r in rows],
    }
