"""Export: script and trace save, reload without effdet, and match eager effdet."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from export.core import ExportError, build_eager, load_weights
from export.formats import export
from tests.helpers import run_without_training_stack
from train.config import build_config, model_card
from train.module import EffDetModule

# Runs where effdet, timm and Lightning cannot be imported: TorchScript alone must load the model.
LOAD_SCRIPTED = """
    model = torch.jit.load(sys.argv[1], map_location="cpu").eval()
    size = json.loads(sys.argv[2])
    cls, box = model(torch.zeros(1, 3, *size))
    print(json.dumps({"levels": len(cls), "cls": list(cls[0].shape), "box": list(box[0].shape)}))
"""


def make_run(tmp: Path, num_classes: int, image_size: int, seed: int = 0) -> Path:
    """A run directory with a checkpoint of the shape Lightning writes and its model.json."""
    torch.manual_seed(seed)
    cfg = build_config("small", num_classes, image_size)
    classes = [f"c{i}" for i in range(num_classes)]
    module = EffDetModule(cfg, classes)
    run = tmp / f"run_{num_classes}_{image_size}"
    run.mkdir()
    torch.save(
        {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, run / "best.ckpt"
    )
    model_card(run.name, cfg, classes).save(run / "model.json")
    return run


@pytest.mark.compile
@pytest.mark.parametrize(
    "method, num_classes, image_size",
    # two input sizes, both small: each case exports, checks parity twice and loads the file in a fresh interpreter
    [("script", 1, 128), ("script", 4, 256), ("trace", 1, 128), ("trace", 4, 128)],
)
def test_export_saves_reloads_without_effdet_and_matches_eager(tmp_path, method, num_classes, image_size):
    run = make_run(tmp_path, num_classes, image_size)
    card = export(run / "best.ckpt", run / "export", method=method)
    e = card.export
    assert e["method"] == method and e["parity"]["max_abs_diff"] <= 1e-4
    assert e["parity"]["outputs_checked"] == 2 * 2 * 5  # 2 batches x (class + box) x 5 levels
    pt = run / "export" / "model.pt"
    assert e["sha256"] and e["bytes"] == pt.stat().st_size

    # independent parity check: eager effdet vs the reloaded file on a fresh input
    eager = build_eager(card, load_weights(run / "best.ckpt", card))
    loaded = torch.jit.load(str(pt)).eval()
    x = torch.randn(3, 3, image_size, image_size)
    with torch.no_grad():
        ref, got = eager(x), loaded(x)
    for r, g in zip([*ref[0], *ref[1]], [*got[0], *got[1]], strict=True):
        assert (r - g).abs().max() <= 1e-4

    shapes = run_without_training_stack(LOAD_SCRIPTED, str(pt), json.dumps([image_size, image_size]))
    assert shapes["levels"] == 5
    assert shapes["cls"] == [1, 9 * num_classes, image_size // 8, image_size // 8]
    assert shapes["box"] == [1, 36, image_size // 8, image_size // 8]

    written = json.loads((run / "export" / "model.json").read_text())
    assert written["export"]["sha256"] == e["sha256"] and written["classes"] == list(card.classes)
    names = json.loads((run / "export" / "index_to_name.json").read_text())
    assert names == {str(i + 1): f"c{i}" for i in range(num_classes)}


@pytest.mark.compile
def test_freeze_option_still_matches(tmp_path):
    run = make_run(tmp_path, 2, 128)
    card = export(run / "best.ckpt", run / "export", freeze=True)
    assert card.export["frozen"] and card.export["parity"]["max_abs_diff"] <= 1e-4


def test_export_of_a_real_training_run(exported):
    card = json.loads((exported / "model.json").read_text())
    assert card["export"]["method"] == "script" and card["export"]["parity"]["max_abs_diff"] <= 1e-4
    assert card["metrics"] and card["provenance"]["steps"] == 3


@pytest.mark.parametrize("field, other", [("num_classes", 3), ("image_size", 384)])
def test_checkpoint_from_another_config_is_refused_clearly(tmp_path, field, other):
    run = make_run(tmp_path, 1, 256)
    mismatched = make_run(
        tmp_path, other if field == "num_classes" else 1, other if field == "image_size" else 256
    )
    with pytest.raises(ExportError, match=rf"trained with {field}=.* but model.json says {field}="):
        export(mismatched / "best.ckpt", tmp_path / "out", card_dir=run)


def test_raw_state_dict_of_another_class_count_is_refused_clearly(tmp_path):
    run = make_run(tmp_path, 1, 256)
    other = make_run(tmp_path, 3, 256)
    state = torch.load(other / "best.ckpt", weights_only=False)["state_dict"]
    torch.save(state, tmp_path / "raw.ckpt")
    with pytest.raises(ExportError, match="does not fit the model.json network"):
        export(tmp_path / "raw.ckpt", tmp_path / "out", card_dir=run)


@pytest.mark.compile
def test_cli_reports_figures(tmp_path):
    run = make_run(tmp_path, 1, 256)
    proc = subprocess.run(
        [sys.executable, "-m", "export", str(run / "best.ckpt"), "--method", "trace"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "parity vs eager effdet: max |diff|" in proc.stdout and "MB, load" in proc.stdout
    assert "warning from torch.jit.trace" in proc.stdout  # the trace warnings are shown and explained
