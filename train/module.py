"""The LightningModule around effdet's ``DetBenchTrain``: loss, optimiser, EMA, COCO mAP."""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from effdet import DetBenchTrain
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from train.config import create_effdet
from train.metrics import coco_map, detections_from_rows


def warmup_cosine(step: int, warmup: int, total: int, floor: float = 0.05) -> float:
    """LR multiplier: linear warm-up to 1, then cosine down to ``floor``."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class EffDetModule(pl.LightningModule):
    def __init__(
        self,
        effdet_config: dict,
        classes: list[str],
        lr: float = 4e-3,
        weight_decay: float = 1e-4,
        warmup_steps: int = 50,
        ema_decay: float | None = None,
        pretrained_backbone: bool = False,
        backbone_weights: str | None = None,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        model = create_effdet(effdet_config, pretrained_backbone, backbone_weights)
        self.bench = DetBenchTrain(model)
        self.ema = (
            AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
            if ema_decay
            else None
        )
        self._val_gt: list[dict] = []
        self._val_dets: list[dict] = []

    @property
    def model(self):
        """The EfficientDet whose weights are validated and exported (the EMA copy when enabled)."""
        return self.ema.module if self.ema is not None else self.bench.model

    def on_train_epoch_start(self):
        # Augmentation is seeded per sample (EpochShuffle); what still draws from the global RNG
        # (drop-path in the backbone) is seeded per epoch, so a resumed run repeats that too.
        pl.seed_everything(self.hparams.seed * 1_000 + self.current_epoch, verbose=False)

    def training_step(self, batch, batch_idx):
        images, target = batch
        out = self.bench(images, target)
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=images.shape[0])
        self.log("train/class_loss", out["class_loss"], batch_size=images.shape[0])
        self.log("train/box_loss", out["box_loss"], batch_size=images.shape[0])
        return out["loss"]

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.ema is not None:
            self.ema.update_parameters(self.bench.model)

    def on_validation_epoch_start(self):
        self._val_gt, self._val_dets = [], []
        if self.ema is not None:
            self._train_model, self.bench.model = self.bench.model, self.ema.module

    def validation_step(self, batch, batch_idx):
        images, target = batch
        out = self.bench(images, target)
        self.log("val/loss", out["loss"], prog_bar=True, batch_size=images.shape[0], sync_dist=True)
        dets = out["detections"].float().cpu()
        for i in range(images.shape[0]):
            keep = target["cls"][i] > 0
            boxes = target["bbox"][i][keep][:, [1, 0, 3, 2]] * target["img_scale"][i]
            width, height = target["img_size"][i].tolist()
            image_id = int(target["image_id"][i])
            self._val_gt.append(
                {
                    "image_id": image_id,
                    "width": width,
                    "height": height,
                    "boxes": boxes.cpu().tolist(),
                    "labels": target["cls"][i][keep].long().tolist(),
                }
            )
            self._val_dets.append(detections_from_rows(image_id, dets[i]))

    def on_validation_epoch_end(self):
        if self.ema is not None:
            self.bench.model = self._train_model
            del self._train_model
        gt, dets = self._val_gt, self._val_dets
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (gt, dets))
            # DistributedSampler pads with repeats: keep one entry per image id.
            gt = list({g["image_id"]: g for part in gathered for g in part[0]}.values())
            dets = list({d["image_id"]: d for part in gathered for d in part[1]}.values())
        scores = coco_map(gt, dets, self.hparams.effdet_config["num_classes"])
        self.log("val/map", scores["map"], prog_bar=True, sync_dist=True)
        self.log("val/map50", scores["map50"], prog_bar=True, sync_dist=True)
        self.log("val/images", float(len(gt)), sync_dist=True)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(
            self.bench.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(self.hparams.warmup_steps, total // 4)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, warmup, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
