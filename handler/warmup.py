"""Warm-up within a budget: which batch buckets a worker warms before it takes requests.

Warming runs each bucket (1, 2, 3, 4, 6, ... up to batchSize) a few times so that TorchScript has
profiled and fused every shape before a request waits on it. Its time and memory grow with the
batch, and TorchServe restarts a worker that is not READY within the model's startupTimeout, so a
large batchSize once kept a worker warming (and being restarted) forever. Here the buckets are
warmed smallest first, and warming stops before the next bucket whose cost, extrapolated from the
buckets before it, would pass the time budget or the memory free at that moment. The detector
then runs larger batches in chunks of the largest bucket it warmed (``Detector.max_rows``), so
serving never meets a shape, or a memory peak, that warming did not.

Memory is read from Linux's ``/proc`` (and the cgroup's limit, in a container) for CPU workers and
from ``torch.cuda`` for GPU workers; where neither is available only the time budget applies.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

# What a bucket may take of the memory free when it starts: TorchServe starts a model's workers
# side by side, so each warming worker leaves room for the others.
MEMORY_SHARE = 0.5
MIB = 2**20


@dataclass(frozen=True)
class Cost:
    """What warming one bucket took: seconds (all passes) and peak bytes above the start (None: unknown)."""

    size: int
    seconds: float
    peak_bytes: int | None = None


def estimate(done: list[Cost], size: int) -> tuple[float, int | None]:
    """Seconds and peak bytes of warming ``size``, from the buckets warmed before it (``done``, ascending).

    Time scales with the batch from the last bucket (an over-estimate: the fixed part is scaled
    too, so warming stops early rather than late). Memory grows by the last two buckets' bytes per
    image on top of the last peak (after one bucket: scaled from it).
    """
    last = done[-1]
    seconds = last.seconds * size / last.size
    if last.peak_bytes is None:
        return seconds, None
    prev = done[-2] if len(done) > 1 else None
    if prev is None or prev.peak_bytes is None:
        return seconds, last.peak_bytes * size // last.size
    per_image = max(0, last.peak_bytes - prev.peak_bytes) / (last.size - prev.size)
    return seconds, int(last.peak_bytes + per_image * (size - last.size))


def stop_before(
    done: list[Cost], size: int, elapsed: float, budget_s: float, free: int | None, held: int | None
) -> str | None:
    """Why bucket ``size`` is not warmed (None: warm it). ``free``: bytes free now; ``held``: bytes the
    process holds above its level when warming started (what a new peak reuses)."""
    if not done:
        return None  # the smallest bucket is always warmed: without it nothing is served warm
    seconds, peak = estimate(done, size)
    if elapsed + seconds > budget_s:
        return f"it would take ~{seconds:.1f} s after {elapsed:.1f} s of the {budget_s:g} s warm-up budget"
    if peak is not None and free is not None:
        need = peak - (held or 0)
        if need > MEMORY_SHARE * free:
            return (
                f"it would need ~{need / MIB:.0f} MiB more, above {MEMORY_SHARE:.0%} of the "
                f"{free / MIB:.0f} MiB free"
            )
    return None


@dataclass(frozen=True)
class WarmUp:
    """What a warm-up did: the buckets warmed, those left out and why, the seconds it took."""

    warmed: tuple[int, ...]
    skipped: tuple[int, ...] = ()
    reason: str = ""
    seconds: float = 0.0

    def __str__(self) -> str:
        done = f"warmed batch buckets {','.join(map(str, self.warmed))} in {self.seconds:.1f} s"
        if not self.skipped:
            return done
        top = self.warmed[-1]
        return (
            f"{done}; not {','.join(map(str, self.skipped))}: {self.reason}. "
            f"Batches above {top} run in chunks of {top}"
        )


class MemoryGauge:
    """A worker's memory during warm-up: peak above the start, held now, free now (bytes; None: unknown)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.start = self._used()

    def begin_bucket(self) -> None:
        """Reset the peak, so that the next ``peak`` is this bucket's."""
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:  # Linux >= 4.0: "5" resets the process's peak resident set (VmHWM)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass  # the peak stays the process's lifetime peak: an over-estimate

    def peak(self) -> int | None:
        if self.start is None:
            return None
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) - self.start
        hwm = _status_bytes("VmHWM")
        return None if hwm is None else max(0, hwm - self.start)

    def held(self) -> int | None:
        used = self._used()
        return None if used is None or self.start is None else max(0, used - self.start)

    def free(self) -> int | None:
        if self.cuda:
            free, _ = torch.cuda.mem_get_info(self.device)
            return free + torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        return available_bytes()

    def _used(self) -> int | None:
        if self.cuda:
            return torch.cuda.memory_allocated(self.device)
        return _status_bytes("VmRSS")


def _status_bytes(key: str) -> int | None:
    """A ``kB`` line of /proc/self/status, in bytes (None off Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def available_bytes() -> int | None:
    """Memory a new allocation can get: /proc/meminfo's MemAvailable, less where the cgroup (a
    container's limit, cgroup v2) allows less. None off Linux."""
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        return None
    cgroup = _cgroup_dir()
    if free is not None and cgroup is not None:
        try:
            limit = (cgroup / "memory.max").read_text().strip()
            if limit != "max":
                free = min(free, max(0, int(limit) - int((cgroup / "memory.current").read_text())))
        except (OSError, ValueError):
            pass
    return free


def _cgroup_dir() -> Path | None:
    """This process's cgroup v2 directory (None under cgroup v1 or off Linux)."""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return Path("/sys/fs/cgroup") / line[3:].lstrip("/")
    except OSError:
        return None
    return None
