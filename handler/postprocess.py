"""Head outputs -> boxes, derived from effdet's ``DetBenchPredict`` but vectorised over the batch.

effdet runs ``_post_process`` (top-k over all levels) and then loops over the images calling
``generate_detections`` (decode, clip, per-class NMS, ``max_det_per_image``). Here the same
steps run once for the whole batch: one top-k, one decode, one NMS over every (image, class)
group at once (``grouped_nms``), and a scatter of each image's best detections into a padded
``[B, max_det_per_image, 6]`` tensor, with no Python loop over images or groups and, on CUDA,
no host synchronisation after the candidate selection. The result equals effdet's, row for row
(golden tests in ``tests/test_postprocess.py``). Pure functions of tensors; no effdet import.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import math
from dataclasses import dataclass

import torch

# Above this many boxes one NMS call over all groups costs more than torchvision's per-group loop:
# the CPU kernel is O(kept x boxes), the CUDA one holds a boxes^2 / 8 byte mask. At a served score
# threshold a batch stays far below it; without a floor (5000 candidates per image) it does not.
GROUPED_NMS_MAX_BOXES = {"cpu": 8_000, "cuda": 40_000}


@dataclass(frozen=True)
class AnchorConfig:
    """The anchor-related keys of an effdet config."""

    min_level: int
    max_level: int
    num_scales: int
    aspect_ratios: tuple[tuple[float, float], ...]
    anchor_scale: float
    image_size: tuple[int, int]

    @classmethod
    def from_effdet_config(cls, cfg: dict) -> AnchorConfig:
        ratios = tuple(
            (r**0.5, 1.0 / r**0.5) if isinstance(r, int | float) else tuple(r) for r in cfg["aspect_ratios"]
        )
        return cls(
            cfg["min_level"],
            cfg["max_level"],
            cfg["num_scales"],
            ratios,
            float(cfg["anchor_scale"]),
            tuple(cfg["image_size"]),
        )

    @property
    def anchors_per_location(self) -> int:
        return self.num_scales * len(self.aspect_ratios)


def feature_sizes(image_size: tuple[int, int], max_level: int) -> list[tuple[int, int]]:
    """(H, W) of every level 0..max_level, halving with ceil as effdet's ``get_feat_sizes``."""
    sizes = [tuple(image_size)]
    for _ in range(max_level):
        h, w = sizes[-1]
        sizes.append(((h - 1) // 2 + 1, (w - 1) // 2 + 1))
    return sizes


def generate_anchors(cfg: AnchorConfig) -> torch.Tensor:
    """All anchors [N, 4] as yxyx in network-input pixels, in effdet's order (level, y, x, anchor)."""
    sizes = feature_sizes(cfg.image_size, cfg.max_level)
    levels = []
    for level in range(cfg.min_level, cfg.max_level + 1):
        stride_y = sizes[0][0] / float(sizes[level][0])
        stride_x = sizes[0][1] / float(sizes[level][1])
        y = torch.arange(stride_y / 2, cfg.image_size[0], stride_y, dtype=torch.float64)
        x = torch.arange(stride_x / 2, cfg.image_size[1], stride_x, dtype=torch.float64)
        yv, xv = torch.meshgrid(y, x, indexing="ij")
        yv, xv = yv.reshape(-1), xv.reshape(-1)
        per_anchor = []
        for octave in range(cfg.num_scales):
            octave_scale = octave / float(cfg.num_scales)
            for aspect_x, aspect_y in cfg.aspect_ratios:
                half_x = cfg.anchor_scale * stride_x * 2**octave_scale * aspect_x / 2.0
                half_y = cfg.anchor_scale * stride_y * 2**octave_scale * aspect_y / 2.0
                per_anchor.append(torch.stack([yv - half_y, xv - half_x, yv + half_y, xv + half_x], dim=1))
        levels.append(torch.stack(per_anchor, dim=1).reshape(-1, 4))
    return torch.cat(levels).to(torch.float32)


def flatten_levels(outputs: list[torch.Tensor], width: int) -> torch.Tensor:
    """Per-level [B, A*width, h, w] maps -> [B, sum(h*w*A), width] in anchor order."""
    batch = outputs[0].shape[0]
    return torch.cat([o.permute(0, 2, 3, 1).reshape(batch, -1, width) for o in outputs], dim=1)


def decode_boxes(rel_codes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Box regression (ty, tx, th, tw) against yxyx anchors -> xyxy boxes; any leading dims."""
    ycenter_a = (anchors[..., 0] + anchors[..., 2]) / 2
    xcenter_a = (anchors[..., 1] + anchors[..., 3]) / 2
    ha = anchors[..., 2] - anchors[..., 0]
    wa = anchors[..., 3] - anchors[..., 1]
    ty, tx, th, tw = rel_codes.unbind(dim=-1)
    w = torch.exp(tw) * wa
    h = torch.exp(th) * ha
    ycenter = ty * ha + ycenter_a
    xcenter = tx * wa + xcenter_a
    return torch.stack([xcenter - w / 2.0, ycenter - h / 2.0, xcenter + w / 2.0, ycenter + h / 2.0], dim=-1)


def _load_nms() -> None:
    """Register torchvision's C++ operators (``torch.ops.torchvision.nms``) without importing the
    torchvision package: ``import torchvision`` brings its models, datasets and torch._dynamo, about
    2 s of CPU in every serving worker's start, for this one operator. The library is found and
    loaded as torchvision's own ``extension`` module does it; failing that, the package import does."""
    if hasattr(torch.ops.torchvision, "nms"):
        return
    spec = importlib.util.find_spec("torchvision")
    if spec is not None and spec.submodule_search_locations:
        loader = (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES)
        finder = importlib.machinery.FileFinder(spec.submodule_search_locations[0], loader)
        for name in ("_C_stable", "_C"):  # torchvision >= 0.25 ships the stable-ABI build
            found = finder.find_spec(name)
            if found is not None and found.origin:
                try:
                    torch.ops.load_library(found.origin)
                    break
                except OSError:
                    continue
    if not hasattr(torch.ops.torchvision, "nms"):
        import torchvision.ops  # noqa: F401  (registers the operators, or says why it cannot)


_load_nms()


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """torchvision's NMS: indices of the kept boxes, by decreasing score."""
    return torch.ops.torchvision.nms(boxes, scores, float(iou_threshold))


def batched_nms(
    boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """NMS within each group id, one ``nms`` call per group: torchvision's ``batched_nms`` loop."""
    keep = torch.zeros_like(scores, dtype=torch.bool)
    for group in torch.unique(groups):
        members = torch.where(groups == group)[0]
        keep[members[nms(boxes[members], scores[members], iou_threshold)]] = True
    kept = torch.where(keep)[0]
    return kept[scores[kept].sort(descending=True)[1]]


def grouped_nms(
    boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """NMS within each group id, as ``torchvision.ops.batched_nms``, in one ``nms`` call.

    torchvision's own coordinate trick runs only below 1000 boxes on CPU; above, it loops over the
    groups in Python. Here every group is moved into its own band, always: the boxes are shifted
    by integers in float64, ``floor(min)`` down and ``group * span`` along, where ``span`` is the
    integer just above the whole batch's coordinate range, so no two groups can touch and every
    shifted coordinate and width is the exact float32 value (float64 holds them to 2^53). The IoU
    is then computed in float64 from the float32 boxes, where the per-group loop computes it in
    float32: only an IoU within float32 rounding of the threshold could decide differently.
    Kept indices come back sorted by decreasing score, as ``batched_nms`` returns them.
    """
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    if boxes.shape[0] > GROUPED_NMS_MAX_BOXES.get(boxes.device.type, GROUPED_NMS_MAX_BOXES["cuda"]):
        return batched_nms(boxes, scores, groups, iou_threshold)
    wide = boxes.double()
    low = wide.min().floor()
    span = (wide.max() - low).floor() + 2.0
    shifted = wide - low + (groups.to(wide) * span).unsqueeze(1)
    return nms(shifted, scores.double(), iou_threshold)


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p) if p < 1 else math.inf


def detect(
    cls_outputs: list[torch.Tensor],
    box_outputs: list[torch.Tensor],
    anchors: torch.Tensor,
    *,
    num_classes: int,
    max_detection_points: int = 5000,
    max_det_per_image: int = 100,
    iou_threshold: float = 0.5,
    img_scale: torch.Tensor | None = None,
    img_size: torch.Tensor | None = None,
    min_score: float = 0.0,
) -> torch.Tensor:
    """Head outputs of a batch -> detections [B, max_det_per_image, 6] = (x1, y1, x2, y2, score, class).

    ``img_scale`` [B] maps network pixels to image pixels; ``img_size`` [B, 2] is each image's
    (width, height), boxes are clipped to it. Classes are 1-based; empty rows are zeros.
    Computation is in float32 whatever the dtype of the head outputs.

    ``min_score`` drops candidates scoring below it before NMS. A box can only be suppressed by a
    higher-scoring one, so every row scoring >= ``min_score`` is exactly effdet's; with the
    default 0 the whole output is. The handler passes the request's score threshold: NMS, the
    bulk of the CPU time, then works on the few boxes that can be answered.
    """
    cls_all = flatten_levels(cls_outputs, num_classes).float().reshape(cls_outputs[0].shape[0], -1)
    box_all = flatten_levels(box_outputs, 4).float()
    batch = cls_all.shape[0]
    k = min(max_detection_points, cls_all.shape[1])

    # Candidates as flat lists (image, anchor*class index): effdet's per-image top-k, or, when a
    # score floor leaves at most k logits per image above it, exactly those (all of them are in
    # the top-k then, and nothing below the floor is answered), which skips the top-k itself.
    # On CUDA the count would be a host sync: the top-k is cheap there, so it always runs.
    # Exactly tied logits are the exception: NMS keeps the first of two tied boxes in its input
    # order, which for effdet is the top-k's, so then the top-k runs.
    above = cls_all >= _logit(min_score) - 1e-4 if min_score > 0 and cls_all.device.type != "cuda" else None
    image_of = None
    if above is not None and int(above.sum(1).max()) <= k:
        image_of, flat_idx = above.nonzero(as_tuple=True)
        if torch.unique(cls_all[image_of, flat_idx]).numel() < flat_idx.numel():
            image_of = None
    if image_of is None:
        flat_idx = torch.topk(cls_all, k=k, dim=1).indices.reshape(-1)
        image_of = torch.arange(batch, device=cls_all.device).repeat_interleave(k)
    anchor_idx = torch.div(flat_idx, num_classes, rounding_mode="floor")
    classes = flat_idx % num_classes
    scores = cls_all[image_of, flat_idx].sigmoid()
    boxes = decode_boxes(box_all[image_of, anchor_idx], anchors[anchor_idx])  # [N, 4] xyxy, network px
    if img_scale is not None and img_size is not None:
        limit = (img_size.to(boxes) / img_scale.to(boxes).unsqueeze(1)).repeat(1, 2)
        boxes = torch.minimum(boxes.clamp(min=0), limit[image_of])

    groups = image_of * num_classes + classes
    if min_score > 0:
        cand = torch.nonzero(scores >= min_score).squeeze(1)
        keep = cand[grouped_nms(boxes[cand], scores[cand], groups[cand], iou_threshold)]
    else:
        keep = grouped_nms(boxes, scores, groups, iou_threshold)
    # keep is sorted by score over the whole batch; a stable sort by image keeps that order within each.
    keep = keep[torch.sort(image_of[keep], stable=True).indices]
    kept_image = image_of[keep]
    counts = torch.zeros(batch, dtype=torch.int64, device=keep.device)
    counts.scatter_add_(0, kept_image, torch.ones_like(kept_image))
    starts = torch.cumsum(counts, 0) - counts
    # Rank within its image; ranks past max_det_per_image land in one spare column, cut off below
    # (a boolean mask would cost a host sync on CUDA).
    rank = (torch.arange(keep.numel(), device=keep.device) - starts[kept_image]).clamp_(max=max_det_per_image)

    out_boxes = boxes[keep]
    if img_scale is not None:
        out_boxes = out_boxes * img_scale.to(out_boxes)[kept_image].unsqueeze(1)
    rows = torch.cat(
        [out_boxes, scores[keep, None], (classes[keep, None] + 1).to(out_boxes)],
        dim=1,
    )
    detections = box_all.new_zeros((batch, max_det_per_image + 1, 6))
    detections[kept_image, rank] = rows
    return detections[:, :max_det_per_image]
