"""Training: presets, head init, negatives, loss going down, checkpoints, DDP on CPU, weights loading."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
import time

import pytest
import pytorch_lightning as pl
import timm
import torch
from effdet import DetBenchTrain

from scripts.paths import ROOT
from train.__main__ import main as train_main
from train.config import SEED_CONFIG, build_config, create_effdet, num_anchors
from train.data import check_records, load_coco
from train.datamodule import DetectionDataModule, DetectionDataset, collate
from train.module import EffDetModule, warmup_cosine


def test_seed_preset_is_the_seed_config_key_for_key():
    cfg = build_config("tf_efficientnetv2_l_512", num_classes=1)
    assert cfg == SEED_CONFIG
    assert build_config("seed", num_classes=1) == cfg  # the alias
    assert cfg["max_det_per_image"] == 100 and cfg["backbone_name"] == "tf_efficientnetv2_l"


def test_effdet_names_and_small_preset_build():
    d0 = build_config("efficientdet_d0", num_classes=5, image_size=256)
    assert (
        d0["backbone_name"] == "efficientnet_b0" and d0["num_classes"] == 5 and d0["image_size"] == [256, 256]
    )
    small = build_config("small", num_classes=3)
    assert small["backbone_name"] == "mobilenetv3_large_100" and small["fpn_cell_repeats"] == 2
    with pytest.raises(
        ValueError, match="unknown model 'no_such_model': use 'tf_efficientnetv2_l_512', 'small'"
    ):
        build_config("no_such_model", 1)
    with pytest.raises(ValueError, match="multiple of 128"):
        build_config("small", 1, image_size=200)


def test_max_detection_points_fits_the_anchor_budget():
    cfg = build_config("small", num_classes=1, image_size=128)
    assert num_anchors(cfg) == 9 * (16 * 16 + 8 * 8 + 4 * 4 + 2 * 2 + 1)
    assert cfg["max_detection_points"] == num_anchors(cfg) < 5000


def test_class_head_has_prior_bias_init():
    model = create_effdet(build_config("small", num_classes=4))
    bias = model.class_net.predict.conv_pw.bias
    assert torch.allclose(bias, torch.full_like(bias, -math.log((1 - 0.01) / 0.01)))


def test_negative_images_train_through_effdet_labeler(synthetic_dir):
    cfg = build_config("small", num_classes=3, image_size=128)
    bench = DetBenchTrain(create_effdet(cfg)).train()
    val = check_records(load_coco(synthetic_dir / "val.json"))
    from handler.geometry import Geometry

    ds = DetectionDataset(val.records, Geometry(size=tuple(cfg["image_size"])), train=True)
    x, target = ds[0]
    target = {**target, "boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)}
    images, batch = collate([(x, target), (x, target)])
    assert batch["cls"].shape == (2, 1) and torch.all(batch["cls"] == -1)
    out = bench(images, batch)
    assert torch.isfinite(out["loss"]) and out["box_loss"] == 0 and out["class_loss"] > 0


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 10, 100) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(100, 10, 100) == pytest.approx(0.05)
    assert 0.05 < warmup_cosine(55, 10, 100) < 1.0


def test_loss_goes_down_on_synthetic_batch(synthetic_dir):
    torch.manual_seed(0)
    train = check_records(load_coco(synthetic_dir / "train.json"))
    cfg = build_config("small", num_classes=3, image_size=128)
    module = EffDetModule(cfg, train.classes)
    from handler.geometry import Geometry

    ds = DetectionDataset(train.records[:4], Geometry(size=tuple(cfg["image_size"])), train=False)
    images, target = collate([ds[i] for i in range(4)])
    opt = torch.optim.AdamW(module.bench.parameters(), lr=2e-3)
    module.bench.train()
    losses = []
    for _ in range(8):
        loss = module.bench(images, target)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.6 * losses[0], losses


def test_checkpoint_reloads_to_identical_outputs(synthetic_dir, tmp_path):
    train = check_records(load_coco(synthetic_dir / "train.json"))
    val = check_records(load_coco(synthetic_dir / "val.json"))
    cfg = build_config("small", num_classes=3, image_size=128)
    module = EffDetModule(cfg, train.classes, ema_decay=0.9)
    dm = DetectionDataModule(train.records[:8], val.records[:4], module_geometry(cfg), batch_size=4)
    trainer = pl.Trainer(
        max_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(module, datamodule=dm)
    path = tmp_path / "x.ckpt"
    trainer.save_checkpoint(path)
    reloaded = EffDetModule.load_from_checkpoint(path)
    x = torch.randn(2, 3, *cfg["image_size"])
    module.eval()
    reloaded.eval()
    with torch.no_grad():
        a_cls, a_box = module.model(x)
        b_cls, b_box = reloaded.model(x)
    for a, b in zip([*a_cls, *a_box], [*b_cls, *b_box], strict=True):
        assert torch.equal(a, b)
    # the EMA copy is what is validated and exported; it moved away from the raw weights
    state = torch.load(path, weights_only=False)["state_dict"]
    assert any(k.startswith("ema.module.") for k in state)
    raw = module.bench.model.class_net.predict.conv_pw.weight
    assert not torch.equal(raw, module.model.class_net.predict.conv_pw.weight)


def module_geometry(cfg):
    from handler.geometry import Geometry

    return Geometry(size=tuple(cfg["image_size"]))


def test_cli_run_writes_checkpoints_and_model_card(trained_run):
    assert (trained_run / "best.ckpt").is_file() and (trained_run / "last.ckpt").is_file()
    card = json.loads((trained_run / "model.json").read_text())
    assert card["classes"] == ["ellipse", "rectangle", "triangle"]
    assert card["effdet_config"]["num_classes"] == 3
    assert card["preprocessing"]["size"] == card["effdet_config"]["image_size"]
    assert set(card["metrics"]) >= {"val_map", "val_map50"} and card["metrics"]["val_images"] == 8
    assert card["provenance"]["steps"] == 3 and card["provenance"]["torch"] == torch.__version__
    assert card["preprocessing"]["size"] == [128, 128]


def test_cli_refuses_bad_annotations_before_training(tmp_path, capsys):
    (tmp_path / "boxes.csv").write_text("image,xmin,ymin,xmax,ymax,label\nnope.jpg,1,1,9,9,car\n")
    with pytest.raises(SystemExit) as e:
        train_main(["--data", str(tmp_path / "boxes.csv"), "--format", "csv", "--out", str(tmp_path / "run")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "boxes.csv:line 2" in err and "nope.jpg: image file not found" in err
    assert not (tmp_path / "run").exists()


def test_pretrained_backbone_offline_says_to_pass_a_file(monkeypatch):
    """Offline mode as the user sets it: huggingface_hub refuses at once, without touching the network."""
    import huggingface_hub.constants
    import huggingface_hub.errors

    # huggingface_hub reads HF_HUB_OFFLINE at import, which happened long before this test
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="--backbone-weights") as e:
        create_effdet(build_config("small", num_classes=1), pretrained_backbone=True)
    # the hub's own offline refusal (a local-cache miss), not a network timeout
    assert isinstance(e.value.__cause__, huggingface_hub.errors.LocalEntryNotFoundError)


def test_backbone_weights_from_a_local_timm_state_dict(tmp_path):
    torch.manual_seed(3)
    timm_model = timm.create_model("mobilenetv3_large_100", pretrained=False)
    path = tmp_path / "mnv3.pth"
    torch.save(timm_model.state_dict(), path)
    model = create_effdet(build_config("small", num_classes=1), backbone_weights=path)
    assert torch.equal(model.backbone.conv_stem.weight, timm_model.conv_stem.weight)
    torch.save({"unrelated": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="backbone tensors missing"):
        create_effdet(build_config("small", num_classes=1), backbone_weights=tmp_path / "bad.pth")


@pytest.mark.train
@pytest.mark.timeout(600)
def test_ddp_on_cpu_reports_one_map_over_all_val_images(synthetic_dir, tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "train", "--data", str(synthetic_dir), "--format", "synthetic",
        "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", "--epochs", "1",
        "--batch-size", "4", "--image-size", "128", "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    card = json.loads((out / "model.json").read_text())
    assert card["provenance"]["devices"] == 2
    with open(out / "logs" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/map")]
    # one validation during fit (+ the final re-validation of best.ckpt), each over all 8 images once
    assert len(rows) in (1, 2)
    assert all(float(r["val/images"]) == 8 for r in rows)


@pytest.mark.train
@pytest.mark.timeout(900)
def test_interrupted_training_resumes_from_last_ckpt_to_the_same_result(synthetic_dir, tmp_path):
    """A run killed (SIGKILL) in the middle of its second epoch, resumed with ``--resume last``, ends
    where an uninterrupted run ends: same weights, bit for bit.

    Training is seeded, so a resume that silently started again would end with the same weights
    too: the resumed process must say it restored last.ckpt and run only the second epoch. A
    resume that restored the weights but not the optimizer, schedule or data order ends elsewhere;
    so does a last.ckpt written mid-epoch (the kill lands after a step of the second epoch).
    """
    # The subprocesses use this process's thread count: the runs compare bit for bit.
    threads = str(torch.get_num_threads())
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": threads}
    # 24 images in batches of 12: two steps per epoch; validation only after the second epoch
    args = ["--data", str(synthetic_dir), "--format", "synthetic", "--batch-size", "12", "--warmup-steps", "2",
            "--epochs", "2", "--val-every", "2", "--image-size", "128"]  # fmt: skip
    train_main([*args, "--out", str(tmp_path / "straight")])  # uninterrupted, in this process
    cli = [sys.executable, "-m", "train", *args]

    # the progress bar (stdout) shows each step as it ends: kill after the first step of epoch 1
    step = rb"Epoch 1:[^\r\n|]*\|[^|]*\| 1/2"
    crashed = subprocess.Popen([*cli, "--out", str(tmp_path / "split")], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    seen = b""
    try:
        deadline = time.monotonic() + 600
        while not re.search(step, seen) and time.monotonic() < deadline:
            chunk = crashed.stdout.read1(4096)
            if not chunk:
                break
            seen += chunk
    finally:
        crashed.kill()
        crashed.wait(timeout=60)
    assert re.search(step, seen), seen[-2000:].decode(errors="replace")
    last = tmp_path / "split" / "last.ckpt"
    kept = torch.load(last, weights_only=False)["global_step"]
    assert kept == 2, f"last.ckpt holds step {kept}: not the first epoch's end"

    proc = subprocess.run([*cli, "--out", str(tmp_path / "split"), "--resume", "last"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = proc.stdout + proc.stderr
    assert f"Restored all states from the checkpoint at {last}" in said, said[-3000:]
    assert "Epoch 1:" in said and "Epoch 0:" not in said, said[-3000:]  # only the second epoch ran
    a = torch.load(tmp_path / "straight" / "last.ckpt", weights_only=False)
    b = torch.load(last, weights_only=False)
    assert a["global_step"] == 4 and b["global_step"] == 4
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
