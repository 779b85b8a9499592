"""Served over HTTP: one TorchServe, one .mar per setting, and the null-handler limit of the frontend."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

from handler.config import HandlerConfig
from handler.network import DEFAULT_FORMAT
from scripts.bench.load import ProcessCPU, aggregate, run_load
from scripts.bench.parity import BenchError
from scripts.bench.timing import Progress
from scripts.bench.workload import Workload
from scripts.client import NO_RETRY, Client
from scripts.settings import ModelConfig


class ServedSetting(NamedTuple):
    """One TorchServe setting the bench serves at: batchSize, maxBatchDelay (ms) and workers."""

    batch_size: int
    max_batch_delay: int
    workers: int


def _named(name: str, w: Workload) -> str:
    """The served model's name: ``name`` for TorchScript, ``name_<format>`` for another format."""
    return name if w.fmt == DEFAULT_FORMAT else f"{name}_{w.fmt}"


def fresh_store(workdir: Path) -> Path:
    """``workdir/model_store``, emptied: each served stage archives its own models into it."""
    store = Path(workdir) / "model_store"
    if store.exists():
        shutil.rmtree(store)
    store.mkdir(parents=True)
    return store


def model_name(name: str, setting: ServedSetting) -> str:
    b, d, n = setting
    return f"{name}_b{b}_d{d}_w{n}"


def bench_client(server, timeout: float = 120) -> Callable[[], Client]:
    """Clients for the load threads: no retries, so a lost or failed request counts as one in the figures."""
    return lambda: Client(
        server.inference_url, server.management_url, server.key_file, timeout=timeout, retry=NO_RETRY
    )


def _wait_gone(client, model: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.manage("GET", f"/models/{model}").status_code == 404:
            return
        time.sleep(0.3)


def _server_pid(server) -> int | None:
    try:
        return int(server.pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def bench_served(
    w: Workload,
    name: str,
    configs: Sequence[ServedSetting],
    concurrencies: Sequence[int],
    requests: int,
    repeats: int,
    threads: int,
    workdir: Path,
    progress: Progress,
    null_configs: Sequence[ServedSetting] = (),
    more: Sequence[Workload] = (),
) -> list[dict]:
    """Archive one .mar per setting, start one TorchServe, register them one at a time and load each.

    ``more``: the same model in other network formats, each served at every setting right after
    ``w`` (entries say which in ``format``). ``null_configs``: the same load against the null
    handler (``null_handler.py``, a constant answer, no model) with those settings, after the
    model's: the frontend + worker IPC limit. Entries say which they are in ``kind`` ("model" or
    "null").
    """
    from scripts.archive import archive
    from scripts.serve import Server

    workdir = Path(workdir)
    store = fresh_store(workdir)
    cuda = w.device.type == "cuda"
    formats = [w, *more]
    jobs = [
        ("model", f, setting, model_name(_named(name, f), setting)) for setting in configs for f in formats
    ]
    jobs += [("null", None, setting, model_name(NULL_NAME, setting)) for setting in null_configs]
    progress.stage("served: archiving", len(jobs))
    mars = {}
    for kind, f, setting, model in jobs:
        b, d, n = setting
        if kind == "null":
            mars[model] = archive_null(model, store, setting, cuda)
        else:
            handler = HandlerConfig(
                precision=f.precision, torch_threads=None if cuda else max(1, threads // n)
            )
            mars[model] = archive(f.export_dir, model, "1.0", store, served_config(setting, cuda, handler))
        progress.tick(model)
    progress.end()

    server = Server(workdir / "ts", store, free_ports=True)
    results = []
    try:
        progress.note("starting TorchServe")
        server.start()
        mgmt = Client(server.inference_url, server.management_url, server.key_file)
        cpu = ProcessCPU(_server_pid(server))
        per_point = 1 + repeats
        progress.stage("served", len(jobs) * len(concurrencies) * per_point)
        for kind, f, setting, model in jobs:
            b, d, n = setting
            mar = mars[model]
            entry = {
                "kind": kind,
                "format": f.fmt if f is not None else None,
                "batch_size": b,
                "max_batch_delay": d,
                "workers": n,
                "model": model,
                "points": [],
            }
            r = mgmt.register(mar.name, initial_workers=n)
            if not r.ok:
                raise BenchError(f"TorchServe refused {mar.name}: {r.status_code} {r.text[:300]}")
            desc = mgmt.describe(model)[0]
            if len(desc.get("workers", [])) < n:
                mgmt.set_workers(model, n)
                desc = mgmt.describe(model)[0]
            entry["reported"] = {
                "batchSize": desc.get("batchSize"),
                "maxBatchDelay": desc.get("maxBatchDelay"),
                "workers": len(desc.get("workers", [])),
            }
            clients = bench_client(server)
            try:
                for c in concurrencies:
                    # warm-up: TorchScript optimises per input shape, batches of every size must pass
                    run_load(clients, model, w.images, c, max(2 * c, 3 * b * n))
                    progress.tick(f"{model} c={c} warm-up")
                    reps = []
                    for _ in range(repeats):
                        reps.append(run_load(clients, model, w.images, c, max(requests, c), cpu))
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


NULL_NAME = "null"
NULL_HANDLER = Path(__file__).with_name("null_handler.py")


def served_config(
    setting: ServedSetting,
    cuda: bool,
    handler: HandlerConfig | None = None,
    startup_timeout: int | None = None,
) -> ModelConfig:
    """The archive's model-config for one served setting (the model's and the null handler's alike)."""
    b, d, n = setting
    return ModelConfig(
        batch_size=b,
        max_batch_delay=d,
        min_workers=n,
        max_workers=n,
        startup_timeout=startup_timeout,
        device_type="gpu" if cuda else "cpu",
        handler=handler or HandlerConfig(),
    )


def archive_null(name: str, store: Path, setting: ServedSetting, cuda: bool) -> Path:
    """The null handler in its own tiny .mar, built by the real torch-model-archiver (no model file)."""
    from scripts.archive import run_archiver

    return run_archiver(name, "1.0", store, served_config(setting, cuda), NULL_HANDLER)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False
