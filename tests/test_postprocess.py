"""Golden parity: ``handler.postprocess`` against effdet's own ``DetBenchPredict``.

Small random-weight EfficientDets (mobilenetv3 backbone, 32 FPN channels, one repeat) are built
for two input sizes (256x256, 128x384) and for 1 and 20 classes. Their head biases and weights
are perturbed so that scores spread out and NMS has real work to do. Each model runs forward once
on a batch of 8 random images; batches of 1, 3 and 8 are slices of that batch. effdet's
post-processing runs unchanged inside a real ``DetBenchPredict`` whose ``model`` replays the
recorded head outputs (one test also runs the whole bench on the real model end to end), and
``handler.postprocess.detect`` runs on the same outputs. Boxes, scores, classes and their order
must agree.
"""

from __future__ import annotations

import effdet
import pytest
import torch
from effdet import DetBenchPredict, EfficientDet
from effdet.anchors import Anchors
from omegaconf import OmegaConf
from torchvision.ops import box_iou

from handler import postprocess
from handler.postprocess import AnchorConfig, detect, feature_sizes, generate_anchors, grouped_nms
from scripts.bench.workload import spread_heads

BOX_ATOL = 1e-3  # px, fp32
MAX_BATCH = 8


def small_config(num_classes: int, image_size: tuple[int, int], **overrides):
    cfg = effdet.get_efficientdet_config("efficientdet_d0")
    cfg.backbone_name = "mobilenetv3_large_100"
    cfg.fpn_channels = 32
    cfg.fpn_cell_repeats = 1
    cfg.box_class_repeats = 1
    cfg.num_classes = num_classes
    cfg.image_size = image_size
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def build_model(cfg, seed: int) -> EfficientDet:
    """Random weights whose scores spread (many classes and scores in the top-k, boxes off their
    anchors so NMS sees a mix of overlaps): the bench's own ``spread_heads``."""
    torch.manual_seed(seed)
    model = EfficientDet(cfg, pretrained_backbone=False).eval()
    spread_heads(model, seed)
    return model


class Replay(torch.nn.Module):
    """Stands in for EfficientDet inside DetBenchPredict: returns recorded head outputs."""

    def __init__(self, config, cls_out, box_out):
        super().__init__()
        self.config = config
        self.cls_out, self.box_out = cls_out, box_out

    def forward(self, x):
        assert x.shape[0] == self.cls_out[0].shape[0]
        return self.cls_out, self.box_out


def img_info(batch: int, image_size: tuple[int, int], seed: int) -> dict[str, torch.Tensor]:
    """Per-image img_scale and img_size (w, h) as the letterbox of images of random sizes gives.

    Each image fills the network input along one side and 60-100 % of it along the other, so
    some boxes are clipped to the image and most are not.
    """
    g = torch.Generator().manual_seed(seed)
    h_net, w_net = image_size
    scales, sizes = [], []
    for i in range(batch):
        scale = 0.5 + 3.0 * float(torch.rand(1, generator=g))  # network px -> image px
        short = 0.6 + 0.4 * float(torch.rand(1, generator=g))
        fill_h, fill_w = (1.0, short) if i % 2 else (short, 1.0)
        w, h = round(w_net * fill_w * scale), round(h_net * fill_h * scale)
        scales.append(max(h / h_net, w / w_net))
        sizes.append((w, h))
    return {"img_scale": torch.tensor(scales), "img_size": torch.tensor(sizes, dtype=torch.float32)}


CASES = [((256, 256), 1), ((256, 256), 20), ((128, 384), 1), ((128, 384), 20)]


@pytest.fixture(scope="module", params=CASES, ids=[f"{h}x{w}-{c}cls" for (h, w), c in CASES])
def recorded(request):
    """(cfg, head outputs of a batch of 8 random images) for one model."""
    (image_size, num_classes) = request.param
    cfg = small_config(num_classes, image_size)
    model = build_model(cfg, seed=num_classes * 1000 + image_size[0])
    x = torch.randn(MAX_BATCH, 3, *image_size, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        cls_out, box_out = model(x)
    return cfg, cls_out, box_out


def effdet_predict(cfg, cls_out, box_out, info):
    bench = DetBenchPredict(Replay(cfg, cls_out, box_out)).eval()
    x = torch.zeros(cls_out[0].shape[0], 1)  # only its batch size is read
    with torch.no_grad():
        return bench(x, img_info=info)


def ours(cfg, cls_out, box_out, info, **kw):
    anchors = generate_anchors(AnchorConfig.from_effdet_config(OmegaConf.to_container(cfg)))
    kw.setdefault("max_detection_points", cfg.max_detection_points)
    kw.setdefault("iou_threshold", 0.5)  # effdet's fixed value
    with torch.no_grad():
        return detect(
            cls_out,
            box_out,
            anchors,
            num_classes=cfg.num_classes,
            max_det_per_image=cfg.max_det_per_image,
            img_scale=None if info is None else info["img_scale"],
            img_size=None if info is None else info["img_size"],
            **kw,
        )


def untie(d: torch.Tensor) -> torch.Tensor:
    """Rows in score order, with runs of exactly equal scores put in (class, x1, y1) order.

    Both effdet and torchvision sort scores with an unstable sort, so detections whose fp32 scores
    tie exactly may come out in either order; everything else must match row for row.
    """
    rows = d.tolist()
    out, start = [], 0
    for end in range(1, len(rows) + 1):
        if end == len(rows) or rows[end][4] != rows[start][4]:
            out.extend(sorted(rows[start:end], key=lambda r: (r[5], r[0], r[1])))
            start = end
    return torch.tensor(out, dtype=d.dtype).reshape(-1, 6)


def assert_same(got: torch.Tensor, want: torch.Tensor):
    assert got.shape == want.shape
    assert got.dtype == torch.float32
    for i in range(want.shape[0]):
        g, w = got[i], want[i]
        n = int((w[:, 4] > 0).sum())
        assert int((g[:, 4] > 0).sum()) == n, f"image {i}: detection count"
        assert n > 0
        assert (g[1:, 4] <= g[:-1, 4]).all(), f"image {i}: not sorted by score"
        g, w = untie(g), untie(w)
        torch.testing.assert_close(g[:, 5], w[:, 5], atol=0, rtol=0, msg=f"image {i}: classes/order")
        torch.testing.assert_close(g[:, 4], w[:, 4], atol=1e-6, rtol=0, msg=f"image {i}: scores")
        assert (g[:, :4] - w[:, :4]).abs().max().item() <= BOX_ATOL, f"image {i}: boxes"


def assert_nms_did_work(cfg, cls_out, dets: torch.Tensor):
    """The result is not just the raw top-k: NMS suppressed something, and the kept boxes of one
    class overlap each other at IoU <= 0.5 (the threshold)."""
    flat = torch.cat([c.permute(0, 2, 3, 1).reshape(c.shape[0], -1) for c in cls_out], 1)
    raw_top = flat.topk(cfg.max_det_per_image, dim=1).values.sigmoid()
    suppressed = 0
    for i in range(dets.shape[0]):
        d = dets[i][dets[i, :, 4] > 0]
        suppressed += int(not torch.allclose(d[:, 4], raw_top[i, : d.shape[0]]))
        for c in d[:, 5].unique():
            b = d[d[:, 5] == c, :4]
            iou = box_iou(b, b).fill_diagonal_(0).nan_to_num(0.0)  # degenerate clipped boxes
            assert iou.max() <= 0.5 + 1e-5
    assert suppressed > 0


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_detect_equals_detbenchpredict(recorded, batch):
    cfg, cls_out, box_out = recorded
    cls_b, box_b = [c[:batch] for c in cls_out], [b[:batch] for b in box_out]
    info = img_info(batch, cfg.image_size, seed=batch)
    want = effdet_predict(cfg, cls_b, box_b, info)
    got = ours(cfg, cls_b, box_b, info)
    assert want.shape == (batch, cfg.max_det_per_image, 6)
    assert_same(got, want)
    assert_nms_did_work(cfg, cls_b, want)
    # scores are sorted within each image, classes are 1-based, boxes are clipped to each image
    for i in range(batch):
        d = got[i][got[i, :, 4] > 0]
        assert (d[1:, 4] <= d[:-1, 4]).all()
        assert d[:, 5].min() >= 1 and d[:, 5].max() <= cfg.num_classes
        w, h = info["img_size"][i].tolist()
        assert d[:, [0, 2]].max() <= w + 1e-3 and d[:, [1, 3]].max() <= h + 1e-3
        assert d[:, :4].min() >= 0


def test_detect_without_img_info(recorded):
    cfg, cls_out, box_out = recorded
    cls_b, box_b = [c[:3] for c in cls_out], [b[:3] for b in box_out]
    want = effdet_predict(cfg, cls_b, box_b, None)
    assert_same(ours(cfg, cls_b, box_b, None), want)


def test_end_to_end_real_bench():
    """The whole DetBenchPredict on the real model vs our detect on the model's own outputs."""
    cfg = small_config(5, (128, 256))
    model = build_model(cfg, seed=5)
    x = torch.randn(2, 3, 128, 256, generator=torch.Generator().manual_seed(3))
    info = img_info(2, cfg.image_size, seed=4)
    with torch.no_grad():
        want = DetBenchPredict(model).eval()(x, img_info=info)
        cls_out, box_out = model(x)
    assert_same(ours(cfg, cls_out, box_out, info), want)


@pytest.mark.parametrize("image_size", [(256, 256), (384, 256), (256, 640), (128, 128)])
@pytest.mark.parametrize("levels", [(3, 7), (2, 6)])
def test_generate_anchors_equals_effdet(image_size, levels):
    cfg = small_config(3, image_size, min_level=levels[0], max_level=levels[1], num_levels=5)
    want = Anchors.from_config(cfg).boxes
    got = generate_anchors(AnchorConfig.from_effdet_config(OmegaConf.to_container(cfg)))
    assert got.dtype == want.dtype == torch.float32
    assert got.shape == want.shape
    assert torch.equal(got, want)


def test_generate_anchors_other_scales_and_ratios():
    cfg = small_config(3, (256, 384), num_scales=2, aspect_ratios=[(1.0, 1.0), (2.0, 0.5)], anchor_scale=3.0)
    want = Anchors.from_config(cfg).boxes
    got = generate_anchors(AnchorConfig.from_effdet_config(OmegaConf.to_container(cfg)))
    assert torch.equal(got, want)


def test_scalar_aspect_ratios_as_effdet():
    """effdet also accepts a plain number r for an aspect ratio: (sqrt(r), 1/sqrt(r))."""
    cfg = small_config(3, (256, 256), aspect_ratios=[1.0, 2.0, 0.5])
    want = Anchors.from_config(cfg).boxes
    got = generate_anchors(AnchorConfig.from_effdet_config(OmegaConf.to_container(cfg)))
    assert torch.equal(got, want)


def test_feature_sizes_match_effdet():
    from effdet.anchors import get_feat_sizes

    for size in [(256, 256), (384, 256), (640, 384), (100, 37)]:
        assert feature_sizes(size, 7) == [tuple(s) for s in get_feat_sizes(size, 7)]


def test_max_detection_points_above_candidates_is_clamped():
    """128x128 with 1 class has 3069 anchor-class candidates, fewer than the default 5000:
    effdet's top-k fails there, ours clamps k and equals effdet run with k = all candidates."""
    cfg = small_config(1, (128, 128))
    num_candidates = sum(h * w for h, w in feature_sizes((128, 128), 7)[3:8]) * 9
    assert num_candidates == 3069 and cfg.max_detection_points == 5000
    model = build_model(cfg, seed=12)
    x = torch.randn(3, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    info = img_info(3, cfg.image_size, seed=2)
    with torch.no_grad():
        cls_out, box_out = model(x)
        with pytest.raises(RuntimeError):  # effdet itself cannot
            DetBenchPredict(Replay(cfg, cls_out, box_out))(x, img_info=info)
    full = small_config(1, (128, 128), max_detection_points=num_candidates)
    want = effdet_predict(full, cls_out, box_out, info)
    got = ours(cfg, cls_out, box_out, info)
    assert_same(got, want)
    # a k below the candidate count follows effdet's top-k exactly, and really changes the answer
    part = small_config(1, (128, 128), max_detection_points=120)
    few = ours(part, cls_out, box_out, info)
    assert_same(few, effdet_predict(part, cls_out, box_out, info))
    assert (few[:, :, 4] > 0).sum() < (got[:, :, 4] > 0).sum()


def test_fewer_detections_than_max_det_pads_with_zeros():
    """Few candidates (k=20) leave rows empty; they are zero, as effdet pads them."""
    cfg = small_config(4, (128, 128), max_detection_points=20)
    model = build_model(cfg, seed=13)
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(5))
    info = img_info(2, cfg.image_size, seed=6)
    with torch.no_grad():
        cls_out, box_out = model(x)
    want = effdet_predict(cfg, cls_out, box_out, info)
    got = ours(cfg, cls_out, box_out, info)
    assert_same(got, want)
    assert (got[:, 20:] == 0).all() and (got[:, :, 4] > 0).sum(1).max() <= 20


def test_iou_threshold_is_used():
    """A lower IoU threshold than effdet's fixed 0.5 keeps fewer boxes; 1.0 keeps every candidate."""
    cfg = small_config(1, (128, 128), max_detection_points=300, max_det_per_image=300)
    model = build_model(cfg, seed=14)
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        cls_out, box_out = model(x)
    counts = {}
    for iou in (0.2, 0.5, 1.0):
        d = ours(cfg, cls_out, box_out, None, iou_threshold=iou)[0]
        counts[iou] = int((d[:, 4] > 0).sum())
    assert counts[0.2] < counts[0.5] < counts[1.0] == 300


@pytest.mark.parametrize("floor", ["median", "tiny"])
def test_min_score_keeps_every_row_above_it_exactly(recorded, floor):
    """Dropping candidates below ``min_score`` before NMS changes no row at or above it: with a
    floor that leaves fewer than max_detection_points logits per image (no top-k at all), and with
    one so low that the top-k path runs."""
    cfg, cls_out, box_out = recorded
    info = img_info(MAX_BATCH, cfg.image_size, seed=11)
    want = effdet_predict(cfg, cls_out, box_out, info)
    scores = want[..., 4][want[..., 4] > 0]
    # median: about half of effdet's rows survive it; tiny: every logit is above it
    threshold = float(scores.median()) if floor == "median" else 1e-12
    got = ours(cfg, cls_out, box_out, info, min_score=threshold)
    for i in range(MAX_BATCH):
        w = want[i][want[i, :, 4] >= threshold]
        g = got[i][got[i, :, 4] > 0]
        assert g.shape[0] == w.shape[0] > 0 and (g[:, 4] >= threshold).all()
        g, w = untie(g), untie(w)
        torch.testing.assert_close(g[:, 4:], w[:, 4:], atol=1e-6, rtol=0)
        assert (g[:, :4] - w[:, :4]).abs().max().item() <= BOX_ATOL


# -- one NMS call over every (image, class) group ---------------------------------------------------


def _dense_boxes(n: int, groups: int, seed: int, low: float = -50.0):
    """Overlapping boxes (many IoUs near the threshold), some with negative coordinates."""
    g = torch.Generator().manual_seed(seed)
    xy = low + torch.rand(n, 2, generator=g) * 100
    wh = 20 + torch.rand(n, 2, generator=g) * 60
    return (
        torch.cat([xy, xy + wh], 1),
        torch.rand(n, generator=g),
        torch.randint(0, groups, (n,), generator=g),
    )


@pytest.mark.parametrize("low", [-50.0, 0.0, 1000.5])
def test_grouped_nms_equals_per_group_nms(low):
    """Same kept set and order as torchvision's per-group loop; groups never suppress each other,
    even with coordinates below zero or far from it."""
    from torchvision.ops.boxes import _batched_nms_vanilla

    boxes, scores, groups = _dense_boxes(3000, 8, seed=int(low) + 60, low=low)
    want = _batched_nms_vanilla(boxes, scores, groups, 0.5)
    got = grouped_nms(boxes, scores, groups, 0.5)
    assert torch.equal(got, want)
    assert 0 < got.numel() < boxes.shape[0] // 2  # NMS suppressed most of the dense boxes
    # the same boxes in one group suppress far more: groups really are kept apart
    assert grouped_nms(boxes, scores, torch.zeros_like(groups), 0.5).numel() < got.numel()


@pytest.mark.parametrize("low", [-50.0, 1000.5])
def test_nms_and_per_group_fallback_equal_torchvisions(low):
    """The handler loads torchvision's NMS operator without the torchvision package and loops over
    groups itself above GROUPED_NMS_MAX_BOXES: both give torchvision's own kept indices, in order
    (a wrong operator, a lost sort or a group leaking into another would differ)."""
    from torchvision.ops import nms as tv_nms
    from torchvision.ops.boxes import _batched_nms_vanilla

    boxes, scores, groups = _dense_boxes(3000, 8, seed=int(low) + 7, low=low)
    assert torch.equal(postprocess.nms(boxes, scores, 0.5), tv_nms(boxes, scores, 0.5))
    want = _batched_nms_vanilla(boxes, scores, groups, 0.5)
    assert torch.equal(postprocess.batched_nms(boxes, scores, groups, 0.5), want)
    assert 0 < want.numel() < boxes.shape[0] // 2


def test_grouped_nms_empty_and_one_box():
    assert grouped_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5).numel() == 0
    one = grouped_nms(torch.tensor([[1.0, 1.0, 2.0, 2.0]]), torch.tensor([0.3]), torch.tensor([7]), 0.5)
    assert one.tolist() == [0]


@pytest.fixture(scope="module")
def batch32():
    """Head outputs of 32 random images through a 20-class model (many candidates and classes)."""
    cfg = small_config(20, (128, 128), max_detection_points=400)
    model = build_model(cfg, seed=32)
    x = torch.randn(32, 3, 128, 128, generator=torch.Generator().manual_seed(32))
    with torch.no_grad():
        cls_out, box_out = model(x)
    return cfg, cls_out, box_out, img_info(32, cfg.image_size, seed=32)


def test_batch_32_one_nms_call_equals_detbenchpredict(batch32, monkeypatch):
    """32 x 400 = 12800 candidates, above torchvision's coordinate-trick limit: forced through the
    single grouped call, every row is still effdet's."""
    cfg, cls_out, box_out, info = batch32
    monkeypatch.setitem(postprocess.GROUPED_NMS_MAX_BOXES, "cpu", 10**9)
    calls = []
    monkeypatch.setattr(postprocess, "batched_nms", lambda *a: calls.append(a))  # must not be reached
    want = effdet_predict(cfg, cls_out, box_out, info)
    got = ours(cfg, cls_out, box_out, info)
    assert not calls
    assert_same(got, want)
    assert_nms_did_work(cfg, cls_out, want)


def test_batch_32_per_group_fallback_equals_detbenchpredict(batch32, monkeypatch):
    """Without a score floor 12800 candidates take the per-group loop (above GROUPED_NMS_MAX_BOXES):
    every row is still effdet's."""
    cfg, cls_out, box_out, info = batch32
    calls, real = [], postprocess.batched_nms
    monkeypatch.setattr(postprocess, "batched_nms", lambda *a: calls.append(a) or real(*a))
    want = effdet_predict(cfg, cls_out, box_out, info)
    got = ours(cfg, cls_out, box_out, info)
    assert calls
    assert_same(got, want)


def test_batch_32_at_a_served_threshold_equals_detbenchpredict(batch32, monkeypatch):
    """With a score floor (as the handler runs) the rows above it are effdet's, from one NMS call."""
    cfg, cls_out, box_out, info = batch32
    monkeypatch.setattr(postprocess, "batched_nms", lambda *a: pytest.fail("per-group fallback used"))
    want = effdet_predict(cfg, cls_out, box_out, info)
    threshold = float(want[..., 4][want[..., 4] > 0].quantile(0.7))
    got = ours(cfg, cls_out, box_out, info, min_score=threshold)
    compared = 0
    for i in range(32):
        w = want[i][want[i, :, 4] >= threshold]
        g = got[i][got[i, :, 4] > 0]
        assert g.shape[0] == w.shape[0]
        g, w = untie(g), untie(w)
        torch.testing.assert_close(g[:, 4:], w[:, 4:], atol=1e-6, rtol=0)
        if w.shape[0]:
            assert (g[:, :4] - w[:, :4]).abs().max().item() <= BOX_ATOL
        compared += w.shape[0]
    assert compared > 32 * 10  # the comparison was not vacuous


# -- exact ties: a trained detector's regime --------------------------------------------------------
TIE_CASES = [(1, 300), (3, 300), (20, 400)]


@pytest.fixture(scope="module", params=TIE_CASES, ids=[f"{c}cls-k{k}" for c, k in TIE_CASES])
def tied(request):
    """(cfg, head outputs of 8 images) whose class logits are rounded to steps of 0.25: long runs of
    exactly equal scores, as a model with a prior-initialised head or saturated scores gives, with a
    run across the top-k cut (``max_detection_points``) of every image and across the
    ``max_det_per_image`` cut after NMS of some."""
    num_classes, k = request.param
    cfg = small_config(num_classes, (128, 128), max_detection_points=k)
    model = build_model(cfg, seed=40 + num_classes)
    x = torch.randn(MAX_BATCH, 3, 128, 128, generator=torch.Generator().manual_seed(41))
    with torch.no_grad():
        cls_out, box_out = model(x)
    cls_out = [torch.round(c * 4) / 4 for c in cls_out]
    flat = torch.cat([c.permute(0, 2, 3, 1).reshape(MAX_BATCH, -1) for c in cls_out], 1)
    top = flat.sort(dim=1, descending=True).values
    assert (top[:, k - 1] == top[:, k]).all(), "the top-k cut falls between two different scores"
    return cfg, cls_out, box_out


@pytest.mark.parametrize("batch", [1, 8])
def test_exact_ties_at_the_cuts_equal_detbenchpredict(tied, batch):
    """Which of several exactly tied candidates enter the top-k, survive NMS and make the
    max_det_per_image cut is what effdet decides, row for row (the order within a run of equal
    scores aside). Caught: a top-k or NMS that breaks ties otherwise (a flatten order, a sort, the
    one-call NMS over every group) and so answers other boxes than effdet."""
    cfg, cls_out, box_out = tied
    cls_b, box_b = [c[:batch] for c in cls_out], [b[:batch] for b in box_out]
    info = img_info(batch, cfg.image_size, seed=batch + 40)
    want = effdet_predict(cfg, cls_b, box_b, info)
    got = ours(cfg, cls_b, box_b, info)
    assert_same(got, want)
    scores = want[..., 4]
    assert ((scores[:, 1:] == scores[:, :-1]) & (scores[:, 1:] > 0)).any(), "no tied rows in the answers"
    assert ((scores > 0).sum(1) == cfg.max_det_per_image).any(), "no answer reached max_det_per_image"


def test_exact_ties_at_a_served_threshold_equal_detbenchpredict(tied):
    """The handler's path (a score floor before NMS) on tied scores: every row at or above the floor
    is effdet's, the floor itself on a tied score."""
    cfg, cls_out, box_out = tied
    info = img_info(MAX_BATCH, cfg.image_size, seed=44)
    want = effdet_predict(cfg, cls_out, box_out, info)
    levels = want[..., 4][want[..., 4] > 0].unique()
    threshold = float(levels[len(levels) // 2])  # a score many rows share
    got = ours(cfg, cls_out, box_out, info, min_score=threshold)
    compared = 0
    for i in range(MAX_BATCH):
        w = want[i][want[i, :, 4] >= threshold]
        g = got[i][got[i, :, 4] > 0]
        assert g.shape[0] == w.shape[0], f"image {i}"
        g, w = untie(g), untie(w)
        torch.testing.assert_close(g[:, 4:], w[:, 4:], atol=0, rtol=0)
        if w.shape[0]:
            assert (g[:, :4] - w[:, :4]).abs().max().item() <= BOX_ATOL
        compared += w.shape[0]
    assert compared > MAX_BATCH
