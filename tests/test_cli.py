"""The command lines as users type them: what they print and what they write."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import uuid
import zipfile
from pathlib import Path

import pytest
import yaml

from scripts.paths import ROOT

pytestmark = pytest.mark.slow


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_archive_cli_writes_the_settings_it_was_given(exported, tmp_path):
    """The README's archive command, plus --device-ids, writes them into the .mar's model-config.yaml."""
    name = f"cli_{uuid.uuid4().hex[:8]}"
    # torch-model-archiver stages in $TMPDIR/<name> and deletes it: a user's folder of that name survives
    users = Path(tempfile.gettempdir()) / name
    users.mkdir()
    (users / "keep.txt").write_text("mine")
    try:
        r = run("-m", "scripts.archive", str(exported), "--name", name, "--version", "2.5",
                "--batch-size", "4", "--max-batch-delay", "20", "--device-ids", "0,1",
                "--model-store", str(tmp_path))  # fmt: skip
        assert r.returncode == 0, r.stderr[-2000:]
        assert (users / "keep.txt").read_text() == "mine", "the archiver deleted a user's folder"
    finally:
        (users / "keep.txt").unlink(missing_ok=True)
        users.rmdir()
    mar = tmp_path / f"{name}.mar"
    assert f"wrote {mar} (" in r.stdout
    with zipfile.ZipFile(mar) as z:
        cfg = yaml.safe_load(z.read("model-config.yaml"))
        manifest = z.read("MAR-INF/MANIFEST.json").decode()
    assert cfg["deviceIds"] == [0, 1]
    assert (cfg["batchSize"], cfg["maxBatchDelay"], cfg["deviceType"]) == (4, 20, "cpu")
    assert '"modelVersion": "2.5"' in manifest


def test_archive_cli_refuses_a_bad_device_list(exported, tmp_path):
    r = run("-m", "scripts.archive", str(exported), "--device-ids", "zero", "--model-store", str(tmp_path))
    assert r.returncode == 2 and "--device-ids" in r.stderr
    assert not list(tmp_path.iterdir())
