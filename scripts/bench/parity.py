"""Parity: our post-processing against effdet's on the same head outputs, shared with the tests.

A comparison that compared no rows is a failure, not a pass: a check is only as good as what it saw.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class BenchError(RuntimeError):
    """The bench refused a result: outputs that disagree, a server that would not take a model."""


SCORE_ATOL = 1e-6


BOX_ATOL = 1e-3


EFFDET_IOU = 0.5  # effdet's generate_detections hard-codes it


def effdet_postprocess(cls_out, box_out, anchor_boxes, cfg: dict, img_scale, img_size) -> torch.Tensor:
    """effdet's own path (what DetBenchPredict.forward does after the network), hard NMS."""
    from effdet.bench import _batch_detection, _post_process

    c, b, indices, classes = _post_process(
        cls_out,
        box_out,
        num_levels=int(cfg["num_levels"]),
        num_classes=int(cfg["num_classes"]),
        max_detection_points=int(cfg["max_detection_points"]),
    )
    return _batch_detection(
        cls_out[0].shape[0],
        c,
        b,
        anchor_boxes,
        indices,
        classes,
        img_scale,
        img_size,
        max_det_per_image=int(cfg["max_det_per_image"]),
        soft_nms=False,
    )


def ours_postprocess(
    cls_out, box_out, anchors, cfg: dict, img_scale, img_size, min_score=0.0
) -> torch.Tensor:
    from handler.postprocess import detect

    return detect(
        cls_out,
        box_out,
        anchors,
        num_classes=int(cfg["num_classes"]),
        max_detection_points=int(cfg["max_detection_points"]),
        max_det_per_image=int(cfg["max_det_per_image"]),
        iou_threshold=EFFDET_IOU,
        img_scale=img_scale,
        img_size=img_size,
        min_score=min_score,
    )


def tie_horizon(cls_out: Sequence[torch.Tensor], max_detection_points: int) -> list[float]:
    """Per image, the highest score that two top-k candidates share exactly (-inf when none do).

    Both post-processings order candidates with unstable sorts, so among exactly equal scores the
    top-k cut, NMS's processing order and the ``max_det_per_image`` cut may each pick either one:
    at and below that score two correct implementations can differ. Above it they must not.
    """
    batch = cls_out[0].shape[0]
    flat = torch.cat([c.float().permute(0, 2, 3, 1).reshape(batch, -1) for c in cls_out], 1)
    scores = flat.topk(min(max_detection_points + 1, flat.shape[1]), dim=1).values.sigmoid().cpu()
    out = []
    for row in scores:  # descending
        tied = row[1:][row[1:] == row[:-1]]
        out.append(float(tied[0]) if tied.numel() else float("-inf"))
    return out


def compare_detections(
    ours: torch.Tensor, theirs: torch.Tensor, horizon: Sequence[float] | None = None
) -> dict:
    """Raise ``BenchError`` unless both [B, N, 6] outputs hold the same detections in the same order.

    Rows scoring above ``horizon[i]`` (see ``tie_horizon``) are compared one by one: same count,
    class, order, score to 1e-6 and box to 1e-3 px; rows at or below it are counted, not compared.
    """
    if ours.shape != theirs.shape:
        raise BenchError(
            f"post-processing shapes differ: ours {list(ours.shape)}, effdet {list(theirs.shape)}"
        )
    ours, theirs = ours.float().cpu(), theirs.float().cpu()
    horizon = horizon or [float("-inf")] * ours.shape[0]
    box_diff = score_diff = 0.0
    compared = rows = 0
    for i in range(ours.shape[0]):
        g = ours[i][ours[i, :, 4] > max(0.0, horizon[i])].tolist()
        t = theirs[i][theirs[i, :, 4] > max(0.0, horizon[i])].tolist()
        if len(g) != len(t):
            raise BenchError(
                f"image {i}: ours kept {len(g)} detections above score {horizon[i]:.6g}, effdet {len(t)}"
            )
        for k, (a, b) in enumerate(zip(g, t, strict=True)):
            if a[5] != b[5]:
                raise BenchError(f"image {i}, detection {k}: class {a[5]:.0f} (ours) vs {b[5]:.0f} (effdet)")
            score_diff = max(score_diff, abs(a[4] - b[4]))
            box_diff = max(box_diff, max(abs(x - y) for x, y in zip(a[:4], b[:4], strict=True)))
        compared += len(g)
        rows += int((theirs[i, :, 4] > 0).sum())
    if compared == 0:
        raise BenchError(
            f"post-processing parity compared no rows (of {rows}): nothing scored above the tie horizon "
            "or the threshold, so the check proves nothing; use a trained model"
        )
    if score_diff > SCORE_ATOL or box_diff > BOX_ATOL:
        raise BenchError(
            f"post-processing differs from effdet: max |score diff| {score_diff:.3g} (limit {SCORE_ATOL}), "
            f"max |box diff| {box_diff:.3g} px (limit {BOX_ATOL})"
        )
    return {
        "identical": True,
        "compared_rows": compared,
        "rows": rows,
        "max_score_diff": score_diff,
        "max_box_diff_px": box_diff,
    }


def match_detections(ref: list[dict], other: list[dict], min_iou: float = 0.9) -> tuple[int, int]:
    """(matched, len(ref)): detections of ``ref`` that ``other`` has too, one to one, greedily in
    ``ref``'s score order: the same class and a box with IoU >= ``min_iou``."""
    from torchvision.ops import box_iou

    if not ref or not other:
        return 0, len(ref)
    iou = box_iou(torch.tensor([d["box"] for d in ref]), torch.tensor([d["box"] for d in other]))
    free = [True] * len(other)
    matched = 0
    for i, d in enumerate(ref):
        best, best_iou = None, min_iou
        for j, o in enumerate(other):
            if free[j] and o["class_id"] == d["class_id"] and float(iou[i, j]) >= best_iou:
                best, best_iou = j, float(iou[i, j])
        if best is not None:
            free[best] = False
            matched += 1
    return matched, len(ref)
