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
- registration URLs a management-key holder may try against ``allowed_urls``;
- what answers without a token (``/api-description``, ``OPTIONS /``) and what gRPC answers to a
  bad request: TorchServe 0.12 behaviour that SECURITY.md documents, pinned so the page stays true.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import requests
from PIL import Image

from handler.decode import FORMATS
from scripts.serve import Server, allowed_urls
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

    def send(self, url: str, token: str) -> requests.Response:
        headers = {**bearer(token), **self.headers}
        if self.form == "multipart":
            files = {"data": ("upload", self.body, "application/octet-stream")}
            return requests.post(url, files=files, data=self.params, headers=headers, timeout=120)
        if self.form == "json":
            payload = {"image": base64.b64encode(self.body).decode(), **self.params}
            return requests.post(url, json=payload, headers=headers, timeout=120)
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
    return cases


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
    assert meta["limits"]["formats"] == list(FORMATS)
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
