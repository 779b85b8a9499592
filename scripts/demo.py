"""The whole chain on the built-in synthetic data, offline, on CPU: ``make demo``.

generate data -> train the small preset -> export TorchScript -> archive .mar -> start TorchServe
-> send the held-out images over HTTP -> served mAP beside in-process mAP -> draw one picture
-> scale workers 1 -> 2 -> 1 while requests flow (none lost) -> stop the server (also when interrupted).
"""

from __future__ import annotations

import argparse
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from export.formats import EXPORT_FORMATS, export, export_format
from handler.answer import Answer
from handler.detector import Detector
from handler.network import DEFAULT_FORMAT
from scripts.archive import archive
from scripts.client import Client
from scripts.client.draw import draw
from scripts.client.scale import TWIN_FILE, scale
from scripts.load import Images, Traffic
from scripts.paths import MODEL_STORE, ROOT
from scripts.serve import Server
from scripts.settings import ModelConfig
from train import synthetic
from train.__main__ import main as train_main
from train.data import check_records, load_coco
from train.metrics import coco_map


def say(msg: str) -> None:
    print(f"\n=== {msg}", flush=True)


def ground_truth(records) -> list[dict]:
    return [
        {
            "image_id": r.image_id,
            "width": r.size[0],
            "height": r.size[1],
            "boxes": r.boxes,
            "labels": r.labels,
        }
        for r in records
    ]


def as_detections(image_id: int, response: dict) -> dict:
    """One answer (its JSON) as ``train.metrics.coco_map`` takes detections."""
    dets = Answer.from_json(response).detections
    return {
        "image_id": image_id,
        "boxes": [list(d.box) for d in dets],
        "scores": [d.score for d in dets],
        "labels": [d.class_id for d in dets],
    }


def _interrupt(signum, frame) -> None:
    """SIGTERM unwinds through the ``finally`` that stops TorchServe, as Ctrl-C does."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m scripts.demo", description=__doc__)
    p.add_argument("--name", default="effdet_demo")
    p.add_argument("--data", default=str(ROOT / "data" / "synthetic"))
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--train-images", type=int, default=400)
    p.add_argument("--val-images", type=int, default=60)
    p.add_argument("--image-size", type=int, help="square input size (multiple of 128); default: the model's")
    # where the outputs go (the repository's runs/ and model_store/ by default, as `make demo`)
    p.add_argument("--runs", default=str(ROOT / "runs"), help="the run is written to RUNS/NAME")
    p.add_argument("--model-store", default=str(MODEL_STORE), help="the archive goes here")
    p.add_argument(
        "--format",
        choices=tuple(EXPORT_FORMATS),
        default=DEFAULT_FORMAT,
        help="the network format exported, archived and served (onnx: ONNX Runtime, fastest on a CPU)",
    )
    a = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.time()
    run = Path(a.runs) / a.name
    store = Path(a.model_store)

    say(f"1/7 synthetic dataset in {a.data}")
    synthetic.ensure(a.data, a.train_images, a.val_images)

    say(f"2/7 training the small preset for {a.epochs} epochs (Lightning's bar below)")
    size = ["--image-size", str(a.image_size)] if a.image_size else []
    card = train_main(["--data", a.data, "--format", "synthetic", "--model", "small", "--epochs", str(a.epochs),
                       *size, "--out", str(run)])  # fmt: skip
    print(f"val mAP@.5 after training: {card.metrics['val_map50']:.3f}")

    fmt = export_format(a.format)
    export_dir = run / fmt.out_dir
    say(f"3/7 export to {fmt.network.title} (parity vs eager effdet enforced)")
    exported = export(run / "best.ckpt", export_dir, fmt=fmt.name)
    print(
        f"parity max |diff| {exported.export['parity']['max_abs_diff']:.2e}, {exported.export['bytes'] / 1e6:.1f} MB"
    )

    say("4/7 archive with torch-model-archiver")
    mar = archive(export_dir, a.name, "1.0", store, ModelConfig(batch_size=4, max_batch_delay=20))
    print(f"wrote {mar}")

    server = Server(run / "serve", store, free_ports=True)
    try:
        say("5/7 TorchServe up, held-out images over HTTP")
        server.start([f"{a.name}={mar.name}"])
        client = Client(server.inference_url, server.management_url, server.key_file)
        val = check_records(load_coco(Path(a.data) / "val.json"), name="val")
        images = [r.image.read_bytes() for r in val.records]
        with ThreadPoolExecutor(4) as pool:
            responses = list(pool.map(lambda b: client.predict(a.name, b, score_threshold=0.0), images))
        failed = [r.status_code for r in responses if not r.ok]
        if failed:
            raise SystemExit(f"{len(failed)} requests failed: {failed[:5]}")
        served = [
            as_detections(r.image_id, resp.json()) for r, resp in zip(val.records, responses, strict=True)
        ]
        detector = Detector(export_dir / fmt.network.file)
        local = detector.predict(images, score_threshold=0.0)
        in_process = [as_detections(r.image_id, resp) for r, resp in zip(val.records, local, strict=True)]
        gt = ground_truth(val.records)
        n = len(val.classes)
        served_map, local_map = coco_map(gt, served, n), coco_map(gt, in_process, n)
        print(f"served over HTTP : mAP@[.5:.95] {served_map['map']:.4f}  mAP@.5 {served_map['map50']:.4f}")
        print(f"in-process       : mAP@[.5:.95] {local_map['map']:.4f}  mAP@.5 {local_map['map50']:.4f}")
        if abs(served_map["map"] - local_map["map"]) > 1e-6:
            raise SystemExit("served and in-process mAP disagree")
        print("served == in-process")

        say("6/7 one picture with its boxes")
        picture = run / "demo.png"
        first = val.records[0]
        best = client.predict(a.name, first.image.read_bytes(), score_threshold=0.3).json()
        draw(first.image, best, picture)
        print(f"{len(best['detections'])} boxes drawn on {picture}")

        say("7/7 scaling workers 1 -> 2 -> 1 while requests flow (scale-down drains: nothing lost)")
        load = Traffic(lambda: Client(server.inference_url, server.management_url, server.key_file), a.name,
                       Images.cycle(images), threads=2)  # fmt: skip
        with load:
            for n_workers in (2, 1):
                step = scale(client, a.name, n_workers, store)
                workers = client.describe(a.name)[0]["workers"]
                print(
                    f"scaled {step.workers_before} -> {n_workers} ({step.method}, {step.seconds:.1f} s): "
                    f"version {step.version}, workers now {len(workers)}"
                )
                load.answered_after(time.monotonic(), timeout=60)
        summary = load.summary()
        print(f"requests during scaling: {summary}")
        if summary["requests"] != summary["by_status"].get("200", 0) or summary["unanswered"]:
            raise SystemExit("a request failed while scaling")
    finally:
        say("stopping TorchServe")
        server.stop()
        # a scale-down left the model served as its twin version: the file is only needed while served
        (store / f"{a.name}{TWIN_FILE}.mar").unlink(missing_ok=True)
    print(f"\ndemo done in {(time.time() - started) / 60:.1f} min; artefacts in {run}")


if __name__ == "__main__":
    main()
