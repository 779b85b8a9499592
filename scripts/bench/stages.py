"""The in-process stages: model only (the ceiling), effdet eager, post-processing, handler, fp16."""

from __future__ import annotations

import json
import statistics
from functools import partial
from pathlib import Path

import torch

from handler.answer import Answer, AnswerError
from handler.network import torchscript_on_purpose
from scripts.bench.parity import (
    BenchError,
    compare_detections,
    effdet_postprocess,
    ours_postprocess,
    tie_horizon,
)
from scripts.bench.timing import Progress, measure, measure_pair, measure_turns, summarize
from scripts.bench.workload import Workload, _to_channels_last, cycle


def bench_model(w: Workload, batches, repeats, warmup, progress: Progress) -> list[dict]:
    """The network alone (fp16 / channels_last as asked): the ceiling."""
    return bench_models({w.fmt: w}, batches, repeats, warmup, progress)[w.fmt]


def bench_models(
    workloads: dict[str, Workload], batches, repeats, warmup, progress: Progress
) -> dict[str, list[dict]]:
    """The network alone in each format, the formats taking turns call by call (a busy machine
    slows them alike): the ceiling of each, by format."""
    progress.stage("model only", len(batches) * (repeats + warmup) * len(workloads))
    out: dict[str, list[dict]] = {fmt: [] for fmt in workloads}
    for b in batches:
        calls = {}
        for fmt, w in workloads.items():
            x = _to_channels_last(w.inputs[b][0], w.channels_last)
            calls[fmt] = lambda model=w.detector.model, x=x: model(x)
        with torch.inference_mode():
            secs = measure_turns(
                calls, repeats, warmup, next(iter(workloads.values())).device,
                lambda fmt, b=b: progress.tick(f"{fmt} b={b}"),
            )  # fmt: skip
        for fmt, s in secs.items():
            out[fmt].append(summarize(b, s))
    progress.end()
    return out


def effdet_model(w: Workload):
    """effdet's eager EfficientDet holding the TorchScript file's weights (level-first head BNs, an
    effdet config option, is the layout the export saves), checked against the TorchScript outputs."""
    from train.config import create_effdet

    model = create_effdet({**w.cfg, "head_bn_level_first": True})
    with torchscript_on_purpose():  # the file's weights (the served module is frozen: constants)
        weights = torch.jit.load(str(w.network), map_location="cpu").state_dict()
    model.load_state_dict(weights, strict=True)
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
    progress.stage("effdet eager", len(batches) * (repeats + warmup))
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


def bench_post(w: Workload, batches, repeats, warmup, progress: Progress) -> list[dict]:
    """Ours vs effdet's post-processing on the same head outputs; identical output enforced."""
    from effdet.anchors import Anchors
    from omegaconf import OmegaConf

    cfg = w.cfg
    anchors = w.detector.anchors
    effdet_anchors = Anchors.from_config(OmegaConf.create(cfg)).boxes.to(w.device)
    progress.stage("post-processing", len(batches) * 2 * (repeats + warmup))
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


def make_handler(w: Workload, threads: int | None, decode: str = "auto"):
    """EffDetHandler initialised through a real ``ts.context.Context`` on the export directory."""
    import ts
    from ts.context import Context
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

    from handler.answer import RequestError
    from handler.decode import decode_images
    from handler.effdet_handler import EffDetHandler

    manifest = {
        "model": {
            "modelName": "bench",
            "modelVersion": "1.0",
            "serializedFile": w.network.name,
            "handler": "effdet_handler.py",
        }
    }
    handler_cfg = {"precision": w.precision, "channels_last": w.channels_last}
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
    if decode == "cpu":  # nvjpeg off: PIL decode (reduced for the network) on the CPU, then copy
        det = handler.detector

        def decode_batch(datas):
            out = decode_images(datas, "cpu", det.max_pixels, det.geometry.size)
            return [d if isinstance(d, RequestError) else d.to(det.device) for d in out]

        def decode(data):
            [d] = decode_batch([data])
            if isinstance(d, RequestError):
                raise d
            return d

        det.decode, det.decode_batch = decode, decode_batch  # the handler calls decode_batch
    return handler, ctx


def check_answers(answers: list, n: int) -> None:
    if len(answers) != n:
        raise BenchError(f"handler returned {len(answers)} answers for {n} requests")
    for a in answers:
        try:
            Answer.from_json(a)
        except AnswerError as e:
            raise BenchError(f"handler answer is not a detection response ({e}): {str(a)[:200]}") from None


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
    progress.stage("handler in-process", len(batches) * (repeats + warmup))
    out = []
    for b in batches:
        rows = [{"body": img} for img in cycle(w.images, b)]
        check_answers(handler.handle(rows, ctx), b)

        def run(rows=rows):
            return [json.dumps(a) for a in handler.handle(rows, ctx)]

        out.append(summarize(b, measure(run, repeats, warmup, w.device, lambda b=b: progress.tick(f"b={b}"))))
    progress.end()
    return out


# -- fp16 against fp32 on the same trained model -----------------------------------------------------

FP16_MIN_SCORE = 0.3
FP16_MIN_IOU = 0.9
TARGET_FP16_AGREEMENT = 0.99


def bench_fp16(w: Workload, progress: Progress) -> dict:
    """fp32 detections scoring >= 0.3 that fp16 finds too (same class, IoU >= 0.9), on CUDA.

    The answer a caller gets must not depend on the precision: at least 99 % matched, and a run
    that had no fp32 detection to match fails rather than passing vacuously.
    """
    from handler.detector import Detector
    from scripts.bench.parity import match_detections

    if w.device.type != "cuda":
        progress.note("fp16 stage skipped: fp16 inference is a CUDA path (run with --device cuda)")
        return {"skipped": "fp16 inference needs CUDA; this run is on " + str(w.device)}
    progress.stage("fp16 vs fp32", 2)
    answers = {}
    for precision in ("fp32", "fp16"):
        det = Detector(w.network, device=w.device, precision=precision)
        answers[precision] = [
            r
            for i in range(0, len(w.images), 8)
            for r in det.predict(w.images[i : i + 8], score_threshold=FP16_MIN_SCORE)
        ]
        progress.tick(precision)
    progress.end()
    matched, total = 0, 0
    for ref, other in zip(answers["fp32"], answers["fp16"], strict=True):
        m, t = match_detections(ref["detections"], other["detections"], FP16_MIN_IOU)
        matched, total = matched + m, total + t
    if total == 0:
        raise BenchError(f"fp16 check compared nothing: no fp32 detection scored >= {FP16_MIN_SCORE}")
    return {
        "images": len(w.images),
        "min_score": FP16_MIN_SCORE,
        "min_iou": FP16_MIN_IOU,
        "fp32_detections": total,
        "fp16_detections": sum(len(a["detections"]) for a in answers["fp16"]),
        "matched": matched,
        "agreement": matched / total,
        "met": matched / total >= TARGET_FP16_AGREEMENT,
    }
