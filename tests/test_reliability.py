"""Reliability and security of the served detector, on a real TorchServe.

One TorchServe serves the module, started the way a user starts it: ``python -m scripts.serve
start`` in a subprocess (on a config rendered onto free loopback ports), its output kept to check
that no token is printed. The tests, in order:

- a corpus of bad and of odd-but-valid requests made here, sent concurrently amid good traffic so
  they share batches: every bad one gets its own 4xx JSON error, every valid one a 200 with the
  schema, good ones the in-process ``Detector`` answer, and the worker is the same process after;
- worker RSS over a few hundred requests (a soak version with thousands runs under ``make soak``);
- security defaults on the running server: listeners on loopback only (gRPC included), nothing
  reachable on this machine's other addresses, the key file private, tokens in no output or log;
- an archive whose worker cannot start (a corrupt model.pt): what registration, describe, /ping
  and predictions say, and that the healthy model serves on;
- a worker SIGKILLed under load: TorchServe restarts it, and the client's retries leave no request
  failed.

What is already covered by ``test_serving.py`` (schema, batching, tokens, versions, scaling,
``allowed_urls``) is not repeated. Measured figures are printed (``pytest -s``) and recorded in
SECURITY.md.
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
import os
import random
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
from PIL import Image

from scripts.archive import archive
from scripts.client import NO_RETRY, Client
from scripts.load import Images, Traffic
from scripts.paths import ROOT
from scripts.serve import Server
from scripts.settings import ModelConfig
from tests.helpers import Reference, close_detections, count_matched, starts_torchserve
from tests.test_serving import _encode as encode
from tests.test_serving import assert_schema, batches_seen

MODEL = "tiny"
BROKEN = "broken"
BATCH = 4  # batchSize of the conftest's tiny.mar
ALL = {"score_threshold": 0.0}  # every detection of the barely trained model: ~100 per image
KILL_TIMEOUT = 120  # s; how long the test waits for the worker's restart
MIB = 2**20

# `python -m scripts.serve` exactly as a user runs it, except that its Server reads the config this
# module rendered onto free loopback ports (its own default is config.properties' fixed ports).
SERVE_CLI = (
    "import functools, sys\n"
    "from pathlib import Path\n"
    "import scripts.serve as s\n"
    "s.Server = functools.partial(s.Server, config=Path(sys.argv[1]))\n"
    "s.main(sys.argv[2:])\n"
)


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def store(model_store, exported, tmp_path_factory) -> Path:
    """A ``model_store`` with the conftest's tiny.mar and broken.mar, whose model.pt is garbage."""
    store = tmp_path_factory.mktemp("rel") / "model_store"
    store.mkdir()
    shutil.copy(model_store / f"{MODEL}.mar", store / f"{MODEL}.mar")
    broken = tmp_path_factory.mktemp("broken_export")
    for name in ("model.pt", "model.json", "index_to_name.json"):
        shutil.copy(exported / name, broken / name)
    size = (broken / "model.pt").stat().st_size
    (broken / "model.pt").write_bytes(random.Random(7).randbytes(min(size, 64 * 1024)))
    archive(broken, BROKEN, "1.0", store, ModelConfig(batch_size=BATCH, max_batch_delay=50))
    return store


@pytest.fixture(scope="module")
@starts_torchserve
def served(store, tmp_path_factory):
    """(Server, output of ``python -m scripts.serve start``) for the module's TorchServe."""
    srv = Server(tmp_path_factory.mktemp("ts"), store, free_ports=True)
    cmd = [sys.executable, "-c", SERVE_CLI, str(srv.config), "start", "--workdir", str(srv.workdir),
           "--model-store", str(store), "--model", MODEL]  # fmt: skip
    try:
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
        assert out.returncode == 0, out.stdout + out.stderr + srv.log_tail()
        yield srv, out.stdout + out.stderr
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def server(served) -> Server:
    return served[0]


@pytest.fixture(scope="module")
def client(server) -> Client:
    return Client(server.inference_url, server.management_url, server.key_file, timeout=120)


# -- helpers ---------------------------------------------------------------------------------------
def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose IHDR (right CRC) claims width x height 8-bit RGB, with one tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + png_chunk(b"IEND", b"")
    )


MINIMAL_PDF = (
    b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\n"
    b"2 0 obj << /Type /Pages /Kids [3 0 R] /Count 1 >> endobj\n"
    b"3 0 obj << /Type /Page /Parent 2 0 R /MediaBox [0 0 64 64] >> endobj\n"
    b"trailer << /Root 1 0 R >>\n%%EOF\n"
)
SVG = (
    b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="64" height="64">'
    b'<rect width="64" height="64" fill="red"/></svg>'
)


@dataclass
class Case:
    """One HTTP request: how it is sent and what it must get."""

    name: str
    body: bytes = field(repr=False)
    form: str = "multipart"  # "raw" body, "multipart" (field `data` + parameter fields) or "json"
    params: dict = field(default_factory=dict)  # sent as multipart fields or JSON fields
    content_type: str = "application/octet-stream"
    status: int = 200
    codes: tuple[str, ...] = ()  # acceptable error codes for a 4xx

    def send(self, url: str, token: str, timeout: float = 120) -> requests.Response:
        auth = {"Authorization": f"Bearer {token}"}
        if self.form == "raw":
            headers = {**auth, "Content-Type": self.content_type}
            return requests.post(url, data=self.body, headers=headers, timeout=timeout)
        if self.form == "json":
            payload = {"image": base64.b64encode(self.body).decode(), **self.params}
            return requests.post(url, json=payload, headers=auth, timeout=timeout)
        files = {"data": ("upload", self.body, self.content_type)}
        fields = {k: str(v) for k, v in self.params.items()}
        return requests.post(url, files=files, data=fields, headers=auth, timeout=timeout)

    def why_not(self, reference: Reference, body: dict) -> str | None:
        """None when ``body`` is exactly the in-process answer with the parameters the server got
        (multipart fields are text), else what differs."""
        kw = {k: (int if k == "max_detections" else float)(v) for k, v in self.params.items()}
        return reference.why_not(body, self.body, **kw)


def assert_answer(body: dict, ref: dict, classes: list[str], slack: int = 0) -> None:
    """A served 200 is its own image's in-process answer ``ref`` (computed alone, in a batch of one).

    A batch of another size rounds the network's output differently in the last float bits, so
    scores may differ in their fifth decimal and rows of near-equal score trade places. Required:
    the schema, the same image size, as many detections, and every detection matched one to one
    with one of ``ref`` (same class, score within 2e-5, box within 0.05 px), but for ``slack``.
    Another image's answer, a lost parameter or a mixed-up row fails. (For an exact comparison,
    ``tests.helpers.Reference`` knows the batch sizes a server runs.)
    """
    assert_schema(body, classes)
    assert body["image"] == ref["image"]
    served, want = body["detections"], ref["detections"]
    assert len(served) == len(want), (len(served), len(want))
    scores = zip([d["score"] for d in served], [d["score"] for d in want], strict=True)
    assert all(abs(a - b) <= 2e-5 for a, b in scores)
    unmatched = len(served) - count_matched(served, want, close_detections(2e-5, 0.05))
    assert unmatched <= slack, f"{unmatched} of {len(served)} detections differ"


def error_json(r: requests.Response) -> dict:
    err = r.json()
    assert set(err) == {"error"} and set(err["error"]) == {"code", "message"}, err
    assert isinstance(err["error"]["code"], str) and err["error"]["message"], err
    return err["error"]


def worker_pids(client: Client, model: str = MODEL) -> list[int]:
    return sorted(w["pid"] for e in client.describe(model) for w in e["workers"])


def frontend_pid(server: Server) -> int:
    return int(server.pid_file.read_text().strip())


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def keys_of(server: Server) -> list[str]:
    return [v["key"] for v in json.loads(server.key_file.read_text()).values()]


# -- the corpus --------------------------------------------------------------------------------------
def bad_cases(val: bytes, max_request_size: int, max_det: int) -> list[Case]:
    rng = random.Random(3)
    bad = "invalid_parameter"
    return [
        Case("empty body", b"", "raw", status=400, codes=("empty_body",)),
        Case("one byte", b"\xff", "raw", status=415, codes=("not_an_image",)),
        Case("text", b"hello, this is text", "raw", content_type="text/plain", status=415,
             codes=("not_an_image",)),
        Case("json without image", json.dumps({"picture": "x"}).encode(), "raw",
             content_type="application/json", status=400, codes=("missing_image",)),
        Case("bad base64", json.dumps({"image": "not base64 at all!"}).encode(), "raw",
             content_type="application/json", status=400, codes=("invalid_base64",)),
        Case("base64 of a non-image", b"just some words, not pixels", "json", status=415,
             codes=("not_an_image",)),
        Case("truncated jpeg", val[: len(val) // 3], "raw", content_type="image/jpeg", status=400,
             codes=("invalid_image",)),
        Case("jpeg header + garbage", val[:2] + b"\xff\xe0" + rng.randbytes(3000), "raw",
             content_type="image/jpeg", status=400, codes=("invalid_image",)),
        Case("svg", SVG, "raw", content_type="image/svg+xml", status=415, codes=("not_an_image",)),
        Case("pdf", MINIMAL_PDF, "raw", content_type="application/pdf", status=415,
             codes=("not_an_image",)),
        Case("png claiming 30000x30000", png_claiming(30000, 30000), "raw", content_type="image/png",
             status=413, codes=("too_many_pixels",)),
        Case("score_threshold 2", val, params={"score_threshold": "2"}, status=400, codes=(bad,)),
        Case("score_threshold -0.1", val, params={"score_threshold": "-0.1"}, status=400, codes=(bad,)),
        Case("score_threshold abc", val, params={"score_threshold": "abc"}, status=400, codes=(bad,)),
        Case("score_threshold nan", val, params={"score_threshold": "nan"}, status=400, codes=(bad,)),
        Case("iou_threshold 0", val, params={"iou_threshold": "0"}, status=400, codes=(bad,)),
        Case("iou_threshold 1.5", val, params={"iou_threshold": "1.5"}, status=400, codes=(bad,)),
        Case("max_detections 0", val, params={"max_detections": "0"}, status=400, codes=(bad,)),
        Case(f"max_detections {max_det + 1}", val, params={"max_detections": str(max_det + 1)}, status=400,
             codes=(bad,)),
        Case("max_detections 2.5", val, params={"max_detections": "2.5"}, status=400, codes=(bad,)),
        Case("max_detections ten", val, params={"max_detections": "ten"}, status=400, codes=(bad,)),
        Case("json max_detections many", val, "json", params={"max_detections": "many"}, status=400,
             codes=(bad,)),
        # non-ASCII parameter values once reached the reason phrase and killed the worker
        Case("score_threshold e-acute", val, params={"score_threshold": "\u00e9"}, status=400, codes=(bad,)),
        Case("score_threshold emoji", val, params={"score_threshold": "\U0001f600"}, status=400, codes=(bad,)),
        Case("json iou_threshold emoji", val, "json", params={"iou_threshold": "\U0001f600" * 100}, status=400,
             codes=(bad,)),
        # answered by the Java frontend itself (netty's aggregator): 413, empty body
        Case("body over max_request_size", b"\0" * (max_request_size + 1), "raw", status=413),
    ]  # fmt: skip


def valid_cases(val: bytes) -> list[Case]:
    base = Image.open(io.BytesIO(val)).convert("RGB")
    grey16 = (np.asarray(base.convert("L").resize((300, 200)), dtype=np.uint16) * 257).astype(np.uint16)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees clockwise
    cmyk = base.resize((240, 180)).convert("CMYK")
    gif = [base.resize((200, 160)).convert("P", palette=Image.Palette.ADAPTIVE), base.resize((200, 160))]
    images = {
        "1x1": encode(base.resize((1, 1)), "PNG"),
        "4000x3": encode(base.resize((4000, 3)), "PNG"),
        "16-bit png": encode(Image.fromarray(grey16), "PNG"),
        "cmyk jpeg": encode(cmyk, "JPEG", quality=92),
        "palette gif": encode(gif[0], "GIF", save_all=True, append_images=[gif[1].convert("P")]),
        "rgba png": encode(base.resize((300, 220)).convert("RGBA"), "PNG"),
        "webp": encode(base.resize((320, 240)), "WEBP", quality=90),
        "tiff": encode(base.resize((250, 250)), "TIFF"),
        "bmp": encode(base.resize((180, 260)), "BMP"),
        "exif-rotated jpeg": encode(base.resize((320, 200)), "JPEG", quality=92, exif=exif),
    }
    assert Image.open(io.BytesIO(images["16-bit png"])).mode.startswith("I;16")
    assert Image.open(io.BytesIO(images["cmyk jpeg"])).mode == "CMYK"
    assert Image.open(io.BytesIO(images["palette gif"])).mode == "P"
    cases = [Case(name, data, params=ALL) for name, data in images.items()]
    cases[3].form = cases[6].form = "json"  # some as JSON base64, parameters as JSON fields
    return cases + [Case("raw webp", images["webp"], "raw", content_type="image/webp")]


def good_cases(val_images: list[bytes]) -> list[Case]:
    variants = [
        ("multipart", ALL),
        ("multipart", {**ALL, "iou_threshold": 0.3}),
        ("multipart", {**ALL, "max_detections": 7}),
        ("json", ALL),
        ("raw", {}),
    ]
    return [
        Case(f"good {i} ({form})", val_images[i % len(val_images)], form, dict(params))
        for i, (form, params) in enumerate(variants * 6)
    ]


def test_bad_and_odd_inputs_amid_good_traffic(server, client, detector, val_images):
    """~70 requests, 8 at a time: bad ones mixed with odd-but-valid and good ones into shared batches."""
    props = server.props
    max_det = detector.max_det_per_image
    bad = bad_cases(val_images[0], int(props["max_request_size"]), max_det)
    odd = valid_cases(val_images[1])
    good = good_cases(val_images)
    plan: list[Case] = []
    for i, case in enumerate(bad + odd):
        plan += [case, good[i % len(good)]]
    plan += good[len(bad + odd) :]
    reference = Reference(detector, BATCH)
    pids = worker_pids(client)
    before = batches_seen(server)
    token = server.tokens()["inference"]
    url = f"{server.inference_url}/predictions/{MODEL}"

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda c: c.send(url, token), plan))

    classes = list(detector.card.classes)
    wrong = []
    for case, r in zip(plan, answers, strict=True):
        assert r.status_code == case.status, (case.name, r.status_code, r.text[:300])
        if case.name == "body over max_request_size":
            # TorchServe's own answer: no handler involved, no JSON
            assert r.content == b"" or r.json(), r.content[:200]
            continue
        assert r.headers.get("content-type") == "application/json", (case.name, r.headers)
        if case.status == 200:
            assert_schema(r.json(), classes)
            if why := case.why_not(reference, r.json()):
                wrong.append(f"{case.name}: {why}")
        else:
            assert error_json(r)["code"] in case.codes, (case.name, r.text)
    assert not wrong, wrong
    by_name = {c.name: r.json() for c, r in zip(plan, answers, strict=True) if c.status == 200}
    assert by_name["1x1"]["image"] == {"width": 1, "height": 1}
    assert by_name["4000x3"]["image"] == {"width": 4000, "height": 3}
    assert by_name["exif-rotated jpeg"]["image"] == {"width": 200, "height": 320}  # EXIF applied
    assert by_name["raw webp"]["image"] == by_name["webp"]["image"] == {"width": 320, "height": 240}
    assert len(by_name["good 2 (multipart)"]["detections"]) == 7  # max_detections 7 of ~100 at threshold 0

    assert worker_pids(client) == pids, "a worker restarted"
    handled = sum(1 for c in plan if c.name != "body over max_request_size")
    deadline = time.monotonic() + 10
    while (seen := batches_seen(server) - before) < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert 1 <= seen < handled, f"{seen} batches for {handled} requests: they did not share batches"
    print(f"\ncorpus: {len(plan)} requests ({len(bad)} bad, {len(odd)} odd, rest good) in {seen} batches")


# -- memory ---------------------------------------------------------------------------------------
def rss_run(client: Client, val_images: list[bytes], total: int, warm: int, every: int) -> dict[int, float]:
    """``total`` requests, 4 at a time (sizes up to 640x480, one in ten bad): worker RSS in MiB
    sampled after request ``warm`` and every ``every`` requests; fails on any unexpected answer."""
    pid = worker_pids(client)[0]
    proc = psutil.Process(pid)
    base = Image.open(io.BytesIO(val_images[0])).convert("RGB")
    good = [*val_images, encode(base.resize((300, 200)), "PNG")]
    good += [encode(base.resize(s), "JPEG", quality=90) for s in ((640, 480), (97, 300), (500, 60))]
    bad = [(b"not an image" * 50, 415), (val_images[1][:2000], 400)]
    samples: dict[int, float] = {}
    done = 0
    lock = threading.Lock()

    def one(i: int) -> None:
        nonlocal done
        data, want = bad[i // 10 % 2] if i % 10 == 9 else (good[i % len(good)], 200)
        r = client.predict(MODEL, data)
        assert r.status_code == want, (i, r.status_code, r.text[:200])
        with lock:
            done += 1
            if done == warm or (done > warm and done % every == 0) or done == total:
                samples[done] = proc.memory_info().rss / MIB

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(total)))
    assert worker_pids(client) == [pid], "the worker restarted"
    return dict(sorted(samples.items()))


def rounded(samples: dict[int, float]) -> dict[int, int]:
    return {k: round(v) for k, v in samples.items()}


def test_worker_rss_bounded(client, val_images):
    """300 requests: after 100 of warm-up the worker's RSS grows by less than 50 MiB."""
    samples = rss_run(client, val_images, total=300, warm=100, every=50)
    growth = max(samples.values()) - samples[100]
    print(f"\nworker RSS (MiB) by request: {rounded(samples)}; growth {growth:.1f}")
    assert growth < 50, samples


@pytest.mark.soak
def test_worker_rss_bounded_soak(client, val_images):
    """3000 requests: after 500 of warm-up the worker's RSS grows by less than 100 MiB."""
    samples = rss_run(client, val_images, total=3000, warm=500, every=250)
    growth = max(samples.values()) - samples[500]
    print(f"\nsoak worker RSS (MiB) by request: {rounded(samples)}; growth {growth:.1f}")
    assert growth < 100, samples


# -- security defaults ----------------------------------------------------------------------------------
def test_listeners_loopback_only(server, client):
    """Every TCP listener of the frontend (HTTP x3 and gRPC x2) is on 127.0.0.1; workers have none;
    this machine's other addresses refuse every one of those ports."""
    props = server.props
    ports = {int(props[k].rsplit(":", 1)[1]) for k in ("inference_address", "management_address",
                                                         "metrics_address")}  # fmt: skip
    ports |= {int(props["grpc_inference_port"]), int(props["grpc_management_port"])}
    java = psutil.Process(frontend_pid(server))
    assert "java" in java.name()
    listening = [c for c in java.net_connections("inet") if c.status == psutil.CONN_LISTEN]
    assert {c.laddr.port for c in listening} == ports, listening
    # Java binds dual-stack sockets: 127.0.0.1 shows as its IPv4-mapped IPv6 form
    assert {c.laddr.ip for c in listening} <= {"127.0.0.1", "::ffff:127.0.0.1"}, listening
    for pid in worker_pids(client):
        assert not [c for c in psutil.Process(pid).net_connections("inet") if c.status == psutil.CONN_LISTEN]

    others = [
        a.address.split("%")[0]
        for addrs in psutil.net_if_addrs().values()
        for a in addrs
        if a.family in (socket.AF_INET, socket.AF_INET6) and not a.address.startswith(("127.", "::1", "fe80"))
    ]
    for addr in others:
        for port in ports:
            with pytest.raises(OSError):
                socket.create_connection((addr, port), timeout=3).close()
    print(f"\nlisteners {sorted(ports)} on 127.0.0.1 only; refused on {others or 'no other address'}")


def test_tokens_private_expiring_and_never_printed(served, client, tmp_path, val_images):
    server, serve_output = served
    assert stat.S_IMODE(server.key_file.stat().st_mode) & 0o077 == 0, "key_file.json readable by others"
    keys = json.loads(server.key_file.read_text())
    assert set(keys) == {"management", "inference", "API"}
    now = dt.datetime.now(dt.UTC)
    for name in ("management", "inference"):
        expires = dt.datetime.fromisoformat(keys[name]["expiration time"][:19]).replace(tzinfo=dt.UTC)
        assert now < expires <= now + dt.timedelta(minutes=61), (name, expires)  # token_expiration_min 60

    image = tmp_path / "a.jpg"
    image.write_bytes(val_images[0])
    cli = [sys.executable, "-m", "scripts.client", "--inference-url", server.inference_url,
           "--management-url", server.management_url, "--key-file", str(server.key_file)]  # fmt: skip
    outputs = {"scripts.serve start": serve_output}
    for args, rc in (
        (["describe", MODEL], 0),
        (["predict", str(image), "--model", MODEL, "--score-threshold", "0.5"], 0),
        (["scale", MODEL, "--workers", "1", "--model-store", str(server.model_store)], 0),
        (["register", "../elsewhere.mar"], 1),
        (["predict", str(image), "--model", "no_such_model"], 1),
    ):
        out = subprocess.run(cli + args, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode == rc, (args, out.stdout, out.stderr)
        outputs["scripts.client " + " ".join(args)] = out.stdout + out.stderr
    assert "key_file.json" in serve_output  # it says where the keys are...
    for path in server.workdir.rglob("*"):  # ...and TorchServe's own logs hold none either
        if path.is_file() and path != server.key_file and path.suffix in ("", ".log", ".out", ".properties"):
            outputs[str(path.relative_to(server.workdir))] = path.read_text(errors="replace")
    assert "logs/ts_log.log" in outputs and "logs/access_log.log" in outputs
    for key in (v["key"] for v in keys.values()):
        leaked = [where for where, text in outputs.items() if key in text]
        assert not leaked, f"a token appears in {leaked}"


# -- a model whose worker cannot start -------------------------------------------------------------------
def test_model_whose_worker_fails_to_start(server, client, val_images):
    """broken.mar's handler raises in initialize (corrupt TorchScript file).

    Synchronous registration answers 500 and leaves the model registered with 0 workers:
    predictions get 503 at once, and /ping stays "Healthy" (it compares running workers with
    minWorkers, now 0). Asynchronous registration answers 202 and TorchServe retries the worker
    for maxRetryTimeoutInSec (300 s): describe shows a worker that is never READY and whose pid
    changes; /ping still says "Healthy"; a prediction waits in the queue. So readiness of a
    model is describe's worker status (what ``Server.wait_ready`` checks), not /ping.
    """
    tiny_pids = worker_pids(client)
    r = client.register(f"{BROKEN}.mar", initial_workers=1)
    assert r.status_code == 500, r.text
    assert r.json()["message"] == f"Failed to start workers for model {BROKEN} version: 1.0", r.text
    d = client.manage("GET", f"/models/{BROKEN}")
    if d.status_code == 200:  # left registered, wanting no worker
        entry = d.json()[0]
        assert entry["minWorkers"] == entry["maxWorkers"] == 0 and entry["workers"] == [], entry
        p = client.predict(BROKEN, val_images[0])
        assert p.status_code == 503 and "has no worker" in p.json()["message"], p.text
    else:
        assert d.status_code == 404, d.text
    ping = client.ping()
    assert ping.status_code == 200 and ping.json() == {"status": "Healthy"}, ping.text
    assert client.unregister(BROKEN).status_code in (200, 404)
    # the worker's own log names the cause
    model_log = (server.workdir / "logs" / "model_log.log").read_text(errors="replace")
    assert f"Failed to load model {BROKEN}" in model_log and "PytorchStreamReader failed" in model_log

    r = client.manage("POST", "/models", url=f"{BROKEN}.mar", initial_workers=1, synchronous="false")
    assert r.status_code == 202, r.text
    seen: dict[int, str] = {}
    pings = set()
    deadline = time.monotonic() + 90
    try:
        while len({p for p in seen if p > 0}) < 2 and time.monotonic() < deadline:
            entry = client.describe(BROKEN)[0]
            assert entry["minWorkers"] == 1, entry
            for w in entry["workers"]:
                seen[w["pid"]] = w["status"]
            pings.add(client.ping().json()["status"])
            time.sleep(0.5)
        assert len({p for p in seen if p > 0}) >= 2, f"no worker restart seen: {seen}"
        assert "READY" not in seen.values(), seen
        assert pings <= {"Healthy", "Partial Healthy", "Unhealthy"}, pings
        waiting = Client(
            server.inference_url, server.management_url, server.key_file, timeout=3, retry=NO_RETRY
        )
        with pytest.raises(requests.ReadTimeout):
            waiting.predict(BROKEN, val_images[0])
    finally:
        gone_ = client.unregister(BROKEN)
    assert gone_.status_code == 200, gone_.text
    assert client.manage("GET", f"/models/{BROKEN}").status_code == 404
    deadline = time.monotonic() + 30
    while not all(gone(p) for p in seen if p > 0) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert all(gone(p) for p in seen if p > 0), "a worker of the unregistered model lives on"
    print(f"\nbroken model, async: worker statuses {sorted(set(seen.values()))}, pings {sorted(pings)}")

    # the healthy model served on, in the same worker
    assert worker_pids(client) == tiny_pids
    assert client.predict(MODEL, val_images[0]).status_code == 200
    assert client.ping().json() == {"status": "Healthy"}


# -- a worker killed under load ---------------------------------------------------------------------------
def test_worker_killed_mid_load(server, client, detector, val_images):
    """SIGKILL the worker while 6 threads keep 6 requests in flight (batchSize 4).

    TorchServe answers the batch the dead worker held 507 "Worker died.", keeps the other queued
    requests, restarts the worker and serves them. The client retries what the dead worker lost
    (a fresh request id per attempt), so no request fails as its caller sees it: every one ends
    200 with its own image's answer, and the retries are counted.
    """
    reference = Reference(detector, BATCH)
    for v in val_images:  # every answer the traffic may get, made before its threads start
        list(reference.answers(v, **ALL))
    old = worker_pids(client)
    assert len(old) == 1

    def check(key: str, body: dict) -> str | None:
        return reference.why_not(body, val_images[int(key)], **ALL)

    traffic = Traffic(
        lambda: Client(server.inference_url, server.management_url, server.key_file),  # the defaults
        MODEL,
        Images.cycle(val_images),
        threads=6,
        params=ALL,
        check=check,
    )
    pings: list[tuple[int, str]] = []
    traffic.start()
    try:
        time.sleep(2.0)
        t_kill = time.monotonic()
        os.kill(old[0], signal.SIGKILL)
        deadline = t_kill + KILL_TIMEOUT
        while time.monotonic() < deadline:
            p = client.ping()
            pings.append((p.status_code, p.json().get("status")))
            workers = client.describe(MODEL)[0]["workers"]
            if len(workers) == 1 and workers[0]["status"] == "READY" and workers[0]["pid"] not in old:
                break
            time.sleep(0.25)
        t_ready = time.monotonic()
        assert traffic.answered_after(t_ready, timeout=KILL_TIMEOUT)
    finally:
        traffic.stop(timeout=KILL_TIMEOUT)

    workers = client.describe(MODEL)[0]["workers"]
    assert len(workers) == 1 and workers[0]["status"] == "READY", workers
    new_pid = workers[0]["pid"]
    assert new_pid != old[0] and gone(old[0])
    ping = client.ping()
    assert ping.status_code == 200 and ping.json() == {"status": "Healthy"}

    summary = traffic.summary()
    assert traffic.unanswered == 0, summary
    failed = traffic.failures()
    assert not failed, [(o.status, o.problem or o.text) for o in failed]
    outs = traffic.snapshot()
    retried = [o for o in outs if o.retries]
    assert all(o.t0 < t_ready for o in retried), "a request sent after the restart needed a retry"
    assert all(o.echoed == o.request_id for o in outs)
    waited = [o for o in outs if o.t0 < t_ready and o.t1 > t_kill]
    assert waited, "no request waited through the restart"
    print(
        f"\nkilled worker {old[0]} -> {new_pid} READY after {t_ready - t_kill:.1f} s; {summary['requests']} requests, "
        f"0 failed as callers see them; {summary['retried_requests']} retried ({summary['retries']}); "
        f"{len(waited)} waited through the restart; /ping meanwhile: {sorted(set(pings))}"
    )
