"""A real detection dataset on disk, made here: the built-in default, no network needed.

    python -m train.synthetic --out data/synthetic --train 400 --val 60 --seed 0

Writes ``images/*.jpg`` and COCO ``train.json`` / ``val.json``. Deterministic by seed. Images
have different sizes and aspect ratios, textured backgrounds (noise, stripes, gradients), and
0-4 objects of three classes in several sizes and aspect ratios; about one in eight images has
no object at all (negatives).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("ellipse", "rectangle", "triangle")
NEGATIVE_FRACTION = 0.125


def _background(rng: random.Random, width: int, height: int) -> Image.Image:
    base = tuple(rng.randint(60, 190) for _ in range(3))
    img = Image.new("RGB", (width, height), base)
    draw = ImageDraw.Draw(img)
    kind = rng.choice(("stripes", "blobs", "gradient"))
    if kind == "stripes":
        step = rng.randint(6, 24)
        for x in range(-height, width, step):
            shade = tuple(max(0, min(255, c + rng.randint(-35, 35))) for c in base)
            draw.line([(x, 0), (x + height, height)], fill=shade, width=max(1, step // 3))
    elif kind == "blobs":
        for _ in range(rng.randint(10, 30)):
            r = rng.randint(4, max(5, min(width, height) // 6))
            cx, cy = rng.randint(0, width), rng.randint(0, height)
            shade = tuple(max(0, min(255, c + rng.randint(-40, 40))) for c in base)
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=shade)
    else:
        other = tuple(rng.randint(60, 190) for _ in range(3))
        for y in range(height):
            t = y / max(1, height - 1)
            draw.line(
                [(0, y), (width, y)],
                fill=tuple(int(a * (1 - t) + b * t) for a, b in zip(base, other, strict=True)),
            )
    # Seeded noise (PIL's effect_noise has its own unseeded generator).
    noise = Image.frombytes("L", (width, height), rng.randbytes(width * height)).convert("RGB")
    return Image.blend(img, noise, rng.uniform(0.05, 0.2)).filter(ImageFilter.SMOOTH)


def _iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def make_image(rng: random.Random) -> tuple[Image.Image, list[tuple[list[float], int]]]:
    """One image and its objects as (xyxy box, 0-based class index)."""
    width, height = rng.choice([(320, 240), (256, 256), (400, 300), (240, 320), (360, 202), (300, 300)])
    img = _background(rng, width, height)
    draw = ImageDraw.Draw(img)
    objects: list[tuple[list[float], int]] = []
    n = 0 if rng.random() < NEGATIVE_FRACTION else rng.randint(1, 4)
    tries = 0
    while len(objects) < n and tries < 50:
        tries += 1
        side = rng.uniform(0.15, 0.45) * min(width, height)
        aspect = rng.uniform(0.6, 1.6)
        w, h = side * aspect**0.5, side / aspect**0.5
        x1, y1 = rng.uniform(0, width - w), rng.uniform(0, height - h)
        box = [round(x1), round(y1), round(x1 + w), round(y1 + h)]
        if any(_iou(box, other) > 0.05 for other, _ in objects):
            continue
        cls = rng.randrange(len(CLASSES))
        colour = tuple(rng.choice((rng.randint(0, 50), rng.randint(200, 255))) for _ in range(3))
        outline = tuple(255 - c for c in colour)
        x1, y1, x2, y2 = box
        if CLASSES[cls] == "ellipse":
            draw.ellipse([x1, y1, x2 - 1, y2 - 1], fill=colour, outline=outline, width=2)
        elif CLASSES[cls] == "rectangle":
            draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=colour, outline=outline, width=2)
        else:
            draw.polygon([((x1 + x2) / 2, y1), (x2 - 1, y2 - 1), (x1, y2 - 1)], fill=colour, outline=outline)
        objects.append((list(map(float, box)), cls))
    return img, objects


def as_photo(img: Image.Image, size: tuple[int, int], seed: int = 0, grain: float = 4.0) -> Image.Image:
    """A scene at a camera's size (w, h): upscaled (bicubic) with seeded sensor-like grain added at
    full resolution (luminance sigma ``grain`` grey levels, chroma half that), so that it has the
    fine detail, JPEG size and decode cost of a photo rather than the smoothness of an upscale.
    Boxes scale by ``size[0] / img.width`` and ``size[1] / img.height``."""
    import numpy as np

    a = np.asarray(img.convert("RGB").resize(size, Image.BICUBIC), dtype=np.float32)
    rng = np.random.default_rng(seed)
    a += rng.normal(0.0, grain, (size[1], size[0], 1)).astype(np.float32)
    a += rng.normal(0.0, grain / 2, a.shape).astype(np.float32)
    return Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8))


def write_split(out: Path, split: str, count: int, rng: random.Random) -> Path:
    """Render ``count`` images and write ``{split}.json`` in COCO format."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        img, objects = make_image(rng)
        name = f"images/{split}_{i:05d}.jpg"
        img.save(out / name, quality=92)
        images.append({"id": i + 1, "file_name": name, "width": img.width, "height": img.height})
        for box, cls in objects:
            x1, y1, x2, y2 = box
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": cls + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                }
            )
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]
    path = out / f"{split}.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def generate(out: str | Path, train: int = 400, val: int = 60, seed: int = 0) -> Path:
    """Write the whole synthetic dataset (train and val splits) under ``out``."""
    out = Path(out)
    write_split(out, "train", train, random.Random(seed))
    write_split(out, "val", val, random.Random(seed + 1_000_003))
    return out


def ensure(out: str | Path, train: int = 400, val: int = 60, seed: int = 0) -> Path:
    """Generate the dataset unless ``out`` already holds one."""
    out = Path(out)
    if not ((out / "train.json").is_file() and (out / "val.json").is_file()):
        generate(out, train, val, seed)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--train", type=int, default=400, help="training images")
    p.add_argument("--val", type=int, default=60, help="validation images")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    out = generate(a.out, a.train, a.val, a.seed)
    print(f"wrote {a.train} train + {a.val} val images to {out} (classes: {', '.join(CLASSES)})")


if __name__ == "__main__":
    main()
