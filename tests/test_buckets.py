"""Batches padded up to a few sizes: every batch size answers as its images alone, padding never answers.

The handler pads each batch to the smallest of a few bucket sizes (``bucket_sizes``) and warms
each bucket at start, so that no batch size TorchServe forms makes TorchScript profile again while
requests wait. Here the fixture model serves batches of every size 1..6 of real JPEGs (buckets
1, 2, 3, 4, 6: a batch of 5 runs padded to 6).
"""

from __future__ import annotations

import time

import pytest
import torch

from handler.detector import Detector, bucket_sizes
from handler.geometry import letterbox_batch
from handler.warmup import MIB, Cost, MemoryGauge, estimate, stop_before
from tests.helpers import count_matched

MAX_BATCH = 6


def test_bucket_sizes():
    assert bucket_sizes(32) == (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
    assert bucket_sizes(1) == (1,)
    assert bucket_sizes(5) == (1, 2, 3, 4, 5)
    assert bucket_sizes(20) == (1, 2, 3, 4, 6, 8, 12, 16, 20)
    for n in range(1, 65):  # never more than a third padding above 4
        b = bucket_sizes(64)
        assert next(x for x in b if x >= n) <= max(4, n * 3 // 2 + 1)
    with pytest.raises(ValueError):
        bucket_sizes(0)


@pytest.fixture(scope="module")
def padded(exported) -> Detector:
    return Detector(exported / "model.pt", buckets=bucket_sizes(MAX_BATCH))


@pytest.fixture(scope="module")
def plain(exported, padded) -> Detector:
    """The same network without padding (one TorchScript module for both: each batch shape is
    profiled and optimised once)."""
    det = Detector(exported / "model.pt")
    det.model = padded.model
    return det


@pytest.fixture(scope="module")
def images(val_images, padded) -> list[torch.Tensor]:
    return [padded.decode(d) for d in (val_images * 2)[:MAX_BATCH]]


def _spy(det: Detector, monkeypatch) -> dict:
    """Record the batch the network sees and the rows the post-processing gets."""
    seen = {"forward": [], "post": []}
    forward, post = det.forward, det.postprocess

    def spy_forward(batch):
        seen["forward"].append(batch.shape[0])
        return forward(batch)

    def spy_post(cls_out, *a, **kw):
        seen["post"].append(cls_out[0].shape[0])
        return post(cls_out, *a, **kw)

    monkeypatch.setattr(det, "forward", spy_forward)
    monkeypatch.setattr(det, "postprocess", spy_post)
    return seen


def alike(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Two detection tensors of one image agree: same count, and at least 95 % of the rows matched one
    to one (same class, score within 2e-5, box within 0.05 px). The fixture model, trained for three
    steps, gives many exactly tied scores, which NMS may order either way; another image matches nothing."""
    g, w = got[got[:, 4] > 0].tolist(), want[want[:, 4] > 0].tolist()
    if len(g) != len(w) or not g:
        return False

    def same(p, q):
        box = max(abs(a - b) for a, b in zip(p[:4], q[:4], strict=True))
        return p[5] == q[5] and abs(p[4] - q[4]) <= 2e-5 and box <= 0.05

    return count_matched(g, w, same) >= 0.95 * len(g)


def test_every_batch_size_answers_as_its_images_alone(padded, plain, images, monkeypatch):
    """A batch of n runs as bucket(n) rows: the network's outputs for its n images are bit for bit
    those of an unpadded batch of that size, padding is cut off before the post-processing, and
    every image is answered exactly as in a batch of that size of its own copies (so padding and
    batch-mates change nothing), and close to its answer alone (a batch of one rounds differently
    in the last bits)."""
    alone = [plain.detect_tensors([img], score_threshold=0.0)[0] for img in images]
    assert not alike(alone[0], alone[1])  # the comparison tells images apart
    own: dict[tuple[int, int], torch.Tensor] = {}
    seen = _spy(padded, monkeypatch)
    for n in range(1, MAX_BATCH + 1):
        got = padded.detect_tensors(images[:n], score_threshold=0.0)
        rows = padded.bucket(n)
        assert seen["forward"][-1] == rows and seen["post"][-1] == n
        assert got.shape == (n, padded.max_det_per_image, 6)
        for i in range(n):
            if (i, rows) not in own:
                own[i, rows] = plain.detect_tensors([images[i]] * rows, score_threshold=0.0)[0]
            assert torch.equal(got[i], own[i, rows]), f"batch of {n}, image {i}"
            assert alike(got[i], alone[i]), f"batch of {n}, image {i}"
        # the real rows at the network: identical to the same images filling the bucket unpadded
        x, _, _ = padded.preprocess(images[:n])
        y, _, _ = plain.preprocess((images * 2)[:rows])
        assert torch.equal(x[:n], y[:n]) and (x[n:] == 0).all()
        for _ in range(3):  # past TorchScript's profiling runs for this shape
            heads_x, heads_y = plain.forward(x), plain.forward(y)
        for a, b in zip([*heads_x[0], *heads_x[1]], [*heads_y[0], *heads_y[1]], strict=True):
            assert torch.equal(a[:n], b[:n])
    assert set(seen["forward"]) == set(padded.buckets)


def test_network_output_depends_on_the_batch_size_only(plain, images):
    """An image's head outputs in a batch of b are the same bits whatever its batch-mates and its
    place in the batch: what lets served answers be compared exactly with in-process ones
    (tests.helpers.Reference: one in-process answer per bucket size)."""
    x0 = images[0]
    for b in (2, 3, 4):
        own = plain.forward(plain.preprocess([x0] * b)[0])
        for place in range(b):
            batch = [images[(place + j + 1) % len(images)] for j in range(b)]
            batch[place] = x0
            heads = plain.forward(plain.preprocess(batch)[0])
            for a, c in zip([*own[0], *own[1]], [*heads[0], *heads[1]], strict=True):
                assert torch.equal(a[0], c[place]), (b, place)


def test_padding_rows_never_answer(padded, images):
    """Padding rows are zeros at the network input and their head outputs never reach an answer:
    a padded batch's answers are exactly as many as its images."""
    batch, img_scale, img_size = padded.preprocess(images[:5])
    assert batch.shape[0] == 6 and img_scale.shape == (5,) and img_size.shape == (5, 2)
    assert (batch[5] == 0).all()
    want, _ = letterbox_batch(images[:5], padded.geometry)
    assert torch.equal(batch[:5], want)
    answers = padded.predict(images[:5], score_threshold=0.0)
    assert len(answers) == 5 and all(a["detections"] for a in answers)


def test_warm_up_runs_every_bucket_and_serving_sees_no_new_shape(padded, images, monkeypatch):
    seen = _spy(padded, monkeypatch)
    padded.warm_up()
    assert sorted(set(seen["forward"])) == list(padded.buckets) and len(seen["forward"]) == 2 * len(
        padded.buckets
    )
    seen["forward"].clear()
    for n in range(1, MAX_BATCH + 1):
        padded.detect_tensors(images[:n])
    assert set(seen["forward"]) <= set(padded.buckets)


def test_channels_last_on_the_cpu_answers_alike(exported, plain, images):
    """channels_last (on by default on CUDA only) is the same network: close answers on the CPU."""
    cl = Detector(exported / "model.pt", channels_last=True, buckets=(4,))
    batch, _, _ = cl.preprocess(images[:3])
    assert batch.is_contiguous(memory_format=torch.channels_last)
    got = cl.detect_tensors(images[:3], score_threshold=0.0)
    want = plain.detect_tensors(images[:3], score_threshold=0.0)
    for i in range(3):
        assert alike(got[i], want[i])


# -- warm-up within a budget -------------------------------------------------------------------------
def test_warm_up_estimates():
    """Time scales with the batch from the last bucket; memory grows by the last two buckets' bytes
    per image (scaled from the first alone); the smallest bucket is always warmed."""
    one = [Cost(1, 2.0, 100)]
    assert estimate(one, 2) == (4.0, 200)
    two = [Cost(1, 2.0, 100), Cost(2, 3.0, 130)]
    assert estimate(two, 4) == (6.0, 190)  # 130 + 30 per image x 2
    assert estimate([Cost(1, 1.0), Cost(2, 2.0)], 3) == (3.0, None)
    assert stop_before([], 256, 0.0, 0.001, 0, 0) is None
    assert stop_before(two, 4, 1.0, 10.0, 10_000, 0) is None
    why = stop_before(two, 4, 5.0, 10.0, None, None)
    assert why == "it would take ~6.0 s after 5.0 s of the 10 s warm-up budget"
    why = stop_before(two, 4, 0.0, 100.0, 300 * MIB, 0)
    assert why is None  # 190 bytes
    many = [Cost(1, 0.1, 400 * MIB), Cost(2, 0.2, 600 * MIB)]  # 200 MiB per image: ~1000 MiB at 4
    assert stop_before(many, 4, 0.0, 100.0, 2000 * MIB, 100 * MIB) is None  # 900 MiB more <= 1000
    assert stop_before(many, 4, 0.0, 100.0, 1600 * MIB, 100 * MIB) == (
        "it would need ~900 MiB more, above 50% of the 1600 MiB free"
    )


def test_warm_up_stops_at_its_budget_and_serves_larger_batches_in_chunks(
    exported, plain, images, monkeypatch
):
    """A budget too short for more than the smallest bucket: warming stops there (the batch that
    once made a worker warm forever), the unwarmed buckets are dropped, and a batch of 5 runs as
    forwards of the one warmed size only, with the answers of an unchunked batch."""
    det = Detector(exported / "model.pt", buckets=bucket_sizes(MAX_BATCH))
    t0 = time.perf_counter()
    result = det.warm_up(budget_s=1e-6)
    took = time.perf_counter() - t0
    assert result.warmed == (1,) and result.skipped == bucket_sizes(MAX_BATCH)[1:]
    assert "warm-up budget" in result.reason and took < 60, (result, took)
    assert str(result).endswith("Batches above 1 run in chunks of 1")
    assert det.buckets == (1,) and det.max_rows == 1
    seen = _spy(det, monkeypatch)
    got = det.detect_tensors(images[:5], [plain.defaults.iou_threshold] * 5, [0.0] * 5)
    assert seen["forward"] == [1] * 5 and got.shape == (5, det.max_det_per_image, 6)
    want = plain.detect_tensors(images[:5], score_threshold=0.0)
    for i in range(5):
        assert alike(got[i], want[i]), i


def test_warm_up_within_budget_warms_everything(padded):
    result = padded.warm_up(budget_s=600)
    assert result.warmed == padded.buckets and not result.skipped and padded.max_rows is None
    assert str(result).startswith(f"warmed batch buckets {','.join(map(str, bucket_sizes(MAX_BATCH)))} in ")


def test_memory_gauge_sees_a_peak():
    """The CPU gauge reads this process's peak above its start (VmHWM, reset per bucket) and the
    memory free: a 256 MiB tensor made and dropped in a bucket shows as that bucket's peak."""
    gauge = MemoryGauge(torch.device("cpu"))
    gauge.begin_bucket()
    x = torch.ones(64 * MIB, dtype=torch.float32)  # 256 MiB, touched
    del x
    assert 200 * MIB < gauge.peak() < 2000 * MIB
    assert gauge.held() < 200 * MIB
    assert gauge.free() > 0
    gauge.begin_bucket()
    assert gauge.peak() < 200 * MIB  # the next bucket starts from what the process holds now
