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

import torch

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


# A TorchServe worker's Python with BLOCKED unimportable: TorchServe starts workers with its own
# environment plus extra_env, so the block travels as a sitecustomize on PYTHONPATH, and every
# interpreter that loaded it notes its pid and command line (a block that was not active proves nothing).
SITECUSTOMIZE = """
import os, sys
with open(os.environ["EFFDET_BLOCK_MARKER"], "a") as f, open("/proc/self/cmdline", "rb") as c:
    f.write(f"{{os.getpid()}} " + c.read().replace(b"\\0", b" ").decode(errors="replace") + "\\n")
class _Block:
    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"{{fullname}} is blocked in this worker")
        return None
sys.meta_path.insert(0, _Block())
"""


def training_stack_blocked(
    workdir: Path, blocked: Sequence[str] = BLOCKED
) -> tuple[dict, Callable[[], set[int]]]:
    """(``extra_env`` for ``serving``, a function giving the pids of the workers that ran with the
    block) for TorchServe workers that cannot import ``blocked``."""
    block = workdir / "block"
    block.mkdir(parents=True, exist_ok=True)
    (block / "sitecustomize.py").write_text(SITECUSTOMIZE.format(blocked=set(blocked)))
    marker = workdir / "marker.log"
    env = {"PYTHONPATH": str(block), "EFFDET_BLOCK_MARKER": str(marker)}

    def pids() -> set[int]:
        lines = marker.read_text().splitlines() if marker.is_file() else []
        return {int(line.split()[0]) for line in lines if "model_service_worker" in line}

    return env, pids


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


# -- tiny networks for the export formats' failure paths (cheap to compile) --------------------------
class TwoConvs(torch.nn.Module):
    """The smallest network of effdet's output shape (one level)."""

    def __init__(self):
        super().__init__()
        self.cls = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.box = torch.nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        return [self.cls(x)], [self.box(x)]


# An op with a CPU kernel but no fake kernel: torch.export cannot trace it, so every format must name it.
_lib = torch.library.Library("effdet_serve_test", "DEF")
_lib.define("opaque(Tensor x) -> Tensor")
_lib.impl("opaque", lambda x: x.clone(), "CPU")


class WithOpaqueOp(TwoConvs):
    def forward(self, x):
        return [torch.ops.effdet_serve_test.opaque(self.cls(x))], [self.box(x)]
