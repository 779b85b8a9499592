"""The command line: arguments, the stages in order, the JSON written first, then table and plot."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from handler.network import DEFAULT_FORMAT, NETWORK_FORMATS
from scripts.bench.overload import OVERLOAD_SETTING, bench_overload_served
from scripts.bench.parity import BenchError
from scripts.bench.photos import DEFAULT_SIZES, parse_sizes
from scripts.bench.report import plot, ratio_lines, ratios, report
from scripts.bench.served import ServedSetting, bench_served
from scripts.bench.stages import bench_effdet, bench_fp16, bench_handler, bench_models, bench_post
from scripts.bench.timing import Progress
from scripts.bench.workload import Workload, make_images, network_for, prepare, resolve_export
from scripts.paths import ROOT

STAGES = (
    "model",
    "effdet",
    "post",
    "handler",
    "fp16",
    "served",
    "null",
    "photos",
    "photos_served",
    "accuracy",
    "overload",
)
# What a run without --stages does (~10 min on 2 CPU cores): the photo, accuracy and overload
# stages take minutes more each and are asked for by name (or with --stages all).
DEFAULT_STAGES = ("model", "effdet", "post", "handler", "fp16", "served", "null")


FULL = {
    "batches": (1, 8, 32),
    "repeats": 5,
    "warmup": 3,
    "configs": tuple(ServedSetting(*c) for c in ((1, 0, 1), (4, 10, 1), (8, 20, 1), (4, 10, 2), (1, 0, 2))),
    "concurrency": (1, 4, 8),
    "requests": 64,
    "served_repeats": 3,
    "train_steps": 300,
    "overload": (32, 128, 2.0, 30.0),
}


QUICK = {
    "batches": (1, 8),
    "repeats": 2,
    "warmup": 3,  # TorchScript's profiling executor optimises on the 2nd-3rd call per shape
    "configs": (ServedSetting(1, 0, 1), ServedSetting(4, 10, 1)),
    "concurrency": (1, 4),
    "requests": 16,
    "served_repeats": 1,
    "train_steps": 150,
    "overload": (8, 32, 1.0, 8.0),
}


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.replace(" ", "").split(",") if x)


def _overload(text: str) -> tuple[float, ...]:
    """``CAPACITY_CLIENTS:CLIENTS:DEADLINE_S:SECONDS[:WARMUP_S]`` -> the overload stage's point."""
    parts = text.replace(" ", "").split(":")
    if len(parts) not in (4, 5):
        raise argparse.ArgumentTypeError(
            f"CAPACITY_CLIENTS:CLIENTS:DEADLINE_S:SECONDS[:WARMUP_S], got {text!r}"
        )
    cap, clients, *seconds = parts
    return int(cap), int(clients), *(float(x) for x in seconds)


def _configs(text: str) -> tuple[ServedSetting, ...]:
    """``B:D:W,...`` -> served settings (batchSize, maxBatchDelay ms, workers)."""
    out = []
    for part in text.replace(" ", "").split(","):
        if part:
            b, d, n = (int(x) for x in part.split(":"))
            out.append(ServedSetting(b, d, n))
    return tuple(out)


def _sizes(text: str) -> tuple[tuple[int, int], ...]:
    try:
        return parse_sizes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m scripts.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--name", default="effdet_demo", help="run name: the export in runs/NAME/export is used if present"
    )
    p.add_argument("--export", help="an export directory (model.pt + model.json) to bench instead")
    p.add_argument(
        "--model", default="small", help="preset trained (or randomly initialised) when no export exists"
    )
    p.add_argument(
        "--weights",
        choices=("trained", "random"),
        default="trained",
        help="without an export: train --model on synthetic scenes here (default), or random heads",
    )
    p.add_argument(
        "--train-steps",
        type=int,
        help="training steps for --weights trained (default 300, quick 150; the learning rate warms up over the first 50)",
    )
    p.add_argument(
        "--train-batch-size", type=int, default=8, help="training batch size for --weights trained"
    )
    p.add_argument(
        "--train-precision",
        help="Lightning precision for --weights trained (default 16-mixed on CUDA, 32-true on the CPU)",
    )
    p.add_argument(
        "--null-configs",
        type=_configs,
        help="settings batch:delay_ms:workers,... of the null-handler point (default: the served setting "
        "with the largest batch x workers)",
    )
    p.add_argument("--num-classes", type=int, default=3, help="classes of the random-weight model")
    p.add_argument(
        "--image-size", type=int, help="input size of the random-weight model (default: the preset's)"
    )
    p.add_argument("--quick", action="store_true", help="tiny repeats and fewer settings: a smoke run")
    p.add_argument(
        "--stages",
        default=",".join(DEFAULT_STAGES),
        help=f"comma-separated subset of {','.join(STAGES)}, or all (default {','.join(DEFAULT_STAGES)})",
    )
    p.add_argument(
        "--formats",
        default=DEFAULT_FORMAT,
        help=f"network formats side by side in the model, handler and served stages: any of {','.join(NETWORK_FORMATS)} "
        "(exported here from the export's checkpoint when none matches beside it: minutes for aoti). "
        "TorchScript always runs: effdet, post-processing and fp16 read its weights",
    )
    p.add_argument("--batches", type=_ints, help="batch sizes for stages 1-4 (default 1,8,32)")
    p.add_argument("--repeats", type=int, help="timed repeats per figure (default 5)")
    p.add_argument("--warmup", type=int, help="untimed calls before each figure (default 3)")
    p.add_argument(
        "--configs",
        type=_configs,
        help="served settings batch:delay_ms:workers,... (default 1:0:1,4:10:1,8:20:1,4:10:2,1:0:2)",
    )
    p.add_argument("--concurrency", type=_ints, help="client concurrencies (default 1,4,8)")
    p.add_argument("--requests", type=int, help="requests per served repeat (default 64)")
    p.add_argument("--served-repeats", type=int, help="repeats per served point (default 3)")
    p.add_argument(
        "--overload",
        type=_overload,
        help="overload stage: capacity clients:clients:deadline s:window s[:warm-up s before each window, "
        "default max(5, 3 x deadline)] (default "
        f"{':'.join(f'{x:g}' for x in FULL['overload'])}; quick {':'.join(f'{x:g}' for x in QUICK['overload'])})",
    )
    p.add_argument("--images", type=int, help="distinct JPEG images (default: the largest batch)")
    p.add_argument("--image-side", type=int, default=640, help="longer side of the JPEG images in px")
    p.add_argument(
        "--image-sizes",
        type=_sizes,
        default=DEFAULT_SIZES,
        help="photos stages: WIDTHxHEIGHT,... of the photo JPEGs, the first the reference the others are "
        f"compared with (default {','.join(f'{w}x{h}' for w, h in DEFAULT_SIZES)})",
    )
    p.add_argument(
        "--photo-config",
        type=_configs,
        help="photos_served stage: the served setting batch:delay_ms:workers (default: the null handler's)",
    )
    p.add_argument(
        "--photo-concurrency", type=int, help="photos_served stage: client concurrency (default: the largest)"
    )
    p.add_argument(
        "--no-photo-memory",
        action="store_true",
        help="photos_served stage: skip the served worker's peak RSS for one 40 MP JPEG, progressive JPEG and PNG",
    )
    p.add_argument(
        "--photo-data",
        help="accuracy stage: a directory with a COCO val.json of held-out images (default: the demo's "
        "60 held-out synthetic scenes, generated)",
    )
    p.add_argument("--threads", type=int, help="torch threads in-process; served workers get threads/workers")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--precision", choices=("fp32", "fp16"), default="fp32", help="fp16 needs --device cuda")
    p.add_argument(
        "--channels-last", action="store_true", help="channels_last for the ceiling and effdet eager"
    )
    p.add_argument(
        "--decode", choices=("auto", "cpu"), default="auto", help="in-process handler: cpu turns nvjpeg off"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "runs" / "bench"), help="where the JSON and PNG go")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    preset = QUICK if a.quick else FULL
    for key, value in preset.items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    a.stages = STAGES if a.stages == "all" else tuple(s for s in a.stages.replace(" ", "").split(",") if s)
    unknown = set(a.stages) - set(STAGES)
    if unknown:
        p.error(f"unknown stages {sorted(unknown)}; choose from {', '.join(STAGES)}")
    asked = [f for f in a.formats.replace(" ", "").split(",") if f]
    if set(asked) - set(NETWORK_FORMATS):
        p.error(
            f"unknown formats {sorted(set(asked) - set(NETWORK_FORMATS))}; choose from {', '.join(NETWORK_FORMATS)}"
        )
    a.formats = (DEFAULT_FORMAT, *(f for f in NETWORK_FORMATS if f in asked and f != DEFAULT_FORMAT))
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible to torch here")
    if a.precision == "fp16" and not a.device.startswith("cuda"):
        p.error("--precision fp16 needs --device cuda (the CPU path is fp32)")
    if a.train_precision is None:
        a.train_precision = "16-mixed" if a.device.startswith("cuda") else "32-true"
    if a.null_configs is None:
        a.null_configs = (max(a.configs, key=lambda s: (s.batch_size * s.workers, s.workers)),)
    a.photo_config = a.photo_config[0] if a.photo_config else a.null_configs[0]
    if a.photo_concurrency is None:
        a.photo_concurrency = max(a.concurrency)
    if a.threads is None:
        a.threads = os.cpu_count() or 1
    if a.images is None:
        a.images = max(8, max(a.batches))
    if min(a.batches) < 1 or a.repeats < 1 or a.warmup < 0:
        p.error("batches and repeats must be >= 1, warmup >= 0")
    return a


def _git_rev() -> str | None:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True)
        return (
            rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if rev.returncode == 0 else None
        )
    except OSError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def network_info(w: Workload) -> dict:
    """What the network file is: its format, size, load time here, and what its export recorded."""
    e = w.card.export
    return {
        "file": str(w.network),
        "mb": round(w.network.stat().st_size / 1e6, 1),
        "load_s": round(w.load_s, 3),
        "compile_s": e.get("compile_seconds"),
        "device": e.get("device"),
        "precision": e.get("precision"),
        "parity_max_abs_diff": (e.get("parity") or {}).get("max_abs_diff"),
        "parity_tolerance": (e.get("parity") or {}).get("tolerance"),
    }


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    previous_handler, previous_threads = None, torch.get_num_threads()
    if threading.current_thread() is threading.main_thread():
        # SIGTERM unwinds through the finally that stops TorchServe, as Ctrl-C does
        previous_handler = signal.signal(signal.SIGTERM, _interrupt)
    try:
        torch.set_num_threads(a.threads)
        return run(a, argv)
    finally:
        torch.set_num_threads(previous_threads)
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)


def run(a: argparse.Namespace, argv: list[str] | None = None) -> dict:
    """The whole benchmark for parsed arguments; returns what it writes to the JSON."""
    device = torch.device(a.device)
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    progress = Progress(enabled=not a.no_progress)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    meta = {
        "stamp": stamp,
        "argv": list(sys.argv[1:] if argv is None else argv),
        "quick": a.quick,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": a.threads,
        "precision": a.precision,
        "channels_last": a.channels_last,
        "decode": a.decode,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git": _git_rev(),
        "loadavg_start": _loadavg(),
        "repeats": a.repeats,
        "warmup": a.warmup,
        "served_repeats": a.served_repeats,
        "requests_per_repeat": a.requests,
        "images": a.images,
        "image_side": a.image_side,
        "image_sizes": [list(s) for s in a.image_sizes],
        "formats": list(a.formats),
    }
    export_dir, origin = resolve_export(a, progress)
    progress.note(f"model {export_dir} ({origin}); preparing {a.images} images")
    images = make_images(a.images, a.image_side, a.seed)
    w = prepare(export_dir, images, a.batches, device, a.precision, a.channels_last)
    more = []
    for f in a.formats[1:]:
        # a format that cannot run at the asked precision (ONNX here: fp32 only) runs at fp32, and says so
        precision = a.precision if a.precision in NETWORK_FORMATS[f].precisions else "fp32"
        network = network_for(export_dir, f, device, precision, progress)
        more.append(prepare(network, images, a.batches, device, precision, a.channels_last))
    cfg = w.cfg
    meta["export_dir"] = str(export_dir)
    meta["model"] = {
        "name": w.card.name,
        "origin": origin,
        "backbone": cfg["backbone_name"],
        "image_size": list(cfg["image_size"]),
        "num_classes": cfg["num_classes"],
        "max_detection_points": cfg["max_detection_points"],
        "max_det_per_image": cfg["max_det_per_image"],
    }
    results: dict = {"meta": meta}
    if more:
        results["formats"] = {x.fmt: network_info(x) for x in (w, *more)}
    failures: dict[str, str] = {}

    def stage(name: str, fn) -> None:
        """Run one stage; a refused result (BenchError) is recorded and the later stages still run,
        so that one failed check does not lose a whole GPU session's figures. The run fails at the end."""
        try:
            fn()
        except BenchError as e:
            failures[name] = str(e)
            progress.note(f"stage {name} FAILED: {e}")

    def served_and_null() -> None:
        entries = bench_served(
            w,
            a.name,
            a.configs if "served" in a.stages else (),
            a.concurrency,
            a.requests,
            a.served_repeats,
            a.threads,
            out_dir / "serve",
            progress,
            null_configs=a.null_configs if "null" in a.stages else (),
            more=more,
        )
        if "served" in a.stages:
            results["served"] = [e for e in entries if e["kind"] == "model"]  # every format, by "format"
        if "null" in a.stages:
            results["null_handler"] = [e for e in entries if e["kind"] == "null"]

    def effdet() -> None:
        results["effdet"], meta["effdet_parity_max_abs_diff"] = bench_effdet(
            w, a.batches, a.repeats, a.warmup, progress
        )

    def model() -> None:
        by_format = bench_models({x.fmt: x for x in (w, *more)}, a.batches, a.repeats, a.warmup, progress)
        results["model"] = by_format.pop(w.fmt)
        for fmt, rows in by_format.items():
            results["formats"][fmt]["model"] = rows

    def handler() -> None:
        results["handler"] = bench_handler(w, a.batches, a.repeats, a.warmup, progress, a.threads, a.decode)
        for x in more:
            results["formats"][x.fmt]["handler"] = bench_handler(
                x, a.batches, a.repeats, a.warmup, progress, a.threads, a.decode
            )

    photos_by_size: dict = {}

    def photo_images() -> dict:
        from scripts.bench.photos import make_photos

        if not photos_by_size:
            progress.note(f"photos: making {a.images} JPEG photos at each of {len(a.image_sizes)} sizes")
            photos_by_size.update({size: make_photos(a.images, size, a.seed) for size in a.image_sizes})
        return photos_by_size

    def photos() -> None:
        from scripts.bench.photos import bench_photos

        results.setdefault("photos", {})["handler"] = bench_photos(
            w, photo_images(), a.batches, a.repeats, a.warmup, progress, a.threads, a.decode
        )

    def photos_served() -> None:
        from scripts.bench.photos import bench_served_photos

        results.setdefault("photos", {})["served"] = bench_served_photos(
            w, a.name, a.photo_config, photo_images(), a.photo_concurrency, a.requests, a.served_repeats,
            a.threads, out_dir / "serve", progress, memory=not a.no_photo_memory,
        )  # fmt: skip

    def accuracy() -> None:
        from scripts.bench.photos import bench_accuracy, heldout

        results["accuracy"] = bench_accuracy(w, heldout(a.photo_data, out_dir, a.seed), progress)

    def overload() -> None:
        cap, clients, deadline, seconds, *named = a.overload
        warmup = named[0] if named else max(5.0, 3 * deadline)  # the queue fills, the batch cost settles
        results["overload"] = bench_overload_served(
            w, a.name, OVERLOAD_SETTING, cap, clients, deadline, seconds, warmup, a.threads,
            out_dir / "overload", progress,
        )  # fmt: skip

    # Every stage's runner, in STAGES order ("served" and "null" share one TorchServe run).
    runners = {
        "model": model,
        "effdet": effdet,
        "post": lambda: results.__setitem__("post", bench_post(w, a.batches, a.repeats, a.warmup, progress)),
        "handler": handler,
        "fp16": lambda: results.__setitem__("fp16", bench_fp16(w, progress)),
        "served": served_and_null,
        "null": served_and_null,
        "photos": photos,
        "photos_served": photos_served,
        "accuracy": accuracy,
        "overload": overload,
    }
    assert set(runners) == set(STAGES), "every stage has a runner"
    todo: dict = {}  # runner -> stage name, once each, in STAGES order
    for name in (s for s in STAGES if s in a.stages):
        todo.setdefault(runners[name], "served" if name == "null" else name)
    for i, (fn, name) in enumerate(todo.items(), 1):
        progress.position = f"{i}/{len(todo)} "
        stage(name, fn)
    if failures:
        results["failures"] = failures
    meta["loadavg_end"] = _loadavg()
    results["ratios"] = ratios(results)
    json_path = out_dir / f"bench-{stamp}.json"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    png_path = plot(results, out_dir / f"bench-{stamp}.png")
    for src in (json_path, png_path):  # stable names for the latest run
        shutil.copyfile(src, out_dir / f"latest{src.suffix}")
    print(report(results))
    print(f"\nwrote {json_path} and {png_path}\n")
    print(ratio_lines(results["ratios"]))
    if failures:
        raise SystemExit("bench FAILED: " + "; ".join(f"{k}: {v}" for k, v in failures.items()))
    return results
