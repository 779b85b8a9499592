"""The one definition of the image geometry, shared by training, export and serving.

An image goes into the network by an aspect-preserving resize that fits it inside the model's
(H, W), padding at the bottom and right, and ImageNet normalisation (padding is 0 after
normalisation, i.e. the mean colour, as effdet's own ``ResizePad`` does). Boxes predicted on
the network input are mapped back to the image by multiplying with ``img_scale``. Training
(validation transform), the handler and the tests import these functions from here, so the
two sides cannot drift apart.

The resize works in uint8 (torch's antialiased bilinear kernel, the one torchvision's resize
calls; on the CPU its native uint8 kernel) and only the network-sized result becomes float and is
normalised: no float copy of a full-size image exists. Nothing here imports torchvision: a serving
worker starts with torch alone (torchvision's import pulls in torch._dynamo, ~2 s of a cold start). An image may come as a ``handler.decode.Decoded``, pixels that are a
reduced rendition of a larger image: the letterbox size and ``img_scale`` then come from the size
of the image as sent, and its pixels are resized straight to that letterbox size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # decode imports this module; it needs only the type from there
    from handler.decode import Decoded

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Geometry:
    """How pixels become the network input: model size (H, W), resize policy, normalisation."""

    size: tuple[int, int]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize: str = "letterbox"

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> Geometry:
        if d.get("resize", "letterbox") != "letterbox":
            raise ValueError(f"unsupported resize policy {d.get('resize')!r} (only 'letterbox')")
        return cls(size=tuple(d["size"]), mean=tuple(d["mean"]), std=tuple(d["std"]))


def letterbox_size(height: int, width: int, size: tuple[int, int]) -> tuple[int, int, float]:
    """Resized (h, w) and the scale factor that fit an image inside ``size`` keeping its aspect."""
    scale = min(size[0] / height, size[1] / width)
    new_h = min(size[0], max(1, round(height * scale)))
    new_w = min(size[1], max(1, round(width * scale)))
    return new_h, new_w, scale


def fit_pixels(image: torch.Tensor | Decoded, size: tuple[int, int]) -> tuple[torch.Tensor, float]:
    """An image -> (its letterbox-sized uint8 [3, h, w] pixels inside ``size``, the letterbox scale).

    A plain tensor is the image as sent; a ``Decoded`` brings the size as sent (and, for a reduced
    decode with a partial last pixel, the box the image covers) with its pixels.
    """
    pixels = image if isinstance(image, torch.Tensor) else image.pixels
    if pixels.dtype != torch.uint8 or pixels.ndim != 3 or pixels.shape[0] != 3:
        raise ValueError(f"expected a uint8 [3, H, W] tensor, got {pixels.dtype} {list(pixels.shape)}")
    if isinstance(image, torch.Tensor):
        (height, width), box = pixels.shape[-2:], None
    else:
        height, width, box = image.height, image.width, image.box
    new_h, new_w, scale = letterbox_size(height, width, size)
    if box is None:
        pixels = resize_uint8(pixels, new_h, new_w) if (new_h, new_w) != (height, width) else pixels
    else:
        pixels = resize_box(pixels, box, new_h, new_w)
    return pixels, scale


def resize_uint8(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 [3, H, W] -> uint8 [3, height, width], antialiased bilinear: what torchvision's
    ``resize(..., antialias=True)`` computes, bit for bit wherever its CPU path is the native uint8
    kernel (x86 with AVX2, ARM) and on CUDA (a test holds the two together)."""
    x = pixels.unsqueeze(0)
    if x.is_contiguous(memory_format=torch.channels_last):
        # A decoded image is HWC memory seen as CHW: say so in the batch stride too, or interpolate
        # allocates a contiguous output and repacks it (pytorch #68430; torchvision does the same).
        x = x.as_strided(x.shape, (x.numel(), *x.stride()[1:]))
    return _interpolate_uint8(x, size=(height, width))[0]


def _interpolate_uint8(x: torch.Tensor, **how) -> torch.Tensor:
    """Antialiased bilinear ``interpolate`` of uint8 [N, 3, H, W]: on the CPU torch's native uint8
    kernel (on x86 without AVX2 torchvision takes the float path instead), elsewhere in float on
    the device, rounded back."""
    cast = x.device.type != "cpu"
    out = torch.nn.functional.interpolate(
        x.float() if cast else x, mode="bilinear", align_corners=False, antialias=True, **how
    )
    return out.round_().to(torch.uint8) if cast else out


def resize_box(
    pixels: torch.Tensor, box: tuple[float, float, float, float], height: int, width: int
) -> torch.Tensor:
    """The part ``box`` (x0, y0, x1, y1; fractional pixels, touching the grid's edges on at least one
    side per axis) of uint8 ``pixels`` resized to exactly (height, width), antialiased bilinear as
    ``resize_uint8``: the box's own scale maps coordinates (no stretch from the partial pixels), and
    what lies outside the box is cut off."""
    x0, y0, x1, y1 = box
    flips = [dim for dim, start in ((-1, x0), (-2, y0)) if start > 0]  # the box starts at 0 once flipped
    x = pixels.unsqueeze(0)
    x = x.flip(flips) if flips else x
    scale = (height / (y1 - y0), width / (x1 - x0))
    out = _interpolate_uint8(x, scale_factor=scale, recompute_scale_factor=False)[0, :, :height, :width]
    return out.flip(flips) if flips else out


def letterbox(image: torch.Tensor | Decoded, geometry: Geometry) -> tuple[torch.Tensor, float]:
    """uint8 CHW RGB image -> (normalised float32 CHW of ``geometry.size``, img_scale).

    ``img_scale`` maps network-input pixels back to image pixels (effdet's convention).
    Works on any device; the resize is bilinear with antialiasing, in uint8.
    """
    pixels, scale = fit_pixels(image, geometry.size)
    new_h, new_w = pixels.shape[-2:]
    mean = torch.tensor(geometry.mean, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    std = torch.tensor(geometry.std, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    x = pixels.to(torch.float32).div_(255.0).sub_(mean).div_(std)
    pad_bottom, pad_right = geometry.size[0] - new_h, geometry.size[1] - new_w
    x = torch.nn.functional.pad(x, (0, pad_right, 0, pad_bottom), value=0.0)
    return x, 1.0 / scale


def letterbox_batch(
    images: Sequence[torch.Tensor | Decoded],
    geometry: Geometry,
    rows: int | None = None,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
) -> tuple[torch.Tensor, list[float]]:
    """uint8 CHW images of any sizes -> one normalised [rows, 3, H, W] batch and their img_scales.

    Each image is resized on its own (sizes differ) straight into one preallocated batch that
    starts as the mean colour, and the whole batch is normalised once, so every image equals
    ``letterbox`` of it bit for bit (padding is mean - mean = 0 exactly). Rows past
    ``len(images)`` are padding: all zeros, for a caller that rounds batches up to a few sizes.
    The float32 result is cast to ``dtype`` (and ``channels_last``) at the end, on the images' device.
    """
    rows = len(images) if rows is None else rows
    if not images or rows < len(images):
        raise ValueError(f"need 1..rows images, got {len(images)} for {rows} rows")
    device = images[0].device
    height, width = geometry.size
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    mean = torch.tensor(geometry.mean, dtype=torch.float32).view(1, 3, 1, 1).to(device, non_blocking=True)
    std = torch.tensor(geometry.std, dtype=torch.float32).view(1, 3, 1, 1).to(device, non_blocking=True)
    batch = torch.empty((rows, 3, height, width), dtype=torch.float32, device=device, memory_format=fmt)
    batch.copy_(mean.expand_as(batch))
    scales = []
    for i, image in enumerate(images):
        pixels, scale = fit_pixels(image, geometry.size)
        new_h, new_w = pixels.shape[-2:]
        batch[i, :, :new_h, :new_w] = pixels.to(torch.float32).div_(255.0)
        scales.append(1.0 / scale)
    batch.sub_(mean).div_(std)
    return batch.to(dtype=dtype, memory_format=fmt), scales
