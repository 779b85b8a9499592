"""HTTP client for the served detector: predictions with retries and the management API.

    client = Client(key_file="runs/serve/key_file.json")
    answer = client.predict("effdet_demo", open("a.jpg", "rb").read(), score_threshold=0.3).json()

Tokens are read from the key file and sent as ``Authorization: Bearer``; they are never printed.

Predictions are idempotent, so ``Client.predict`` retries one that a worker lost (500/507 "Worker
died.", 503, 502/504 from a proxy, a dropped connection, or no answer within ``timeout``) with
backoff inside a total time budget. Every attempt carries its own ``X-Request-Id``; the handler
echoes it, and an answer carrying another id (a stale answer on a keep-alive connection) is
dropped with its connection and the prediction retried. Every attempt also carries
``X-Request-Deadline``, the Unix time in ms at which this attempt stops waiting (now + its
timeout, from this host's clock): a server that cannot answer by then answers 504 at once
instead of working for nobody (``handler.deadline``).

Scaling without loss is ``scripts.client.scale``; the command line is ``python -m scripts.client``.
Every value is checked (``scripts.settings``) before anything is sent.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import requests

from handler.deadline import DEADLINE_HEADER
from handler.request import REQUEST_ID_ECHO_HEADER, REQUEST_ID_HEADER
from scripts.client.capacity import Machine, check_workers_fit
from scripts.paths import SERVE_DIR
from scripts.settings import InvalidArgument, check_name, check_register, check_workers

log = logging.getLogger(__name__)

DEFAULT_KEY_FILE = SERVE_DIR / "key_file.json"


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
    if status == 504 and "deadline_exceeded" in text:
        return "504 deadline exceeded"  # the attempt's own deadline: a new attempt gets a new one
    if status in (502, 503, 504):
        return f"{status} unavailable"
    return None


def deadline_ms(timeout: float, now: float | None = None) -> int:
    """The ``X-Request-Deadline`` of an attempt that waits ``timeout`` seconds from ``now``
    (default: this host's clock, ``time.time()``): Unix milliseconds."""
    return int(((time.time() if now is None else now) + timeout) * 1000)


def answer_id(r: requests.Response) -> str | None:
    """The request id an answer says it answers: the handler's header, or its JSON field."""
    rid = r.headers.get(REQUEST_ID_ECHO_HEADER)
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
    With ``deadlines`` each attempt tells the server when it stops waiting (``X-Request-Deadline``,
    ``deadline_ms``); turn it off where this host's clock cannot be trusted to agree with the
    server's. Each thread gets its own HTTP session (keep-alive connections are per thread).
    """

    def __init__(
        self,
        inference_url: str = "http://127.0.0.1:8080",
        management_url: str = "http://127.0.0.1:8081",
        key_file: str | Path | None = None,
        timeout: float = 20,
        retry: RetryPolicy = RetryPolicy(),
        management_timeout: float = 300,
        deadlines: bool = True,
    ):
        self.inference_url = inference_url.rstrip("/")
        self.management_url = management_url.rstrip("/")
        keys = json.loads(find_key_file(key_file).read_text())
        self._inference = {"Authorization": f"Bearer {keys['inference']['key']}"}
        self._management = {"Authorization": f"Bearer {keys['management']['key']}"}
        self.timeout = timeout
        self.retry = retry
        self.management_timeout = management_timeout
        self.deadlines = deadlines
        self._local = threading.local()
        # The server's machine for worker-count checks (scripts.client.capacity); None: this
        # machine, measured at each check. Set it to check against other figures.
        self.machine: Machine | None = None

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
                r = self.post_once(path, image, fields, rid, max(0.5, min(self.timeout, left)))
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

    def post_once(self, path: str, image: bytes, fields: dict, rid: str, timeout: float) -> requests.Response:
        headers = {**self._inference, REQUEST_ID_HEADER: rid}
        if self.deadlines:
            headers[DEADLINE_HEADER] = str(deadline_ms(timeout))
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
    def manage(self, method: str, path: str, **params) -> requests.Response:
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
        force: bool = False,
    ) -> requests.Response:
        """Register an archive from the model store by its file name (values checked first, and
        ``initial_workers`` against the machine's cores and memory unless ``force``:
        ``scripts.client.capacity``).

        The archive's model-config.yaml wins over ``initial_workers`` when it sets minWorkers.
        """
        check_register(url, model_name, batch_size, max_batch_delay, initial_workers, response_timeout)
        if not force:
            check_workers_fit(self, model_name or url.removesuffix(".mar"), initial_workers, initial_workers)
        return self.manage(
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
        kills the surplus workers with their batch in flight, and nothing checks the count against
        the machine here: use ``scale``."""
        check_name(model)
        check_workers(workers)
        if version is not None:
            check_name(version, "version")
        path = f"/models/{model}" + (f"/{version}" if version else "")
        return self.manage("PUT", path, min_worker=workers, max_worker=workers, synchronous="true")

    def describe(self, model: str, version: str | None = None) -> list[dict]:
        check_name(model)
        if version is not None:
            check_name(version, "version")
        path = f"/models/{model}" + (f"/{version}" if version else "/all")
        r = self.manage("GET", path)
        r.raise_for_status()
        return r.json()

    def describe_all(self) -> list[dict]:
        """The describe entry of every version of every registered model (but those registered
        under names the client refuses, which its calls cannot address)."""
        names, token = [], None
        while True:
            r = self.manage("GET", "/models", limit=100, next_page_token=token)
            r.raise_for_status()
            page = r.json()
            names += [m["modelName"] for m in page.get("models", [])]
            token = page.get("nextPageToken")
            if not token:
                break
        entries = []
        for name in names:
            try:
                entries += self.describe(name)
            except InvalidArgument:
                continue
        return entries

    def set_default(self, model: str, version: str) -> requests.Response:
        check_name(model)
        check_name(version, "version")
        return self.manage("PUT", f"/models/{model}/{version}/set-default")

    def unregister(self, model: str, version: str | None = None) -> requests.Response:
        """TorchServe's unregister: a version's queued and running requests are never answered
        (TorchServe 0.12). ``scripts.client.scale.unregister`` drains the version first."""
        check_name(model)
        if version is not None:
            check_name(version, "version")
        path = f"/models/{model}" + (f"/{version}" if version else "")
        return self.manage("DELETE", path)
