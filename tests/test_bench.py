"""The benchmark's pieces at tiny sizes: results are well-formed, and inside the bench our
post-processing output is checked against effdet's (and that check has teeth).

No timing is asserted anywhere: only shapes, keys, signs and agreement. The stages run on a
random-weight small-preset model at 128x128 exported by the bench itself (its standalone path);
the load generator runs against a stub HTTP server here, and against a real TorchServe in the
``soak`` test (``make soak``). The three network formats side by side run on the shared trained
run's exports, against a real TorchServe.
"""

from __future__ import annotations

import io
import json
import math
import re
import shutil
import statistics
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from handler.answer import Answer
from scripts import bench
from scripts.serve import free_port

BATCHES = (1, 2)


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory) -> Path:
    return bench.make_random_export(tmp_path_factory.mktemp("bench") / "random", "small", 2, 128, seed=3)


@pytest.fixture(scope="module")
def workload(tiny_export) -> bench.Workload:
    images = bench.make_images(2, side=160, seed=1)
    return bench.prepare(tiny_export, images, BATCHES, torch.device("cpu"))


def _finite_positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def _assert_timing_rows(rows: list[dict], repeats: int) -> None:
    assert [r["batch"] for r in rows] == list(BATCHES)
    for r in rows:
        assert len(r["seconds"]) == repeats and all(s > 0 for s in r["seconds"])
        assert r["min_s"] <= r["median_s"] <= r["max_s"]
        assert _finite_positive(r["images_per_s"]) and _finite_positive(r["ms_per_image"])
        assert r["images_per_s"] == pytest.approx(r["batch"] / r["median_s"])


# -- the model and the images -------------------------------------------------------------------------


def test_random_export_is_complete_reused_and_scores_spread(tiny_export, workload):
    for name in ("model.pt", "model.json", "index_to_name.json"):
        assert (tiny_export / name).is_file()
    card = json.loads((tiny_export / "model.json").read_text())
    assert card["effdet_config"]["image_size"] == [128, 128] and card["effdet_config"]["num_classes"] == 2
    stamp = (tiny_export / "model.pt").stat().st_mtime_ns
    assert bench.make_random_export(tiny_export.parent, "small", 2, 128) == tiny_export
    assert (tiny_export / "model.pt").stat().st_mtime_ns == stamp  # reused, not exported again
    # spread heads: not effdet's near-constant prior, whose scores tie: the top 100 are distinct
    cls_out, _ = workload.heads[1]
    flat = torch.cat([c.permute(0, 2, 3, 1).reshape(1, -1) for c in cls_out], 1).sigmoid()
    assert flat.topk(100).values.unique().numel() >= 95


def test_make_images_are_distinct_jpegs_of_the_asked_size():
    images = bench.make_images(3, side=200, seed=5)
    assert len(set(images)) == 3
    for data in images:
        assert data[:3] == b"\xff\xd8\xff"
        img = Image.open(io.BytesIO(data))
        assert img.format == "JPEG" and max(img.size) == 200
    assert bench.make_images(3, side=200, seed=5) == images  # deterministic by seed


def test_prepare_records_inputs_and_head_outputs(workload):
    size = tuple(workload.cfg["image_size"])
    for b in BATCHES:
        x, img_scale, img_size = workload.inputs[b]
        assert x.shape == (b, 3, *size) and img_scale.shape == (b,) and img_size.shape == (b, 2)
        cls_out, box_out = workload.heads[b]
        assert len(cls_out) == len(box_out) == 5 and cls_out[0].shape[0] == b
    assert workload.heads32 is workload.heads  # fp32: the same outputs


# -- the in-process stages ----------------------------------------------------------------------------


def test_model_and_effdet_stages_are_well_formed(workload):
    stream = io.StringIO()
    progress = bench.Progress(stream=stream)
    _assert_timing_rows(bench.bench_model(workload, BATCHES, 2, 1, progress), 2)
    rows, parity = bench.bench_effdet(workload, BATCHES, 2, 1, progress)
    _assert_timing_rows(rows, 2)
    assert parity <= 1e-4  # effdet eager holds the TorchScript file's weights
    text = stream.getvalue()
    assert "[model only]" in text and "[effdet eager]" in text and "6/6" in text


def test_postprocessing_stage_checks_ours_against_effdet(workload):
    rows = bench.bench_post(workload, BATCHES, 2, 1, bench.Progress(enabled=False))
    max_det = workload.cfg["max_det_per_image"]
    assert [r["batch"] for r in rows] == list(BATCHES)
    for r in rows:
        assert r["identical"] is True
        assert r["rows"] == r["batch"] * max_det  # no score threshold: every image fills its 100 rows
        assert 0 < r["compared_rows"] <= r["rows"]
        assert r["max_score_diff"] <= bench.SCORE_ATOL and r["max_box_diff_px"] <= bench.BOX_ATOL
        assert _finite_positive(r["speedup"]) and r["speedup"] == pytest.approx(r["effdet_ms"] / r["ours_ms"])
        for side in ("ours", "effdet"):
            assert len(r[side]["seconds"]) == 2


def _outputs(workload, b=2):
    from effdet.anchors import Anchors
    from omegaconf import OmegaConf

    cfg = workload.cfg
    cls_out, box_out = workload.heads[b]
    _, img_scale, img_size = workload.inputs[b]
    anchors = Anchors.from_config(OmegaConf.create(cfg)).boxes
    with torch.inference_mode():
        ours = bench.ours_postprocess(cls_out, box_out, workload.detector.anchors, cfg, img_scale, img_size)
        theirs = bench.effdet_postprocess(cls_out, box_out, anchors, cfg, img_scale, img_size)
    return ours, theirs, bench.tie_horizon(cls_out, cfg["max_detection_points"])


def test_the_identity_check_has_teeth(workload):
    ours, theirs, horizon = _outputs(workload)
    assert bench.compare_detections(ours, theirs, horizon)["identical"]
    top = (0, 0)  # the best detection of the first image is always above the tie horizon
    assert float(theirs[top][4]) > horizon[0]

    wrong_class = ours.clone()
    wrong_class[top][5] += 1
    with pytest.raises(bench.BenchError, match="class"):
        bench.compare_detections(wrong_class, theirs, horizon)
    moved = ours.clone()
    moved[top][0] += 0.1
    with pytest.raises(bench.BenchError, match="box diff"):
        bench.compare_detections(moved, theirs, horizon)
    rescored = ours.clone()
    rescored[top][4] -= 1e-4
    with pytest.raises(bench.BenchError, match="score diff"):
        bench.compare_detections(rescored, theirs, horizon)
    dropped = ours.clone()
    dropped[top] = 0
    with pytest.raises(bench.BenchError, match="kept"):
        bench.compare_detections(dropped, theirs, horizon)
    with pytest.raises(bench.BenchError, match="shapes differ"):
        bench.compare_detections(ours[:1], theirs, horizon)


def test_a_parity_check_that_compared_nothing_fails(workload):
    ours, theirs, horizon = _outputs(workload)
    above_all = [float(theirs[i, :, 4].max()) for i in range(theirs.shape[0])]
    with pytest.raises(bench.BenchError, match="compared no rows"):
        bench.compare_detections(ours, theirs, above_all)
    with pytest.raises(bench.BenchError, match="compared no rows"):
        bench.compare_detections(torch.zeros_like(ours), torch.zeros_like(theirs))


def test_match_detections_same_class_and_iou():
    def det(box, cls, score=0.9):
        return {"box": box, "class_id": cls, "score": score}

    ref = [det([0, 0, 10, 10], 1), det([20, 20, 30, 30], 2), det([50, 50, 60, 60], 1)]
    other = [
        det([0, 0, 10, 10.5], 1),  # IoU 0.95: matched
        det([20, 20, 30, 30], 1),  # other class: not matched
        det([50, 50, 60, 62], 1),  # IoU 0.83: not matched
    ]
    assert bench.match_detections(ref, other) == (1, 3)
    assert bench.match_detections(ref, other, min_iou=0.8) == (2, 3)
    assert bench.match_detections(ref, ref) == (3, 3)
    assert bench.match_detections([], other) == (0, 0) and bench.match_detections(ref, []) == (0, 3)
    # one to one: two reference boxes cannot both claim the same other box
    assert bench.match_detections([ref[0], ref[0]], [ref[0]]) == (1, 2)


def test_fp16_stage_is_skipped_with_a_reason_on_the_cpu(workload):
    stream = io.StringIO()
    out = bench.bench_fp16(workload, bench.Progress(stream=stream))
    assert "CUDA" in out["skipped"] and "fp16 stage skipped" in stream.getvalue()


def test_null_handler_archive_and_answers(tmp_path):
    """The null handler's own .mar, built by the real torch-model-archiver, holds the handler and
    the settings; the handler answers each request of a batch with the constant."""
    import zipfile

    import yaml

    from scripts.bench import null_handler

    mar = bench.archive_null("null_b4_d5_w1", tmp_path, (4, 5, 1), cuda=False)
    with zipfile.ZipFile(mar) as z:
        names = set(z.namelist())
        manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
        config = yaml.safe_load(z.read("model-config.yaml"))
    assert "null_handler.py" in names and manifest["model"]["handler"] == "null_handler.py"
    assert "handler/answer.py" in names  # the answer contract it answers with
    assert config["batchSize"] == 4 and config["maxBatchDelay"] == 5 and config["deviceType"] == "cpu"
    assert null_handler.handle(None, None) is None
    answers = null_handler.handle([{"body": b"x"}] * 3, None)
    assert len(answers) == 3 and all(Answer.from_json(a).detections == () for a in answers)
    # "no delay" is written as 1 ms, as for the model's archives: TorchServe reads an archive's 0 as 100 ms
    with zipfile.ZipFile(bench.archive_null("null_b4_d0_w1", tmp_path, (4, 0, 1), cuda=False)) as z:
        assert yaml.safe_load(z.read("model-config.yaml"))["maxBatchDelay"] == 1


@pytest.mark.compile
def test_train_export_trains_exports_and_is_reused(tmp_path):
    """The bench's default model: the preset trained here (2 steps at 128 px in this test) and exported."""
    export_dir = bench.train_export(tmp_path / "t", "small", 128, steps=2, batch_size=2, accelerator="cpu")
    card = json.loads((export_dir / "model.json").read_text())
    assert (export_dir / "model.pt").is_file() and card["provenance"]["steps"] == 2
    assert card["effdet_config"]["image_size"] == [128, 128] and card["provenance"]["train_seconds"] > 0
    stamp = (export_dir / "model.pt").stat().st_mtime_ns
    assert bench.train_export(tmp_path / "t", "small", 128, steps=2, batch_size=2) == export_dir
    assert (export_dir / "model.pt").stat().st_mtime_ns == stamp


def test_tie_horizon_is_the_highest_shared_candidate_score():
    # one level, 1 image, 1 class, 4 anchors: logits 3, 2, 2, 1 -> the tie is at sigmoid(2)
    cls_out = [torch.tensor([3.0, 2.0, 2.0, 1.0]).reshape(1, 1, 2, 2)]
    assert bench.tie_horizon(cls_out, 3) == [pytest.approx(torch.tensor(2.0).sigmoid().item())]
    assert bench.tie_horizon([torch.tensor([3.0, 2.0, 1.0, 0.0]).reshape(1, 1, 2, 2)], 3) == [float("-inf")]


def test_handler_stage_runs_the_real_handler_bytes_to_json(workload):
    handler, ctx = bench.make_handler(workload, threads=None)
    answers = handler.handle([{"body": img} for img in workload.images], ctx)
    bench.check_answers(answers, len(workload.images))
    for a, data in zip(answers, workload.images, strict=True):
        assert a["image"]["width"] == Image.open(io.BytesIO(data)).width
        assert json.loads(json.dumps(a)) == a
    with pytest.raises(bench.BenchError):
        bench.check_answers(answers[:1], 2)
    rows = bench.bench_handler(
        workload, BATCHES, 2, 1, bench.Progress(enabled=False), None, "auto", (handler, ctx)
    )
    _assert_timing_rows(rows, 2)


# -- the load generator and the report ----------------------------------------------------------------


class _Stub(BaseHTTPRequestHandler):
    """200 with a detection body (or ``body``), except every 4th request: 503."""

    count = 0
    body = b'{"image": {"width": 1, "height": 1}, "detections": []}'
    lock = threading.Lock()

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with _Stub.lock:
            _Stub.count += 1
            fail = _Stub.count % 4 == 0
        body = b'{"error": "busy"}' if fail else _Stub.body
        self.send_response(503 if fail else 200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def stub_url():
    _Stub.count = 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _clients(url: str, tmp_path: Path):
    """The bench's clients (no retries) against ``url``, with a key file of their own."""
    from scripts.client import NO_RETRY, Client

    keys = tmp_path / "key_file.json"
    keys.write_text(json.dumps({k: {"key": k.lower()} for k in ("inference", "management", "API")}))
    return lambda: Client(url, url, keys, timeout=10, retry=NO_RETRY)


def test_run_load_counts_successes_failures_and_client_cpu(stub_url, tmp_path):
    clients = _clients(stub_url, tmp_path)
    reps = [bench.run_load(clients, "x", [b"a", b"bb"], concurrency=3, total=12) for _ in range(2)]
    for r in reps:
        assert r["requests"] == 12 and r["ok"] + r["failed"] == 12 and len(r["latencies_ms"]) == r["ok"]
        assert _finite_positive(r["wall_s"]) and r["throughput"] == pytest.approx(r["ok"] / r["wall_s"])
        assert r["client_cpu_s"] >= 0 and r["client_cpu_pct_of_core"] >= 0
    assert sum(r["failed"] for r in reps) == 6 and sum(r["statuses"].get("503", 0) for r in reps) == 6
    point = bench.aggregate(reps)
    assert point["concurrency"] == 3 and point["requests"] == 24 and point["failed"] == 6
    assert point["statuses"] == {"200": 18, "503": 6}
    assert point["p50_ms"] <= point["p90_ms"] <= point["p99_ms"]
    assert point["throughput"] == pytest.approx(statistics.median(r["throughput"] for r in reps))
    assert _Stub.count == 24  # the limit: not one request more


def test_run_load_counts_a_200_without_detections_as_failed(stub_url, tmp_path, monkeypatch):
    monkeypatch.setattr(_Stub, "body", b'{"image": {"width": 1, "height": 1}}')
    r = bench.run_load(_clients(stub_url, tmp_path), "x", [b"a"], concurrency=2, total=8)
    assert r["ok"] == 0 and r["failed"] == 8 and r["statuses"] == {"503": 2, "wrong answer": 6}


def test_run_load_counts_connection_errors_as_failures(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    r = bench.run_load(_clients(dead, tmp_path), "x", [b"a"], concurrency=2, total=4)
    assert r["ok"] == 0 and r["failed"] == 4 and r["statuses"] == {"ConnectionError": 4}
    assert math.isnan(bench.aggregate([r])["p50_ms"])


def test_percentile_matches_linear_interpolation():
    assert bench.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert bench.percentile([5.0], 99) == 5.0
    assert bench.percentile(list(map(float, range(101))), 90) == 90.0


def _fake_results(device="cpu") -> dict:
    def timing(rate):
        return [bench.summarize(b, [b / (rate * b**0.5)]) for b in (1, 8, 32)]

    points = [
        {"concurrency": c, "throughput": 10.0 * c**0.5, "p50_ms": 50.0 * c, "p90_ms": 70.0 * c, "p99_ms": 90.0 * c,
         "failed": 0, "requests": 16, "client_cpu_pct_of_core": 5.0}
        for c in (1, 4)
    ]  # fmt: skip
    post = [
        {"batch": b, "ours_ms": 1.0 * b, "effdet_ms": 12.0 * b, "speedup": 12.0, "identical": True,
         "served_threshold": 0.05, "ours_served_ms": 0.5 * b, "speedup_served": 24.0, "served_identical_rows": 10,
         "compared_rows": 100 * b, "rows": 100 * b, "max_score_diff": 0.0, "max_box_diff_px": 0.0}
        for b in (1, 8, 32)
    ]  # fmt: skip
    meta = {
        "stamp": "x", "device": device, "device_name": "test", "precision": "fp32", "channels_last": False,
        "threads": 1, "cpu_count": 2, "loadavg_start": None, "loadavg_end": None, "images": 2,
        "image_side": 160, "repeats": 1, "export_dir": "e",
        "model": {"name": "m", "backbone": "b", "image_size": [128, 128], "num_classes": 2, "origin": "test"},
    }  # fmt: skip
    served = [
        {"batch_size": 4, "max_batch_delay": 10, "workers": 1, "model": "m", "points": points,
         "reported": {"batchSize": 4, "maxBatchDelay": 10, "workers": 1}}
    ]  # fmt: skip
    return {"meta": meta, "model": timing(40.0), "effdet": timing(10.0), "post": post,
            "handler": timing(20.0), "served": served}  # fmt: skip


def test_ratios_targets_report_and_plot(tmp_path):
    results = _fake_results()
    r = results["ratios"] = bench.ratios(results)
    ceiling = max(x["images_per_s"] for x in results["model"])
    handler = max(x["images_per_s"] for x in results["handler"])
    assert r["served_over_ceiling"] == pytest.approx(20.0 / ceiling)
    assert r["handler_over_ceiling"] == pytest.approx(handler / ceiling)
    assert r["served_over_handler"] == pytest.approx(20.0 / handler)
    assert r["post_speedup"] == 12.0 and r["post_speedup_batch"] == 32 and r["post_speedup_served"] == 24.0
    assert [t["met"] for t in r["targets"]] == [True, 20.0 / handler >= 0.8, True]
    assert r["served_best_p99_over_p50"] == pytest.approx(90.0 / 50.0 * 4 / 4)  # at the best point (c=4)
    assert r["served_over_limit"] == pytest.approx(20.0 / ceiling)  # no null-handler point: the ceiling
    text = bench.report(results)
    # every section present, numbered in the order of the run's stages
    numbered = ("1. model only", "2. effdet", "3. post-processing", "4. handler", "5. served over HTTP")
    assert all(title in text for title in numbered), text
    lines = bench.ratio_lines(r).splitlines()
    assert [ln.split()[0] for ln in lines[1:5]] == ["served", "handler", "served", "ours"]
    png = bench.plot(results, tmp_path / "p.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    results["served"][0]["points"][1]["failed"] = 1  # a point with failures is no one's best
    assert bench.ratios(results)["served_best_images_per_s"] == 10.0


def test_formats_side_by_side_ratios_and_report(tmp_path):
    """A second format's figures sit beside TorchScript's; the headline ratios stay TorchScript's."""
    results = _fake_results()
    aoti_model = [dict(r, images_per_s=2 * r["images_per_s"]) for r in results["model"]]
    aoti_points = [dict(p, throughput=3 * p["throughput"]) for p in results["served"][0]["points"]]
    results["served"][0]["format"] = "torchscript"
    results["served"].append(
        {**results["served"][0], "format": "aoti", "model": "m_aoti", "points": aoti_points}
    )
    info = {"mb": 1.0, "load_s": 0.5, "compile_s": None}
    results["formats"] = {
        "torchscript": dict(info),
        "aoti": {**info, "compile_s": 200.0, "model": aoti_model},
    }
    r = results["ratios"] = bench.ratios(results)
    assert r["served_best_images_per_s"] == 20.0  # TorchScript's, not the faster format's
    ceiling = max(x["images_per_s"] for x in results["model"])
    f = r["formats"]
    assert (
        f["torchscript"]["ceiling_over_torchscript"] == 1.0
        and f["torchscript"]["served_best_images_per_s"] == 20.0
    )
    assert f["aoti"]["ceiling_images_per_s"] == pytest.approx(2 * ceiling)
    assert f["aoti"]["ceiling_over_torchscript"] == pytest.approx(2.0)
    assert f["aoti"]["served_best_over_torchscript"] == pytest.approx(3.0)
    assert f["aoti"]["served_over_ceiling"] == pytest.approx(60.0 / (2 * ceiling))
    assert (
        f["aoti"]["handler_best_images_per_s"] is None and f["aoti"]["handler_best_over_torchscript"] is None
    )
    text = bench.report(results)
    assert "network formats side by side" in text and "6. served over HTTP (aoti)" in text  # 5: the formats
    assert any(
        ln.split()[:3] == ["aoti", "/", "torchscript"] and "served 3.00x" in ln
        for ln in bench.ratio_lines(r).splitlines()
    )
    assert bench.plot(results, tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_formats_argument_always_keeps_torchscript_and_refuses_unknown_ones():
    assert bench.parse_args([]).formats == ("torchscript",)
    assert bench.parse_args(["--formats", "aoti"]).formats == ("torchscript", "aoti")
    assert bench.parse_args(["--formats", "onnx,aoti,torchscript"]).formats == ("torchscript", "aoti", "onnx")
    with pytest.raises(SystemExit):
        bench.parse_args(["--formats", "tensorrt"])


def _target(r: dict, prefix: str) -> dict:
    (t,) = [t for t in r["targets"] if t["target"].startswith(prefix)]
    return t


def test_gpu_target_only_counts_an_fp16_channels_last_ceiling():
    results = _fake_results(device="cuda:0")
    assert not _target(bench.ratios(results), "GPU served >= 0.8 x the fp16")["met"]
    results["meta"].update(precision="fp16", channels_last=True)
    results["served"][0]["points"][1]["throughput"] = 1e6
    assert _target(bench.ratios(results), "GPU served >= 0.8 x the fp16")["met"]


def test_null_handler_point_sets_the_limit_and_fp16_agreement_is_a_target():
    results = _fake_results(device="cuda:0")
    ceiling = max(x["images_per_s"] for x in results["model"])
    null = {
        **results["served"][0],
        "kind": "null",
        "points": [dict(p) for p in results["served"][0]["points"]],
    }
    for p in null["points"]:
        p["throughput"] = 25.0  # a frontend slower than the ceiling: it is the limit
    results["null_handler"] = [null]
    results["fp16"] = {"matched": 99, "fp32_detections": 100, "agreement": 0.99, "met": True,
                       "min_score": 0.3, "min_iou": 0.9}  # fmt: skip
    r = bench.ratios(results)
    assert r["null_handler_best_images_per_s"] == 25.0 and 25.0 < ceiling
    assert r["served_over_limit"] == pytest.approx(20.0 / 25.0)
    assert _target(r, "GPU served >= 0.8 x min")["met"] is True
    assert _target(r, ">= 99 %")["met"] is True
    text = bench.report(results)
    assert ". null handler (constant answer" in text and "99/100" in text


def test_arguments_quick_defaults_and_refusals():
    a = bench.parse_args(["--quick"])
    assert a.batches == bench.QUICK["batches"] and a.repeats == bench.QUICK["repeats"]
    assert a.stages == bench.DEFAULT_STAGES and a.images >= max(a.batches)
    assert bench.parse_args(["--stages", "all"]).stages == bench.STAGES
    a = bench.parse_args(["--configs", "1:0:1,8:20:2", "--concurrency", "1,16", "--stages", "post"])
    assert a.configs == ((1, 0, 1), (8, 20, 2)) and a.concurrency == (1, 16) and a.stages == ("post",)
    assert bench.parse_args([]).batches == (1, 8, 32)
    with pytest.raises(SystemExit):
        bench.parse_args(["--precision", "fp16"])  # fp16 is a CUDA path
    with pytest.raises(SystemExit):
        bench.parse_args(["--stages", "model,nope"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            bench.parse_args(["--device", "cuda"])


def test_main_writes_table_json_and_plot_with_ratios_last(tiny_export, tmp_path, capsys):
    threads = torch.get_num_threads()
    results = bench.main(
        ["--export", str(tiny_export), "--stages", "model,post", "--batches", "1,2",
         "--repeats", "1", "--warmup", "1", "--images", "2", "--image-side", "160", "--out", str(tmp_path),
         "--no-progress", "--threads", str(threads)]
    )  # fmt: skip
    assert torch.get_num_threads() == threads
    written = json.loads((tmp_path / "latest.json").read_text())
    assert written["meta"]["model"]["origin"] == "given" and written["meta"]["export_dir"] == str(tiny_export)
    assert set(written) == {"meta", "model", "post", "ratios"}  # only the stages asked for
    assert written["ratios"] == json.loads(json.dumps(results["ratios"]))
    assert (tmp_path / "latest.png").read_bytes()[:4] == b"\x89PNG"
    assert len(list(tmp_path.glob("bench-*.json"))) == len(list(tmp_path.glob("bench-*.png"))) == 1
    out = capsys.readouterr().out.rstrip().splitlines()
    tail = out[out.index("ratios") :]
    assert tail[1].split()[:3] == ["served", "/", "ceiling"] and "n/a" in tail[1]
    assert tail[2].split()[:3] == ["handler", "/", "ceiling"] and "n/a" in tail[2]
    assert tail[4].split()[:3] == ["ours", "/", "effdet"] and tail[4].split()[3].endswith("x")
    assert tail[6].split()[:3] == ["served", "/", "limit"] and "n/a" in tail[6]
    assert "1. model only" in "\n".join(out) and "2. post-processing" in "\n".join(out)  # numbered as run


# -- the served stage on a real TorchServe ------------------------------------------------------------


@pytest.mark.soak
@pytest.mark.server
def test_served_stage_on_a_real_torchserve(workload, tmp_path):
    entries = bench.bench_served(
        workload, "tinybench", [(2, 5, 1)], [1, 2], 4, 1, 1, tmp_path / "s", bench.Progress(enabled=False),
        null_configs=[(2, 5, 1)],
    )  # fmt: skip
    entry, null = entries
    assert null["kind"] == "null" and [p["failed"] for p in null["points"]] == [0, 0]
    assert entry["reported"] == {"batchSize": 2, "maxBatchDelay": 5, "workers": 1}
    assert [p["concurrency"] for p in entry["points"]] == [1, 2]
    for p in entry["points"]:
        assert p["failed"] == 0 and p["requests"] == 4 and p["statuses"] == {"200": 4}
        assert _finite_positive(p["throughput"]) and p["p50_ms"] <= p["p99_ms"]
    from scripts.serve import pid_file

    pid = bench._server_pid(SimpleNamespace(pid_file=pid_file(tmp_path / "s" / "ts")))
    assert pid is None or not bench._alive(pid)  # TorchServe was stopped


def test_a_failed_stage_fails_the_run_but_keeps_the_other_figures(tiny_export, tmp_path, monkeypatch):
    from scripts.bench import cli

    def refuse(*args, **kwargs):
        raise bench.BenchError("post-processing parity compared no rows (test)")

    monkeypatch.setattr(cli, "bench_post", refuse)
    with pytest.raises(SystemExit, match="bench FAILED: post: .*compared no rows"):
        bench.main(
            ["--export", str(tiny_export), "--stages", "model,post", "--batches", "1", "--repeats", "1",
             "--warmup", "0", "--images", "1", "--image-side", "160", "--out", str(tmp_path), "--no-progress",
             "--threads", "1"]
        )  # fmt: skip
    written = json.loads((tmp_path / "latest.json").read_text())
    assert written["failures"] == {"post": "post-processing parity compared no rows (test)"}
    assert "post" not in written and [r["batch"] for r in written["model"]] == [1]


# -- the photos and accuracy stages -------------------------------------------------------------------


def test_image_sizes_argument():
    from scripts.bench.photos import DEFAULT_SIZES, parse_sizes

    assert parse_sizes("640x480, 4032X3024") == ((640, 480), (4032, 3024))
    assert bench.parse_args([]).image_sizes == DEFAULT_SIZES
    assert bench.parse_args(["--image-sizes", "320x240"]).image_sizes == ((320, 240),)
    for bad in ("640", "640x", "0x10", "axb", ""):
        with pytest.raises(ValueError):
            parse_sizes(bad)
    with pytest.raises(SystemExit):
        bench.parse_args(["--image-sizes", "640by480"])


def test_photos_stage_times_the_handler_and_its_steps_per_size(workload):
    """Photos of each size through the real handler; each step's share; the first size is 1x."""
    from scripts.bench.photos import STEPS, bench_photos, make_photos

    sizes = ((160, 120), (401, 299))
    photos = {s: make_photos(2, s, seed=2) for s in sizes}
    for s, datas in photos.items():
        assert all(Image.open(io.BytesIO(d)).size == s for d in datas) and len(set(datas)) == 2
    rows = bench_photos(workload, photos, (1, 2), 2, 0, bench.Progress(enabled=False), threads=1)
    assert [(tuple(r["size"]), r["batch"]) for r in rows] == [(s, b) for b in (1, 2) for s in sizes]
    for r in rows:
        assert len(r["seconds"]) == 2 and _finite_positive(r["images_per_s"])
        assert set(r["steps_ms"]) == set(STEPS) and all(v > 0 for v in r["steps_ms"].values())
        assert sum(r["shares"].values()) == pytest.approx(1.0)
        assert r["decode_letterbox_share"] == pytest.approx(r["shares"]["decode"] + r["shares"]["letterbox"])
    assert rows[0]["over_first"] == 1.0 and rows[2]["over_first"] == 1.0


def test_accuracy_stage_scores_photos_against_originals(workload, tmp_path):
    """Held-out scenes upscaled with their boxes: three mAPs, and the photo's detections matched
    against its full decode's (the same image through the same network: all of them here)."""
    from scripts.bench.photos import bench_accuracy, heldout

    val = heldout(None, tmp_path, seed=0)
    assert heldout(None, tmp_path, seed=0) == val  # written once
    records = json.loads(val.read_text())
    assert len(records["images"]) == 60
    small = tmp_path / "small"
    small.mkdir()
    records["images"] = records["images"][:3]
    records["annotations"] = [a for a in records["annotations"] if a["image_id"] <= 3]
    (small / "val.json").write_text(json.dumps(records))
    (small / "images").symlink_to(val.parent / "images")
    acc = bench_accuracy(workload, small / "val.json", bench.Progress(enabled=False), longer=1200)
    assert acc["images"] == 3 and acc["photo_longer_side"] == 1200
    assert set(acc["map50"]) == {"original", "photo", "full_decode"}
    assert all(0.0 <= v <= 1.0 for v in [*acc["map50"].values(), *acc["map"].values()])
    assert acc["delta_map50"] == pytest.approx(acc["map50"]["photo"] - acc["map50"]["original"])
    assert acc["decoded_pixels_share"] < 0.5  # 1200 px photos into 128x128: decoded at 1/2 or less
    assert acc["full_decode_detections"] > 0 and acc["matched"] <= acc["full_decode_detections"]


def test_photo_targets_and_report():
    results = _fake_results()
    row = {"batch": 1, "median_s": 0.1, "megapixels": 0.3, "jpeg_kb": 60.0, "images_per_s": 10.0,
           "ms_per_image": 100.0, "over_first": 1.0, "decode_letterbox_share": 0.1,
           "shares": {"decode": 0.05, "letterbox": 0.05, "network": 0.8, "post": 0.05, "answer": 0.05}}  # fmt: skip
    results["photos"] = {
        "handler": [{**row, "size": [640, 480]}, {**row, "size": [4032, 3024], "median_s": 0.13,
                    "over_first": 1.3, "decode_letterbox_share": 0.35}],  # fmt: skip
        "served": {"batch_size": 4, "max_batch_delay": 10, "workers": 2, "concurrency": 8, "points": [
            {"size": [640, 480], "throughput": 40.0, "over_first": 1.0, "p50_ms": 1.0, "p99_ms": 2.0, "failed": 0,
             "requests": 8},
            {"size": [4032, 3024], "throughput": 20.0, "over_first": 0.5, "p50_ms": 1.0, "p99_ms": 2.0, "failed": 0,
             "requests": 8}],
            "memory": {"jpeg_40mp": {"bytes": 8e6, "peak_rise_mib": 20.0, "rss_before_mib": 900.0},
                       "png_40mp": {"bytes": 12e6, "peak_rise_mib": 400.0, "rss_before_mib": 900.0}}},
    }  # fmt: skip
    results["accuracy"] = {"images": 60, "photo_longer_side": 4032, "decoded_pixels_share": 0.06,
                           "map50": {"original": 0.99, "photo": 0.985, "full_decode": 0.986},
                           "map": {"original": 0.75, "photo": 0.74, "full_decode": 0.745}, "delta_map50": -0.005,
                           "min_score": 0.3, "min_iou": 0.9, "full_decode_detections": 100, "matched": 98,
                           "agreement": 0.98}  # fmt: skip
    targets = bench.ratios(results)["targets"]

    def met(part: str) -> bool:
        [t] = [t for t in targets if part in t["target"]]
        return t["met"]

    assert met("a 4032x3024 JPEG") is True  # 1.3x
    assert met("decode + letterbox") is False  # 35 %
    assert met("served img/s for 12 MP photos") is False  # 0.5x
    assert met("one jpeg 40mp") is True and met("one png 40mp") is False
    assert met("mAP@.5 of held-out scenes") is True
    assert met("full decode's detections") is False  # 98 %
    text = bench.report(results)
    numbered = [m[1] for m in re.finditer(r"^(\d+)\. ", text, re.M)]
    assert numbered == [str(n) for n in range(1, len(numbered) + 1)], text  # consecutive from 1
    assert "photos: the handler in-process" in text and "accuracy at phone size" in text
    assert "png_40mp (12.0 MB) +400 MiB" in text


@pytest.mark.soak
@pytest.mark.server
def test_photos_served_per_size_on_a_real_torchserve(workload, tmp_path):
    from scripts.bench.photos import bench_served_photos, make_photos

    photos = {s: make_photos(2, s, seed=1) for s in ((160, 120), (640, 480))}
    out = bench_served_photos(workload, "tinyphotos", (2, 5, 1), photos, 2, 4, 1, 1, tmp_path / "s",
                              bench.Progress(enabled=False), memory=True)  # fmt: skip
    assert [p["size"] for p in out["points"]] == [[160, 120], [640, 480]]
    for p in out["points"]:
        assert p["failed"] == 0 and p["statuses"] == {"200": 4} and _finite_positive(p["throughput"])
    assert out["points"][0]["over_first"] == 1.0
    assert set(out["memory"]) == {"jpeg_40mp", "jpeg_40mp_progressive", "png_40mp"}
    assert all(m["peak_rise_mib"] < 1000 for m in out["memory"].values())


# -- the network formats side by side ----------------------------------------------------------------
@pytest.mark.server
def test_bench_runs_the_three_formats_side_by_side(trained_run, exported, aoti_run, onnx_run, tmp_path):
    """``python -m scripts.bench --formats torchscript,aoti,onnx`` on a run holding the three exports:
    the files beside the export are reused (made from the same checkpoint; nothing compiled again),
    each format is timed alone and in the handler, all three are served at the same setting on one
    TorchServe, and every request is answered."""
    from handler.network import NETWORK_FORMATS

    run = tmp_path / "run"
    shutil.copytree(exported, run / "export")
    shutil.copytree(aoti_run[0], run / "export_aoti")
    shutil.copytree(onnx_run[0], run / "export_onnx")
    results = bench.main(
        ["--export", str(run / "export"), "--formats", "torchscript,aoti,onnx", "--stages", "model,handler,served",
         "--batches", "1,2", "--repeats", "1", "--warmup", "1", "--images", "2", "--image-side", "160",
         "--configs", "2:0:1", "--concurrency", "2", "--requests", "4", "--served-repeats", "1",
         "--out", str(tmp_path / "bench"), "--no-progress", "--threads", "1"]
    )  # fmt: skip
    assert not list(run.glob("export_aoti_*")) and not list(run.glob("export_onnx_*"))  # reused
    for fmt, out in (("torchscript", "export"), ("aoti", "export_aoti"), ("onnx", "export_onnx")):
        assert results["formats"][fmt]["file"] == str(run / out / NETWORK_FORMATS[fmt].file)
    assert [r["batch"] for r in results["model"]] == [1, 2]
    for fmt in ("aoti", "onnx"):
        assert [r["batch"] for r in results["formats"][fmt]["model"]] == [1, 2], fmt
    served = results["served"]
    assert [(e["format"], e["model"]) for e in served] == [
        ("torchscript", "effdet_demo_b2_d0_w1"),
        ("aoti", "effdet_demo_aoti_b2_d0_w1"),
        ("onnx", "effdet_demo_onnx_b2_d0_w1"),
    ]
    for e in served:
        # "no delay" is served as 1 ms: an archive's 0 would be read as unset, i.e. TorchServe's 100 ms
        assert (e["reported"]["batchSize"], e["reported"]["maxBatchDelay"]) == (2, 1)
        assert [(p["failed"], p["statuses"]) for p in e["points"]] == [(0, {"200": 4})]
    f = results["ratios"]["formats"]
    for fmt in ("aoti", "onnx"):
        assert f[fmt]["ceiling_over_torchscript"] > 0 and f[fmt]["handler_best_over_torchscript"] > 0, fmt
        assert f[fmt]["served_best_over_torchscript"] > 0, fmt
    assert f["aoti"]["compile_s"] > 0 and f["torchscript"]["compile_s"] is None
