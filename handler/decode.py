"""Bytes from the outside world -> the pixels the network needs, or a clear per-request error.

Every failure raises ``RequestError`` carrying the HTTP status for that one request, so the
handler can answer it with a 4xx JSON error while its batch-mates are served normally.

Given the network's input size (``fit``), an image much larger than it is decoded small: a JPEG
through libjpeg's DCT scaling (PIL's ``draft``: 1/2, 1/4 or 1/8 of each side, computed while
decoding), any image after decoding by PIL's box ``reduce`` in uint8, both down to the smallest
size that still has ``REDUCE_MARGIN`` decoded pixels per network pixel along each side. The
antialiased resize to the network's size (``handler.geometry``) then starts from that. The result,
``Decoded``, carries the size of the image as sent next to its pixels: every geometric fact
(letterbox size, img_scale, clipping, the answer's width and height) comes from that size, never
from the pixels', so a reduced decode changes the pixels a little and the geometry not at all.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import (  # noqa: F401  (the plugins register the formats that IMAGE_FORMATS names)
    BmpImagePlugin,
    GifImagePlugin,
    Image,
    JpegImagePlugin,
    PngImagePlugin,
    TiffImagePlugin,
    UnidentifiedImageError,
    WebPImagePlugin,
)

from handler.answer import RequestError
from handler.config import DEFAULT_MAX_PIXELS
from handler.geometry import letterbox_size

# PIL's own bomb guard would fire on different thresholds; we check the header (DEFAULT_MAX_PIXELS) ourselves.
Image.MAX_IMAGE_PIXELS = None

# The formats a request may carry (PIL names). PIL can open about 40 more (EPS and PDF hand off to
# Ghostscript, PSD, ICO, SGI, ...); each is parser code a stranger could aim at, so the rest are
# refused before any plugin sees the bytes. Phone JPEGs with several frames open as "MPO" through
# the JPEG entry.
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "GIF", "TIFF")
UNSUPPORTED = f"the body is not an image in a supported format ({', '.join(IMAGE_FORMATS)})"

JPEG_MAGIC = b"\xff\xd8\xff"
EXIF_ORIENTATION = 0x0112
# EXIF orientation -> how the stored pixels are shown: (swap the axes, then flip the shown x axis,
# flip the shown y axis). The transposes of ``ImageOps.exif_transpose``, as three flags so that
# the pixels and the box below are turned by the one table (tests check it against PIL's).
ORIENTATIONS = {
    1: (False, False, False),
    2: (False, True, False),  # mirrored left-right
    3: (False, True, True),  # rotated 180
    4: (False, False, True),  # mirrored top-bottom
    5: (True, False, False),  # transposed
    6: (True, True, False),  # rotated 90 clockwise
    7: (True, True, True),  # transversed
    8: (True, False, True),  # rotated 90 counter-clockwise
}

# libjpeg decodes a JPEG at 1/8, 1/4 or 1/2 of each side (rounded up) for a fraction of the work.
DCT_SCALES = (8, 4, 2)
# Decoded pixels kept per network pixel along each side. From a box-reduced rendition with twice
# the letterbox size, the antialiased resize gives the network input of a full decode to a small
# fraction of a grey level on average; with 1x, reductions alias visibly (tests/test_photos.py and
# docs/benchmarks.md have the figures).
REDUCE_MARGIN = 2


@dataclass(frozen=True)
class Decoded:
    """An image's pixels and the size of the image as sent (after EXIF orientation).

    ``pixels`` (uint8 RGB [3, h, w]) may be a reduced rendition of the image; ``width`` and
    ``height`` are always those of the image as sent, and the geometry is computed from them.
    ``box`` (x0, y0, x1, y1) is where the image lies on the pixel grid, in (fractional) pixels,
    when it does not fill the grid exactly: a side that is no multiple of the reduction ends in a
    partial pixel (libjpeg and PIL round reduced sizes up), which EXIF orientation may turn to the
    left or top. None: the pixels are exactly the image.
    """

    pixels: torch.Tensor
    width: int
    height: int
    box: tuple[float, float, float, float] | None = None

    @classmethod
    def full(cls, pixels: torch.Tensor) -> Decoded:
        """Pixels at their own size: the image as sent is the tensor."""
        return cls(pixels, int(pixels.shape[-1]), int(pixels.shape[-2]))

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the image as sent, as answers report it."""
        return self.width, self.height

    @property
    def device(self) -> torch.device:
        return self.pixels.device

    def to(self, device: torch.device | str) -> Decoded:
        return Decoded(self.pixels.to(device), self.width, self.height, self.box)


def check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    """The decompression-bomb guard, on the header's (width, height) before any pixel is decoded."""
    width, height = size
    if width * height > max_pixels:
        raise RequestError(
            413,
            "too_many_pixels",
            f"image is {width}x{height} = {width * height} pixels, the limit is {max_pixels}",
        )


def needed_size(stored: tuple[int, int], orientation: int, fit: tuple[int, int]) -> tuple[int, int]:
    """The letterbox size inside ``fit`` (H, W) of an image stored as ``stored`` (w, h) and shown with
    EXIF ``orientation``, as (w, h) in the stored orientation (where decoding and reducing happen)."""
    swap = ORIENTATIONS.get(orientation, ORIENTATIONS[1])[0]
    width, height = stored[::-1] if swap else stored
    new_h, new_w, _ = letterbox_size(height, width, fit)
    return (new_h, new_w) if swap else (new_w, new_h)


def reduction(
    pixels: tuple[int, int], needed: tuple[int, int], margin: int = REDUCE_MARGIN
) -> tuple[int, int]:
    """The largest integer factors (along x, along y) that shrink ``pixels`` (w, h) and leave
    ``margin`` pixels per pixel of ``needed`` (w, h); 1 where there is nothing to spare."""
    return max(1, pixels[0] // (margin * needed[0])), max(1, pixels[1] // (margin * needed[1]))


def dct_scale(pixels: tuple[int, int], needed: tuple[int, int], margin: int = REDUCE_MARGIN) -> int:
    """The DCT scale (1, 2, 4 or 8) a JPEG of ``pixels`` (w, h) is decoded at for ``needed`` (w, h)."""
    fx, fy = reduction(pixels, needed, margin)
    return next((d for d in DCT_SCALES if d <= min(fx, fy, *pixels)), 1)


def _orientation(img: Image.Image) -> int:
    orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    return orientation if orientation in ORIENTATIONS else 1


def decode_pil(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, fit: tuple[int, int] | None = None
) -> Decoded:
    """Decode image bytes with PIL: EXIF orientation applied, first frame only, 8-bit RGB.

    With ``fit`` (the network's input (H, W)) the pixels are reduced as the module docstring says.
    Only ``IMAGE_FORMATS`` are tried: anything else is ``415 not_an_image``, like bytes that are no image.
    """
    if not data:
        raise RequestError(400, "empty_body", "the request carried no image bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            check_pixels(img.size, max_pixels)
            img.seek(0)
            stored, scale = img.size, 1
            if fit is not None and img.format in ("JPEG", "MPO"):
                # a JPEG's EXIF is in its header, read before any pixel
                scale = dct_scale(stored, needed_size(stored, _orientation(img), fit))
                if scale > 1:  # PIL picks the scale from the size asked: this size asks for exactly it
                    img.draft(None, (stored[0] // scale, stored[1] // scale))
            img.load()
            if img.size == stored:  # draft declined (PIL does for some files): decoded whole
                scale = 1
            return from_pil(img, stored, _orientation(img), fit, scale)
    except RequestError:
        raise
    except UnidentifiedImageError:
        raise RequestError(415, "not_an_image", UNSUPPORTED) from None
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise RequestError(400, "invalid_image", f"the image could not be decoded: {e}") from None


def from_pil(
    img: Image.Image,
    stored: tuple[int, int] | None = None,
    orientation: int = 1,
    fit: tuple[int, int] | None = None,
    scale: int = 1,
) -> Decoded:
    """A decoded PIL image -> ``Decoded``: 8-bit RGB, box-reduced for ``fit``, then shown with EXIF
    ``orientation``; ``img`` is ``stored`` (w, h, the file's size) decoded at 1/``scale``.

    Reducing before turning keeps the partial pixels of every reduction at the stored right and
    bottom edges (the box is (0, 0) to the extent of the image there); turning the small rendition
    costs little and turns its box with it.
    """
    stored = stored or img.size
    img = to_rgb(img)
    factors = (1, 1) if fit is None else reduction(img.size, needed_size(stored, orientation, fit))
    if factors != (1, 1):
        img = img.reduce(factors)
    extent = (stored[0] / (scale * factors[0]), stored[1] / (scale * factors[1]))
    box = None if extent == img.size else (0.0, 0.0, *extent)
    swap, flip_x, flip_y = ORIENTATIONS.get(orientation, ORIENTATIONS[1])
    width, height = stored
    if swap:
        img = img.transpose(Image.Transpose.TRANSPOSE)
        width, height = height, width
        box = box and (box[1], box[0], box[3], box[2])
    if flip_x:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        box = box and (img.width - box[2], box[1], img.width - box[0], box[3])
    if flip_y:
        img = img.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
        box = box and (box[0], img.height - box[3], box[2], img.height - box[1])
    return Decoded(pil_to_tensor(img), width, height, box)


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """An 8-bit RGB PIL image -> uint8 [3, H, W], a CHW view of its own HWC copy (what torchvision's
    ``pil_to_tensor`` gives, without importing torchvision into a serving worker)."""
    if img.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {img.mode}")
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB (16-bit scaled down, alpha dropped, palette and CMYK converted).

    An RGB image is returned as it is (no copy)."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I"):
        # 16/32-bit greyscale: PIL's own convert("L") clips instead of scaling, so scale here, in
        # PIL (no int32 or float copy of the image): v / 257 rounded (no ties: 257 is odd), then
        # convert("L") clips what lies outside 0..65535.
        if img.mode not in ("I", "I;16"):  # the modes point() scales directly
            img = img.convert("I")
        img = img.point(lambda v: v / 257 + 0.5).convert("L")
    elif img.mode == "P":
        img = img.convert("RGBA")
    return img.convert("RGB")


def decode_image(
    data: bytes,
    device: torch.device | str = "cpu",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    fit: tuple[int, int] | None = None,
) -> Decoded:
    """Decode image bytes to ``Decoded`` (uint8 [3, h, w] on ``device`` + the size as sent).

    ``fit``: the network's input size (H, W); the pixels are then reduced on the CPU as the
    module docstring says. Without it they are the full image.

    On CUDA, JPEGs go through nvjpeg (``torchvision.io.decode_jpeg(device="cuda")``) at full size
    after PIL has read the header for the pixel cap (nvjpeg has no reduced decode here; the
    resize to the network's size runs on the device); anything nvjpeg refuses (CMYK, EXIF
    rotations, progressive edge cases) falls back to PIL.
    """
    device = torch.device(device)
    if device.type == "cuda" and data[:3] == JPEG_MAGIC:
        pixels = _decode_jpeg_cuda(data, device, max_pixels)
        if pixels is not None:
            return Decoded.full(pixels)
    return decode_pil(data, max_pixels, fit).to(device)


def decode_images(
    datas: Sequence[bytes],
    device: torch.device | str = "cpu",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    fit: tuple[int, int] | None = None,
) -> list[Decoded | RequestError]:
    """``decode_image`` for a batch: one ``Decoded`` or the ``RequestError`` per item.

    On CUDA every JPEG that nvjpeg can take goes to it in one call (``decode_jpeg`` with a list
    decodes the batch on the device); the rest, and all of them on the CPU, one by one as
    ``decode_image`` does. Either way each item equals ``decode_image`` of it.
    """
    device = torch.device(device)
    out: list[Decoded | RequestError | None] = [None] * len(datas)
    gpu: list[tuple[int, torch.Tensor]] = []
    for i, data in enumerate(datas):
        try:
            raw = (
                _cuda_jpeg_input(data, max_pixels)
                if device.type == "cuda" and data[:3] == JPEG_MAGIC
                else None
            )
            if raw is not None:
                gpu.append((i, raw))
            else:
                out[i] = decode_pil(data, max_pixels, fit).to(device)
        except RequestError as e:
            out[i] = e
    if gpu:
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            decoded = decode_jpeg([raw for _, raw in gpu], mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one bad stream fails the list: decode them one by one
            decoded = [None] * len(gpu)
        for (i, _), pixels in zip(gpu, decoded, strict=True):
            if pixels is None:
                try:
                    out[i] = decode_image(datas[i], device, max_pixels, fit)
                except RequestError as e:
                    out[i] = e
            else:
                out[i] = Decoded.full(pixels)
    return out


def _cuda_jpeg_input(data: bytes, max_pixels: int) -> torch.Tensor | None:
    """The JPEG's bytes as a uint8 tensor if nvjpeg can decode it as PIL would, else None."""
    try:
        header = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except (UnidentifiedImageError, OSError) as e:
        raise RequestError(400, "invalid_image", f"the image could not be decoded: {e}") from None
    check_pixels(header.size, max_pixels)
    if header.mode not in ("RGB", "L"):
        return None
    # torchvision's CUDA decode ignores apply_exif_orientation (only its CPU decoder honours it):
    # rotated or mirrored JPEGs go through PIL, which applies the orientation.
    if header.getexif().get(EXIF_ORIENTATION, 1) != 1:
        return None
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _decode_jpeg_cuda(data: bytes, device: torch.device, max_pixels: int) -> torch.Tensor | None:
    from torchvision.io import ImageReadMode, decode_jpeg

    raw = _cuda_jpeg_input(data, max_pixels)
    if raw is None:
        return None
    try:
        return decode_jpeg(raw, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
    except RuntimeError:
        return None
