"""The third export format: ONNX (``model.onnx``) run by ONNX Runtime, beside TorchScript.

The module exports the conftest's trained run once, through the real CLI, and every test shares
that file. Each test says which broken product it would catch.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import onnx
import pytest
import torch

from export.__main__ import main as export_main
from export.core import ExportError, build_eager, load_weights
from export.onnx import FILE, to_onnx
from handler.card import ModelCard
from handler.config import HandlerConfig
from handler.detector import Detector
from handler.network import load_network
from handler.onnx_network import OnnxNetwork
from scripts.archive import archive
from scripts.paths import ROOT
from scripts.settings import ModelConfig
from tests.helpers import (
    Reference,
    TwoConvs,
    WithOpaqueOp,
    close_detections,
    count_matched,
    run_without_training_stack,
)

TOLERANCE = 1e-4  # the fp32 parity gate of every format


@pytest.fixture(scope="module")
def onnx_cli(onnx_run) -> tuple[Path, str]:
    """``python -m export CKPT --format onnx`` on the shared trained run: (export dir, CLI stdout)."""
    return onnx_run


@pytest.fixture(scope="module")
def onnx_dir(onnx_cli) -> Path:
    return onnx_cli[0]


@pytest.fixture(scope="module")
def eager(trained_run):
    card = ModelCard.load(trained_run)
    return build_eager(card, load_weights(trained_run / "best.ckpt", card))


# -- export ------------------------------------------------------------------------------------------
def test_cli_writes_a_checked_file_with_named_outputs_and_a_dynamic_batch(onnx_cli):
    """Catches: an export that skips its parity gate, writes extra files, or pins the batch size."""
    out, stdout = onnx_cli
    assert sorted(p.name for p in out.iterdir()) == ["index_to_name.json", "model.json", FILE]
    e = json.loads((out / "model.json").read_text())["export"]
    assert (e["format"], e["precision"], e["file"]) == ("onnx", "fp32", FILE)
    assert e["parity"]["tolerance"] == TOLERANCE and e["parity"]["max_abs_diff"] <= TOLERANCE
    assert e["parity"]["outputs_checked"] == 2 * 2 * 5  # batches 1 and 3 x (class + box) x 5 levels
    assert e["bytes"] == (out / FILE).stat().st_size and e["onnxruntime"]
    assert "ONNX Runtime" in stdout and "parity vs eager effdet" in stdout
    model = onnx.load(str(out / FILE))
    onnx.checker.check_model(model)
    assert [o.name for o in model.graph.output] == [f"cls_l{i}" for i in range(3, 8)] + [
        f"box_l{i}" for i in range(3, 8)
    ]
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [
        3,
        *ModelCard.load(out).preprocessing.size,
    ]


def test_network_matches_eager_and_torchscript_at_any_batch(onnx_dir, exported, eager):
    """Independent of the export's own check: fresh inputs, a batch size the export never ran.
    Catches: a file specialised to the example batch, or outputs in another order."""
    net = load_network(onnx_dir / FILE)
    script = load_network(exported / "model.pt")
    size = ModelCard.load(onnx_dir).preprocessing.size
    for batch in (1, 4):
        x = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            ref, got, ts = eager(x), net(x), script(x)
        assert len(got[0]) == len(got[1]) == 5
        for r, g, t in zip([*ref[0], *ref[1]], [*got[0], *got[1]], [*ts[0], *ts[1]], strict=True):
            assert g.shape == r.shape and g.shape[0] == batch
            assert (r - g).abs().max() <= TOLERANCE and (t - g).abs().max() <= TOLERANCE


def test_network_refuses_inputs_it_cannot_take(onnx_dir):
    """Catches: a wrong-sized batch reaching ONNX Runtime (which would fail deep inside, or run a
    network whose BiFPN was built for another size)."""
    net = OnnxNetwork(onnx_dir / FILE, torch.device("cpu"), torch.float32)
    h, w = net.image_size
    for bad in (
        torch.zeros(1, 3, h + 64, w),
        torch.zeros(1, 3, h, w, dtype=torch.float16),
        torch.zeros(3, h, w),
    ):
        with pytest.raises(ValueError, match="takes"):
            net(bad)
    with pytest.raises(ValueError, match="runs in fp32"):
        load_network(onnx_dir / FILE, "cpu", torch.float16)


def test_failed_parity_or_an_unexportable_op_leaves_nothing_behind(tmp_path):
    """Catches: a file written before its check passed, and an export failure that names nothing."""
    torch.manual_seed(0)
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="ONNX network .* differs from eager effdet"):
        to_onnx(TwoConvs().eval(), TwoConvs().eval(), out, (16, 16), range(3, 4))
    assert list(out.iterdir()) == []
    with pytest.raises(ExportError, match="cannot export the network: .*effdet_serve_test"):
        to_onnx(WithOpaqueOp().eval(), TwoConvs().eval(), out, (16, 16), range(3, 4))
    assert list(out.iterdir()) == []


def test_cli_refuses_options_of_other_formats(trained_run, tmp_path, capsys):
    """Catches: a flag silently ignored (the user believes the file was frozen or compiled for CUDA)."""
    for flag in (["--freeze"], ["--device", "cpu"], ["--method", "trace"]):
        with pytest.raises(SystemExit) as stop:
            export_main(
                [str(trained_run / "best.ckpt"), "--format", "onnx", "--out", str(tmp_path / "o"), *flag]
            )
        err = capsys.readouterr().err
        assert stop.value.code == 2 and "the ONNX Runtime export takes no options" in err, err
    assert not (tmp_path / "o").exists()


# Runs where effdet, timm, Lightning, train and export cannot be imported: the serving core alone.
LOAD = """
    from handler.detector import Detector
    det = Detector(sys.argv[1])
    cls, box = det.forward(torch.zeros(2, 3, *det.geometry.size))
    print(json.dumps({"levels": len(cls), "cls": list(cls[0].shape), "format": det.format.name}))
"""


def test_network_loads_without_the_training_stack_and_says_when_onnxruntime_is_missing(onnx_dir):
    """Catches: the serving path importing effdet/timm/Lightning, and a worker without onnxruntime
    failing with a traceback instead of one line that says what to install."""
    got = run_without_training_stack(LOAD, str(onnx_dir / FILE))
    card = ModelCard.load(onnx_dir)
    side = card.preprocessing.size[0] // 8
    assert got == {"levels": 5, "cls": [2, 9 * card.num_classes, side, side], "format": "onnx"}
    script = (
        "import sys\nsys.modules['onnxruntime'] = None\n"
        "from handler.detector import Detector\nDetector(sys.argv[1])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(onnx_dir / FILE)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0
    assert last == (
        "RuntimeError: model.onnx is an ONNX network and this Python has no onnxruntime: "
        "pip install onnxruntime (onnxruntime-gpu on a CUDA machine) where the workers run"
    )


# -- the archive and the served answers --------------------------------------------------------------
def test_archive_refuses_fp16_workers(onnx_dir, tmp_path):
    """Catches: an archive whose GPU workers would be asked for fp16 of an fp32-only network."""
    with pytest.raises(ValueError, match="ONNX Runtime networks are served in fp32 here, not fp16"):
        archive(
            onnx_dir,
            "x",
            "1.0",
            tmp_path,
            ModelConfig(device_type="gpu", handler=HandlerConfig(precision="fp16")),
        )
    assert not list(tmp_path.glob("*.mar"))


def test_served_onnx_answers_as_in_process_and_as_torchscript(
    exported, onnx_dir, val_images, shared_server, tmp_path
):
    """The shared TorchServe (workers unable to import effdet/timm/Lightning/train/export) serves both
    formats; 12 requests from 4 threads so that batches of two form. Catches: an archive without the
    network file or with the wrong serializedFile, a handler that cannot run ONNX or batches it
    wrongly, and answers that differ from the same network in this process (exactly, at the served
    batch sizes) or from TorchScript beyond near-ties."""
    cfg = ModelConfig(batch_size=2, max_batch_delay=200, handler=HandlerConfig(score_threshold=0.0))
    mars = [
        archive(exported, "onnx_ts", "1.0", tmp_path, cfg),
        archive(onnx_dir, "onnx_onnx", "1.0", tmp_path, cfg),
    ]
    with zipfile.ZipFile(mars[1]) as z:
        assert FILE in z.namelist() and "model.pt" not in z.namelist()
        assert json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]["serializedFile"] == FILE
        assert z.read(FILE) == (onnx_dir / FILE).read_bytes()
    local = Reference(Detector(onnx_dir / FILE), batch_size=2)
    same = close_detections(3e-5, 0.05)
    with shared_server.lease("onnx_ts", "onnx_onnx") as srv:
        client = srv.client()
        for mar in mars:
            r = client.register(srv.add(mar), initial_workers=1)
            assert r.status_code == 200, r.text
        sent = [(m, img) for img in val_images[:6] for m in ("onnx_onnx", "onnx_ts")]
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda job: client.predict(job[0], job[1], score_threshold=0.0), sent))
        compared = confident_seen = 0
        for img, a, s in zip(val_images[:6], got[::2], got[1::2], strict=True):
            assert a.status_code == s.status_code == 200, (a.text, s.text)
            a, s = a.json(), s.json()
            assert a["image"] == s["image"] and a["model"]["name"] == "onnx_onnx"
            local.check(a, img, score_threshold=0.0)
            assert len(a["detections"]) == len(s["detections"]) > 0
            assert count_matched(a["detections"], s["detections"], same) >= len(a["detections"]) - 2
            confident = [d for d in s["detections"] if d["score"] >= 0.3]  # every one, found in place
            near = close_detections(1e-4, 0.5)
            assert count_matched(confident, a["detections"], near) == len(confident), (confident, a)
            confident_seen += len(confident)
            compared += len(a["detections"])
        assert compared >= 6 and confident_seen > 0, (compared, confident_seen)
        log = (srv.server.workdir / "logs" / "model_log.log").read_text(errors="replace")
        batches = sum(
            1
            for line in log.splitlines()
            if "-onnx_onnx_1.0-stdout" in line and "Backend received inference" in line
        )
        assert batches < 6, f"{batches} batches for 6 requests: ONNX never served a batch of two"
        pids = {w["pid"] for m in ("onnx_ts", "onnx_onnx") for e in client.describe(m) for w in e["workers"]}
        assert pids and pids <= srv.blocked_pids(), "the block was not active in the serving workers"
        assert not srv.blocked_imports(pids), "something in the serving path wanted the training stack"
