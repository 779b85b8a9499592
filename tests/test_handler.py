"""The TorchServe handler driven in-process through TorchServe's own worker code.

No server and no mocks: the requests are written in the frontend-to-worker wire format and read
back by ``ts.protocol.otf_message_handler.retrieve_msg`` (so JSON bodies become dicts, text bodies
str, and query parameters their own byte entries exactly as in a worker); ``ts.service.Service``
builds the real ``ts.context.Context`` and the per-request ``RequestProcessor``s, calls
``EffDetHandler.handle`` and encodes the answer frame, which is parsed back here. The metrics
cache is TorchServe's ``MetricsCacheYamlImpl`` built from its default ``metrics.yaml``.

Answers are checked against the response contract (README, Serving) and against ``Detector.predict`` run
in-process on the same bytes and parameters.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import logging
import shutil
import struct
import zlib
from dataclasses import dataclass, replace
from http import HTTPStatus
from pathlib import Path

import pytest
import torch
import ts
from PIL import Image
from torchvision.ops import box_iou
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
from ts.model_loader import TsModelLoader
from ts.protocol.otf_message_handler import PREDICT_MSG, retrieve_msg
from ts.service import Service

from handler.config import MAX_BATCH_SIZE, BatchSizeRefused, HandlerConfig
from handler.detector import Detector, bucket_sizes
from handler.effdet_handler import EffDetHandler
from handler.request import REQUEST_ID_ECHO_HEADER, REQUEST_ID_HEADER, Params, valid_request_id
from tests.helpers import close_detections, count_matched, run_without_training_stack

MODEL_NAME, MODEL_VERSION = "tiny", "1.0"
MANIFEST = {
    "model": {
        "modelName": MODEL_NAME,
        "modelVersion": MODEL_VERSION,
        "serializedFile": "model.pt",
        "handler": "effdet_handler.py",
    }
}
# score_threshold 0 shows every detection the barely trained fixture model makes.
ALL = {"score_threshold": "0"}


# -- the wire: frontend -> worker frame, worker -> frontend frame ---------------------------------


def _lp(b: bytes) -> bytes:
    return struct.pack("!i", len(b)) + b


@dataclass
class Req:
    """One HTTP request as the frontend hands it to a worker."""

    body: bytes | None = None
    content_type: str = "application/octet-stream"
    field: str = "body"  # "body" for a raw body, the form field name for multipart
    query: dict[str, str] = dataclasses.field(default_factory=dict)
    headers: dict[str, str] = dataclasses.field(default_factory=dict)

    def frame(self, request_id: str) -> bytes:
        out = _lp(request_id.encode())
        for k, v in self.headers.items():
            out += _lp(k.encode()) + _lp(v.encode())
        out += struct.pack("!i", -1)
        params = [] if self.body is None else [(self.field, self.content_type, self.body)]
        params += [(k, "", v.encode()) for k, v in self.query.items()]  # query params carry no type
        for name, ctype, value in params:
            out += _lp(name.encode()) + _lp(ctype.encode()) + _lp(value)
        return out + struct.pack("!i", -1)


def json_req(payload, **query) -> Req:
    return Req(json.dumps(payload).encode(), "application/json", query=query)


class Wire:
    """A byte stream with a socket's ``recv``; what the worker reads its frames from."""

    def __init__(self, data: bytes):
        self._buf = io.BytesIO(data)

    def recv(self, n: int) -> bytes:
        return self._buf.read(n)


def _read_frame(msg: bytes) -> tuple[int, str, list[dict]]:
    """Parse ``create_predict_response``'s frame: batch code, message, per-request answers."""
    pos = 0

    def i32():
        nonlocal pos
        (v,) = struct.unpack_from("!i", msg, pos)
        pos += 4
        return v

    def buf():
        nonlocal pos
        n = i32()
        pos += n
        return msg[pos - n : pos]

    code, message, out = i32(), buf().decode(), []
    while i32() != -1:
        pos -= 4
        req_id = buf().decode()
        content_type = buf().decode()
        status, phrase = i32(), buf().decode()
        headers = {buf().decode(): buf().decode() for _ in range(i32())}
        body = bytes(buf())
        out.append(
            {"id": req_id, "status": status, "phrase": phrase, "type": content_type, "headers": headers,
             "body": body}
        )  # fmt: skip
    return code, message, out


@dataclass
class Answer:
    status: int  # what the worker puts on the wire for this request
    body: dict | str  # the wire body, parsed from JSON
    raw: object  # what handle() returned for this request
    phrase: str = ""  # the reason phrase on the wire
    headers: dict = dataclasses.field(default_factory=dict)  # the response headers on the wire


class Worker:
    """EffDetHandler loaded the way TorchServe's worker loads a class handler, plus a predict call."""

    def __init__(self, model_dir: Path, envelope: str | None = None):
        """``envelope``: a TorchServe request envelope by name (``kserve``), wrapped around the handler
        the way a worker started with ``TS_SERVICE_ENVELOPE`` wraps it (``TsModelLoader.load``)."""
        manifest = MANIFEST
        if (model_dir / "model-config.yaml").is_file():  # TorchServe hands its contents to the context
            manifest = {"model": {**MANIFEST["model"], "configFile": "model-config.yaml"}}
        self.metrics = MetricsCacheYamlImpl(str(Path(ts.__file__).parent / "configs" / "metrics.yaml"))
        self.metrics.initialize_cache()
        self.metrics.model_name = MODEL_NAME
        self.handler = EffDetHandler()
        self.returned = None
        entry = self._entry
        if envelope is not None:
            entry = TsModelLoader()._load_default_envelope(envelope)(entry).handle
        self.service = Service(
            MODEL_NAME, str(model_dir), manifest, entry, None, 8, True, self.metrics
        )  # model_name, model_dir, manifest, entry_point, gpu, batch_size, limit_max_image_pixels, metrics
        self.service.set_cl_socket(None)
        self.handler.initialize(self.context)

    @property
    def context(self):
        return self.service.context

    def _entry(self, rows, context):
        self.rows = rows
        self.returned = self.handler.handle(rows, context)
        return self.returned

    def predict(self, requests: list[Req], check_ids: bool = True) -> list[Answer]:
        """Answers as the frontend would read them; ``check_ids``: each names its request (every
        answer but a KServe one, whose rows are a request's instances)."""
        frame = PREDICT_MSG + b"".join(r.frame(f"req-{i}") for i, r in enumerate(requests))
        cmd, batch = retrieve_msg(Wire(frame + struct.pack("!i", -1)))
        assert cmd == PREDICT_MSG and len(batch) == len(requests)
        self.returned = None
        code, message, answers = _read_frame(bytes(self.service.predict(batch)))
        assert (code, message) == (200, "Prediction success"), "the batch as a whole failed"
        assert [a["id"] for a in answers] == [f"req-{i}" for i in range(len(requests))]
        out = []
        for i, a in enumerate(answers):
            # the status on the wire is the one the handler set on the context for that request
            assert self.context.get_response_status(i)[0] == a["status"]
            body = json.loads(a["body"])
            if not check_ids:
                out.append(Answer(a["status"], body, self.returned[i], a["phrase"], a["headers"]))
                continue
            # every answer names its request: the caller's X-Request-Id when safe, else TorchServe's id
            sent = next((v for k, v in requests[i].headers.items() if k.lower() == "x-request-id"), None)
            want_id = sent if sent is not None and valid_request_id(sent) else f"req-{i}"
            describe = any(
                k.lower() == "describe" and v.lower() == "true" for k, v in requests[i].headers.items()
            )
            if not describe:
                assert a["headers"].get(REQUEST_ID_ECHO_HEADER) == want_id, (a["headers"], sent)
                if a["status"] == 200:
                    assert body["request_id"] == want_id
            out.append(Answer(a["status"], body, self.returned[i], a["phrase"], a["headers"]))
        return out


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(exported, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("model_dir")
    for name in ("model.pt", "model.json", "index_to_name.json"):
        shutil.copy(exported / name, d / name)
    # Time to warm every bucket even on a busy machine: a warm-up cut short runs larger batches in
    # chunks, whose numerics differ from one batch, and these tests compare answers exactly.
    (d / "model-config.yaml").write_text("startupTimeout: 1200\n")
    return d


@pytest.fixture(scope="module")
def worker(model_dir) -> Worker:
    return Worker(model_dir)


@pytest.fixture(scope="module")
def detector(model_dir) -> Detector:
    """The handler's core in this process, padding batches to the same buckets as the Worker's
    handler (batch_size 8): a batch here runs exactly as the same batch there."""
    return Detector(model_dir / "model.pt", buckets=bucket_sizes(8))


@pytest.fixture(scope="module")
def card(model_dir) -> dict:
    return json.loads((model_dir / "model.json").read_text())


def jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92, **kw)
    return buf.getvalue()


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def images(val_images) -> dict[str, bytes]:
    """The synthetic val JPEGs, and some of them resized to odd sizes and formats."""
    base = Image.open(io.BytesIO(val_images[0])).convert("RGB")
    other = Image.open(io.BytesIO(val_images[1])).convert("RGB")
    return {
        "val0": val_images[0],
        "val1": val_images[1],
        "val2": val_images[2],
        "wide": jpeg(base.resize((640, 200))),
        "tall": png(other.resize((150, 500))),
        "small": png(base.resize((37, 23))),
        "big": jpeg(other.resize((900, 700))),
    }


# -- contract checks -------------------------------------------------------------------------------


def check_response(body: dict, width: int, height: int, card: dict, score_threshold: float, max_det: int):
    assert set(body) == {"model", "image", "detections", "request_id"}
    assert valid_request_id(body["request_id"])
    assert body["model"] == {"name": MODEL_NAME, "version": MODEL_VERSION}
    assert body["image"] == {"width": width, "height": height}
    dets = body["detections"]
    assert isinstance(dets, list) and len(dets) <= max_det
    for d in dets:
        assert set(d) == {"box", "score", "class_id", "label"}
        x1, y1, x2, y2 = d["box"]
        assert all(isinstance(v, float | int) for v in d["box"])
        assert 0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height
        assert isinstance(d["score"], float) and score_threshold <= d["score"] <= 1
        assert isinstance(d["class_id"], int) and 1 <= d["class_id"] <= len(card["classes"])
        assert d["label"] == card["classes"][d["class_id"] - 1]
    scores = [d["score"] for d in dets]
    assert scores == sorted(scores, reverse=True)


def without_id(body: dict) -> dict:
    """An answer without its request id (compared on its own)."""
    return {k: v for k, v in body.items() if k != "request_id"}


def size_of(data: bytes) -> tuple[int, int]:
    from PIL import ImageOps

    return ImageOps.exif_transpose(Image.open(io.BytesIO(data))).size


def same_detections(a: dict, b: dict) -> bool:
    """Two answers for the same image computed in batches of different composition agree.

    A different batch changes the network's float rounding (~1e-6 in the logits), and the fixture
    model, trained for three steps, gives scores within ~1e-4 of each other, so near-tied
    detections may swap places (or one NMS decision flip). Required: same image block, same
    count, the same top 5 in order, and at least 95 % of detections matched one to one (same
    class, score within the 5-decimal rounding, box within 0.05 px). An image answered with
    another image's boxes, scale or size matches almost nothing.
    """

    close = close_detections(score_tol=2e-5, box_tol=0.05)

    def match(p, q):
        return p["label"] == q["label"] and close(p, q)

    da, db = a["detections"], b["detections"]
    if a["image"] != b["image"] or len(da) != len(db):
        return False
    if not all(match(p, q) for p, q in zip(da[:5], db[:5], strict=True)):
        return False
    return count_matched(da, db, match) >= 0.95 * len(da)


def expected(detector: Detector, data: list[bytes], params: list[Params]) -> list[dict]:
    """What Detector gives for this exact batch (same composition as the handler's), per-request params."""
    images = [detector.decode(d) for d in data]
    dets = detector.detect_tensors(images, [p.iou_threshold for p in params]).cpu()
    return [
        {"model": {"name": MODEL_NAME, "version": MODEL_VERSION},
         **detector.to_response(d, img.width, img.height, p)}
        for d, img, p in zip(dets, images, params, strict=True)
    ]  # fmt: skip


# -- tests -----------------------------------------------------------------------------------------


def test_initialize(worker, card):
    h = worker.handler
    assert h.initialized
    assert h.model_info.to_json() == {"name": MODEL_NAME, "version": MODEL_VERSION}
    assert h.detector.num_classes == len(card["classes"]) == card["effdet_config"]["num_classes"]
    assert str(h.device) == "cpu"


SERVE_WITHOUT_TORCHVISION = """
import handler.effdet_handler
from handler.detector import Detector
loaded = sorted(m for m in sys.modules if m.split(".")[0] == "torchvision" or m.startswith("torch._dynamo"))
detector = Detector(sys.argv[1] + "/model.pt")
answers = detector.predict([open(f, "rb").read() for f in sys.argv[2:]], score_threshold=0.0)
print(json.dumps({"loaded": loaded, "answers": answers}))
"""


def test_worker_serves_without_importing_torchvision(exported, synthetic_dir, detector):
    """A worker imports the handler and runs it with torch alone: no torchvision package (its import
    pulls in its models and torch._dynamo, ~2 s of every worker start), only its NMS operator, loaded
    on its own. Catches a handler module that imports torchvision again, and an operator loaded
    wrongly (the answers would differ from this process's, where torchvision is imported)."""
    files = [str(p) for p in sorted((synthetic_dir / "images").glob("val_*.jpg"))[:3]]
    got = run_without_training_stack(SERVE_WITHOUT_TORCHVISION, str(exported), *files)
    assert got["loaded"] == []
    want = detector.predict([Path(f).read_bytes() for f in files], score_threshold=0.0)
    assert got["answers"] == json.loads(json.dumps(want)) and any(a["detections"] for a in want)


def test_request_shapes_answer_alike(worker, detector, images, card):
    """Raw body, multipart field 'data', JSON with base64 and query parameters: same answers, and
    exactly what Detector.predict gives in-process for the same batch."""
    data = images["val0"]
    b64 = base64.b64encode(data).decode()
    reqs = [
        Req(data, "image/jpeg", query={"score_threshold": "0"}),
        Req(data, "image/jpeg", field="data", query={"score_threshold": "0"}),
        json_req({"image": b64, "score_threshold": 0}),
        json_req({"image": "data:image/jpeg;base64," + b64}, score_threshold="0.0"),
    ]
    answers = worker.predict(reqs)
    # the rows the handler got have TorchServe's shapes
    assert isinstance(worker.rows[0]["body"], bytes | bytearray) and worker.rows[0]["score_threshold"] == b"0"
    assert isinstance(worker.rows[1]["data"], bytes | bytearray) and "body" not in worker.rows[1]
    assert isinstance(worker.rows[2]["body"], dict)
    want = detector.predict([data] * len(reqs), score_threshold=0.0)
    w, h = size_of(data)
    assert want[0]["detections"], "the fixture model should detect something at threshold 0"
    for a, expected in zip(answers, want, strict=True):
        assert a.status == 200
        check_response(a.body, w, h, card, 0.0, detector.max_det_per_image)
        assert without_id(a.body) == {"model": {"name": MODEL_NAME, "version": MODEL_VERSION}, **expected}
        assert a.raw == a.body  # the wire carries exactly what handle() returned


def by_score(d: dict) -> tuple:
    return -d["score"], d["box"], d["class_id"]


def test_default_parameters_from_card(detector, model_dir, images, card, tmp_path):
    """A request without parameters gets the card's default score threshold.

    The fixture model scores far below effdet's 0.05, so the card is given a default taken from
    its actual scores: one that keeps some detections and drops others.
    """
    data = images["val1"]
    [full] = detector.predict([data], score_threshold=0.0)
    scores = [d["score"] for d in full["detections"]]
    default = scores[len(scores) // 2]
    kept = [d for d in full["detections"] if d["score"] >= default]
    assert 0 < len(kept) < len(scores)
    for name in ("model.pt", "index_to_name.json"):
        (tmp_path / name).symlink_to(model_dir / name)
    (tmp_path / "model.json").write_text(
        json.dumps({**card, "postprocessing": {**card.get("postprocessing", {}), "score_threshold": default}})
    )
    [a] = Worker(tmp_path).predict([Req(data, "image/jpeg")])
    assert a.status == 200
    check_response(a.body, *size_of(data), card, default, detector.max_det_per_image)
    # Rows whose scores tie exactly (anchors over the letterbox padding see the same pixels) may come
    # in either order from two NMS runs over different candidate sets: the same rows, in score order.
    assert sorted(a.body["detections"], key=by_score) == sorted(kept, key=by_score)


def test_score_threshold_and_max_detections(worker, detector, images, card):
    data = images["val2"]
    # the handler's batch below is 4 copies of this image: the same batch gives the same floats
    [full] = detector.predict([data] * 4, score_threshold=0.0)[:1]
    scores = [d["score"] for d in full["detections"]]
    assert len(scores) >= 4
    # a reported score in the middle with smaller ones after it: a threshold that really cuts
    m = next(i for i in range(len(scores) // 2, len(scores)) if scores[i] < scores[i - 1])
    thr = scores[m - 1]
    reqs = [
        Req(data, "image/jpeg", query={"score_threshold": str(thr)}),
        Req(data, "image/jpeg", query={"score_threshold": "0", "max_detections": "3"}),
        json_req({"image": base64.b64encode(data).decode(), "score_threshold": "0", "max_detections": 1}),
        # JSON fields and query parameters combine; the JSON field wins where both are given
        json_req(
            {"image": base64.b64encode(data).decode(), "max_detections": 2},
            score_threshold="0",
            max_detections="7",
        ),
    ]
    a = worker.predict(reqs)
    assert all(x.status == 200 for x in a)
    check_response(a[0].body, *size_of(data), card, thr, 100)
    assert a[0].body["detections"] == full["detections"][:m]
    assert all(d["score"] >= thr for d in a[0].body["detections"])
    assert a[1].body["detections"] == full["detections"][:3]
    assert a[2].body["detections"] == full["detections"][:1]
    assert a[3].body["detections"] == full["detections"][:2]


def max_same_class_iou(body: dict) -> float:
    dets = body["detections"]
    best = 0.0
    for c in {d["class_id"] for d in dets}:
        boxes = torch.tensor([d["box"] for d in dets if d["class_id"] == c])
        if len(boxes) > 1:
            best = max(best, box_iou(boxes, boxes).fill_diagonal_(0).nan_to_num(0).max().item())
    return best


def test_iou_threshold_per_request(worker, detector, images, card):
    """Requests with different IoU thresholds share a batch; each gets its own NMS."""
    data = images["val0"]
    ious = (0.1, 1.0, 0.5, 0.3)
    reqs = [Req(data, "image/jpeg", query={"score_threshold": "0", "iou_threshold": str(v)}) for v in ious]
    a = worker.predict(reqs)
    want = expected(detector, [data] * len(ious), [Params(0.0, v, 100) for v in ious])
    for ans, w, v in zip(a, want, ious, strict=True):
        assert ans.status == 200
        check_response(ans.body, *size_of(data), card, 0.0, detector.max_det_per_image)
        assert without_id(ans.body) == w, v
        [alone] = detector.predict([data], score_threshold=0.0, iou_threshold=v)
        assert same_detections(ans.body, {"model": ans.body["model"], **alone}), v
    # each answer obeys its own threshold, and the thresholds really change the answer
    assert max_same_class_iou(a[0].body) <= 0.1 + 1e-3
    assert max_same_class_iou(a[2].body) <= 0.5 + 1e-3
    assert max_same_class_iou(a[1].body) > 0.5
    assert a[0].body["detections"] != a[2].body["detections"] != a[1].body["detections"]


def test_mixed_size_batch_each_answered_alone(worker, detector, images, card):
    names = ["wide", "tall", "small", "big"]
    a = worker.predict([Req(images[k], "image/jpeg", query=ALL) for k in names])
    want = expected(detector, [images[k] for k in names], [Params(0.0, 0.5, 100)] * len(names))
    for name, ans, w in zip(names, a, want, strict=True):
        assert ans.status == 200
        check_response(ans.body, *size_of(images[name]), card, 0.0, detector.max_det_per_image)
        assert without_id(ans.body) == w, name
        [alone] = detector.predict([images[name]], score_threshold=0.0)
        assert same_detections(ans.body, {"model": ans.body["model"], **alone}), name
    # different images, different answers (no image is answered with another one's boxes)
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            assert not same_detections(a[i].body, {**a[j].body, "image": a[i].body["image"]}), (i, j)
    assert [(ans.body["image"]["width"], ans.body["image"]["height"]) for ans in a] == [
        (640, 200),
        (150, 500),
        (37, 23),
        (900, 700),
    ]


@pytest.mark.parametrize("orientation,expect", [(6, (200, 320)), (8, (200, 320))])
def test_exif_rotated_jpeg(worker, detector, images, card, orientation, expect):
    img = Image.open(io.BytesIO(images["val0"])).convert("RGB").resize((320, 200))
    exif = Image.Exif()
    exif[274] = orientation
    data = jpeg(img, exif=exif.tobytes())
    [a] = worker.predict([Req(data, "image/jpeg", query=ALL)])
    assert a.status == 200
    assert (a.body["image"]["width"], a.body["image"]["height"]) == expect
    check_response(a.body, *expect, card, 0.0, detector.max_det_per_image)
    [alone] = detector.predict([data], score_threshold=0.0)  # the same batch of one: exactly equal
    assert without_id(a.body) == {"model": a.body["model"], **alone}


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose IHDR (correct CRC) claims width x height; no pixel data follows."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def bad_requests(good: bytes) -> list[tuple[str, Req, int, str]]:
    jpg = "image/jpeg"
    b64_text = base64.b64encode(b"this is not an image").decode()
    return [
        ("empty body", Req(b"", jpg), 400, "empty_body"),
        ("no body at all", Req(None, query={"score_threshold": "0.3"}), 400, "empty_body"),
        ("one byte", Req(b"\xff", jpg), 415, "not_an_image"),
        ("text body", Req(b"hello there", "text/plain"), 415, "not_an_image"),
        ("json without image", json_req({"score_threshold": 0.2}), 400, "missing_image"),
        ("json image not a string", json_req({"image": 12}), 400, "missing_image"),
        ("json list", json_req([1, 2, 3]), 400, "invalid_body"),
        ("bad base64", json_req({"image": "@@not*base64@@"}), 400, "invalid_base64"),
        ("base64 of text", json_req({"image": b64_text}), 415, "not_an_image"),
        ("truncated jpeg", Req(good[: len(good) // 2], jpg), 400, "invalid_image"),
        ("png claiming 30000x30000", Req(png_claiming(30000, 30000), "image/png"), 413, "too_many_pixels"),
        ("score_threshold > 1", Req(good, jpg, query={"score_threshold": "1.5"}), 400, "invalid_parameter"),
        ("score_threshold < 0", Req(good, jpg, query={"score_threshold": "-0.1"}), 400, "invalid_parameter"),
        ("score_threshold text", Req(good, jpg, query={"score_threshold": "high"}), 400, "invalid_parameter"),
        ("score_threshold nan", Req(good, jpg, query={"score_threshold": "nan"}), 400, "invalid_parameter"),
        ("score_threshold json bool", json_req({"image": base64.b64encode(good).decode(), "score_threshold": True}),
         400, "invalid_parameter"),
        ("iou_threshold 0", Req(good, jpg, query={"iou_threshold": "0"}), 400, "invalid_parameter"),
        ("iou_threshold > 1", Req(good, jpg, query={"iou_threshold": "1.01"}), 400, "invalid_parameter"),
        ("iou_threshold text", Req(good, jpg, query={"iou_threshold": "x"}), 400, "invalid_parameter"),
        ("max_detections 0", Req(good, jpg, query={"max_detections": "0"}), 400, "invalid_parameter"),
        ("max_detections over cap", Req(good, jpg, query={"max_detections": "101"}), 400, "invalid_parameter"),
        ("max_detections fraction", Req(good, jpg, query={"max_detections": "2.5"}), 400, "invalid_parameter"),
        ("max_detections text", Req(good, jpg, query={"max_detections": "ten"}), 400, "invalid_parameter"),
        ("max_detections inf", Req(good, jpg, query={"max_detections": "inf"}), 400, "invalid_parameter"),
        # non-ASCII values: they must reach neither the reason phrase nor anything but the escaped body
        ("score_threshold e-acute", Req(good, jpg, query={"score_threshold": "\u00e9"}), 400, "invalid_parameter"),
        ("score_threshold emoji", Req(good, jpg, query={"score_threshold": "\U0001f600"}), 400, "invalid_parameter"),
        ("iou_threshold long non-ASCII", Req(good, jpg, query={"iou_threshold": "\u00e9" * 5000}), 400,
         "invalid_parameter"),
        ("max_detections json emoji", json_req({"image": base64.b64encode(good).decode(), "max_detections": "\U0001f600"}),
         400, "invalid_parameter"),
    ]  # fmt: skip


def test_errors_are_per_request(worker, detector, images, card):
    """Every bad request gets its own 4xx JSON error; batch-mates in the same call get 200."""
    good = images["val1"]
    assert detector.max_det_per_image == 100  # "max_detections over cap" uses 101
    cases = bad_requests(good)
    reqs, expect = [], []
    for i, (name, req, status, code) in enumerate(cases):
        reqs.append(req)
        expect.append((name, status, code))
        if i % 6 == 0:  # good requests spread through the batch
            reqs.append(Req(good, "image/jpeg", query=ALL))
            expect.append(("good", 200, None))
    answers = worker.predict(reqs)
    n_good = sum(s == 200 for _, s, _ in expect)
    # only the good requests reach the network, as one batch: the same batch in Detector
    want = iter(detector.predict([good] * n_good, score_threshold=0.0))
    for idx, ((name, status, code), a) in enumerate(zip(expect, answers, strict=True)):
        assert a.status == status, name
        if status == 200:
            check_response(a.body, *size_of(good), card, 0.0, 100)
            assert without_id(a.body) == {"model": a.body["model"], **next(want)}, (
                "good request in a batch with errors"
            )
        else:
            assert set(a.body) == {"error"}, name
            assert set(a.body["error"]) == {"code", "message"}, name
            assert a.body["error"]["code"] == code, name
            assert isinstance(a.body["error"]["message"], str) and a.body["error"]["message"], name
            # the reason phrase is the fixed ASCII phrase of the status; details only in the body
            assert worker.context.get_response_status(idx)[1] == HTTPStatus(status).phrase, name
            assert a.phrase == HTTPStatus(status).phrase, name
            assert len(a.body["error"]["message"]) < 300, name  # bad values are echoed short
    assert sum(a.status == 200 for a in answers) == n_good >= 4


def test_request_id_echoed_or_replaced(worker, images):
    """Each answer (200 and 4xx) carries its request's X-Request-Id in its X-Client-Request-Id
    header, a 200 also in its JSON; a hostile or absent id is replaced by TorchServe's own id for that request."""
    good = images["val0"]
    ids = [
        "3fa85f64-5717-4562-b3fc-2c963f66afa6",
        "a\rb",
        '"}, "x": 1',
        "\u00e9t\u00e9",
        "z" * 129,
        "ok.1:2_3",
    ]
    reqs = [Req(good, "image/jpeg", query=ALL, headers={REQUEST_ID_HEADER: rid}) for rid in ids]
    reqs.insert(2, Req(b"not an image", "image/jpeg", headers={"x-request-id": "err-7"}))
    reqs.append(Req(good, "image/jpeg", query=ALL))  # no id sent
    answers = worker.predict(reqs)  # checks header/JSON against what was sent, per request
    got = [a.headers[REQUEST_ID_ECHO_HEADER] for a in answers]
    assert got == [ids[0], "req-1", "err-7", "req-3", "req-4", "req-5", ids[5], "req-7"]
    assert answers[2].status == 415 and set(answers[2].body) == {"error"}  # the error schema is unchanged
    for a in answers:
        assert valid_request_id(a.headers[REQUEST_ID_ECHO_HEADER])
        if a.status == 200:
            assert a.body["request_id"] == a.headers[REQUEST_ID_ECHO_HEADER]


def test_valid_edge_parameters(worker, detector, images):
    """The closed ends of the ranges are accepted: score 0 and 1, IoU 1, max_detections 1 and the cap."""
    good = images["val0"]
    full = detector.predict([good] * 5, score_threshold=0.0)[0]["detections"]  # the handler's batch below
    assert len(full) == 100, "the fixture model shows max_det_per_image detections at threshold 0"
    distinct = sorted({d["score"] for d in full}, reverse=True)  # the tiny model's scores tie often
    mid = distinct[len(distinct) // 2]
    qs = [
        {"score_threshold": "1", "iou_threshold": "1"},
        {"max_detections": "1", "score_threshold": "0"},
        {"max_detections": "5.0", "score_threshold": "0"},
        {"max_detections": "100", "score_threshold": "0"},
        {"score_threshold": f" {mid} "},  # surrounding spaces, as a form field may carry them
    ]
    answers = worker.predict([Req(good, "image/jpeg", query=q) for q in qs])
    assert [a.status for a in answers] == [200] * len(qs)
    assert len(answers[1].body["detections"]) == 1
    assert len(answers[2].body["detections"]) == 5
    assert len(answers[3].body["detections"]) == 100  # the cap itself is allowed and reached
    # every row at or above the threshold, and the same top rows as without one (more candidates
    # may clear it than fitted in the unthresholded answer's 100)
    cut = answers[4].body["detections"]
    above = [d for d in full if d["score"] >= mid]
    assert 0 < len(above) < len(full) and all(d["score"] >= mid for d in cut)
    assert cut[: len(above)] == above


def test_batch_of_only_errors(worker):
    answers = worker.predict([Req(b"", "image/jpeg"), Req(b"nope", "image/jpeg")])
    assert [a.status for a in answers] == [400, 415]


def test_worker_keeps_serving_after_errors(worker, detector, images):
    worker.predict([Req(png_claiming(30000, 30000), "image/png"), Req(b"\x00", "image/jpeg")])
    [a] = worker.predict([Req(images["small"], "image/png", query=ALL)])
    assert a.status == 200
    assert a.body["detections"] == detector.predict([images["small"]], score_threshold=0.0)[0]["detections"]


def test_describe(worker, card, detector):
    # What the frontend sends for GET /models/tiny?customized=true: one row, headers only
    [a] = worker.predict([Req(None, headers={"describe": "True"})])
    assert a.status == 200
    desc = a.body
    assert a.raw == desc
    assert desc["classes"] == card["classes"]
    assert desc["model"] == {"name": MODEL_NAME, "version": MODEL_VERSION}
    assert desc["image_size"] == card["preprocessing"]["size"]
    assert (
        desc["defaults"]["max_detections"] == desc["limits"]["max_detections"] == detector.max_det_per_image
    )
    assert desc["device"] == "cpu"
    # fit for inference clients: nothing of the training machine (paths, versions, metrics)
    assert set(desc) == {"model", "classes", "image_size", "defaults", "limits", "device"}
    assert "provenance" in card and str(card["provenance"]) not in json.dumps(desc)
    assert json.loads(worker.handler.describe_handle()) == desc


def test_describe_rows_leave_batch_mates_alone(worker, images, detector):
    """The describe header on /predictions, first in a batch, with and without a body: each such
    row gets the card, the predictions next to it their own answers."""
    card = json.loads(worker.handler.describe_handle())
    answers = worker.predict(
        [
            Req(None, headers={"describe": "True"}),
            Req(images["val0"], "image/jpeg", query=ALL),
            Req(images["val0"], "image/jpeg", headers={"Describe": "true"}),
            Req(b"not an image", "image/jpeg"),
        ]
    )
    assert [a.status for a in answers] == [200, 200, 200, 415]
    assert answers[0].body == answers[2].body == card
    assert (
        answers[1].body["detections"]
        == detector.predict([images["val0"]], score_threshold=0.0)[0]["detections"]
    )
    assert answers[3].body["error"]["code"] == "not_an_image"


def test_form_encoded_body_refused(worker, images):
    [a] = worker.predict(
        [Req(b"x", "", field="image", headers={"Content-Type": "application/x-www-form-urlencoded"})]
    )
    assert a.status == 415 and a.body["error"]["code"] == "form_encoded"


def test_metrics_emitted(worker, images, caplog):
    caplog.set_level(logging.INFO, logger="ts.metrics.caching_metric")
    worker.predict([Req(images["val0"], "image/jpeg", query=ALL), Req(b"", "image/jpeg")])
    keys = set(worker.metrics.cache_keys())
    for name in ("EffDetPreprocessTime", "EffDetInferenceTime", "EffDetPostprocessTime"):
        assert f"gauge:{name}" in keys
    assert "counter:EffDetDetections" in keys
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[METRICS]")]
    inference = [ln for ln in lines if ln.startswith("[METRICS]EffDetInferenceTime.")]
    assert len(inference) == 1
    value = float(inference[0].split(":", 1)[1].split("|", 1)[0])
    assert value > 0
    assert f"ModelName:{MODEL_NAME}" in inference[0]
    detections = [ln for ln in lines if ln.startswith("[METRICS]EffDetDetections.")]
    assert len(detections) == 1  # one for the good request, none for the error


def test_reported_scores_never_below_threshold(detector):
    """Scores are reported to 5 decimals; the threshold applies to what the caller is shown."""
    rows = torch.zeros(detector.max_det_per_image, 6)
    rows[:3] = torch.tensor(
        [
            [1.0, 2.0, 3.0, 4.0, 0.5000014, 1.0],  # shown as 0.5
            [1.0, 2.0, 3.0, 4.0, 0.4999996, 2.0],  # shown as 0.5
            [1.0, 2.0, 3.0, 4.0, 0.4999940, 3.0],  # shown as 0.49999
        ],
        dtype=torch.float64,
    ).float()

    def shown(thr: float) -> list[float]:
        return [d["score"] for d in detector.to_response(rows, 10, 10, Params(thr, 0.5, 100))["detections"]]

    assert shown(0.5) == [0.5, 0.5]
    assert shown(0.500001) == []  # 0.5000014 passes the raw threshold but would be shown as 0.5
    assert shown(0.49999) == [0.5, 0.5, 0.49999]
    assert shown(0.0) == [0.5, 0.5, 0.49999]  # padding rows (score 0) are never answers


# -- KServe v1 through TorchServe's kserve envelope -------------------------------------------------


@pytest.fixture(scope="module")
def kserve(model_dir) -> Worker:
    """The handler behind TorchServe's own ``kserve`` envelope, as deploy/kserve/ runs it."""
    return Worker(model_dir, envelope="kserve")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_kserve_instances_answered_in_order_with_errors_in_place(kserve, detector, images, card):
    """A v1 body of three instances, the middle one not an image: one entry per instance in
    ``predictions``, in order; the bad one its own ``{"error"}`` entry while the request stays 200;
    each good one exactly Detector's answer for the same batch with its own parameters. Caught: an
    error failing the whole request or shifting its neighbours' answers, one instance's parameters
    applied to another, an instance dropped."""
    good = [images["val0"], images["wide"]]
    req = json_req({"instances": [{"image": b64(good[0]), "score_threshold": 0.3, "max_detections": 5},
                                  {"image": b64(b"not an image")},
                                  {"image": b64(good[1]), "iou_threshold": 0.3}]})  # fmt: skip
    [a] = kserve.predict([req], check_ids=False)
    assert a.status == 200 and set(a.body) == {"predictions"}
    first, bad, third = a.body["predictions"]
    assert set(bad) == {"error"} and bad["error"]["code"] == "not_an_image"
    defaults = kserve.handler.detector.defaults
    want = expected(
        detector, good, [Params(0.3, defaults.iou_threshold, 5), replace(defaults, iou_threshold=0.3)]
    )
    assert [first, third] == want
    assert len(first["detections"]) == 5 and all(d["score"] >= 0.3 for d in first["detections"])


def test_kserve_lone_instance_gets_the_request_status(kserve, detector, images):
    """One instance is one request: a bad one also sets the request's own 4xx (fixed ASCII phrase),
    a good one gets the request id like any prediction. Caught: a lone bad instance answered 200."""
    [bad] = kserve.predict(
        [json_req({"instances": [{"image": b64(b"\xff\xd8 not a jpeg")}]})], check_ids=False
    )
    assert bad.status == 415 and bad.phrase == "Unsupported Media Type", (bad.status, bad.body)
    assert [set(p) for p in bad.body["predictions"]] == [{"error"}]
    rid = "kserve-1"
    [ok] = kserve.predict(
        [Req(json.dumps({"instances": [{"image": b64(images["val1"])}]}).encode(), "application/json",
             headers={"X-Request-Id": rid})],
        check_ids=False,
    )  # fmt: skip
    assert ok.status == 200 and ok.headers[REQUEST_ID_ECHO_HEADER] == rid
    [answer] = ok.body["predictions"]
    assert answer["request_id"] == rid
    assert without_id(answer) == expected(detector, [images["val1"]], [kserve.handler.detector.defaults])[0]


def json_typed(payload, content_type: str) -> Req:
    """A JSON body as the frontend hands it for ``content_type``: TorchServe's worker parses only the
    exact spelling ``application/json`` into a dict; any other (``Application/JSON``, with a charset,
    ``+json``) arrives as bytes."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return Req(body, content_type, headers={"Content-Type": content_type})


def test_json_media_types_and_mime_base64(worker, detector, images):
    """JSON bodies under any spelling of a JSON media type, and base64 with the line breaks and
    spaces MIME base64 allows (what ``base64`` prints), answer as the canonical request does.
    Catches a handler that compares media types case-sensitively (415 not_an_image for a valid
    ``Application/JSON`` body) or refuses ``base64``'s default output."""
    data = images["val0"]
    b64 = base64.b64encode(data).decode()
    mime = base64.encodebytes(data).decode()  # 76-character lines, "\n" after each
    assert "\n" in mime.rstrip("\n")
    accepted = [
        json_req({"image": b64, **ALL}),  # the canonical form, parsed by TorchServe
        json_typed({"image": b64, **ALL}, "Application/JSON"),
        json_typed({"image": b64, **ALL}, "application/json; charset=UTF-8"),
        json_typed({"image": b64, **ALL}, "APPLICATION/VND.EFFDET+JSON"),
        json_req({"image": mime, **ALL}),
        json_req({"image": mime.replace("\n", "\r\n"), **ALL}),
        json_req({"image": " ".join(b64[i : i + 4] for i in range(0, len(b64), 4)) + "\t\n", **ALL}),
        json_req({"image": "data:image/jpeg;base64," + mime, **ALL}),
    ]
    answers = worker.predict(accepted)
    assert isinstance(worker.rows[0]["body"], dict) and isinstance(worker.rows[1]["body"], bytes | bytearray)
    want = detector.predict([data] * len(accepted), score_threshold=0.0)
    for i, (a, w) in enumerate(zip(answers, want, strict=True)):
        assert a.status == 200, (i, a.body)
        assert without_id(a.body) == {"model": a.body["model"], **w}, i

    assert "+" in b64 or "/" in b64
    assert len(data) % 3, "a length that needs padding"
    refused = [
        (json_req({"image": b64.replace("+", "-").replace("/", "_")}), 400, "invalid_base64"),  # URL-safe
        (json_req({"image": b64.rstrip("=")}), 400, "invalid_base64"),  # padding cut
        (json_req({"image": b64[:100] + "\f" + b64[100:]}), 400, "invalid_base64"),  # not MIME whitespace
        (json_req({"image": b64[:100] + "\v" + b64[100:]}), 400, "invalid_base64"),
        (json_req({"image": b64[:100] + "\u00a0" + b64[100:]}), 400, "invalid_base64"),
        (json_req({"image": b64[:100] + "*" + b64[100:]}), 400, "invalid_base64"),
        (json_typed(b'{"image": "' + b64[:50].encode(), "Application/JSON"), 400, "invalid_json"),
        (json_typed(b'{"image": "\xff"}', "application/json; charset=utf-8"), 400, "invalid_json"),
        (json_typed({"image": b64}, "application/jsonx"), 415, "not_an_image"),  # not a JSON type: bytes
        (json_typed({"image": b64}, "image/jpeg"), 415, "not_an_image"),  # JSON under an image type
    ]
    answers = worker.predict([r for r, _, _ in refused] + [Req(data, "image/jpeg", query=ALL)])
    for (req, status, code), a in zip(refused, answers, strict=False):
        assert (a.status, a.body["error"]["code"]) == (status, code), (req.content_type, a.body)
    assert answers[-1].status == 200  # the batch-mate


def test_warm_up_budget():
    """Half the model's startupTimeout (TorchServe restarts a worker not READY by then), 60 s with
    TorchServe's default, or warmup_seconds when that is less."""
    assert HandlerConfig().warmup_budget() == 60 == HandlerConfig().warmup_budget("x")
    assert HandlerConfig().warmup_budget(600) == 300
    assert HandlerConfig(warmup_seconds=5).warmup_budget(600) == 5
    assert HandlerConfig(warmup_seconds=500).warmup_budget(600) == 300
    for bad in (0, -1, float("inf"), float("nan"), True, "5"):
        with pytest.raises(ValueError, match="warmup_seconds"):
            HandlerConfig(warmup_seconds=bad)


def test_deadline_margin_setting():
    """``deadline_margin_ms``: a number of ms >= 0 (0 turns the margin off), from the handler section."""
    assert HandlerConfig().deadline_margin_ms == 50.0
    assert HandlerConfig.from_yaml({"deadline_margin_ms": 0}).deadline_margin_ms == 0.0
    for bad in (-1, float("inf"), float("nan"), True, "5"):
        with pytest.raises(ValueError, match="deadline_margin_ms"):
            HandlerConfig(deadline_margin_ms=bad)


def test_batch_size_refused_at_load(model_dir):
    """A batchSize above MAX_BATCH_SIZE (TorchServe registers any) is refused before the model is
    loaded, as a RuntimeError: TorchServe's worker then answers the load with a 500 and logs the
    message, where a worker once warmed batch buckets up to 100000 and never became READY."""
    for size in (MAX_BATCH_SIZE + 1, 100_000):
        handler = EffDetHandler()
        service = Service(MODEL_NAME, str(model_dir), MANIFEST, None, None, size, True, None)
        with pytest.raises(BatchSizeRefused) as e:
            handler.initialize(service.context)
        assert isinstance(e.value, RuntimeError) and not hasattr(handler, "detector")
        assert str(e.value) == (
            f"batchSize {size} refused: the handler serves batches of 1..{MAX_BATCH_SIZE} (warm-up time and "
            f"worker memory grow with the batch); register the model with batch_size <= {MAX_BATCH_SIZE}"
        )
