"""The serving core, usable without TorchServe: load the network file + model.json, predict.

    det = Detector("runs/demo/export/model.pt")
    results = det.predict([open("a.jpg", "rb").read()], score_threshold=0.3)

The TorchServe handler (``handler/effdet_handler.py``) is a thin shell over this class; the
demo, the benchmark and the served-vs-local tests use it directly.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from handler.answer import Answer, Detection, RequestError
from handler.card import ModelCard
from handler.config import DEFAULT_MAX_PIXELS
from handler.decode import Decoded, decode_image, decode_images, from_pil
from handler.geometry import letterbox_batch
from handler.network import load_network, network_format
from handler.postprocess import AnchorConfig, detect, generate_anchors
from handler.request import Params
from handler.warmup import Cost, MemoryGauge, WarmUp, stop_before

SCORE_DECIMALS = 5  # scores in responses are rounded to this many decimals


def bucket_sizes(max_batch: int) -> tuple[int, ...]:
    """The batch sizes the network sees when batches are padded up: 1, 2, 3, 4, 6, 8, 12, 16, ...

    Powers of two and the halfway points between them, up to ``max_batch``, which is always one:
    a batch of n runs as the smallest bucket >= n, so at most a third of a batch is padding,
    and warming each bucket once leaves no shape for TorchScript to profile and fuse while serving.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    sizes, p = {max_batch}, 1
    while p < max_batch:
        sizes.update(x for x in (p, p + p // 2) if x < max_batch)
        p *= 2
    return tuple(sorted(sizes))


def as_decoded(image: Decoded | torch.Tensor) -> Decoded:
    """A ``Decoded`` as it is; a uint8 tensor as the whole image."""
    return image if isinstance(image, Decoded) else Decoded.full(image)


class Detector:
    """The exported EfficientDet network + the shared geometry + vectorised effdet post-processing."""

    def __init__(
        self,
        model_path: str | Path,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        score_threshold: float | None = None,
        iou_threshold: float | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        card: ModelCard | None = None,
        channels_last: bool | None = None,
        buckets: Sequence[int] = (),
    ):
        """``channels_last`` defaults to on for CUDA (where the convolutions want it), off on the CPU.
        ``buckets``: batch sizes to pad every batch up to (see ``bucket_sizes``); empty: no padding."""
        model_path = Path(model_path)
        self.card = card if card is not None else ModelCard.load(model_path.parent)
        self.device = torch.device(device)
        if precision not in ("fp32", "fp16"):
            raise ValueError(f"precision must be 'fp32' or 'fp16', got {precision!r}")
        if precision == "fp16" and self.device.type != "cuda":
            raise ValueError("fp16 inference needs a CUDA device")
        self.dtype = torch.float16 if precision == "fp16" else torch.float32
        self.channels_last = self.device.type == "cuda" if channels_last is None else bool(channels_last)
        self.buckets = tuple(sorted({int(b) for b in buckets}))
        if self.buckets and self.buckets[0] < 1:
            raise ValueError(f"bucket sizes must be >= 1, got {list(buckets)}")
        # The most images one forward takes; larger batches run in chunks (None: any). Set by a
        # warm-up that stopped short of the largest bucket, so serving runs only warmed shapes.
        self.max_rows: int | None = None
        card = self.card
        self.num_classes = card.num_classes
        self.max_detection_points = card.max_detection_points
        self.max_det_per_image = card.max_det_per_image
        self.geometry = card.preprocessing
        self.labels = card.labels
        self.defaults = Params(
            score_threshold=float(card.score_threshold if score_threshold is None else score_threshold),
            iou_threshold=float(card.iou_threshold if iou_threshold is None else iou_threshold),
            max_detections=self.max_det_per_image,
        )
        self.max_pixels = max_pixels
        self.anchors = generate_anchors(AnchorConfig.from_effdet_config(card.effdet_config)).to(self.device)
        self.format = network_format(model_path)
        self.model = load_network(model_path, self.device, self.dtype)
        if not self.format.channels_last:
            self.channels_last = False  # compiled (AOTInductor) or exported (ONNX) for contiguous input
        elif self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

    # -- the four steps, each usable on its own -------------------------------------------------
    def decode(self, data: bytes) -> Decoded:
        """Image bytes -> ``Decoded`` on the detector's device, its pixels reduced to what the
        network's input size needs (raises ``RequestError``)."""
        return decode_image(data, self.device, self.max_pixels, self.geometry.size)

    def decode_batch(self, datas: Sequence[bytes]) -> list[Decoded | RequestError]:
        """``decode`` for a batch (nvjpeg decodes the JPEGs in one call): a ``Decoded`` or the error per item."""
        return decode_images(datas, self.device, self.max_pixels, self.geometry.size)

    def bucket(self, n: int) -> int:
        """The batch size a batch of ``n`` images runs as: the smallest bucket >= n, else n."""
        return next((b for b in self.buckets if b >= n), n)

    def preprocess(
        self, images: Sequence[Decoded | torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images of any sizes -> (batch [R,3,H,W], img_scale [B], img_size [B,2] as (w, h)).

        A tensor is a whole image; a ``Decoded`` may be a reduced rendition, and its size as sent
        is the image's. R is ``bucket(B)``: rows past B are padding, which ``detect_tensors`` cuts
        off the heads. The batch is letterboxed on the images' device in the network's dtype and
        memory format.
        """
        images = [as_decoded(img).to(self.device) for img in images]
        # The small per-image tensors go to the device before any of this batch's kernels are queued.
        sizes = [img.size for img in images]
        img_size = torch.tensor(sizes, dtype=torch.float32).to(self.device, non_blocking=True)
        batch, scales = letterbox_batch(
            images, self.geometry, self.bucket(len(images)), self.dtype, self.channels_last
        )
        img_scale = torch.tensor(scales, dtype=torch.float32).to(self.device, non_blocking=True)
        return batch, img_scale, img_size

    @torch.inference_mode()
    def forward(self, batch: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The network alone: per-level class and box head outputs."""
        return self.model(batch)

    @torch.inference_mode()
    def postprocess(
        self,
        cls_out: list[torch.Tensor],
        box_out: list[torch.Tensor],
        img_scale: torch.Tensor,
        img_size: torch.Tensor,
        iou_threshold: float | Sequence[float] | None = None,
        score_threshold: float | Sequence[float] | None = None,
    ) -> torch.Tensor:
        """Head outputs -> [B, max_det_per_image, 6] in image pixels (effdet's DetBenchPredict output).

        Requests with different IoU thresholds are grouped: one ``batched_nms`` per distinct value.
        With ``score_threshold`` (per image or one for all), candidates that no answer could show
        are dropped before NMS; every row at or above the threshold is unchanged (see ``detect``).
        Without it the output equals effdet's row for row.
        """
        batch = img_scale.shape[0]
        ious = self._per_image(iou_threshold, batch, self.defaults.iou_threshold)
        scores = self._per_image(score_threshold, batch, 0.0)
        out = None
        for iou in sorted(set(ious)):
            idx = [i for i, v in enumerate(ious) if v == iou]
            # Scores are shown rounded: keep what could round up to the threshold.
            min_score = max(0.0, min(scores[i] for i in idx) - 10.0**-SCORE_DECIMALS)
            if len(idx) == batch:
                return self._detect(cls_out, box_out, img_scale, img_size, iou, min_score)
            sel = torch.tensor(idx, device=img_scale.device)
            part = self._detect(
                [c[sel] for c in cls_out],
                [b[sel] for b in box_out],
                img_scale[sel],
                img_size[sel],
                iou,
                min_score,
            )
            out = part.new_zeros((batch, *part.shape[1:])) if out is None else out
            out[sel] = part
        return out

    @staticmethod
    def _per_image(value: float | Sequence[float] | None, batch: int, default: float) -> list[float]:
        values = value if isinstance(value, Sequence) else [value] * batch
        return [default if v is None else float(v) for v in values]

    def _detect(self, cls_out, box_out, img_scale, img_size, iou: float, min_score: float) -> torch.Tensor:
        return detect(
            cls_out,
            box_out,
            self.anchors,
            num_classes=self.num_classes,
            max_detection_points=self.max_detection_points,
            max_det_per_image=self.max_det_per_image,
            iou_threshold=iou,
            img_scale=img_scale,
            img_size=img_size,
            min_score=min_score,
        )

    # -- conveniences --------------------------------------------------------------------------
    def detect_tensors(
        self, images: Sequence[Decoded | torch.Tensor], iou_threshold=None, score_threshold=None
    ) -> torch.Tensor:
        """Decoded (or uint8 tensor) images -> padded detections [B, max_det_per_image, 6]; in chunks of
        ``max_rows`` if set."""
        step = self.max_rows
        if step is not None and len(images) > step:
            return torch.cat(
                [
                    self.detect_tensors(
                        images[i : i + step],
                        _rows(iou_threshold, i, step),
                        _rows(score_threshold, i, step),
                    )
                    for i in range(0, len(images), step)
                ]
            )
        batch, img_scale, img_size = self.preprocess(images)
        cls_out, box_out = self.forward(batch)
        n = len(images)
        if batch.shape[0] > n:  # padding rows never reach the post-processing
            cls_out, box_out = [c[:n] for c in cls_out], [b[:n] for b in box_out]
        return self.postprocess(cls_out, box_out, img_scale, img_size, iou_threshold, score_threshold)

    def to_response(self, detections: torch.Tensor, width: int, height: int, params: Params) -> dict:
        """One image's detection rows -> the JSON response contract (without the model block)."""
        return self.answers(detections.unsqueeze(0), [(width, height)], [params])[0].to_json()

    def to_responses(
        self, detections: torch.Tensor, sizes: Sequence[tuple[int, int]], params: Sequence[Params]
    ) -> list[dict]:
        """``answers`` as JSON documents."""
        return [a.to_json() for a in self.answers(detections, sizes, params)]

    def answers(
        self, detections: torch.Tensor, sizes: Sequence[tuple[int, int]], params: Sequence[Params]
    ) -> list[Answer]:
        """A batch's rows [B, N, 6] -> one ``Answer`` per image, each with its own (width, height) and Params.

        Rounding, the threshold on the shown score and ``max_detections`` are tensor operations
        over the whole batch (float64 ``round`` with decimals gives what Python's ``round`` gives
        for every float32 input); what is left per detection is building its object.
        """
        d = detections.detach().to("cpu", torch.float64)
        shown = torch.round(d[..., 4], decimals=SCORE_DECIMALS)  # the threshold applies to the shown score
        threshold = torch.tensor([p.score_threshold for p in params], dtype=torch.float64)
        limit = torch.tensor([p.max_detections for p in params], dtype=torch.int64)
        keep = (d[..., 4] > 0) & (shown >= threshold.unsqueeze(1))  # padding rows have score 0
        keep &= keep.cumsum(1) <= limit.unsqueeze(1)  # rows are sorted by score
        counts = keep.sum(1).tolist()
        flat = keep.reshape(-1).nonzero().squeeze(1)
        rows = d.reshape(-1, 6).index_select(0, flat)
        boxes = torch.round(rows[:, :4], decimals=3).tolist()
        scores = shown.reshape(-1).index_select(0, flat).tolist()
        classes = rows[:, 5].long().tolist()
        labels = self.labels
        out, start = [], 0
        for (width, height), n in zip(sizes, counts, strict=True):
            found = tuple(
                Detection(tuple(boxes[k]), scores[k], classes[k], labels.get(classes[k], str(classes[k])))
                for k in range(start, start + n)
            )
            start += n
            out.append(Answer(int(width), int(height), found))
        return out

    def predict(
        self,
        images: Sequence[bytes | torch.Tensor | Image.Image],
        score_threshold: float | None = None,
        iou_threshold: float | None = None,
        max_detections: int | None = None,
    ) -> list[dict]:
        """Bytes, PIL images, ``Decoded`` or uint8 tensors -> one response dict per image."""
        params = Params(
            score_threshold=self.defaults.score_threshold if score_threshold is None else score_threshold,
            iou_threshold=self.defaults.iou_threshold if iou_threshold is None else iou_threshold,
            max_detections=self.defaults.max_detections if max_detections is None else max_detections,
        )
        decoded = [self._as_decoded(img) for img in images]
        dets = self.detect_tensors(decoded, params.iou_threshold, params.score_threshold).cpu()
        return self.to_responses(dets, [d.size for d in decoded], [params] * len(decoded))

    def _as_decoded(self, img) -> Decoded:
        if isinstance(img, bytes | bytearray):
            return self.decode(bytes(img))
        if isinstance(img, Image.Image):
            return from_pil(img, fit=self.geometry.size).to(self.device)  # shown as it is
        return as_decoded(img).to(self.device)

    def warm_up(
        self,
        batch_sizes: Sequence[int] | None = None,
        passes: int | None = None,
        budget_s: float | None = None,
    ) -> WarmUp:
        """Run every batch size the network will see (default: each bucket, else 1) ``passes`` times
        (default 3 on CUDA, where the profiling executor fuses on the 2nd-3rd call, 2 on the CPU),
        so that no real request pays for TorchScript's profiling and fusion.

        With ``budget_s``, the sizes are warmed smallest first and warming stops before the next
        one expected to pass the time budget or the memory free (``handler.warmup.stop_before``).
        Buckets it did not warm are dropped, and batches above the largest warmed one run in chunks
        of it (``max_rows``).
        """
        img = torch.zeros((3, *self.geometry.size), dtype=torch.uint8, device=self.device)
        passes = passes if passes is not None else 3 if self.device.type == "cuda" else 2
        sizes = tuple(batch_sizes or self.buckets or (1,))
        if budget_s is not None:
            sizes = tuple(sorted(set(sizes)))
        gauge = MemoryGauge(self.device) if budget_s is not None else None
        t0 = time.perf_counter()
        done: list[Cost] = []
        reason = ""
        for n in sizes:
            if gauge is not None:
                reason = stop_before(done, n, time.perf_counter() - t0, budget_s, gauge.free(), gauge.held())
                if reason:
                    break
                gauge.begin_bucket()
            t = time.perf_counter()
            for _ in range(passes):
                self.detect_tensors([img] * n).cpu()
            done.append(Cost(n, time.perf_counter() - t, gauge.peak() if gauge is not None else None))
        warmed = tuple(c.size for c in done)
        skipped = sizes[len(warmed) :]
        if skipped and batch_sizes is None:
            self.buckets = tuple(b for b in self.buckets if b <= warmed[-1])
            self.max_rows = warmed[-1]
        return WarmUp(warmed, skipped, reason, time.perf_counter() - t0)


def _rows(value, start: int, step: int):
    """A per-image parameter (a sequence) cut to a chunk's rows; one value for all stays as it is."""
    return value[start : start + step] if isinstance(value, Sequence) else value
