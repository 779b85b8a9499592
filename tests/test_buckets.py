"""Batches padded up to a few sizes: every batch size answers as its images alone, padding never answers.

The handler pads each batch to the smallest of a few bucket sizes (``bucket_sizes``) and warms
each bucket at start, so that no batch size TorchServe forms makes TorchScript profile again while
requests wait. Here the fixture model serves batches of every size 1..6 of real JPEGs (buckets
1, 2, 3, 4, 6: a batch of 5 runs padded to 6).
"""

from __future__ import annotations

import pytest
import torch

from handler.detector import Detector, bucket_sizes
from handler.geometry import letterbox_batch
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
