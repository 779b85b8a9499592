"""Dataset adapters parse fixtures made here; every annotation problem names its file and row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from train import synthetic
from train.data import AnnotationError, check_records, load_coco, load_csv, load_voc, split_records


def _image(path: Path, size=(100, 80), exif_orientation: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, (120, 30, 200))
    if exif_orientation:
        exif = Image.Exif()
        exif[274] = exif_orientation
        img.save(path, exif=exif)
    else:
        img.save(path)
    return path


def _csv(tmp_path: Path, rows: list[str], header="image,xmin,ymin,xmax,ymax,label") -> Path:
    p = tmp_path / "boxes.csv"
    p.write_text("\n".join([header, *rows]) + "\n")
    return p


# -- CSV ---------------------------------------------------------------------------------------------
def test_csv_groups_rows_by_image_and_keeps_negatives(tmp_path):
    _image(tmp_path / "a.jpg")
    _image(tmp_path / "b.jpg")
    p = _csv(tmp_path, ["a.jpg,10,10,50,40,car", "a.jpg,60,20,90,70,bus", "b.jpg,,,,,"])
    ds = check_records(load_csv(p))
    assert ds.classes == ["bus", "car"]
    by_name = {r.image.name: r for r in ds.records}
    assert by_name["a.jpg"].boxes == [[10, 10, 50, 40], [60, 20, 90, 70]]
    assert by_name["a.jpg"].labels == [2, 1]
    assert by_name["b.jpg"].boxes == []
    assert ds.summary["negative images (no boxes)"] == 1


def test_csv_without_label_column_is_one_class(tmp_path):
    _image(tmp_path / "img" / "a.jpg")
    p = _csv(tmp_path, ["a.jpg,1,2,30,40"], header="image,xmin,ymin,xmax,ymax")
    ds = check_records(load_csv(p, images_dir=tmp_path / "img"))
    assert ds.classes == ["object"] and ds.records[0].labels == [1]


@pytest.mark.parametrize(
    "row, expected",
    [
        ("a.jpg,50,10,40,30,car", "line 2: degenerate box"),
        ("missing.jpg,1,1,5,5,car", "missing.jpg: image file not found"),
        ("a.jpg,200,200,300,300,car", "lies outside the 100x80 image"),
        ("a.jpg,x,1,5,5,car", "line 2: box columns must be numbers"),
    ],
)
def test_csv_problems_name_file_and_line(tmp_path, row, expected):
    _image(tmp_path / "a.jpg")
    p = _csv(tmp_path, [row])
    with pytest.raises(AnnotationError) as e:
        check_records(load_csv(p))
    assert expected in str(e.value)
    assert f"{p}:line 2" in str(e.value)


def test_csv_unknown_label_when_classes_are_given(tmp_path):
    _image(tmp_path / "a.jpg")
    p = _csv(tmp_path, ["a.jpg,1,1,5,5,car", "a.jpg,1,1,5,5,plane"])
    with pytest.raises(AnnotationError, match=r"line 3: unknown label 'plane'"):
        load_csv(p, classes=["car"])


def test_unreadable_image_is_named(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"\xff\xd8\xffnot really a jpeg")
    p = _csv(tmp_path, ["a.jpg,1,1,5,5,car"])
    with pytest.raises(AnnotationError, match=r"a.jpg: unreadable image"):
        check_records(load_csv(p))


def test_clipping_is_counted_not_silent(tmp_path):
    _image(tmp_path / "a.jpg")
    p = _csv(tmp_path, ["a.jpg,-5,10,120,40,car"])
    ds = check_records(load_csv(p))
    assert ds.records[0].boxes == [[0.0, 10.0, 100.0, 40.0]]
    assert ds.summary["boxes clipped to the image"] == 1


def test_skip_bad_skips_and_counts(tmp_path):
    _image(tmp_path / "a.jpg")
    p = _csv(tmp_path, ["a.jpg,1,1,5,5,car", "a.jpg,9,9,2,2,car", "gone.jpg,1,1,5,5,car"])
    ds = check_records(load_csv(p), skip_bad=True)
    assert [r.image.name for r in ds.records] == ["a.jpg"]
    assert ds.records[0].boxes == [[1, 1, 5, 5]]
    assert ds.summary["boxes skipped"] == 1 and ds.summary["images skipped"] == 1


def test_empty_dataset_is_an_error(tmp_path):
    p = _csv(tmp_path, [])
    with pytest.raises(AnnotationError, match="empty dataset"):
        check_records(load_csv(p))


def test_exif_orientation_is_applied_to_image_size(tmp_path):
    _image(tmp_path / "a.jpg", size=(100, 80), exif_orientation=6)  # rotated 90 degrees on display
    p = _csv(tmp_path, ["a.jpg,1,1,70,90,car"])
    ds = check_records(load_csv(p))
    assert ds.records[0].size == (80, 100)
    assert ds.records[0].boxes == [[1, 1, 70, 90]]  # inside the displayed 80x100 image, not clipped


# -- COCO --------------------------------------------------------------------------------------------
def _coco(tmp_path: Path, annotations: list[dict], categories=None) -> Path:
    _image(tmp_path / "a.jpg")
    data = {
        "images": [{"id": 7, "file_name": "a.jpg", "width": 100, "height": 80}],
        "annotations": annotations,
        "categories": categories or [{"id": 3, "name": "cat"}, {"id": 1, "name": "dog"}],
    }
    p = tmp_path / "ann.json"
    p.write_text(json.dumps(data))
    return p


def test_coco_xywh_to_xyxy_and_one_based_ids_in_category_order(tmp_path):
    p = _coco(
        tmp_path,
        [
            {"id": 1, "image_id": 7, "category_id": 3, "bbox": [10, 20, 30, 40], "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 1, "bbox": [0, 0, 5, 5]},
            {"id": 3, "image_id": 7, "category_id": 1, "bbox": [0, 0, 50, 50], "iscrowd": 1},
        ],
    )
    ds = check_records(load_coco(p))
    assert ds.classes == ["dog", "cat"]
    assert ds.records[0].boxes == [[10, 20, 40, 60], [0, 0, 5, 5]]
    assert ds.records[0].labels == [2, 1]
    assert ds.summary["crowd boxes skipped"] == 1


def test_coco_unknown_category_names_annotation_id(tmp_path):
    p = _coco(tmp_path, [{"id": 42, "image_id": 7, "category_id": 99, "bbox": [1, 1, 2, 2]}])
    with pytest.raises(AnnotationError, match=r"annotation id 42: unknown category id 99"):
        load_coco(p)


def test_coco_degenerate_box_names_annotation_id(tmp_path):
    p = _coco(tmp_path, [{"id": 5, "image_id": 7, "category_id": 1, "bbox": [1, 1, 0, 3]}])
    with pytest.raises(AnnotationError, match=r"annotation id 5: degenerate box"):
        check_records(load_coco(p))


# -- VOC ---------------------------------------------------------------------------------------------
def _voc(tmp_path: Path) -> Path:
    root = tmp_path / "VOC"
    objects = {
        "0001": [("car", 11, 21, 50, 60, 0), ("person", 1, 1, 10, 10, 1)],
        "0002": [("person", 5, 5, 30, 30, 0)],
    }
    for image_id, objs in objects.items():
        _image(root / "JPEGImages" / f"{image_id}.jpg")
        xml = "".join(
            f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
            f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
            for n, x1, y1, x2, y2, d in objs
        )
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><filename>{image_id}.jpg</filename>{xml}</annotation>"
        )
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "train.txt").write_text("0001\n")
    (root / "ImageSets" / "Main" / "val.txt").write_text("0002\n")
    return root


def test_voc_parses_splits_and_skips_difficult_explicitly(tmp_path):
    root = _voc(tmp_path)
    train = check_records(load_voc(root, "train"))
    assert train.classes == ["car"]  # the only non-difficult object of the split
    assert train.records[0].boxes == [[10, 20, 50, 60]]  # 1-based inclusive -> 0-based
    assert train.summary["difficult boxes skipped"] == 1
    kept = check_records(load_voc(root, "train", difficult="keep"))
    assert kept.classes == ["car", "person"] and len(kept.records[0].boxes) == 2
    val = check_records(load_voc(root, "val", classes=kept.classes))
    assert val.records[0].labels == [2]


def test_voc_unknown_label_names_xml_and_object(tmp_path):
    root = _voc(tmp_path)
    with pytest.raises(AnnotationError, match=r"0002.xml:object 1: unknown label 'person'"):
        load_voc(root, "val", classes=["car"])


# -- synthetic ---------------------------------------------------------------------------------------
def test_synthetic_is_deterministic_and_has_negatives(tmp_path):
    a = synthetic.generate(tmp_path / "a", train=16, val=4, seed=3)
    b = synthetic.generate(tmp_path / "b", train=16, val=4, seed=3)
    assert (a / "train.json").read_text() == (b / "train.json").read_text()
    assert (a / "images" / "train_00003.jpg").read_bytes() == (b / "images" / "train_00003.jpg").read_bytes()
    ds = check_records(load_coco(a / "train.json"))
    assert ds.classes == list(synthetic.CLASSES)
    assert len({r.size for r in ds.records}) > 1  # several image sizes
    assert len({label for r in ds.records for label in r.labels}) == 3
    big = check_records(load_coco(synthetic.generate(tmp_path / "c", train=64, val=1, seed=0) / "train.json"))
    assert big.summary["negative images (no boxes)"] > 0


def test_split_records_is_deterministic_and_disjoint(tmp_path):
    from train.data import Record

    records = [Record(image=Path(f"{i}.jpg")) for i in range(20)]
    train, val = split_records(records, 0.25, seed=1)
    train2, val2 = split_records(records, 0.25, seed=1)
    assert [r.image for r in val] == [r.image for r in val2] and len(val) == 5
    assert not {r.image for r in train} & {r.image for r in val}
    assert len(train) + len(val) == 20 and [r.image for r in train] == [r.image for r in train2]
