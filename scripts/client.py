"""HTTP client for the served detector: predictions and the management API, token from key_file.json.

    python -m scripts.client predict a.jpg b.png --model effdet_demo --score-threshold 0.3 --draw out.png
    python -m scripts.client register effdet_demo_v2.mar --batch-size 4 --max-batch-delay 20 --initial-workers 1
    python -m scripts.client scale effdet_demo --workers 2
    python -m scripts.client describe effdet_demo
    python -m scripts.client set-default effdet_demo 2.0
    python -m scripts.client unregister effdet_demo 2.0

Tokens are read from the key file and sent as ``Authorization: Bearer``; they are never printed.

Predictions are idempotent, so ``Client.predict`` retries one that a worker lost (500/507 "Worker
died.", 503, 502/504 from a proxy, a dropped connection, or no answer within ``timeout``) with
backoff inside a total time budget. Every attempt carries its own ``X-Request-Id``; the handler
echoes it, and an answer carrying another id (a stale answer on a keep-alive connection) is
dropped with its connection and the prediction retried.

``scale`` loses no request: scaling up is TorchServe's scale call; scaling down switches traffic to
a twin version of the same archive running the new worker count, drains the old version and only
then unregisters it (TorchServe 0.12 kills surplus workers with their batch in flight,
pytorch/serve #1101). Every value is checked here before anything is sent.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import logging
import os
import random
import re
import sys
import threading
import time
import uuid
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import requests

from scripts.paths import ROOT

log = logging.getLogger(__name__)

DEFAULT_KEY_FILE = ROOT / "runs" / "serve" / "key_file.json"
DEFAULT_MODEL_STORE = ROOT / "model_store"
REQUEST_ID_HEADER = "X-Request-Id"  # sent with each attempt
ECHO_HEADER = "X-Client-Request-Id"  # the handler's echo (TorchServe rewrites X-Request-Id)

# -- what the management API is allowed to receive from us ------------------------------------------
MAX_WORKERS = 64  # per model version; each worker holds a copy of the model (~0.5 GB on CPU)
MAX_BATCH_SIZE = 1024
MAX_BATCH_DELAY_MS = 60_000
MAX_RESPONSE_TIMEOUT_S = 3600
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # model names and versions; no "/", no ".."
MAR_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,200}\.mar")  # a file name in the model store

# -- twin versions, for scale-downs -----------------------------------------------------------------
TWIN_VERSION = "-twin"  # 1.0 <-> 1.0-twin
TWIN_FILE = ".twin"  # effdet_demo.mar <-> effdet_demo.twin.mar
MANIFEST = "MAR-INF/MANIFEST.json"


class InvalidArgument(ValueError):
    """A value the project refuses to send to TorchServe (which would accept it, or break on it)."""


class ScaleError(RuntimeError):
    """A scale request that could not be carried out; the message says what state it left."""


def int_in(name: str, value, lo: int, hi: int, hint: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{name} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise InvalidArgument(f"{name} must be in [{lo}, {hi}], got {value}{hint}")
    return value


def check_name(value, what: str = "model name") -> str:
    """Model names and versions: letters, digits, ``_.-``; TorchServe registers ``a/b`` or ``../x``
    but then cannot unregister them over REST."""
    if not isinstance(value, str) or not NAME.fullmatch(value) or ".." in value:
        raise InvalidArgument(
            f"{what} must be 1-128 letters, digits, '_', '.' or '-' (starting with a letter or digit, "
            f"no '..'), got {value!r}"
        )
    return value


def check_workers(value) -> int:
    """A worker count for a scale call: 1..MAX_WORKERS. Zero is refused: TorchServe 0.12 answers
    "Workers scaled to 0" but keeps the worker process running, after unregister too."""
    return int_in(
        "workers",
        value,
        1,
        MAX_WORKERS,
        " (0 would leave TorchServe's worker running: unregister the model to stop serving it)"
        if value == 0
        else "",
    )


def check_mar(value) -> str:
    if not isinstance(value, str) or not MAR_FILE.fullmatch(value) or ".." in value:
        raise InvalidArgument(
            f"url must be the file name of a .mar in the model store (letters, digits, '_.-'), got {value!r}"
        )
    return value


def check_register(
    url: str,
    model_name: str | None,
    batch_size: int | None,
    max_batch_delay: int | None,
    initial_workers: int,
    response_timeout: int | None,
) -> None:
    """Everything a registration sends; TorchServe stores negative sizes, delays and timeouts."""
    check_mar(url)
    if model_name is not None:
        check_name(model_name)
    if batch_size is not None:
        int_in("batch_size", batch_size, 1, MAX_BATCH_SIZE)
    if max_batch_delay is not None:
        int_in("max_batch_delay (ms)", max_batch_delay, 0, MAX_BATCH_DELAY_MS)
    if response_timeout is not None:
        int_in("response_timeout (s)", response_timeout, 1, MAX_RESPONSE_TIMEOUT_S)
    check_workers(initial_workers)


def find_key_file(explicit: str | Path | None = None) -> Path:
    """--key-file, $EFFDET_SERVE_KEY_FILE, runs/serve/key_file.json, ./key_file.json: the first that exists."""
    for candidate in (
        explicit,
        os.environ.get("EFFDET_SERVE_KEY_FILE"),
        DEFAULT_KEY_FILE,
        Path("key_file.json"),
    ):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise FileNotFoundError("no key_file.json found: start the server (make serve) or pass --key-file")


# -- retries ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RetryPolicy:
    """How hard ``Client.predict`` tries: ``attempts`` in all, within ``budget`` seconds (waits
    included), waiting ``backoff`` x 2^k (capped at ``max_backoff``, with jitter) in between."""

    attempts: int = 5
    budget: float = 90.0
    backoff: float = 0.2
    max_backoff: float = 3.0

    def wait(self, k: int) -> float:
        return min(self.max_backoff, self.backoff * 2**k) * (0.5 + random.random() / 2)


NO_RETRY = RetryPolicy(attempts=1)


def transient(status: int, text: str) -> str | None:
    """Why an HTTP answer is worth another try (a lost batch, no worker now), or None."""
    if status == 507 or (status == 500 and "Worker died" in text):
        return f"{status} worker died"
    if status in (502, 503, 504):
        return f"{status} unavailable"
    return None


def answer_id(r: requests.Response) -> str | None:
    """The request id an answer says it answers: the handler's header, or its JSON field."""
    rid = r.headers.get(ECHO_HEADER)
    if (
        rid is None
        and r.status_code == 200
        and r.headers.get("content-type", "").startswith("application/json")
    ):
        try:
            body = r.json()
        except ValueError:
            return None
        rid = body.get("request_id") if isinstance(body, dict) else None
    return rid


class Client:
    """Inference + management calls against one TorchServe.

    ``timeout`` is how long one prediction attempt waits for its answer (a request lost in a
    stopped worker is never answered: this ends the wait, and the retry policy tries again);
    management calls wait up to ``management_timeout`` (synchronous registration starts workers).
    Each thread gets its own HTTP session (keep-alive connections are per thread).
    """

    def __init__(
        self,
        inference_url: str = "http://127.0.0.1:8080",
        management_url: str = "http://127.0.0.1:8081",
        key_file: str | Path | None = None,
        timeout: float = 20,
        retry: RetryPolicy = RetryPolicy(),
        management_timeout: float = 300,
    ):
        self.inference_url = inference_url.rstrip("/")
        self.management_url = management_url.rstrip("/")
        keys = json.loads(find_key_file(key_file).read_text())
        self._inference = {"Authorization": f"Bearer {keys['inference']['key']}"}
        self._management = {"Authorization": f"Bearer {keys['management']['key']}"}
        self.timeout = timeout
        self.retry = retry
        self.management_timeout = management_timeout
        self._local = threading.local()

    @property
    def session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = requests.Session()
        return s

    def drop_connections(self) -> None:
        """Close this thread's keep-alive connections: the next request opens a fresh one."""
        s = getattr(self._local, "session", None)
        if s is not None:
            s.close()
            self._local.session = None

    # -- inference ---------------------------------------------------------------------------------
    def predict(self, model: str, image: bytes, version: str | None = None, **params) -> requests.Response:
        """POST one image: raw bytes, or multipart (field ``data`` + one field per parameter) with parameters.

        TorchServe 0.12 does not hand the query string of ``/predictions`` to the handler (only
        ``/invocations`` gets it), so parameters travel as form fields next to the image.

        Retries transient failures (see ``RetryPolicy``). The answer carries ``request_id`` (the id
        this attempt sent and the handler echoed) and ``retries`` (one line per failed attempt
        before it, also logged as warnings). When every attempt failed, the last answer is returned,
        or the last exception (timeout, connection) raised.
        """
        check_name(model)
        if version is not None:
            check_name(version, "version")
        path = f"/predictions/{model}" + (f"/{version}" if version else "")
        fields = {k: str(v) for k, v in params.items() if v is not None}
        policy = self.retry
        deadline = time.monotonic() + policy.budget
        retries: list[str] = []
        for k in range(max(1, policy.attempts)):
            rid = uuid.uuid4().hex
            left = deadline - time.monotonic()
            try:
                r = self._post_once(path, image, fields, rid, max(0.5, min(self.timeout, left)))
            except (
                requests.ConnectionError,
                requests.Timeout,
                requests.exceptions.ChunkedEncodingError,
            ) as e:
                why, r, error = type(e).__name__, None, e
            else:
                echoed = answer_id(r)
                if echoed is not None and echoed != rid:
                    why = "answer for another request id"  # a stale answer on this connection
                else:
                    why = transient(r.status_code, r.text)
                error = None
            if why is None:
                r.request_id, r.retries = rid, retries
                return r
            retries.append(why)
            self.drop_connections()  # a connection that saw a lost or stale answer is not reused
            wait = policy.wait(k)
            last = k == policy.attempts - 1 or time.monotonic() + wait >= deadline
            log.warning(
                "prediction %s attempt %d failed (%s)%s",
                rid,
                k + 1,
                why,
                "; giving up" if last else f"; retrying in {wait:.2f} s",
            )
            if last:
                break
            time.sleep(wait)
        if error is not None:
            error.retries = retries
            raise error
        r.request_id, r.retries = rid, retries
        return r

    def _post_once(
        self, path: str, image: bytes, fields: dict, rid: str, timeout: float
    ) -> requests.Response:
        headers = {**self._inference, REQUEST_ID_HEADER: rid}
        if fields:
            return self.session.post(
                self.inference_url + path,
                files={"data": ("image", image, "application/octet-stream")},
                data=fields,
                headers=headers,
                timeout=timeout,
            )
        headers["Content-Type"] = "application/octet-stream"
        return self.session.post(self.inference_url + path, data=image, headers=headers, timeout=timeout)

    def ping(self) -> requests.Response:
        return self.session.get(f"{self.inference_url}/ping", headers=self._inference, timeout=self.timeout)

    # -- management --------------------------------------------------------------------------------
    def _manage(self, method: str, path: str, **params) -> requests.Response:
        query = {k: v for k, v in params.items() if v is not None}
        return self.session.request(
            method,
            self.management_url + path,
            params=query,
            headers=self._management,
            timeout=self.management_timeout,
        )

    def register(
        self,
        url: str,
        model_name: str | None = None,
        batch_size: int | None = None,
        max_batch_delay: int | None = None,
        initial_workers: int = 1,
        response_timeout: int | None = None,
    ) -> requests.Response:
        """Register an archive from the model store by its file name (values checked first).

        The archive's model-config.yaml wins over ``initial_workers`` when it sets minWorkers.
        """
        check_register(url, model_name, batch_size, max_batch_delay, initial_workers, response_timeout)
        return self._manage(
            "POST",
            "/models",
            url=url,
            model_name=model_name,
            batch_size=batch_size,
            max_batch_delay=max_batch_delay,
            initial_workers=initial_workers,
            response_timeout=response_timeout,
            synchronous="true",
        )

    def set_workers(self, model: str, workers: int, version: str | None = None) -> requests.Response:
        """TorchServe's own scale call (synchronous). Safe for scaling up; scaling down with it
        kills the surplus workers with their batch in flight: use ``scale``."""
        check_name(model)
        check_workers(workers)
        if version is not None:
            check_name(version, "version")
        path = f"/models/{model}" + (f"/{version}" if version else "")
        return self._manage("PUT", path, min_worker=workers, max_worker=workers, synchronous="true")

    def scale(
        self,
        model: str,
        workers: int,
        model_store: str | Path | None = None,
        drain_timeout: float = 120,
        start_at_once: int | None = None,
    ) -> ScaleResult:
        """Give the default version of ``model`` ``workers`` workers without losing a request.

        Up (or equal): TorchServe's scale call; with ``start_at_once`` in steps of that many new
        workers (TorchServe starts new workers side by side, and on a small busy machine several
        at once can run past the model's startupTimeout while the old ones keep serving).
        Down: see ``scale_down``.
        """
        check_name(model)
        check_workers(workers)
        if not 0 < drain_timeout <= MAX_RESPONSE_TIMEOUT_S:
            raise InvalidArgument(
                f"drain_timeout must be in (0, {MAX_RESPONSE_TIMEOUT_S}] s, got {drain_timeout!r}"
            )
        t0 = time.monotonic()
        current = self.default_entry(model)
        before = max(current["minWorkers"], len(current["workers"]))
        version = current["modelVersion"]
        if workers >= before:
            step = workers - before
            if start_at_once is not None:
                step = int_in("start_at_once", start_at_once, 1, MAX_WORKERS)
            for n in [*range(before + max(1, step), workers, max(1, step)), workers]:
                r = self.set_workers(model, n, version)
                if not r.ok:
                    raise ScaleError(
                        f"scaling {model} {version} to {n} workers failed: {r.status_code} {r.text.strip()}"
                    )
            return ScaleResult(model, before, workers, version, version, "scale", time.monotonic() - t0)
        return self.scale_down(model, workers, current, model_store, drain_timeout, t0)

    def scale_down(
        self,
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
        store = Path(model_store or DEFAULT_MODEL_STORE)
        new_version, new_url = twin_of(old_version, old_url)
        registered = {e["modelVersion"] for e in self.describe(model)}
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
        r = self.register(
            new_url,
            model_name=model,
            batch_size=current.get("batchSize"),
            max_batch_delay=current.get("maxBatchDelay"),
            initial_workers=workers,
            response_timeout=current.get("responseTimeout"),
        )
        if not r.ok:
            if wrote and new_url.endswith(TWIN_FILE + ".mar"):
                dst.unlink(missing_ok=True)
            raise ScaleError(
                f"registering {new_url} as {model} {new_version} failed: {r.status_code} {r.text.strip()}"
            )
        try:
            # model-config.yaml's minWorkers beats initial_workers; the twin takes no traffic yet
            twin = self.describe(model, new_version)[0]
            if twin["minWorkers"] != workers or len(twin["workers"]) != workers:
                s = self.set_workers(model, workers, new_version)
                if not s.ok:
                    raise ScaleError(
                        f"setting {model} {new_version} to {workers} workers: {s.status_code} {s.text}"
                    )
            s = self.set_default(model, new_version)
            if not s.ok:
                raise ScaleError(f"set-default {model} {new_version}: {s.status_code} {s.text}")
        except Exception:
            self.unregister(model, new_version)
            raise
        t_switch = time.monotonic()
        drained = self.drain(model, old_version, drain_timeout)
        u = self.unregister(model, old_version)
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

    def drain(self, model: str, version: str, timeout: float = 120, poll: float = 0.05) -> float:
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
            while (entry := self.describe(model, version)[0])["jobQueueStatus"]["pendingRequests"] > 0:
                if time.monotonic() > deadline:
                    raise ScaleError(
                        f"{model} {version} still holds queued requests after {timeout:.0f} s; both versions stay "
                        f"registered: unregister {version} when its queue is empty"
                    )
                time.sleep(poll)
            delay = entry["maxBatchDelay"] / 1000
            t = time.monotonic()
            try:
                probe = self._post_once(
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
            if self.describe(model, version)[0]["jobQueueStatus"]["pendingRequests"] == 0:
                return grace

    def default_entry(self, model: str) -> dict:
        check_name(model)
        r = self._manage("GET", f"/models/{model}")
        if r.status_code == 404:
            raise ScaleError(f"model {model} is not registered")
        r.raise_for_status()
        return r.json()[0]

    def describe(self, model: str, version: str | None = None) -> list[dict]:
        check_name(model)
        if version is not None:
            check_name(version, "version")
        path = f"/models/{model}" + (f"/{version}" if version else "/all")
        r = self._manage("GET", path)
        r.raise_for_status()
        return r.json()

    def set_default(self, model: str, version: str) -> requests.Response:
        check_name(model)
        check_name(version, "version")
        return self._manage("PUT", f"/models/{model}/{version}/set-default")

    def unregister(self, model: str, version: str | None = None) -> requests.Response:
        check_name(model)
        if version is not None:
            check_name(version, "version")
        path = f"/models/{model}" + (f"/{version}" if version else "")
        return self._manage("DELETE", path)


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


def draw(image_path: Path, response: dict, out: Path) -> None:
    """Render the boxes and labels of one response on its image."""
    from PIL import Image, ImageDraw, ImageOps

    img = ImageOps.exif_transpose(Image.open(image_path)).convert("RGB")
    pen = ImageDraw.Draw(img)
    for det in response.get("detections", []):
        x1, y1, x2, y2 = det["box"]
        pen.rectangle([x1, y1, x2, y2], outline=(255, 40, 40), width=3)
        text = f"{det['label']} {det['score']:.2f}"
        pen.rectangle([x1, max(0, y1 - 12), x1 + 6 * len(text) + 4, y1], fill=(255, 40, 40))
        pen.text((x1 + 2, max(0, y1 - 12)), text, fill=(255, 255, 255))
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.client", description=__doc__)
    p.add_argument("--inference-url", default="http://127.0.0.1:8080")
    p.add_argument("--management-url", default="http://127.0.0.1:8081")
    p.add_argument("--key-file")
    p.add_argument(
        "--timeout", type=float, default=20, help="seconds one prediction attempt waits (default 20)"
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("predict", help="send images, print JSON")
    pr.add_argument("images", nargs="+", type=Path)
    pr.add_argument("--model", default="effdet_demo")
    pr.add_argument("--version")
    pr.add_argument("--score-threshold", type=float)
    pr.add_argument("--iou-threshold", type=float)
    pr.add_argument("--max-detections", type=int)
    pr.add_argument("--draw", type=Path, help="save the (first) image with its boxes drawn here")
    rg = sub.add_parser("register", help="register an archive from the model store")
    rg.add_argument("url", help="archive file name in the model store, e.g. effdet_demo.mar")
    rg.add_argument("--model-name")
    rg.add_argument("--batch-size", type=int)
    rg.add_argument("--max-batch-delay", type=int, help="ms")
    rg.add_argument("--response-timeout", type=int, help="s")
    rg.add_argument("--initial-workers", type=int, default=1)
    sc = sub.add_parser(
        "scale", help="set the default version's worker count; scaling down drains first (no request lost)"
    )
    sc.add_argument("model")
    sc.add_argument("--workers", type=int, required=True, help=f"1..{MAX_WORKERS}")
    sc.add_argument("--model-store", default=str(DEFAULT_MODEL_STORE), help="the server's model store")
    sc.add_argument("--drain-timeout", type=float, default=120, help="s to wait for the old version's queue")
    sc.add_argument("--start-at-once", type=int, help="scaling up: start this many new workers at a time")
    ds = sub.add_parser("describe")
    ds.add_argument("model")
    ds.add_argument("--version")
    sd = sub.add_parser("set-default")
    sd.add_argument("model")
    sd.add_argument("version")
    ur = sub.add_parser("unregister")
    ur.add_argument("model")
    ur.add_argument("version", nargs="?")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    client = Client(a.inference_url, a.management_url, a.key_file, timeout=a.timeout)

    try:
        if a.cmd == "predict":
            failed = 0
            for i, path in enumerate(a.images):
                r = client.predict(
                    a.model,
                    path.read_bytes(),
                    a.version,
                    score_threshold=a.score_threshold,
                    iou_threshold=a.iou_threshold,
                    max_detections=a.max_detections,
                )
                body = r.json()
                print(json.dumps({"file": str(path), "status": r.status_code, **body}, indent=2))
                failed += not r.ok
                if a.draw and i == 0 and r.ok:
                    draw(path, body, a.draw)
                    print(f"drew {len(body['detections'])} boxes on {a.draw}", file=sys.stderr)
            return 1 if failed else 0
        if a.cmd == "scale":
            result = client.scale(a.model, a.workers, a.model_store, a.drain_timeout, a.start_at_once)
            print(json.dumps(result.as_dict(), indent=2))
            return 0
        if a.cmd == "register":
            r = client.register(
                a.url, a.model_name, a.batch_size, a.max_batch_delay, a.initial_workers, a.response_timeout
            )
        elif a.cmd == "describe":
            print(json.dumps(client.describe(a.model, a.version), indent=2))
            return 0
        elif a.cmd == "set-default":
            r = client.set_default(a.model, a.version)
        else:
            r = client.unregister(a.model, a.version)
    except (InvalidArgument, ScaleError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(r.text.strip())
    return 0 if r.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
