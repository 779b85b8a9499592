"""The handler section of an archive's ``model-config.yaml``, as one typed object.

``scripts.archive`` writes it (every field is one of its command-line options) and the handler
reads it once at load, so the two sides share one list of keys, defaults and checks. A key the
handler does not know is refused at load by name rather than ignored.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from handler.decode import DEFAULT_MAX_PIXELS
from handler.request import check_threshold

PRECISIONS = ("fp32", "fp16")


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

    def to_yaml(self) -> dict:
        """The section as written into model-config.yaml: only the values that are set."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items() if v is not None}


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
