"""The served detector end to end: a real TorchServe (Java frontend + Python workers) on free
loopback ports, archives from the real torch-model-archiver, real HTTP with token auth.

One TorchServe serves the whole module (startup is the expensive part); the last test starts a
second one, side by side, whose workers cannot import effdet, timm, Lightning or ``train``.

Served answers are compared with ``handler.detector.Detector`` in this process on the same
TorchScript file. One request at a time (TorchServe then runs batches of one) they are
identical. Under concurrency TorchServe forms batches of up to 4, and a batched convolution
rounds differently in the last float bits; the barely trained test model gives ~100 detections
whose scores tie to 4-5 digits, so near-tied detections may swap places. Those answers are
compared as multisets with tolerances far below anything a mix-up would produce, and each is
checked to be its own image's answer and no other's.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
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

from scripts.archive import ModelConfig, archive
from scripts.client import Client
from scripts.serve import ROOT, Server

pytestmark = pytest.mark.slow

MODEL = "tiny"
BATCH = 4
V2_FILE = "tiny_v2.mar"  # torch-model-archiver names files NAME.mar: v2 of "tiny" is renamed
TRAFFIC_TIMEOUT = 20  # s; a request lost on scale-down is never answered, this ends the wait
BLOCKED = ("effdet", "timm", "pytorch_lightning", "lightning", "train")


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def serving_store(exported, tmp_path_factory) -> Path:
    """tiny.mar (1.0) and tiny_v2.mar (2.0), batchSize 4, served default score_threshold 0.0.

    With the handler's default threshold at 0.0 a raw-bytes request (which cannot carry
    parameters) returns the ~100 detections of the barely trained model instead of none, so
    every comparison below compares something.
    """
    store = tmp_path_factory.mktemp("serving") / "model_store"
    cfg = ModelConfig(batch_size=BATCH, max_batch_delay=50, score_threshold=0.0)
    archive(exported, MODEL, "1.0", store, cfg)
    with tempfile.TemporaryDirectory() as tmp:
        shutil.move(archive(exported, MODEL, "2.0", tmp, cfg), store / V2_FILE)
    return store


@pytest.fixture(scope="module")
def server(serving_store, tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("ts"), serving_store, free_ports=True)
    try:
        srv.start([f"{MODEL}={MODEL}.mar"])
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server) -> Client:
    return Client(server.inference_url, server.management_url, server.key_file)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def images(val_images) -> dict[str, bytes]:
    """Images of several sizes, modes and formats, plus one EXIF-rotated JPEG and its upright twin."""
    base = Image.open(io.BytesIO(val_images[0])).convert("RGB")
    other = Image.open(io.BytesIO(val_images[1])).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: stored landscape, shown rotated 90 degrees clockwise
    stored = other.resize((320, 200))
    upright = Image.open(io.BytesIO(_encode(stored, "JPEG", quality=95)))  # the decoded pixels
    return {
        "val0": val_images[0],
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
def local(detector, images) -> dict[str, dict]:
    """The in-process answer for every image, one at a time, score_threshold 0.0."""
    return {k: detector.predict([b], score_threshold=0.0)[0] for k, b in images.items()}


# -- helpers ---------------------------------------------------------------------------------------
def assert_schema(body: dict, classes: list[str], version: str = "1.0", max_det: int = 100) -> None:
    assert set(body) == {"model", "image", "detections"}
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
    used: set[int] = set()
    n = 0
    for d in served:
        for j, e in enumerate(ref):
            if (
                j not in used
                and d["class_id"] == e["class_id"]
                and abs(d["score"] - e["score"]) <= score_tol
                and all(abs(a - b) <= box_tol for a, b in zip(d["box"], e["box"], strict=True))
            ):
                used.add(j)
                n += 1
                break
    return n


def assert_same_up_to_ties(served: dict, ref: dict, max_unmatched: int = 2) -> None:
    """Batched answer vs the one-at-a-time answer: same image, same detections up to near-ties."""
    assert served["image"] == ref["image"]
    assert len(served["detections"]) == len(ref["detections"])
    unmatched = len(served["detections"]) - matched(served["detections"], ref["detections"])
    assert unmatched <= max_unmatched, f"{unmatched} of {len(served['detections'])} detections differ"
    s = [d["score"] for d in served["detections"]]
    r = [d["score"] for d in ref["detections"]]
    assert all(abs(a - b) <= 2e-5 for a, b in zip(s, r, strict=True))


def worker_pids(client: Client, version: str | None = None) -> list[int]:
    entries = client.describe(MODEL, version)
    return sorted(w["pid"] for e in entries for w in e["workers"])


def batches_seen(server: Server, version: str = "1.0") -> int:
    """Batches the model's workers received: the Python backend logs one line per predict message."""
    log = server.workdir / "logs" / "model_log.log"
    tag = f"-{MODEL}_{version}-stdout"
    return sum(
        1
        for line in log.read_text(errors="replace").splitlines()
        if tag in line and "Backend received inference" in line
    )


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


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
    """One at a time: schema, original coordinates (EXIF applied) and identical detections."""
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


def test_request_forms_agree(server, client, images, local):
    """Raw bytes, multipart field ``data`` and JSON base64 give one answer; parameters are honoured."""
    keys = bearer(server.tokens()["inference"])
    url = f"{server.inference_url}/predictions/{MODEL}"
    data = images["val2"]
    raw = requests.post(url, data=data, headers={**keys, "Content-Type": "image/jpeg"}, timeout=60)
    form = requests.post(url, files={"data": ("a.jpg", data, "image/jpeg")}, headers=keys, timeout=60)
    js = requests.post(url, json={"image": base64.b64encode(data).decode()}, headers=keys, timeout=60)
    for r in (raw, form, js):
        assert r.status_code == 200, r.text
    assert raw.json() == form.json() == js.json()
    assert {k: raw.json()[k] for k in ("image", "detections")} == local["val2"]

    want = local["val2"]["detections"]
    # parameters as form fields (what Client.predict sends), as JSON fields, and as the query
    # string of /invocations (TorchServe drops the query string of /predictions)
    r = client.predict(MODEL, data, max_detections=5)
    assert r.status_code == 200 and r.json()["detections"] == want[:5]
    # scores are rounded to 5 digits in answers: cut halfway between two neighbouring values
    k = next(i for i in range(len(want) // 2, len(want)) if want[i]["score"] < want[i - 1]["score"])
    cut = (want[k - 1]["score"] + want[k]["score"]) / 2
    r = requests.post(
        url, json={"image": base64.b64encode(data).decode(), "score_threshold": cut}, headers=keys, timeout=60
    )
    assert r.status_code == 200 and r.json()["detections"] == want[:k]
    r = requests.post(
        f"{server.inference_url}/invocations",
        params={"model_name": MODEL, "max_detections": 3},
        data=data,
        headers={**keys, "Content-Type": "image/jpeg"},
        timeout=60,
    )
    assert r.status_code == 200 and r.json()["detections"] == want[:3]
    # a bad parameter is the caller's error
    r = client.predict(MODEL, data, score_threshold=2)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_parameter"


def test_concurrent_requests_batched_without_mixups(server, client, images, local):
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
        body = r.json()
        assert body["model"]["version"] == "1.0"
        assert_same_up_to_ties(body, local[name])
        # and it is not some other image's answer
        for other in names:
            if local[other]["image"] == local[name]["image"] and local[other] != local[name]:
                assert matched(body["detections"], local[other]["detections"]) < len(body["detections"]) // 2
    # requests overlapped, and TorchServe put several into one batch
    overlap = max(sum(1 for a, b in spans if a <= t < b) for t, _ in spans)
    assert overlap >= 4
    deadline = time.monotonic() + 10
    while (seen := batches_seen(server) - before) < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert 1 <= seen < len(order), f"{seen} batches for {len(order)} requests: no batching"


def test_bad_request_amid_traffic(client, images, local):
    """Garbage and a truncated JPEG get their own 4xx JSON; batch-mates 200; the worker lives on."""
    pids = worker_pids(client, "1.0")
    good = ["val0", "val3", "large_jpeg", "thin_png", "val2", "grey_png", "val0", "val3"]
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
            assert_same_up_to_ties(r.json(), local[name])
    assert results[plan.index("garbage")].json()["error"]["code"] == "not_an_image"
    assert worker_pids(client, "1.0") == pids
    assert client.predict(MODEL, images["val0"]).status_code == 200


# -- management ------------------------------------------------------------------------------------
def test_allowed_urls_refuse_remote_and_relative(client):
    for url in ("http://127.0.0.1:1/x.mar", "../x.mar", f"../model_store/{V2_FILE}", "file:///etc/x.mar"):
        r = client.register(url)
        assert 400 <= r.status_code < 500, (url, r.status_code, r.text)
    r = client.register("http://127.0.0.1:1/x.mar")
    assert "allowed URL" in r.json()["message"]
    r = client.register("../x.mar")
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
        default = client._manage("GET", f"/models/{MODEL}").json()
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


def test_scale_workers_under_traffic(server, client, images, local):
    """1 -> 3 -> 1 workers while 3 threads send requests.

    Scaling up loses nothing. Scaling down, TorchServe 0.12 stops the surplus workers at once (it
    has no drain) and the batch each of them was running is lost: answered 500 "Worker died.", or
    never answered at all (ts_log.log: "Unexpected job in sendError()"; the frontend's
    responseTimeout no longer covers it, only the client's own timeout ends the wait). So at most
    (workers removed) x batchSize requests fail, all of those two kinds and all at the scale-down;
    docs/deploy.md documents this measured bound.
    """
    names = ["val0", "val2", "large_jpeg", "thin_png", "grey_png", "val3"]
    start_pids = worker_pids(client, "1.0")
    assert len(start_pids) == 1
    stop = threading.Event()
    log: list[tuple[float, float, int | str, str, str]] = []

    def traffic(k: int) -> None:
        own = Client(server.inference_url, server.management_url, server.key_file, timeout=TRAFFIC_TIMEOUT)
        i = k
        while not stop.is_set():
            name = names[i % len(names)]
            t0 = time.monotonic()
            try:
                r = own.predict(MODEL, images[name])
                status, text = r.status_code, r.text
                if r.status_code == 200:
                    assert_same_up_to_ties(r.json(), local[name])
            except AssertionError:
                status, text = "wrong answer", name
            except requests.RequestException as e:
                status, text = type(e).__name__, str(e)
            log.append((t0, time.monotonic(), status, text, name))
            i += 1

    threads = [threading.Thread(target=traffic, args=(k,), daemon=True) for k in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        t_up = time.monotonic()
        up = client.scale(MODEL, 3, version="1.0")
        t_ready = time.monotonic()
        assert up.status_code == 200, up.text
        workers = client.describe(MODEL, "1.0")[0]["workers"]
        assert len(workers) == 3 and all(w["status"] == "READY" for w in workers)
        assert set(start_pids) <= {w["pid"] for w in workers}
        time.sleep(2.0)
        t_down = time.monotonic()
        down = client.scale(MODEL, 1, version="1.0")
        assert down.status_code == 200, down.text
        # Keep the traffic going until a request sent after the scale-down has come back: threads
        # whose request was lost in a removed worker wait out their client timeout first.
        deadline = time.monotonic() + TRAFFIC_TIMEOUT + 10
        while time.monotonic() < deadline and not any(e[2] == 200 and e[0] > t_down for e in log):
            time.sleep(0.2)
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    after = client.describe(MODEL, "1.0")[0]
    assert after["minWorkers"] == 1 and after["maxWorkers"] == 1
    assert [w["pid"] for w in after["workers"]] == start_pids  # the first worker is the one kept
    removed = {w["pid"] for w in workers} - set(start_pids)
    deadline = time.monotonic() + 30
    while any(psutil.pid_exists(p) for p in removed) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(psutil.pid_exists(p) for p in removed), "scaled-down worker processes still alive"

    failed = [e for e in log if e[2] != 200]
    before_down = [e for e in failed if e[1] < t_down]
    assert not before_down, f"requests failed before the scale-down: {before_down}"
    died = [e for e in failed if e[2] == 500 and "Worker died" in e[3]]
    unanswered = [e for e in failed if e[2] == "ReadTimeout"]
    assert len(died) + len(unanswered) == len(failed), failed
    assert all(e[0] < t_down < e[1] for e in unanswered), unanswered  # in flight at the scale-down
    bound = (3 - 1) * BATCH
    assert len(failed) <= bound, f"{len(failed)} requests lost on scale-down, bound {bound}"
    ok_after = [e for e in log if e[2] == 200 and e[0] > t_down]
    assert ok_after, "no successful request after the scale-down"
    assert sum(1 for e in log if e[2] == 200) >= 10
    print(
        f"\nscale 1->3->1 ({t_down - t_up:.0f} s at 3 workers after {t_ready - t_up:.0f} s scaling up): "
        f"{len(log)} requests, lost on scale-down: {len(died)} answered 500 'Worker died.', "
        f"{len(unanswered)} never answered (bound {bound})"
    )


# -- the archive without the training stack ---------------------------------------------------------
SITECUSTOMIZE = """
import importlib.machinery, os, sys

_BLOCKED = {blocked!r}
_MARKER = os.environ["EFFDET_BLOCK_MARKER"]


def _note(text):
    with open(_MARKER, "a") as f:
        f.write(f"{{os.getpid()}} {{text}}\\n")


class _BlockTrainingStack:
    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] in _BLOCKED:
            _note(f"blocked {{fullname}}")
            raise ModuleNotFoundError(f"{{fullname}} is blocked in this worker (test_serving)")
        if fullname == "handler":
            spec = importlib.machinery.PathFinder.find_spec(fullname, path)
            _note(f"handler-from {{spec.origin if spec else None}}")
        return None


sys.meta_path.insert(0, _BlockTrainingStack())
with open("/proc/self/cmdline", "rb") as f:
    _note("active " + f.read().replace(b"\\0", b" ").decode(errors="replace"))
"""


def test_archive_serves_without_training_stack(model_store, tmp_path, images, detector, server):
    """The fixture's tiny.mar in a second TorchServe whose Python cannot import the training stack."""
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text(SITECUSTOMIZE.format(blocked=set(BLOCKED)))
    marker = tmp_path / "marker.log"
    env = {"PYTHONPATH": str(block), "EFFDET_BLOCK_MARKER": str(marker)}
    probe = subprocess.run(
        [sys.executable, "-c", "import effdet"], env={**os.environ, **env}, capture_output=True, text=True
    )
    assert probe.returncode != 0 and "blocked in this worker" in probe.stderr

    srv = Server(tmp_path / "ts", model_store, free_ports=True, extra_env=env)
    try:
        srv.start([f"{MODEL}={MODEL}.mar"])
        other = Client(srv.inference_url, srv.management_url, srv.key_file)
        r = other.predict(MODEL, images["val0"], score_threshold=0.0)
        assert r.status_code == 200, r.text
        assert {k: r.json()[k] for k in ("image", "detections")} == detector.predict(
            [images["val0"]], score_threshold=0.0
        )[0]
        assert other.predict(MODEL, images["val0"]).status_code == 200  # its own default threshold
        pids = worker_pids(other)
        # the module's server runs on beside it, undisturbed
        assert Client(server.inference_url, server.management_url, server.key_file).ping().status_code == 200
    finally:
        srv.stop()

    lines = marker.read_text().splitlines()
    workers = {int(line.split()[0]) for line in lines if "active" in line and "model_service_worker" in line}
    assert set(pids) <= workers, "the block was not active in the serving worker"
    sources = [
        line.split("handler-from ", 1)[1]
        for line in lines
        if int(line.split()[0]) in workers and "handler-from" in line
    ]
    models_dir = str(srv.workdir / "tmp" / "models")
    assert sources and all(s.startswith(models_dir) for s in sources), sources  # the archived package
