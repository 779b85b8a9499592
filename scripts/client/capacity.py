"""How many workers the server's machine can hold, checked before the client asks TorchServe for more.

TorchServe starts every worker it is asked for. ``min_worker=1000`` on a 2-core, 24 GB machine had up
to 232 workers starting at once and took the machine down (SECURITY.md). So ``scale`` and
``register`` refuse, unless forced, a worker count that

- is above the machine's cap: ``WORKERS_PER_CORE`` x its CPU cores for CPU workers,
  ``WORKERS_PER_GPU`` x its GPUs for GPU workers; or
- needs more memory than the machine has: the workers to start x one worker's memory (the largest
  resident set among the server's workers now, or ``DEFAULT_WORKER_BYTES`` when none runs) above
  ``MEMORY_SHARE`` of the memory available.

The figures are this machine's, so they are the server's only when the management URL is loopback
(every configuration here). For a server elsewhere only ``MAX_WORKERS`` applies, and a warning says so.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import psutil

from scripts.settings import InvalidArgument

if TYPE_CHECKING:
    from scripts.client import Client

log = logging.getLogger(__name__)

# More CPU workers than this per core only queue for the CPU (each runs its own intra-op threads)
# and multiply the memory; two per core leave room for one to decode while another computes.
WORKERS_PER_CORE = 2
WORKERS_PER_GPU = 4  # each GPU worker holds the model and its batches in that GPU's memory
MEMORY_SHARE = 0.8  # new workers may take this share of the memory available now
DEFAULT_WORKER_BYTES = 2**30  # no worker to measure: the test model's workers hold 0.85-1 GB
GIB = 2**30


class CapacityError(InvalidArgument):
    """A worker count the machine cannot hold; ``force`` (``--force``) sends it anyway."""


@dataclass(frozen=True)
class Machine:
    """What the server's machine offers: logical CPU cores, GPUs, bytes of memory available now."""

    cores: int
    gpus: int
    available: int

    @classmethod
    def here(cls) -> Machine:
        import torch  # already loaded by the client (handler.request); only asked how many GPUs

        return cls(
            cores=os.cpu_count() or 1,
            gpus=torch.cuda.device_count(),
            available=psutil.virtual_memory().available,
        )


@dataclass(frozen=True)
class WorkerMemory:
    """One worker's memory in bytes and where that figure comes from (for the refusal message)."""

    bytes: int
    source: str


def worker_memory(entries: Iterable[dict]) -> WorkerMemory:
    """The largest resident set among the described workers: their process's RSS (the server runs
    here), else TorchServe's ``memoryUsage`` (refreshed once a minute, 0 before), else the default."""
    best, n = 0, 0
    for entry in entries:
        for w in entry.get("workers", []):
            rss = 0
            try:
                rss = psutil.Process(int(w["pid"])).memory_info().rss
            except (KeyError, ValueError, TypeError, psutil.Error):
                pass
            best, n = max(best, rss, int(w.get("memoryUsage") or 0)), n + 1
    if best:
        return WorkerMemory(best, f"the largest of the {n} running worker{'s' * (n != 1)}")
    return WorkerMemory(DEFAULT_WORKER_BYTES, "an estimate: no worker runs to measure")


def check_fit(
    what: str, workers: int, adding: int, memory: WorkerMemory, machine: Machine, on_gpu: bool
) -> None:
    """Refuse ``workers`` workers for ``what`` (``adding`` of them to be started now) that ``machine``
    cannot hold, with the figures; ``CapacityError`` says how to override."""
    force = "; pass --force (force=True) to send it anyway"
    if on_gpu:
        cap = WORKERS_PER_GPU * machine.gpus
        if workers > cap:
            raise CapacityError(
                f"{workers} workers for {what} refused: this machine has {machine.gpus} GPU(s) and GPU "
                f"workers are capped at {WORKERS_PER_GPU} per GPU ({cap}){force}"
            )
    else:
        cap = WORKERS_PER_CORE * machine.cores
        if workers > cap:
            raise CapacityError(
                f"{workers} workers for {what} refused: this machine has {machine.cores} CPU cores and CPU "
                f"workers are capped at {WORKERS_PER_CORE} per core ({cap}){force}"
            )
    need = adding * memory.bytes
    if adding > 0 and need > MEMORY_SHARE * machine.available:
        raise CapacityError(
            f"starting {adding} worker{'s' * (adding != 1)} for {what} refused: ~{need / GIB:.1f} GiB "
            f"({adding} x {memory.bytes / GIB:.2f} GiB per worker, {memory.source}) is above "
            f"{MEMORY_SHARE:.0%} of the {machine.available / GIB:.1f} GiB available on this machine{force}"
        )


def is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_workers_fit(client: Client, model: str, workers: int, adding: int) -> None:
    """``check_fit`` with the server's figures: its workers' memory (this model's, else any model's)
    and this machine, when the server runs here (loopback); otherwise a warning and no check."""
    if not is_loopback(client.management_url):
        log.warning(
            "%s is not on this machine: %d workers for %s not checked against its cores and memory",
            client.management_url,
            workers,
            model,
        )
        return
    machine = client.machine or Machine.here()
    everything = client.describe_all()
    own = [e for e in everything if e.get("modelName") == model]
    memory = worker_memory(own if any(e.get("workers") for e in own) else everything)
    workers_of = [w for e in (own or everything) for w in e.get("workers", [])]
    on_gpu = any(w.get("gpu") for w in workers_of) if workers_of else machine.gpus > 0
    check_fit(model, workers, adding, memory, machine, on_gpu)
