"""Request deadlines: the header's rules, the choice of rows that can finish in time, the handler
answering late rows 504 before any decode or forward, and a real TorchServe under overload.

The handler runs in-process through TorchServe's own worker code (``tests.test_handler.Worker``:
the real wire format, ``ts.service.Service``, the real ``Context``); the decode and network calls
are counted by wrapping the Detector's own methods, which still run. The overload test starts a
real TorchServe and real HTTP clients (``scripts.bench.overload``, the bench's own measurement).
"""

from __future__ import annotations

import http.server
import json
import math
import shutil
import time
from pathlib import Path

import pytest

from handler.answer import RequestError
from handler.config import HandlerConfig
from handler.deadline import (
    DEADLINE_HEADER,
    MAX_AHEAD_MS,
    BatchCost,
    can_finish,
    parse_deadline,
    too_late,
)
from handler.effdet_handler import EffDetHandler
from scripts.client import deadline_ms
from tests.helpers import fake_torchserve
from tests.test_handler import MODEL_NAME, MODEL_VERSION, Req, Worker, same_detections

NOW = 1_764_000_000_000.0  # a Unix time in ms (November 2025)


# -- the header ------------------------------------------------------------------------------------


def test_deadline_header_parsed():
    assert parse_deadline(None, NOW) is None
    assert parse_deadline("1764000002000", NOW) == NOW + 2000
    assert parse_deadline(" 1764000002000.5 ", NOW) == NOW + 2000.5
    assert parse_deadline("1764000000000", NOW) == NOW  # due now: parsed; the handler calls it expired
    assert parse_deadline("1763999000000", NOW) == NOW - 1_000_000  # past: parsed, the handler answers 504


@pytest.mark.parametrize(
    "value",
    ["", " ", "soon", "-1764000002000", "+1764000002000", "1.764e12", "0x19AF", "NaN", "inf", "1764000002000ms",
     "1,764,000,002,000", "12.5.3", "١٧٦٤٠٠٠٠٠٢٠٠٠", "1764000002000\r\nX: y", "9" * 40],
)  # fmt: skip
def test_deadline_header_not_a_number_is_400(value):
    """A value that is not plain digits (signs, exponents, units, Unicode digits, CR/LF) is refused
    with 400 invalid_deadline, and the value is echoed ASCII-escaped and cut short."""
    with pytest.raises(RequestError) as e:
        parse_deadline(value, NOW)
    assert (e.value.status, e.value.code) == (400, "invalid_deadline")
    assert e.value.message.isascii() and "\r" not in e.value.message and len(e.value.message) < 200


@pytest.mark.parametrize(
    "value, hint",
    [("1764000002", "seconds"), ("0", "seconds"), (str(int(NOW + MAX_AHEAD_MS + 1000)), "day ahead"),
     (str(int(NOW * 1000)), "day ahead")],
)  # fmt: skip
def test_absurd_deadline_is_400_with_a_hint(value, hint):
    """Seconds instead of milliseconds, or micro/nanoseconds: a unit mistake, said as such."""
    with pytest.raises(RequestError, match=hint) as e:
        parse_deadline(value, NOW)
    assert (e.value.status, e.value.code) == (400, "invalid_deadline")


def test_client_deadline_is_its_timeout_in_unix_ms():
    assert deadline_ms(2.0, now=NOW / 1000) == NOW + 2000
    assert abs(deadline_ms(0.5) - (time.time() + 0.5) * 1000) < 1000


class Recorder(http.server.BaseHTTPRequestHandler):
    """Answers 503 to the first request and 200 to the rest; records each request's deadline header."""

    seen: list[tuple[float, str | None]] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.seen.append((time.time() * 1000, self.headers.get(DEADLINE_HEADER)))
        rid = self.headers["X-Request-Id"]
        status = 503 if len(self.seen) == 1 else 200
        body = json.dumps({"request_id": rid}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Client-Request-Id", rid)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("deadlines", [True, False])
def test_client_sends_each_attempt_its_own_deadline(tmp_path, deadlines):
    """Client.predict sends X-Request-Deadline = now + its per-attempt timeout, a fresh one on the
    retry; with deadlines=False none. Catches a client whose deadline was fixed once per call (a
    retry would arrive already expired) or sent in seconds."""
    from scripts.client import Client, RetryPolicy

    Recorder.seen = []
    with fake_torchserve(Recorder, tmp_path) as (url, keys):
        client = Client(url, url, keys, timeout=7, retry=RetryPolicy(attempts=2, backoff=0.3, max_backoff=0.3),
                        deadlines=deadlines)  # fmt: skip
        assert client.predict("tiny", b"img").status_code == 200
    assert len(Recorder.seen) == 2
    if not deadlines:
        assert [d for _, d in Recorder.seen] == [None, None]
        return
    (t1, d1), (t2, d2) = Recorder.seen
    assert abs(int(d1) - (t1 + 7000)) < 1000 and abs(int(d2) - (t2 + 7000)) < 1000
    assert int(d2) - int(d1) >= 100  # the retry's own deadline, after the backoff


# -- the cost of a batch and the rows that can finish ----------------------------------------------


def test_batch_cost_unknown_until_measured_then_learnt_with_a_margin_and_scaled():
    cost = BatchCost(weight=0.5, spread=2.0)
    t = 1e12  # the clock (Unix ms), passed in
    assert cost.estimate(4, t) is None  # before the first batch: unknown, nothing is dropped on a guess
    cost.update(4, 400.0, t)
    assert cost.estimate(4, t) == 400.0 + 2 * 100.0  # one sample: its deviation taken as a quarter of it
    for _ in range(30):
        cost.update(4, 300.0, t)
    assert cost.estimate(4, t) == pytest.approx(300.0, abs=1e-3)  # steady batches: the margin vanishes
    for ms in (200.0, 400.0) * 10:
        cost.update(4, ms, t)
    mean, dev = cost.mean[4], cost.dev[4]
    assert (
        250 < mean < 350 and dev > 50 and cost.estimate(4, t) == mean + 2 * dev
    )  # noisy: planned above the mean
    assert cost.estimate(8, t) == pytest.approx(2 * cost.estimate(4, t))  # scaled from the nearest size
    assert cost.estimate(2, t) == pytest.approx(cost.estimate(4, t) / 2)
    cost.update(1, 50.0, t)
    assert cost.estimate(2, t) == pytest.approx(2 * cost.estimate(1, t))  # 1 is nearer to 2 than 4 is
    assert cost.estimate(0, t) == 0.0
    before = cost.estimate(4, t)
    cost.update(4, math.nan, t + 1000)
    cost.update(4, -1.0, t + 1000)
    assert cost.estimate(4, t) == before  # nonsense measurements are ignored


def test_batch_cost_unknown_again_when_no_batch_has_run_for_a_while():
    """Only a batch that runs updates the estimate: one slow batch (a cold start, a stall) set it at
    60 s, and every later row due within a minute would be refused without running, for ever. An
    estimate no batch has confirmed for ``max_age_ms`` is unknown again (rows run), and the next batch
    starts it afresh (one fresh sample against the old 40 s mean would still plan 65 s)."""
    cost = BatchCost(max_age_ms=5000)
    cost.update(1, 40_000.0, 1e12)
    assert cost.estimate(1, 1e12 + 5000) == pytest.approx(60_000.0)
    assert cost.estimate(4, 1e12 + 5001) is None
    cost.update(1, 30.0, 1e12 + 9000)  # the next batch starts the estimate afresh
    assert cost.estimate(1, 1e12 + 9000) == 30.0 * 1.5 and cost.estimate(2, 1e12 + 9000) == 90.0
    with pytest.raises(ValueError, match="max_age_ms"):
        BatchCost(max_age_ms=0)


def test_rows_that_cannot_finish_are_dropped_most_urgent_first():
    per_row = {1: 100.0, 2: 200.0, 3: 300.0, 4: 400.0}.get  # a CPU: cost grows with the rows
    # four rows due in 250, 290, 450 and 1000 ms: all four would take 400 ms, three 300 ms, so
    # the two most urgent cannot make it; without them the other two take 200 ms and both fit
    due = [NOW + 450, NOW + 250, NOW + 1000, NOW + 290]
    assert can_finish(due, NOW, per_row) == [True, False, True, False]
    due[3] = NOW + 350  # now three fit in 300 ms: only the most urgent is dropped
    assert can_finish(due, NOW, per_row) == [True, False, True, True]
    assert can_finish([NOW + 5000] * 4, NOW, per_row) == [True] * 4
    assert can_finish([NOW + 50] * 3, NOW, per_row) == [False] * 3
    # rows without a deadline always run and count in the batch's cost
    assert can_finish([None, NOW + 150, None], NOW, per_row) == [True, False, True]
    assert can_finish([None, None], NOW, per_row) == [True, True]
    # before any measurement every row runs
    assert can_finish([NOW + 1, NOW + 2], NOW, lambda k: None) == [True, True]
    assert can_finish([], NOW, per_row) == []


def test_rows_must_finish_a_margin_before_their_deadlines():
    """The answer still has to reach its caller after the batch: a row due 30 ms after its batch
    would end runs without a margin and is dropped with one of 50 ms, and the margin counts in
    choosing which rows fit together."""
    per_row = {1: 100.0, 2: 200.0}.get
    assert can_finish([NOW + 130], NOW, per_row) == [True]
    assert can_finish([NOW + 130], NOW, per_row, margin_ms=50) == [False]
    assert can_finish([NOW + 230, NOW + 400], NOW, per_row) == [True, True]
    assert can_finish([NOW + 230, NOW + 400], NOW, per_row, margin_ms=50) == [False, True]
    assert can_finish([NOW + 1, None], NOW, lambda k: None, margin_ms=50) == [True, True]
    assert "about 50 ms to reach you" in too_late(200.0, 50).message


# -- the handler, in-process through TorchServe's worker code -------------------------------------


@pytest.fixture(scope="module")
def model_dir(exported, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("model_dir")
    for name in ("model.pt", "model.json", "index_to_name.json"):
        shutil.copy(exported / name, d / name)
    return d


@pytest.fixture(scope="module")
def worker(model_dir) -> Worker:
    return Worker(model_dir)


class Counted:
    """Counts the rows that reach the Detector's decode and its network (the real methods run)."""

    def __init__(self, worker: Worker, monkeypatch):
        det = worker.handler.detector
        self.decoded, self.forwarded = 0, 0
        decode_batch, detect_tensors = det.decode_batch, det.detect_tensors

        def decode(raws):
            self.decoded += len(raws)
            return decode_batch(raws)

        def detect(images, *args, **kwargs):
            self.forwarded += len(images)
            return detect_tensors(images, *args, **kwargs)

        monkeypatch.setattr(det, "decode_batch", decode)
        monkeypatch.setattr(det, "detect_tensors", detect)


def req(data: bytes, deadline: float | str | None = None) -> Req:
    headers = {} if deadline is None else {DEADLINE_HEADER: str(deadline)}
    return Req(data, "image/jpeg", headers=headers)


def now_ms() -> float:
    return time.time() * 1000


def test_expired_rows_never_reach_decode_or_the_network(worker, val_images, detector, monkeypatch):
    """A batch of good, expired, badly dated and undated rows: the expired one is answered 504
    deadline_exceeded and the bad one 400 invalid_deadline, neither decoded nor run through the
    network (counted), with fixed ASCII phrases; their batch-mates get the in-process answers.
    Catches a handler that checks deadlines after decoding, or fails a whole batch for one row."""
    counted = Counted(worker, monkeypatch)
    good = [val_images[0], val_images[1]]
    answers = worker.predict(
        [req(good[0], int(now_ms()) + 60_000), req(val_images[2], int(now_ms()) - 1),
         req(val_images[3], "in two seconds"), req(good[1])]
    )  # fmt: skip
    assert [a.status for a in answers] == [200, 504, 400, 200]
    assert answers[1].phrase == "Gateway Timeout" and answers[2].phrase == "Bad Request"
    assert answers[1].body["error"]["code"] == "deadline_exceeded"
    assert "passed" in answers[1].body["error"]["message"]
    assert answers[2].body["error"]["code"] == "invalid_deadline"
    assert all(a.headers.get("X-Client-Request-Id") for a in answers)
    assert (counted.decoded, counted.forwarded) == (2, 2)
    want = detector.predict(good)  # the same two images as one batch, in-process
    assert all(same_detections(a.body, w) for a, w in zip((answers[0], answers[3]), want, strict=True))


def test_a_batch_of_expired_rows_runs_nothing(worker, val_images, monkeypatch):
    counted = Counted(worker, monkeypatch)
    past = int(now_ms()) - 5000
    answers = worker.predict([req(val_images[i], past) for i in range(4)])
    assert [a.status for a in answers] == [504] * 4
    assert (counted.decoded, counted.forwarded) == (0, 0)


def test_rows_that_cannot_finish_in_time_are_dropped_before_decoding(worker, val_images, monkeypatch):
    """With a measured batch cost of 60 s, a row due in 2 s is answered 504 at once (not decoded,
    not run) while a row due in ten minutes and a row without a deadline are served; the estimate
    then moves towards what the real batch cost. Catches a handler that only drops rows already
    past their deadline (which lets the worker compute answers that arrive too late)."""
    handler: EffDetHandler = worker.handler
    det = handler.detector
    for b in det.buckets:
        handler.batch_cost.update(b, 60_000.0, now_ms())
    counted = Counted(worker, monkeypatch)
    answers = worker.predict(
        [req(val_images[0], int(now_ms()) + 600_000), req(val_images[1], int(now_ms()) + 2000),
         req(val_images[2])]
    )  # fmt: skip
    assert [a.status for a in answers] == [200, 504, 200]
    assert answers[1].body["error"]["code"] == "deadline_exceeded"
    assert "cannot be answered before its deadline" in answers[1].body["error"]["message"]
    assert (counted.decoded, counted.forwarded) == (2, 2)
    assert handler.batch_cost.mean[det.bucket(2)] < 60_000.0  # learnt from the batch that ran
    handler.batch_cost = BatchCost()


def test_the_margin_for_the_way_back_is_the_model_configs(worker, model_dir, val_images, tmp_path):
    """A row due 400 ms after its batch is planned to end: served by a worker with the default
    margin, refused by one whose model-config.yaml sets ``deadline_margin_ms: 800`` (the 504 says
    so). Catches a handler that plans rows to end at their deadline (on a busy 2-core machine such
    rows left the handler in time and half of them reached their callers after it: the overload
    test's in-time answers fell to 0.25 x capacity), or that ignores the model's setting."""
    wide = tmp_path / "wide_margin"
    shutil.copytree(model_dir, wide)
    (wide / "model-config.yaml").write_text("handler:\n  deadline_margin_ms: 800\n")

    def one_row(w: Worker):
        handler: EffDetHandler = w.handler
        for b in handler.detector.buckets:
            handler.batch_cost.update(b, 1000.0, now_ms())  # planned: 1000 + 2 x 250 ms
        try:
            [a] = w.predict([req(val_images[0], int(now_ms()) + 1500 + 400)])
        finally:
            handler.batch_cost = BatchCost()
        return a

    assert worker.handler.deadline_margin_ms == HandlerConfig().deadline_margin_ms < 400
    assert one_row(worker).status == 200
    refused = one_row(Worker(wide))
    assert (refused.status, refused.body["error"]["code"]) == (504, "deadline_exceeded")
    assert "about 800 ms to reach you" in refused.body["error"]["message"]


def test_before_any_measurement_only_expired_rows_are_dropped(worker, val_images, monkeypatch):
    """A fresh worker knows no batch cost: a row due soon (but not yet due) is served, and the
    batch it ran in becomes the first measurement."""
    handler: EffDetHandler = worker.handler
    handler.batch_cost = BatchCost()
    counted = Counted(worker, monkeypatch)
    [a] = worker.predict([req(val_images[0], int(now_ms()) + 3000)])
    assert a.status == 200 and counted.forwarded == 1
    first = handler.batch_cost.estimate(handler.detector.bucket(1), now_ms())
    assert first is not None and first > 0


def test_a_slow_batch_long_ago_refuses_nothing(worker, val_images, monkeypatch):
    """A batch measured at 60 s ten seconds ago, none since: a row due in 2 s is served (200) and
    the estimate is learnt again from its batch. Catches a handler that keeps refusing every row on
    one old slow batch (nothing runs, so nothing corrects it): on a busy machine one batch of a model
    that takes 30 ms took 1.6 s, and clients that all send 2 s deadlines would get 504 for ever."""
    handler: EffDetHandler = worker.handler
    handler.batch_cost = BatchCost()
    for b in handler.detector.buckets:
        handler.batch_cost.update(b, 60_000.0, now_ms() - 10_000)
    counted = Counted(worker, monkeypatch)
    [a] = worker.predict([req(val_images[0], int(now_ms()) + 2000)])
    assert a.status == 200 and counted.forwarded == 1
    assert handler.batch_cost.estimate(handler.detector.bucket(1), now_ms()) < 2000  # learnt afresh
    handler.batch_cost = BatchCost()


def test_a_describe_row_and_the_kinds_of_bodies_keep_their_deadline_rules(worker, val_images):
    """A describe row needs no deadline; a JSON body with an expired deadline is refused before its
    base64 is decoded (its image field is not even valid base64)."""
    past = int(now_ms()) - 10
    answers = worker.predict(
        [Req(None, headers={"describe": "True", DEADLINE_HEADER: str(past)}),
         Req(json.dumps({"image": "%%% not base64"}).encode(), "application/json",
             headers={DEADLINE_HEADER: str(past)}),
         req(val_images[0], int(now_ms()) + 60_000)]
    )  # fmt: skip
    assert answers[0].status == 200 and answers[0].body["model"] == {
        "name": MODEL_NAME,
        "version": MODEL_VERSION,
    }
    assert answers[1].status == 504 and answers[1].body["error"]["code"] == "deadline_exceeded"
    assert answers[2].status == 200


# -- a real TorchServe under overload -----------------------------------------------------------------


@pytest.mark.server
@pytest.mark.timeout(900)
def test_goodput_under_overload_stays_near_capacity(exported, val_images, tmp_path):
    """One worker (batchSize 4), clients in a closed loop: a few clients with a generous timeout
    measure what the worker serves per second (capacity, before and after); in between 96 clients,
    each giving up after a deadline a third as long as the queue they make (an overload of 3x),
    send X-Request-Deadline. The deadline is set from the measured capacity (8 batches' time), so
    the test asks the same of a fast machine and of a busy one.

    Asserted, as ratios of the same run: answers within the deadline per second >= 0.4 x capacity
    (measured 0.83 on a 2-core VM, 0.60 with one core busy elsewhere; with the same clients sending
    no deadline the worker computes answers nobody reads and this falls to 0.03; with rows planned
    to end at their deadline, no margin for the way back, 0.25-0.68). In time as
    TorchServe's frontend counts it (its access log: arrival to answer): 96 client threads in this
    process read their answers late when the machine is busy, which made the clients' own count
    swing from 0.03 to 0.66 between runs of the same product. Only 200, 503 and 504 come back;
    TorchServe answered every request sent (its access log, after its queue drained: no request
    silently dropped); the worker is the same process throughout.
    """
    from scripts.archive import archive
    from scripts.bench.load import ProcessCPU
    from scripts.bench.overload import (
        EXPECTED,
        access_log,
        answered_in_time,
        closed_loop,
        drain,
        overload_client,
        server_answers,
        worker_pids,
    )
    from scripts.bench.served import _server_pid
    from scripts.client import Client
    from scripts.serve import Server
    from scripts.settings import ModelConfig

    store = tmp_path / "store"
    # the demo's batching; one torch thread (two spin against each other on a shared 2-core
    # machine); a worker warming up on a busy machine may take minutes
    handler = HandlerConfig(torch_threads=1)
    archive(exported, "busy", "1.0", store, ModelConfig(batch_size=4, max_batch_delay=20, startup_timeout=900,
                                                         handler=handler))  # fmt: skip
    images = val_images[:8]
    srv = Server(tmp_path / "ts", store, free_ports=True)
    try:
        srv.start(["busy=busy.mar"], timeout=900)
        mgmt = Client(srv.inference_url, srv.management_url, srv.key_file)
        pids = worker_pids(mgmt, "busy")
        before = server_answers(srv, "busy")
        cpu = ProcessCPU(_server_pid(srv))
        calm = overload_client(srv, 300, False)
        caps = [closed_loop(calm, "busy", images, 8, 10, 3, 300, cpu)]
        clients = 96
        deadline = clients / (3 * caps[0]["goodput"])
        logged, start = len(access_log(srv, "busy")), time.monotonic()
        over = closed_loop(overload_client(srv, deadline, True), "busy", images, clients,
                           max(12, 4 * deadline), 3 * deadline + 2, deadline, cpu)  # fmt: skip
        took = time.monotonic() - start
        drain(srv, mgmt, "busy", before, caps[0]["requests"] + over["requests"])  # the queue empties
        in_time = answered_in_time(access_log(srv, "busy")[logged:], deadline) / took
        caps.append(closed_loop(calm, "busy", images, 8, 10, 3, 300, cpu))
        served = drain(srv, mgmt, "busy", before, sum(p["requests"] for p in (*caps, over)))
        capacity = (caps[0]["goodput"] + caps[1]["goodput"]) / 2
        print(f"\ncapacity {[round(c['goodput'], 2) for c in caps]}/s; {clients} clients, deadline "
              f"{deadline:.2f} s: in time {in_time:.2f}/s = {in_time / capacity:.2f} x as the frontend saw it, "
              f"{over['goodput'] / capacity:.2f} x as the clients did; {over['statuses']}; {served}; "
              f"worker %cpu {[p.get('workers_cpu_pct') for p in (*caps, over)]}")  # fmt: skip
        for c in caps:
            assert c["goodput"] > 0 and c["statuses"] == {"200": c["finished_in_window"]}, c
        assert in_time >= 0.4 * capacity, (caps, over, in_time)
        faults = {k: v for k, v in over["statuses"].items() if k.isdigit() and k not in EXPECTED}
        assert not faults and "wrong answer" not in over["statuses"], over["statuses"]
        assert served["lost"] == 0, served
        assert worker_pids(mgmt, "busy") == pids
    finally:
        srv.stop()


# -- the bench's overload point, as reported ------------------------------------------------------


def _phase(clients: int, deadline: float, goodput: float, statuses: dict, lost: int = 0) -> dict:
    return {"clients": clients, "deadline_s": deadline, "window_s": 30.0, "goodput": goodput,
            "statuses": statuses, "p50_ms": 900.0, "p99_ms": 1900.0, "lost": lost,
            "faults": {k: v for k, v in statuses.items() if k.isdigit() and k not in ("200", "503", "504")}}  # fmt: skip


def _overload(on: float, faults: dict | None = None, restarted: bool = False) -> dict:
    caps = [_phase(32, 60.0, 40.0, {"200": 1200}), _phase(32, 60.0, 44.0, {"200": 1320})]
    return {
        "batch_size": 4, "max_batch_delay": 20, "workers": 1, "model": "m", "capacity_runs": caps,
        "capacity": 42.0, "capacity_spread": 4 / 42,
        "deadlines": _phase(128, 2.0, on, {"200": int(on * 30), "504": 900, **(faults or {})}),
        "no_deadlines": _phase(128, 2.0, 2.0, {"200": 60, "503": 9000, "ReadTimeout": 400}),
        "deadlines_over_capacity": on / 42.0, "no_deadlines_over_capacity": 2.0 / 42.0,
        "worker_restarted": restarted,
    }  # fmt: skip


def test_overload_point_in_ratios_targets_and_report():
    """The overload point's ratio and target (>= 0.7 x capacity, and no fault, no lost answer, no
    restart), its section in the report and its line in the ratios."""
    from scripts import bench

    meta = {"stamp": "x", "device": "cpu", "device_name": "test", "precision": "fp32", "channels_last": False,
            "threads": 1, "cpu_count": 2, "loadavg_start": [1.0], "loadavg_end": [2.0], "images": 2,
            "image_side": 160, "repeats": 1, "export_dir": "e",
            "model": {"name": "m", "backbone": "b", "image_size": [128, 128], "num_classes": 2, "origin": "test"}}  # fmt: skip
    results = {"meta": meta, "overload": _overload(33.6)}
    r = bench.ratios(results)
    assert r["overload_goodput_over_capacity"] == pytest.approx(0.8)
    assert r["overload_goodput_over_capacity_without_deadlines"] == pytest.approx(2 / 42)
    [t] = [t for t in r["targets"] if t["target"].startswith("goodput")]
    assert t["met"] and "128 clients with 2 s deadlines" in t["target"] and "32 clients" in t["target"]
    text = bench.report(results)
    assert ". overload: batchSize" in text and "no deadlines" in text and "0.80x with deadlines" in text
    assert "goodput / capacity    0.80x" in bench.ratio_lines(r)
    for bad in (_overload(25.0), _overload(33.6, faults={"500": 1}), _overload(33.6, restarted=True)):
        [t] = [
            t
            for t in bench.ratios({"meta": meta, "overload": bad})["targets"]
            if t["target"].startswith("goodput")
        ]
        assert not t["met"]


def test_overload_stage_and_its_arguments():
    from scripts import bench

    assert "overload" in bench.STAGES
    assert bench.parse_args([]).overload == (32, 128, 2.0, 30.0)
    assert bench.parse_args(["--overload", "16:64:1.5:20"]).overload == (16, 64, 1.5, 20.0)
    assert bench.parse_args(["--overload", "2:6:1:1:0.5"]).overload == (2, 6, 1.0, 1.0, 0.5)
    for bad in ("16:64:1.5", "1:2:3:4:5:6"):
        with pytest.raises(SystemExit):
            bench.parse_args(["--overload", bad])


def test_archives_may_give_workers_longer_to_start():
    """The overload stage and test archive with a long startupTimeout (a worker warming up on a busy
    machine); absent, TorchServe's default stands; nonsense is refused before an archive is made."""
    from scripts.settings import InvalidArgument, ModelConfig

    assert "startupTimeout" not in ModelConfig().to_yaml()
    assert ModelConfig(startup_timeout=900).to_yaml()["startupTimeout"] == 900
    for bad in (0, -5, 1.5, 10**6):
        with pytest.raises(InvalidArgument, match="startup_timeout"):
            ModelConfig(startup_timeout=bad)
