"""The client's pure parts, no server: value checks before any management call, worker counts
against a machine's cores and memory, the twin-version scheme of scale-downs, which failures are
retried, and the handler's request-id rule."""

from __future__ import annotations

import http.server
import json
import os
import time
import zipfile

import pytest

from handler.config import MAX_BATCH_SIZE
from handler.request import request_id, valid_request_id
from scripts.client import Client, RetryPolicy, transient
from scripts.client.capacity import (
    DEFAULT_WORKER_BYTES,
    GIB,
    CapacityError,
    Machine,
    WorkerMemory,
    check_fit,
    is_loopback,
    worker_memory,
)
from scripts.client.scale import MANIFEST, ScaleError, twin_of, write_twin
from scripts.settings import (
    MAX_WORKERS,
    InvalidArgument,
    check_mar,
    check_name,
    check_register,
    check_workers,
)
from tests.helpers import fake_torchserve


@pytest.mark.parametrize("n", [0, -1, MAX_WORKERS + 1, 1000, 1.5, 2.0, "2", None, True])
def test_worker_counts_refused(n):
    with pytest.raises(InvalidArgument, match="workers"):
        check_workers(n)


def test_zero_workers_says_why():
    with pytest.raises(InvalidArgument, match="unregister"):
        check_workers(0)


@pytest.mark.parametrize("n", [1, 4, MAX_WORKERS])
def test_worker_counts_accepted(n):
    assert check_workers(n) == n


@pytest.mark.parametrize("name", ["a/b", "../../x", "..", "a..b", "", "-x", "x y", "é", "a\nb", "x" * 129, 3])
def test_names_refused(name):
    with pytest.raises(InvalidArgument):
        check_name(name)


@pytest.mark.parametrize("name", ["tiny", "effdet_demo", "effdet_demo_b4_d20_w2", "1.0", "1.0-twin", "v2"])
def test_names_accepted(name):
    assert check_name(name) == name


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:1/x.mar", "../x.mar", "sub/x.mar", "file:///etc/x.mar", "x.mar?/model_store/y.mar",
            "x.mar#y", "x.zip", "dir", ".x.mar"]
)  # fmt: skip
def test_register_urls_refused(url):
    with pytest.raises(InvalidArgument, match="file name of a .mar"):
        check_mar(url)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": -4}, "batch_size"),
        ({"batch_size": 5000}, "batch_size"),
        (
            {"batch_size": MAX_BATCH_SIZE + 1},
            r"batch_size must be in \[1, 256\], got 257 \(the handler refuses",
        ),
        ({"max_batch_delay": -1}, "max_batch_delay"),
        ({"max_batch_delay": 1.5}, "max_batch_delay"),
        ({"response_timeout": 0}, "response_timeout"),
        ({"response_timeout": -5}, "response_timeout"),
        ({"initial_workers": 0}, "workers"),
        ({"initial_workers": 1000}, "workers"),
        ({"model_name": "a/b"}, "model name"),
    ],
)
def test_register_values_refused(kw, match):
    args = {"model_name": None, "batch_size": None, "max_batch_delay": None, "initial_workers": 1,
            "response_timeout": None, **kw}  # fmt: skip
    with pytest.raises(InvalidArgument, match=match):
        check_register("tiny.mar", **args)


# -- worker counts against the machine ----------------------------------------------------------------
SMALL = Machine(cores=2, gpus=0, available=8 * GIB)  # this project's test machine, roughly
PER_WORKER = WorkerMemory(int(0.9 * GIB), "measured")


def test_cpu_workers_capped_per_core():
    """Two CPU workers per core: 4 on 2 cores pass, 5 are refused with the figures (the raw API
    once started up to 232 workers at once on such a machine)."""
    check_fit("tiny", 4, 3, PER_WORKER, SMALL, on_gpu=False)
    with pytest.raises(CapacityError) as e:
        check_fit("tiny", 5, 1, PER_WORKER, SMALL, on_gpu=False)
    assert str(e.value) == (
        "5 workers for tiny refused: this machine has 2 CPU cores and CPU workers are capped at 2 per core (4); "
        "pass --force (force=True) to send it anyway"
    )
    assert isinstance(e.value, InvalidArgument)  # the CLI's one error path


def test_gpu_workers_capped_per_gpu():
    gpus = Machine(cores=2, gpus=2, available=64 * GIB)
    check_fit("tiny", 8, 8, PER_WORKER, gpus, on_gpu=True)  # 8 > 2 x 2 cores: GPU workers count GPUs
    with pytest.raises(CapacityError, match=r"this machine has 2 GPU\(s\) .* capped at 4 per GPU \(8\)"):
        check_fit("tiny", 9, 1, PER_WORKER, gpus, on_gpu=True)
    with pytest.raises(CapacityError, match=r"0 GPU\(s\)"):  # GPU workers on a machine without any
        check_fit("tiny", 1, 1, PER_WORKER, Machine(2, 0, 64 * GIB), on_gpu=True)


def test_workers_refused_beyond_available_memory():
    """The workers to start x one worker's memory against 80 % of what is available: the figures
    are in the message; workers already running (adding 0) need nothing."""
    big = Machine(cores=64, gpus=0, available=4 * GIB)
    check_fit("tiny", 3, 3, PER_WORKER, big, on_gpu=False)  # 2.7 GiB <= 3.2 GiB
    with pytest.raises(CapacityError) as e:
        check_fit("tiny", 4, 4, PER_WORKER, big, on_gpu=False)
    assert str(e.value) == (
        "starting 4 workers for tiny refused: ~3.6 GiB (4 x 0.90 GiB per worker, measured) is above 80% of "
        "the 4.0 GiB available on this machine; pass --force (force=True) to send it anyway"
    )
    check_fit("tiny", 4, 0, PER_WORKER, Machine(64, 0, 0), on_gpu=False)


def test_worker_memory_measured_from_the_workers():
    """A described worker's process RSS (this process stands in for one), else TorchServe's
    memoryUsage, else the documented default."""
    import psutil

    me = {"workers": [{"pid": os.getpid(), "memoryUsage": 0}]}
    got = worker_memory([me])
    assert abs(got.bytes - psutil.Process().memory_info().rss) < 256 * 2**20
    assert got.source == "the largest of the 1 running worker"
    gone = {"workers": [{"pid": 2**22 + 1, "memoryUsage": 123456789}, {"pid": None, "memoryUsage": 5}]}
    assert worker_memory([gone]) == WorkerMemory(123456789, "the largest of the 2 running workers")
    assert worker_memory([{"workers": []}]).bytes == DEFAULT_WORKER_BYTES


@pytest.mark.parametrize(
    "url, local",
    [("http://127.0.0.1:8081", True), ("http://localhost:8081", True), ("http://[::1]:8081", True),
     ("http://127.0.0.5:1", True), ("http://10.0.0.2:8081", False), ("https://serve.example.com", False)],
)  # fmt: skip
def test_capacity_checked_only_for_a_server_on_this_machine(url, local):
    assert is_loopback(url) is local


def test_twin_names_toggle():
    """1.0 <-> 1.0-twin and back, any number of times: names never grow."""
    pair = ("1.0", "tiny.mar")
    seen = [pair]
    for _ in range(5):
        pair = twin_of(*pair)
        seen.append(pair)
    assert seen[1] == ("1.0-twin", "tiny.twin.mar")
    assert seen[::2] == [("1.0", "tiny.mar")] * 3 and seen[1::2] == [("1.0-twin", "tiny.twin.mar")] * 3
    # a version that merely ends like a twin, from a file that is not one, gets a twin of its own
    assert twin_of("2.0-twin", "other.mar") == ("2.0-twin-twin", "other.twin.mar")
    for version, url in seen + [twin_of("2.0", "x_v2.mar")]:
        check_name(version, "version")
        check_mar(url)


def _mar(path, version: str, weights: bytes = b"weights") -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(MANIFEST, json.dumps({"model": {"modelName": "tiny", "modelVersion": version}}))
        z.writestr("model.pt", weights)
        z.writestr("handler/request.py", b"# code")


def _version(path) -> str:
    with zipfile.ZipFile(path) as z:
        return json.loads(z.read(MANIFEST))["model"]["modelVersion"]


def test_write_twin(tmp_path):
    src, twin = tmp_path / "tiny.mar", tmp_path / "tiny.twin.mar"
    _mar(src, "1.0")
    assert write_twin(src, twin, "1.0-twin") is True
    assert _version(twin) == "1.0-twin"
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(twin) as b:
        assert {i.filename: a.read(i) for i in a.infolist() if i.filename != MANIFEST} == {
            i.filename: b.read(i) for i in b.infolist() if i.filename != MANIFEST
        }
    assert write_twin(src, twin, "1.0-twin") is False  # already that: left alone
    # back to the original: it is already the twin's twin, nothing is written
    before = src.read_bytes()
    assert write_twin(twin, src, "1.0") is False and src.read_bytes() == before
    # an original replaced by other weights is never overwritten, nor served by mistake
    _mar(src, "1.0", b"other weights")
    with pytest.raises(ScaleError, match="changed under the served model"):
        write_twin(twin, src, "1.0")
    # a stale twin file (ours) is rewritten
    _mar(twin, "1.0-twin", b"stale")
    assert write_twin(src, twin, "1.0-twin") is True
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize(
    "status, text, retried",
    [
        (500, '{"code": 500, "type": "InternalServerException", "message": "Worker died."}', True),
        (507, '{"message": "Worker died."}', True),
        (503, '{"message": "Model \\"tiny\\" has no worker to serve inference request."}', True),
        (502, "", True),
        (504, "", True),
        (500, '{"message": "ErrorDataDecoderException"}', False),
        (400, '{"error": {"code": "invalid_parameter", "message": "Worker died"}}', False),
        (404, "", False),
        (413, "", False),
        (200, "{}", False),
    ],
)
def test_which_answers_are_retried(status, text, retried):
    assert (transient(status, text) is not None) == retried


def test_backoff_bounded():
    p = RetryPolicy(backoff=0.2, max_backoff=1.0)
    waits = [p.wait(k) for k in range(8)]
    assert all(0 < w <= 1.0 for w in waits)
    assert waits[0] <= 0.2 and max(waits) > 0.4


# -- the handler's request id -----------------------------------------------------------------------
@pytest.mark.parametrize("rid", ["0f3c2a", "3fa85f64-5717-4562-b3fc-2c963f66afa6", "trace:1.2_x", "a" * 128])
def test_request_id_echoed(rid):
    assert request_id({"X-Request-Id": rid}, "ts-id") == rid
    assert request_id({"x-request-id": rid}, "ts-id") == rid  # any case


@pytest.mark.parametrize(
    "hostile", ["a\r\nSet-Cookie: x=1", 'a"b', "<script>", "a b", "é", "\U0001f600", "a" * 129, "", "x\n"]
)
def test_request_id_hostile_replaced(hostile):
    got = request_id({"X-Request-Id": hostile}, "ts-id-1")
    assert got == "ts-id-1"
    got = request_id({"X-Request-Id": hostile}, "bad id\n")
    assert valid_request_id(got) and got != hostile and len(got) == 32


def test_request_id_generated_when_absent():
    assert request_id({}, "5f0c") == "5f0c"
    a, b = request_id(None), request_id({"Content-Type": "image/jpeg"})
    assert valid_request_id(a) and valid_request_id(b) and a != b


# -- the client's retries and id check, against a scripted HTTP server --------------------------------
# TorchServe cannot be made to mis-deliver on demand (test_serving provokes it with its own
# scale-downs, where it is rare): this server answers from a script, one entry per request.
class Scripted(http.server.BaseHTTPRequestHandler):
    script: list[str] = []
    seen: list[str] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        rid = self.headers["X-Request-Id"]
        self.seen.append(rid)
        what = self.script.pop(0)
        if what == "hang":
            time.sleep(1.5)
            return
        status, echo = {"ok": (200, rid), "stale": (200, "someone-else"), "died": (507, None),
                        "busy": (503, None)}[what]  # fmt: skip
        body = json.dumps({"request_id": echo} if echo else {"message": "Worker died."}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Request-Id", "torchserve-own-id")  # what TorchServe puts there
        if echo:
            self.send_header("X-Client-Request-Id", echo)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def scripted(tmp_path):
    Scripted.seen = []
    policy = RetryPolicy(attempts=4, budget=30, backoff=0.01, max_backoff=0.02)
    with fake_torchserve(Scripted, tmp_path) as (url, keys):
        yield lambda *script: (
            Scripted.script.extend(script),
            Client(url, url, keys, timeout=1, retry=policy),
        )[1]
    Scripted.script.clear()


def test_stale_answer_dropped_and_retried(scripted):
    client = scripted("stale", "ok")
    r = client.predict("tiny", b"img")
    assert r.status_code == 200 and r.json()["request_id"] == r.request_id == Scripted.seen[-1]
    assert r.retries == ["answer for another request id"]
    assert len(set(Scripted.seen)) == 2  # each attempt its own id


def test_lost_batches_retried(scripted):
    client = scripted("died", "busy", "hang", "ok")
    r = client.predict("tiny", b"img")
    assert r.status_code == 200 and r.request_id == Scripted.seen[-1]
    assert r.retries == ["507 worker died", "503 unavailable", "ReadTimeout"]


def test_retries_bounded(scripted):
    client = scripted("busy", "busy", "busy", "busy", "ok")
    r = client.predict("tiny", b"img")
    assert r.status_code == 503 and len(r.retries) == 4 and len(Scripted.seen) == 4


def test_the_client_starts_without_torch():
    """``python -m scripts.client`` imports neither torch nor torchvision (seconds per call on a small
    machine): what it shares with the handler (headers, the error answer, the settings' checks)
    lives in modules that do not need them."""
    import subprocess
    import sys

    from scripts.paths import ROOT

    code = "import sys, scripts.client.__main__; print(sorted({'torch', 'torchvision', 'PIL'} & set(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr
