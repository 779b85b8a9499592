"""Shared fixtures: a small synthetic dataset, a briefly trained run, its export and archive, a server.

Everything is real and made here: the dataset by ``train.synthetic``, the checkpoint by
``python -m train``'s own ``main``, the TorchScript by ``export``, the .mar by the real
torch-model-archiver, the server by ``torchserve --start`` on free loopback ports.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# The repo root on sys.path first (pytest puts only tests/ there), then the one ROOT the project defines.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts.paths import ROOT  # noqa: E402

os.environ.setdefault("PYTHONPATH", str(ROOT))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """24 train + 8 val synthetic images in COCO format (3 classes, some negatives)."""
    from train import synthetic

    return synthetic.generate(tmp_path_factory.mktemp("synthetic"), train=24, val=8, seed=1)


@pytest.fixture(scope="session")
def trained_run(synthetic_dir, tmp_path_factory) -> Path:
    """A run directory from a few real training steps of the small preset (best.ckpt, model.json)."""
    from train.__main__ import main

    out = tmp_path_factory.mktemp("runs") / "tiny"
    main(
        ["--data", str(synthetic_dir), "--format", "synthetic", "--model", "small", "--epochs", "1",
         "--max-steps", "3", "--batch-size", "4", "--out", str(out)]
    )  # fmt: skip
    return out


@pytest.fixture(scope="session")
def exported(trained_run) -> Path:
    """The run exported with torch.jit.script: model.pt, model.json, index_to_name.json."""
    from export.formats import export

    export(trained_run / "best.ckpt", trained_run / "export")
    return trained_run / "export"


@pytest.fixture(scope="session")
def model_store(exported, tmp_path_factory) -> Path:
    """A model store holding tiny.mar (batchSize 4) built by the real torch-model-archiver."""
    from scripts.archive import archive
    from scripts.settings import ModelConfig

    store = tmp_path_factory.mktemp("model_store")
    archive(exported, "tiny", "1.0", store, ModelConfig(batch_size=4, max_batch_delay=50))
    return store


@pytest.fixture(scope="session")
def val_images(synthetic_dir) -> list[bytes]:
    return [p.read_bytes() for p in sorted((synthetic_dir / "images").glob("val_*.jpg"))]


@pytest.fixture(scope="session")
def detector(exported):
    """The serving core in this process, on the exported model: the reference for served answers."""
    from handler.detector import Detector

    return Detector(exported / "model.pt")
