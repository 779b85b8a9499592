"""Images + boxes -> effdet batches: transforms, Dataset, collate and the LightningDataModule.

Training augments with ``torchvision.transforms.v2`` on ``tv_tensors.BoundingBoxes`` (flip,
scale/translate jitter, colour) on the full-size image and then applies the serving geometry;
validation decodes with the handler's own decoder at the size the network needs (a large JPEG at
a DCT scale, see ``handler.decode``) and applies the serving geometry only
(``handler.geometry.letterbox``), so validation sees exactly the tensor the served model will see.
"""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Sampler
from torch.utils.data import Dataset as TorchDataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from handler.decode import Decoded, decode_image
from handler.geometry import Geometry, letterbox
from train.data import Record


def augmentation() -> v2.Compose:
    """Train-time jitter applied in image pixels, before the shared geometry."""
    return v2.Compose(
        [
            v2.RandomHorizontalFlip(p=0.5),
            v2.RandomApply([v2.RandomAffine(degrees=0, translate=(0.1, 0.1), scale=(0.7, 1.3))], p=0.7),
            v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.03),
            v2.ClampBoundingBoxes(),
            v2.SanitizeBoundingBoxes(min_size=2.0),
        ]
    )


def load_image(path: str | Path, fit: tuple[int, int] | None = None) -> Decoded:
    """A file -> ``Decoded`` (EXIF orientation applied) by the handler's decoder: the full image, or
    with ``fit`` (the network's input size) the pixels serving decodes."""
    return decode_image(Path(path).read_bytes(), fit=fit)


class DetectionDataset(TorchDataset):
    """Records -> (network input, target dict). Boxes in targets are in network-input pixels."""

    def __init__(self, records: list[Record], geometry: Geometry, train: bool):
        self.records = records
        self.geometry = geometry
        self.augment = augmentation() if train else None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, dict]:
        """``key`` is an index, or (index, augmentation seed) as ``EpochShuffle`` yields."""
        i, seed = key if isinstance(key, tuple) else (key, None)
        rec = self.records[i]
        # Augmentation works in the image's own pixels (full size); validation takes serving's path.
        image = load_image(rec.image, None if self.augment is not None else self.geometry.size)
        width, height = image.size
        boxes = torch.tensor(rec.boxes, dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor(rec.labels, dtype=torch.int64)
        if self.augment is not None:
            with torch.random.fork_rng(devices=[]):
                if seed is not None:
                    torch.manual_seed(seed)
                pixels, target = self.augment(
                    tv_tensors.Image(image.pixels),
                    {
                        "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
                        "labels": labels,
                    },
                )
            image, boxes, labels = (
                pixels.as_subclass(torch.Tensor),
                target["boxes"].as_subclass(torch.Tensor),
                target["labels"],
            )
        x, img_scale = letterbox(image, self.geometry)
        return x, {
            "boxes": boxes / img_scale,  # xyxy in network pixels
            "labels": labels,
            "img_scale": img_scale,
            "img_size": (width, height),
            "image_id": rec.image_id,
        }


def collate(batch: list[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, dict]:
    """Stack images; pad boxes to yxyx [B, N, 4] and classes to [B, N] with -1, as effdet's labeler expects.

    N is at least 1 so that a batch of negatives still has the shape effdet wants.
    """
    images = torch.stack([x for x, _ in batch])
    n = max(1, max(len(t["labels"]) for _, t in batch))
    bbox = torch.zeros((len(batch), n, 4))
    cls = torch.full((len(batch), n), -1.0)
    for i, (_, t) in enumerate(batch):
        k = len(t["labels"])
        if k:
            bbox[i, :k] = t["boxes"][:, [1, 0, 3, 2]]
            cls[i, :k] = t["labels"].float()
    target = {
        "bbox": bbox,
        "cls": cls,
        "img_scale": torch.tensor([t["img_scale"] for _, t in batch], dtype=torch.float32),
        "img_size": torch.tensor([t["img_size"] for _, t in batch], dtype=torch.float32),
        "image_id": torch.tensor([t["image_id"] for _, t in batch]),
    }
    return images, target


class EpochShuffle(Sampler[tuple[int, int]]):
    """A shuffle that depends only on (seed, epoch), so a run resumed from last.ckpt sees the same data.

    Yields (index, augmentation seed): the augmentation of each sample is a function of the run's
    seed, the epoch and the sample, not of the global RNG's history. Lightning calls ``set_epoch``
    at every epoch start (and wraps this sampler for DDP).
    """

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        epoch_seed = self.seed * 100_003 + self.epoch
        g = torch.Generator().manual_seed(epoch_seed)
        base = epoch_seed * (self.n + 1)
        return iter((i, base + i) for i in torch.randperm(self.n, generator=g).tolist())


class DetectionDataModule(pl.LightningDataModule):
    def __init__(
        self,
        train_records: list[Record],
        val_records: list[Record],
        geometry: Geometry,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        self.seed = seed
        self.train_records, self.val_records = train_records, val_records
        self.geometry = geometry
        self.batch_size = batch_size
        self.num_workers = num_workers

    def _loader(self, records: list[Record], train: bool) -> DataLoader:
        return DataLoader(
            DetectionDataset(records, self.geometry, train),
            batch_size=self.batch_size,
            sampler=EpochShuffle(len(records), self.seed) if train else None,
            drop_last=train and len(records) > self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_records, True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_records, False)
