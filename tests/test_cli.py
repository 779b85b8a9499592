"""The command lines as users type them: what they print and what they write."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import tempfile
import uuid
import zipfile
from pathlib import Path

import psutil
import pytest
import requests
import yaml
from PIL import Image

from handler.config import MAX_BATCH_SIZE
from scripts.paths import ROOT
from scripts.serve import Server
from train.data import check_records, load_coco


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


def test_no_batch_delay_is_written_as_one_ms():
    """TorchServe takes an archive's maxBatchDelay 0 as unset and waits 100 ms: 0 must reach it as 1."""
    from scripts.settings import ModelConfig

    assert ModelConfig(batch_size=8, max_batch_delay=0).to_yaml()["maxBatchDelay"] == 1
    assert ModelConfig(max_batch_delay=7).to_yaml()["maxBatchDelay"] == 7


def in_process(main, *args: str, capsys) -> tuple[int, str]:
    """(exit code, stderr) of a command line's ``main`` run in this process."""
    try:
        code = main(list(args)) or 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def test_archive_cli_refuses_a_bad_device_list(exported, tmp_path, capsys):
    from scripts.archive import main

    code, err = in_process(
        main, str(exported), "--device-ids", "zero", "--model-store", str(tmp_path), capsys=capsys
    )
    assert code == 2 and "--device-ids" in err
    assert not list(tmp_path.iterdir())


@pytest.mark.compile
def test_export_cli_default_method(trained_run, tmp_path):
    """``python -m export CKPT --out DIR``: TorchScript by default, parity printed, the three files written."""
    out = tmp_path / "export"
    r = run("-m", "export", str(trained_run / "best.ckpt"), "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"[export] TorchScript, script: {out / 'model.pt'}" in r.stdout
    assert "[export] parity vs eager effdet: max |diff| = " in r.stdout
    assert sorted(p.name for p in out.iterdir()) == ["index_to_name.json", "model.json", "model.pt"]
    card = json.loads((out / "model.json").read_text())
    assert card["export"]["method"] == "script" and not card["export"]["frozen"]
    assert card["export"]["parity"]["max_abs_diff"] <= card["export"]["parity"]["tolerance"]
    names = json.loads((out / "index_to_name.json").read_text())
    assert names == {str(i + 1): n for i, n in enumerate(card["classes"])}


def test_export_cli_refuses_a_missing_checkpoint(tmp_path, capsys):
    from export.__main__ import main

    code, err = in_process(main, str(tmp_path / "nope.ckpt"), capsys=capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("export failed: ") and "not found" in last, err
    assert not (tmp_path / "export").exists()


@pytest.mark.server
def test_serve_stop_cli(tmp_path, model_store):
    """``python -m scripts.serve stop --workdir W`` stops the TorchServe running there and says so.

    W is a long path: where the workers' Unix sockets went under it, past the 107 bytes a socket
    path may hold, every worker died at start ("AF_UNIX path too long") and the model never came up.
    """
    workdir = tmp_path / ("a-deeply-nested-working-directory-" * 3) / "ts"
    srv = Server(workdir, model_store, free_ports=True)
    assert len(str(workdir / "tmp" / ".ts.sock.9000")) > 107
    srv.start(["tiny=tiny.mar"], timeout=120)
    try:
        assert len(str(srv.tmp / ".ts.sock.65535")) <= 107 and srv.tmp.stat().st_mode & 0o077 == 0
        pid = int(srv.pid_file.read_text())
        assert psutil.pid_exists(pid)
        r = run("-m", "scripts.serve", "stop", "--workdir", str(srv.workdir))
        assert r.returncode == 0 and r.stdout.strip() == "TorchServe stopped", r.stdout + r.stderr
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{srv.inference_url}/ping", timeout=5)
    finally:
        srv.stop()
    assert not srv.tmp.exists()


def test_archive_cli_names_what_is_missing(tmp_path, capsys):
    from scripts.archive import main

    code, err = in_process(
        main, str(tmp_path / "no_export"), "--model-store", str(tmp_path / "store"), capsys=capsys
    )
    assert code == 2, err
    assert (
        err.strip()
        == f"archive failed: {tmp_path / 'no_export' / 'model.pt'} missing: run `python -m export` first"
    )


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--batch-size", "-1"], f"batch_size must be in [1, {MAX_BATCH_SIZE}], got -1"),
        (["--batch-size", str(MAX_BATCH_SIZE + 1)], "(the handler refuses more at load)"),
        (["--warmup-seconds", "0"], "warmup_seconds must be a number > 0, got 0.0"),
        (["--max-batch-delay", "-5"], "max_batch_delay (ms) must be in [0, 60000], got -5"),
        (["--min-workers", "0"], "workers"),
        (["--min-workers", "3", "--max-workers", "2"], "min_workers 3 > max_workers 2"),
        (["--score-threshold", "1.5"], "score_threshold must be in [0, 1], got 1.5"),
        (["--name", "../x"], "model name"),
    ],
)
def test_archive_cli_refuses_values_torchserve_would_store(exported, tmp_path, flags, message, capsys):
    """Refused with one line before the archiver runs: nothing is written."""
    from scripts.archive import main

    code, err = in_process(
        main, str(exported), "--model-store", str(tmp_path / "store"), *flags, capsys=capsys
    )
    assert code == 2 and err.startswith("archive failed: ") and message in err, err
    assert not (tmp_path / "store").exists() or not list((tmp_path / "store").iterdir())


@pytest.mark.train
@pytest.mark.server
@pytest.mark.timeout(900)
def test_demo_runs_end_to_end(tmp_path):
    """``make demo``'s recipe, ``python -m scripts.demo``, with tiny settings, its outputs in tmp_path.

    The demo strings the whole chain together, so a regression in how it reads what one step
    returns (it once read the model card as a dict) slips past the tests of each step. Asserted:
    what it prints at each step, the picture, the scaling under traffic with every request
    answered 200 and none retried (as the README says), and that the repository's runs/ and
    model_store/ get nothing.
    """
    from tests.doc_commands import Command, make_recipe

    module, *argv = make_recipe(Command("Makefile", 0, "make demo NAME=x", "shell"))
    assert (module, argv) == ("scripts.demo", ["--name", "x"]), "make demo runs something else"
    name = f"demo_{uuid.uuid4().hex[:8]}"
    data, runs, store = tmp_path / "data", tmp_path / "runs", tmp_path / "model_store"
    cmd = [sys.executable, "-m", module, "--name", name, "--epochs", "1", "--train-images", "8", "--val-images", "4",
           "--image-size", "128", "--data", str(data), "--runs", str(runs), "--model-store", str(store)]  # fmt: skip
    demo = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = demo.communicate(timeout=840)
    except subprocess.TimeoutExpired:
        demo.terminate()  # SIGTERM: the demo stops its TorchServe on the way out
        out, err = demo.communicate(timeout=60)
        pytest.fail(f"the demo ran past 840 s\n{out[-3000:]}\n{err[-3000:]}")
    assert demo.returncode == 0, f"{out[-3000:]}\n{err[-3000:]}"

    assert re.search(r"val mAP@\.5 after training: \d\.\d{3}\n", out), out[-3000:]
    assert re.search(r"parity max \|diff\| \S+, \d+\.\d MB\n", out), out[-3000:]
    assert f"wrote {store / name}.mar" in out
    served = re.search(r"^served over HTTP : mAP@\[\.5:\.95\] (\d\.\d{4})  mAP@\.5 (\d\.\d{4})$", out, re.M)
    local = re.search(r"^in-process       : mAP@\[\.5:\.95\] (\d\.\d{4})  mAP@\.5 (\d\.\d{4})$", out, re.M)
    assert served and local and served.groups() == local.groups(), out[-3000:]
    assert "served == in-process" in out

    picture = runs / name / "demo.png"
    assert re.search(rf"^\d+ boxes drawn on {re.escape(str(picture))}$", out, re.M), out[-3000:]
    first = check_records(load_coco(data / "val.json"), name="val").records[0]
    with Image.open(picture) as drawn, Image.open(first.image) as original:
        assert drawn.format == "PNG" and drawn.size == original.size
    size = json.loads((runs / name / "export" / "model.json").read_text())["preprocessing"]["size"]
    assert size == [128, 128], size  # --image-size reached the training and the export

    scaled = re.findall(
        r"^scaled (\d+) -> (\d+) \((\w+), [\d.]+ s\): version (\S+), workers now (\d+)$", out, re.M
    )
    assert scaled == [("1", "2", "scale", "1.0", "2"), ("2", "1", "switch", "1.0-twin", "1")], out[-3000:]
    summary = ast.literal_eval(re.search(r"^requests during scaling: (\{.*\})$", out, re.M)[1])
    assert summary["requests"] > 0 and summary["by_status"] == {"200": summary["requests"]}, summary
    assert summary["unanswered"] == 0
    assert summary["retried_requests"] == 0 and summary["retries"] == {}, summary  # "none retried"
    assert f"artefacts in {runs / name}" in out

    assert sorted(p.name for p in store.iterdir()) == [f"{name}.mar"]  # the twin archive deleted
    assert not (ROOT / "runs" / name).exists() and not list((ROOT / "model_store").glob(f"{name}*"))
