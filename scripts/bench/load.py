"""Load generation: a closed loop of client threads, with the CPU the client and the server used."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

from handler.answer import Answer, AnswerError
from scripts.bench.timing import percentile
from scripts.client import Client
from scripts.load import Images, Traffic


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


def has_detections(key: str, body: dict) -> str | None:
    """A 200 must carry a detection answer (the model's, or the null handler's constant one)."""
    try:
        Answer.from_json(body)
    except AnswerError as e:
        return f"not an answer: {e}"
    return None


def run_load(
    make_client: Callable[[], Client],
    model: str,
    payloads: Sequence[bytes],
    concurrency: int,
    total: int,
    server_cpu: ProcessCPU | None = None,
) -> dict:
    """Closed loop: ``concurrency`` threads send ``total`` requests back to back between them.

    The project's one traffic loop (``scripts.load.Traffic`` with a request limit), each thread
    with its own client from ``make_client`` (the bench passes one without retries, so that a
    failed request counts). A 200 without a detection answer is a failure ("wrong answer"), as is
    any other status or an exception (its class name). The client's own CPU time (all its
    threads, ``time.process_time``) is reported against the wall time.
    """
    traffic = Traffic(
        make_client, model, Images.cycle(payloads), threads=concurrency, check=has_detections, limit=total
    )
    srv0 = server_cpu.sample() if server_cpu else None
    cpu0, t0 = time.process_time(), time.perf_counter()
    traffic.start()
    traffic.wait()
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    srv1 = server_cpu.sample() if server_cpu else None
    outcomes = traffic.snapshot()
    lat = [1000.0 * o.latency for o in outcomes if o.ok]
    out = {
        "concurrency": concurrency,
        "requests": total,
        "ok": len(lat),
        "failed": total - len(lat),
        "statuses": traffic.summary()["by_status"],
        "wall_s": wall,
        "throughput": len(lat) / wall if wall > 0 else 0.0,
        "latencies_ms": lat,
        "client_cpu_s": cpu,
        "client_cpu_pct_of_core": 100.0 * cpu / wall if wall > 0 else 0.0,
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
