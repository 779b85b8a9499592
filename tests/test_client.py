"""The client's pure parts, no server: value checks before any management call, the twin-version
scheme of scale-downs, which failures are retried, and the handler's request-id rule."""

from __future__ import annotations

import json
import zipfile

import pytest

from handler.request import request_id, valid_request_id
from scripts.client import (
    MANIFEST,
    MAX_WORKERS,
    InvalidArgument,
    RetryPolicy,
    ScaleError,
    check_mar,
    check_name,
    check_register,
    check_workers,
    transient,
    twin_of,
    write_twin,
)


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
