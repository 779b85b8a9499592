"""The served detector end to end: a real TorchServe (Java frontend + Python workers) on free
loopback ports, archives from the real torch-model-archiver, real HTTP with token auth.

The module serves its model ``tiny`` on the run's shared TorchServe (conftest ``shared_server``),
whose workers cannot import effdet, timm, Lightning, ``train`` or ``export``: every answer here
is also served without the training stack.

Served answers are compared exactly with ``handler.detector.Detector`` in this process on the
same TorchScript file (``tests.helpers.Reference``): the network's output for an image depends
only on the size of the batch it ran in, so a served answer equals the in-process answer for
that image in a batch of one of the server's bucket sizes, row for row. The fixture model's
scores differ from row to row, so the parameters' cuts are well defined. An image answered
with another one's detections, a lost parameter or a mixed-up row matches none.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import requests
import yaml
from PIL import Image

from handler.config import HandlerConfig
from handler.request import valid_request_id
from scripts.archive import archive
from scripts.client import Client
from scripts.client.scale import scale
from scripts.load import Images, Traffic
from scripts.paths import ROOT
from scripts.serve import Server
from scripts.settings import MAX_WORKERS, InvalidArgument, ModelConfig
from tests.helpers import BLOCKED, Reference, blocking_env, close_detections, count_matched

MODEL = "tiny"
BATCH = 4
V2_FILE = "tiny_v2.mar"  # torch-model-archiver names files NAME.mar: v2 of "tiny" is renamed
STARTUP_TIMEOUT = 600  # s


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(shared_server, exported, tmp_path_factory):
    """The shared server serving tiny 1.0 (tiny.mar), with tiny_v2.mar (2.0) in its store: batchSize
    4, served default score_threshold 0.0, so that a raw-bytes request (which cannot carry
    parameters) shows all of the model's detections.

    Workers may take up to STARTUP_TIMEOUT s to start (TorchServe's default, 120 s, is too short for
    a worker started beside busy ones on a 2-core machine that runs other jobs too)."""
    made = tmp_path_factory.mktemp("serving")
    cfg = ModelConfig(batch_size=BATCH, max_batch_delay=50, handler=HandlerConfig(score_threshold=0.0))
    with shared_server.lease(MODEL) as srv:
        v1 = archive(exported, MODEL, "1.0", made / "v1", cfg)
        v2 = archive(exported, MODEL, "2.0", made / "v2", cfg)
        for mar in (v1, v2):
            with_startup_timeout(mar, STARTUP_TIMEOUT)
        srv.add(v1)
        srv.add(v2, V2_FILE)
        r = srv.client().register(f"{MODEL}.mar", initial_workers=1)
        assert r.status_code == 200, r.text
        yield srv.server


@pytest.fixture(scope="module")
def shared(shared_server, server):
    return shared_server


@pytest.fixture(scope="module")
def serving_store(server) -> Path:
    return server.model_store


def with_startup_timeout(mar: Path, seconds: int) -> None:
    """Set ``startupTimeout`` in an archive's model-config.yaml, in place."""
    tmp = mar.with_suffix(".tmp")
    with zipfile.ZipFile(mar) as zin, zipfile.ZipFile(tmp, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename == "model-config.yaml":
                data = yaml.safe_dump({**yaml.safe_load(data), "startupTimeout": seconds}).encode()
            zout.writestr(info, data)
    tmp.replace(mar)


@pytest.fixture(scope="module")
def client(server) -> Client:
    return Client(server.inference_url, server.management_url, server.key_file)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def images(val_images) -> dict[str, bytes]:
    """Images of several sizes, modes and formats, an EXIF-rotated JPEG and its upright twin, and
    two different pictures of one size (val0 and its mirror image): their answers can only be told
    apart by their detections."""
    base = Image.open(io.BytesIO(val_images[0])).convert("RGB")
    other = Image.open(io.BytesIO(val_images[1])).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: stored landscape, shown rotated 90 degrees clockwise
    stored = other.resize((320, 200))
    upright = Image.open(io.BytesIO(_encode(stored, "JPEG", quality=95)))  # the decoded pixels
    return {
        "val0": val_images[0],
        "val0_mirrored": _encode(base.transpose(Image.Transpose.FLIP_LEFT_RIGHT), "PNG"),
        "val2": val_images[2],
        "val3": val_images[3],
        "large_jpeg": _encode(base.resize((640, 480)), "JPEG", quality=90),
        "thin_png": _encode(base.resize((97, 300)), "PNG"),
        "wide_rgba_png": _encode(base.resize((1000, 150)).convert("RGBA"), "PNG"),
        "grey_png": _encode(base.resize((200, 200)).convert("L"), "PNG"),
        "exif6_jpeg": _encode(stored, "JPEG", quality=95, exif=exif),
        "exif6_upright_png": _encode(upright.transpose(Image.Transpose.ROTATE_270), "PNG"),
    }


@pytest.fixture(scope="module")
def reference(detector) -> Reference:
    """What the served tiny model may answer: in-process answers at its bucket sizes (1, 2, 3, 4)."""
    return Reference(detector, BATCH)


@pytest.fixture(scope="module")
def local(detector, images) -> dict[str, dict]:
    """The in-process answer for every image, one at a time, score_threshold 0.0."""
    return {k: detector.predict([b], score_threshold=0.0)[0] for k, b in images.items()}


# -- helpers ---------------------------------------------------------------------------------------
def assert_schema(body: dict, classes: list[str], version: str = "1.0", max_det: int = 100) -> None:
    assert set(body) == {"model", "image", "detections", "request_id"}
    assert valid_request_id(body["request_id"])
    assert body["model"] == {"name": MODEL, "version": version}
    assert set(body["image"]) == {"width", "height"}
    w, h = body["image"]["width"], body["image"]["height"]
    assert isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0
    dets = body["detections"]
    assert len(dets) <= max_det
    for d in dets:
        assert set(d) == {"box", "score", "class_id", "label"}
        x1, y1, x2, y2 = d["box"]
        assert 0 <= x1 <= x2 <= w and 0 <= y1 <= y2 <= h, (d["box"], w, h)
        assert 0 <= d["score"] <= 1
        assert isinstance(d["class_id"], int) and 1 <= d["class_id"] <= len(classes)
        assert d["label"] == classes[d["class_id"] - 1]
    scores = [d["score"] for d in dets]
    assert scores == sorted(scores, reverse=True)


def matched(served: list[dict], ref: list[dict], box_tol: float = 0.01, score_tol: float = 2e-5) -> int:
    """How many served detections find a distinct partner in ``ref`` (same class, box, score)."""
    return count_matched(served, ref, close_detections(score_tol, box_tol))


def without_id(body: dict) -> dict:
    return {k: v for k, v in body.items() if k != "request_id"}


def worker_pids(client: Client, version: str | None = None) -> list[int]:
    entries = client.describe(MODEL, version) if version else client.describe(MODEL)
    return sorted(w["pid"] for e in entries for w in e["workers"])


def batches_seen(server: Server, version: str = "1.0", model: str = MODEL) -> int:
    """Batches the model's workers received: the Python backend logs one line per predict message."""
    log = server.workdir / "logs" / "model_log.log"
    tag = f"-{model}_{version}-stdout"
    return sum(
        1
        for line in log.read_text(errors="replace").splitlines()
        if tag in line and "Backend received inference" in line
    )


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def tiny_files(store: Path) -> list[str]:
    from tests.helpers import mar_model_name

    return sorted(p.name for p in store.glob("*.mar") if mar_model_name(p) == MODEL)


# -- the archive -----------------------------------------------------------------------------------
def test_mar_contents(model_store, exported):
    """The fixture's tiny.mar holds exactly the handler package, model files and config we expect."""
    with zipfile.ZipFile(model_store / f"{MODEL}.mar") as z:
        names = set(z.namelist())
        handler_files = {p.name for p in (ROOT / "handler").glob("*.py")}
        assert names == {
            "MAR-INF/MANIFEST.json",
            "model.pt",
            "effdet_handler.py",
            "model.json",
            "index_to_name.json",
            "model-config.yaml",
            *(f"handler/{n}" for n in handler_files),
        }
        manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
        assert manifest["runtime"] == "python"
        assert manifest["model"] == {
            "modelName": MODEL,
            "serializedFile": "model.pt",
            "handler": "effdet_handler.py",
            "modelVersion": "1.0",
            "configFile": "model-config.yaml",
        }
        cfg = yaml.safe_load(z.read("model-config.yaml"))
        assert cfg["batchSize"] == 4 and cfg["maxBatchDelay"] == 50
        assert cfg["minWorkers"] == 1 and cfg["maxWorkers"] == 1
        assert cfg["deviceType"] == "cpu" and cfg["responseTimeout"] == 120
        assert cfg["handler"]["precision"] == "fp32" and cfg["handler"]["max_pixels"] > 0
        # what is shipped is what is in the repo and what export wrote, byte for byte
        assert z.read("effdet_handler.py") == (ROOT / "handler" / "effdet_handler.py").read_bytes()
        for n in handler_files:
            assert z.read(f"handler/{n}") == (ROOT / "handler" / n).read_bytes(), n
        for n in ("model.pt", "model.json", "index_to_name.json"):
            assert z.read(n) == (exported / n).read_bytes(), n
        # the worker side imports nothing from the training stack
        for n in names:
            if n.endswith(".py"):
                src = z.read(n).decode()
                for mod in BLOCKED:
                    assert not re.search(rf"^\s*(import|from)\s+{mod}\b", src, re.M), (n, mod)


# -- token auth ------------------------------------------------------------------------------------
def refused(r: requests.Response) -> bool:
    """TorchServe's answer to a missing, wrong or other-API token: 400 and its own message."""
    return r.status_code == 400 and "Token Authorization failed" in r.text


def test_token_auth(server, images):
    keys = server.tokens()
    inf, man = server.inference_url, server.management_url
    assert refused(requests.get(f"{inf}/ping", timeout=10))
    assert refused(requests.get(f"{inf}/ping", headers=bearer("not-the-key"), timeout=10))
    ok = requests.get(f"{inf}/ping", headers=bearer(keys["inference"]), timeout=10)
    assert ok.status_code == 200 and ok.json()["status"] == "Healthy"

    url = f"{inf}/predictions/{MODEL}"
    assert refused(requests.post(url, data=images["val0"], timeout=60))
    assert refused(requests.post(url, data=images["val0"], headers=bearer(keys["management"]), timeout=60))
    good = requests.post(url, data=images["val0"], headers=bearer(keys["inference"]), timeout=60)
    assert good.status_code == 200

    assert refused(requests.get(f"{man}/models", timeout=10))
    assert refused(requests.get(f"{man}/models", headers=bearer(keys["inference"]), timeout=10))
    assert requests.get(f"{man}/models", headers=bearer(keys["management"]), timeout=10).status_code == 200


# -- predictions -----------------------------------------------------------------------------------
def test_predict_matches_in_process(client, images, local, detector):
    """One at a time (batches of one): schema, original coordinates (EXIF applied), and exactly the
    in-process answer."""
    classes = list(detector.card.classes)
    sizes = {}
    for name, data in images.items():
        r = client.predict(MODEL, data)
        assert r.status_code == 200, (name, r.text)
        body = r.json()
        assert_schema(body, classes)
        assert body["detections"], name  # score_threshold 0.0 by default in this archive
        assert {k: body[k] for k in ("image", "detections")} == local[name], name
        sizes[name] = (body["image"]["width"], body["image"]["height"])
    assert sizes["large_jpeg"] == (640, 480) and sizes["thin_png"] == (97, 300)
    assert sizes["wide_rgba_png"] == (1000, 150) and sizes["grey_png"] == (200, 200)
    # stored 320x200 with orientation 6: the caller's image is 200x320, boxes are in that frame,
    # and they are exactly those of the same pixels sent upright without EXIF
    assert sizes["exif6_jpeg"] == (200, 320) == sizes["exif6_upright_png"]
    assert local["exif6_jpeg"] == local["exif6_upright_png"]
    # the same-size pair really differs: only the detections tell their answers apart
    assert sizes["val0"] == sizes["val0_mirrored"] and local["val0"] != local["val0_mirrored"]


def test_request_forms_agree(server, client, images, local):
    """Raw bytes, multipart field ``data`` and JSON base64 give one answer; parameters as form
    fields (what Client.predict sends) and as JSON fields are honoured."""
    keys = bearer(server.tokens()["inference"])
    url = f"{server.inference_url}/predictions/{MODEL}"
    data = images["val2"]
    raw = requests.post(url, data=data, headers={**keys, "Content-Type": "image/jpeg"}, timeout=60)
    form = requests.post(url, files={"data": ("a.jpg", data, "image/jpeg")}, headers=keys, timeout=60)
    js = requests.post(url, json={"image": base64.b64encode(data).decode()}, headers=keys, timeout=60)
    for r in (raw, form, js):
        assert r.status_code == 200, r.text
        assert r.json()["request_id"] == r.headers["X-Client-Request-Id"] == r.headers["X-Request-Id"]
    assert len({r.json()["request_id"] for r in (raw, form, js)}) == 3
    assert without_id(raw.json()) == without_id(form.json()) == without_id(js.json())
    assert {k: raw.json()[k] for k in ("image", "detections")} == local["val2"]

    want = local["val2"]["detections"]
    r = client.predict(MODEL, data, max_detections=5)
    assert r.status_code == 200 and r.json()["detections"] == want[:5]
    k, cut = cut_between(want)
    r = requests.post(
        url, json={"image": base64.b64encode(data).decode(), "score_threshold": cut}, headers=keys, timeout=60
    )
    assert r.status_code == 200 and r.json()["detections"] == want[:k]
    # a bad parameter is the caller's error
    r = client.predict(MODEL, data, score_threshold=2)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_parameter"


def cut_between(rows: list[dict]) -> tuple[int, float]:
    """(k, a score threshold that keeps exactly the first k rows): halfway between two reported scores
    past the middle (scores are rounded to 5 digits in answers)."""
    k = next(i for i in range(len(rows) // 2, len(rows)) if rows[i]["score"] < rows[i - 1]["score"])
    return k, (rows[k - 1]["score"] + rows[k]["score"]) / 2


def test_query_string_rules(server, images, local, reference):
    """Where parameters may travel, as README and deploy.md say: the query string of /predictions is
    ignored (TorchServe drops it); /invocations?model_name= keeps it, a bad value there is the
    caller's 400, and a parameter given both in the query and in the body takes the body's value
    (a JSON field or a multipart field)."""
    keys = bearer(server.tokens()["inference"])
    data = images["val2"]
    want = local["val2"]["detections"]
    k, cut = cut_between(want)
    raw = {**keys, "Content-Type": "image/jpeg"}
    inf = server.inference_url

    def invoke(query: dict, **kw) -> requests.Response:
        return requests.post(f"{inf}/invocations", params={"model_name": MODEL, **query}, timeout=60, **kw)

    r = requests.post(f"{inf}/predictions/{MODEL}", params={"max_detections": 1, "score_threshold": 0.9},
                      data=data, headers=raw, timeout=60)  # fmt: skip
    assert r.status_code == 200 and r.json()["detections"] == want  # the defaults: nothing cut
    assert invoke({"max_detections": 3}, data=data, headers=raw).json()["detections"] == want[:3]
    assert invoke({"score_threshold": cut}, data=data, headers=raw).json()["detections"] == want[:k]
    narrow = invoke({"iou_threshold": 0.1}, data=data, headers=raw)
    assert narrow.status_code == 200 and narrow.json()["detections"] != want  # NMS at 0.1 keeps fewer rows
    reference.check(narrow.json(), data, score_threshold=0.0, iou_threshold=0.1)
    for bad in ({"score_threshold": 2}, {"max_detections": "ten"}, {"iou_threshold": 0}):
        r = invoke(bad, data=data, headers=raw)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_parameter", (bad, r.text)
    body = {"image": base64.b64encode(data).decode(), "max_detections": 2}
    assert invoke({"max_detections": 7}, json=body, headers=keys).json()["detections"] == want[:2]
    form = invoke({"max_detections": 7}, files={"data": ("a.jpg", data, "image/jpeg")},
                  data={"max_detections": "4"}, headers=keys)  # fmt: skip
    assert form.status_code == 200 and form.json()["detections"] == want[:4]


def test_concurrent_requests_batched_without_mixups(server, client, images, reference):
    """24 requests from 8 threads: TorchServe batches them, and every answer is exactly its own
    image's in-process answer (at one of the bucket sizes)."""
    names = list(images)
    order = [names[i % len(names)] for i in range(24)]
    before = batches_seen(server)
    spans = []

    def call(name: str) -> tuple[str, requests.Response]:
        t0 = time.monotonic()
        r = client.predict(MODEL, images[name])
        spans.append((t0, time.monotonic()))
        return name, r

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, order))
    for name, r in results:
        assert r.status_code == 200, r.text
        assert r.json()["model"]["version"] == "1.0"
        assert (why := reference.why_not(r.json(), images[name], score_threshold=0.0)) is None, (name, why)
    # requests overlapped, and TorchServe put several into one batch
    overlap = max(sum(1 for a, b in spans if a <= t < b) for t, _ in spans)
    assert overlap >= 4
    deadline = time.monotonic() + 10
    while (seen := batches_seen(server) - before) < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert 1 <= seen < len(order), f"{seen} batches for {len(order)} requests: no batching"


def test_bad_request_amid_traffic(client, images, reference):
    """Garbage and a truncated JPEG get their own 4xx JSON; batch-mates get their exact answers; the
    worker lives on."""
    pids = worker_pids(client, "1.0")
    good = ["val0", "val3", "large_jpeg", "thin_png", "val2", "grey_png", "val0_mirrored", "val3"]
    bad = {
        "garbage": b"definitely not an image " * 40,
        "truncated": images["val3"][: len(images["val3"]) // 3],
    }
    plan = good[:4] + list(bad) + good[4:]
    barrier = threading.Barrier(len(plan))

    def call(name: str) -> requests.Response:
        barrier.wait()
        return client.predict(MODEL, bad.get(name) or images[name])

    with ThreadPoolExecutor(len(plan)) as pool:
        results = dict(zip(range(len(plan)), pool.map(call, plan), strict=True))
    for i, name in enumerate(plan):
        r = results[i]
        if name in bad:
            assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
            err = r.json()
            assert set(err) == {"error"} and set(err["error"]) == {"code", "message"}, err
            assert isinstance(err["error"]["code"], str) and err["error"]["message"]
        else:
            assert r.status_code == 200, (name, r.text)
            reference.check(r.json(), images[name], score_threshold=0.0)
    assert results[plan.index("garbage")].json()["error"]["code"] == "not_an_image"
    assert worker_pids(client, "1.0") == pids
    assert client.predict(MODEL, images["val0"]).status_code == 200


def test_served_without_the_training_stack(shared, client, images, local):
    """The module's workers run where effdet, timm, Lightning, train and export cannot be imported
    (the shared server's block is active in them, and it blocks), and import the handler package
    from the archive, not from this repository."""
    env = blocking_env(Path(shared.marker).parent / "probe")
    probe = subprocess.run(
        [sys.executable, "-c", "import effdet"], env={**os.environ, **env}, capture_output=True, text=True
    )
    assert probe.returncode != 0 and "blocked in this worker" in probe.stderr
    r = client.predict(MODEL, images["val0"])
    assert r.status_code == 200 and {k: r.json()[k] for k in ("image", "detections")} == local["val0"]
    pids = set(worker_pids(client))
    noted = shared.noted()
    active = {pid for pid, text in noted if text.startswith("active") and "model_service_worker" in text}
    assert pids and pids <= active, "the block was not active in the serving worker"
    sources = [
        text.split(" ", 1)[1] for pid, text in noted if pid in pids and text.startswith("handler-from")
    ]
    models_dir = str(shared.server.tmp / "models")
    assert sources and all(s.startswith(models_dir) for s in sources), sources
    log = (shared.server.workdir / "logs" / "model_log.log").read_text(errors="replace")
    assert "is blocked in this worker" not in log  # nothing in the serving path wanted the training stack


# -- management ------------------------------------------------------------------------------------
def test_allowed_urls_refuse_remote_and_relative(client):
    """The server refuses them (sent raw here); the project's client refuses them before sending."""
    for url in ("http://127.0.0.1:1/x.mar", "../x.mar", f"../model_store/{V2_FILE}", "file:///etc/x.mar"):
        r = client.manage("POST", "/models", url=url, initial_workers=1, synchronous="true")
        assert 400 <= r.status_code < 500, (url, r.status_code, r.text)
        with pytest.raises(InvalidArgument, match="file name of a .mar"):
            client.register(url)
    r = client.manage("POST", "/models", url="http://127.0.0.1:1/x.mar")
    assert "allowed URL" in r.json()["message"]
    r = client.manage("POST", "/models", url="../x.mar")
    assert "Relative path" in r.json()["message"]
    assert [e["modelVersion"] for e in client.describe(MODEL)] == ["1.0"]


def test_versions_register_default_unregister(server, client, images, local):
    r = client.register(V2_FILE, initial_workers=1)
    try:
        assert r.status_code == 200, r.text
        described = {e["modelVersion"]: e for e in client.describe(MODEL)}
        assert set(described) == {"1.0", "2.0"}
        assert described["2.0"]["batchSize"] == BATCH and described["2.0"]["modelUrl"] == V2_FILE
        v2 = client.predict(MODEL, images["val0"], version="2.0")
        assert v2.status_code == 200 and v2.json()["model"] == {"name": MODEL, "version": "2.0"}
        assert v2.json()["detections"] == local["val0"]["detections"]  # same weights
        assert client.predict(MODEL, images["val0"]).json()["model"]["version"] == "1.0"

        assert client.set_default(MODEL, "2.0").status_code == 200
        default = client.manage("GET", f"/models/{MODEL}").json()
        assert [e["modelVersion"] for e in default] == ["2.0"]
        assert client.predict(MODEL, images["val0"]).json()["model"]["version"] == "2.0"
        assert client.predict(MODEL, images["val0"], version="1.0").json()["model"]["version"] == "1.0"
        # TorchServe will not remove the default version while another exists
        assert client.unregister(MODEL, "2.0").status_code == 403
    finally:
        client.set_default(MODEL, "1.0")
        gone = client.unregister(MODEL, "2.0")
    assert gone.status_code == 200, gone.text
    assert [e["modelVersion"] for e in client.describe(MODEL)] == ["1.0"]
    assert client.predict(MODEL, images["val0"]).json()["model"]["version"] == "1.0"
    assert client.predict(MODEL, images["val0"], version="2.0").status_code == 404


def test_request_ids_over_http(server, images):
    """What a curl user or a proxy sees: the X-Request-Id it sent comes back in the answer's
    X-Client-Request-Id header (4xx too) and a 200's JSON ``request_id``; an unsafe id is replaced,
    never echoed. TorchServe sets the answer's own X-Request-Id header to its id for the request,
    which is also what the handler answers with when no (or no safe) id was sent."""
    keys = bearer(server.tokens()["inference"])
    url = f"{server.inference_url}/predictions/{MODEL}"
    ok = "3fa85f64-5717-4562-b3fc-2c963f66afa6"
    for sent, echoed in ((ok, True), ("<script>alert(1)</script>", False), ("\u00e9t\u00e9", False),
                         ("a" * 200, False), ('x", "model": "evil', False), (None, False)):  # fmt: skip
        headers = {**keys, "Content-Type": "image/jpeg"} | ({"X-Request-Id": sent} if sent else {})
        r = requests.post(url, data=images["val0"], headers=headers, timeout=60)
        assert r.status_code == 200, r.text
        rid = r.headers["X-Client-Request-Id"]
        assert r.json()["request_id"] == rid and valid_request_id(rid)
        assert (rid == sent) is echoed, (sent, rid)
        if not echoed:
            assert rid == r.headers["X-Request-Id"]  # TorchServe's own id for this request
        assert without_id(r.json())["model"] == {"name": MODEL, "version": "1.0"}
    bad = requests.post(url, data=b"not an image", headers={**keys, "X-Request-Id": "bad-1"}, timeout=60)
    assert bad.status_code == 415 and bad.headers["X-Client-Request-Id"] == "bad-1"
    assert set(bad.json()) == {"error"}


def test_management_values_refused_before_any_change(server, client, serving_store, capsys):
    """Zero, negative, fractional and huge worker counts, bad names and settings: refused by the
    client and the CLI with a clear message, and the served model is exactly as before."""
    from scripts.client.__main__ import main as cli_main

    def state() -> list:
        keys = ("modelVersion", "minWorkers", "maxWorkers", "batchSize", "maxBatchDelay", "responseTimeout")
        return [
            ({k: e[k] for k in keys}, sorted(w["pid"] for w in e["workers"])) for e in client.describe(MODEL)
        ]

    before = state()
    refused = [
        (lambda: scale(client, MODEL, 0, serving_store), "unregister the model"),
        (lambda: scale(client, MODEL, -1, serving_store), "workers must be in"),
        (lambda: scale(client, MODEL, 1.5, serving_store), "workers must be an integer"),
        (lambda: scale(client, MODEL, MAX_WORKERS + 1, serving_store), "workers must be in"),
        (lambda: scale(client, "../../x", 1, serving_store), "model name"),
        (lambda: client.set_workers(MODEL, 0), "workers"),
        (lambda: client.register(V2_FILE, batch_size=-1), "batch_size"),
        (lambda: client.register(V2_FILE, max_batch_delay=-5), "max_batch_delay"),
        (lambda: client.register(V2_FILE, response_timeout=-1), "response_timeout"),
        (lambda: client.register(V2_FILE, initial_workers=1000), "workers"),
        (lambda: client.register(V2_FILE, model_name="a/b"), "model name"),
        (lambda: client.unregister(MODEL, "../1.0"), "version"),
    ]
    for call, message in refused:
        with pytest.raises(InvalidArgument, match=message):
            call()
    # the command line, as users type it (its main, in this process)
    cli = ["--inference-url", server.inference_url, "--management-url", server.management_url,
           "--key-file", str(server.key_file)]  # fmt: skip
    for args in (["--workers", "0"], ["--workers", "-2"], ["--workers", str(MAX_WORKERS + 1)]):
        assert cli_main([*cli, "scale", MODEL, *args, "--model-store", str(serving_store)]) == 1
        assert capsys.readouterr().err.startswith("error: workers must be in")
    with pytest.raises(SystemExit) as e:
        cli_main([*cli, "scale", MODEL, "--workers", "two"])
    assert e.value.code == 2 and "invalid int value" in capsys.readouterr().err
    assert state() == before
    assert tiny_files(serving_store) == [f"{MODEL}.mar", V2_FILE]


# -- scaling under traffic -------------------------------------------------------------------------
def own_answer(o) -> str | None:
    """An answer names its own request: the id this attempt sent, and the unique size it sent."""
    if o.echoed != o.request_id or o.body.get("request_id") != o.request_id:
        return f"answer for request {o.echoed}/{o.body.get('request_id')} taken for {o.request_id}"
    w, h = (int(v) for v in o.key.split("x"))
    if o.body["image"] != {"width": w, "height": h}:
        return f"answer for a {o.body['image']} image taken for {o.key}"
    return None


def size_of_key(key: str, body: dict) -> str | None:
    w, h = (int(v) for v in key.split("x"))
    return None if body["image"] == {"width": w, "height": h} else f"{body['image']} for {key}"


def check_traffic(traffic: Traffic, reference: Reference, sample: int = 24) -> dict:
    """Everything answered, 200, its own; a spread sample exactly its in-process answer."""
    summary = traffic.summary()
    assert traffic.unanswered == 0, f"{traffic.unanswered} requests never answered: {summary}"
    failed = traffic.failures()
    assert not failed, (
        f"{len(failed)} requests failed: {[(o.status, o.problem or o.text) for o in failed[:5]]}"
    )
    outs = traffic.snapshot()
    wrong = [p for o in outs if (p := own_answer(o))]
    assert not wrong, wrong[:5]
    assert len({o.key for o in outs}) == len(outs)  # sizes really were unique
    step = max(1, len(outs) // sample)
    for o in outs[::step]:
        assert (why := reference.why_not(o.body, o.data, score_threshold=0.0)) is None, (o.key, why)
    return summary


def new_traffic(server: Server, images: dict, threads: int, first: int, timeout: float) -> Traffic:
    """``threads`` clients sending images of unique sizes; ``timeout`` per attempt (a batch queued
    behind starting workers on a loaded 2-core machine may wait far longer than the default 20 s)."""
    bases = [images[k] for k in ("val0", "val2", "val3", "large_jpeg")]
    source = Images.unique_sizes(bases, width=120 + first, height=90)
    return Traffic(
        lambda: Client(server.inference_url, server.management_url, server.key_file, timeout=timeout),
        MODEL,
        source,
        threads=threads,
        check=size_of_key,
        keep=True,
    )


@pytest.mark.timeout(900)
def test_scale_without_loss_under_traffic(server, client, serving_store, images, reference):
    """1 -> 2 -> 1 -> 2 -> 1 workers with ``scale`` while 3 threads keep requests flowing: up twice,
    down twice, so both switches run (1.0 -> 1.0-twin, and back).

    Up is TorchServe's scale call; down switches the default version to a twin started with the
    new count and unregisters the old one once drained. Every request is answered 200 with its own
    answer, and no request needed a retry of any kind: no lost batch ("worker died", a timeout), no
    503 while versions switched, no dropped connection, no stale answer for another request.
    """
    assert [e["modelVersion"] for e in client.describe(MODEL)] == ["1.0"]
    # a request a stopped worker lost is never answered: it would end in a timeout and a retry
    traffic = new_traffic(server, images, threads=3, first=0, timeout=300)
    steps, seen_pids = [], set(worker_pids(client))
    traffic.start()
    try:
        time.sleep(1.0)
        for n in (2, 1, 2, 1):
            result = scale(client, MODEL, n, serving_store, start_at_once=1)  # a busy 2-core machine
            steps.append(result)
            entries = client.describe(MODEL)
            assert [e["modelVersion"] for e in entries] == [result.version]  # one version at a time
            workers = entries[0]["workers"]
            assert len(workers) == n and all(w["status"] == "READY" for w in workers), workers
            seen_pids |= {w["pid"] for w in workers}
            assert traffic.answered_after(time.monotonic(), timeout=120), traffic.summary()
    finally:
        traffic.stop(timeout=120)
    assert [s.method for s in steps] == ["scale", "switch", "scale", "switch"]
    assert [s.version for s in steps] == ["1.0", "1.0-twin", "1.0-twin", "1.0"]
    assert tiny_files(serving_store) == [f"{MODEL}.mar", V2_FILE]  # the twin file removed
    kept = set(worker_pids(client))
    deadline = time.monotonic() + 30
    while any(psutil.pid_exists(p) for p in seen_pids - kept) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(psutil.pid_exists(p) for p in seen_pids - kept), "workers of unregistered versions live on"

    summary = check_traffic(traffic, reference)
    retried = [(o.key, o.retries) for o in traffic.snapshot() if o.retries]
    assert summary["retried_requests"] == 0 and not retried, f"requests retried while scaling: {retried[:5]}"
    print(
        "\nscale 1 -> 2 -> 1 -> 2 -> 1 under 3 threads: "
        + "; ".join(
            f"{s.workers_before}->{s.workers} {s.method} {s.seconds:.1f} s"
            + (
                f" (twin up {s.start_seconds:.1f} s, drain {s.drain_seconds:.1f} s, grace {s.grace_seconds:.2f} s)"
                if s.method == "switch"
                else ""
            )  # fmt: skip
            for s in steps
        )
        + f"\n  traffic: {summary}"
    )


@pytest.mark.timeout(600)
def test_stale_answers_never_taken(server, client, images, reference):
    """TorchServe's own scale-down (``set_workers``: the surplus worker killed with its batch) under
    keep-alive traffic from 4 threads: 1 -> 2 -> 1.

    This is how answers go astray: a killed batch's job may be answered twice ("Unexpected job in
    sendError()", re-queued), and the duplicate waits on the keep-alive connection for the next
    request. The client sends a fresh X-Request-Id per attempt, drops a connection whose answer names
    another request, and retries lost batches: so every request ends 200 with its own answer (its
    id, its unique image size), and nothing fails. How often each case happened is printed.
    """
    assert len(client.describe(MODEL)) == 1
    traffic = new_traffic(server, images, threads=4, first=300, timeout=60)
    traffic.start()
    try:
        time.sleep(1.0)
        for n in (2, 1):  # up by one, down by TorchServe's kill of a worker with its batch
            r = client.set_workers(MODEL, n)
            assert r.status_code == 200, r.text
            assert traffic.answered_after(time.monotonic(), timeout=120), traffic.summary()
    finally:
        traffic.stop(timeout=120)
    assert len(worker_pids(client)) == 1
    summary = check_traffic(traffic, reference)
    print(f"\nTorchServe's own scaling 1 -> 2 -> 1 under 4 keep-alive threads: {summary}")
