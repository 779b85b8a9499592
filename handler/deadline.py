"""Request deadlines: when an answer stops being useful, and which rows of a batch can still make it.

A caller sends ``X-Request-Deadline``: the Unix time in milliseconds after which it will no longer
read the answer (its own timeout). TorchServe keeps every queued request after its caller has
given up and hands it to a worker all the same; under overload the worker would spend all its
time on answers nobody reads. So before any row is decoded the handler answers at once:

- a row whose deadline has passed: ``504 deadline_exceeded``;
- a row that cannot be answered in time: ``504 deadline_exceeded`` too, judged from what a batch
  of that size has cost in this worker (``BatchCost``, learnt from real batches) plus a margin for
  the answer's way back to the caller (the worker's reply, TorchServe's frontend, the network),
  which the worker cannot see: without it a row run at the edge of its deadline leaves the
  handler in time and reaches its caller too late.

Everything here is pure: clocks are passed in, so the rules are testable without a server.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

from handler.answer import RequestError
from handler.request import _echo

DEADLINE_HEADER = "X-Request-Deadline"
# Below this the value is not Unix milliseconds: 2001-09-09 in ms; a Unix time in *seconds* is
# about 1.7e9 and is refused here with a hint instead of being taken as a long-past deadline.
MIN_DEADLINE_MS = 1_000_000_000_000
MAX_AHEAD_MS = 24 * 3600 * 1000  # a deadline further ahead is a unit mistake (us, ns), not a wish
DEADLINE_FORMAT = re.compile(r"[0-9]{1,16}(\.[0-9]{0,6})?")


def parse_deadline(value: str | None, now_ms: float) -> float | None:
    """The header's deadline in Unix ms; None without one.

    A value that is not a plain number of milliseconds (signs, exponents, letters, seconds by
    mistake, more than a day ahead) is a ``400 invalid_deadline`` for that row. A past deadline is
    returned as is: ``expired`` says so.
    """
    if value is None:
        return None
    text = value.strip()
    if not DEADLINE_FORMAT.fullmatch(text):
        raise RequestError(
            400,
            "invalid_deadline",
            f"{DEADLINE_HEADER} must be a Unix time in milliseconds (digits), got {_echo(value)}",
        )
    ms = float(text)
    if ms < MIN_DEADLINE_MS:
        raise RequestError(
            400,
            "invalid_deadline",
            f"{DEADLINE_HEADER} must be a Unix time in milliseconds, got {_echo(value)} "
            "(seconds? multiply by 1000)",
        )
    if ms > now_ms + MAX_AHEAD_MS:
        raise RequestError(
            400,
            "invalid_deadline",
            f"{DEADLINE_HEADER} is more than a day ahead of this server's clock: a Unix time in "
            f"milliseconds, got {_echo(value)}",
        )
    return ms


def expired(deadline_ms: float, now_ms: float) -> RequestError:
    """The answer for a row whose deadline passed before the worker reached it."""
    late = max(0, round(now_ms - deadline_ms))
    return RequestError(
        504,
        "deadline_exceeded",
        f"the request's deadline ({DEADLINE_HEADER}) passed {late} ms before it was served",
    )


def too_late(cost_ms: float, margin_ms: float = 0.0) -> RequestError:
    """The answer for a row that could not be finished before its deadline."""
    way_back = f", and its answer about {round(margin_ms)} ms to reach you" if margin_ms else ""
    return RequestError(
        504,
        "deadline_exceeded",
        f"the request cannot be answered before its deadline ({DEADLINE_HEADER}): "
        f"its batch would take about {round(cost_ms)} ms here{way_back}",
    )


class BatchCost:
    """Milliseconds a batch of each size takes in this worker (decode to JSON), learnt from real
    batches, and what to plan with: the moving average plus ``spread`` moving mean deviations (the
    way TCP sets its retransmission timeout), so that a row is run only when its batch is likely to
    finish in time on this machine, noisy or not. Under overload a row dropped on that margin
    leaves its place to a fresher one queued behind it; a row run and finished too late is a
    forward pass for nobody.

    Before a size has been measured its cost is scaled from the nearest measured size (in
    proportion to the rows: what a CPU does; a GPU is cheaper, so this errs on the side of
    dropping). Before any batch at all it is unknown (None): then only rows whose deadline has
    already passed are dropped, never a row on a guess. It is unknown again once no batch has run
    for ``max_age_ms``, and the next batch starts it afresh: only a batch that runs updates the
    estimate, so one slow batch (a cold start, a stall of the machine) would otherwise refuse every
    row with a shorter deadline for ever; under load batches run all the time and it never ages.
    """

    def __init__(self, weight: float = 0.25, spread: float = 2.0, max_age_ms: float = 5000.0):
        if not 0 < weight <= 1 or spread < 0 or max_age_ms <= 0:
            raise ValueError(
                f"weight must be in (0, 1], spread >= 0 and max_age_ms > 0, got {weight}, {spread}, {max_age_ms}"
            )
        self.weight, self.spread, self.max_age_ms = weight, spread, max_age_ms
        self.mean: dict[int, float] = {}
        self.dev: dict[int, float] = {}
        self.measured_ms = -math.inf  # when the last batch was measured (Unix ms)

    def update(self, size: int, ms: float, now_ms: float) -> None:
        """A batch of ``size`` rows took ``ms``, measured at ``now_ms``."""
        if size < 1 or not math.isfinite(ms) or ms < 0:
            return
        if self._aged(now_ms):  # the old figures are forgotten: start afresh
            self.mean.clear()
            self.dev.clear()
        self.measured_ms = now_ms
        if size not in self.mean:
            self.mean[size], self.dev[size] = ms, ms / 4
            return
        w = self.weight
        self.dev[size] += w * (abs(ms - self.mean[size]) - self.dev[size])
        self.mean[size] += w * (ms - self.mean[size])

    def _aged(self, now_ms: float) -> bool:
        """No batch has been measured for longer than ``max_age_ms``."""
        return now_ms - self.measured_ms > self.max_age_ms

    def estimate(self, size: int, now_ms: float) -> float | None:
        """What a batch of ``size`` rows is planned to cost at ``now_ms``, in ms (None: nothing
        measured, or nothing for ``max_age_ms``)."""
        if size < 1:
            return 0.0
        if not self.mean or self._aged(now_ms):
            return None
        nearest = min(self.mean, key=lambda m: (abs(m - size), -m))
        return (self.mean[nearest] + self.spread * self.dev[nearest]) * size / nearest


def can_finish(
    deadlines: Sequence[float | None],
    now_ms: float,
    cost_ms: Callable[[int], float | None],
    margin_ms: float = 0.0,
) -> list[bool]:
    """Which rows to run: the most rows that all finish ``margin_ms`` before their deadlines if run
    together now.

    ``cost_ms(k)`` is what a batch of k rows costs (None: unknown, every row runs). Rows without a
    deadline always run. Of the rows with one, the latest deadlines are kept first: k rows fit
    when the earliest deadline among the k latest is at least ``now + cost(k) + margin``. Fewer
    rows make a cheaper batch, so dropping the most urgent rows can let the others through.
    """
    n = len(deadlines)
    timed = sorted((i for i, d in enumerate(deadlines) if d is not None), key=lambda i: deadlines[i])
    dropped = 0
    while dropped < len(timed):
        cost = cost_ms(n - dropped)
        if cost is None:
            return [True] * n
        if deadlines[timed[dropped]] >= now_ms + cost + margin_ms:
            break
        dropped += 1
    late = set(timed[:dropped])
    return [i not in late for i in range(n)]
