"""What a hostile client can do to the served model, on a real TorchServe (see SECURITY.md).

One TorchServe on free loopback ports serves the conftest's tiny.mar (batchSize 4), with the
config ``scripts.serve`` renders (``allowed_urls`` anchored to this store). The cases:

- hostile inference requests, each sent next to good ones so that they share batches: non-ASCII
  parameters (they once reached the reason phrase and killed the worker), the ``describe`` header
  on ``/predictions`` (it once failed its whole batch and showed the training machine's paths),
  form-encoded bodies (what ``curl --data-binary`` sends), image formats outside the documented
  six (EPS, PDF, SVG, ICO, PSD, ...), and a phone-style MPO JPEG that must be served. Each gets
  its status and JSON error, every good request its in-process answer, and the worker is the same
  process after;
- a 40 MP image one pixel wide: served, and the worker's peak RSS measured (SECURITY.md);
- JSON bodies under any spelling of a JSON media type and MIME base64 (line breaks), next to
  near-misses that stay refused;
- registration URLs a management-key holder may try against ``allowed_urls``;
- what a management-key holder or a sloppy operator can ask for: a batchSize of 100000 (refused
  by the handler at load), a large batchSize with a short warm-up budget (warmed up to where the
  budget ends, larger batches served in chunks), more workers than the machine holds (refused by
  the client, with the figures, unless forced), and unregistering a version with requests in
  flight (the client drains it first);
- what answers without a token (``/api-description``, ``OPTIONS /``) and what gRPC answers to a
  bad request: TorchServe 0.12 behaviour that SECURITY.md documents, pinned so the page stays true.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import requests
from PIL import Image

from handler.config import MAX_BATCH_SIZE, HandlerConfig
from handler.decode import IMAGE_FORMATS
from scripts.archive import archive
from scripts.client import Client
from scripts.client.capacity import GIB, WORKERS_PER_CORE, CapacityError, Machine
from scripts.client.scale import scale, twin_of, write_twin
from scripts.client.scale import unregister as drain_and_unregister
from scripts.paths import ROOT
from scripts.serve import Server, allowed_urls
from scripts.settings import MAX_WORKERS, InvalidArgument, ModelConfig
from tests.helpers import serving, starts_torchserve
from tests.test_reliability import MINIMAL_PDF, SVG, assert_answer, error_json, png_claiming
from tests.test_serving import _encode as encode
from tests.test_serving import batches_seen

MODEL = "tiny"
ALL = {"score_threshold": "0"}  # every detection of the barely trained model
MIB = 2**20
CARD_KEYS = {"model", "classes", "image_size", "defaults", "limits", "device"}


# -- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def store(model_store, tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("hs") / "model_store"
    store.mkdir()
    shutil.copy(model_store / f"{MODEL}.mar", store / f"{MODEL}.mar")
    return store


@pytest.fixture(scope="module")
@starts_torchserve
def server(store, tmp_path_factory):
    with serving(tmp_path_factory.mktemp("ts"), store, [f"{MODEL}={MODEL}.mar"]) as srv:
        yield srv


@pytest.fixture(scope="module")
def tokens(server) -> dict[str, str]:
    return server.tokens()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def describe(server: Server, tokens: dict, model: str = MODEL, **params) -> list[dict]:
    r = requests.get(f"{server.management_url}/models/{model}", params=params,
                     headers=bearer(tokens["management"]), timeout=30)  # fmt: skip
    assert r.status_code == 200, r.text
    return r.json()


def worker_pids(server: Server, tokens: dict) -> list[int]:
    return sorted(w["pid"] for e in describe(server, tokens) for w in e["workers"])


@pytest.fixture(scope="module")
def client(server) -> Client:
    return Client(server.inference_url, server.management_url, server.key_file, timeout=120)


def model_log(server: Server) -> list[str]:
    return (server.workdir / "logs" / "model_log.log").read_text(errors="replace").splitlines()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# -- requests ---------------------------------------------------------------------------------------
@dataclass
class Hostile:
    """One request as a hostile client sends it, and what it must get."""

    name: str
    body: bytes | None = field(default=None, repr=False)
    form: str = "raw"  # "raw" (body as is), "multipart" (field `data` + fields) or "json" (base64)
    params: dict = field(default_factory=dict)
    headers: dict = field(default_factory=dict)
    status: int = 200
    code: str | None = None  # the error code for a 4xx
    good: bool = False  # a well-formed prediction: compared with the in-process answer
    encode: Callable[[bytes], str] = b64  # how a "json" request writes its image

    def send(self, url: str, token: str) -> requests.Response:
        headers = {**bearer(token), **self.headers}
        if self.form == "multipart":
            files = {"data": ("upload", self.body, "application/octet-stream")}
            return requests.post(url, files=files, data=self.params, headers=headers, timeout=120)
        if self.form == "json":
            payload = {"image": self.encode(self.body), **self.params}
            if not any(k.lower() == "content-type" for k in headers):
                headers["Content-Type"] = "application/json"
            return requests.post(url, data=json.dumps(payload), headers=headers, timeout=120)
        return requests.post(url, data=self.body, headers=headers, timeout=120)


def other_formats(base: Image.Image) -> dict[str, bytes]:
    """Images PIL opens (or hands to Ghostscript) that the service does not take."""
    small = base.resize((64, 48))
    out = {name: encode(small, name) for name in ("EPS", "ICO", "PPM", "TGA", "PCX", "SGI", "DDS", "QOI")}
    # PSD: PIL cannot write it; a minimal 8-bit RGB file header with raw image data
    psd = b"8BPS" + (1).to_bytes(2) + b"\0" * 6 + (3).to_bytes(2) + (48).to_bytes(4) + (64).to_bytes(4)
    psd += (8).to_bytes(2) + (3).to_bytes(2) + b"\0" * 12 + (0).to_bytes(2) + b"\x80" * (64 * 48 * 3)
    out["PSD"] = psd
    out["PDF"], out["SVG"] = MINIMAL_PDF, SVG
    for name, data in out.items():
        if name not in ("PDF", "SVG"):  # PIL opens each of these when it may try every plugin
            assert Image.open(io.BytesIO(data)).format == name, name
    return out


def mpo(base: Image.Image) -> bytes:
    """A two-frame MPO, as many phone cameras write JPEGs; PIL opens it as format MPO."""
    first, second = base.resize((320, 240)), base.resize((320, 240)).rotate(180)
    data = encode(first, "MPO", save_all=True, append_images=[second], quality=92)
    assert Image.open(io.BytesIO(data)).format == "MPO"
    return data


def hostile_cases(val: bytes) -> list[Hostile]:
    base = Image.open(io.BytesIO(val)).convert("RGB")
    bad = "invalid_parameter"
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    cases = [
        # non-ASCII parameter values: fixed reason phrase, escaped echo in the JSON body
        Hostile("score_threshold e-acute", val, "multipart", {"score_threshold": "\u00e9"}, status=400, code=bad),
        Hostile("score_threshold emoji", val, "multipart", {"score_threshold": "\U0001f600"}, status=400,
                code=bad),
        Hostile("max_detections cjk", val, "multipart", {"max_detections": "\u5341"}, status=400, code=bad),
        Hostile("json iou_threshold 100 emoji", val, "json", {"iou_threshold": "\U0001f600" * 100}, status=400,
                code=bad),
        Hostile("json score_threshold latin-1 bytes as text", val, "json", {"score_threshold": "\xff\xfe"},
                status=400, code=bad),
        # the describe header on /predictions: the public card for that request alone
        Hostile("describe header, no body", None, headers={"describe": "True"}),
        Hostile("describe header with an image", val, headers={"Describe": "true", "Content-Type": "image/jpeg"}),
        # form-encoded bodies (curl --data-binary without a Content-Type of its own)
        Hostile("form-encoded fields", b"score_threshold=0.5&image=abc", headers=form, status=415,
                code="form_encoded"),
        Hostile("form-encoded base64 image", b"image=" + base64.b64encode(val).replace(b"+", b"%2B"), headers=form,
                status=415, code="form_encoded"),
        # a raw body with no Content-Type header at all is just bytes
        Hostile("raw jpeg, no content type", val, good=True),
        Hostile("mpo (phone jpeg)", mpo(base), "multipart", dict(ALL), good=True),
    ]  # fmt: skip
    for name, data in other_formats(base).items():
        cases.append(Hostile(f"{name} body", data, headers={"Content-Type": "image/x-other"}, status=415,
                             code="not_an_image"))  # fmt: skip
    cases.append(Hostile("EPS as json", other_formats(base)["EPS"], "json", status=415, code="not_an_image"))
    return cases + json_cases(val)


def json_cases(val: bytes) -> list[Hostile]:
    """JSON media types in any spelling and MIME base64 (what ``base64`` prints: 76-character lines)
    are served; near-misses stay refused. TorchServe parses only ``application/json`` spelled so."""
    mime = base64.encodebytes
    bad64 = "invalid_base64"
    return [
        Hostile("Application/JSON", val, "json", dict(ALL), {"Content-Type": "Application/JSON"}, good=True),
        Hostile("json; charset=UTF-8", val, "json", dict(ALL), {"Content-Type": "application/json; charset=UTF-8"},
                good=True),
        Hostile("+json type", val, "json", dict(ALL), {"Content-Type": "application/vnd.effdet+json"}, good=True),
        Hostile("base64 with line breaks", val, "json", dict(ALL), good=True, encode=lambda b: mime(b).decode()),
        Hostile("base64 with CRLF, Application/Json", val, "json", dict(ALL), {"Content-Type": "Application/Json"},
                good=True, encode=lambda b: mime(b).decode().replace("\n", "\r\n")),
        Hostile("url-safe base64", val, "json", status=400, code=bad64,
                encode=lambda b: b64(b).replace("+", "-").replace("/", "_")),
        Hostile("base64 without padding", val, "json", status=400, code=bad64, encode=lambda b: b64(b).rstrip("=")),
        Hostile("base64 with a form feed", val, "json", status=400, code=bad64,
                encode=lambda b: b64(b)[:64] + "\f" + b64(b)[64:]),
        Hostile("Application/JSON, broken JSON", b'{"image": "abc', headers={"Content-Type": "Application/JSON"},
                status=400, code="invalid_json"),
        Hostile("application/jsonx body", json.dumps({"image": b64(val)}).encode(),
                headers={"Content-Type": "application/jsonx"}, status=415, code="not_an_image"),
    ]  # fmt: skip


def good_cases(val_images: list[bytes]) -> list[Hostile]:
    forms = [("multipart", ALL), ("json", ALL), ("raw", {})]
    return [
        Hostile(
            f"good {i}",
            val_images[i % len(val_images)],
            form,
            dict(params),
            good=True,
            headers={"Content-Type": "image/jpeg"} if form == "raw" else {},
        )  # fmt: skip
        for i, (form, params) in enumerate(forms * 4)
    ]


def reference(case: Hostile, detector) -> dict:
    kw = {k: (int if k == "max_detections" else float)(v) for k, v in case.params.items()}
    return detector.predict([case.body], **kw)[0]


# -- tests ------------------------------------------------------------------------------------------
def test_hostile_requests_amid_good_traffic(server, tokens, detector, val_images):
    """Each hostile request gets its own answer; the good ones in its batches theirs; same worker."""
    hostile = hostile_cases(val_images[0])
    good = good_cases(val_images)
    plan: list[Hostile] = []
    for i in range(0, len(hostile), 2):  # groups of four: hostile, good, hostile, good
        plan += [hostile[i], good[i // 2 % len(good)]]
        plan += [hostile[i + 1], good[(i // 2 + 5) % len(good)]] if i + 1 < len(hostile) else []
    refs, cache = {}, {}
    for c in plan:
        if c.good:
            key = (c.body, tuple(sorted(c.params.items())))
            if key not in cache:
                cache[key] = reference(c, detector)
            refs[id(c)] = cache[key]
    pids = worker_pids(server, tokens)
    before = batches_seen(server)
    url = f"{server.inference_url}/predictions/{MODEL}"
    barrier = threading.Barrier(1)

    def send(i: int) -> requests.Response:
        barrier.wait(timeout=60)  # the requests of a group leave together
        return plan[i].send(url, tokens["inference"])

    answers: list[requests.Response] = []
    with ThreadPoolExecutor(4) as pool:
        for start in range(0, len(plan), 4):
            group = range(start, min(start + 4, len(plan)))
            barrier = threading.Barrier(len(group))
            answers += list(pool.map(send, group))

    classes = list(detector.card.classes)
    card = None
    for case, r in zip(plan, answers, strict=True):
        assert r.status_code == case.status, (case.name, r.status_code, r.text[:300])
        assert r.headers.get("content-type") == "application/json", (case.name, r.headers)
        assert r.content.isascii(), case.name  # TorchServe writes JSON with ensure_ascii
        body = r.json()
        if case.code:
            err = error_json(r)
            assert err["code"] == case.code, (case.name, err)
            assert r.reason == {400: "Bad Request", 415: "Unsupported Media Type"}[case.status]
            assert len(err["message"]) < 500, err  # at most 40 characters of a value, escaped
        elif case.good:
            assert_answer(body, refs[id(case)], classes)
        else:  # a describe row
            assert set(body) == CARD_KEYS, body
            card = card or body
            assert body == card
    assert "\\U0001f600" in next(r.json()["error"]["message"] for c, r in zip(plan, answers, strict=True)
                                 if c.name == "score_threshold emoji")  # fmt: skip
    assert worker_pids(server, tokens) == pids, "a worker restarted"
    seen = batches_seen(server) - before
    assert seen < len(plan), f"{seen} batches for {len(plan)} requests: they did not share batches"
    print(f"\nhostile: {len(plan)} requests ({len(hostile)} hostile) in {seen} batches")


def test_describe_is_public_card(server, tokens, detector):
    """GET /models/NAME?customized=true still reaches the handler; what it and the describe
    header show is fit for inference clients: no paths, versions or metrics of the training run."""
    [entry] = describe(server, tokens, customized="true")
    meta = entry["customizedMetadata"]
    meta = json.loads(meta) if isinstance(meta, str) else meta
    assert set(meta) == CARD_KEYS
    assert meta["model"] == {"name": MODEL, "version": "1.0"}
    assert meta["classes"] == list(detector.card.classes)
    assert meta["limits"]["formats"] == list(IMAGE_FORMATS)
    assert meta["defaults"]["max_detections"] == detector.max_det_per_image
    text = json.dumps(meta)
    for secret in (str(detector.card.provenance.get("dataset", "/")), "torch", "map"):
        assert secret not in text, secret
    r = requests.post(f"{server.inference_url}/predictions/{MODEL}", headers={**bearer(tokens["inference"]),
                      "describe": "True"}, timeout=60)  # fmt: skip
    assert r.status_code == 200 and r.json() == meta


def test_curl_data_binary_jpeg(server, tokens, val_images):
    """What ``curl --data-binary @a.jpg`` sends (Content-Type application/x-www-form-urlencoded):
    TorchServe's form decoder fails on the bytes before any handler runs. A 500 from the frontend,
    not ours, which is why the docs give every raw curl an image Content-Type (or -T)."""
    r = requests.post(f"{server.inference_url}/predictions/{MODEL}", data=val_images[0],
                      headers={**bearer(tokens["inference"]),
                               "Content-Type": "application/x-www-form-urlencoded"}, timeout=60)  # fmt: skip
    assert r.status_code == 500, (r.status_code, r.text[:300])
    assert r.json()["type"] == "ErrorDataDecoderException"
    ok = requests.post(f"{server.inference_url}/predictions/{MODEL}", data=val_images[0],
                       headers={**bearer(tokens["inference"]), "Content-Type": "image/jpeg"}, timeout=60)  # fmt: skip
    assert ok.status_code == 200


def vm_hwm_mib(pid: int) -> float:
    """The process's peak resident set (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_tall_40mp_image_peak_memory(server, tokens, tmp_path):
    """A 1 x 40,000,000 PNG (at the pixel cap; ~150 KB on the wire) is served; the worker's peak
    RSS above its previous peak is measured for SECURITY.md and bounded by its estimate there."""
    png = tmp_path / "tall.png"
    Image.new("RGB", (1, 40_000_000), (10, 200, 30)).save(png, "PNG")
    data = png.read_bytes()
    png.unlink()
    [pid] = worker_pids(server, tokens)
    before = psutil.Process(pid).memory_info().rss / MIB
    r = requests.post(f"{server.inference_url}/predictions/{MODEL}", data=data,
                      headers={**bearer(tokens["inference"]), "Content-Type": "image/png"}, timeout=300)  # fmt: skip
    assert r.status_code == 200, r.text[:300]
    assert r.json()["image"] == {"width": 1, "height": 40_000_000}
    peak = vm_hwm_mib(pid)
    after = psutil.Process(pid).memory_info().rss / MIB
    print(f"\n1x40M PNG ({len(data) // 1024} KiB): worker RSS {before:.0f} MiB before, peak {peak:.0f} "
          f"(+{peak - before:.0f}), {after:.0f} after")  # fmt: skip
    assert worker_pids(server, tokens) == [pid]
    assert peak - before < 1300, "above the 1.3 GB per 40 MP image that SECURITY.md states"
    over = requests.post(f"{server.inference_url}/predictions/{MODEL}", data=png_claiming(1, 40_000_001),
                         headers={**bearer(tokens["inference"]), "Content-Type": "image/png"}, timeout=60)  # fmt: skip
    assert over.status_code == 413 and error_json(over)["code"] == "too_many_pixels"


def register(server: Server, tokens: dict, url: str, name: str) -> requests.Response:
    return requests.post(f"{server.management_url}/models",
                         params={"url": url, "model_name": name, "initial_workers": 0, "synchronous": "true"},
                         headers=bearer(tokens["management"]), timeout=120)  # fmt: skip


def unregister(server: Server, tokens: dict, name: str) -> int:
    r = requests.delete(
        f"{server.management_url}/models/{name}", headers=bearer(tokens["management"]), timeout=60
    )
    return r.status_code


def manifest_only(where: Path, name: str) -> None:
    """A model TorchServe registers without starting a worker (no model-config.yaml asking for
    one; registered with initial_workers=0): only MAR-INF/MANIFEST.json, naming no real handler."""
    manifest = {"runtime": "python", "archiverVersion": "0.12.0",
                "model": {"modelName": name, "modelVersion": "1.0", "handler": "no_such_handler.py"}}  # fmt: skip
    (where / "MAR-INF").mkdir(parents=True)
    (where / "MAR-INF" / "MANIFEST.json").write_text(json.dumps(manifest))


def test_registration_urls(server, tokens, store, tmp_path):
    """allowed_urls (rendered for this store) against what a management-key holder may try.

    TorchServe checks only URLs (file://, http(s)://) against the list and copies a matching
    archive into the store; a bare name loads the store's file; a plain path to a directory is
    loaded from where it is without consulting the list (the gap SECURITY.md states).
    """
    assert re.search(r"^allowed_urls=file:///.*\\\\\.mar$", server.config.read_text(), re.M)
    evil = tmp_path / "x"
    (evil / "model_store").mkdir(parents=True)
    shutil.copy(store / f"{MODEL}.mar", evil / "evil.mar")
    shutil.copy(store / f"{MODEL}.mar", evil / "model_store" / "evil.mar")
    manifest_only(evil / "unpacked", "unpacked")
    manifest_only(tmp_path / "noop", "noop")
    shutil.make_archive(str(store / "noop"), "zip", tmp_path / "noop")
    (store / "noop.zip").rename(store / "noop.mar")
    s = store.as_posix()
    refused = {
        f"file://{evil}/evil.mar?/{s}/x.mar": 404,  # query: no longer matches
        f"file://{evil}/evil.mar#/{s}/x.mar": 404,  # fragment
        f"file://{s}/{MODEL}.mar?x": 404,
        f"file://{s}/{MODEL}.mar#x": 404,
        f"file://{evil}/model_store/evil.mar": 404,  # another directory called model_store
        f"file://{s}/sub/{MODEL}.mar": 404,  # no subdirectories
        f"file://{s}/%2e%2e/x/evil.mar": 404,
        f"file://{s}/../x/evil.mar": 404,  # TorchServe: "Relative path is not allowed"
        "http://127.0.0.1:1/x.mar": 404,
        f"{evil}/evil.mar": 404,  # a plain path resolves to store/evil.mar, which is not there
        f"file://{s}/noop.mar": 500,  # admitted, but TorchServe will not copy it onto itself
    }
    for i, (url, status) in enumerate(refused.items()):
        r = register(server, tokens, url, f"r{i}")
        assert r.status_code == status, (url, r.status_code, r.text)
    assert sorted(p.name for p in store.iterdir()) == ["noop.mar", f"{MODEL}.mar"]
    # by bare name, from the store: what the project's docs and client do
    r = register(server, tokens, "noop.mar", "byname")
    assert r.status_code == 200, r.text
    assert unregister(server, tokens, "byname") == 200
    # the gap: a directory by plain path registers (its handler would run with the server's rights)
    r = register(server, tokens, str(evil / "unpacked"), "unpacked")
    assert r.status_code == 200, r.text
    assert describe(server, tokens, "unpacked")[0]["modelUrl"] == str(evil / "unpacked")
    assert unregister(server, tokens, "unpacked") == 200
    # and the same directory as a file:// URL is refused by allowed_urls
    assert register(server, tokens, f"file://{evil}/unpacked", "unpacked").status_code == 404


def test_allowed_urls_pattern_quotes_the_store_path():
    """Regex characters and commas (TorchServe's list separator) in the store path stay literal."""
    store = Path("/srv/a.b,c (1)+d/model_store")
    value = allowed_urls(store)
    assert "," not in value and " " not in value
    java = value.replace("\\\\", "\\")  # the .properties escape
    pattern = re.sub(r"\\x\{([0-9a-f]+)\}", lambda m: f"\\x{int(m[1], 16):02x}", java)  # Java -> Python
    assert re.fullmatch(pattern, f"file://{store}/effdet_demo.mar", re.I)
    for url in (f"file://{store}/.x.mar", f"file://{store}/x.mar?y", f"file://{store}/x.mar#y",
                f"file://{store}/sub/x.mar", f"file://{store}/%2e%2e/x.mar", f"file://{store}/x.tar",
                "file:///srv/aXb,c (1)+d/model_store/x.mar", "file:///srv/a.b,c (1)d/model_store/x.mar",
                f"file://{store}2/x.mar", f"http://{store}/x.mar"):  # fmt: skip
        assert not re.fullmatch(pattern, url, re.I), url


def grpc_predict(port: int, token: str, fields: dict[str, bytes]) -> tuple[object, bytes]:
    """``Predictions`` on TorchServe's gRPC inference API, protobuf written by hand (no stubs)."""
    grpc = pytest.importorskip("grpc")

    def varint(n: int) -> bytes:
        out = b""
        while True:
            out += bytes([(n & 0x7F) | (0x80 if n > 0x7F else 0)])
            n >>= 7
            if not n:
                return out

    def field(num: int, payload: bytes) -> bytes:
        return varint(num << 3 | 2) + varint(len(payload)) + payload

    msg = field(1, MODEL.encode())
    for k, v in fields.items():
        msg += field(3, field(1, k.encode()) + field(2, v))
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary("/org.pytorch.serve.grpc.inference.InferenceAPIsService/Predictions")
        reply, info = call.with_call(msg, metadata=(("authorization", f"Bearer {token}"),), timeout=60)
    assert reply[:1] == b"\x0a"  # field 1, the prediction bytes
    n, pos, shift = 0, 1, 0
    while True:
        b = reply[pos]
        n |= (b & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not b & 0x80:
            return info.code(), reply[pos : pos + n]


def test_unauthenticated_and_grpc_surface(server, tokens, val_images):
    """TorchServe 0.12 behaviour SECURITY.md documents (nothing in its config changes it): the API
    description answers without a token; gRPC answers a bad request with status OK and our error
    JSON (its frontend drops the handler's status), a good one with the detections."""
    for method, path in (("GET", "/api-description"), ("OPTIONS", "/")):
        for base in (server.inference_url, server.management_url):
            r = requests.request(method, base + path, timeout=30)
            assert r.status_code == 200 and "openapi" in r.json(), (method, base + path)
    r = requests.post(f"{server.inference_url}/predictions/{MODEL}", data=val_images[0], timeout=30)
    assert r.status_code in (400, 401), r.status_code  # predictions do need the token

    port = int(server.props["grpc_inference_port"])
    code, body = grpc_predict(port, tokens["inference"], {"data": b"not an image"})
    assert code.name == "OK" and json.loads(body)["error"]["code"] == "not_an_image"
    code, body = grpc_predict(port, tokens["inference"], {"data": val_images[0], "score_threshold": b"0"})
    assert code.name == "OK" and json.loads(body)["detections"]


# -- what a management-key holder or a sloppy operator can ask for ---------------------------------------
def raw_register(server: Server, tokens: dict, **params) -> tuple[requests.Response, float]:
    """TorchServe's own registration call, synchronous, and how long it took."""
    t0 = time.monotonic()
    r = requests.post(f"{server.management_url}/models", params={**params, "synchronous": "true"},
                      headers=bearer(tokens["management"]), timeout=600)  # fmt: skip
    return r, time.monotonic() - t0


def test_huge_batch_size_refused_at_load(server, tokens, client):
    """``batch_size=100000`` by the raw API (TorchServe registers it): the worker once warmed batch
    buckets up to 100000, never got READY and was restarted forever. Now the handler refuses the
    batchSize before loading anything, the synchronous registration fails at once, the model log
    says why in one line, and the client refuses the value before sending it."""
    with pytest.raises(InvalidArgument, match=rf"batch_size must be in \[1, {MAX_BATCH_SIZE}\], got 100000"):
        client.register(f"{MODEL}.mar", model_name="huge", batch_size=100_000)
    r, took = raw_register(server, tokens, url=f"{MODEL}.mar", model_name="huge", batch_size=100_000,
                           initial_workers=1)  # fmt: skip
    try:
        assert r.status_code == 500, r.text
        assert r.json()["message"] == "Failed to start workers for model huge version: 1.0"  # TorchServe's
        why = f"batchSize 100000 refused: the handler serves batches of 1..{MAX_BATCH_SIZE}"
        lines = [line for line in model_log(server) if why in line]
        assert lines and "huge" in lines[0], lines
        [entry] = describe(server, tokens, "huge")
        assert entry["batchSize"] == 100_000 and not entry["workers"]
    finally:
        assert unregister(server, tokens, "huge") == 200
    print(f"\nbatchSize 100000: registration answered 500 in {took:.1f} s; model log: {lines[0][-160:]}")


def test_warm_up_budget_bounds_a_large_batch(server, tokens, client, store, exported, val_images, detector):
    """An archive with the largest batchSize (256) and a 0.5 s warm-up budget: the worker warms the
    smallest bucket (always) and stops, says so in the model log, gets READY, and serves a burst
    of requests, which TorchServe batches, in chunks of the warmed size, each with its in-process
    answer. Without the budget it would warm 16 buckets up to 256 images (~900 images, twice)."""
    cfg = ModelConfig(
        batch_size=MAX_BATCH_SIZE, max_batch_delay=200, handler=HandlerConfig(warmup_seconds=0.5)
    )
    mar = archive(exported, "wide", "1.0", store, cfg)
    try:
        r = client.register(mar.name, initial_workers=1)
        assert r.status_code == 200, r.text
        [entry] = describe(server, tokens, "wide")
        assert entry["batchSize"] == MAX_BATCH_SIZE and entry["workers"][0]["status"] == "READY"
        [line] = [line for line in model_log(server) if "wide_1.0" in line and "warmed batch buckets" in line]
        assert "warmed batch buckets 1 in " in line and "warm-up budget" in line, line
        assert line.endswith("Batches above 1 run in chunks of 1"), line
        before = sum("wide_1.0" in x and "Backend received inference" in x for x in model_log(server))
        cases = [Hostile(f"wide {i}", val_images[i % len(val_images)], "multipart", dict(ALL), good=True)
                 for i in range(8)]  # fmt: skip
        url = f"{server.inference_url}/predictions/wide"
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda c: c.send(url, tokens["inference"]), cases))
        for case, a in zip(cases, answers, strict=True):
            assert a.status_code == 200, a.text[:300]
            # each image ran as a batch of one (the warmed size): exactly the in-process answer
            assert {k: a.json()[k] for k in ("image", "detections")} == reference(case, detector), case.name
        batches = (
            sum("wide_1.0" in x and "Backend received inference" in x for x in model_log(server)) - before
        )
        print(f"\nwarm-up budget 0.5 s at batchSize {MAX_BATCH_SIZE}: {line.split(' - ')[-1][-200:]}; "
              f"8 requests in {batches} batches")  # fmt: skip
    finally:
        unregister(server, tokens, "wide")
        mar.unlink(missing_ok=True)


def test_client_refuses_workers_the_machine_cannot_hold(server, tokens, client, store):
    """``min_worker=1000`` by the raw API had 232 workers starting at once and took a 2-core machine
    down (SECURITY.md; not reproduced here). The client's scale and register refuse counts above
    the machine's cap or memory, with the figures, before anything is sent; the served model is as
    before. The memory figure is the real worker's resident set."""
    state = [(e["minWorkers"], [w["pid"] for w in e["workers"]]) for e in describe(server, tokens)]
    # TorchServe caps nothing: the archive's maxWorkers is replaced by whatever a scale call sends
    # (max_worker alone starts no worker: TorchServe starts up to min_worker)
    assert describe(server, tokens)[0]["maxWorkers"] == 1
    url, keys = f"{server.management_url}/models/{MODEL}", bearer(tokens["management"])
    r = requests.put(url, params={"min_worker": 1, "max_worker": MAX_WORKERS, "synchronous": "true"},
                     headers=keys, timeout=300)  # fmt: skip
    try:
        assert r.status_code == 200 and describe(server, tokens)[0]["maxWorkers"] == MAX_WORKERS, r.text
    finally:
        requests.put(
            url, params={"min_worker": 1, "max_worker": 1, "synchronous": "true"}, headers=keys, timeout=300
        )
    cli = [sys.executable, "-m", "scripts.client", "--inference-url", server.inference_url,
           "--management-url", server.management_url, "--key-file", str(server.key_file)]  # fmt: skip

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*cli, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)

    out = run("scale", MODEL, "--workers", str(MAX_WORKERS), "--model-store", str(store))
    assert out.returncode == 1 and out.stderr.startswith(f"error: {MAX_WORKERS} workers for {MODEL} refused")
    assert "pass --force" in out.stderr, out.stderr
    out = run("register", f"{MODEL}.mar", "--model-name", "many", "--initial-workers", str(MAX_WORKERS))
    assert out.returncode == 1 and "refused" in out.stderr and "pass --force" in out.stderr, out.stderr
    out = run("register", f"{MODEL}.mar", "--model-name", "many", "--batch-size", "100000")
    assert out.returncode == 1 and f"batch_size must be in [1, {MAX_BATCH_SIZE}], got 100000" in out.stderr

    try:
        client.machine = Machine(cores=1, gpus=0, available=64 * GIB)  # a one-core machine
        with pytest.raises(CapacityError) as e:
            scale(client, MODEL, WORKERS_PER_CORE + 1, store)
        assert str(e.value).startswith(
            f"{WORKERS_PER_CORE + 1} workers for {MODEL} refused: this machine has 1 CPU cores and CPU workers "
            f"are capped at {WORKERS_PER_CORE} per core ({WORKERS_PER_CORE})"
        )
        [pid] = worker_pids(server, tokens)
        rss = psutil.Process(pid).memory_info().rss
        # many cores, and free memory for one more worker but not for the 25 % headroom (a fixed 1 GiB
        # failed now and then: an idle worker's resident set is ~0.8 GiB, either side of 80 % of it)
        client.machine = Machine(cores=64, gpus=0, available=rss)
        with pytest.raises(CapacityError) as e:
            scale(client, MODEL, 2, store)
        assert f"starting 1 worker for {MODEL} refused: ~{rss / GIB:.1f} GiB" in str(e.value), e.value
        assert (
            f"the largest of the 1 running worker) is above 80% of the {rss / GIB:.1f} GiB available"
            in str(e.value)
        )
    finally:
        client.machine = None
    assert [(e["minWorkers"], [w["pid"] for w in e["workers"]]) for e in describe(server, tokens)] == state
    assert "many" not in {m["modelName"] for m in requests.get(
        f"{server.management_url}/models", headers=bearer(tokens["management"]), timeout=30).json()["models"]}  # fmt: skip


def test_unregister_drains_in_flight_requests(server, tokens, client, store, val_images):
    """TorchServe's unregister leaves a version's queued and running requests unanswered until their
    clients time out (8 of 8 in the measurement). ``scripts.client unregister`` drains the version
    first: 16 requests in flight to a second version all get 200, then it is gone. Its refusals:
    the default version while another exists (TorchServe's 403) and, unless forced, workers the
    machine has no memory for."""
    version, twin_file = twin_of("1.0", f"{MODEL}.mar")
    write_twin(store / f"{MODEL}.mar", store / twin_file, version)
    try:
        client.machine = Machine(cores=64, gpus=0, available=GIB // 2)
        with pytest.raises(CapacityError, match="GiB available on this machine; pass --force"):
            client.register(twin_file, model_name=MODEL, initial_workers=1)
        r = client.register(twin_file, model_name=MODEL, initial_workers=1, force=True)
        client.machine = None
        assert r.status_code == 200, r.text
        out = subprocess.run([sys.executable, "-m", "scripts.client", "--inference-url", server.inference_url,
                              "--management-url", server.management_url, "--key-file", str(server.key_file),
                              "unregister", MODEL], cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert out.returncode == 1 and "1.0 is the default version of tiny" in out.stderr, out.stderr
        [twin] = client.describe(MODEL, version)
        twin_pids = {w["pid"] for w in twin["workers"]}

        url = f"{server.inference_url}/predictions/{MODEL}/{version}"
        case = Hostile("in flight", val_images[0], "multipart", dict(ALL))
        with ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(case.send, url, tokens["inference"]) for _ in range(16)]
            deadline, pending = time.monotonic() + 30, 0
            while not pending and time.monotonic() < deadline:
                pending = client.describe(MODEL, version)[0]["jobQueueStatus"]["pendingRequests"]
            assert pending > 0, "no request was queued: nothing to drain"
            t0 = time.monotonic()
            result = drain_and_unregister(client, MODEL, version)
            took = time.monotonic() - t0
            answers = [f.result(timeout=120) for f in futures]
        assert [a.status_code for a in answers] == [200] * 16, [a.text[:200] for a in answers]
        assert result["version"] == version and "unregistered" in result["status"].lower(), result
        assert [e["modelVersion"] for e in client.describe(MODEL)] == ["1.0"]
        deadline = time.monotonic() + 30
        while any(psutil.pid_exists(p) for p in twin_pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(psutil.pid_exists(p) for p in twin_pids), "the unregistered version's worker lives on"
        print(f"\nunregister with {pending} queued of 16 in flight: drained and unregistered in {took:.1f} s "
              f"(grace {result['grace_seconds']} s), 16 of 16 answered 200")  # fmt: skip
    finally:
        client.machine = None
        if version in {e["modelVersion"] for e in client.describe(MODEL)}:
            unregister(server, tokens, f"{MODEL}/{version}")
        (store / twin_file).unlink(missing_ok=True)
