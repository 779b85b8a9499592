"""Helpers several test modules share: built fixtures kept between runs, TorchServe servers (the
run's shared one, a block of tests' own, and their logs on failure), the proof that a model loads
without the training stack, and exact comparison of served answers.

Plain functions and classes rather than fixtures: each caller keeps its own fixture scope.
"""

from __future__ import annotations

import fcntl
import hashlib
import http.server
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import textwrap
import threading
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
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


# -- built fixtures, kept between runs ------------------------------------------------------------
# Which sources each kind of built fixture depends on: a change to any of them builds it again.
SOURCES = {
    "synthetic": ("train/synthetic.py",),
    "run": ("train", "handler"),
    "export": ("export", "train", "handler"),
    "store": ("handler", "scripts/archive.py", "scripts/settings.py", "scripts/paths.py"),
    "aoti": ("export", "train", "handler"),
    "onnx": ("export", "train", "handler"),
}
PACKAGES = ("torch", "torchvision", "effdet", "timm", "pytorch-lightning", "torch-model-archiver", "onnx", "onnxscript",
            "onnxruntime")  # fmt: skip


def source_digest(paths: Iterable[str]) -> str:
    """sha256 over the named files (directories: their ``*.py``), the library versions that shape
    what is built, and the machine (a compiled package runs only where it was compiled)."""
    h = hashlib.sha256()
    for rel in sorted(paths):
        p = ROOT / rel
        files = sorted(p.rglob("*.py")) if p.is_dir() else [p]
        for f in files:
            h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes() + b"\0")
    for pkg in PACKAGES:
        h.update(f"{pkg}=={importlib.metadata.version(pkg)}\0".encode())
    h.update(f"{platform.machine()} {sys.version_info[:2]}".encode())
    return h.hexdigest()


@dataclass
class FixtureCache:
    """Where built fixtures (dataset, trained run, exports, archives, compiled packages) live.

    With a ``root`` (pytest's cache directory) each is built once and kept under a name keyed on
    what produced it: its recipe (``key``), the sources it depends on (``SOURCES``) and the keys
    of the fixtures it was built from. A later run whose key matches reuses it; any change builds
    it again. ``root=None`` (``EFFDET_TEST_CACHE=0``, ``-p no:cacheprovider``, ``--cache-clear``)
    builds everything afresh under ``scratch``.
    """

    root: Path | None
    scratch: Path

    def get(self, kind: str, key: dict, build: Callable[[Path], None]) -> Path:
        """The directory ``build(dir)`` fills for this ``kind`` and ``key``, built now or before."""
        digest = hashlib.sha256(
            json.dumps({"key": key, "sources": source_digest(SOURCES[kind])}, sort_keys=True).encode()
        ).hexdigest()[:16]
        if self.root is None:
            out = self.scratch / f"{kind}-{digest}"
            if not out.is_dir():
                build(out)
            return out
        out = self.root / f"{kind}-{digest}"
        if out.is_dir():
            return out
        # One builder at a time per fixture: the other test processes (pytest-xdist workers, a second
        # run) wait here and then take what it built instead of compiling the same thing beside it.
        with open(self.root / f".{kind}-{digest}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if out.is_dir():
                return out
            tmp = self.root / f".{kind}-{digest}.{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            build(tmp)
            tmp.rename(out)  # atomic: a directory under its final name is complete
        for old in self.root.glob(f"{kind}-*"):  # older builds of this kind
            if old != out and time.time() - old.stat().st_mtime > 3600:
                shutil.rmtree(old, ignore_errors=True)
        return out


def spread_class_scores(checkpoint: Path, factor: float) -> None:
    """Scale the class head's last convolution in a Lightning checkpoint by ``factor``, in place.

    A model trained for a few steps scores every anchor within ~1e-4 of effdet's prior (0.01): its
    answers are runs of exactly tied scores, whose order (and which of them a cut keeps) depends on
    batch-mates. Scaled up, the same features give scores that differ from anchor to anchor, as a
    trained detector's do, so served answers can be compared with in-process ones row for row.
    """
    import torch

    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    scaled = [k for k in ckpt["state_dict"] if k.endswith("class_net.predict.conv_pw.weight")]
    assert scaled, f"{checkpoint}: no class head weights"
    for k in scaled:
        ckpt["state_dict"][k] = ckpt["state_dict"][k] * factor
    torch.save(ckpt, checkpoint)


# -- TorchServe servers ------------------------------------------------------------------------------
# Every TorchServe started in this process and not yet stopped: conftest attaches their logs to the
# report of a test that fails (a timeout included) while they run.
LIVE_SERVERS: list[Server] = []


@contextmanager
def serving(workdir: Path, store: Path, models: list[str], **server_args) -> Iterator[Server]:
    """A real TorchServe on free loopback ports serving ``models`` (``NAME=FILE.mar``), stopped on exit
    whatever happened, so that a failed test or fixture leaves no Java frontend or worker behind.

    For a block of tests that need a server of their own: one they stop, kill or configure
    differently. Everything else registers its models on the run's shared server (``SharedServer``).
    """
    srv = Server(workdir, store, free_ports=True, **server_args)
    try:
        srv.start(models)
        yield srv
    finally:
        srv.stop()


def marks_users(*marks: str) -> Callable[[T], T]:
    """Decorator for a fixture function (put it under ``@pytest.fixture``): every test that uses the
    fixture, directly or through other fixtures, gets ``marks`` (conftest adds them at collection)."""

    def decorate(fixture_function: T) -> T:
        fixture_function._marks_users = marks  # type: ignore[attr-defined]
        return fixture_function

    return decorate


# A fixture that starts (or hands out) a TorchServe: its users are `server` tests, left out of
# `make test-fast`.
starts_torchserve = marks_users("server")


# Installed as sitecustomize.py for the shared server's workers: the training stack cannot be
# imported, and each worker notes that the block is active in it and where ``handler`` came from.
SITECUSTOMIZE = """
import importlib.machinery, os, sys

_BLOCKED = {blocked!r}
_MARKER = os.environ["EFFDET_BLOCK_MARKER"]


def _note(text):
    with open(_MARKER, "a") as f:
        f.write(f"{{os.getpid()}} {{text}}\\n")


class _BlockTrainingStack:
    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] in _BLOCKED:
            _note(f"blocked {{fullname}}")
            raise ModuleNotFoundError(f"{{fullname}} is blocked in this worker (the training stack)")
        if fullname == "handler":
            spec = importlib.machinery.PathFinder.find_spec(fullname, path)
            _note(f"handler-from {{spec.origin if spec else None}}")
        return None


sys.meta_path.insert(0, _BlockTrainingStack())
with open("/proc/self/cmdline", "rb") as f:
    _note("active " + f.read().replace(b"\\0", b" ").decode(errors="replace"))
"""


def blocking_env(where: Path) -> dict[str, str]:
    """Environment for a TorchServe whose Python processes cannot import the training stack
    (``BLOCKED``); what they noted goes to ``where / "marker.log"``."""
    block = where / "block"
    block.mkdir(parents=True, exist_ok=True)
    (block / "sitecustomize.py").write_text(SITECUSTOMIZE.format(blocked=set(BLOCKED)))
    return {"PYTHONPATH": str(block), "EFFDET_BLOCK_MARKER": str(where / "marker.log")}


def mar_model_name(mar: Path) -> str | None:
    try:
        with zipfile.ZipFile(mar) as z:
            return json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]["modelName"]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None


@dataclass
class SharedServer:
    """The one TorchServe of a test run (conftest's ``shared_server``), started empty on free
    loopback ports, with workers that cannot import the training stack (``BLOCKED``).

    The contract, for every module that uses it:

    - a module serves only model names it leases (``lease``), and registers its archives under
      them itself (``add`` copies a .mar into the shared store, ``client().register`` registers
      it); names are the module's own, so modules cannot see each other's models;
    - it may change its own models freely (versions, defaults, worker counts, TorchServe's own
      scale-down), and leaves nothing behind: leaving the lease unregisters every version of its
      names and deletes their archives (twin files of a scale-down included);
    - it never stops, restarts or reconfigures the server, and kills no process of it: tests that
      do (a worker SIGKILL, ``scripts.serve stop``, another config or environment) start their own
      with ``serving``.
    """

    server: Server
    marker: Path
    leased: set[str] = field(default_factory=set)

    def client(self, **kwargs):
        from scripts.client import Client

        s = self.server
        return Client(s.inference_url, s.management_url, s.key_file, **kwargs)

    @property
    def store(self) -> Path:
        return self.server.model_store

    def add(self, mar: Path, file_name: str | None = None) -> str:
        """Copy an archive of a leased model into the shared store; returns its file name there."""
        name = mar_model_name(mar)
        assert name in self.leased, f"{mar}: model {name!r} is not leased on the shared server"
        dest = self.store / (file_name or mar.name)
        assert not dest.exists(), f"{dest.name} is already in the shared model store"
        shutil.copy(mar, dest)
        return dest.name

    @contextmanager
    def lease(self, *names: str) -> Iterator[SharedServer]:
        """Serve ``names`` on the shared server for a block of tests; everything of theirs goes at exit."""
        client = self.client()
        taken = [n for n in names if n in self.leased or client.manage("GET", f"/models/{n}").ok]
        assert not taken, f"models {taken} are already served on the shared server"
        self.leased |= set(names)
        try:
            yield self
        finally:
            try:
                for name in names:
                    self._remove(client, name)
            finally:
                self.leased -= set(names)

    def _remove(self, client, name: str) -> None:
        """Unregister every version of ``name`` (the default last: TorchServe refuses it before the
        others), wait until it is gone, and delete its archives from the store."""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            r = client.manage("GET", f"/models/{name}/all")
            if r.status_code == 404:
                break
            entries = sorted(r.json(), key=lambda e: bool(e.get("isDefault")))
            for e in entries:
                client.unregister(name, e["modelVersion"])
            time.sleep(0.2)
        else:
            raise AssertionError(f"{name} still registered on the shared server after 120 s")
        for mar in self.store.glob("*.mar"):
            if mar_model_name(mar) == name:
                mar.unlink()

    def blocked_pids(self) -> set[int]:
        """The TorchServe workers in which the block was active."""
        return {
            pid for pid, text in self.noted() if text.startswith("active") and "model_service_worker" in text
        }

    def blocked_imports(self, pids: set[int]) -> list[str]:
        """What those workers tried to import from the training stack (and were refused)."""
        return [text for pid, text in self.noted() if pid in pids and text.startswith("blocked")]

    def noted(self) -> list[tuple[int, str]]:
        """What the workers' sitecustomize noted: (pid, text) lines."""
        if not self.marker.is_file():
            return []
        out = []
        for line in self.marker.read_text().splitlines():
            pid, _, text = line.partition(" ")
            out.append((int(pid), text))
        return out


# -- comparing answers ---------------------------------------------------------------------------------
def canonical(answer: dict) -> dict:
    """An answer with its detections in one defined order: by score, and rows that report the same
    score in (class, box) order. The contract orders detections by score only, so the order within
    a run of equal scores is not part of the answer; everything else is compared exactly."""
    rows = sorted(answer["detections"], key=lambda d: (-d["score"], d["class_id"], d["box"]))
    return {**answer, "detections": rows}


def same_answer(got: dict, want: dict, keys: Sequence[str] = ("image", "detections")) -> bool:
    """``got`` and ``want`` agree exactly on ``keys`` (detections in canonical order)."""
    a, b = canonical(got), canonical(want)
    return all(a[k] == b[k] for k in keys)


def count_matched(a: Sequence[T], b: Sequence[T], same: Callable[[T, T], bool]) -> int:
    """How many items of ``a`` find a distinct partner in ``b`` for which ``same`` holds (greedy: each
    takes the first free partner, in ``b``'s order).

    For answers of two different computations (two export formats, channels_last), where rows may
    differ in the last float bits and near-tied rows may swap places.
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


class Reference:
    """What a served model may answer for an image: ``Detector.predict`` of that image in a batch of
    each size the server's handler runs batches as (its buckets, ``bucket_sizes(batchSize)``).

    The network's output for an image depends on the size of the batch it runs in, in the last
    float bits, and on nothing else: not on its batch-mates, not on its place (tests/test_buckets.py
    pins that); with the same torch thread count, which conftest sets alike for this process and
    the servers it starts. So a served answer equals one of these exactly; an image answered with another
    image's detections, a lost parameter or a mixed-up row matches none.
    """

    def __init__(self, detector, batch_size: int):
        from handler.detector import bucket_sizes

        self.detector = detector
        self.sizes = bucket_sizes(batch_size)
        self._cache: dict[tuple, dict] = {}

    def answer(self, data: bytes, size: int = 1, **params) -> dict:
        """The in-process answer (canonical order) for ``data`` in a batch of ``size``."""
        key = (hashlib.sha256(data).hexdigest(), size, tuple(sorted(params.items())))
        if key not in self._cache:
            self._cache[key] = canonical(self.detector.predict([data] * size, **params)[0])
        return self._cache[key]

    def answers(self, data: bytes, **params) -> Iterator[dict]:
        for size in self.sizes:
            yield self.answer(data, size, **params)

    def why_not(self, body: dict, data: bytes, **params) -> str | None:
        """None when ``body`` (a served 200's JSON) is one of the in-process answers, else what differs."""
        got = canonical(body)
        for want in self.answers(data, **params):
            if got["image"] == want["image"] and got["detections"] == want["detections"]:
                return None
        w = self.answer(data, 1, **params)
        if got["image"] != w["image"]:
            return f"image {got['image']} != {w['image']}"
        rows = [i for i, (a, b) in enumerate(zip(got["detections"], w["detections"], strict=False)) if a != b]
        first = rows[0] if rows else min(len(got["detections"]), len(w["detections"]))
        return (
            f"{len(got['detections'])} detections, in-process {len(w['detections'])}; {len(rows)} rows differ, "
            f"first at {first}: {got['detections'][first : first + 1]} vs {w['detections'][first : first + 1]}"
        )

    def check(self, body: dict, data: bytes, **params) -> None:
        why = self.why_not(body, data, **params)
        assert why is None, why


@contextmanager
def fake_torchserve(
    handler: type[http.server.BaseHTTPRequestHandler], where: Path
) -> Iterator[tuple[str, Path]]:
    """A loopback HTTP server answering with ``handler`` in a thread, for client tests: (its URL, a
    TorchServe-style key file under ``where``); shut down at exit."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    keys = where / "key_file.json"
    keys.write_text(json.dumps({k: {"key": "k"} for k in ("inference", "management", "API")}))
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", keys
    finally:
        srv.shutdown()
