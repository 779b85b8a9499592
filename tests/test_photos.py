"""Photos decoded at the size the network needs: the network input stays that of a full decode, the
geometry that of the image as sent, training's validation sees what serving sees, and a served
worker's memory follows the network's input, not the photo.

The photos are synthetic scenes at camera sizes with sensor-like grain (``train.synthetic.as_photo``),
so that they carry fine detail where a reduced decode could alias; the reference is the same image
decoded whole and resized by the same code (``handler.geometry.fit_pixels``).
"""

from __future__ import annotations

import dataclasses
import io
import random
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
import torch
from PIL import Image, ImageOps

from handler.decode import (
    Decoded,
    dct_scale,
    decode_image,
    decode_images,
    needed_size,
    reduction,
)
from handler.detector import Detector
from handler.geometry import Geometry, fit_pixels, letterbox, letterbox_batch
from tests.helpers import close_detections, count_matched
from train.data import Record
from train.datamodule import DetectionDataset
from train.synthetic import as_photo, make_image

# What a reduced decode may differ from a full one by, in grey levels of the letterboxed uint8
# network input (measured on these photos: mean <= 0.25 and max <= 6 at every size, orientation and
# network size here; a reduced rendition resized as if it had no partial last pixel is off by a
# mean of 0.8 and a max of 38, one whose geometry came from its pixels fails the shapes).
MEAN_BOUND = 0.35
MAX_BOUND = 10
MIB = 2**20


def encode(img: Image.Image, fmt: str = "JPEG", orientation: int = 1, **kwargs) -> bytes:
    buf = io.BytesIO()
    if orientation != 1:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif.tobytes()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}) | kwargs)
    return buf.getvalue()


def scene(seed: int) -> Image.Image:
    return make_image(random.Random(seed))[0]


def photo(size: tuple[int, int], seed: int = 0) -> Image.Image:
    return as_photo(scene(seed), size, seed=seed)


def errors(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    assert got.shape == want.shape and got.dtype == want.dtype == torch.uint8
    e = (got.int() - want.int()).abs().float()
    return float(e.mean()), float(e.max())


def against_full(data: bytes, fit: tuple[int, int]) -> tuple[Decoded, Decoded, float, float]:
    """The reduced decode for ``fit`` and the full one, and the network-sized pixels' mean and max error."""
    reduced, full = decode_image(data, fit=fit), decode_image(data)
    assert reduced.size == full.size
    got, scale = fit_pixels(reduced, fit)
    want, want_scale = fit_pixels(full, fit)
    assert scale == want_scale
    return reduced, full, *errors(got, want)


# -- choosing the reduction ---------------------------------------------------------------------------


def test_dct_scale_keeps_twice_the_letterbox_size():
    """The smallest DCT decode with >= 2 decoded pixels per network pixel on each side."""
    cases = {
        ((4032, 3024), (256, 256)): 4,  # letterbox 256x192: 1/4 gives 1008x756, 1/8 only 504x378
        ((4032, 3024), (512, 512)): 2,
        ((4032, 3024), (128, 128)): 8,
        ((1920, 1080), (256, 256)): 2,
        ((3024, 4032), (256, 256)): 4,
        ((640, 480), (256, 256)): 1,  # too small to spare anything
        ((513, 10), (256, 256)): 1,  # 10 px high: nothing to spare along y
        ((100_000, 16), (256, 256)): 8,
    }
    for (size, fit), want in cases.items():
        assert dct_scale(size, needed_size(size, 1, fit)) == want, (size, fit)
    # shown portrait (3024 wide): its letterbox is 192x256, in the stored axes 256 along x, 192 along y
    assert needed_size((4032, 3024), 6, (256, 256)) == (256, 192)
    assert reduction((1008, 756), (256, 192)) == (1, 1)
    assert reduction((1, 40_000_000), (1, 256)) == (1, 78125)


def test_orientation_table_turns_pixels_as_pil_exif_transpose():
    """The one table that turns both the pixels and the box shows every EXIF orientation as PIL does."""
    base = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8))
    for orientation in range(1, 9):
        data = encode(base, "JPEG", orientation, quality=100)
        want = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
        got = decode_image(data)
        assert got.size == want.size and got.box is None, orientation
        np.testing.assert_array_equal(got.pixels.permute(1, 2, 0).numpy(), np.asarray(want.convert("RGB")))


# -- the pixels: a reduced decode against a full one --------------------------------------------------


@pytest.mark.parametrize(
    "size, orientation",
    [((4032, 3024), 1), ((2017, 1513), 6), ((1921, 1081), 3), ((1501, 2003), 8), ((2501, 1873), 2)],
    ids=str,
)
def test_reduced_jpeg_gives_the_full_decodes_network_input(size, orientation):
    """Photo-size JPEGs, sides multiples of 8 or not, turned by EXIF or not: the reduced decode is a
    DCT-scaled rendition and its letterboxed pixels are those of the full decode up to a fraction of
    a grey level on average. A partial last pixel resized as if whole, a box turned the wrong way, or
    a geometry taken from the reduced pixels breaks the bounds or the sizes."""
    data = encode(photo(size, seed=sum(size)), orientation=orientation)
    shown = size if orientation < 5 else size[::-1]
    for fit in ((256, 256), (512, 512)):
        reduced, full, mean, peak = against_full(data, fit)
        d = dct_scale(size, needed_size(size, orientation, fit))
        assert d > 1 or fit == (512, 512)
        assert tuple(reduced.pixels.shape[1:]) == (-(-shown[1] // d), -(-shown[0] // d)), (fit, d)
        assert mean <= MEAN_BOUND and peak <= MAX_BOUND, (fit, mean, peak)
        assert reduced.size == full.size == shown


def test_the_partial_pixel_box_has_teeth():
    """Dropping the box of a side that is no multiple of the reduction (its last pixel partial)
    resizes a slightly larger picture into the letterbox: the error bounds catch it."""
    data = encode(photo((2017, 1513), seed=7), orientation=3)
    reduced = decode_image(data, fit=(128, 128))  # at 1/4: 2017 = 504 x 4 + 1
    assert reduced.box == (0.75, 0.75, 505, 379)  # rotated 180: the partial pixels are left and top
    want, _ = fit_pixels(decode_image(data), (128, 128))
    mean, peak = errors(fit_pixels(reduced, (128, 128))[0], want)
    assert mean <= MEAN_BOUND and peak <= MAX_BOUND
    got, _ = fit_pixels(dataclasses.replace(reduced, box=None), (128, 128))
    mean, peak = errors(got, want)
    assert mean > MEAN_BOUND or peak > MAX_BOUND


@pytest.mark.parametrize("kind", ["png", "progressive", "grey", "cmyk"])
def test_other_images_reduce_alike(kind):
    """PNG (box reduce after decoding), progressive, greyscale and CMYK JPEGs (DCT scaling)."""
    img = photo((2403, 1801), seed=11)
    data = {
        "png": lambda: encode(img, "PNG", compress_level=1),
        "progressive": lambda: encode(img, progressive=True),
        "grey": lambda: encode(img.convert("L")),
        "cmyk": lambda: encode(img.convert("CMYK")),
    }[kind]()
    reduced, full, mean, peak = against_full(data, (256, 256))
    assert reduced.pixels.numel() * 4 <= full.pixels.numel()
    assert mean <= MEAN_BOUND and peak <= MAX_BOUND, (mean, peak)


def test_small_images_are_decoded_whole():
    """An image with nothing to spare is not reduced: its pixels are the full decode's."""
    data = encode(photo((640, 480), seed=3))
    reduced, full = decode_image(data, fit=(256, 256)), decode_image(data)
    assert reduced.box is None and torch.equal(reduced.pixels, full.pixels)


def test_tall_image_reduces_along_its_length():
    """A 1 x 200,000 PNG: only the long side is reduced, and the answer's geometry is the image's."""
    data = encode(Image.new("RGB", (1, 200_000), (10, 200, 30)), "PNG")
    d = decode_image(data, fit=(256, 256))
    assert d.size == (1, 200_000) and d.pixels.shape[-1] == 1 and d.pixels.shape[-2] <= 1024
    x, img_scale = letterbox(d, Geometry(size=(256, 256)))
    assert img_scale == pytest.approx(200_000 / 256)
    assert torch.all(x[:, :, 1:] == 0) and not torch.all(x[:, :, 0] == 0)


# -- the geometry and the batch ------------------------------------------------------------------------


def test_batch_equals_one_by_one_for_reduced_images():
    """``letterbox_batch`` of reduced images (boxes flipped by EXIF included) is ``letterbox`` of each
    bit for bit, and both scale by the images as sent."""
    g = Geometry(size=(256, 256))
    datas = [
        encode(photo((2017, 1513), 1), orientation=7),
        encode(photo((1200, 900), 2)),
        encode(photo((300, 200), 3)),
    ]
    images = [decode_image(d, fit=g.size) for d in datas]
    assert images[0].box is not None and images[2].box is None
    batch, scales = letterbox_batch(images, g, rows=4)
    for i, img in enumerate(images):
        x, s = letterbox(img, g)
        assert torch.equal(batch[i], x) and s == scales[i]
        assert s == pytest.approx(max(img.width, img.height) / 256)
    assert decode_images(datas, fit=g.size)[0].size == images[0].size == (1513, 2017)


def test_validation_equals_serving_for_photos(exported, tmp_path):
    """Training's validation decodes a photo as serving does (reduced, turned, partial pixel and all):
    the tensors are identical, the img_scale and img_size those of the image as sent."""
    det = Detector(exported / "model.pt")
    records = []
    for i, (size, orientation) in enumerate([((2017, 1513), 6), ((1921, 1081), 1), ((640, 480), 3)]):
        path = tmp_path / f"p{i}.jpg"
        path.write_bytes(encode(photo(size, i), orientation=orientation))
        records.append(Record(image=path, boxes=[[10.0, 10.0, 200.0, 150.0]], labels=[1], image_id=i + 1))
    dataset = DetectionDataset(records, det.geometry, train=False)
    for i, rec in enumerate(records):
        x_val, target = dataset[i]
        decoded = det.decode(rec.image.read_bytes())
        batch, img_scale, img_size = det.preprocess([decoded])
        assert torch.equal(x_val, batch[0])
        assert target["img_scale"] == pytest.approx(float(img_scale[0]), rel=1e-7)
        assert tuple(target["img_size"]) == decoded.size == tuple(int(v) for v in img_size[0].tolist())
    assert dataset[0][1]["img_size"] == (1513, 2017)


# -- served: answers and the worker's memory -------------------------------------------------------------


PHOTO_MODEL = "photos"


@pytest.fixture(scope="module")
def photo_server(shared_server, exported, tmp_path_factory):
    """The demo's export served as PHOTO_MODEL on the run's shared TorchServe (one worker)."""
    from scripts.archive import archive
    from scripts.settings import ModelConfig

    with shared_server.lease(PHOTO_MODEL) as srv:
        mar = archive(
            exported, PHOTO_MODEL, "1.0", tmp_path_factory.mktemp("photos"), ModelConfig(batch_size=1)
        )
        r = srv.client().register(srv.add(mar), initial_workers=1)
        assert r.status_code == 200, r.text
        yield srv.server


def _post(server, data: bytes, content_type: str) -> requests.Response:
    key = server.tokens()["inference"]
    return requests.post(
        f"{server.inference_url}/predictions/{PHOTO_MODEL}",
        data=data,
        headers={"Authorization": f"Bearer {key}", "Content-Type": content_type},
        timeout=300,
    )


def _worker(server) -> psutil.Process:
    key = server.tokens()["management"]
    r = requests.get(
        f"{server.management_url}/models/{PHOTO_MODEL}",
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )
    [pid] = [w["pid"] for e in r.json() for w in e["workers"]]
    return psutil.Process(pid)


def peak_rise_mib(server, data: bytes, content_type: str) -> float:
    """The worker's peak RSS (VmHWM, reset first) above its RSS before one request for ``data``."""
    worker = _worker(server)
    Path(f"/proc/{worker.pid}/clear_refs").write_text("5")  # VmHWM := current RSS
    before = worker.memory_info().rss
    r = _post(server, data, content_type)
    assert r.status_code == 200, r.text[:300]
    for line in Path(f"/proc/{worker.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return (int(line.split()[1]) * 1024 - before) / MIB
    raise AssertionError("no VmHWM")


@pytest.mark.server
def test_served_photo_is_answered_as_in_process(photo_server, detector):
    """A 12 MP phone photo over HTTP: its own size in the answer, the in-process answer's boxes."""
    data = encode(photo((4032, 3024), seed=5), orientation=6)
    r = _post(photo_server, data, "image/jpeg")
    assert r.status_code == 200, r.text[:300]
    got = r.json()
    want = detector.predict([data], score_threshold=detector.defaults.score_threshold)[0]
    assert got["image"] == want["image"] == {"width": 3024, "height": 4032}
    same = close_detections(score_tol=2e-5, box_tol=0.05)
    assert len(got["detections"]) == len(want["detections"])
    assert count_matched(got["detections"], want["detections"], same) >= 0.95 * len(want["detections"])


@pytest.mark.server
def test_served_worker_memory_of_40mp_images(photo_server):
    """One 40 MP image raises the served worker's peak RSS by what the network needs, not by the
    photo: a JPEG (decoded at 1/8) by at most 150 MB, a PNG (decoded whole, then box-reduced in
    uint8) by at most half of the 627 MiB a 40 MP PNG cost before (SECURITY.md has the figures)."""
    from scripts.bench.photos import memory_probes  # the bench's 40 MP photo JPEG and PNG

    probes = memory_probes(seed=9)
    jpeg_rise = peak_rise_mib(photo_server, *probes["jpeg_40mp"])
    png_rise = peak_rise_mib(photo_server, *probes["png_40mp"])
    print(f"\n40 MP JPEG: worker peak +{jpeg_rise:.0f} MiB; 40 MP PNG: +{png_rise:.0f} MiB")
    assert jpeg_rise <= 150 * 1e6 / MIB
    assert png_rise <= 627 / 2


# -- CUDA: nvjpeg decodes whole and the resize runs on the device (runs where a GPU is present) ----------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nvjpeg, the device resize)")


@cuda
def test_cuda_photo_network_input_close_to_the_cpus():
    """On CUDA a photo's JPEG is decoded whole by nvjpeg and resized on the device (float, rounded to
    uint8); its network input is the CPU's reduced decode's up to the two decoders' differences."""
    fit = (256, 256)
    data = encode(photo((2016, 1512), seed=4))
    gpu, cpu = decode_image(data, "cuda", fit=fit), decode_image(data, fit=fit)
    assert gpu.device.type == "cuda" and gpu.box is None and gpu.size == cpu.size == (2016, 1512)
    assert tuple(gpu.pixels.shape) == (3, 1512, 2016)  # whole: nvjpeg has no reduced decode here
    (got, s_gpu), (want, s_cpu) = fit_pixels(gpu, fit), fit_pixels(cpu, fit)
    assert s_gpu == s_cpu and got.device.type == "cuda"
    mean, peak = errors(got.cpu(), want)
    assert mean <= 1.0 and peak <= 20, (mean, peak)


@cuda
def test_cuda_box_resize_equals_the_cpus():
    """An EXIF-rotated JPEG goes through PIL even on CUDA (reduced, with a partial-pixel box at the
    left); the box resize on the device equals the CPU's uint8 kernel to one grey level, and the
    batch on the device equals ``letterbox`` of each image there."""
    g = Geometry(size=(256, 256))
    data = encode(photo((2017, 1513), seed=5), orientation=6)
    cpu, gpu = decode_image(data, fit=g.size), decode_image(data, "cuda", fit=g.size)
    assert gpu.box == cpu.box and gpu.box is not None and torch.equal(gpu.pixels.cpu(), cpu.pixels)
    (a, _), (b, _) = fit_pixels(gpu, g.size), fit_pixels(cpu, g.size)
    assert (a.cpu().int() - b.int()).abs().max() <= 1
    batch, _ = letterbox_batch([gpu, gpu], g)
    assert torch.equal(batch[1], letterbox(gpu, g)[0])
