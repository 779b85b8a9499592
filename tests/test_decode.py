"""``handler.decode.decode_image`` on odd but valid images, on the pixel cap and on garbage.

These decode the whole image (no ``fit``); the reduced decodes for a network's size are in
``tests/test_photos.py``.

Every image is made here with PIL in memory; the expected pixels are computed independently
(numpy on the array the image was made from), so a wrong channel order, a clipped 16-bit
conversion or a missed EXIF rotation fails.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from handler.answer import RequestError
from handler.decode import Decoded, decode_image, decode_images


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def rgb_pattern(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def check(d: Decoded, height: int, width: int) -> np.ndarray:
    """Assert the contract (uint8, [3, H, W], CPU, the whole image) and return HWC numpy for pixel checks."""
    assert isinstance(d, Decoded) and isinstance(d.pixels, torch.Tensor)
    assert (d.width, d.height) == (width, height)
    t = d.pixels
    assert t.dtype == torch.uint8
    assert tuple(t.shape) == (3, height, width)
    assert t.device.type == "cpu"
    return t.permute(1, 2, 0).numpy()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR (correct CRC) claims ``width`` x ``height``; IEND follows, no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IEND", b"")


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


# -- odd but valid ----------------------------------------------------------------------------------


def test_one_by_one_png():
    a = rgb_pattern(1, 1, seed=1)
    out = check(decode_image(encode(Image.fromarray(a), "PNG")), 1, 1)
    np.testing.assert_array_equal(out, a)


def test_very_wide_4000x3():
    a = rgb_pattern(3, 4000, seed=2)
    out = check(decode_image(encode(Image.fromarray(a), "PNG")), 3, 4000)
    np.testing.assert_array_equal(out, a)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_grey_is_scaled_not_clipped(fmt):
    rng = np.random.default_rng(3)
    a = rng.integers(0, 65536, size=(24, 40), dtype=np.uint16)
    a[0, :4] = [0, 255, 256, 65535]  # values PIL's own convert("L") would clip to 255
    img = Image.fromarray(a)
    assert img.mode == "I;16"
    data = encode(img, fmt)
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # it really is a 16-bit file
    out = check(decode_image(data), 24, 40)
    expected = np.floor(a.astype(np.float64) / 257.0 + 0.5).astype(np.uint8)  # no ties: 257 is odd
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], expected)
    assert list(out[0, :4, 0]) == [0, 1, 1, 255]


def test_cmyk_jpeg_converts_to_rgb_colours():
    cmyk = np.zeros((16, 32, 4), dtype=np.uint8)
    cmyk[:, :16] = (0, 255, 255, 0)  # red
    cmyk[:, 16:] = (255, 255, 0, 0)  # blue
    img = Image.fromarray(cmyk, mode="CMYK")
    data = encode(img, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = check(decode_image(data), 16, 32).astype(int)
    assert np.abs(out[8, 4] - (255, 0, 0)).max() <= 12
    assert np.abs(out[8, 28] - (0, 0, 255)).max() <= 12


def test_palette_gif_first_frame_colours():
    palette = [255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9)
    idx = np.zeros((10, 12), dtype=np.uint8)
    idx[:, 4:8] = 1
    idx[:, 8:] = 2
    first = Image.fromarray(idx, mode="P")
    first.putpalette(palette)
    second = Image.fromarray(np.full((10, 12), 2, dtype=np.uint8), mode="P")
    second.putpalette(palette)
    data = encode(first, "GIF", save_all=True, append_images=[second])
    assert Image.open(io.BytesIO(data)).n_frames == 2
    out = check(decode_image(data), 10, 12)
    np.testing.assert_array_equal(out[5, 0], (255, 0, 0))
    np.testing.assert_array_equal(out[5, 5], (0, 255, 0))
    np.testing.assert_array_equal(out[5, 10], (0, 0, 255))


def test_palette_png_with_transparency():
    idx = np.array([[0, 1], [1, 0]], dtype=np.uint8)
    img = Image.fromarray(idx, mode="P")
    img.putpalette([10, 20, 30, 200, 100, 50] + [0] * (254 * 3))
    img.info["transparency"] = 0
    out = check(decode_image(encode(img, "PNG", transparency=0)), 2, 2)
    np.testing.assert_array_equal(out[0, 1], (200, 100, 50))
    np.testing.assert_array_equal(out[0, 0], (10, 20, 30))  # alpha dropped, colour kept


def test_rgba_png_drops_alpha():
    rgb = rgb_pattern(9, 7, seed=4)
    alpha = np.random.default_rng(5).integers(0, 256, size=(9, 7, 1), dtype=np.uint8)
    out = check(decode_image(encode(Image.fromarray(np.concatenate([rgb, alpha], 2), "RGBA"), "PNG")), 9, 7)
    np.testing.assert_array_equal(out, rgb)


@pytest.mark.parametrize(
    "fmt,kwargs", [("WEBP", {"lossless": True}), ("TIFF", {}), ("BMP", {}), ("PNG", {})], ids=str
)
def test_lossless_formats_exact(fmt, kwargs):
    a = rgb_pattern(13, 21, seed=6)
    out = check(decode_image(encode(Image.fromarray(a), fmt, **kwargs)), 13, 21)
    np.testing.assert_array_equal(out, a)


def test_grayscale_repeated_on_three_channels():
    g = np.random.default_rng(7).integers(0, 256, size=(11, 5), dtype=np.uint8)
    out = check(decode_image(encode(Image.fromarray(g, "L"), "PNG")), 11, 5)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], g)


def test_one_bit_image():
    b = np.zeros((4, 8), dtype=bool)
    b[:, :4] = True
    out = check(decode_image(encode(Image.fromarray(b), "PNG")), 4, 8)
    assert (out[:, :4] == 255).all() and (out[:, 4:] == 0).all()


def exif_jpeg(width: int, height: int, orientation: int) -> bytes:
    """A JPEG stored as ``width`` x ``height`` with a red block at the stored top-left corner."""
    a = np.zeros((height, width, 3), dtype=np.uint8)
    a[: height // 4, : width // 4] = (255, 0, 0)
    img = Image.fromarray(a)
    exif = Image.Exif()
    exif[274] = orientation
    return encode(img, "JPEG", quality=95, exif=exif.tobytes())


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_orientation_applied(orientation):
    data = exif_jpeg(64, 32, orientation)
    assert Image.open(io.BytesIO(data)).size == (64, 32)  # stored landscape
    out = check(decode_image(data), 64, 32).astype(int)  # shown portrait: H=64, W=32
    red = out[..., 0] > 128
    if orientation == 6:  # rotate 90 clockwise: stored top-left -> shown top-right
        assert red[:8, -8:].all() and not red[:8, :8].any()
    else:  # rotate 90 counter-clockwise: stored top-left -> shown bottom-left
        assert red[-8:, :8].all() and not red[:8, :8].any()


def test_exif_orientation_1_is_untouched():
    out = check(decode_image(exif_jpeg(64, 32, 1)), 32, 64)
    assert (out[:4, :4, 0] > 128).all()


# -- the pixel cap ------------------------------------------------------------------------------


def test_pixel_cap_413_before_decoding():
    # No pixel data at all: decoding it would fail with 400, so a 413 proves the cap fired first.
    data = png_header_only(30000, 30000)
    with pytest.raises(RequestError) as e:
        decode_image(data)
    assert e.value.status == 413 and e.value.code == "too_many_pixels"
    assert "30000x30000" in e.value.message


def test_pixel_cap_is_configurable_and_inclusive():
    data = encode(Image.fromarray(rgb_pattern(10, 10)), "PNG")
    assert decode_image(data, max_pixels=100).pixels.shape == (3, 10, 10)
    with pytest.raises(RequestError) as e:
        decode_image(data, max_pixels=99)
    assert e.value.status == 413


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small real JPEG whose SOF0 header is patched to claim ``width`` x ``height``."""
    data = bytearray(encode(Image.fromarray(rgb_pattern(16, 16)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def test_pixel_cap_jpeg_header():
    data = jpeg_claiming(30000, 30000)
    assert Image.open(io.BytesIO(data)).size == (30000, 30000)
    with pytest.raises(RequestError) as e:
        decode_image(data)
    assert e.value.status == 413


def test_header_only_png_under_cap_is_400():
    with pytest.raises(RequestError) as e:
        decode_image(png_header_only(20, 20))
    assert e.value.status == 400 and e.value.code == "invalid_image"


# -- garbage ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data,status,code",
    [
        (b"", 400, "empty_body"),
        (b"\x00", 415, "not_an_image"),
        (b"hello, this is text not an image", 415, "not_an_image"),
        (b'{"image": "abc"}', 415, "not_an_image"),
        (b"\x89PNG\r\n\x1a\n", 415, "not_an_image"),  # PNG magic, nothing after: unidentifiable
    ],
    ids=["empty", "one-byte", "text", "json-bytes", "png-magic-only"],
)
def test_garbage(data, status, code):
    with pytest.raises(RequestError) as e:
        decode_image(data)
    assert e.value.status == status
    assert e.value.code == code
    assert e.value.to_json()["error"]["code"] == e.value.code


@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_jpeg_is_400(keep):
    data = encode(Image.fromarray(rgb_pattern(64, 64, seed=8)), "JPEG", quality=90)
    with pytest.raises(RequestError) as e:
        decode_image(data[: int(len(data) * keep)])
    assert e.value.status == 400 and e.value.code == "invalid_image"


# -- the CUDA (nvjpeg) path: runs where a GPU is present -----------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the nvjpeg path)")


@cuda
def test_cuda_jpeg_close_to_cpu():
    y, x = np.mgrid[0:48, 0:80]
    a = np.stack([x * 3, y * 5, (x + y) * 2], axis=-1).astype(np.uint8)  # smooth: decoders agree
    data = encode(Image.fromarray(a), "JPEG", quality=95)
    gpu = decode_image(data, "cuda").pixels
    assert gpu.device.type == "cuda" and gpu.dtype == torch.uint8 and tuple(gpu.shape) == (3, 48, 80)
    diff = (gpu.cpu().int() - decode_image(data).pixels.int()).abs()
    assert diff.float().mean() <= 2.0


@cuda
@pytest.mark.parametrize("orientation", [6, 8])
def test_cuda_exif_orientation_applied(orientation):
    data = exif_jpeg(64, 32, orientation)
    gpu = decode_image(data, "cuda")
    assert gpu.device.type == "cuda" and gpu.size == (32, 64)
    assert torch.equal(gpu.pixels.cpu(), decode_image(data).pixels)  # shape (3, 64, 32) and the same pixels


@cuda
def test_cuda_pixel_cap_and_cmyk_fallback():
    with pytest.raises(RequestError) as e:
        decode_image(jpeg_claiming(30000, 30000), "cuda")
    assert e.value.status == 413
    cmyk = encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG")
    assert torch.equal(decode_image(cmyk, "cuda").pixels.cpu(), decode_image(cmyk).pixels)


# -- a batch at once ---------------------------------------------------------------------------------


def mixed_batch() -> list[bytes]:
    """JPEGs of several sizes, a grey JPEG, a CMYK JPEG, an EXIF-rotated one, a PNG and three bad ones."""
    y, x = np.mgrid[0:48, 0:80]
    smooth = np.stack([x * 3, y * 5, (x + y) * 2], axis=-1).astype(np.uint8)
    good = encode(Image.fromarray(smooth), "JPEG", quality=95)
    return [
        good,
        b"not an image at all",
        encode(Image.fromarray(rgb_pattern(30, 20, seed=3)), "JPEG", quality=90),
        encode(Image.new("L", (17, 9), 120), "JPEG"),
        encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG"),
        exif_jpeg(64, 32, 6),
        good[: len(good) // 2],
        encode(Image.fromarray(rgb_pattern(5, 7, seed=4)), "PNG"),
        jpeg_claiming(30000, 30000),
        good,
    ]


def _same_item(got, want) -> None:
    if isinstance(want, RequestError):
        assert isinstance(got, RequestError) and (got.status, got.code) == (want.status, want.code)
    else:
        assert isinstance(got, Decoded) and got.size == want.size
        assert torch.equal(got.pixels.cpu(), want.pixels.cpu())


def test_decode_images_equals_one_by_one_with_errors_in_place():
    datas = mixed_batch()
    got = decode_images(datas)
    assert len(got) == len(datas)
    statuses = []
    for g, data in zip(got, datas, strict=True):
        try:
            want = decode_image(data)
        except RequestError as e:
            want = e
        _same_item(g, want)
        statuses.append(g.status if isinstance(g, RequestError) else 200)
    assert statuses == [200, 415, 200, 200, 200, 200, 400, 200, 413, 200]
    assert decode_images([]) == []


@cuda
def test_cuda_decode_images_equals_one_by_one():
    """nvjpeg decodes the batch in one call; each item is what decode_image gives on CUDA."""
    datas = mixed_batch()
    got = decode_images(datas, "cuda")
    for g, data in zip(got, datas, strict=True):
        try:
            want = decode_image(data, "cuda")
        except RequestError as e:
            want = e
        _same_item(g, want)
        if isinstance(g, Decoded):
            assert g.device.type == "cuda"
