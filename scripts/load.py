"""Background prediction traffic: threads that keep requests flowing until stopped, and what came back.

The one loop behind the tests under load, the demo's scaling step and the benchmark's served runs
(there with ``limit``: a closed loop of so many requests, see ``scripts.bench.load``):

    with Traffic(lambda: Client(...), "effdet_demo", Images.cycle([jpeg1, jpeg2]), threads=4) as t:
        scale(client, "effdet_demo", 1)
    print(t.summary())

Each thread has its own ``Client`` (its own keep-alive connections, retries included); every request
is logged as an ``Outcome``: when, which image, the status (or the exception's name), the retries
the client needed, and the request id the answer echoed.
"""

from __future__ import annotations

import io
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import requests

from scripts.client import Client, answer_id

# An image source: (thread, running request number) -> (key, bytes).
Source = Callable[[int, int], tuple[str, bytes]]


class Images:
    """Image sources for ``Traffic``."""

    @staticmethod
    def cycle(images: Sequence[bytes] | dict[str, bytes]) -> Source:
        """The given images in turn (keys are their names, or indices)."""
        items = (
            list(images.items()) if isinstance(images, dict) else [(str(i), b) for i, b in enumerate(images)]
        )
        return lambda thread, n: items[(n + thread) % len(items)]

    @staticmethod
    def unique_sizes(bases: Sequence[bytes], width: int = 160, height: int = 120) -> Source:
        """Each request gets its own image size (key ``WxH``): an answer's ``image`` size names
        the request it answers. Request n is base n % len(bases), resized to a size no other
        request of the run has (JPEG, quality 90)."""
        from PIL import Image

        decoded = [Image.open(io.BytesIO(b)).convert("RGB") for b in bases]

        def make(thread: int, n: int) -> tuple[str, bytes]:
            w, h = width + n % 211, height + n // 211
            buf = io.BytesIO()
            decoded[n % len(decoded)].resize((w, h)).save(buf, "JPEG", quality=90)
            return f"{w}x{h}", buf.getvalue()

        return make


@dataclass
class Outcome:
    """One prediction as the traffic saw it."""

    thread: int
    key: str
    t0: float
    t1: float
    status: int | str  # HTTP status of the final answer, or the exception's class name
    text: str = ""  # start of the body / the exception, for failures
    retries: list[str] = field(default_factory=list)  # the client's failed attempts before the answer
    request_id: str | None = None  # what the final attempt sent
    echoed: str | None = None  # what the answer says it answers
    body: dict | None = None  # the JSON of a 200 (when kept)
    data: bytes | None = field(default=None, repr=False)  # the image sent (when kept)
    problem: str | None = None  # what ``check`` found wrong with a 200

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.problem is None

    @property
    def latency(self) -> float:
        return self.t1 - self.t0


class Traffic:
    """``threads`` threads, each with its own client from ``make_client``, sending ``source``'s
    images to ``model`` until ``stop()`` (or, with ``limit``, until that many requests were sent
    between them: ``wait()``). ``check(key, body)`` may return what is wrong with a 200. ``keep``
    keeps each 200's body and image for comparisons afterwards."""

    def __init__(
        self,
        make_client: Callable[[], Client],
        model: str,
        source: Source,
        threads: int = 4,
        params: dict | None = None,
        check: Callable[[str, dict], str | None] | None = None,
        keep: bool = False,
        limit: int | None = None,
    ):
        self.make_client, self.model, self.source = make_client, model, source
        self.params, self.check, self.keep, self.limit = params or {}, check, keep, limit
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._counter = 0
        self._threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(threads)]

    def _next(self) -> int | None:
        """The running request number, or None once ``limit`` requests have been handed out."""
        with self._lock:
            if self.limit is not None and self._counter >= self.limit:
                return None
            self._counter += 1
            return self._counter - 1

    def _run(self, k: int) -> None:
        client = self.make_client()
        while not self._stop.is_set():
            n = self._next()
            if n is None:
                return
            key, data = self.source(k, n)
            t0 = time.monotonic()
            out = Outcome(k, key, t0, t0, "?")
            try:
                r = client.predict(self.model, data, **self.params)
                out.status, out.retries = r.status_code, r.retries
                out.request_id, out.echoed = r.request_id, answer_id(r)
                if r.status_code == 200:
                    body = r.json()
                    if self.check is not None:
                        out.problem = self.check(key, body)
                    if self.keep:
                        out.body, out.data = body, data
                else:
                    out.text = r.text[:200]
            except requests.RequestException as e:
                out.status, out.text, out.retries = type(e).__name__, str(e)[:200], getattr(e, "retries", [])
            except Exception as e:  # a broken check must show up as a failure, not end the thread
                out.status, out.text = type(e).__name__, str(e)[:200]
            out.t1 = time.monotonic()
            with self._lock:
                self.outcomes.append(out)

    def start(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def stop(self, timeout: float = 300) -> None:
        """Stop sending and wait for the requests in flight to come back (or give up)."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def wait(self, timeout: float | None = None) -> None:
        """Wait for the threads to end by themselves (after ``limit`` requests)."""
        for t in self._threads:
            t.join(timeout)

    def __enter__(self) -> Traffic:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def unanswered(self) -> int:
        """Requests still in flight (after ``stop``: the ones never answered)."""
        return sum(t.is_alive() for t in self._threads)

    def answered_after(self, t: float, timeout: float = 60) -> bool:
        """Wait until every thread has had a 200 for a request sent after ``t``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                done = {o.thread for o in self.outcomes if o.status == 200 and o.t0 > t}
            if len(done) == len(self._threads):
                return True
            time.sleep(0.1)
        return False

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)

    def failures(self) -> list[Outcome]:
        return [o for o in self.snapshot() if not o.ok]

    def summary(self) -> dict:
        """Requests, status counts, and the retries the clients made (by reason)."""
        outs = self.snapshot()
        statuses = Counter(str(o.status) if o.problem is None else "wrong answer" for o in outs)
        reasons = Counter(why for o in outs for why in o.retries)
        return {
            "requests": len(outs),
            "by_status": dict(sorted(statuses.items())),
            "retried_requests": sum(1 for o in outs if o.retries),
            "retries": dict(sorted(reasons.items())),
            "unanswered": self.unanswered,
            "max_latency_s": round(max((o.latency for o in outs), default=0.0), 2),
        }
