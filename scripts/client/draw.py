"""Boxes and labels of one answer drawn on its image."""

from __future__ import annotations

from pathlib import Path

from handler.answer import Answer


def draw(image_path: Path, response: dict, out: Path) -> None:
    """Render the boxes and labels of one answer (its JSON) on its image."""
    from PIL import Image, ImageDraw, ImageOps

    img = ImageOps.exif_transpose(Image.open(image_path)).convert("RGB")
    pen = ImageDraw.Draw(img)
    for det in Answer.from_json(response).detections:
        x1, y1, x2, y2 = det.box
        pen.rectangle([x1, y1, x2, y2], outline=(255, 40, 40), width=3)
        text = f"{det.label} {det.score:.2f}"
        pen.rectangle([x1, max(0, y1 - 12), x1 + 6 * len(text) + 4, y1], fill=(255, 40, 40))
        pen.text((x1 + 2, max(0, y1 - 12)), text, fill=(255, 255, 255))
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
