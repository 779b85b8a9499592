"""The answer contract, defined once: what a successful prediction's JSON holds.

    {"model": {"name": "effdet_demo", "version": "1.0"},
     "image": {"width": 1280, "height": 720},
     "detections": [{"box": [x1, y1, x2, y2], "score": 0.93, "class_id": 1, "label": "car"}],
     "request_id": "..."}

``box`` is in pixels of the image as sent (after EXIF orientation), detections sorted by score,
classes 1-based as effdet numbers them. Producers build answers with these types (``Detector``;
the TorchServe handler adds the model and the request id; the benchmark's null handler answers an
empty one); readers parse them with ``Answer.from_json`` (the client's drawing, the demo's mAP,
the benchmark's load checks), so a renamed or missing key fails in one place, by name.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


class AnswerError(ValueError):
    """A JSON document that is not an answer: names what is missing or wrong."""


@dataclass(frozen=True, slots=True)
class Detection:
    box: tuple[float, float, float, float]  # x1, y1, x2, y2
    score: float
    class_id: int
    label: str

    def to_json(self) -> dict:
        return {"box": list(self.box), "score": self.score, "class_id": self.class_id, "label": self.label}

    @classmethod
    def from_json(cls, d: dict) -> Detection:
        try:
            x1, y1, x2, y2 = (float(v) for v in d["box"])
            return cls((x1, y1, x2, y2), float(d["score"]), int(d["class_id"]), str(d["label"]))
        except KeyError as e:
            raise AnswerError(f"a detection lacks {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise AnswerError(f"a detection is malformed: {e}") from None


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    version: str

    def to_json(self) -> dict:
        return {"name": self.name, "version": self.version}


@dataclass(frozen=True, slots=True)
class Answer:
    width: int  # of the image as sent, after EXIF orientation
    height: int
    detections: tuple[Detection, ...]
    model: ModelInfo | None = None
    request_id: str | None = None

    def served(self, model: ModelInfo, request_id: str | None) -> Answer:
        """The same answer as the handler sends it: naming the model and the request."""
        return replace(self, model=model, request_id=request_id)

    def to_json(self) -> dict:
        out = {"model": self.model.to_json()} if self.model else {}
        out["image"] = {"width": self.width, "height": self.height}
        out["detections"] = [d.to_json() for d in self.detections]
        if self.request_id is not None:
            out["request_id"] = self.request_id
        return out

    @classmethod
    def from_json(cls, d) -> Answer:
        """Parse a 200 answer's JSON; an error answer or anything else raises ``AnswerError``."""
        if not isinstance(d, dict):
            raise AnswerError(f"an answer is a JSON object, got {type(d).__name__}")
        if "error" in d:
            raise AnswerError(f"an error answer: {d['error']}")
        try:
            image, detections = d["image"], d["detections"]
            model = ModelInfo(str(d["model"]["name"]), str(d["model"]["version"])) if "model" in d else None
            return cls(
                int(image["width"]),
                int(image["height"]),
                tuple(Detection.from_json(x) for x in detections),
                model,
                d.get("request_id"),
            )
        except KeyError as e:
            raise AnswerError(f"the answer lacks {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise AnswerError(f"the answer is malformed: {e}") from None


class RequestError(ValueError):
    """A problem with one request: carries an HTTP status and a short machine-readable code; ``to_json``
    is the body of its error answer. Here, beside the answer, so that the client and the settings
    (``scripts.settings``) import it without torch."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def to_json(self) -> dict:
        return {"error": {"code": self.code, "message": self.message}}
