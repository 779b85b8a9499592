"""Results -> ratios and targets, text tables and a plot. Pure functions of the results dict."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

TARGET_POST_SPEEDUP = 10.0
TARGET_SERVED_OVER_HANDLER_CPU = 0.8
TARGET_SERVED_OVER_CEILING_GPU = 0.8
TARGET_P99_OVER_P50 = 3.0
# Photos: handler time at batch 1 against a 640x480 JPEG's, served img/s against 640x480's, the
# decode + letterbox share at 12 MP, a served worker's peak RSS rise for one 40 MP image (the PNG:
# half of the 627 MiB one cost before decoding was reduced), accuracy at phone size.
PHOTO_REFERENCE = (640, 480)
TARGET_HANDLER_OVER_640 = {(1920, 1080): 1.2, (4032, 3024): 1.5}
TARGET_DECODE_LETTERBOX_SHARE_12MP = 0.30
TARGET_SERVED_12MP_OVER_640 = 0.6
TARGET_PEAK_RISE_MIB = {"jpeg_40mp": 150e6 / 2**20, "png_40mp": 627 / 2}
TARGET_OVERLOAD_GOODPUT = 0.7  # goodput with deadlines over capacity, both measured in the run


def ratios(results: dict) -> dict:
    """The headline ratios and the project's targets, from whatever stages ran."""
    best = {
        key: max((r["images_per_s"] for r in results.get(key) or []), default=None)
        for key in ("model", "effdet", "handler")
    }
    best_point = best_served_point(results, "torchscript")
    served_best = best_point["throughput"] if best_point else None
    null_points = [p for s in results.get("null_handler") or [] for p in s["points"] if p["failed"] == 0]
    null_best = max((p["throughput"] for p in null_points), default=None)
    limits = [x for x in (best["model"], null_best) if x]
    post = results.get("post") or []
    post_big = max(post, key=lambda r: r["batch"]) if post else None

    out = {
        "ceiling_images_per_s": best["model"],
        "effdet_best_images_per_s": best["effdet"],
        "handler_best_images_per_s": best["handler"],
        "served_best_images_per_s": served_best,
        "null_handler_best_images_per_s": null_best,
        "served_over_ceiling": _div(served_best, best["model"]),
        # the served model can go no faster than the network alone nor than TorchServe with no model
        "served_over_limit": _div(served_best, min(limits)) if limits else None,
        "served_best_p99_over_p50": _div(best_point["p99_ms"], best_point["p50_ms"]) if best_point else None,
        "handler_over_ceiling": _div(best["handler"], best["model"]),
        "served_over_handler": _div(served_best, best["handler"]),
        "ceiling_over_effdet": _div(best["model"], best["effdet"]),
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
    if device.startswith("cuda") and out["served_over_limit"] is not None:
        targets.append(
            {
                "target": f"GPU served >= {TARGET_SERVED_OVER_CEILING_GPU} x min(ceiling, null handler)",
                "value": out["served_over_limit"],
                "met": out["served_over_limit"] >= TARGET_SERVED_OVER_CEILING_GPU,
                "note": "" if null_best else "no null-handler point in this run: the ceiling alone",
            }
        )
    if out["served_best_p99_over_p50"] is not None:
        targets.append(
            {
                "target": f"p99 <= {TARGET_P99_OVER_P50:.0f} x p50 at the best served point",
                "value": out["served_best_p99_over_p50"],
                "met": out["served_best_p99_over_p50"] <= TARGET_P99_OVER_P50,
                "note": "",
            }
        )
    fp16 = results.get("fp16")
    if fp16 and "agreement" in fp16:
        targets.append(
            {
                "target": ">= 99 % of fp32 detections scoring >= 0.3 found by fp16 (same class, IoU >= 0.9)",
                "value": fp16["agreement"],
                "met": fp16["met"],
                "note": f"{fp16['matched']}/{fp16['fp32_detections']} matched",
            }
        )
    targets += photo_targets(results)
    over = results.get("overload")
    out["overload_goodput_over_capacity"] = over["deadlines_over_capacity"] if over else None
    out["overload_goodput_over_capacity_without_deadlines"] = (
        over["no_deadlines_over_capacity"] if over else None
    )
    if over:
        targets.append(overload_target(over))
    out["targets"] = targets
    if results.get("formats"):
        out["formats"] = format_ratios(results)
    return out


def photo_targets(results: dict) -> list[dict]:
    """The photo targets of whatever the photos and accuracy stages measured."""
    out = []
    photos = results.get("photos") or {}
    rows = {tuple(r["size"]): r for r in photos.get("handler") or [] if r["batch"] == 1}
    ref = rows.get(PHOTO_REFERENCE)
    for size, limit in TARGET_HANDLER_OVER_640.items():
        if ref and size in rows:
            value = rows[size]["median_s"] / ref["median_s"]
            out.append({"target": f"handler time for a {size[0]}x{size[1]} JPEG <= {limit}x a 640x480 one's (batch 1)",
                        "value": value, "met": value <= limit, "note": ""})  # fmt: skip
    if (4032, 3024) in rows:
        share = rows[(4032, 3024)]["decode_letterbox_share"]
        out.append({"target": f"decode + letterbox <= {TARGET_DECODE_LETTERBOX_SHARE_12MP:.0%} of a 12 MP JPEG's handler steps",
                    "value": share, "met": share <= TARGET_DECODE_LETTERBOX_SHARE_12MP, "note": "batch 1"})  # fmt: skip
    served = {tuple(p["size"]): p for p in (photos.get("served") or {}).get("points", [])}
    if PHOTO_REFERENCE in served and (4032, 3024) in served and served[PHOTO_REFERENCE]["throughput"]:
        value = served[(4032, 3024)]["throughput"] / served[PHOTO_REFERENCE]["throughput"]
        failed = sum(p["failed"] for p in served.values())
        out.append({"target": f"served img/s for 12 MP photos >= {TARGET_SERVED_12MP_OVER_640}x 640x480's",
                    "value": value, "met": value >= TARGET_SERVED_12MP_OVER_640 and failed == 0,
                    "note": f"{failed} failed requests" if failed else ""})  # fmt: skip
    for probe, limit in TARGET_PEAK_RISE_MIB.items():
        m = ((photos.get("served") or {}).get("memory") or {}).get(probe)
        if m:
            out.append({"target": f"served worker peak RSS rise for one {probe.replace('_', ' ')} <= {limit:.0f} MiB",
                        "value": m["peak_rise_mib"], "met": m["peak_rise_mib"] <= limit, "note": "MiB"})  # fmt: skip
    acc = results.get("accuracy")
    if acc:
        out.append({"target": "mAP@.5 of held-out scenes at phone size within 0.01 of the originals'",
                    "value": acc["delta_map50"], "met": abs(acc["delta_map50"]) <= 0.01,
                    "note": f"{acc['map50']['photo']:.4f} vs {acc['map50']['original']:.4f}"})  # fmt: skip
        out.append({"target": ">= 99 % of a full decode's detections scoring >= 0.3 found in the reduced one (IoU >= 0.9)",
                    "value": acc["agreement"], "met": acc["agreement"] >= 0.99,
                    "note": f"{acc['matched']}/{acc['full_decode_detections']} matched"})  # fmt: skip
    return out


def photos_section(results: dict) -> list[tuple[str, str]]:
    """The photos stage: the handler in-process per image size, with each step's share."""
    rows = (results.get("photos") or {}).get("handler")
    if not rows:
        return []
    title = ("photos: the handler in-process per image size (JPEG q90 photos), and the share of each of "
             "its steps (timed apart); x first = handler time against the first size's")  # fmt: skip
    body = table(
        ("size", "MP", "kB", "batch", "img/s", "ms/img", "x first", "decode", "letterbox", "network", "post", "answer"),
        [(f"{r['size'][0]}x{r['size'][1]}", r["megapixels"], r["jpeg_kb"], r["batch"], r["images_per_s"],
          r["ms_per_image"], r["over_first"],
          *(f"{100 * r['shares'][k]:.0f} %" for k in ("decode", "letterbox", "network", "post", "answer")))
         for r in rows],
    )  # fmt: skip
    return [(title, body)]


def photos_served_section(results: dict) -> list[tuple[str, str]]:
    """The photos_served stage: img/s per image size over HTTP, and a worker's memory for one huge image."""
    served = (results.get("photos") or {}).get("served")
    if not served:
        return []
    title = (f"photos served over HTTP: batchSize {served['batch_size']}, maxBatchDelay "
             f"{served['max_batch_delay']} ms, {served['workers']} worker(s), concurrency {served['concurrency']}")  # fmt: skip
    body = table(
        ("size", "img/s", "x first", "p50 ms", "p99 ms", "failed"),
        [(f"{p['size'][0]}x{p['size'][1]}", p["throughput"], p.get("over_first"), p["p50_ms"], p["p99_ms"],
          f"{p['failed']}/{p['requests']}") for p in served["points"]],
    )  # fmt: skip
    if served.get("memory"):
        body += "\nserved worker's peak RSS rise (VmHWM, reset before) for one image: " + ", ".join(
            f"{k} ({v['bytes'] / 1e6:.1f} MB) +{v['peak_rise_mib']:.0f} MiB"
            for k, v in served["memory"].items()
        )
    return [(title, body)]


def accuracy_section(results: dict) -> list[tuple[str, str]]:
    """The accuracy stage: mAP of held-out scenes at phone size, and agreement with a full decode."""
    acc = results.get("accuracy")
    if not acc:
        return []
    title = (f"accuracy at phone size: {acc['images']} held-out scenes upscaled to a longer side of "
             f"{acc['photo_longer_side']} px (decoded pixels: {100 * acc['decoded_pixels_share']:.1f} % of a full decode)")  # fmt: skip
    body = (
        table(("images", "mAP@.5", "mAP@[.5:.95]"),
              [(k, acc["map50"][k], acc["map"][k]) for k in ("original", "photo", "full_decode")])
        + f"\nphoto vs its full decode: {acc['matched']}/{acc['full_decode_detections']} detections scoring "
        f">= {acc['min_score']} matched (same class, IoU >= {acc['min_iou']}): {100 * acc['agreement']:.2f} %"
    )  # fmt: skip
    return [(title, body)]


def overload_target(over: dict) -> dict:
    """Goodput under overload with deadlines >= TARGET_OVERLOAD_GOODPUT x capacity, with no 5xx
    other than 503/504, no request left unanswered by the server and no worker restart."""
    on = over["deadlines"]
    clean = not on["faults"] and on.get("lost") == 0 and not over["worker_restarted"]
    return {
        "target": f"goodput at {on['clients']} clients with {on['deadline_s']:g} s deadlines >= "
        f"{TARGET_OVERLOAD_GOODPUT} x capacity at {over['capacity_runs'][0]['clients']} clients",
        "value": over["deadlines_over_capacity"],
        "met": clean and over["deadlines_over_capacity"] >= TARGET_OVERLOAD_GOODPUT,
        "note": f"{over['no_deadlines_over_capacity']:.2f}x without deadlines"
        + (
            ""
            if clean
            else f"; faults {on['faults']}, lost {on.get('lost')}, restarted {over['worker_restarted']}"
        ),
    }


def overload_section(results: dict) -> list[tuple[str, str]]:
    """The overload stage: capacity, then overload with and without deadlines, as the clients and the server saw it."""
    over = results.get("overload")
    if not over:
        return []
    rows = []
    for label, p in (("capacity", over["capacity_runs"][0]), ("deadlines", over["deadlines"]),
                     ("no deadlines", over["no_deadlines"]), ("capacity", over["capacity_runs"][-1])):  # fmt: skip
        statuses = ", ".join(f"{k}: {v}" for k, v in p["statuses"].items())
        rows.append(
            (label, p["clients"], p["deadline_s"], p["goodput"], p["p50_ms"], p["p99_ms"], statuses,
             p.get("unread_200"), p.get("lost"), p.get("workers_cpu_pct"), p.get("client_cpu_pct"))
        )  # fmt: skip
    headers = ("phase", "clients", "timeout s", "in time/s", "p50 ms", "p99 ms", "statuses in window",
               "unread 200", "lost", "workers %cpu", "client %cpu")  # fmt: skip
    title = (
        f"overload: batchSize {over['batch_size']}, maxBatchDelay {over['max_batch_delay']} ms, "
        f"{over['workers']} worker(s), deadline margin {over.get('deadline_margin_ms', 0):g} ms; closed-loop "
        "clients, each giving up after its timeout; phases in turn, "
        f"{over['capacity_runs'][0]['window_s']:.0f} s windows after a warm-up"
    )
    lines = [
        table(headers, rows),
        f"capacity {over['capacity']:.1f}/s (spread {100 * (over['capacity_spread'] or 0):.0f} % between "
        f"its two runs); goodput / capacity: {over['deadlines_over_capacity']:.2f}x with deadlines, "
        f"{over['no_deadlines_over_capacity']:.2f}x without; worker restarted: {over['worker_restarted']}.",
    ]
    for label, p in (("deadlines", over["deadlines"]), ("no deadlines", over["no_deadlines"])):
        if p.get("worker_cpu_over_capacity") is not None and p.get("in_time_per_worker_cpu_over_capacity"):
            lines.append(
                f"{label}: the worker had {p['worker_cpu_over_capacity']:.2f}x the CPU of the capacity runs, "
                f"and each CPU-second of it bought {p['in_time_per_worker_cpu_over_capacity']:.2f}x their "
                f"answers in time; the handler's 504s: {p.get('handler_504')}."
            )
    lines.append(
        "in time = 200s within the timeout; unread 200 = answers the server computed and sent after their "
        "client had left; lost = requests the server never answered (its access log against the requests "
        "sent, after its queue drained); %cpu of one core in the window."
    )
    return [(title, "\n".join(lines))]


def best_served_point(results: dict, fmt: str) -> dict | None:
    """The highest-throughput served point of a format with no failed request."""
    points = [
        p
        for e in results.get("served") or []
        if e.get("format", "torchscript") == fmt
        for p in e["points"]
        if p["failed"] == 0
    ]
    return max(points, key=lambda p: p["throughput"], default=None)


def format_ratios(results: dict) -> dict:
    """Each network format side by side: its best ceiling, handler and served figures, against
    its own ceiling and against TorchScript's (measured in the same run)."""
    out = {}
    for fmt, info in results["formats"].items():
        rows = {
            key: results.get(key) if fmt == "torchscript" else info.get(key) for key in ("model", "handler")
        }
        best = {key: max((r["images_per_s"] for r in v or []), default=None) for key, v in rows.items()}
        point = best_served_point(results, fmt)
        out[fmt] = {
            "mb": info["mb"],
            "load_s": info["load_s"],
            "compile_s": info["compile_s"],
            "ceiling_images_per_s": best["model"],
            "handler_best_images_per_s": best["handler"],
            "served_best_images_per_s": point["throughput"] if point else None,
            "served_best_p99_over_p50": _div(point["p99_ms"], point["p50_ms"]) if point else None,
        }
    base = out["torchscript"]
    for r in out.values():
        r["served_over_ceiling"] = _div(r["served_best_images_per_s"], r["ceiling_images_per_s"])
        for key in ("ceiling", "handler_best", "served_best"):
            r[f"{key}_over_torchscript"] = _div(r[f"{key}_images_per_s"], base[f"{key}_images_per_s"])
    return out


def _tag(entry: dict, form: str = " {}") -> str:
    """A served entry's format in a title or label; nothing for TorchScript (and for JSON from
    before formats were recorded)."""
    fmt = entry.get("format", "torchscript")
    return "" if fmt == "torchscript" else form.format(fmt)


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


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


def _timing_section(key: str, title: str):
    """A stage whose rows are (batch, img/s, ms/img, median_s)."""

    def section(results: dict) -> list[tuple[str, str]]:
        rows = results.get(key)
        if rows is None:
            return []
        table_rows = [(r["batch"], r["images_per_s"], r["ms_per_image"], 1000 * r["median_s"]) for r in rows]
        return [(title, table(("batch", "img/s", "ms/img", "ms/batch"), table_rows))]

    return section


def post_section(results: dict) -> list[tuple[str, str]]:
    """The post stage: ours against effdet's post-processing on the same head outputs."""
    rows = results.get("post")
    if rows is None:
        return []
    title = ("post-processing alone on the same head outputs: ours vs effdet _post_process + _batch_detection; "
             "identical rows: rows above the first exactly tied score, which must match, of all rows")  # fmt: skip
    body = table(
        ("batch", "ours ms", "effdet ms", "speedup", "ours ms @thr", "speedup @thr", "identical rows",
         "max d score", "max d box px"),
        [(r["batch"], r["ours_ms"], r["effdet_ms"], r["speedup"], r["ours_served_ms"], r["speedup_served"],
          f"{r['compared_rows']}/{r['rows']}", r["max_score_diff"], r["max_box_diff_px"]) for r in rows],
    )  # fmt: skip
    return [(title, body)]


def formats_section(results: dict) -> list[tuple[str, str]]:
    """The network formats side by side (with --formats)."""
    if not results.get("formats"):
        return []
    title = ("network formats side by side (in-process figures measured taking turns; x TorchScript = against "
             "TorchScript in this run)")  # fmt: skip
    body = table(
        ("format", "MB", "compile s", "load s", "ceiling img/s", "x TorchScript", "handler img/s", "served img/s",
         "x TorchScript", "served/ceiling", "p99/p50"),
        [(fmt, r["mb"], r["compile_s"], r["load_s"], r["ceiling_images_per_s"], r["ceiling_over_torchscript"],
          r["handler_best_images_per_s"], r["served_best_images_per_s"], r["served_best_over_torchscript"],
          r["served_over_ceiling"], r["served_best_p99_over_p50"]) for fmt, r in format_ratios(results).items()],
    )  # fmt: skip
    return [(title, body)]


def served_section(results: dict) -> list[tuple[str, str]]:
    """The served stage: one table per served setting (and format)."""
    out = []
    for entry in results.get("served") or []:
        rep = entry["reported"]
        title = (f"served over HTTP{_tag(entry, ' ({})')}: batchSize {entry['batch_size']}, maxBatchDelay "
                 f"{entry['max_batch_delay']} ms, {entry['workers']} worker(s) (server reports "
                 f"{rep['batchSize']}/{rep['maxBatchDelay']}/{rep['workers']})")  # fmt: skip
        body = table(
            ("conc", "img/s", "p50 ms", "p90 ms", "p99 ms", "failed", "client %cpu", "java %cpu", "workers %cpu"),
            [(p["concurrency"], p["throughput"], p["p50_ms"], p["p90_ms"], p["p99_ms"], f"{p['failed']}/{p['requests']}",
              p["client_cpu_pct_of_core"], p.get("frontend_cpu_pct_of_core"), p.get("workers_cpu_pct_of_core"))
             for p in entry["points"]],
        )  # fmt: skip
        out.append((title, body))
    if out:
        last_title, last_body = out[-1]
        out[-1] = (last_title, last_body + "\n%cpu = CPU time over wall time in % of one core. client: the load "
                   "generator (a Python client is GIL-bound near 100 %); java / workers: TorchServe's frontend "
                   "and its worker processes.")  # fmt: skip
    return out


def null_section(results: dict) -> list[tuple[str, str]]:
    """The null stage: TorchServe's frontend + IPC limit, with a handler that answers a constant."""
    return [
        (f"null handler (constant answer, no model): batchSize {e['batch_size']}, maxBatchDelay "
         f"{e['max_batch_delay']} ms, {e['workers']} worker(s): the frontend + IPC limit",
         table(("conc", "req/s", "p50 ms", "p99 ms", "failed"),
               [(p["concurrency"], p["throughput"], p["p50_ms"], p["p99_ms"], f"{p['failed']}/{p['requests']}")
                for p in e["points"]]))
        for e in results.get("null_handler") or []
    ]  # fmt: skip


def fp16_section(results: dict) -> list[tuple[str, str]]:
    """The fp16 stage: does fp16 find fp32's detections on this model."""
    fp16 = results.get("fp16")
    if not fp16:
        return []
    if "skipped" in fp16:
        return [("fp16 vs fp32", f"skipped ({fp16['skipped']})")]
    return [("fp16 vs fp32 on this model",
             f"{fp16['matched']}/{fp16['fp32_detections']} fp32 detections scoring >= {fp16['min_score']} matched "
             f"by fp16 (same class, IoU >= {fp16['min_iou']}): {100 * fp16['agreement']:.2f} %")]  # fmt: skip


# The report's sections in the order of the run's stages; each numbered by its place among those present.
SECTIONS = (
    _timing_section("model", "model only: the network alone (the ceiling)"),
    _timing_section(
        "effdet", "effdet DetBenchPredict, eager, same weights (network + effdet post-processing)"
    ),
    post_section,
    _timing_section("handler", "handler in-process: JPEG bytes in, JSON out"),
    formats_section,
    fp16_section,
    served_section,
    null_section,
    photos_section,
    photos_served_section,
    accuracy_section,
    overload_section,
)


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
    number = 0
    for section in SECTIONS:
        tables = section(results)
        if tables:
            number += 1
        parts += [f"\n{number}. {title}\n{body}" for title, body in tables]
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
    lines.append(
        f"  served / limit        {_ratio(r.get('served_over_limit'))} limit = min(ceiling, null handler)"
    )
    lines.append(
        f"  p99 / p50             {_ratio(r.get('served_best_p99_over_p50'))} at the best served point"
    )
    lines.append(
        f"  goodput / capacity    {_ratio(r.get('overload_goodput_over_capacity'))} under overload with deadlines"
        f" ({_ratio(r.get('overload_goodput_over_capacity_without_deadlines'))} without)"
    )
    for fmt, f in (r.get("formats") or {}).items():
        if fmt != "torchscript":
            lines.append(
                f"  {fmt} / torchscript".ljust(24)
                + f"ceiling {_ratio(f['ceiling_over_torchscript'])}, handler {_ratio(f['handler_best_over_torchscript'])}, "
                f"served {_ratio(f['served_best_over_torchscript'])} (served / its ceiling {_ratio(f['served_over_ceiling'])})"
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
    for fmt, info in (results.get("formats") or {}).items():
        for key, label in curves:
            rows = info.get(key) or []
            if rows:
                ax.plot(
                    [r["batch"] for r in rows],
                    [r["images_per_s"] for r in rows],
                    "x--",
                    label=f"{label}, {fmt}",
                )
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
        label = f"b{entry['batch_size']} d{entry['max_batch_delay']} w{entry['workers']}{_tag(entry)}"
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
                    f"b{entry['batch_size']}d{entry['max_batch_delay']}w{entry['workers']}{_tag(entry)}"
                    f"\nc{p['concurrency']}"
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
