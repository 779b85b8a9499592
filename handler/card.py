"""``model.json``, the card that travels from training to the handler, as one typed object.

Training writes it, export adds its provenance, the handler reads it once at start-up (as
effdet's ``DetBenchPredict.__init__`` reads its config into attributes). Every default that
answers depend on is defined here once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from handler.geometry import Geometry

MODEL_CARD = "model.json"
SCHEMA = 1
DEFAULT_SCORE_THRESHOLD = 0.05  # effdet's own score floor in DetBenchPredict's post-processing
DEFAULT_IOU_THRESHOLD = 0.5  # effdet's NMS IoU in generate_detections
EFFDET_KEYS = ("num_classes", "image_size", "min_level", "max_level", "num_scales", "aspect_ratios",
               "anchor_scale", "max_detection_points", "max_det_per_image")  # fmt: skip


class CardError(ValueError):
    """A model.json that the handler cannot serve: names the file and the key."""


@dataclass(frozen=True)
class ModelCard:
    """Effdet config, class names (1-based ids), geometry, post-processing defaults, provenance."""

    name: str
    effdet_config: dict
    classes: tuple[str, ...]
    preprocessing: Geometry
    score_threshold: float = DEFAULT_SCORE_THRESHOLD
    iou_threshold: float = DEFAULT_IOU_THRESHOLD
    provenance: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    export: dict = field(default_factory=dict)
    schema: int = SCHEMA

    # -- what the handler reads ------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return int(self.effdet_config["num_classes"])

    @property
    def max_detection_points(self) -> int:
        return int(self.effdet_config["max_detection_points"])

    @property
    def max_det_per_image(self) -> int:
        return int(self.effdet_config["max_det_per_image"])

    @property
    def labels(self) -> dict[int, str]:
        """1-based class id -> name, as effdet numbers classes."""
        return {i + 1: name for i, name in enumerate(self.classes)}

    def index_to_name(self) -> dict[str, str]:
        """TorchServe's ``index_to_name.json`` convention."""
        return {str(i): n for i, n in self.labels.items()}

    def with_export(self, export: dict) -> ModelCard:
        return replace(self, export=export)

    # -- JSON ------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "schema": self.schema,
            "name": self.name,
            "effdet_config": self.effdet_config,
            "classes": list(self.classes),
            "preprocessing": self.preprocessing.to_dict(),
            "postprocessing": {"score_threshold": self.score_threshold, "iou_threshold": self.iou_threshold},
            "provenance": self.provenance,
            "metrics": self.metrics,
            **({"export": self.export} if self.export else {}),
        }

    @classmethod
    def from_dict(cls, d: dict, source: str = MODEL_CARD) -> ModelCard:
        try:
            cfg = d["effdet_config"]
            missing = [k for k in EFFDET_KEYS if k not in cfg]
            if missing:
                raise CardError(f"{source}: effdet_config lacks {', '.join(missing)}")
            classes = tuple(str(c) for c in d["classes"])
            if len(classes) != int(cfg["num_classes"]):
                raise CardError(f"{source}: {len(classes)} class names for num_classes={cfg['num_classes']}")
            post = d.get("postprocessing", {})
            return cls(
                name=str(d.get("name", "")),
                effdet_config=cfg,
                classes=classes,
                preprocessing=Geometry.from_dict(d["preprocessing"]),
                score_threshold=float(post.get("score_threshold", DEFAULT_SCORE_THRESHOLD)),
                iou_threshold=float(post.get("iou_threshold", DEFAULT_IOU_THRESHOLD)),
                provenance=dict(d.get("provenance", {})),
                metrics=dict(d.get("metrics", {})),
                export=dict(d.get("export", {})),
                schema=int(d.get("schema", SCHEMA)),
            )
        except KeyError as e:
            raise CardError(f"{source}: missing key {e.args[0]!r}") from None

    @classmethod
    def load(cls, model_dir: str | Path) -> ModelCard:
        """Read ``model.json`` from a directory (a run, an export, an unpacked .mar)."""
        path = Path(model_dir) / MODEL_CARD
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: the model directory must hold the model.json from export"
            )
        return cls.from_dict(json.loads(path.read_text()), str(path))

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")
