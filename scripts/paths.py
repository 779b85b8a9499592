"""Where things are: the repository root, its default model store and server folder, and the
TorchServe executables."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL_STORE = ROOT / "model_store"  # where archives go and TorchServe loads them from, by default
SERVE_DIR = ROOT / "runs" / "serve"  # TorchServe's working directory: key_file.json and logs/


def executable(name: str) -> str:
    """``name`` next to this interpreter (the venv's own), else on PATH, else a clear error."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found:
        return found
    raise FileNotFoundError(
        f"{name} not found next to {sys.executable} nor on PATH: install the project (make setup) "
        "or put TorchServe's executables on PATH"
    )
