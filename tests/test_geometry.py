"""Training and serving see the same tensor for the same image: one geometry, imported by both."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from handler.detector import Detector
from handler.geometry import Geometry, letterbox, letterbox_size
from train.data import check_records, load_coco
from train.datamodule import DetectionDataset


def test_train_validation_geometry_equals_serving_geometry(synthetic_dir, exported):
    val = check_records(load_coco(synthetic_dir / "val.json"))
    det = Detector(exported / "model.pt")
    dataset = DetectionDataset(val.records, det.geometry, train=False)
    for i, rec in enumerate(val.records):
        x_train, target = dataset[i]
        batch, img_scale, img_size = det.preprocess([det.decode(rec.image.read_bytes())])
        assert torch.equal(x_train, batch[0])
        assert target["img_scale"] == pytest.approx(float(img_scale[0]), rel=1e-7)
        assert tuple(target["img_size"]) == tuple(int(v) for v in img_size[0].tolist())


@pytest.mark.parametrize("h, w", [(240, 320), (320, 240), (100, 1000), (256, 256), (7, 3)])
def test_letterbox_keeps_aspect_and_pads_with_zero(h, w):
    g = Geometry(size=(256, 256))
    img = torch.randint(0, 256, (3, h, w), dtype=torch.uint8)
    x, img_scale = letterbox(img, g)
    new_h, new_w, scale = letterbox_size(h, w, g.size)
    assert x.shape == (3, 256, 256) and x.dtype == torch.float32
    assert max(new_h, new_w) == 256 and img_scale == pytest.approx(1 / scale)
    # the aspect is kept up to rounding each side to whole pixels
    assert abs(new_h - h * scale) <= 0.5 and abs(new_w - w * scale) <= 0.5
    assert torch.all(x[:, new_h:, :] == 0) and torch.all(x[:, :, new_w:] == 0)


def test_letterbox_normalises_with_imagenet_stats():
    g = Geometry(size=(128, 128))
    img = torch.full((3, 128, 128), 255, dtype=torch.uint8)
    x, _ = letterbox(img, g)
    expected = torch.tensor([(1 - m) / s for m, s in zip(g.mean, g.std, strict=True)])
    assert torch.allclose(x[:, 5, 5], expected, atol=1e-6)


def test_letterbox_rejects_non_uint8_rgb():
    with pytest.raises(ValueError, match="uint8"):
        letterbox(torch.zeros(3, 10, 10), Geometry(size=(128, 128)))
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        letterbox(torch.zeros(1, 10, 10, dtype=torch.uint8), Geometry(size=(128, 128)))


def test_geometry_roundtrips_through_model_json():
    g = Geometry(size=(384, 256))
    assert Geometry.from_dict(g.to_dict()) == g
    with pytest.raises(ValueError, match="resize policy"):
        Geometry.from_dict({**g.to_dict(), "resize": "stretch"})


def test_exif_rotation_reaches_the_network_input(tmp_path):
    img = Image.new("RGB", (64, 32), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 32, 32))
    exif = Image.Exif()
    exif[274] = 6  # display rotated 90 degrees clockwise
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif, quality=95)
    from handler.decode import decode_image

    t = decode_image(buf.getvalue())
    assert t.pixels.shape == (3, 64, 32) and t.size == (32, 64)


@pytest.mark.parametrize(
    "size, out", [((3024, 4032), (96, 128)), ((301, 217), (512, 369)), ((50, 700), (9, 128))]
)
def test_resize_and_normalise_equal_torchvisions(size, out):
    """The handler resizes, normalises and converts PIL images with torch alone (no torchvision in a
    worker): bit for bit what torchvision's ``resize(antialias=True)``, ``normalize`` and
    ``pil_to_tensor`` give, down, up and for a decoded image's HWC memory (a kernel, rounding or
    layout slip changes pixels, and training and serving would see different inputs)."""
    from torchvision.transforms.v2 import functional as F

    from handler.decode import pil_to_tensor
    from handler.geometry import IMAGENET_MEAN, IMAGENET_STD, resize_uint8

    g = torch.Generator().manual_seed(size[0])
    hwc = torch.randint(0, 256, (*size, 3), dtype=torch.uint8, generator=g)
    img = Image.fromarray(hwc.numpy())
    pixels = pil_to_tensor(img)
    assert torch.equal(pixels, F.pil_to_tensor(img)) and pixels.stride() == F.pil_to_tensor(img).stride()
    for chw in (pixels, pixels.contiguous()):
        want = F.resize(chw, list(out), interpolation=F.InterpolationMode.BILINEAR, antialias=True)
        got = resize_uint8(chw, *out)
        assert got.dtype == torch.uint8 and torch.equal(got, want)
    x, _ = letterbox(pixels, Geometry(size=out))
    h, w, _ = letterbox_size(*size, out)
    small = F.resize(pixels, [h, w], interpolation=F.InterpolationMode.BILINEAR, antialias=True)
    want = F.normalize(small.float() / 255.0, mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))
    assert torch.equal(x[:, :h, :w], want)
