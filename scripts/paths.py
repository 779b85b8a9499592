"""Where things are: the repository root and the TorchServe executables."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


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
