"""The handler section of an archive's ``model-config.yaml``, as one typed object.

``scripts.archive`` writes it (every field is one of its command-line options) and the handler
reads it once at load, so the two sides share one list of keys, defaults and checks. A key the
handler does not know is refused at load by name rather than ignored.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from handler.request import check_threshold

PRECISIONS = ("fp32", "fp16")

# Decompression bombs: refuse images above this many pixels (413) before decoding them.
DEFAULT_MAX_PIXELS = 40_000_000

# The largest batchSize a worker takes: the top of the AOTInductor package's dynamic batch dimension
# (export.aoti.MAX_BATCH), so every format serves it. Warm-up time and a worker's memory grow with the
# batch; TorchServe accepts any batch_size at registration, so the handler refuses a larger one at load.
MAX_BATCH_SIZE = 256
# TorchServe restarts a worker that is not READY within the model's startupTimeout (model-config.yaml;
# this is its default). Warming gets half of it, loading the model the other half.
STARTUP_TIMEOUT_S = 120
# What an answer needs after the handler returns to reach its caller (worker -> frontend -> HTTP):
# measured 10-50 ms on a loaded 2-core machine, where without it half the rows run at the edge of
# their deadline arrived after it.
DEADLINE_MARGIN_MS = 50.0


class BatchSizeRefused(RuntimeError):
    """A batchSize the handler does not load with. A RuntimeError: TorchServe's worker then answers
    the load with a 500 and logs the message on one line, rather than dying without an answer."""


def check_batch_size(batch_size: int) -> int:
    """``batch_size`` (TorchServe's batchSize for this model) if the handler serves it."""
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, int)
        or not 1 <= batch_size <= MAX_BATCH_SIZE
    ):
        raise BatchSizeRefused(
            f"batchSize {batch_size!r} refused: the handler serves batches of 1..{MAX_BATCH_SIZE} (warm-up "
            f"time and worker memory grow with the batch); register the model with batch_size <= {MAX_BATCH_SIZE}"
        )
    return batch_size


@dataclass(frozen=True)
class HandlerConfig:
    """What the handler takes from ``model-config.yaml``'s ``handler:`` section."""

    score_threshold: float | None = field(
        default=None, metadata={"help": "default score threshold of requests that send none (model.json's)"}
    )
    iou_threshold: float | None = field(
        default=None, metadata={"help": "default NMS IoU threshold of requests that send none (model.json's)"}
    )
    precision: str = field(
        default="fp32", metadata={"help": "network precision on CUDA workers (CPU workers run fp32)"}
    )
    torch_threads: int | None = field(
        default=None, metadata={"help": "intra-op threads of each worker (default: torch's)"}
    )
    max_pixels: int = field(
        default=DEFAULT_MAX_PIXELS, metadata={"help": "refuse larger images (413) before decoding"}
    )
    batch_buckets: tuple[int, ...] | None = field(
        default=None,
        metadata={
            "help": "comma-separated batch sizes batches are padded up to (default 1,2,3,4,6,8,... up to batchSize)"
        },
    )
    channels_last: bool | None = field(
        default=None, metadata={"help": "channels_last memory format (default: on for CUDA, off on the CPU)"}
    )
    warmup_seconds: float | None = field(
        default=None,
        metadata={
            "help": "time budget of a worker's warm-up (default and at most: half the model's startupTimeout, "
            "60 s with TorchServe's default); batches above the largest bucket it warmed run in chunks of it"
        },
    )
    deadline_margin_ms: float = field(
        default=DEADLINE_MARGIN_MS,
        metadata={
            "help": "ms kept for an answer's way back to its caller: a row with X-Request-Deadline runs only "
            "when its batch is planned to finish this long before the deadline"
        },
    )

    def __post_init__(self) -> None:
        for name in ("score_threshold", "iou_threshold"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, check_threshold(name, value))
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.torch_threads is not None and not _positive_int(self.torch_threads):
            raise ValueError(f"torch_threads must be an integer >= 1, got {self.torch_threads!r}")
        if not _positive_int(self.max_pixels):
            raise ValueError(f"max_pixels must be an integer >= 1, got {self.max_pixels!r}")
        if self.batch_buckets is not None:
            buckets = tuple(self.batch_buckets)
            if not buckets or not all(_positive_int(b) for b in buckets):
                raise ValueError(f"batch_buckets must be integers >= 1, got {list(buckets)}")
            object.__setattr__(self, "batch_buckets", tuple(sorted(set(buckets))))
        if self.channels_last is not None and not isinstance(self.channels_last, bool):
            raise ValueError(f"channels_last must be true or false, got {self.channels_last!r}")
        seconds = self.warmup_seconds
        if seconds is not None:
            if (
                isinstance(seconds, bool)
                or not isinstance(seconds, int | float)
                or not 0 < seconds < math.inf
            ):
                raise ValueError(f"warmup_seconds must be a number > 0, got {seconds!r}")
            object.__setattr__(self, "warmup_seconds", float(seconds))
        margin = self.deadline_margin_ms
        if isinstance(margin, bool) or not isinstance(margin, int | float) or not 0 <= margin < math.inf:
            raise ValueError(f"deadline_margin_ms must be a number >= 0, got {margin!r}")
        object.__setattr__(self, "deadline_margin_ms", float(margin))

    @classmethod
    def from_yaml(cls, section: dict | None) -> HandlerConfig:
        """The ``handler:`` section as parsed from YAML (absent: all defaults)."""
        section = dict(section or {})
        unknown = sorted(set(section) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"model-config.yaml: unknown handler settings {unknown}")
        if section.get("batch_buckets") is not None:
            section["batch_buckets"] = tuple(section["batch_buckets"])
        return cls(**section)

    def warmup_budget(self, startup_timeout=None) -> float:
        """Seconds warming may take: half the model's ``startupTimeout`` (``model-config.yaml``, else
        TorchServe's default), or ``warmup_seconds`` if that is less."""
        if (
            isinstance(startup_timeout, bool)
            or not isinstance(startup_timeout, int | float)
            or startup_timeout <= 0
        ):
            startup_timeout = STARTUP_TIMEOUT_S
        half = startup_timeout / 2
        return half if self.warmup_seconds is None else min(self.warmup_seconds, half)

    def to_yaml(self) -> dict:
        """The section as written into model-config.yaml: only the values that are set."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items() if v is not None}


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
