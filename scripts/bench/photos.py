"""Real photo sizes: the handler's steps per image size, served throughput per size, a served
worker's memory for one 40 MP image, and accuracy on held-out scenes at phone size.

The photos are the bench's synthetic scenes at camera sizes with sensor-like grain
(``train.synthetic.as_photo``): the same scenes at every size, so that the sizes differ in
pixels only. Sizes take turns call by call (and request block by request block when served), so
a busy machine slows them alike and the ratios between sizes hold within one run.
"""

from __future__ import annotations

import io
import json
import random
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

from scripts.bench.parity import BenchError, match_detections
from scripts.bench.timing import Progress, summarize, sync
from scripts.bench.workload import Workload, cycle

DEFAULT_SIZES = ((640, 480), (1920, 1080), (4032, 3024))
STEPS = ("decode", "letterbox", "network", "post", "answer")
PHOTO_SIZE = (4032, 3024)  # the accuracy check's phone size (longer side, aspect kept per scene)
MIN_SCORE, MIN_IOU = 0.3, 0.9
TARGET_AGREEMENT = 0.99
TARGET_MAP_DELTA = 0.01


def parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """``640x480,1920x1080`` -> ((640, 480), (1920, 1080)): widths x heights in pixels."""
    out = []
    for part in text.replace(" ", "").lower().split(","):
        if part:
            w, _, h = part.partition("x")
            if not (w.isdigit() and h.isdigit()) or int(w) < 1 or int(h) < 1:
                raise ValueError(f"image size {part!r} is not WIDTHxHEIGHT")
            out.append((int(w), int(h)))
    if not out:
        raise ValueError("no image size given")
    return tuple(out)


def label(size: Sequence[int]) -> str:
    return f"{size[0]}x{size[1]}"


def make_photos(count: int, size: tuple[int, int], seed: int = 0, quality: int = 90) -> list[bytes]:
    """``count`` distinct synthetic scenes as JPEG photos of exactly ``size`` (w, h); the same scenes
    (and grain seeds) for every size."""
    from train.synthetic import as_photo, make_image

    rng = random.Random(seed)
    out = []
    for i in range(count):
        img, _ = make_image(rng)
        buf = io.BytesIO()
        as_photo(img, size, seed=seed * 1000 + i).save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


# -- in-process: the handler and its steps, per size --------------------------------------------------


def handler_steps(det, datas: Sequence[bytes]) -> dict[str, float]:
    """One batch through the handler's steps, each timed (seconds, device synced): ``decode``
    (bytes -> ``Decoded``), ``letterbox`` (-> the padded network batch), ``network``, ``post``
    (top-k, NMS, rescale; results on the host) and ``answer`` (the JSON answers as TorchServe sends
    them). The handler runs these with the same arguments; this times them apart."""
    params = [det.defaults] * len(datas)
    marks = [time.perf_counter()]

    def mark() -> None:
        sync(det.device)
        marks.append(time.perf_counter())

    decoded = det.decode_batch(datas)
    if any(not hasattr(d, "pixels") for d in decoded):
        raise BenchError(
            f"a bench photo did not decode: {[str(d) for d in decoded if not hasattr(d, 'pixels')]}"
        )
    mark()
    batch, img_scale, img_size = det.preprocess(decoded)
    mark()
    cls_out, box_out = det.forward(batch)
    mark()
    n = len(datas)
    dets = det.postprocess(
        [c[:n] for c in cls_out], [b[:n] for b in box_out], img_scale, img_size,
        [p.iou_threshold for p in params], [p.score_threshold for p in params],
    ).cpu()  # fmt: skip
    mark()
    [json.dumps(a) for a in det.to_responses(dets, [d.size for d in decoded], params)]
    mark()
    return {step: marks[i + 1] - marks[i] for i, step in enumerate(STEPS)}


def bench_photos(
    w: Workload,
    photos: dict[tuple[int, int], list[bytes]],
    batches: Sequence[int],
    repeats: int,
    warmup: int,
    progress: Progress,
    threads: int | None,
    decode: str = "auto",
) -> list[dict]:
    """Per size and batch: ``EffDetHandler.handle`` (bytes in, JSON text out) and, apart, the
    share of each of its steps. Sizes take turns call by call. Each row also gives its handler time
    against the first size's at the same batch (``over_first``)."""
    from scripts.bench.stages import check_answers, make_handler

    handler, ctx = make_handler(w, threads, decode)
    det = handler.detector
    progress.stage("photos: handler per image size", len(batches) * len(photos) * (repeats + warmup))
    out = []
    for b in batches:
        rows = {size: [{"body": img} for img in cycle(datas, b)] for size, datas in photos.items()}
        handle_s = {size: [] for size in photos}
        steps_s = {size: {step: [] for step in STEPS} for size in photos}
        for i in range(warmup + repeats):
            for size, batch_rows in rows.items():
                sync(w.device)
                t = time.perf_counter()
                answers = [json.dumps(a) for a in handler.handle(batch_rows, ctx)]
                sync(w.device)
                seconds = time.perf_counter() - t
                steps = handler_steps(det, [r["body"] for r in batch_rows])
                if i == 0:
                    check_answers([json.loads(a) for a in answers], b)
                if i >= warmup:
                    handle_s[size].append(seconds)
                    for step, s in steps.items():
                        steps_s[size][step].append(s)
                progress.tick(f"{label(size)} b={b}")
        first = None
        for size in photos:
            med = {step: statistics.median(v) for step, v in steps_s[size].items()}
            total = sum(med.values())
            row = {
                "size": list(size),
                "megapixels": size[0] * size[1] / 1e6,
                "jpeg_kb": statistics.fmean(len(x) for x in photos[size]) / 1024,
                **summarize(b, handle_s[size]),
                "steps_ms": {step: 1000 * v for step, v in med.items()},
                "shares": {step: v / total for step, v in med.items()},
            }
            row["decode_letterbox_share"] = row["shares"]["decode"] + row["shares"]["letterbox"]
            first = first or row
            row["over_first"] = row["median_s"] / first["median_s"]
            out.append(row)
    progress.end()
    return out


# -- served: throughput per size, and the worker's memory for one large image ----------------------------


def memory_probes(seed: int = 0) -> dict[str, tuple[bytes, str]]:
    """One 40 MP image per kind the worker decodes differently: a baseline JPEG (DCT-scaled while
    decoding), a progressive JPEG (libjpeg keeps every coefficient) and a PNG (decoded whole; without
    grain, so that it stays under TorchServe's 32 MiB request limit: the decode's memory is the same)."""
    from PIL import Image

    from train.synthetic import as_photo, make_image

    scene = make_image(random.Random(seed))[0]
    size = (7296, 5472)  # 39.9 MP
    photo = as_photo(scene, size, seed=seed)
    out = {}
    for name, img, fmt, kwargs in (
        ("jpeg_40mp", photo, "JPEG", {"quality": 90}),
        ("jpeg_40mp_progressive", photo, "JPEG", {"quality": 90, "progressive": True}),
        ("png_40mp", scene.resize(size, Image.BICUBIC), "PNG", {"compress_level": 1}),
    ):
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kwargs)
        out[name] = (buf.getvalue(), "image/png" if fmt == "PNG" else "image/jpeg")
    return out


def worker_peak_rise(server, mgmt, model: str, data: bytes, content_type: str) -> dict:
    """Send one image; the largest peak-RSS rise (VmHWM, reset first) among the model's workers,
    above each worker's RSS just before, in MiB. Linux only."""
    import psutil
    import requests

    pids = [w["pid"] for w in mgmt.describe(model)[0]["workers"]]
    before = {}
    for pid in pids:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := the current RSS
        before[pid] = psutil.Process(pid).memory_info().rss
    key = server.tokens()["inference"]
    r = requests.post(
        f"{server.inference_url}/predictions/{model}", data=data,
        headers={"Authorization": f"Bearer {key}", "Content-Type": content_type}, timeout=300,
    )  # fmt: skip
    if r.status_code != 200:
        raise BenchError(f"the memory probe was answered {r.status_code}: {r.text[:200]}")
    rise = {}
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                rise[pid] = int(line.split()[1]) * 1024 - before[pid]
    return {
        "bytes": len(data),
        "peak_rise_mib": max(rise.values()) / 2**20,
        "rss_before_mib": max(before.values()) / 2**20,
    }


def bench_served_photos(
    w: Workload,
    name: str,
    setting,
    photos: dict[tuple[int, int], list[bytes]],
    concurrency: int,
    requests: int,
    repeats: int,
    threads: int,
    workdir: Path,
    progress: Progress,
    memory: bool = True,
) -> dict:
    """One TorchServe, one .mar at ``setting``: a closed loop of ``requests`` per size at
    ``concurrency``, the sizes taking turns block by block (``repeats`` rounds after a warm-up of
    each), then (``memory``) the worker's peak-RSS rise for one 40 MP image of each probe kind."""

    from handler.config import HandlerConfig
    from scripts.archive import archive
    from scripts.bench.load import ProcessCPU, aggregate, run_load
    from scripts.bench.served import _server_pid, bench_client, fresh_store, model_name, served_config
    from scripts.client import Client
    from scripts.serve import Server

    workdir = Path(workdir)
    store = fresh_store(workdir)
    cuda = w.device.type == "cuda"
    b, d, n = setting
    model = model_name(f"{name}_photos", setting)
    handler = HandlerConfig(precision=w.precision, torch_threads=None if cuda else max(1, threads // n))
    mar = archive(w.export_dir, model, "1.0", store, served_config(setting, cuda, handler))
    probes = memory_probes() if memory else {}
    server = Server(workdir / "ts", store, free_ports=True)
    try:
        progress.note("photos: starting TorchServe")
        server.start()
        mgmt = Client(server.inference_url, server.management_url, server.key_file)
        r = mgmt.register(mar.name, initial_workers=n)
        if not r.ok:
            raise BenchError(f"TorchServe refused {mar.name}: {r.status_code} {r.text[:300]}")
        cpu = ProcessCPU(_server_pid(server))
        clients = bench_client(server, timeout=300)
        progress.stage("photos: served per image size", len(photos) * (1 + repeats) + len(probes))
        for size, datas in photos.items():
            run_load(clients, model, datas, concurrency, max(2 * concurrency, 3 * b * n))
            progress.tick(f"{label(size)} warm-up")
        reps = {size: [] for size in photos}
        for _ in range(repeats):
            for size, datas in photos.items():
                reps[size].append(
                    run_load(clients, model, datas, concurrency, max(requests, concurrency), cpu)
                )
                progress.tick(label(size))
        points = []
        for size, runs in reps.items():
            point = aggregate(runs)
            point.pop("throughputs", None)
            points.append({"size": list(size), **point})
        for p in points:
            p["over_first"] = p["throughput"] / points[0]["throughput"] if points[0]["throughput"] else None
        mem = {}
        for probe, (data, content_type) in probes.items():
            mem[probe] = worker_peak_rise(server, mgmt, model, data, content_type)
            progress.tick(probe)
        progress.end()
    finally:
        progress.note("photos: stopping TorchServe")
        server.stop()
    return {"batch_size": b, "max_batch_delay": d, "workers": n, "concurrency": concurrency, "points": points,
            "memory": mem}  # fmt: skip


# -- accuracy at phone size ---------------------------------------------------------------------------


def heldout(data_dir: Path | None, out: Path, seed: int = 0) -> Path:
    """The held-out split (COCO ``val.json``): ``data_dir``'s, else the demo's 60 held-out scenes
    (``train.synthetic``'s val split for ``seed``), written once under ``out``."""
    if data_dir is not None:
        if not (Path(data_dir) / "val.json").is_file():
            raise SystemExit(f"--photo-data {data_dir}: no val.json there")
        return Path(data_dir) / "val.json"
    from train.synthetic import write_split

    target = out / f"heldout-seed{seed}"
    if not (target / "val.json").is_file():
        write_split(target, "val", 60, random.Random(seed + 1_000_003))  # as train.synthetic.generate
    return target / "val.json"


def as_phone(
    data: bytes, boxes: list[list[float]], longer: int, seed: int
) -> tuple[bytes, list[list[float]]]:
    """An image upscaled to a phone's size (longer side ``longer``, aspect kept) with grain, as a
    JPEG (quality 90); its boxes scaled alike along each axis."""
    from PIL import Image

    from train.synthetic import as_photo

    img = Image.open(io.BytesIO(data))
    img.load()
    scale = longer / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    sx, sy = size[0] / img.width, size[1] / img.height
    buf = io.BytesIO()
    as_photo(img, size, seed=seed).save(buf, format="JPEG", quality=90)
    return buf.getvalue(), [[x1 * sx, y1 * sy, x2 * sx, y2 * sy] for x1, y1, x2, y2 in boxes]


def bench_accuracy(w: Workload, val_json: Path, progress: Progress, longer: int = PHOTO_SIZE[0]) -> dict:
    """mAP of the held-out scenes as they are and upscaled to a phone's size (boxes scaled alike),
    through the reduced decode; and the photos' detections against the same photos decoded whole
    (``Decoded.full``, the same resize otherwise): the share of the full decode's detections scoring
    >= 0.3 found again with the same class and IoU >= 0.9."""
    from handler.decode import Decoded, decode_image
    from train.data import check_records, load_coco
    from train.metrics import coco_map

    det = w.detector
    records = check_records(load_coco(val_json)).records
    if not any(r.boxes for r in records):
        raise BenchError(f"{val_json}: no boxes to score")
    progress.stage(f"accuracy: {len(records)} held-out scenes at {longer} px", len(records))
    gt = {"original": [], "photo": []}
    dets = {"original": [], "photo": [], "full_decode": []}
    matched = total = 0
    pixels = {"reduced": 0, "full": 0}
    for rec in records:
        data = rec.image.read_bytes()
        photo, boxes = as_phone(data, rec.boxes, longer, seed=rec.image_id)
        reduced, full = det.decode(photo), Decoded.full(decode_image(photo, det.device).pixels)
        pixels["reduced"] += reduced.pixels[0].numel()
        pixels["full"] += full.pixels[0].numel()
        answers = {
            "original": det.predict([data], score_threshold=0.0)[0],
            "photo": det.predict([reduced], score_threshold=0.0)[0],
            "full_decode": det.predict([full], score_threshold=0.0)[0],
        }
        for key, boxes_of in (("original", rec.boxes), ("photo", boxes)):
            width, height = answers[key]["image"]["width"], answers[key]["image"]["height"]
            gt[key].append({"image_id": rec.image_id, "width": width, "height": height,
                            "boxes": boxes_of, "labels": rec.labels})  # fmt: skip
        for key, a in answers.items():
            dets[key].append({
                "image_id": rec.image_id,
                "boxes": [d["box"] for d in a["detections"]],
                "scores": [d["score"] for d in a["detections"]],
                "labels": [d["class_id"] for d in a["detections"]],
            })  # fmt: skip
        ref = [d for d in answers["full_decode"]["detections"] if d["score"] >= MIN_SCORE]
        m, t = match_detections(ref, answers["photo"]["detections"], MIN_IOU)
        matched, total = matched + m, total + t
        progress.tick(rec.image.name)
    progress.end()
    if total == 0:
        raise BenchError(f"accuracy check compared nothing: no full-decode detection scored >= {MIN_SCORE}")
    n_cls = w.card.num_classes
    maps = {
        "original": coco_map(gt["original"], dets["original"], n_cls),
        "photo": coco_map(gt["photo"], dets["photo"], n_cls),
        "full_decode": coco_map(gt["photo"], dets["full_decode"], n_cls),
    }
    delta = maps["photo"]["map50"] - maps["original"]["map50"]
    return {
        "images": len(records),
        "val_json": str(val_json),
        "photo_longer_side": longer,
        "decoded_pixels_share": pixels["reduced"] / pixels["full"],
        "map50": {k: v["map50"] for k, v in maps.items()},
        "map": {k: v["map"] for k, v in maps.items()},
        "delta_map50": delta,
        "min_score": MIN_SCORE,
        "min_iou": MIN_IOU,
        "full_decode_detections": total,
        "matched": matched,
        "agreement": matched / total,
        "met": abs(delta) <= TARGET_MAP_DELTA and matched / total >= TARGET_AGREEMENT,
    }
