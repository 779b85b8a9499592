"""What this project lets reach TorchServe: value limits, name checks, and an archive's model-config.

TorchServe 0.12 stores negative batch sizes, delays and timeouts as given, registers names it
cannot unregister (``a/b``, ``../x``), and keeps a worker running after "scaled to 0". Every
value is checked here before a management call or an archive is made: ``scripts.archive`` and
``scripts.client`` share these checks, and ``ModelConfig`` is the one definition of an archive's
``model-config.yaml`` (TorchServe's keys plus the handler's own section, ``HandlerConfig``). The
archive's command-line options are derived from the two dataclasses, so every setting the
handler reads can be given there, with the same defaults.
"""

from __future__ import annotations

import argparse
import re
import typing
from dataclasses import MISSING, dataclass, field, fields, replace

from handler.config import MAX_BATCH_SIZE, PRECISIONS, HandlerConfig

# Per model version, whatever the machine; each worker holds a copy of the model (~0.9 GB on CPU).
# What a machine holds is checked against its cores, GPUs and memory by scripts.client.capacity.
MAX_WORKERS = 64
MAX_BATCH_DELAY_MS = 60_000
MAX_RESPONSE_TIMEOUT_S = 3600
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # model names and versions; no "/", no ".."
MAR_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,200}\.mar")  # a file name in the model store
DEVICE_TYPES = ("cpu", "gpu")


class InvalidArgument(ValueError):
    """A value the project refuses to send to TorchServe (which would accept it, or break on it)."""


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


def check_batch_size(value) -> int:
    """The handler refuses a larger batchSize at load (``handler.config.MAX_BATCH_SIZE``)."""
    over = isinstance(value, int) and value > MAX_BATCH_SIZE
    return int_in(
        "batch_size", value, 1, MAX_BATCH_SIZE, " (the handler refuses more at load)" if over else ""
    )


def check_batch_delay(value) -> int:
    return int_in("max_batch_delay (ms)", value, 0, MAX_BATCH_DELAY_MS)


def check_response_timeout(value) -> int:
    return int_in("response_timeout (s)", value, 1, MAX_RESPONSE_TIMEOUT_S)


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
        check_batch_size(batch_size)
    if max_batch_delay is not None:
        check_batch_delay(max_batch_delay)
    if response_timeout is not None:
        check_response_timeout(response_timeout)
    check_workers(initial_workers)


# -- an archive's model-config.yaml -------------------------------------------------------------------
@dataclass(frozen=True)
class ModelConfig:
    """TorchServe's per-model settings (model-config.yaml) and the handler's own section."""

    batch_size: int = field(
        default=4, metadata={"help": "requests TorchServe hands the handler as one batch"}
    )
    max_batch_delay: int = field(
        default=20, metadata={"help": "ms TorchServe waits to fill a batch (0 is written as 1)"}
    )
    min_workers: int = field(default=1, metadata={"help": "workers started at registration"})
    max_workers: int = field(default=1, metadata={"help": "workers TorchServe may scale the model to"})
    response_timeout: int = field(
        default=120, metadata={"help": "s a batch may take before TorchServe restarts its worker"}
    )
    startup_timeout: int | None = field(
        default=None, metadata={"help": "s a worker may take to load and warm up (default TorchServe's 120)"}
    )
    device_type: str = field(default="cpu", metadata={"help": "where the workers run: cpu or gpu"})
    device_ids: tuple[int, ...] | None = field(
        default=None,
        metadata={"help": "comma-separated GPU ids this model's workers use round-robin (default: all GPUs)"},
    )
    handler: HandlerConfig = field(default_factory=HandlerConfig)

    def __post_init__(self):
        """TorchServe stores negative sizes, delays and timeouts as given: refuse them here."""
        check_batch_size(self.batch_size)
        check_batch_delay(self.max_batch_delay)
        check_response_timeout(self.response_timeout)
        if self.startup_timeout is not None:
            int_in("startup_timeout (s)", self.startup_timeout, 1, MAX_RESPONSE_TIMEOUT_S)
        check_workers(self.min_workers)
        check_workers(self.max_workers)
        if self.min_workers > self.max_workers:
            raise InvalidArgument(f"min_workers {self.min_workers} > max_workers {self.max_workers}")
        if self.device_type not in DEVICE_TYPES:
            raise InvalidArgument(
                f"device_type must be one of {', '.join(DEVICE_TYPES)}, got {self.device_type!r}"
            )
        if self.device_ids is not None:
            object.__setattr__(
                self, "device_ids", tuple(int_in("device id", d, 0, 1023) for d in self.device_ids)
            )

    def to_yaml(self) -> dict:
        placement = {"deviceIds": list(self.device_ids)} if self.device_ids else {}
        return {
            **placement,
            "batchSize": self.batch_size,
            # TorchServe reads 0 here as "not set" and waits its default 100 ms (ModelManager.createModel
            # takes the archive's value only when > 0): 1 ms is the nearest "no wait" it honours.
            "maxBatchDelay": max(1, self.max_batch_delay),
            "minWorkers": self.min_workers,
            "maxWorkers": self.max_workers,
            "responseTimeout": self.response_timeout,
            **({"startupTimeout": self.startup_timeout} if self.startup_timeout else {}),
            "deviceType": self.device_type,
            "handler": self.handler.to_yaml(),
        }

    def with_handler(self, **changes) -> ModelConfig:
        return replace(self, handler=replace(self.handler, **changes))


# -- the same settings as command-line options ---------------------------------------------------------
CHOICES = {"device_type": DEVICE_TYPES, "precision": PRECISIONS}


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _option_type(hint) -> dict:
    """argparse keywords for a field's type: int, float, str, bool (--x/--no-x) or a tuple of ints."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    base = args[0]
    if base is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(base) is tuple:
        return {"type": _ints}
    return {"type": base}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per ModelConfig and HandlerConfig field (``--batch-size``, ``--score-threshold``, ...),
    defaults and help from the dataclasses."""
    for cls in (ModelConfig, HandlerConfig):
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            if f.name == "handler":
                continue
            default = f.default if f.default is not MISSING else None
            kw = _option_type(hints[f.name])
            if f.name in CHOICES:
                kw["choices"] = CHOICES[f.name]
            shown = f" (default {default})" if default is not None and "action" not in kw else ""
            parser.add_argument(
                "--" + f.name.replace("_", "-"),
                default=default,
                help=f.metadata.get("help", "") + shown,
                **kw,
            )


def config_from_args(ns: argparse.Namespace) -> ModelConfig:
    """The ModelConfig the options of ``add_config_arguments`` describe (checked: raises ValueError)."""
    handler = HandlerConfig(**{f.name: getattr(ns, f.name) for f in fields(HandlerConfig)})
    return ModelConfig(
        **{f.name: getattr(ns, f.name) for f in fields(ModelConfig) if f.name != "handler"}, handler=handler
    )
