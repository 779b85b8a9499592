"""Benchmark: served throughput against the model-only ceiling and against effdet (``make bench``).

    python -m scripts.bench --name effdet_demo            # full run (about 10 minutes on 2 CPU cores)
    python -m scripts.bench --quick                       # tiny repeats, fewer settings: a smoke run
    python -m scripts.bench --device cuda --precision fp16 --channels-last --model seed
    python -m scripts.bench --stages post,fp16 --export runs/NAME/export    # any subset of the stages
    python -m scripts.bench --formats torchscript,aoti,onnx   # the three network formats side by side
    python -m scripts.bench --stages photos,photos_served,accuracy --image-sizes 640x480,4032x3024
    python -m scripts.bench --stages overload             # goodput under overload, with deadlines

One run, one model, one set of JPEG images; every figure is the median of repeats. Stages 1-6 run
by default; 7-9 when named in ``--stages`` (or ``--stages all``):

1. ``model``   the TorchScript network alone at batch 1/8/32: the ceiling;
2. ``effdet``  effdet's own ``DetBenchPredict`` in eager mode with the same weights (network +
               effdet's post-processing);
3. ``post``    post-processing alone on the same head outputs: ours (``handler.postprocess.detect``)
               against effdet's ``_post_process`` + ``_batch_detection``; the two outputs must agree
               (same detections, classes and order; scores to 1e-6, boxes to 1e-3 px) down to the
               first score two candidates share exactly (unstable sorts may order those either way),
               or the run fails;
4. ``handler`` the TorchServe handler in this process: JPEG bytes in, JSON text out;
   ``fp16``    on CUDA, the fp16 handler path against fp32 on the same model: >= 99 % of the fp32
               detections scoring >= 0.3 found again (same class, IoU >= 0.9); skipped on the CPU;
5. ``served``  a real TorchServe over HTTP: throughput and p50/p90/p99 latency at several client
               concurrencies for several batchSize/maxBatchDelay/workers settings, failed requests
               counted, with the CPU used by the load generator (and, with psutil, by TorchServe's
               frontend and workers) so that a saturated client shows;
6. ``null``    the same load against a handler that answers a constant (its own tiny .mar, built
               by the real archiver): what TorchServe's frontend and worker IPC pass at all.
               Served is reported against min(ceiling, null handler).
7. ``photos``  the handler in-process on JPEG photos of each ``--image-sizes`` size (default
               640x480, 1920x1080, 4032x3024), sizes taking turns, with the share of each of its
               steps (decode, letterbox, network, post-processing, answer);
   ``photos_served`` the same photos served over HTTP at one setting, and a served worker's peak
               RSS rise for one 40 MP JPEG, progressive JPEG and PNG;
8. ``accuracy`` the demo's held-out scenes upscaled to a phone's size (boxes scaled alike): mAP@.5
               against the originals' (within 0.01), and >= 99 % of a full decode's detections
               scoring >= 0.3 found by the reduced decode (same class, IoU >= 0.9).
9. ``overload`` the demo's archive (batchSize 4, one worker) on its own TorchServe: capacity with
               32 closed-loop clients, then 128 clients giving up after 2 s, with and without
               X-Request-Deadline, then capacity again; goodput (answers within the deadline per
               second) over capacity, statuses, answers the server never sent, worker restarts.

A parity check that compared no rows fails the run: a check is only as good as what it saw.
The JSON is written first (``runs/bench/bench-<stamp>.json``), then the table and ``.png``; the
ratios come last. Without ``--export`` the model is ``runs/NAME/export`` when it exists, else
``--model`` trained here on synthetic scenes for ``--train-steps`` (trained heads score as a
served model does; ``--weights random`` gives random heads instead), kept under ``runs/bench``.

Modules, runners apart from results: ``timing`` (repeats, syncs, percentiles), ``workload``
(model, its network formats and images), ``parity`` (the comparisons, shared with tests/test_postprocess.py),
``photos`` (photo sizes, the served worker's memory, accuracy at phone size),
``stages`` (in-process stages), ``load`` (the closed loop: ``scripts.load.Traffic`` with a limit), ``served`` (TorchServe and
the null handler), ``report`` (ratios, tables, plot: pure functions of the results), ``cli``;
``overload`` (deadlines under overload)."""

from scripts.bench.cli import DEFAULT_STAGES, FULL, QUICK, STAGES, main, network_info, parse_args, run
from scripts.bench.load import ProcessCPU, aggregate, run_load
from scripts.bench.parity import (
    BOX_ATOL,
    EFFDET_IOU,
    SCORE_ATOL,
    BenchError,
    compare_detections,
    effdet_postprocess,
    match_detections,
    ours_postprocess,
    tie_horizon,
)
from scripts.bench.report import format_ratios, plot, ratio_lines, ratios, report, table
from scripts.bench.served import _alive, _server_pid, archive_null, bench_served
from scripts.bench.stages import (
    bench_effdet,
    bench_fp16,
    bench_handler,
    bench_model,
    bench_models,
    bench_post,
    check_answers,
    make_handler,
)
from scripts.bench.timing import Progress, measure, measure_pair, measure_turns, percentile, summarize, sync
from scripts.bench.workload import (
    Workload,
    make_images,
    make_random_export,
    network_for,
    prepare,
    resolve_export,
    train_export,
)

__all__ = [
    "BOX_ATOL", "DEFAULT_STAGES", "EFFDET_IOU", "FULL", "QUICK", "SCORE_ATOL", "STAGES", "BenchError", "ProcessCPU", "Progress",
    "Workload", "_alive", "_server_pid", "aggregate", "run_load", "archive_null", "bench_effdet", "bench_fp16",
    "bench_handler", "bench_model", "bench_models", "bench_post", "bench_served", "check_answers", "compare_detections",
    "effdet_postprocess", "format_ratios", "main", "make_handler", "make_images", "make_random_export", "match_detections",
    "measure", "measure_pair", "measure_turns", "network_for", "network_info", "ours_postprocess", "parse_args", "percentile", "plot", "prepare",
    "ratio_lines", "ratios", "report", "resolve_export", "run", "summarize", "sync", "table", "tie_horizon",
    "train_export",
]  # fmt: skip
