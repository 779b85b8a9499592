"""Dataset adapters (CSV, COCO JSON, Pascal VOC) and the annotation checks run before training.

Each adapter turns its format into ``Record``s (one image, its xyxy boxes in pixels, 1-based
labels, and where each box came from) and the class names. ``check_records`` then opens every
image header and validates every box. Policy, the same for all formats:

- a box partly outside its image is clipped to it and counted;
- a box with x2 <= x1 or y2 <= y1, or one entirely outside the image, is an error;
- a missing or unreadable image, an unknown label, an empty dataset are errors.

Errors stop training with a message naming the file and the row / annotation id; with
``skip_bad=True`` the offending boxes or images are skipped instead, and counted. The summary
says how many were clipped or skipped either way: nothing is dropped silently.
"""

from __future__ import annotations

import csv
import json
import random
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

DATASET_FORMATS = ("synthetic", "coco", "csv", "voc")


class AnnotationError(ValueError):
    """The dataset has problems; the message lists them with file and row / annotation id."""


@dataclass
class Record:
    image: Path
    boxes: list[list[float]] = field(default_factory=list)  # xyxy pixels, image as displayed
    labels: list[int] = field(default_factory=list)  # 1-based class ids
    where: list[str] = field(default_factory=list)  # per box: "file:row N" / "file:annotation id N"
    source: str = ""  # where the image was listed
    size: tuple[int, int] | None = None  # (width, height) after EXIF orientation; filled by check
    image_id: int = 0


@dataclass
class Dataset:
    records: list[Record]
    classes: list[str]
    summary: Counter = field(default_factory=Counter)


# -- adapters ------------------------------------------------------------------------------------
def load_csv(
    path: str | Path, images_dir: str | Path | None = None, classes: list[str] | None = None
) -> Dataset:
    """``image,xmin,ymin,xmax,ymax[,label]``; one row per box, empty box columns = a negative image."""
    path = Path(path)
    root = Path(images_dir) if images_dir else path.parent
    rows: list[tuple[int, dict]] = []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        need = {"image", "xmin", "ymin", "xmax", "ymax"}
        if reader.fieldnames is None or not need <= set(reader.fieldnames):
            raise AnnotationError(
                f"{path}: header must be image,xmin,ymin,xmax,ymax[,label], got {reader.fieldnames}"
            )
        has_label = "label" in reader.fieldnames
        for line, row in enumerate(reader, start=2):
            rows.append((line, row))
    names = classes or sorted(
        {r["label"].strip() for _, r in rows if has_label and (r.get("label") or "").strip()}
    )
    if not has_label:
        names = classes or ["object"]
    index = {n: i + 1 for i, n in enumerate(names)}
    records: dict[str, Record] = {}
    problems: list[str] = []
    for line, row in rows:
        image = (row.get("image") or "").strip()
        where = f"{path}:line {line}"
        if not image:
            problems.append(f"{where}: empty image column")
            continue
        rec = records.setdefault(image, Record(image=root / image, source=where))
        coords = [(row.get(k) or "").strip() for k in ("xmin", "ymin", "xmax", "ymax")]
        if not any(coords):
            continue  # an image listed without a box: a negative
        try:
            box = [float(c) for c in coords]
        except ValueError:
            problems.append(f"{where}: box columns must be numbers, got {coords}")
            continue
        label = (row.get("label") or "").strip() if has_label else "object"
        if label not in index:
            problems.append(f"{where}: unknown label {label!r} (classes: {names})")
            continue
        rec.boxes.append(box)
        rec.labels.append(index[label])
        rec.where.append(where)
    if problems:
        raise AnnotationError(_report(problems))
    return Dataset(list(records.values()), names)


def load_coco(path: str | Path, images_dir: str | Path | None = None) -> Dataset:
    """COCO JSON: bbox [x, y, w, h]; categories -> 1-based ids in category-id order; crowd boxes skipped."""
    path = Path(path)
    root = Path(images_dir) if images_dir else path.parent
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AnnotationError(f"{path}: not a readable COCO JSON file ({e})") from None
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise AnnotationError(f"{path}: missing top-level key {key!r}")
    cats = sorted(data["categories"], key=lambda c: c["id"])
    names = [c["name"] for c in cats]
    index = {c["id"]: i + 1 for i, c in enumerate(cats)}
    records = {}
    for img in data["images"]:
        records[img["id"]] = Record(image=root / img["file_name"], source=f"{path}:image id {img['id']}")
    problems: list[str] = []
    summary: Counter = Counter()
    for ann in data["annotations"]:
        where = f"{path}:annotation id {ann.get('id')}"
        if ann.get("iscrowd", 0):
            summary["crowd boxes skipped"] += 1
            continue
        rec = records.get(ann.get("image_id"))
        if rec is None:
            problems.append(f"{where}: refers to unknown image id {ann.get('image_id')}")
            continue
        if ann.get("category_id") not in index:
            problems.append(f"{where}: unknown category id {ann.get('category_id')}")
            continue
        bbox = ann.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4:
            problems.append(f"{where}: bbox must be [x, y, w, h], got {bbox}")
            continue
        x, y, w, h = (float(v) for v in bbox)
        rec.boxes.append([x, y, x + w, y + h])
        rec.labels.append(index[ann["category_id"]])
        rec.where.append(where)
    if problems:
        raise AnnotationError(_report(problems))
    return Dataset(list(records.values()), names, summary)


def load_voc(
    root: str | Path, split: str, difficult: str = "skip", classes: list[str] | None = None
) -> Dataset:
    """Pascal VOC: ``ImageSets/Main/{split}.txt`` lists ids; boxes from ``Annotations/{id}.xml``.

    VOC pixel coordinates are 1-based and inclusive; they become 0-based xyxy (xmin-1, ymin-1,
    xmax, ymax). ``difficult`` objects are skipped and counted (``difficult="skip"``) or
    trained on (``"keep"``). Class names: given, or every name in the split's annotations, sorted.
    """
    root = Path(root)
    if difficult not in ("skip", "keep"):
        raise ValueError("difficult must be 'skip' or 'keep'")
    split_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if not split_file.is_file():
        raise AnnotationError(f"{split_file}: split file not found")
    ids = [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]
    parsed, problems = [], []
    summary: Counter = Counter()
    for image_id in ids:
        xml_path = root / "Annotations" / f"{image_id}.xml"
        try:
            tree = ET.parse(xml_path).getroot()
        except (OSError, ET.ParseError) as e:
            problems.append(f"{xml_path}: cannot read annotation ({e})")
            continue
        filename = tree.findtext("filename") or f"{image_id}.jpg"
        objects = []
        for n, obj in enumerate(tree.findall("object"), start=1):
            where = f"{xml_path}:object {n}"
            name = (obj.findtext("name") or "").strip()
            if obj.findtext("difficult", "0").strip() == "1" and difficult == "skip":
                summary["difficult boxes skipped"] += 1
                continue
            bb = obj.find("bndbox")
            try:
                xmin, ymin, xmax, ymax = (float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
            except (AttributeError, TypeError, ValueError):
                problems.append(f"{where}: bndbox needs numeric xmin, ymin, xmax, ymax")
                continue
            objects.append((name, [xmin - 1, ymin - 1, xmax, ymax], where))
        parsed.append((root / "JPEGImages" / filename, str(xml_path), objects))
    names = classes or sorted({name for _, _, objs in parsed for name, _, _ in objs})
    index = {n: i + 1 for i, n in enumerate(names)}
    records = []
    for image, source, objects in parsed:
        rec = Record(image=image, source=source)
        for name, box, where in objects:
            if name not in index:
                problems.append(f"{where}: unknown label {name!r} (classes: {names})")
                continue
            rec.boxes.append(box)
            rec.labels.append(index[name])
            rec.where.append(where)
        records.append(rec)
    if problems:
        raise AnnotationError(_report(problems))
    return Dataset(records, names, summary)


# -- checks --------------------------------------------------------------------------------------
def check_records(dataset: Dataset, skip_bad: bool = False, name: str = "dataset") -> Dataset:
    """Open every image header and validate every box; clip, skip or raise per the module policy."""
    problems: list[str] = []
    summary = Counter(dataset.summary)
    kept: list[Record] = []
    for rec in dataset.records:
        size, err = _image_size(rec.image)
        if err:
            problems.append(f"{rec.source}: {rec.image}: {err}")
            summary["images skipped"] += 1
            continue
        rec.size = size
        width, height = size
        boxes, labels, wheres = [], [], []
        for box, label, where in zip(rec.boxes, rec.labels, rec.where, strict=True):
            x1, y1, x2, y2 = box
            if not x2 > x1 or not y2 > y1:
                problems.append(f"{where}: degenerate box {box} (needs x2 > x1 and y2 > y1)")
                summary["boxes skipped"] += 1
                continue
            clipped = [max(0.0, x1), max(0.0, y1), min(float(width), x2), min(float(height), y2)]
            if not (clipped[2] > clipped[0] and clipped[3] > clipped[1]):
                problems.append(
                    f"{where}: box {box} lies outside the {width}x{height} image {rec.image.name}"
                )
                summary["boxes skipped"] += 1
                continue
            if clipped != [float(v) for v in box]:
                summary["boxes clipped to the image"] += 1
            boxes.append(clipped)
            labels.append(label)
            wheres.append(where)
        rec.boxes, rec.labels, rec.where = boxes, labels, wheres
        kept.append(rec)
    if problems and not skip_bad:
        raise AnnotationError(
            _report(problems) + "\n(fix these, or pass --skip-bad to skip the offending boxes and images)"
        )
    if not kept:
        raise AnnotationError(f"{name}: empty dataset, no usable images")
    for i, rec in enumerate(kept, start=1):
        rec.image_id = i
    summary["images"] = len(kept)
    summary["boxes"] = sum(len(r.boxes) for r in kept)
    summary["negative images (no boxes)"] = sum(1 for r in kept if not r.boxes)
    return Dataset(kept, dataset.classes, summary)


def _image_size(path: Path) -> tuple[tuple[int, int] | None, str | None]:
    if not path.is_file():
        return None, "image file not found"
    try:
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            return img.size, None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        return None, f"unreadable image ({e.__class__.__name__}: {e})"


def _report(problems: list[str], limit: int = 20) -> str:
    head = "\n  ".join(problems[:limit])
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return f"{len(problems)} annotation problem(s):\n  {head}{more}"


def split_records(
    records: list[Record], val_fraction: float, seed: int = 0
) -> tuple[list[Record], list[Record]]:
    """Deterministic train/val split for formats that come as one file."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(records) * val_fraction))
    val = {i for i in order[:n_val]}
    return [r for i, r in enumerate(records) if i not in val], [r for i, r in enumerate(records) if i in val]


def load_dataset(
    fmt: str, data: str | Path, split: str = "train", images_dir=None, classes=None, difficult="skip"
):
    """Dispatch to an adapter. ``synthetic`` is COCO in ``DIR/{split}.json`` with images beside it."""
    if fmt == "synthetic":
        return load_coco(Path(data) / f"{split}.json", images_dir)
    if fmt == "coco":
        return load_coco(data, images_dir)
    if fmt == "csv":
        return load_csv(data, images_dir, classes)
    if fmt == "voc":
        return load_voc(data, split, difficult, classes)
    raise ValueError(f"unknown format {fmt!r}; one of {DATASET_FORMATS}")
