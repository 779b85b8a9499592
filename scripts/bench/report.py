"""Results -> ratios and targets, text tables and a plot. Pure functions of the results dict."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

TARGET_POST_SPEEDUP = 10.0
TARGET_SERVED_OVER_HANDLER_CPU = 0.8
TARGET_SERVED_OVER_CEILING_GPU = 0.8
TARGET_P99_OVER_P50 = 3.0
TARGET_OVERLOAD_GOODPUT = 0.7  # goodput with deadlines over capacity, both measured in the run


def ratios(results: dict) -> dict:
    """The headline ratios and the project's targets, from whatever stages ran."""
    best = {
        key: max((r["images_per_s"] for r in results.get(key) or []), default=None)
        for key in ("model", "effdet", "handler")
    }
    best_point = best_served_point(results, "script")
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


def overload_section(over: dict) -> str:
    """Section 7: capacity, then overload with and without deadlines, as the clients and the server saw it."""
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
    lines = [
        f"\n7. overload: batchSize {over['batch_size']}, maxBatchDelay {over['max_batch_delay']} ms, "
        f"{over['workers']} worker(s); closed-loop clients, each giving up after its timeout; phases in turn, "
        f"{over['capacity_runs'][0]['window_s']:.0f} s windows after a warm-up",
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
    return "\n".join(lines)


def best_served_point(results: dict, fmt: str) -> dict | None:
    """The highest-throughput served point of a format with no failed request."""
    points = [
        p
        for e in results.get("served") or []
        if e.get("format", "script") == fmt
        for p in e["points"]
        if p["failed"] == 0
    ]
    return max(points, key=lambda p: p["throughput"], default=None)


def format_ratios(results: dict) -> dict:
    """Each network format side by side: its best ceiling, handler and served figures, against
    its own ceiling and against TorchScript's (measured in the same run)."""
    out = {}
    for fmt, info in results["formats"].items():
        rows = {key: results.get(key) if fmt == "script" else info.get(key) for key in ("model", "handler")}
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
    script = out["script"]
    for r in out.values():
        r["served_over_ceiling"] = _div(r["served_best_images_per_s"], r["ceiling_images_per_s"])
        for key in ("ceiling", "handler_best", "served_best"):
            r[f"{key}_over_script"] = _div(r[f"{key}_images_per_s"], script[f"{key}_images_per_s"])
    return out


def _tag(entry: dict, form: str = " {}") -> str:
    """A served entry's format in a title or label; nothing for TorchScript (and for JSON from
    before formats were recorded)."""
    fmt = entry.get("format", "script")
    return "" if fmt == "script" else form.format(fmt)


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
    if results.get("formats"):
        fr = format_ratios(results)
        parts.append(
            "\nnetwork formats side by side (in-process figures measured taking turns; x script = against "
            "TorchScript in this run)\n"
            + table(
                (
                    "format",
                    "MB",
                    "compile s",
                    "load s",
                    "ceiling img/s",
                    "x script",
                    "handler img/s",
                    "served img/s",
                    "x script",
                    "served/ceiling",
                    "p99/p50",
                ),
                [
                    (
                        fmt,
                        r["mb"],
                        r["compile_s"],
                        r["load_s"],
                        r["ceiling_images_per_s"],
                        r["ceiling_over_script"],
                        r["handler_best_images_per_s"],
                        r["served_best_images_per_s"],
                        r["served_best_over_script"],
                        r["served_over_ceiling"],
                        r["served_best_p99_over_p50"],
                    )
                    for fmt, r in fr.items()
                ],
            )  # fmt: skip
        )
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
            f"\n5. served over HTTP{_tag(entry, ' ({})')}: batchSize {entry['batch_size']}, maxBatchDelay {entry['max_batch_delay']} ms, "
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
    for entry in results.get("null_handler") or []:
        parts.append(
            f"\n6. null handler (constant answer, no model): batchSize {entry['batch_size']}, "
            f"maxBatchDelay {entry['max_batch_delay']} ms, {entry['workers']} worker(s): the frontend + IPC limit\n"
            + table(
                ("conc", "req/s", "p50 ms", "p99 ms", "failed"),
                [
                    (
                        p["concurrency"],
                        p["throughput"],
                        p["p50_ms"],
                        p["p99_ms"],
                        f"{p['failed']}/{p['requests']}",
                    )
                    for p in entry["points"]
                ],
            )
        )
    if results.get("overload"):
        parts.append(overload_section(results["overload"]))
    fp16 = results.get("fp16")
    if fp16:
        if "skipped" in fp16:
            parts.append(f"\nfp16 vs fp32: skipped ({fp16['skipped']})")
        else:
            parts.append(
                f"\nfp16 vs fp32 on this model: {fp16['matched']}/{fp16['fp32_detections']} fp32 detections "
                f"scoring >= {fp16['min_score']} matched by fp16 (same class, IoU >= {fp16['min_iou']}): "
                f"{100 * fp16['agreement']:.2f} %"
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
        if fmt != "script":
            lines.append(
                f"  {fmt} / script".ljust(24)
                + f"ceiling {_ratio(f['ceiling_over_script'])}, handler {_ratio(f['handler_best_over_script'])}, "
                f"served {_ratio(f['served_best_over_script'])} (served / its ceiling {_ratio(f['served_over_ceiling'])})"
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
