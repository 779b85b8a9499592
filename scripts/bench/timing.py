"""Timing: repeats after warm-up with device syncs, alternating pairs, medians and percentiles."""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch


class Progress:
    """A one-line counter on stderr per stage: ``[2/5 effdet] ######....  12/20  b=8  34s``."""

    def __init__(self, stream=None, enabled: bool = True):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.monotonic()
        self.label, self.total, self.done = "", 0, 0
        self.position = ""  # "2/5 ": the stage's place in the run, set by the runner

    def stage(self, label: str, total: int) -> None:
        self.label, self.total, self.done = self.position + label, max(1, total), 0
        self._draw("")

    def tick(self, note: str = "") -> None:
        self.done += 1
        self._draw(note)

    def note(self, msg: str) -> None:
        if self.enabled:
            self.stream.write(("\n" if self.tty else "") + f"[bench] {msg}\n")
            self.stream.flush()

    def end(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def _draw(self, note: str) -> None:
        if not self.enabled:
            return
        width = 20
        filled = min(width, round(width * self.done / self.total))
        line = (
            f"[{self.label}] {'#' * filled}{'.' * (width - filled)} {self.done:>3}/{self.total:<3} "
            f"{note:<28} {time.monotonic() - self.t0:6.0f}s"
        )
        self.stream.write(("\r" + line) if self.tty else (line + "\n"))
        self.stream.flush()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    fn: Callable[[], object],
    repeats: int,
    warmup: int,
    device: torch.device,
    tick: Callable[[], None] = lambda: None,
) -> list[float]:
    """Seconds per call of ``fn`` for ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
        sync(device)
        tick()
    seconds = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        seconds.append(time.perf_counter() - t)
        tick()
    return seconds


def measure_pair(
    fn_a: Callable[[], object],
    fn_b: Callable[[], object],
    repeats: int,
    warmup: int,
    device: torch.device,
    tick: Callable[[str], None] = lambda side: None,
) -> tuple[list[float], list[float]]:
    """``measure`` for two functions, alternating a, b, a, b...: a drift in machine load hits both."""
    a, b = measure_turns({"a": fn_a, "b": fn_b}, repeats, warmup, device, tick).values()
    return a, b


def measure_turns(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int,
    device: torch.device,
    tick: Callable[[str], None] = lambda name: None,
) -> dict[str, list[float]]:
    """``measure`` for several functions taking turns (a, b, c, a, b, c...), seconds per call by name."""
    out: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            if i >= warmup:
                out[name].append(time.perf_counter() - t)
            tick(name)
    return out


def summarize(batch: int, seconds: Sequence[float]) -> dict:
    med = statistics.median(seconds)
    return {
        "batch": batch,
        "median_s": med,
        "min_s": min(seconds),
        "max_s": max(seconds),
        "images_per_s": batch / med,
        "ms_per_image": 1000.0 * med / batch,
        "seconds": list(seconds),
    }


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default) of a non-empty list."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
