"""Benchmark: served throughput against the model-only ceiling and against effdet (``make bench``).

    python -m scripts.bench --name effdet_demo            # full run (about 10 minutes on 2 CPU cores)
    python -m scripts.bench --quick                       # tiny repeats, fewer settings: a smoke run
    python -m scripts.bench --device cuda --precision fp16 --channels-last --model seed

One run, one model, one set of JPEG images; every figure is the median of repeats:

1. ``model``   the TorchScript network alone at batch 1/8/32: the ceiling;
2. ``effdet``  effdet's own ``DetBenchPredict`` in eager mode with the same weights (network +
               effdet's post-processing);
3. ``post``    post-processing alone on the same head outputs: ours (``handler.postprocess.detect``)
               against effdet's ``_post_process`` + ``_batch_detection``; the two outputs must agree
               (same detections, classes and order; scores to 1e-6, boxes to 1e-3 px) down to the
               first score two candidates share exactly (unstable sorts may order those either way),
               or the run fails;
4. ``handler`` the TorchServe handler in this process: JPEG bytes in, JSON text out;
5. ``served``  a real TorchServe over HTTP: throughput and p50/p90/p99 latency at several client
               concurrencies for several batchSize/maxBatchDelay/workers settings, failed requests
               counted, with the CPU used by the load generator (and, with psutil, by TorchServe's
               frontend and workers) so that a saturated client shows.

Writes a table to stdout, ``runs/bench/bench-<stamp>.json`` and ``.png``; the ratios come last.
Without ``--export`` the model is ``runs/NAME/export`` when it exists, else a random-weight model
of ``--model`` (small preset) exported once into ``runs/bench/random-*`` and reused.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from scripts.paths import ROOT

STAGES = ("model", "effdet", "post", "handler", "served")
FULL = {
    "batches": (1, 8, 32),
    "repeats": 5,
    "warmup": 3,
    "configs": ((1, 0, 1), (4, 10, 1), (8, 20, 1), (4, 10, 2), (1, 0, 2)),
    "concurrency": (1, 4, 8),
    "requests": 64,
    "served_repeats": 3,
}
QUICK = {
    "batches": (1, 8),
    "repeats": 2,
    "warmup": 3,  # TorchScript's profiling executor optimises on the 2nd-3rd call per shape
    "configs": ((1, 0, 1), (4, 10, 1)),
    "concurrency": (1, 4),
    "requests": 16,
    "served_repeats": 1,
}
# Our post-processing against effdet's: the tolerances of tests/test_postprocess.py.
SCORE_ATOL = 1e-6
BOX_ATOL = 1e-3
EFFDET_IOU = 0.5  # effdet's generate_detections hard-codes it
TARGET_POST_SPEEDUP = 10.0
TARGET_SERVED_OVER_HANDLER_CPU = 0.8
TARGET_SERVED_OVER_CEILING_GPU = 0.8


class BenchError(RuntimeError):
    """The bench refused a result: outputs that disagree, a server that would not take a model."""


# -- progress and timing ------------------------------------------------------------------------------


class Progress:
    """A one-line counter on stderr per stage: ``[2/5 effdet] ######....  12/20  b=8  34s``."""

    def __init__(self, stream=None, enabled: bool = True):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.monotonic()
        self.label, self.total, self.done = "", 0, 0

    def stage(self, label: str, total: int) -> None:
        self.label, self.total, self.done = label, max(1, total), 0
        self._draw("")

    def tick(self, note: str = "") -> None:
        self.done += 1
        self._draw(note)

    def note(self, msg: str) -> None:
        if self.enabled:
            self.stream.write(("\n" if self.tty else "") + f"[bench] {msg}\n")
            self.stream.flush()

    def end(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def _draw(self, note: str) -> None:
        if not self.enabled:
            return
        width = 20
        filled = min(width, round(width * self.done / self.total))
        line = (
            f"[{self.label}] {'#' * filled}{'.' * (width - filled)} {self.done:>3}/{self.total:<3} "
            f"{note:<28} {time.monotonic() - self.t0:6.0f}s"
        )
        self.stream.write(("\r" + line) if self.tty else (line + "\n"))
        self.stream.flush()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    fn: Callable[[], object],
    repeats: int,
    warmup: int,
    device: torch.device,
    tick: Callable[[], None] = lambda: None,
) -> list[float]:
    """Seconds per call of ``fn`` for ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
        sync(device)
        tick()
    seconds = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        seconds.append(time.perf_counter() - t)
        tick()
    return seconds


def measure_pair(
    fn_a: Callable[[], object],
    fn_b: Callable[[], object],
    repeats: int,
    warmup: int,
    device: torch.device,
    tick: Callable[[str], None] = lambda side: None,
) -> tuple[list[float], list[float]]:
    """``measure`` for two functions, alternating a, b, a, b...: a drift in machine load hits both."""
    out: tuple[list[float], list[float]] = ([], [])
    for i in range(warmup + repeats):
        for side, fn, seconds in (("a", fn_a, out[0]), ("b", fn_b, out[1])):
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            if i >= warmup:
                seconds.append(time.perf_counter() - t)
            tick(side)
    return out


def summarize(batch: int, seconds: Sequence[float]) -> dict:
    med = statistics.median(seconds)
    return {
        "batch": batch,
        "median_s": med,
        "min_s": min(seconds),
        "max_s": max(seconds),
        "images_per_s": batch / med,
        "ms_per_image": 1000.0 * med / batch,
        "seconds": list(seconds),
    }


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default) of a non-empty list."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


# -- the model and the images -------------------------------------------------------------------------


def make_random_export(
    out: str | Path, model: str = "small", num_classes: int = 3, image_size: int | None = None, seed: int = 0
) -> Path:
    """A random-weight checkpoint of a preset, exported with the project's own ``export``; reused."""
    from export.__main__ import export
    from train.config import build_config, model_card, write_json
    from train.module import EffDetModule

    out = Path(out)
    export_dir = out / "export"
    if (export_dir / "model.pt").is_file() and (export_dir / "model.json").is_file():
        return export_dir
    torch.manual_seed(seed)
    cfg = build_config(model, num_classes, image_size)
    classes = [f"class{i}" for i in range(num_classes)]
    module = EffDetModule(cfg, classes)
    spread_heads(module.model, seed)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "best.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, ckpt)
    write_json(out / "model.json", model_card(out.name, cfg, classes, provenance={"weights": "random"}))
    export(ckpt, export_dir)
    return export_dir


def spread_heads(model, seed: int = 0) -> None:
    """Make a random-weight EfficientDet score like a detector rather than a constant.

    Freshly initialised heads give every anchor almost the same logit (effdet's prior bias), so
    scores tie and NMS has nothing to do. As tests/test_postprocess.py does, the class head's bias
    is spread and its weights scaled (logits roughly -7..+1), and the boxes are moved off their anchors.
    """
    g = torch.Generator().manual_seed(seed)

    def last_conv(head):
        return getattr(head.predict, "conv_pw", None) or head.predict.conv

    with torch.no_grad():
        cls_conv, box_conv = last_conv(model.class_net), last_conv(model.box_net)
        cls_conv.bias.add_(torch.randn(cls_conv.bias.shape, generator=g) * 1.5 + 2.0)
        cls_conv.weight.mul_(4.0)
        box_conv.weight.mul_(3.0)
        box_conv.bias.add_(torch.randn(box_conv.bias.shape, generator=g) * 0.3)


def resolve_export(a: argparse.Namespace, progress: Progress) -> tuple[Path, str]:
    """--export DIR (an export or a run holding export/), else runs/NAME/export, else a random model."""
    if a.export:
        d = Path(a.export)
        if not (d / "model.pt").is_file() and (d / "export" / "model.pt").is_file():
            d = d / "export"
        if not (d / "model.pt").is_file():
            raise SystemExit(f"--export {a.export}: no model.pt there (run `python -m export` first)")
        return d, "given"
    trained = ROOT / "runs" / a.name / "export"
    if (trained / "model.pt").is_file():
        return trained, "trained"
    size = a.image_size or "preset"
    target = Path(a.out) / f"random-{a.model}-{a.num_classes}c-{size}"
    if not (target / "export" / "model.pt").is_file():
        progress.note(f"no runs/{a.name}/export: exporting a random-weight {a.model} model into {target}")
    return make_random_export(target, a.model, a.num_classes, a.image_size, a.seed), "random weights"


def make_images(count: int, side: int = 640, seed: int = 0, quality: int = 90) -> list[bytes]:
    """``count`` distinct synthetic scenes (train.synthetic) as JPEGs whose longer side is ``side`` px."""
    from PIL import Image

    from train.synthetic import make_image

    rng = random.Random(seed)
    out = []
    for _ in range(count):
        img, _ = make_image(rng)
        scale = side / max(img.size)
        img = img.resize(
            (max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR
        )
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def cycle(items: Sequence, n: int) -> list:
    return [items[i % len(items)] for i in range(n)]


@dataclass
class Workload:
    """One model and one set of images, prepared once for every stage."""

    export_dir: Path
    card: dict
    device: torch.device
    precision: str
    channels_last: bool
    images: list[bytes]
    detector: object  # handler.detector.Detector
    inputs: dict  # batch -> (batch tensor, img_scale, img_size)
    heads: dict  # batch -> (cls outputs, box outputs) of the TorchScript network
    heads32: dict  # the same from the fp32 network (``heads`` itself unless fp16)

    @property
    def cfg(self) -> dict:
        return self.card["effdet_config"]


def prepare(
    export_dir: Path,
    images: list[bytes],
    batches: Sequence[int],
    device: torch.device,
    precision: str = "fp32",
    channels_last: bool = False,
) -> Workload:
    """Decode and letterbox the images once per batch size; record the network's head outputs."""
    from handler.detector import Detector

    det = Detector(export_dir / "model.pt", device=device, precision=precision)
    decoded = [det.decode(b) for b in images]
    inputs, heads = {}, {}
    for b in batches:
        inputs[b] = det.preprocess(cycle(decoded, b))
        heads[b] = det.forward(inputs[b][0])
    heads32 = heads
    if precision != "fp32":
        model32 = torch.jit.load(str(export_dir / "model.pt"), map_location=device).eval()
        with torch.inference_mode():
            heads32 = {b: model32(inputs[b][0].float()) for b in batches}
    sync(device)
    return Workload(
        export_dir, det.card, device, precision, channels_last, images, det, inputs, heads, heads32
    )


def _to_channels_last(x: torch.Tensor, enabled: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if enabled else x


# -- 1. model only ------------------------------------------------------------------------------------


def bench_model(w: Workload, batches, repeats, warmup, progress: Progress) -> list[dict]:
    """The TorchScript network alone (fp16 / channels_last as asked): the ceiling."""
    model = w.detector.model
    if w.channels_last:
        model = torch.jit.load(str(w.export_dir / "model.pt"), map_location=w.device).eval()
        if w.precision == "fp16":
            model = model.half()
        model = model.to(memory_format=torch.channels_last)
    progress.stage("1/5 model only", len(batches) * (repeats + warmup))
    out = []
    for b in batches:
        x = _to_channels_last(w.inputs[b][0], w.channels_last)
        with torch.inference_mode():
            secs = measure(
                lambda x=x: model(x), repeats, warmup, w.device, lambda b=b: progress.tick(f"b={b}")
            )
        out.append(summarize(b, secs))
    progress.end()
    return out


# -- 2. effdet's DetBenchPredict ----------------------------------------------------------------------


def effdet_model(w: Workload):
    """effdet's eager EfficientDet holding the TorchScript file's weights (level-first head BNs, an
    effdet config option, is the layout the export saves), checked against the TorchScript outputs."""
    from train.config import create_effdet

    model = create_effdet({**w.cfg, "head_bn_level_first": True})
    model.load_state_dict(w.detector.model.state_dict(), strict=True)
    model = model.eval().to(w.device)
    if w.precision == "fp16":
        model = model.half()
    b = min(w.inputs)
    with torch.no_grad():
        cls_out, box_out = model(w.inputs[b][0])
    diff = max(
        float((p.float() - q.float()).abs().max())
        for p, q in zip([*cls_out, *box_out], [*w.heads[b][0], *w.heads[b][1]], strict=True)
    )
    if w.precision == "fp32" and diff > 1e-3:
        raise BenchError(
            f"effdet eager and the TorchScript file disagree by {diff:.3g}: not the same weights"
        )
    if w.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, diff


def bench_effdet(w: Workload, batches, repeats, warmup, progress: Progress) -> tuple[list[dict], float]:
    """effdet's ``DetBenchPredict`` (network + effdet post-processing) in eager mode, same weights."""
    from effdet import DetBenchPredict

    model, parity = effdet_model(w)
    bench = DetBenchPredict(model).eval().to(w.device)  # anchors stay float32
    progress.stage("2/5 effdet eager", len(batches) * (repeats + warmup))
    out = []
    for b in batches:
        x, img_scale, img_size = w.inputs[b]
        x = _to_channels_last(x, w.channels_last)
        info = {"img_scale": img_scale, "img_size": img_size}
        with torch.no_grad():
            secs = measure(
                lambda x=x, info=info: bench(x, img_info=info),
                repeats,
                warmup,
                w.device,
                lambda b=b: progress.tick(f"b={b}"),
            )
        out.append(summarize(b, secs))
    progress.end()
    return out, parity


# -- 3. post-processing alone -------------------------------------------------------------------------


def effdet_postprocess(cls_out, box_out, anchor_boxes, cfg: dict, img_scale, img_size) -> torch.Tensor:
    """effdet's own path (what DetBenchPredict.forward does after the network), hard NMS."""
    from effdet.bench import _batch_detection, _post_process

    c, b, indices, classes = _post_process(
        cls_out,
        box_out,
        num_levels=int(cfg["num_levels"]),
        num_classes=int(cfg["num_classes"]),
        max_detection_points=int(cfg["max_detection_points"]),
    )
    return _batch_detection(
        cls_out[0].shape[0],
        c,
        b,
        anchor_boxes,
        indices,
        classes,
        img_scale,
        img_size,
        max_det_per_image=int(cfg["max_det_per_image"]),
        soft_nms=False,
    )


def ours_postprocess(
    cls_out, box_out, anchors, cfg: dict, img_scale, img_size, min_score=0.0
) -> torch.Tensor:
    from handler.postprocess import detect

    return detect(
        cls_out,
        box_out,
        anchors,
        num_classes=int(cfg["num_classes"]),
        max_detection_points=int(cfg["max_detection_points"]),
        max_det_per_image=int(cfg["max_det_per_image"]),
        iou_threshold=EFFDET_IOU,
        img_scale=img_scale,
        img_size=img_size,
        min_score=min_score,
    )


def tie_horizon(cls_out: Sequence[torch.Tensor], max_detection_points: int) -> list[float]:
    """Per image, the highest score that two top-k candidates share exactly (-inf when none do).

    Both post-processings order candidates with unstable sorts, so among exactly equal scores the
    top-k cut, NMS's processing order and the ``max_det_per_image`` cut may each pick either one:
    at and below that score two correct implementations can differ. Above it they must not.
    """
    batch = cls_out[0].shape[0]
    flat = torch.cat([c.float().permute(0, 2, 3, 1).reshape(batch, -1) for c in cls_out], 1)
    scores = flat.topk(min(max_detection_points + 1, flat.shape[1]), dim=1).values.sigmoid().cpu()
    out = []
    for row in scores:  # descending
        tied = row[1:][row[1:] == row[:-1]]
        out.append(float(tied[0]) if tied.numel() else float("-inf"))
    return out


def compare_detections(
    ours: torch.Tensor, theirs: torch.Tensor, horizon: Sequence[float] | None = None
) -> dict:
    """Raise ``BenchError`` unless both [B, N, 6] outputs hold the same detections in the same order.

    Rows scoring above ``horizon[i]`` (see ``tie_horizon``) are compared one by one: same count,
    class, order, score to 1e-6 and box to 1e-3 px; rows at or below it are counted, not compared.
    """
    if ours.shape != theirs.shape:
        raise BenchError(
            f"post-processing shapes differ: ours {list(ours.shape)}, effdet {list(theirs.shape)}"
        )
    ours, theirs = ours.float().cpu(), theirs.float().cpu()
    horizon = horizon or [float("-inf")] * ours.shape[0]
    box_diff = score_diff = 0.0
    compared = rows = 0
    for i in range(ours.shape[0]):
        g = ours[i][ours[i, :, 4] > max(0.0, horizon[i])].tolist()
        t = theirs[i][theirs[i, :, 4] > max(0.0, horizon[i])].tolist()
        if len(g) != len(t):
            raise BenchError(
                f"image {i}: ours kept {len(g)} detections above score {horizon[i]:.6g}, effdet {len(t)}"
            )
        for k, (a, b) in enumerate(zip(g, t, strict=True)):
            if a[5] != b[5]:
                raise BenchError(f"image {i}, detection {k}: class {a[5]:.0f} (ours) vs {b[5]:.0f} (effdet)")
            score_diff = max(score_diff, abs(a[4] - b[4]))
            box_diff = max(box_diff, max(abs(x - y) for x, y in zip(a[:4], b[:4], strict=True)))
        compared += len(g)
        rows += int((theirs[i, :, 4] > 0).sum())
    if score_diff > SCORE_ATOL or box_diff > BOX_ATOL:
        raise BenchError(
            f"post-processing differs from effdet: max |score diff| {score_diff:.3g} (limit {SCORE_ATOL}), "
            f"max |box diff| {box_diff:.3g} px (limit {BOX_ATOL})"
        )
    return {
        "identical": True,
        "compared_rows": compared,
        "rows": rows,
        "max_score_diff": score_diff,
        "max_box_diff_px": box_diff,
    }


def bench_post(w: Workload, batches, repeats, warmup, progress: Progress) -> list[dict]:
    """Ours vs effdet's post-processing on the same head outputs; identical output enforced."""
    from effdet.anchors import Anchors
    from omegaconf import OmegaConf

    cfg = w.cfg
    anchors = w.detector.anchors
    effdet_anchors = Anchors.from_config(OmegaConf.create(cfg)).boxes.to(w.device)
    progress.stage("3/5 post-processing", len(batches) * 2 * (repeats + warmup))
    out = []
    for b in batches:
        cls_out, box_out = w.heads[b]
        _, img_scale, img_size = w.inputs[b]
        with torch.inference_mode():
            # identity on the fp32 network's outputs (with fp16, effdet computes part of its path in fp16)
            cls32, box32 = w.heads32[b]
            theirs = effdet_postprocess(cls32, box32, effdet_anchors, cfg, img_scale, img_size)
            horizon = tie_horizon(cls32, int(cfg["max_detection_points"]))
            check = compare_detections(
                ours_postprocess(cls32, box32, anchors, cfg, img_scale, img_size), theirs, horizon
            )
            # What the handler runs: candidates below the served score threshold skip NMS. The rows it
            # can answer (score >= threshold) must be effdet's.
            served = w.detector.defaults.score_threshold
            served_check = compare_detections(
                ours_postprocess(cls32, box32, anchors, cfg, img_scale, img_size, served),
                theirs.masked_fill(theirs[..., 4:5] < served, 0),
                [max(h, served) for h in horizon],
            )
            served_s = measure(
                partial(ours_postprocess, cls_out, box_out, anchors, cfg, img_scale, img_size, served),
                repeats,
                warmup,
                w.device,
            )
            ours_s, effdet_s = measure_pair(
                partial(ours_postprocess, cls_out, box_out, anchors, cfg, img_scale, img_size),
                partial(effdet_postprocess, cls_out, box_out, effdet_anchors, cfg, img_scale, img_size),
                repeats,
                warmup,
                w.device,
                lambda side, b=b: progress.tick(f"{'ours' if side == 'a' else 'effdet'} b={b}"),
            )
        ours_r, effdet_r = summarize(b, ours_s), summarize(b, effdet_s)
        out.append(
            {
                "batch": b,
                "ours_ms": 1000 * ours_r["median_s"],
                "effdet_ms": 1000 * effdet_r["median_s"],
                "speedup": effdet_r["median_s"] / ours_r["median_s"],
                "served_threshold": served,
                "ours_served_ms": 1000 * statistics.median(served_s),
                "speedup_served": effdet_r["median_s"] / statistics.median(served_s),
                "served_identical_rows": served_check["compared_rows"],
                "ours": ours_r,
                "effdet": effdet_r,
                **check,
            }
        )
    progress.end()
    return out


# -- 4. the handler in this process -------------------------------------------------------------------


def make_handler(w: Workload, threads: int | None, decode: str = "auto"):
    """EffDetHandler initialised through a real ``ts.context.Context`` on the export directory."""
    import ts
    from ts.context import Context
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

    from handler.decode import decode_image
    from handler.effdet_handler import EffDetHandler

    manifest = {
        "model": {
            "modelName": "bench",
            "modelVersion": "1.0",
            "serializedFile": "model.pt",
            "handler": "effdet_handler.py",
        }
    }
    handler_cfg = {"precision": w.precision}
    if threads:
        handler_cfg["torch_threads"] = threads
    gpu = (w.device.index or 0) if w.device.type == "cuda" else None
    metrics = MetricsCacheYamlImpl(str(Path(ts.__file__).parent / "configs" / "metrics.yaml"))
    metrics.initialize_cache()
    metrics.model_name = "bench"
    ctx = Context(
        "bench", str(w.export_dir), manifest, 32, gpu, "bench", metrics=metrics,
        model_yaml_config={"handler": handler_cfg},
    )  # fmt: skip
    handler = EffDetHandler()
    handler.initialize(ctx)
    if decode == "cpu":  # nvjpeg off: PIL decode on the CPU, then copy
        det = handler.detector
        det.decode = lambda data: decode_image(data, "cpu", det.max_pixels).to(det.device)
    return handler, ctx


def check_answers(answers: list, n: int) -> None:
    if len(answers) != n:
        raise BenchError(f"handler returned {len(answers)} answers for {n} requests")
    for a in answers:
        if not isinstance(a, dict) or "detections" not in a or "image" not in a:
            raise BenchError(f"handler answer is not a detection response: {str(a)[:200]}")


def bench_handler(
    w: Workload,
    batches,
    repeats,
    warmup,
    progress: Progress,
    threads: int | None,
    decode: str = "auto",
    handler_and_context: tuple | None = None,
) -> list[dict]:
    """JPEG bytes in, JSON text out, through EffDetHandler.handle as a TorchServe worker calls it."""
    handler, ctx = handler_and_context or make_handler(w, threads, decode)
    progress.stage("4/5 handler in-process", len(batches) * (repeats + warmup))
    out = []
    for b in batches:
        rows = [{"body": img} for img in cycle(w.images, b)]
        check_answers(handler.handle(rows, ctx), b)

        def run(rows=rows):
            return [json.dumps(a) for a in handler.handle(rows, ctx)]

        out.append(summarize(b, measure(run, repeats, warmup, w.device, lambda b=b: progress.tick(f"b={b}"))))
    progress.end()
    return out


# -- 5. served over HTTP ------------------------------------------------------------------------------


class ProcessCPU:
    """CPU seconds of a process and its children (TorchServe's frontend, its workers); needs psutil."""

    def __init__(self, pid: int | None):
        try:
            import psutil

            self.root = psutil.Process(pid) if pid else None
        except Exception:  # psutil missing or the process gone
            self.root = None

    def sample(self) -> dict[str, float] | None:
        if self.root is None:
            return None
        try:
            t = self.root.cpu_times()
            frontend = t.user + t.system
            workers = 0.0
            for child in self.root.children(recursive=True):
                try:
                    c = child.cpu_times()
                    workers += c.user + c.system
                except Exception:
                    pass
            return {"frontend": frontend, "workers": workers}
        except Exception:
            return None


def run_load(
    make_sender: Callable[[], Callable[[bytes], object]],
    payloads: Sequence[bytes],
    concurrency: int,
    total: int,
    server_cpu: ProcessCPU | None = None,
) -> dict:
    """Closed loop: ``concurrency`` threads send ``total`` requests back to back between them.

    ``make_sender()`` is called once per thread and returns ``send(body) -> status``; status 200 is
    a success, anything else (another status, an exception's name) a failure. The client's own CPU
    time (all its threads, ``time.process_time``) is reported against the wall time.
    """
    counts = [total // concurrency + (i < total % concurrency) for i in range(concurrency)]
    barrier = threading.Barrier(concurrency + 1)
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    statuses: list[dict] = [{} for _ in range(concurrency)]

    def worker(i: int) -> None:
        try:
            send = make_sender()
        finally:
            barrier.wait()
        for k in range(counts[i]):
            body = payloads[(i + k * concurrency) % len(payloads)]
            t = time.perf_counter()
            try:
                status = send(body)
            except Exception as e:  # connection refused, timeout: a failed request
                status = type(e).__name__
            dt = time.perf_counter() - t
            statuses[i][status] = statuses[i].get(status, 0) + 1
            if status == 200:
                latencies[i].append(1000.0 * dt)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    barrier.wait()
    srv0 = server_cpu.sample() if server_cpu else None
    cpu0, ru0, t0 = time.process_time(), resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    cpu, ru1 = time.process_time() - cpu0, resource.getrusage(resource.RUSAGE_SELF)
    srv1 = server_cpu.sample() if server_cpu else None
    merged: dict = {}
    for s in statuses:
        for k, v in s.items():
            merged[str(k)] = merged.get(str(k), 0) + v
    lat = [x for part in latencies for x in part]
    out = {
        "concurrency": concurrency,
        "requests": total,
        "ok": len(lat),
        "failed": total - len(lat),
        "statuses": merged,
        "wall_s": wall,
        "throughput": len(lat) / wall if wall > 0 else 0.0,
        "latencies_ms": lat,
        "client_cpu_s": cpu,
        "client_cpu_pct_of_core": 100.0 * cpu / wall if wall > 0 else 0.0,
        "client_rusage_cpu_s": (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime),
    }
    if srv0 and srv1:
        out["frontend_cpu_pct_of_core"] = 100.0 * (srv1["frontend"] - srv0["frontend"]) / wall
        out["workers_cpu_pct_of_core"] = 100.0 * (srv1["workers"] - srv0["workers"]) / wall
    return out


def aggregate(reps: list[dict]) -> dict:
    """Repeats of one load point -> median throughput and CPU, percentiles over all latencies."""
    lat = [x for r in reps for x in r["latencies_ms"]]
    out = {
        "concurrency": reps[0]["concurrency"],
        "repeats": len(reps),
        "requests": sum(r["requests"] for r in reps),
        "failed": sum(r["failed"] for r in reps),
        "statuses": {},
        "throughput": statistics.median(r["throughput"] for r in reps),
        "throughputs": [r["throughput"] for r in reps],
        "p50_ms": percentile(lat, 50),
        "p90_ms": percentile(lat, 90),
        "p99_ms": percentile(lat, 99),
        "mean_ms": statistics.fmean(lat) if lat else float("nan"),
        "client_cpu_pct_of_core": statistics.median(r["client_cpu_pct_of_core"] for r in reps),
    }
    for r in reps:
        for k, v in r["statuses"].items():
            out["statuses"][k] = out["statuses"].get(k, 0) + v
    for key in ("frontend_cpu_pct_of_core", "workers_cpu_pct_of_core"):
        if all(key in r for r in reps):
            out[key] = statistics.median(r[key] for r in reps)
    return out


def model_name(name: str, cfg: tuple[int, int, int]) -> str:
    b, d, n = cfg
    return f"{name}_b{b}_d{d}_w{n}"


def torchserve_sender(server, model: str, timeout: float = 120) -> Callable[[], Callable[[bytes], object]]:
    from scripts.client import Client

    def make():
        client = Client(server.inference_url, server.management_url, server.key_file, timeout=timeout)

        def send(body: bytes):
            r = client.predict(model, body)
            if r.status_code == 200 and "detections" not in r.json():
                return "bad_body"
            return r.status_code

        return send

    return make


def _wait_gone(client, model: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client._manage("GET", f"/models/{model}").status_code == 404:
            return
        time.sleep(0.3)


def _server_pid(server) -> int | None:
    pid_file = server.workdir / "tmp" / ".model_server.pid"
    try:
        return int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def bench_served(
    w: Workload,
    name: str,
    configs: Sequence[tuple[int, int, int]],
    concurrencies: Sequence[int],
    requests: int,
    repeats: int,
    threads: int,
    workdir: Path,
    progress: Progress,
) -> list[dict]:
    """Archive one .mar per setting, start one TorchServe, register them one at a time and load each."""
    from scripts.archive import ModelConfig, archive
    from scripts.client import Client
    from scripts.serve import Server

    workdir = Path(workdir)
    store = workdir / "model_store"
    if store.exists():
        shutil.rmtree(store)
    store.mkdir(parents=True)
    cuda = w.device.type == "cuda"
    progress.stage("5/5 served: archiving", len(configs))
    mars = {}
    for cfg in configs:
        b, d, n = cfg
        mc = ModelConfig(
            batch_size=b,
            max_batch_delay=d,
            min_workers=n,
            max_workers=n,
            device_type="gpu" if cuda else "cpu",
            precision=w.precision,
            torch_threads=None if cuda else max(1, threads // n),
        )
        mars[cfg] = archive(w.export_dir, model_name(name, cfg), "1.0", store, mc)
        progress.tick(model_name(name, cfg))
    progress.end()

    server = Server(workdir / "ts", store, free_ports=True)
    results = []
    try:
        progress.note("starting TorchServe")
        server.start()
        mgmt = Client(server.inference_url, server.management_url, server.key_file)
        cpu = ProcessCPU(_server_pid(server))
        per_point = 1 + repeats
        progress.stage("5/5 served", len(configs) * len(concurrencies) * per_point)
        for cfg in configs:
            b, d, n = cfg
            model = model_name(name, cfg)
            entry = {"batch_size": b, "max_batch_delay": d, "workers": n, "model": model, "points": []}
            r = mgmt.register(mars[cfg].name, initial_workers=n)
            if not r.ok:
                raise BenchError(f"TorchServe refused {mars[cfg].name}: {r.status_code} {r.text[:300]}")
            desc = mgmt.describe(model)[0]
            if len(desc.get("workers", [])) < n:
                mgmt.scale(model, n)
                desc = mgmt.describe(model)[0]
            entry["reported"] = {
                "batchSize": desc.get("batchSize"),
                "maxBatchDelay": desc.get("maxBatchDelay"),
                "workers": len(desc.get("workers", [])),
            }
            sender = torchserve_sender(server, model)
            try:
                for c in concurrencies:
                    # warm-up: TorchScript optimises per input shape, batches of every size must pass
                    run_load(sender, w.images, c, max(2 * c, 3 * b * n))
                    progress.tick(f"{model} c={c} warm-up")
                    reps = []
                    for _ in range(repeats):
                        reps.append(run_load(sender, w.images, c, max(requests, c), cpu))
                        progress.tick(f"{model} c={c}")
                    entry["points"].append(aggregate(reps))
            finally:
                mgmt.unregister(model)
                _wait_gone(mgmt, model)
            results.append(entry)
        progress.end()
    finally:
        progress.note("stopping TorchServe")
        server.stop()
        left = _server_pid(server)
        if left and _alive(left):
            progress.note(f"warning: TorchServe (pid {left}) still running; stop it with `kill {left}`")
    return results


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


# -- report -------------------------------------------------------------------------------------------


def ratios(results: dict) -> dict:
    """The headline ratios and the issue's targets, from whatever stages ran."""
    best = {
        key: max((r["images_per_s"] for r in results.get(key) or []), default=None)
        for key in ("model", "effdet", "handler")
    }
    served_points = [p for s in results.get("served") or [] for p in s["points"]]
    served_best = max((p["throughput"] for p in served_points if p["failed"] == 0), default=None)
    post = results.get("post") or []
    post_big = max(post, key=lambda r: r["batch"]) if post else None

    def div(a, b):
        return a / b if a is not None and b else None

    out = {
        "ceiling_images_per_s": best["model"],
        "effdet_best_images_per_s": best["effdet"],
        "handler_best_images_per_s": best["handler"],
        "served_best_images_per_s": served_best,
        "served_over_ceiling": div(served_best, best["model"]),
        "handler_over_ceiling": div(best["handler"], best["model"]),
        "served_over_handler": div(served_best, best["handler"]),
        "ceiling_over_effdet": div(best["model"], best["effdet"]),
        "post_speedup": post_big["speedup"] if post_big else None,
        "post_speedup_served": post_big["speedup_served"] if post_big else None,
        "post_speedup_batch": post_big["batch"] if post_big else None,
    }
    device = results["meta"]["device"]
    targets = []
    if post_big:
        targets.append(
            {
                "target": f"our post-processing >= {TARGET_POST_SPEEDUP:.0f}x effdet's at batch 32, identical output",
                "value": post_big["speedup_served"],
                "met": post_big["batch"] >= 32 and post_big["speedup_served"] >= TARGET_POST_SPEEDUP,
                "note": (
                    f"as the handler runs it, with the served score threshold {post_big['served_threshold']}: "
                    f"every answered row is effdet's; {post_big['speedup']:.2f}x with no score floor"
                    + ("" if post_big["batch"] >= 32 else f"; measured at batch {post_big['batch']} only")
                ),
            }
        )
    if device.startswith("cpu") and out["served_over_handler"] is not None:
        targets.append(
            {
                "target": f"CPU served >= {TARGET_SERVED_OVER_HANDLER_CPU} x handler in-process",
                "value": out["served_over_handler"],
                "met": out["served_over_handler"] >= TARGET_SERVED_OVER_HANDLER_CPU,
                "note": "",
            }
        )
    if device.startswith("cuda") and out["served_over_ceiling"] is not None:
        meta = results["meta"]
        fp16_cl = meta["precision"] == "fp16" and meta["channels_last"]
        targets.append(
            {
                "target": f"GPU served >= {TARGET_SERVED_OVER_CEILING_GPU} x the fp16 ceiling (seed config)",
                "value": out["served_over_ceiling"],
                "met": fp16_cl and out["served_over_ceiling"] >= TARGET_SERVED_OVER_CEILING_GPU,
                "note": "" if fp16_cl else "the ceiling here is not fp16 + channels_last",
            }
        )
    out["targets"] = targets
    return out


def table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.rjust(wd) for h, wd in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * wd for wd in widths)]
    out += ["  ".join(c.rjust(wd) for c, wd in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(out)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def report(results: dict) -> str:
    """The tables of every stage that ran, in order (the ratios are ``ratio_lines``)."""
    meta = results["meta"]
    parts = [
        f"effdet-serve benchmark  {meta['stamp']}  device {meta['device']} ({meta['device_name']}), "
        f"{meta['precision']}{' channels_last' if meta['channels_last'] else ''}, torch threads {meta['threads']}, "
        f"{meta['cpu_count']} CPUs, load average {meta['loadavg_start']} -> {meta.get('loadavg_end')}",
        f"model {meta['model']['name']} ({meta['model']['backbone']}, {meta['model']['image_size']}, "
        f"{meta['model']['num_classes']} classes, {meta['model']['origin']}) from {meta['export_dir']}; "
        f"{meta['images']} JPEG images, longer side {meta['image_side']} px; median of {meta['repeats']} repeats",
    ]
    titles = {
        "model": "1. model only: TorchScript network (the ceiling)",
        "effdet": "2. effdet DetBenchPredict, eager, same weights (network + effdet post-processing)",
        "handler": "4. handler in-process: JPEG bytes in, JSON out",
    }
    for key in ("model", "effdet", "post", "handler"):
        rows = results.get(key)
        if rows is None:
            continue
        if key == "post":
            parts.append(
                "\n3. post-processing alone on the same head outputs: ours vs effdet "
                "_post_process + _batch_detection; identical rows: rows above the first exactly tied score, "
                "which must match, of all rows\n"
                + table(
                    (
                        "batch",
                        "ours ms",
                        "effdet ms",
                        "speedup",
                        "ours ms @thr",
                        "speedup @thr",
                        "identical rows",
                        "max d score",
                        "max d box px",
                    ),
                    [
                        (
                            r["batch"],
                            r["ours_ms"],
                            r["effdet_ms"],
                            r["speedup"],
                            r["ours_served_ms"],
                            r["speedup_served"],
                            f"{r['compared_rows']}/{r['rows']}",
                            r["max_score_diff"],
                            r["max_box_diff_px"],
                        )
                        for r in rows
                    ],
                )
            )
            continue
        table_rows = [(r["batch"], r["images_per_s"], r["ms_per_image"], 1000 * r["median_s"]) for r in rows]
        parts.append(f"\n{titles[key]}\n" + table(("batch", "img/s", "ms/img", "ms/batch"), table_rows))
    for entry in results.get("served") or []:
        rep = entry["reported"]
        rows = [
            (
                p["concurrency"],
                p["throughput"],
                p["p50_ms"],
                p["p90_ms"],
                p["p99_ms"],
                f"{p['failed']}/{p['requests']}",
                p["client_cpu_pct_of_core"],
                p.get("frontend_cpu_pct_of_core"),
                p.get("workers_cpu_pct_of_core"),
            )
            for p in entry["points"]
        ]
        parts.append(
            f"\n5. served over HTTP: batchSize {entry['batch_size']}, maxBatchDelay {entry['max_batch_delay']} ms, "
            f"{entry['workers']} worker(s) (server reports {rep['batchSize']}/{rep['maxBatchDelay']}/{rep['workers']})\n"
            + table(
                (
                    "conc",
                    "img/s",
                    "p50 ms",
                    "p90 ms",
                    "p99 ms",
                    "failed",
                    "client %cpu",
                    "java %cpu",
                    "workers %cpu",
                ),
                rows,
            )
        )
    if results.get("served"):
        parts.append(
            "%cpu = CPU time over wall time in % of one core. client: the load generator (a Python client is "
            "GIL-bound near 100 %); java / workers: TorchServe's frontend and its worker processes."
        )
    return "\n".join(parts)


def ratio_lines(r: dict) -> str:
    lines = ["ratios"]
    lines.append(f"  served / ceiling      {_ratio(r['served_over_ceiling'])}")
    lines.append(f"  handler / ceiling     {_ratio(r['handler_over_ceiling'])}")
    lines.append(f"  served / handler      {_ratio(r['served_over_handler'])}")
    lines.append(
        f"  ours / effdet         {_ratio(r['post_speedup'])}"
        + (f" post-processing speedup at batch {r['post_speedup_batch']}" if r["post_speedup_batch"] else "")
    )
    lines.append(
        f"  ours@thr / effdet     {_ratio(r.get('post_speedup_served'))}"
        " the same with the served score threshold (candidates below it skip NMS)"
    )
    for t in r["targets"]:
        lines.append(
            f"  target: {t['target']}: {t['value']:.2f} -> {'MET' if t['met'] else 'MISSED'}"
            + (f" ({t['note']})" if t["note"] else "")
        )
    return "\n".join(lines)


def _ratio(v) -> str:
    return "n/a (stage not run)" if v is None else f"{v:.2f}x"


def _batch_axis(ax, batches: Sequence[int]) -> None:
    if batches:
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(batches), [str(b) for b in batches])
        ax.minorticks_off()


def _not_run(ax) -> None:
    ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes)


def plot(results: dict, path: Path) -> Path:
    """Throughput against batch size and concurrency, latency percentiles, post-processing times."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    ax = axes[0][0]
    batches = sorted(
        {r["batch"] for k in ("model", "effdet", "post", "handler") for r in results.get(k) or []}
    )
    curves = (("model", "model only (ceiling)"), ("effdet", "effdet DetBenchPredict"), ("handler", "handler"))
    for key, label in curves:
        rows = results.get(key) or []
        if rows:
            ax.plot([r["batch"] for r in rows], [r["images_per_s"] for r in rows], "o-", label=label)
    ax.set(xlabel="batch size", ylabel="images / s", title="in-process throughput vs batch size")
    _batch_axis(ax, batches)
    if ax.lines:
        ax.legend()
    else:
        _not_run(ax)

    ax = axes[0][1]
    post = results.get("post") or []
    if post:
        x = [r["batch"] for r in post]
        ax.plot(x, [r["ours_ms"] for r in post], "o-", label="ours (handler.postprocess)")
        ax.plot(x, [r["effdet_ms"] for r in post], "s-", label="effdet _post_process + _batch_detection")
        ax.set_yscale("log")
        _batch_axis(ax, batches)
        ax.legend()
    else:
        _not_run(ax)
    ax.set(xlabel="batch size", ylabel="ms per batch", title="post-processing alone")

    served = results.get("served") or []
    ax = axes[1][0]
    for entry in served:
        pts = entry["points"]
        label = f"b{entry['batch_size']} d{entry['max_batch_delay']} w{entry['workers']}"
        ax.plot([p["concurrency"] for p in pts], [p["throughput"] for p in pts], "o-", label=label)
    r = results.get("ratios", {})
    if served:
        for key, style, label in (
            ("ceiling_images_per_s", "--", "ceiling"),
            ("handler_best_images_per_s", ":", "handler best"),
        ):
            if r.get(key):
                ax.axhline(r[key], color="k", linestyle=style, label=label)
        ax.legend(fontsize=8)
    else:
        _not_run(ax)
    ax.set(xlabel="client concurrency", ylabel="images / s", title="served over HTTP: throughput")
    if served:
        ax.set_xticks(sorted({p["concurrency"] for e in served for p in e["points"]}))

    ax = axes[1][1]
    if served:
        labels, pcts = [], {"p50": [], "p90": [], "p99": []}
        for entry in served:
            for p in entry["points"]:
                labels.append(
                    f"b{entry['batch_size']}d{entry['max_batch_delay']}w{entry['workers']}\nc{p['concurrency']}"
                )
                for k, v in pcts.items():
                    v.append(p[f"{k}_ms"])
        width = 0.27
        for i, (k, v) in enumerate(pcts.items()):
            ax.bar([x + (i - 1) * width for x in range(len(labels))], v, width, label=k)
        ax.set_xticks(list(range(len(labels))), labels, fontsize=7)
        ax.legend()
    else:
        _not_run(ax)
    ax.set(ylabel="latency ms", title="served over HTTP: latency percentiles")
    meta = results["meta"]
    fig.suptitle(
        f"effdet-serve bench {meta['stamp']}: {meta['model']['name']} {meta['model']['image_size']} on "
        f"{meta['device_name']} ({meta['precision']}{', channels_last' if meta['channels_last'] else ''})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# -- command line -------------------------------------------------------------------------------------


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.replace(" ", "").split(",") if x)


def _configs(text: str) -> tuple[tuple[int, int, int], ...]:
    out = []
    for part in text.replace(" ", "").split(","):
        if part:
            b, d, n = (int(x) for x in part.split(":"))
            out.append((b, d, n))
    return tuple(out)


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
        "--model", default="small", help="preset for the random-weight model when no export exists"
    )
    p.add_argument("--num-classes", type=int, default=3, help="classes of the random-weight model")
    p.add_argument(
        "--image-size", type=int, help="input size of the random-weight model (default: the preset's)"
    )
    p.add_argument("--quick", action="store_true", help="tiny repeats and fewer settings: a smoke run")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
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
    p.add_argument("--images", type=int, help="distinct JPEG images (default: the largest batch)")
    p.add_argument("--image-side", type=int, default=640, help="longer side of the JPEG images in px")
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
    a.stages = tuple(s for s in a.stages.replace(" ", "").split(",") if s)
    unknown = set(a.stages) - set(STAGES)
    if unknown:
        p.error(f"unknown stages {sorted(unknown)}; choose from {', '.join(STAGES)}")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible to torch here")
    if a.precision == "fp16" and not a.device.startswith("cuda"):
        p.error("--precision fp16 needs --device cuda (the CPU path is fp32)")
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
    }
    export_dir, origin = resolve_export(a, progress)
    progress.note(f"model {export_dir} ({origin}); preparing {a.images} images")
    images = make_images(a.images, a.image_side, a.seed)
    w = prepare(export_dir, images, a.batches, device, a.precision, a.channels_last)
    cfg = w.cfg
    meta["export_dir"] = str(export_dir)
    meta["model"] = {
        "name": w.card.get("name"),
        "origin": origin,
        "backbone": cfg["backbone_name"],
        "image_size": list(cfg["image_size"]),
        "num_classes": cfg["num_classes"],
        "max_detection_points": cfg["max_detection_points"],
        "max_det_per_image": cfg["max_det_per_image"],
    }
    results: dict = {"meta": meta}
    if "model" in a.stages:
        results["model"] = bench_model(w, a.batches, a.repeats, a.warmup, progress)
    if "effdet" in a.stages:
        results["effdet"], meta["effdet_parity_max_abs_diff"] = bench_effdet(
            w, a.batches, a.repeats, a.warmup, progress
        )
    if "post" in a.stages:
        results["post"] = bench_post(w, a.batches, a.repeats, a.warmup, progress)
    if "handler" in a.stages:
        results["handler"] = bench_handler(w, a.batches, a.repeats, a.warmup, progress, a.threads, a.decode)
    if "served" in a.stages:
        results["served"] = bench_served(
            w,
            a.name,
            a.configs,
            a.concurrency,
            a.requests,
            a.served_repeats,
            a.threads,
            out_dir / "serve",
            progress,
        )
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
    return results


if __name__ == "__main__":
    main()
