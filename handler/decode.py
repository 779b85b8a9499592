"""Bytes from the outside world -> an RGB uint8 tensor, or a clear per-request error.

Every failure raises ``RequestError`` carrying the HTTP status for that one request, so the
handler can answer it with a 4xx JSON error while its batch-mates are served normally.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

import torch
from PIL import (  # noqa: F401  (the plugins register the formats that FORMATS names)
    BmpImagePlugin,
    GifImagePlugin,
    Image,
    ImageOps,
    JpegImagePlugin,
    PngImagePlugin,
    TiffImagePlugin,
    UnidentifiedImageError,
    WebPImagePlugin,
)
from torchvision.transforms.v2 import functional as F

# Decompression bombs: refuse images above this many pixels before decoding them.
DEFAULT_MAX_PIXELS = 40_000_000
# PIL's own bomb guard would fire on different thresholds; we check the header ourselves.
Image.MAX_IMAGE_PIXELS = None

# The formats a request may carry (PIL names). PIL can open about 40 more (EPS and PDF hand off to
# Ghostscript, PSD, ICO, SGI, ...); each is parser code a stranger could aim at, so the rest are
# refused before any plugin sees the bytes. Phone JPEGs with several frames open as "MPO" through
# the JPEG entry.
FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "GIF", "TIFF")
UNSUPPORTED = f"the body is not an image in a supported format ({', '.join(FORMATS)})"

JPEG_MAGIC = b"\xff\xd8\xff"
EXIF_ORIENTATION = 0x0112


class RequestError(ValueError):
    """A problem with one request: carries an HTTP status and a short machine-readable code."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def to_json(self) -> dict:
        return {"error": {"code": self.code, "message": self.message}}


def check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    """The decompression-bomb guard, on the header's (width, height) before any pixel is decoded."""
    width, height = size
    if width * height > max_pixels:
        raise RequestError(
            413,
            "too_many_pixels",
            f"image is {width}x{height} = {width * height} pixels, the limit is {max_pixels}",
        )


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open and fully decode an image with PIL; EXIF orientation applied; first frame only.

    Only ``FORMATS`` are tried: anything else is ``415 not_an_image``, like bytes that are no image.
    """
    if not data:
        raise RequestError(400, "empty_body", "the request carried no image bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data), formats=FORMATS)
            check_pixels(img.size, max_pixels)
            img.seek(0)
            img.load()
            img = ImageOps.exif_transpose(img)
    except RequestError:
        raise
    except UnidentifiedImageError:
        raise RequestError(415, "not_an_image", UNSUPPORTED) from None
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise RequestError(400, "invalid_image", f"the image could not be decoded: {e}") from None
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB (16-bit scaled down, alpha dropped, palette and CMYK converted)."""
    if img.mode.startswith("I"):
        # 16/32-bit greyscale: PIL's own convert("L") clips instead of scaling, so scale here.
        wide = torch.frombuffer(bytearray(img.convert("I").tobytes()), dtype=torch.int32)
        narrow = wide.clamp(0, 65535).div(257).round().to(torch.uint8)
        img = Image.frombytes("L", img.size, narrow.numpy().tobytes())
    elif img.mode == "P":
        img = img.convert("RGBA")
    return img.convert("RGB")


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """Any PIL image -> uint8 RGB [3, H, W] tensor."""
    return F.pil_to_tensor(to_rgb(img))


def decode_image(
    data: bytes, device: torch.device | str = "cpu", max_pixels: int = DEFAULT_MAX_PIXELS
) -> torch.Tensor:
    """Decode image bytes to uint8 [3, H, W] on ``device``.

    On CUDA, JPEGs go through nvjpeg (``torchvision.io.decode_jpeg(device="cuda")``) after PIL
    has read the header for the pixel cap; anything nvjpeg refuses (CMYK, progressive edge
    cases) falls back to PIL.
    """
    device = torch.device(device)
    if device.type == "cuda" and data[:3] == JPEG_MAGIC:
        tensor = _decode_jpeg_cuda(data, device, max_pixels)
        if tensor is not None:
            return tensor
    return pil_to_tensor(open_image(data, max_pixels)).to(device)


def decode_images(
    datas: Sequence[bytes], device: torch.device | str = "cpu", max_pixels: int = DEFAULT_MAX_PIXELS
) -> list[torch.Tensor | RequestError]:
    """``decode_image`` for a batch: one uint8 [3, H, W] tensor or the ``RequestError`` per item.

    On CUDA every JPEG that nvjpeg can take goes to it in one call (``decode_jpeg`` with a list
    decodes the batch on the device); the rest, and all of them on the CPU, one by one as
    ``decode_image`` does. Either way each item equals ``decode_image`` of it.
    """
    device = torch.device(device)
    out: list[torch.Tensor | RequestError | None] = [None] * len(datas)
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
                out[i] = pil_to_tensor(open_image(data, max_pixels)).to(device)
        except RequestError as e:
            out[i] = e
    if gpu:
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            decoded = decode_jpeg([raw for _, raw in gpu], mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one bad stream fails the list: decode them one by one
            decoded = [None] * len(gpu)
        for (i, _), tensor in zip(gpu, decoded, strict=True):
            if tensor is None:
                try:
                    tensor = decode_image(datas[i], device, max_pixels)
                except RequestError as e:
                    tensor = e
            out[i] = tensor
    return out


def _cuda_jpeg_input(data: bytes, max_pixels: int) -> torch.Tensor | None:
    """The JPEG's bytes as a uint8 tensor if nvjpeg can decode it as PIL would, else None."""
    try:
        header = Image.open(io.BytesIO(data), formats=FORMATS)
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
