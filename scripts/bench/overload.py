"""Overload: goodput next to capacity, on one TorchServe, in one run.

Clients in a closed loop, each giving up after ``deadline`` seconds (what a web front end or a
mobile app does), at a concurrency well above what the worker can serve within that time. With
deadlines on, every request says when its client stops waiting (``X-Request-Deadline``, sent by
``scripts.client``) and the handler answers the ones it cannot serve in time with a 504 at once
(``handler.deadline``); without, TorchServe keeps every abandoned request queued and the worker
computes answers nobody reads. The phases take turns on the same server, so that a change in the
machine's load shows as a spread of the capacity figures rather than as a ratio:

    capacity (few clients, a timeout they never reach) -> overload with deadlines
    -> overload without deadlines -> capacity again

Goodput is 200s that came back within the deadline, per second, counted over a window that
starts after a warm-up (the queue needs a few deadlines to reach its steady state). Besides the
clients' view, the server's: how many answers TorchServe sent (its access log's lines) against
how many requests the clients sent, once its queue has drained (a request never answered
is a lost answer), and whether the worker process is still the same one.
"""

from __future__ import annotations

import logging
import re
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import requests

from scripts.bench.load import ProcessCPU, has_detections
from scripts.bench.served import ServedSetting, _server_pid, fresh_store, model_name, served_config
from scripts.bench.timing import Progress, percentile
from scripts.client import NO_RETRY, Client
from scripts.load import Images, Traffic

OVERLOAD_SETTING = ServedSetting(4, 20, 1)  # batchSize, maxBatchDelay ms, workers: the demo's archive
EXPECTED = {"200", "503", "504"}  # answers an overloaded server may give; anything else is a fault


def overload_client(server, timeout: float, deadlines: bool) -> Callable[[], Client]:
    """Clients that try once and give up after ``timeout`` s, telling the server so or not."""
    return lambda: Client(
        server.inference_url,
        server.management_url,
        server.key_file,
        timeout=timeout,
        retry=NO_RETRY,
        deadlines=deadlines,
    )


def closed_loop(
    make_client: Callable[[], Client],
    model: str,
    payloads: Sequence[bytes],
    clients: int,
    seconds: float,
    warmup: float,
    deadline: float,
    server_cpu: ProcessCPU | None = None,
) -> dict:
    """``clients`` threads send back to back for ``warmup`` + ``seconds`` s; what finished inside
    the last ``seconds``: answers in time (a 200 within ``deadline`` s) per second, statuses,
    latency, and the CPU the clients (this process) and the server (with ``server_cpu``) used in
    the window, in % of one core: on a small machine the clients compete with the worker.

    ``requests`` counts everything sent, before and after the window too (for the lost-answer
    check against the server's counters)."""
    traffic = Traffic(make_client, model, Images.cycle(payloads), threads=clients, check=has_detections)
    quiet = logging.getLogger("scripts.client")  # one warning per 504 or timeout would flood the output
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        traffic.start()
        time.sleep(warmup)
        cpu0, srv0, t0 = time.process_time(), server_cpu.sample() if server_cpu else None, time.monotonic()
        time.sleep(seconds)
        cpu1, srv1, t1 = time.process_time(), server_cpu.sample() if server_cpu else None, time.monotonic()
        traffic.stop()
    finally:
        quiet.setLevel(level)
    outcomes = traffic.snapshot()
    window = [o for o in outcomes if t0 <= o.t1 < t1]
    in_time = [o for o in window if o.ok and o.latency <= deadline]
    lat = [1000.0 * o.latency for o in window if o.ok]
    statuses = Counter(str(o.status) if o.problem is None else "wrong answer" for o in window)
    return {
        "clients": clients,
        "deadline_s": deadline,
        "window_s": t1 - t0,
        "requests": len(outcomes),
        "ok_total": sum(o.status == 200 for o in outcomes),
        "unanswered_by_client": traffic.unanswered,
        "finished_in_window": len(window),
        "in_time": len(in_time),
        "goodput": len(in_time) / (t1 - t0),
        "statuses": dict(sorted(statuses.items())),
        "p50_ms": percentile(lat, 50),
        "p99_ms": percentile(lat, 99),
        "client_cpu_pct": 100 * (cpu1 - cpu0) / (t1 - t0),
        **(
            {f"{k}_cpu_pct": 100 * (srv1[k] - srv0[k]) / (t1 - t0) for k in ("frontend", "workers")}
            if srv0 and srv1
            else {}
        ),
    }


def server_answers(server, model: str) -> Counter | None:
    """Prediction answers TorchServe's frontend has sent ``model`` so far, by status: its access
    log has one line per answer, written when the answer is sent (also to a client that has
    already given up); None when there is no log to read."""
    lines = access_log(server, model)
    return None if lines is None else Counter(status for status, _ in lines)


def access_log(server, model: str) -> list[tuple[str, int]] | None:
    """``(status, ms)`` of each prediction answer to ``model`` in TorchServe's access log, in the
    order sent: ms is the frontend's own count from the request's arrival to its answer, so a
    latency measured without the clients' scheduling (many client threads on a small machine
    read their answers late). None when there is no log to read."""
    logs = sorted((Path(server.workdir) / "logs").glob("access_log*.log*"))
    if not logs:
        return None
    line = re.compile(rf'"POST /predictions/{re.escape(model)} [^"]*" (\d{{3}}) (\d+)'.encode())
    return [(m.group(1).decode(), int(m.group(2))) for f in logs for m in line.finditer(f.read_bytes())]


def answered_in_time(lines: Sequence[tuple[str, int]], deadline: float) -> int:
    """How many of ``access_log``'s lines are 200 answers sent within ``deadline`` s of arriving."""
    return sum(status == "200" and ms <= 1000 * deadline for status, ms in lines)


def handler_counters(server, names: Sequence[str] = ("EffDetDeadlineExpired", "EffDetDeadlineLate")) -> dict:
    """The handler's own counters as TorchServe's metrics endpoint shows them (summed over their
    labels): rows answered 504 because their deadline had passed, or because their batch could
    not have finished in time. Empty when the endpoint cannot be read."""
    try:
        text = requests.get(server.props["metrics_address"] + "/metrics", timeout=10).text
    except (requests.RequestException, KeyError):
        return {}
    out = {}
    for name in names:
        values = re.findall(rf"(?m)^{name}(?:{{[^}}]*}})? ([0-9.eE+-]+)$", text)
        out[name] = round(sum(float(v) for v in values))
    return out


def pending(mgmt: Client, model: str) -> int:
    desc = mgmt.describe(model)[0]
    return int((desc.get("jobQueueStatus") or {}).get("pendingRequests", 0))


def worker_pids(mgmt: Client, model: str) -> list[int]:
    return sorted(int(w["pid"]) for w in mgmt.describe(model)[0].get("workers", []) if w.get("pid"))


def drain(server, mgmt: Client, model: str, before: Counter | None, sent: int, patience: float = 60) -> dict:
    """Wait until TorchServe has answered every request a phase sent (its queue empty and its
    access log up by ``sent``), as long as it keeps answering (``patience`` s without a new answer
    ends the wait): the answers it sent by status, and how many requests it never answered."""
    answered, last, since = None, None, time.monotonic()
    while time.monotonic() - since < patience:
        now = server_answers(server, model)
        answered = None if now is None or before is None else now - before
        if answered is not None and answered.total() >= sent and pending(mgmt, model) == 0:
            break
        if answered != last:
            last, since = answered, time.monotonic()
        time.sleep(0.5)
    return {
        "server_statuses": dict(sorted(answered.items())) if answered is not None else None,
        "lost": None if answered is None else max(0, sent - answered.total()),
    }


def cpu_split(point: dict, capacity_runs: Sequence[dict]) -> dict:
    """Goodput over capacity as (the worker's CPU against the capacity runs') x (answers in time per
    worker CPU-second against theirs): on a small machine the first falls when the clients and the
    frontend take cores from the worker; the second is what the worker's own time bought."""
    cpu = [p.get("workers_cpu_pct") for p in capacity_runs]
    if point.get("workers_cpu_pct") is None or not all(cpu):
        return {}
    base_cpu = statistics.fmean(cpu)
    base_rate = statistics.fmean(p["goodput"] / p["workers_cpu_pct"] for p in capacity_runs)
    return {
        "worker_cpu_over_capacity": point["workers_cpu_pct"] / base_cpu,
        "in_time_per_worker_cpu_over_capacity": (point["goodput"] / point["workers_cpu_pct"]) / base_rate
        if point["workers_cpu_pct"]
        else None,
    }


def bench_overload(
    server,
    model: str,
    payloads: Sequence[bytes],
    capacity_clients: int,
    clients: int,
    deadline: float,
    seconds: float,
    warmup: float,
    progress: Progress | None = None,
) -> dict:
    """The four phases on ``model``, already registered and READY on ``server``; the figures and
    the checks (statuses, lost answers, worker restarts) of each, and goodput over capacity."""
    mgmt = Client(server.inference_url, server.management_url, server.key_file)
    pids = worker_pids(mgmt, model)
    cpu = ProcessCPU(_server_pid(server))
    phases = [
        ("capacity", capacity_clients, max(60.0, 10 * deadline), False),
        ("deadlines", clients, deadline, True),
        ("no_deadlines", clients, deadline, False),
        ("capacity", capacity_clients, max(60.0, 10 * deadline), False),
    ]
    if progress:
        progress.stage("overload", len(phases))
    out: dict = {"capacity_runs": []}
    for name, n, timeout, send in phases:
        before, counted = server_answers(server, model), handler_counters(server)
        logged, start = len(access_log(server, model) or ()), time.monotonic()
        point = closed_loop(
            overload_client(server, timeout, send), model, payloads, n, seconds, warmup, timeout, cpu
        )
        took = time.monotonic() - start
        point.update(drain(server, mgmt, model, before, point["requests"]))
        # the same figure as the frontend sees it, over the whole phase (warm-up included)
        point["server_in_time"] = answered_in_time((access_log(server, model) or [])[logged:], timeout)
        point["server_goodput"] = point["server_in_time"] / took
        point["handler_504"] = {k: v - counted.get(k, 0) for k, v in handler_counters(server).items()}
        # answers computed for clients that had already left: the server sent a 200, nobody read it
        point["unread_200"] = (point["server_statuses"] or {}).get("200", 0) - point["ok_total"]
        point["faults"] = {k: v for k, v in point["statuses"].items() if k.isdigit() and k not in EXPECTED}
        if name == "capacity":
            out["capacity_runs"].append(point)
        else:
            out[name] = point
        if progress:
            progress.tick(f"{name} c={n}: {point['goodput']:.1f}/s")
    if progress:
        progress.end()
    caps = [p["goodput"] for p in out["capacity_runs"]]
    out["capacity"] = statistics.fmean(caps)
    out["capacity_spread"] = (max(caps) - min(caps)) / out["capacity"] if out["capacity"] else None
    for name in ("deadlines", "no_deadlines"):
        out[f"{name}_over_capacity"] = out[name]["goodput"] / out["capacity"] if out["capacity"] else None
        out[name].update(cpu_split(out[name], out["capacity_runs"]))
    out["worker_restarted"] = worker_pids(mgmt, model) != pids
    return out


def bench_overload_served(
    w,
    name: str,
    setting: ServedSetting,
    capacity_clients: int,
    clients: int,
    deadline: float,
    seconds: float,
    warmup: float,
    threads: int,
    workdir: Path,
    progress: Progress,
) -> dict:
    """Archive ``w``'s model at ``setting`` (batchSize, maxBatchDelay, workers), serve it alone on
    its own TorchServe and run ``bench_overload`` on it."""
    from handler.config import HandlerConfig
    from scripts.archive import archive
    from scripts.serve import Server

    workdir = Path(workdir)
    store = fresh_store(workdir)
    model = model_name(f"{name}_overload", setting)
    cuda = w.device.type == "cuda"
    handler = HandlerConfig(
        precision=w.precision, torch_threads=None if cuda else max(1, threads // setting.workers)
    )
    # a worker warming up on a busy machine can take minutes: give it them rather than a restart loop
    archive(w.export_dir, model, "1.0", store, served_config(setting, cuda, handler, startup_timeout=900))
    server = Server(workdir / "ts", store, free_ports=True)
    try:
        progress.note(f"overload: starting TorchServe with {model}")
        server.start([f"{model}={model}.mar"], timeout=900)
        result = bench_overload(
            server, model, w.images, capacity_clients, clients, deadline, seconds, warmup, progress
        )
    finally:
        server.stop()
    b, d, n = setting
    return {"batch_size": b, "max_batch_delay": d, "workers": n, "model": model,
            "deadline_margin_ms": handler.deadline_margin_ms, **result}  # fmt: skip
