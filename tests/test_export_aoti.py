"""The second export format: torch.export + AOTInductor (``model.pt2``) beside TorchScript (``model.pt``)
(the three formats side by side in the benchmark: test_bench.py).

AOTInductor compiles C++ (2-4 min for the small preset on 2 busy cores), so the module compiles
the conftest's trained run once, through the real CLI, and every test shares that package. The
one other compile is a two-convolution network (~30 s) whose package must fail its parity gate.

Served answers of the two archives are compared up to near-ties: both networks agree to ~5e-6
(well inside the 1e-4 gate), but the barely trained model gives ~100 detections whose scores
tie to 4-5 digits, so a last-bit difference can swap neighbours or the last place.
"""

from __future__ import annotations

import json
import shutil
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from export.__main__ import main as export_main
from export.aoti import PACKAGE, check_aoti_parity, to_aoti
from export.core import ExportError, build_eager, load_weights
from handler.aoti_network import AotiNetwork
from handler.card import ModelCard
from handler.config import HandlerConfig
from handler.detector import Detector
from handler.network import load_network, torchscript_on_purpose
from scripts.archive import archive
from scripts.settings import ModelConfig
from tests.helpers import (
    Reference,
    TwoConvs,
    WithOpaqueOp,
    close_detections,
    count_matched,
    run_without_training_stack,
)

TOLERANCE = 1e-4  # the fp32 parity gate, both formats


@pytest.fixture(scope="module")
def aoti_cli(aoti_run) -> tuple[Path, str]:
    """``python -m export CKPT --format aoti`` on the tiny trained run (conftest's ``aoti_run``, shared
    with the documented commands): (export dir, CLI stdout)."""
    return aoti_run


@pytest.fixture(scope="module")
def aoti_dir(aoti_cli) -> Path:
    return aoti_cli[0]


@pytest.fixture(scope="module")
def eager(trained_run):
    card = ModelCard.load(trained_run)
    return build_eager(card, load_weights(trained_run / "best.ckpt", card))


# -- export ------------------------------------------------------------------------------------------
def test_cli_writes_a_checked_package_and_nothing_else(aoti_cli):
    out, stdout = aoti_cli
    assert sorted(p.name for p in out.iterdir()) == ["index_to_name.json", "model.json", PACKAGE]
    card = json.loads((out / "model.json").read_text())
    e = card["export"]
    assert (e["format"], e["device"], e["precision"], e["file"]) == ("aoti", "cpu", "fp32", PACKAGE)
    assert e["torch"] == torch.__version__ and e["compile_seconds"] > 0
    assert e["parity"]["tolerance"] == TOLERANCE and e["parity"]["max_abs_diff"] <= TOLERANCE
    assert e["parity"]["outputs_checked"] == 2 * 2 * 5  # batches 1 and 3 x (class + box) x 5 levels
    assert e["bytes"] == (out / PACKAGE).stat().st_size
    assert "torch.export + AOTInductor (cpu, fp32)" in stdout and "parity vs eager effdet" in stdout
    assert f"with torch {torch.__version__}" in stdout


def test_package_matches_eager_and_torchscript_at_any_batch(aoti_dir, exported, eager):
    """Independent of the export's own check: fresh inputs, batch sizes the export never ran."""
    pt2 = load_network(aoti_dir / PACKAGE)
    script = load_network(exported / "model.pt")
    size = ModelCard.load(aoti_dir).preprocessing.size
    for batch in (1, 4):
        x = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            ref, got, ts = eager(x), pt2(x), script(x)
        assert len(got[0]) == len(got[1]) == 5
        for r, g, t in zip([*ref[0], *ref[1]], [*got[0], *got[1]], [*ts[0], *ts[1]], strict=True):
            assert g.shape == r.shape and g.shape[0] == batch
            assert (r - g).abs().max() <= TOLERANCE and (t - g).abs().max() <= TOLERANCE


# Runs where effdet, timm, Lightning, train and export cannot be imported: the serving core alone.
LOAD_PACKAGE = """
    from handler.detector import Detector
    det = Detector(sys.argv[1])
    cls, box = det.forward(torch.zeros(2, 3, *det.geometry.size))
    print(json.dumps({"levels": len(cls), "cls": list(cls[0].shape), "box": list(box[0].shape)}))
"""


def test_package_loads_and_runs_without_the_training_stack(aoti_dir):
    got = run_without_training_stack(LOAD_PACKAGE, str(aoti_dir / PACKAGE))
    card = ModelCard.load(aoti_dir)
    side = card.preprocessing.size[0] // 8
    assert got["levels"] == 5 and got["cls"] == [2, 9 * card.num_classes, side, side]
    assert got["box"] == [2, 36, side, side]


def test_package_refuses_inputs_it_was_not_compiled_for(aoti_dir):
    """Compiled code would read a wrong-sized or wrong-typed buffer as raw memory: refused first."""
    net = AotiNetwork(aoti_dir / PACKAGE, torch.device("cpu"), torch.float32)
    h, w = net.image_size
    for bad in (
        torch.zeros(1, 3, h + 64, w),  # another image size
        torch.zeros(1, 3, h, w, dtype=torch.float16),  # another dtype
        torch.zeros(3, h, w),  # no batch dimension
        torch.zeros(1, 3, h, w).expand(net.max_batch + 1, 3, h, w),  # beyond the dynamic batch range
    ):
        with pytest.raises(ValueError, match="takes|compiled for batches"):
            net(bad)
    with pytest.raises(ValueError, match=r"compiled for torch.float32 but torch.float16 was asked for"):
        load_network(aoti_dir / PACKAGE, "cpu", torch.float16)
    with pytest.raises(ValueError, match="unknown network format '.engine'"):
        load_network(aoti_dir / "model.engine")


def test_parity_gate_refuses_a_package_that_differs(aoti_dir, trained_run):
    card = ModelCard.load(trained_run)
    other = build_eager(card, load_weights(trained_run / "best.ckpt", card))
    with torch.no_grad():
        other.class_net.predict.conv_pw.bias.add_(1e-3)  # a 1e-3 shift in every class logit
    with pytest.raises(ExportError, match=r"differs from eager effdet by .* > 0\.0001 \(float32, cpu\)"):
        check_aoti_parity(
            other,
            aoti_dir / PACKAGE,
            card.preprocessing.size,
            torch.device("cpu"),
            torch.float32,
        )


@pytest.mark.compile  # a two-convolution package: ~30 s of C++
def test_failed_parity_leaves_no_package_behind(tmp_path):
    torch.manual_seed(0)
    model, reference = TwoConvs().eval(), TwoConvs().eval()  # different weights: parity must fail
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="differs from eager effdet"):
        to_aoti(model, reference, out, (16, 16), torch.device("cpu"), torch.float32, levels=1)
    assert list(out.iterdir()) == []  # neither model.pt2 nor the staging directory


def test_unsupported_op_is_named_and_nothing_is_written(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ExportError, match=r"unsupported op effdet_serve_test::opaque"):
        to_aoti(
            WithOpaqueOp().eval(), TwoConvs().eval(), out, (16, 16), torch.device("cpu"), torch.float32, 1
        )
    assert not out.exists() or list(out.iterdir()) == []


def test_config_mismatch_is_named_before_compiling(trained_run, tmp_path, capsys):
    card = ModelCard.load(trained_run)
    wider = replace(card, classes=(*card.classes, "x", "y"), effdet_config={**card.effdet_config})
    wider.effdet_config["num_classes"] += 2
    wider.save(tmp_path / "card" / "model.json")
    argv = [str(trained_run / "best.ckpt"), "--format", "aoti", "--device", "cpu"]
    with pytest.raises(SystemExit) as stop:
        export_main([*argv, "--card", str(tmp_path / "card"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert (
        stop.value.code == 2 and "trained with num_classes=" in err and "model.json says num_classes=" in err
    )
    assert not (tmp_path / "out").exists()


def test_cli_refuses_fp16_on_cpu(trained_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        export_main(
            [str(trained_run / "best.ckpt"), "--format", "aoti", "--device", "cpu", "--precision", "fp16"]
            + ["--out", str(tmp_path / "out")]
        )
    assert stop.value.code == 2 and "fp16 package needs --device cuda" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# -- TorchScript's deprecation notice ---------------------------------------------------------------
def test_torchscript_notice_is_kept_out_but_other_warnings_pass(exported):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Detector(exported / "model.pt")
        with torchscript_on_purpose():
            warnings.warn("`torch.jit.load` is deprecated, but as a UserWarning", UserWarning, stacklevel=1)
            warnings.warn("something else is deprecated", FutureWarning, stacklevel=1)
    messages = [(w.category, str(w.message)) for w in caught]
    assert not any("torch.jit.load` is deprecated. Please" in m for _, m in messages), messages
    assert (UserWarning, "`torch.jit.load` is deprecated, but as a UserWarning") in messages
    assert (FutureWarning, "something else is deprecated") in messages
    # outside the block torch still warns as before
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.jit.load(str(exported / "model.pt"))
    assert any("`torch.jit.load` is deprecated" in str(w.message) for w in caught)


# -- the archive and the served answers --------------------------------------------------------------
def test_archive_refuses_a_package_for_another_device(aoti_dir, tmp_path):
    with pytest.raises(ValueError, match="compiled for cpu but the workers run on cuda"):
        archive(aoti_dir, "x", "1.0", tmp_path, ModelConfig(device_type="gpu"))
    assert not list(tmp_path.glob("*.mar"))


def near_tie_mismatches(a: list[dict], b: list[dict], score_tol: float = 3e-5, box_tol: float = 0.05) -> int:
    """Detections of ``a`` without a distinct partner in ``b`` (same class, score and box within tolerance)."""
    return len(a) - count_matched(a, b, close_detections(score_tol, box_tol))


@pytest.mark.server
def test_both_archives_serve_the_same_answers_without_the_training_stack(
    exported, aoti_dir, val_images, shared_server, tmp_path
):
    """The shared TorchServe (workers unable to import effdet/timm/Lightning/train/export) serving both
    formats, 12 requests from 4 threads so that batches of two form (a package compiled for a dynamic
    batch must answer each row of a batch as that row's own)."""
    cfg = ModelConfig(batch_size=2, max_batch_delay=200, handler=HandlerConfig(score_threshold=0.0))
    mars = [
        archive(exported, "fmt_script", "1.0", tmp_path, cfg),
        archive(aoti_dir, "fmt_aoti", "1.0", tmp_path, cfg),
    ]
    with zipfile.ZipFile(mars[1]) as z:
        assert PACKAGE in z.namelist() and "model.pt" not in z.namelist()
        assert json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]["serializedFile"] == PACKAGE
        assert z.read(PACKAGE) == (aoti_dir / PACKAGE).read_bytes()

    local = Reference(Detector(aoti_dir / PACKAGE), batch_size=2)
    with shared_server.lease("fmt_script", "fmt_aoti") as srv:
        client = srv.client()
        for mar in mars:
            r = client.register(srv.add(mar), initial_workers=1)
            assert r.status_code == 200, r.text
        compared = 0
        sent = [(m, img) for img in val_images[:6] for m in ("fmt_aoti", "fmt_script")]
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda job: client.predict(job[0], job[1], score_threshold=0.0), sent))
        for img, a, s in zip(val_images[:6], got[::2], got[1::2], strict=True):
            assert a.status_code == s.status_code == 200, (a.text, s.text)
            a, s = a.json(), s.json()
            assert a["image"] == s["image"] and a["model"]["name"] == "fmt_aoti"
            assert len(a["detections"]) == len(s["detections"]) > 0
            assert near_tie_mismatches(a["detections"], s["detections"]) <= 2
            scores_a = [d["score"] for d in a["detections"]]
            scores_s = [d["score"] for d in s["detections"]]
            assert all(abs(p - q) <= 3e-5 for p, q in zip(scores_a, scores_s, strict=True))
            # and the served package answers exactly as the same package does in this process
            local.check(a, img, score_threshold=0.0)
            compared += len(a["detections"])
        assert compared >= 6
        log = (srv.server.workdir / "logs" / "model_log.log").read_text(errors="replace")
        batches = sum(
            1
            for line in log.splitlines()
            if "-fmt_aoti_1.0-stdout" in line and "Backend received inference" in line
        )
        assert batches < 6, f"{batches} batches for 6 requests: the package never served a batch of two"
        pids = {
            w["pid"] for m in ("fmt_script", "fmt_aoti") for e in client.describe(m) for w in e["workers"]
        }
        assert "`torch.jit.load` is deprecated" not in log  # the notice stays out of the server log
        assert pids and pids <= srv.blocked_pids(), "the block was not active in the serving workers"
        assert not srv.blocked_imports(pids), "something in the serving path wanted the training stack"


def test_bench_compiles_no_package_it_cannot_trace_back_to_the_checkpoint(
    exported, aoti_dir, trained_run, tmp_path
):
    """A package is reused only when compiled from the export's checkpoint, after it, for this device
    and precision; an export whose checkpoint is gone is refused by name before anything compiles."""
    from scripts.bench.workload import _checkpoint_of, _made_from

    ckpt = _checkpoint_of(exported, "aoti")
    assert ckpt.resolve() == (trained_run / "best.ckpt").resolve()
    cpu = torch.device("cpu")
    assert _made_from(aoti_dir / PACKAGE, ckpt, cpu, "fp32")
    assert not _made_from(aoti_dir / PACKAGE, ckpt, cpu, "fp16")
    assert not _made_from(aoti_dir / PACKAGE, ckpt, torch.device("cuda"), "fp32")
    other = tmp_path / "other.ckpt"
    shutil.copy(ckpt, other)
    assert not _made_from(
        aoti_dir / PACKAGE, other, cpu, "fp32"
    )  # another checkpoint (and newer than the package)
    lost = tmp_path / "run" / "export"
    shutil.copytree(exported, lost)
    card = json.loads((lost / "model.json").read_text())
    card["export"]["checkpoint"] = str(tmp_path / "gone.ckpt")
    (lost / "model.json").write_text(json.dumps(card))
    with pytest.raises(SystemExit, match="no checkpoint for .*gone.ckpt"):
        _checkpoint_of(lost, "aoti")
