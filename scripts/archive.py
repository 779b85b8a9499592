"""Package an exported model and the handler into ``model_store/NAME.mar`` with torch-model-archiver.

    python -m scripts.archive runs/effdet_demo/export --name effdet_demo --version 1.0

The archive holds the network the export wrote (``model.pt``, TorchScript, or ``model.pt2``,
AOTInductor: model.json's ``export.file`` says which, and the manifest's ``serializedFile`` tells
the handler), ``model.json``, ``index_to_name.json``, the ``handler``
package and a ``model-config.yaml``; serving it needs torch, torchvision, PIL and TorchServe only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from handler.decode import DEFAULT_MAX_PIXELS
from scripts.client import (
    MAX_BATCH_DELAY_MS,
    MAX_BATCH_SIZE,
    MAX_RESPONSE_TIMEOUT_S,
    InvalidArgument,
    check_name,
    check_workers,
    int_in,
)
from scripts.paths import ROOT, executable

HANDLER_DIR = ROOT / "handler"
ENTRY = "effdet_handler.py"


@dataclass
class ModelConfig:
    """TorchServe's per-model settings (model-config.yaml) and our handler section."""

    batch_size: int = 4
    max_batch_delay: int = 20
    min_workers: int = 1
    max_workers: int = 1
    response_timeout: int = 120
    device_type: str = "cpu"
    score_threshold: float | None = None
    iou_threshold: float | None = None
    precision: str = "fp32"
    torch_threads: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    device_ids: list[int] | None = None  # GPUs this model's workers use (round-robin); all when None

    def __post_init__(self):
        """TorchServe stores negative sizes, delays and timeouts as given: refuse them here."""
        int_in("batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        int_in("max_batch_delay (ms)", self.max_batch_delay, 0, MAX_BATCH_DELAY_MS)
        int_in("response_timeout (s)", self.response_timeout, 1, MAX_RESPONSE_TIMEOUT_S)
        check_workers(self.min_workers)
        check_workers(self.max_workers)
        if self.min_workers > self.max_workers:
            raise InvalidArgument(f"min_workers {self.min_workers} > max_workers {self.max_workers}")
        if self.device_type not in ("cpu", "gpu") or self.precision not in ("fp32", "fp16"):
            raise InvalidArgument(
                f"device_type cpu|gpu and precision fp32|fp16, got {self.device_type}, {self.precision}"
            )
        for name, value, lo_open in (("score_threshold", self.score_threshold, False),
                                     ("iou_threshold", self.iou_threshold, True)):  # fmt: skip
            if value is not None and not (0 < value <= 1 if lo_open else 0 <= value <= 1):
                raise InvalidArgument(f"{name} must be in {'(0' if lo_open else '[0'}, 1], got {value}")
        int_in("max_pixels", self.max_pixels, 1, 2**40)

    def to_yaml(self) -> dict:
        handler = {
            k: v
            for k, v in asdict(self).items()
            if k in ("score_threshold", "iou_threshold", "precision", "torch_threads", "max_pixels")
            and v is not None
        }
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
            "deviceType": self.device_type,
            "handler": handler,
        }


def network_file(export_dir: Path, config: ModelConfig) -> Path:
    """The network the export wrote (model.json's ``export.file``): model.pt or model.pt2.

    A ``.pt2`` is compiled for one device and precision: an archive that would make its workers
    load it elsewhere is refused here rather than in every worker.
    """
    card_path = export_dir / "model.json"
    info = json.loads(card_path.read_text()).get("export", {}) if card_path.is_file() else {}
    path = export_dir / info.get("file", "model.pt")
    if info.get("format") == "aoti":
        want = "cuda" if config.device_type == "gpu" else "cpu"
        if info.get("device") != want:
            raise ValueError(
                f"{path} was compiled for {info.get('device')} but the archive's workers run on {want}; "
                f"export again with --device {want} or archive with --device-type "
                f"{'gpu' if info.get('device') == 'cuda' else 'cpu'}"
            )
        if want == "cuda" and info.get("precision") != config.precision:
            raise ValueError(
                f"{path} was compiled for {info.get('precision')} but the archive asks for {config.precision}; "
                f"archive with --precision {info.get('precision')}"
            )
    return path


def archive(
    export_dir: str | Path,
    name: str,
    version: str = "1.0",
    model_store: str | Path = ROOT / "model_store",
    config: ModelConfig | None = None,
) -> Path:
    """Run the real torch-model-archiver; returns the path of the .mar."""
    export_dir, model_store = Path(export_dir), Path(model_store)
    model_store.mkdir(parents=True, exist_ok=True)
    config = config or ModelConfig()
    check_name(name)
    check_name(version, "version")
    network = network_file(export_dir, config)
    for needed in (network.name, "model.json", "index_to_name.json"):
        if not (export_dir / needed).is_file():
            raise FileNotFoundError(f"{export_dir / needed} missing: run `python -m export` first")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # A directory given to --extra-files is copied by its contents: wrap the package so that
        # the archive holds handler/*.py and the entry module can `import handler.detector`.
        package = tmp / "pkg" / "handler"
        shutil.copytree(HANDLER_DIR, package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        cfg_file = tmp / "model-config.yaml"
        cfg_file.write_text(yaml.safe_dump(config.to_yaml(), sort_keys=False))
        cmd = [
            executable("torch-model-archiver"),
            "--model-name",
            name,
            "--version",
            version,
            "--serialized-file",
            str(network),
            "--handler",
            str(HANDLER_DIR / ENTRY),
            "--extra-files",
            ",".join(
                [str(tmp / "pkg"), str(export_dir / "model.json"), str(export_dir / "index_to_name.json")]
            ),
            "--config-file",
            str(cfg_file),
            "--export-path",
            str(model_store),
            "--force",
        ]
        # torch-model-archiver stages the files in $TMPDIR/<model-name> and deletes that folder
        # afterwards: point TMPDIR at our private directory so that a user's /tmp/<name> survives.
        staging = tmp / "staging"
        staging.mkdir()
        subprocess.run(cmd, check=True, env={**os.environ, "TMPDIR": str(staging)})
    return model_store / f"{name}.mar"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m scripts.archive", description=__doc__)
    p.add_argument(
        "export_dir", help="directory written by `python -m export` (model.pt or model.pt2, model.json, ...)"
    )
    p.add_argument("--name", default="effdet_demo")
    p.add_argument("--version", default="1.0")
    p.add_argument("--model-store", default=str(ROOT / "model_store"))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument(
        "--max-batch-delay",
        type=int,
        default=20,
        help="ms TorchServe waits to fill a batch (0 is written as 1)",
    )
    p.add_argument("--min-workers", type=int, default=1)
    p.add_argument("--max-workers", type=int, default=1)
    p.add_argument("--response-timeout", type=int, default=120)
    p.add_argument("--device-type", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--precision", choices=("fp32", "fp16"), default="fp32")
    p.add_argument("--score-threshold", type=float)
    p.add_argument("--iou-threshold", type=float)
    p.add_argument("--torch-threads", type=int)
    p.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="refuse larger images (413) before decoding",
    )
    p.add_argument(
        "--device-ids",
        type=lambda s: [int(x) for x in s.split(",") if x.strip()],
        help="comma-separated GPU ids this model's workers use round-robin (default: all GPUs)",
    )
    a = p.parse_args(argv)
    try:
        cfg = ModelConfig(
            batch_size=a.batch_size,
            max_batch_delay=a.max_batch_delay,
            min_workers=a.min_workers,
            max_workers=a.max_workers,
            response_timeout=a.response_timeout,
            device_type=a.device_type,
            score_threshold=a.score_threshold,
            iou_threshold=a.iou_threshold,
            precision=a.precision,
            torch_threads=a.torch_threads,
            max_pixels=a.max_pixels,
            device_ids=a.device_ids,
        )
        mar = archive(a.export_dir, a.name, a.version, a.model_store, cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"archive failed: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {mar} ({mar.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
