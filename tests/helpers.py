"""Helpers several test modules share: a server for a block of tests, the proof that a model loads
without the training stack, and the one-to-one matching of detections that tolerates near-ties.

Plain functions rather than fixtures: each caller keeps its own fixture scope, store and models.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from scripts.paths import ROOT
from scripts.serve import Server

T = TypeVar("T")

# What the serving path must never need: the training stack and the project's training/export code.
BLOCKED = ("effdet", "timm", "pytorch_lightning", "lightning", "omegaconf", "train", "export")

# Prepended to a script run in a fresh interpreter: the BLOCKED modules cannot be imported there,
# and the script stops at once if one still can (a block that blocks nothing proves nothing).
_BLOCKER = textwrap.dedent(
    """
    import importlib.abc, json, sys
    BLOCKED = {blocked!r}
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked: {{name}}")
    sys.meta_path.insert(0, Block())
    import torch
    for name in BLOCKED:
        try:
            __import__(name)
            raise SystemExit(f"{{name}} importable")
        except ImportError:
            pass
    """
).format(blocked=BLOCKED)


def run_without_training_stack(body: str, *args: str, timeout: float = 300) -> dict:
    """Run ``body`` (Python; ``torch``, ``json`` and ``sys`` imported, ``sys.argv[1:]`` = ``args``) in a
    fresh interpreter where BLOCKED cannot be imported; returns the JSON its last stdout line prints.

    Proves an exported model loads and runs where only the serving dependencies are installed.
    """
    script = _BLOCKER + textwrap.dedent(body)
    proc = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@contextmanager
def serving(workdir: Path, store: Path, models: list[str], **server_args) -> Iterator[Server]:
    """A real TorchServe on free loopback ports serving ``models`` (``NAME=FILE.mar``), stopped on exit
    whatever happened, so that a failed test or fixture leaves no Java frontend or worker behind."""
    srv = Server(workdir, store, free_ports=True, **server_args)
    try:
        srv.start(models)
        yield srv
    finally:
        srv.stop()


def count_matched(a: Sequence[T], b: Sequence[T], same: Callable[[T, T], bool]) -> int:
    """How many items of ``a`` find a distinct partner in ``b`` for which ``same`` holds (greedy: each
    takes the first free partner, in ``b``'s order).

    Near-tied detections may swap places between two computations of one answer, so answers are
    compared as multisets up to tolerances; another image's answer matches almost nothing.
    """
    free = list(b)
    found = 0
    for p in a:
        j = next((j for j, q in enumerate(free) if same(p, q)), None)
        if j is not None:
            free.pop(j)
            found += 1
    return found


def close_detections(score_tol: float, box_tol: float) -> Callable[[dict, dict], bool]:
    """``same`` for two served detections (JSON): one class, scores within ``score_tol``, every box
    coordinate within ``box_tol`` pixels."""

    def same(d: dict, e: dict) -> bool:
        return (
            d["class_id"] == e["class_id"]
            and abs(d["score"] - e["score"]) <= score_tol
            and all(abs(p - q) <= box_tol for p, q in zip(d["box"], e["box"], strict=True))
        )

    return same
