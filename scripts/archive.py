"""Package an exported model and the handler into ``model_store/NAME.mar`` with torch-model-archiver.

    python -m scripts.archive runs/effdet_demo/export --name effdet_demo --version 1.0

The archive holds the network the export wrote (``model.pt``, TorchScript; ``model.pt2``,
AOTInductor; or ``model.onnx``, ONNX: model.json's ``export.file`` says which, and the manifest's
``serializedFile`` tells the handler), ``model.json``, ``index_to_name.json``, the ``handler``
package and a ``model-config.yaml`` (``scripts.settings.ModelConfig``). Serving it needs torch,
torchvision, PIL and TorchServe only (and onnxruntime for an ONNX network).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import yaml

from handler.network import DEFAULT_FORMAT, NETWORK_FORMATS, network_format
from scripts.paths import MODEL_STORE, ROOT, executable
from scripts.settings import ModelConfig, add_config_arguments, check_name, config_from_args

HANDLER_DIR = ROOT / "handler"
ENTRY = "effdet_handler.py"


def network_file(export_dir: Path, config: ModelConfig) -> Path:
    """The network the export wrote (model.json's ``export.file``: model.pt, model.pt2 or model.onnx).

    A network that cannot run where the archive's workers will (a ``.pt2`` compiled for another
    device or precision) is refused here rather than in every worker.
    """
    card_path = export_dir / "model.json"
    info = json.loads(card_path.read_text()).get("export", {}) if card_path.is_file() else {}
    path = export_dir / info.get("file", NETWORK_FORMATS[DEFAULT_FORMAT].file)
    problem = network_format(path).problem(info, config.device_type, config.handler.precision)
    if problem:
        raise ValueError(f"{path} cannot be served by this archive's workers: {problem}")
    return path


def archive(
    export_dir: str | Path,
    name: str,
    version: str = "1.0",
    model_store: str | Path = MODEL_STORE,
    config: ModelConfig | None = None,
) -> Path:
    """Run the real torch-model-archiver; returns the path of the .mar."""
    export_dir = Path(export_dir)
    config = config or ModelConfig()
    network = network_file(export_dir, config)
    for needed in (network.name, "model.json", "index_to_name.json"):
        if not (export_dir / needed).is_file():
            raise FileNotFoundError(f"{export_dir / needed} missing: run `python -m export` first")
    extra = [export_dir / "model.json", export_dir / "index_to_name.json"]
    return run_archiver(name, version, model_store, config, HANDLER_DIR / ENTRY, network, extra)


def run_archiver(
    name: str,
    version: str,
    model_store: str | Path,
    config: ModelConfig,
    handler: Path,
    serialized: Path | None = None,
    extra_files: Sequence[Path] = (),
) -> Path:
    """torch-model-archiver with ``config`` as the archive's model-config.yaml and the ``handler``
    package beside ``handler`` (the entry module); returns the .mar."""
    check_name(name)
    check_name(version, "version")
    model_store = Path(model_store)
    model_store.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # A directory given to --extra-files is copied by its contents: wrap the package so that
        # the archive holds handler/*.py and the entry module can `import handler.detector`.
        package = tmp / "pkg" / "handler"
        shutil.copytree(HANDLER_DIR, package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        extra_files = [package.parent, *extra_files]
        cfg_file = tmp / "model-config.yaml"
        cfg_file.write_text(yaml.safe_dump(config.to_yaml(), sort_keys=False))
        cmd = [executable("torch-model-archiver"), "--model-name", name, "--version", version,
               "--handler", str(handler), "--config-file", str(cfg_file),
               "--export-path", str(model_store), "--force"]  # fmt: skip
        if serialized is not None:
            cmd += ["--serialized-file", str(serialized)]
        cmd += ["--extra-files", ",".join(str(f) for f in extra_files)]
        # torch-model-archiver stages the files in $TMPDIR/<model-name> and deletes that folder
        # afterwards: point TMPDIR at our private directory so that a user's /tmp/<name> survives.
        staging = tmp / "staging"
        staging.mkdir()
        proc = subprocess.run(cmd, env={**os.environ, "TMPDIR": str(staging)}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ValueError(f"torch-model-archiver failed ({proc.returncode}): {proc.stderr.strip()[-1000:]}")
    return model_store / f"{name}.mar"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m scripts.archive", description=__doc__)
    p.add_argument(
        "export_dir", help="directory written by `python -m export` (model.pt or model.pt2, model.json, ...)"
    )
    p.add_argument("--name", default="effdet_demo")
    p.add_argument("--version", default="1.0")
    p.add_argument("--model-store", default=str(MODEL_STORE))
    add_config_arguments(p)
    a = p.parse_args(argv)
    try:
        mar = archive(a.export_dir, a.name, a.version, a.model_store, config_from_args(a))
    except (ValueError, FileNotFoundError) as e:
        print(f"archive failed: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {mar} ({mar.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
