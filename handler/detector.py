"""The serving core, usable without TorchServe: load the TorchScript + model.json, predict.

    det = Detector("runs/demo/export/model.pt")
    results = det.predict([open("a.jpg", "rb").read()], score_threshold=0.3)

The TorchServe handler (``handler/effdet_handler.py``) is a thin shell over this class; the
demo, the benchmark and the served-vs-local tests use it directly.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from handler.decode import DEFAULT_MAX_PIXELS, decode_image, pil_to_tensor
from handler.geometry import Geometry, letterbox
from handler.network import load_network
from handler.postprocess import AnchorConfig, detect, generate_anchors
from handler.request import Params

MODEL_CARD = "model.json"
SCORE_DECIMALS = 5  # scores in responses are rounded to this many decimals


def load_card(model_dir: str | Path) -> dict:
    """Read ``model.json`` (the training -> serving contract) from a directory."""
    path = Path(model_dir) / MODEL_CARD
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the model directory must hold the model.json from export")
    return json.loads(path.read_text())


def class_names(card: dict) -> dict[int, str]:
    """1-based class id -> name, as effdet numbers classes."""
    return {i + 1: name for i, name in enumerate(card["classes"])}


class Detector:
    """TorchScript EfficientDet + the shared geometry + vectorised effdet post-processing."""

    def __init__(
        self,
        model_path: str | Path,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        score_threshold: float | None = None,
        iou_threshold: float | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        card: dict | None = None,
    ):
        model_path = Path(model_path)
        self.card = card if card is not None else load_card(model_path.parent)
        self.device = torch.device(device)
        if precision not in ("fp32", "fp16"):
            raise ValueError(f"precision must be 'fp32' or 'fp16', got {precision!r}")
        if precision == "fp16" and self.device.type != "cuda":
            raise ValueError("fp16 inference needs a CUDA device")
        self.dtype = torch.float16 if precision == "fp16" else torch.float32
        cfg = self.card["effdet_config"]
        self.num_classes = int(cfg["num_classes"])
        self.max_detection_points = int(cfg["max_detection_points"])
        self.max_det_per_image = int(cfg["max_det_per_image"])
        self.geometry = Geometry.from_dict(self.card["preprocessing"])
        self.labels = class_names(self.card)
        post = self.card.get("postprocessing", {})
        self.defaults = Params(
            score_threshold=float(
                score_threshold if score_threshold is not None else post.get("score_threshold", 0.05)
            ),
            iou_threshold=float(
                iou_threshold if iou_threshold is not None else post.get("iou_threshold", 0.5)
            ),
            max_detections=self.max_det_per_image,
        )
        self.max_pixels = max_pixels
        self.anchors = generate_anchors(AnchorConfig.from_effdet_config(cfg)).to(self.device)
        self.model = load_network(model_path, self.device, self.dtype)  # model.pt or model.pt2

    # -- the four steps, each usable on its own -------------------------------------------------
    def decode(self, data: bytes) -> torch.Tensor:
        """Image bytes -> uint8 RGB [3, H, W] on the detector's device (raises ``RequestError``)."""
        return decode_image(data, self.device, self.max_pixels)

    def preprocess(self, images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images of any sizes -> (batch [B,3,H,W], img_scale [B], img_size [B,2] as (w, h))."""
        tensors, scales, sizes = [], [], []
        for img in images:
            x, scale = letterbox(img.to(self.device), self.geometry)
            tensors.append(x)
            scales.append(scale)
            sizes.append((img.shape[-1], img.shape[-2]))
        batch = torch.stack(tensors).to(self.dtype)
        img_scale = torch.tensor(scales, dtype=torch.float32, device=self.device)
        img_size = torch.tensor(sizes, dtype=torch.float32, device=self.device)
        return batch, img_scale, img_size

    @torch.inference_mode()
    def forward(self, batch: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The TorchScript network alone: per-level class and box head outputs."""
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
        self, images: Sequence[torch.Tensor], iou_threshold=None, score_threshold=None
    ) -> torch.Tensor:
        """uint8 images -> padded detections [B, max_det_per_image, 6]."""
        batch, img_scale, img_size = self.preprocess(images)
        cls_out, box_out = self.forward(batch)
        return self.postprocess(cls_out, box_out, img_scale, img_size, iou_threshold, score_threshold)

    def to_response(self, detections: torch.Tensor, width: int, height: int, params: Params) -> dict:
        """One image's detection rows -> the JSON contract of DESIGN.md (without the model block)."""
        rows = detections[detections[:, 4] > 0].tolist()  # padding rows have score 0
        out = []
        for x1, y1, x2, y2, score, cls in rows:
            score = round(score, SCORE_DECIMALS)  # the threshold applies to the score the caller is shown
            if score < params.score_threshold or len(out) >= params.max_detections:
                continue
            class_id = int(cls)
            out.append(
                {
                    "box": [round(x1, 3), round(y1, 3), round(x2, 3), round(y2, 3)],
                    "score": score,
                    "class_id": class_id,
                    "label": self.labels.get(class_id, str(class_id)),
                }
            )
        return {"image": {"width": int(width), "height": int(height)}, "detections": out}

    def predict(
        self,
        images: Sequence[bytes | torch.Tensor | Image.Image],
        score_threshold: float | None = None,
        iou_threshold: float | None = None,
        max_detections: int | None = None,
    ) -> list[dict]:
        """Bytes, PIL images or uint8 tensors -> one response dict per image."""
        params = Params(
            score_threshold=self.defaults.score_threshold if score_threshold is None else score_threshold,
            iou_threshold=self.defaults.iou_threshold if iou_threshold is None else iou_threshold,
            max_detections=self.defaults.max_detections if max_detections is None else max_detections,
        )
        tensors = [self._as_tensor(img) for img in images]
        dets = self.detect_tensors(tensors, params.iou_threshold, params.score_threshold).cpu()
        return [
            self.to_response(d, t.shape[-1], t.shape[-2], params) for d, t in zip(dets, tensors, strict=True)
        ]

    def _as_tensor(self, img) -> torch.Tensor:
        if isinstance(img, bytes | bytearray):
            return self.decode(bytes(img))
        if isinstance(img, Image.Image):
            return pil_to_tensor(img).to(self.device)
        return img.to(self.device)

    def warm_up(self, batch_sizes: Sequence[int] = (1,)) -> None:
        """Two passes per batch size, so the first real requests do not pay for TorchScript's profiling runs."""
        img = torch.zeros((3, *self.geometry.size), dtype=torch.uint8, device=self.device)
        for n in batch_sizes:
            for _ in range(2):
                self.detect_tensors([img] * n)
