"""Scaling a served model without losing a request.

    result = scale(client, "effdet_demo", 2)     # up: TorchServe's scale call
    result = scale(client, "effdet_demo", 1)     # down: switch to a twin version, drain, unregister

Scaling up is TorchServe's scale call. Scaling down with it kills the surplus workers with their
batch in flight (TorchServe 0.12, pytorch/serve #1101), so a scale-down registers a twin version
of the same archive with the new worker count, makes it the default, drains the old version and
only then unregisters it. Unregistering a version leaves its queued and running requests
unanswered just the same, so ``unregister`` drains it first too. Worker counts are checked against
the machine first (``scripts.client.capacity``), unless forced.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import time
import uuid
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import requests

from scripts.client import Client
from scripts.client.capacity import check_workers_fit
from scripts.paths import MODEL_STORE
from scripts.settings import (
    MAR_FILE,
    MAX_RESPONSE_TIMEOUT_S,
    MAX_WORKERS,
    InvalidArgument,
    check_name,
    check_workers,
    int_in,
)

log = logging.getLogger(__name__)

TWIN_VERSION = "-twin"  # 1.0 <-> 1.0-twin
TWIN_FILE = ".twin"  # effdet_demo.mar <-> effdet_demo.twin.mar
MANIFEST = "MAR-INF/MANIFEST.json"


class ScaleError(RuntimeError):
    """A scale request that could not be carried out; the message says what state it left."""


def scale(
    client: Client,
    model: str,
    workers: int,
    model_store: str | Path | None = None,
    drain_timeout: float = 120,
    start_at_once: int | None = None,
    force: bool = False,
) -> ScaleResult:
    """Give the default version of ``model`` ``workers`` workers without losing a request.

    Up (or equal): TorchServe's scale call; with ``start_at_once`` in steps of that many new
    workers (TorchServe starts new workers side by side, and on a small busy machine several
    at once can run past the model's startupTimeout while the old ones keep serving).
    Down: see ``scale_down``. Unless ``force``, the count is checked first against the machine's
    cores and memory (up: the new workers; down: the twin's, which run beside the old ones a while).
    """
    check_name(model)
    check_workers(workers)
    check_drain_timeout(drain_timeout)
    t0 = time.monotonic()
    current = default_entry(client, model)
    before = max(current["minWorkers"], len(current["workers"]))
    version = current["modelVersion"]
    if not force:
        check_workers_fit(client, model, workers, workers - before if workers >= before else workers)
    if workers >= before:
        step = workers - before
        if start_at_once is not None:
            step = int_in("start_at_once", start_at_once, 1, MAX_WORKERS)
        for n in [*range(before + max(1, step), workers, max(1, step)), workers]:
            r = client.set_workers(model, n, version)
            if not r.ok:
                raise ScaleError(
                    f"scaling {model} {version} to {n} workers failed: {r.status_code} {r.text.strip()}"
                )
        return ScaleResult(model, before, workers, version, version, "scale", time.monotonic() - t0)
    return scale_down(client, model, workers, current, model_store, drain_timeout, t0)


def scale_down(
    client: Client,
    model: str,
    workers: int,
    current: dict,
    model_store: str | Path | None,
    drain_timeout: float,
    t0: float,
) -> ScaleResult:
    """Switch the default version to a twin with ``workers`` workers, drain the old one, unregister it.

    The twin is the same archive with another version in its manifest (1.0 <-> 1.0-twin,
    NAME.mar <-> NAME.twin.mar in the model store; TorchServe cannot register one archive
    twice). While switching, both versions' workers are up: twice the memory, briefly.
    """
    old_version, old_url = current["modelVersion"], current["modelUrl"]
    if not isinstance(old_url, str) or not MAR_FILE.fullmatch(old_url):
        raise ScaleError(
            f"{model} {old_version} was registered from {old_url!r}, not a file name in the model store: "
            "a scale-down without loss needs its archive there"
        )
    store = Path(model_store or MODEL_STORE)
    new_version, new_url = twin_of(old_version, old_url)
    registered = {e["modelVersion"] for e in client.describe(model)}
    if new_version in registered:
        raise ScaleError(
            f"version {new_version} of {model} is registered already (an unfinished scale-down?): "
            f"unregister it (python -m scripts.client unregister {model} {new_version}) and scale again"
        )
    src, dst = store / old_url, store / new_url
    if not src.is_file():
        raise ScaleError(f"{src} not found: pass the server's model store (--model-store)")
    wrote = write_twin(src, dst, new_version)
    t_reg = time.monotonic()
    r = client.register(
        new_url,
        model_name=model,
        batch_size=current.get("batchSize"),
        max_batch_delay=current.get("maxBatchDelay"),
        initial_workers=workers,
        response_timeout=current.get("responseTimeout"),
        force=True,  # checked by scale()
    )
    if not r.ok:
        if wrote and new_url.endswith(TWIN_FILE + ".mar"):
            dst.unlink(missing_ok=True)
        raise ScaleError(
            f"registering {new_url} as {model} {new_version} failed: {r.status_code} {r.text.strip()}"
        )
    try:
        # model-config.yaml's minWorkers beats initial_workers; the twin takes no traffic yet
        twin = client.describe(model, new_version)[0]
        if twin["minWorkers"] != workers or len(twin["workers"]) != workers:
            s = client.set_workers(model, workers, new_version)
            if not s.ok:
                raise ScaleError(
                    f"setting {model} {new_version} to {workers} workers: {s.status_code} {s.text}"
                )
        s = client.set_default(model, new_version)
        if not s.ok:
            raise ScaleError(f"set-default {model} {new_version}: {s.status_code} {s.text}")
    except Exception:
        client.unregister(model, new_version)
        raise
    t_switch = time.monotonic()
    drained = drain(client, model, old_version, drain_timeout)
    u = client.unregister(model, old_version)
    if not u.ok:
        raise ScaleError(f"unregistering drained {model} {old_version} failed: {u.status_code} {u.text}")
    if old_url.endswith(TWIN_FILE + ".mar"):
        src.unlink(missing_ok=True)  # ours; the original archive is never deleted
    return ScaleResult(
        model,
        max(current["minWorkers"], len(current["workers"])),
        workers,
        old_version,
        new_version,
        "switch",
        time.monotonic() - t0,
        start_seconds=t_switch - t_reg,
        drain_seconds=time.monotonic() - t_switch,
        grace_seconds=drained,
    )


def drain(client: Client, model: str, version: str, timeout: float = 120, poll: float = 0.05) -> float:
    """Wait until ``version`` (no longer the default) holds no request; returns the grace waited.

    TorchServe shows a version's queue (describe's ``jobQueueStatus.pendingRequests``) but not
    the batches its workers are running. So: wait for an empty queue, then time a one-image
    probe through the same workers and wait for a whole batch of that (maxBatchDelay + batchSize
    x the probe's compute, doubled, capped by responseTimeout); repeat until the queue is still
    empty afterwards.
    """
    deadline = time.monotonic() + timeout
    grace = 0.0
    while True:
        while (entry := client.describe(model, version)[0])["jobQueueStatus"]["pendingRequests"] > 0:
            if time.monotonic() > deadline:
                raise ScaleError(
                    f"{model} {version} still holds queued requests after {timeout:.0f} s; both versions stay "
                    f"registered: unregister {version} when its queue is empty"
                )
            time.sleep(poll)
        delay = entry["maxBatchDelay"] / 1000
        t = time.monotonic()
        try:
            probe = client.post_once(
                f"/predictions/{model}/{version}", probe_image(), {}, uuid.uuid4().hex, timeout
            )
            took = time.monotonic() - t
            if probe.status_code != 200:
                log.warning("drain probe of %s %s answered %s", model, version, probe.status_code)
        except requests.RequestException as e:  # no measure: wait the longest a batch may take
            log.warning("drain probe of %s %s failed (%s)", model, version, type(e).__name__)
            took = float("inf")
        compute = max(0.0, took - delay)
        grace = min(
            float(entry.get("responseTimeout") or 120), delay + 2 * entry["batchSize"] * compute + 0.2
        )
        time.sleep(grace)
        if client.describe(model, version)[0]["jobQueueStatus"]["pendingRequests"] == 0:
            return grace


def unregister(client: Client, model: str, version: str | None = None, drain_timeout: float = 120) -> dict:
    """Unregister ``version`` of ``model`` (default: the default version) once it holds no request.

    TorchServe's unregister leaves the version's queued and running requests unanswered until
    their clients time out. So the version is drained first (``drain``); TorchServe refuses to
    unregister the default version while others exist, which is refused here before any wait.
    Requests sent to a version after its drain may still be caught: stop sending to the version
    (another default, or no traffic to the model) before unregistering it. Returns TorchServe's
    answer and the drain's grace in seconds.
    """
    check_name(model)
    if version is not None:
        check_name(version, "version")
    check_drain_timeout(drain_timeout)
    default = default_entry(client, model)["modelVersion"]
    versions = [e["modelVersion"] for e in client.describe(model)]
    version = version or default
    if version not in versions:
        raise ScaleError(f"{model} has no version {version} (registered: {', '.join(versions)})")
    if version == default and len(versions) > 1:
        raise ScaleError(
            f"{version} is the default version of {model}: TorchServe unregisters it only as the last "
            f"one; set another default first (python -m scripts.client set-default {model} VERSION)"
        )
    grace = drain(client, model, version, drain_timeout)
    r = client.unregister(model, version)
    if not r.ok:
        raise ScaleError(f"unregistering drained {model} {version} failed: {r.status_code} {r.text.strip()}")
    return {
        "model": model,
        "version": version,
        "status": r.json().get("status"),
        "grace_seconds": round(grace, 2),
    }


def check_drain_timeout(seconds) -> float:
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, int | float)
        or not 0 < seconds <= MAX_RESPONSE_TIMEOUT_S
    ):
        raise InvalidArgument(f"drain_timeout must be in (0, {MAX_RESPONSE_TIMEOUT_S}] s, got {seconds!r}")
    return seconds


def default_entry(client: Client, model: str) -> dict:
    """The describe entry of ``model``'s default version."""
    check_name(model)
    r = client.manage("GET", f"/models/{model}")
    if r.status_code == 404:
        raise ScaleError(f"model {model} is not registered")
    r.raise_for_status()
    return r.json()[0]


@dataclass
class ScaleResult:
    """What a scale call did; ``method`` is "scale" (TorchServe's call) or "switch" (twin version)."""

    model: str
    workers_before: int
    workers: int
    version_before: str
    version: str
    method: str
    seconds: float
    start_seconds: float = 0.0  # registering the twin and starting its workers
    drain_seconds: float = 0.0  # from the switch of the default version to the unregistration
    grace_seconds: float = 0.0  # of which waiting for in-flight batches after the queue emptied

    def as_dict(self) -> dict:
        return {k: round(v, 2) if isinstance(v, float) else v for k, v in asdict(self).items()}


def twin_of(version: str, url: str) -> tuple[str, str]:
    """The other member of a version's twin pair: (1.0, x.mar) <-> (1.0-twin, x.twin.mar).

    Toggling (not counting) keeps names bounded over any number of scale-downs.
    """
    stem = url[: -len(".mar")]
    if version.endswith(TWIN_VERSION) and stem.endswith(TWIN_FILE):
        return version[: -len(TWIN_VERSION)], stem[: -len(TWIN_FILE)] + ".mar"
    return version + TWIN_VERSION, stem + TWIN_FILE + ".mar"


def _entries(z: zipfile.ZipFile) -> dict[str, int]:
    return {i.filename: i.CRC for i in z.infolist() if i.filename != MANIFEST}


def write_twin(src: Path, dst: Path, version: str) -> bool:
    """``dst``: ``src`` with ``version`` in its manifest. Returns False when ``dst`` already is that.

    Refuses to overwrite a ``dst`` holding anything else unless it is a twin file (ours).
    """
    with zipfile.ZipFile(src) as zin:
        manifest = json.loads(zin.read(MANIFEST))
        manifest["model"]["modelVersion"] = version
        if dst.is_file():
            try:
                with zipfile.ZipFile(dst) as zd:
                    same = _entries(zd) == _entries(zin) and json.loads(zd.read(MANIFEST)) == manifest
            except (zipfile.BadZipFile, KeyError, ValueError):
                same = False
            if same:
                return False
            if not dst.name.endswith(TWIN_FILE + ".mar"):
                raise ScaleError(
                    f"{dst} exists and is not {src.name} with version {version}: the model store changed under "
                    "the served model; move it away or register the new archive as a version of its own"
                )
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
        with zipfile.ZipFile(tmp, "w") as zout:
            for info in zin.infolist():
                data = (
                    json.dumps(manifest, indent=2).encode() if info.filename == MANIFEST else zin.read(info)
                )
                zout.writestr(info, data)
    os.replace(tmp, dst)
    return True


@functools.cache
def probe_image() -> bytes:
    """A small grey PNG: what the drain sends through the old version's workers to time them."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (127, 127, 127)).save(buf, "PNG")
    return buf.getvalue()
