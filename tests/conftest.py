"""Shared fixtures and the rules every test runs under.

Fixtures: a small synthetic dataset, a briefly trained run, its TorchScript export and archive,
its AOTInductor package, and one TorchServe for the whole run. Everything is real and made here:
the dataset by ``train.synthetic``, the checkpoint by ``python -m train``'s own ``main``, the
TorchScript by ``export``, the .mar by the real torch-model-archiver, the package by the
documented ``python -m export ... --format aoti``, the server by ``torchserve --start`` on free
loopback ports. Built fixtures are kept in pytest's cache directory, keyed on what produced them
(``tests.helpers.FixtureCache``): a second run with the same sources builds nothing again.

Rules (hooks below):

- markers say what a test needs: ``server`` (a real TorchServe), ``train`` (training beyond the
  shared fixture's few steps), ``compile`` (an export of its own, or the shared ONNX / AOTInductor
  one), ``soak``. A test that uses a fixture decorated with ``tests.helpers.starts_torchserve``
  (or ``marks_users``) gets its marker automatically; a test that starts a TorchServe without the
  ``server`` marker fails, so ``make test-fast`` (``-m "not server and not train and not compile
  and not soak"``) can trust them;
- a test that fails (a ``pytest-timeout`` timeout included) while TorchServe servers of this
  process run gets their log tails attached to its report.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# The repo root on sys.path first (pytest puts only tests/ there), then the one ROOT the project defines.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts.paths import ROOT  # noqa: E402
from scripts.serve import Server  # noqa: E402
from tests import helpers  # noqa: E402
from tests.helpers import FixtureCache, SharedServer, marks_users, starts_torchserve  # noqa: E402

os.environ.setdefault("PYTHONPATH", str(ROOT))

# Intra-op threads, the same in this process and in every process it starts (TorchServe workers
# whose handler sets none, the CLIs: torch reads OMP_NUM_THREADS when it starts), so in-process
# references and served answers agree to the last float bit (a compiled network's sums depend on
# the thread count). One test at a time: two. Under pytest-xdist (``make test``, a process per
# core): one, since N processes of two threads each on N cores spin against each other (the whole
# suite on 2 cores: 11:12 with two threads per process, 8:29 with one; 11:06 serial).
TORCH_THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1))
os.environ["OMP_NUM_THREADS"] = str(TORCH_THREADS)
torch.set_num_threads(TORCH_THREADS)

# The shared fixture model: the small preset at its smallest input size, trained for a few steps.
FIXTURE_IMAGE_SIZE = 128
FIXTURE_STEPS = 3
# The class head scaled after training so that scores differ from anchor to anchor (see
# helpers.spread_class_scores): served answers then compare with in-process ones row for row.
SCORE_SPREAD = 300.0


# -- markers and the rules they come with ---------------------------------------------------------------
def pytest_collection_modifyitems(config, items):
    """Give each test the markers of the fixtures it uses (``helpers.marks_users``)."""
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        if info is None:
            continue
        for name in item.fixturenames:
            for fixture_def in info.name2fixturedefs.get(name, ()):
                for mark in getattr(fixture_def.func, "_marks_users", ()):
                    if item.get_closest_marker(mark) is None:
                        item.add_marker(mark)


_current: list[pytest.Item] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _current[:] = [item]
    yield
    _current[:] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing test's report carries the log tails of the TorchServe servers running at that moment."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for srv in list(helpers.LIVE_SERVERS):
            report.sections.append((f"TorchServe {srv.workdir}", srv.log_tail(60)))


_start, _stop = Server.start, Server.stop


def _tracked_start(self, *args, **kwargs):
    item = _current[0] if _current else None
    if item is not None and item.get_closest_marker("server") is None:
        raise pytest.UsageError(
            f"{item.nodeid} starts a TorchServe but is not marked `server`: add @pytest.mark.server, "
            "or decorate the fixture that starts it with tests.helpers.starts_torchserve"
        )
    helpers.LIVE_SERVERS.append(self)
    return _start(self, *args, **kwargs)


def _tracked_stop(self, *args, **kwargs):
    try:
        return _stop(self, *args, **kwargs)
    finally:
        if self in helpers.LIVE_SERVERS:
            helpers.LIVE_SERVERS.remove(self)


Server.start, Server.stop = _tracked_start, _tracked_stop


# -- built fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def fixture_cache(request, tmp_path_factory) -> FixtureCache:
    cache = getattr(request.config, "cache", None)
    use = cache is not None and os.environ.get("EFFDET_TEST_CACHE", "1") != "0"
    root = Path(cache.mkdir("effdet-serve-fixtures")) if use else None
    return FixtureCache(root, tmp_path_factory.mktemp("built"))


@pytest.fixture(scope="session")
def synthetic_dir(fixture_cache) -> Path:
    """24 train + 8 val synthetic images in COCO format (3 classes, some negatives)."""
    from train import synthetic

    key = {"train": 24, "val": 8, "seed": 1}
    return fixture_cache.get("synthetic", key, lambda d: synthetic.generate(d, **key))


@pytest.fixture(scope="session")
def trained_run(synthetic_dir, fixture_cache) -> Path:
    """A run directory (best.ckpt, last.ckpt, model.json) from a few real training steps of the small
    preset at 128x128, its class head then scaled by SCORE_SPREAD in best.ckpt."""
    from train.__main__ import main

    args = ["--data", str(synthetic_dir), "--format", "synthetic", "--model", "small", "--epochs", "1",
            "--max-steps", str(FIXTURE_STEPS), "--batch-size", "4", "--image-size", str(FIXTURE_IMAGE_SIZE)]  # fmt: skip

    def build(out: Path) -> None:
        main([*args, "--out", str(out)])
        helpers.spread_class_scores(out / "best.ckpt", SCORE_SPREAD)

    return fixture_cache.get("run", {"args": args, "spread": SCORE_SPREAD}, build)


@pytest.fixture(scope="session")
def exported(trained_run, fixture_cache) -> Path:
    """The run exported with torch.jit.script: model.pt, model.json, index_to_name.json."""
    from export.formats import export

    def build(out: Path) -> None:
        export(trained_run / "best.ckpt", out)

    return fixture_cache.get("export", {"run": str(trained_run)}, build)


@pytest.fixture(scope="session")
def model_store(exported, fixture_cache) -> Path:
    """A model store holding tiny.mar (batchSize 4) built by the real torch-model-archiver."""
    from scripts.archive import archive
    from scripts.settings import ModelConfig

    def build(store: Path) -> None:
        archive(exported, "tiny", "1.0", store, ModelConfig(batch_size=4, max_batch_delay=50))

    return fixture_cache.get("store", {"export": str(exported), "tiny": "b4 d50"}, build)


# The documented AOTInductor and ONNX lines (README, docs/formats.md), as ``aoti_run`` and
# ``onnx_run`` run them: the checkpoint is the shared run's and the output goes beside it (``--out``).
AOTI_ARGV = ["runs/NAME/best.ckpt", "--format", "aoti"]
ONNX_ARGV = ["runs/NAME/best.ckpt", "--format", "onnx"]


def _format_run(trained_run: Path, fixture_cache, argv: list[str], timeout: float) -> tuple[Path, str]:
    """``python -m export <the shared run's best.ckpt> ARGV --out ...`` in a fresh interpreter, cached:
    (its export directory, the CLI's stdout)."""
    fmt = argv[argv.index("--format") + 1]

    def build(out: Path) -> None:
        cli = [str(trained_run / "best.ckpt"), *argv[1:], "--out", str(out / f"export_{fmt}")]
        proc = subprocess.run([sys.executable, "-m", "export", *cli], cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        (out / "stdout.txt").write_text(proc.stdout)

    out = fixture_cache.get(fmt, {"run": str(trained_run), "argv": argv}, build)
    return out / f"export_{fmt}", (out / "stdout.txt").read_text()


@pytest.fixture(scope="session")
@marks_users("compile")
def aoti_run(trained_run, fixture_cache) -> tuple[Path, str]:
    """The shared run's AOTInductor package from the real CLI (compiling takes minutes on 2 cores)."""
    return _format_run(trained_run, fixture_cache, AOTI_ARGV, timeout=1500)


@pytest.fixture(scope="session")
@marks_users("compile")
def onnx_run(trained_run, fixture_cache) -> tuple[Path, str]:
    """The shared run exported to ONNX by the real CLI."""
    return _format_run(trained_run, fixture_cache, ONNX_ARGV, timeout=900)


@pytest.fixture(scope="session")
def val_images(synthetic_dir) -> list[bytes]:
    return [p.read_bytes() for p in sorted((synthetic_dir / "images").glob("val_*.jpg"))]


@pytest.fixture(scope="session")
def detector(exported):
    """The serving core in this process, on the exported model: the reference for served answers."""
    from handler.detector import Detector

    return Detector(exported / "model.pt")


# -- the run's TorchServe ---------------------------------------------------------------------------------
@pytest.fixture(scope="session")
@starts_torchserve
def shared_server(tmp_path_factory):
    """One TorchServe for the whole run, started empty on first use, stopped at the end; its workers
    cannot import the training stack. Modules lease model names on it: see ``helpers.SharedServer``
    for the contract. Tests that stop, kill or reconfigure a server start their own."""
    where = tmp_path_factory.mktemp("shared")
    store = where / "model_store"
    store.mkdir()
    env = helpers.blocking_env(where)
    with helpers.serving(where / "ts", store, [], extra_env=env) as srv:
        yield SharedServer(srv, where / "marker.log")
