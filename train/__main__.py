"""Train EfficientDet on your boxes: ``python -m train --data DIR --format synthetic --out runs/NAME``.

Writes ``runs/NAME/best.ckpt`` (best val mAP), ``last.ckpt``, ``model.json`` and CSV/TensorBoard
logs. Multi-GPU / multi-node is Lightning's: pass ``--accelerator --devices --strategy
--num-nodes --precision`` through.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

from handler.card import ModelCard
from handler.geometry import Geometry
from train import synthetic
from train.config import build_config, model_card
from train.data import DATASET_FORMATS, AnnotationError, Dataset, check_records, load_dataset, split_records
from train.datamodule import DetectionDataModule
from train.module import EffDetModule


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train", description=__doc__)
    d = p.add_argument_group("data")
    d.add_argument("--data", default="data/synthetic", help="dataset file or directory (format-dependent)")
    d.add_argument("--format", choices=DATASET_FORMATS, default="synthetic")
    d.add_argument("--val-data", help="validation file (csv/coco); default: split off --val-fraction")
    d.add_argument("--images", help="images directory (csv/coco); default: next to the annotation file")
    d.add_argument("--val-fraction", type=float, default=0.15)
    d.add_argument("--voc-difficult", choices=("skip", "keep"), default="skip")
    d.add_argument(
        "--skip-bad", action="store_true", help="skip (and count) bad boxes/images instead of failing"
    )
    d.add_argument("--synthetic-train", type=int, default=400, help="images generated when --data is empty")
    d.add_argument("--synthetic-val", type=int, default=60)
    m = p.add_argument_group("model")
    m.add_argument(
        "--model",
        default="small",
        help="'small', 'tf_efficientnetv2_l_512' (alias 'seed') or an effdet config name (efficientdet_d0...)",
    )
    m.add_argument("--image-size", type=int, help="square input size (multiple of 128); default: the model's")
    m.add_argument("--pretrained-backbone", action="store_true", help="download timm weights (needs network)")
    m.add_argument("--backbone-weights", help="local timm state dict for the backbone")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=20)
    o.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (smoke runs)")
    o.add_argument("--batch-size", type=int, default=8)
    o.add_argument("--lr", type=float, default=4e-3)
    o.add_argument("--weight-decay", type=float, default=1e-4)
    o.add_argument("--warmup-steps", type=int, default=50)
    o.add_argument("--ema-decay", type=float, default=None, help="keep an EMA of weights (e.g. 0.999)")
    o.add_argument("--gradient-clip", type=float, default=10.0)
    o.add_argument("--val-every", type=int, default=1, help="validate every N epochs")
    o.add_argument("--num-workers", type=int, default=0)
    o.add_argument("--seed", type=int, default=0)
    lt = p.add_argument_group("lightning")
    lt.add_argument("--accelerator", default="auto")
    lt.add_argument("--devices", default="auto")
    lt.add_argument("--strategy", default="auto")
    lt.add_argument("--num-nodes", type=int, default=1)
    lt.add_argument("--precision", default="32-true", help="32-true, bf16-mixed, 16-mixed ...")
    p.add_argument("--out", default="runs/effdet_demo", help="run directory")
    p.add_argument(
        "--resume", help="continue an interrupted run: a checkpoint path, or 'last' for OUT/last.ckpt"
    )
    return p.parse_args(argv)


def load_splits(a: argparse.Namespace):
    """Adapters + checks -> (train Dataset, val Dataset); raises AnnotationError with file and row."""
    if a.format == "synthetic":
        synthetic.ensure(a.data, a.synthetic_train, a.synthetic_val, a.seed)
    train = load_dataset(a.format, a.data, "train", a.images, None, a.voc_difficult)
    if a.format in ("synthetic", "voc"):
        val = load_dataset(a.format, a.data, "val", a.images, train.classes, a.voc_difficult)
    elif a.val_data:
        val = load_dataset(a.format, a.val_data, "val", a.images, train.classes)
    else:  # one annotation file: check all of it, then split off a validation part
        full = check_records(train, a.skip_bad, str(a.data))
        train_recs, val_recs = split_records(full.records, a.val_fraction, a.seed)
        return (
            Dataset(train_recs, full.classes, full.summary + _counts(train_recs, "train")),
            Dataset(val_recs, full.classes, _counts(val_recs, "val")),
        )
    if val.classes != train.classes:
        raise AnnotationError(f"train classes {train.classes} differ from validation classes {val.classes}")
    return check_records(train, a.skip_bad, "train"), check_records(val, a.skip_bad, "val")


def _counts(records, split: str) -> Counter:
    return Counter({f"{split} images": len(records), f"{split} boxes": sum(len(r.boxes) for r in records)})


def _devices(value: str):
    return int(value) if value.isdigit() else value


def build_trainer(a: argparse.Namespace, out: Path) -> tuple[pl.Trainer, ModelCheckpoint]:
    """Lightning's Trainer for this run, and the callback that keeps ``best.ckpt`` by val mAP."""
    best = ModelCheckpoint(
        dirpath=out,
        filename="best",
        monitor="val/map",
        mode="max",
        enable_version_counter=False,
        auto_insert_metric_name=False,
    )
    # Lightning 2.6 writes save_last only when a top-k checkpoint was written in the same step,
    # so an interrupted run could resume from a stale file: keep last.ckpt with its own callback.
    # With --val-every N > 1 Lightning would write it only after a validation, N epochs apart:
    # then it is written at the end of every training epoch instead.
    last = ModelCheckpoint(
        dirpath=out,
        filename="last",
        every_n_epochs=1,
        enable_version_counter=False,
        save_on_train_epoch_end=True if a.val_every > 1 else None,
    )
    trainer = pl.Trainer(
        default_root_dir=out,
        max_epochs=a.epochs,
        max_steps=a.max_steps,
        accelerator=a.accelerator,
        devices=_devices(a.devices),
        strategy=a.strategy,
        num_nodes=a.num_nodes,
        precision=a.precision,
        gradient_clip_val=a.gradient_clip,
        check_val_every_n_epoch=a.val_every,
        callbacks=[best, last, LearningRateMonitor("step")],
        logger=[CSVLogger(out, name="logs"), TensorBoardLogger(out, name="tb")],
        log_every_n_steps=10,
        num_sanity_val_steps=0,
    )
    return trainer, best


def final_metrics(
    trainer: pl.Trainer, module: EffDetModule, dm, best: ModelCheckpoint, out: Path
) -> tuple[dict, str]:
    """Validate the kept checkpoint (or, when no validation ran, save and validate the current weights)."""
    path = best.best_model_path
    if path:
        final = trainer.validate(module, datamodule=dm, ckpt_path=path, verbose=False)[0]
    else:  # --max-steps ended the run before any validation: evaluate and keep what we have
        final = trainer.validate(module, datamodule=dm, verbose=False)[0]
        path = str(out / "best.ckpt")
        trainer.save_checkpoint(path)
    metrics = {
        "val_map": round(float(final.get("val/map", 0.0)), 4),
        "val_map50": round(float(final.get("val/map50", 0.0)), 4),
        "val_images": len(dm.val_records),
    }
    return metrics, path


def main(argv: list[str] | None = None) -> ModelCard:
    a = parse_args(argv)
    pl.seed_everything(a.seed, workers=True)
    out = Path(a.out)
    try:
        train, val = load_splits(a)
    except (AnnotationError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    for name, ds in (("train", train), ("val", val)):
        print(f"[data] {name}: " + ", ".join(f"{k}={v}" for k, v in sorted(ds.summary.items())))
    print(f"[data] classes: {train.classes}")

    cfg = build_config(a.model, len(train.classes), a.image_size)
    module = EffDetModule(
        cfg,
        train.classes,
        lr=a.lr,
        weight_decay=a.weight_decay,
        warmup_steps=a.warmup_steps,
        ema_decay=a.ema_decay,
        pretrained_backbone=a.pretrained_backbone,
        backbone_weights=a.backbone_weights,
        seed=a.seed,
    )
    geometry = Geometry(size=tuple(cfg["image_size"]))
    dm = DetectionDataModule(train.records, val.records, geometry, a.batch_size, a.num_workers, a.seed)
    trainer, best = build_trainer(a, out)
    resume = str(out / "last.ckpt") if a.resume == "last" else a.resume
    if resume and not Path(resume).is_file():
        raise SystemExit(f"--resume: {resume} not found")
    start = time.time()
    trainer.fit(module, datamodule=dm, ckpt_path=resume)
    train_seconds = time.time() - start
    if trainer.interrupted:
        print("[train] interrupted: continue with --resume last (the last finished epoch)", file=sys.stderr)
        raise SystemExit(130)
    trainer.save_checkpoint(out / "last.ckpt")  # the final state, also when --max-steps ended mid-epoch
    metrics, best_path = final_metrics(trainer, module, dm, best, out)
    card = model_card(
        out.name,
        cfg,
        train.classes,
        provenance={
            "dataset": {"format": a.format, "path": str(a.data), "train_images": len(train.records)},
            "epochs": trainer.current_epoch,
            "steps": trainer.global_step,
            "train_seconds": round(train_seconds, 1),
            "checkpoint": Path(best_path).name,
            "ema_decay": a.ema_decay,
            "precision": a.precision,
            "devices": trainer.world_size,
        },
        metrics=metrics,
    )
    if trainer.is_global_zero:
        card.save(out / "model.json")
        print(
            f"[train] {trainer.global_step} steps in {train_seconds / 60:.1f} min; best: {json.dumps(metrics)}"
        )
        print(f"[train] wrote {out / 'best.ckpt'}, {out / 'last.ckpt'}, {out / 'model.json'}")
    return card


if __name__ == "__main__":
    main()
