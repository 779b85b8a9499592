"""The command line of the client: predictions, registration, lossless scaling, versions.

python -m scripts.client predict a.jpg b.png --model effdet_demo --score-threshold 0.3 --draw out.png
python -m scripts.client register effdet_demo_v2.mar --batch-size 4 --max-batch-delay 20 --initial-workers 1
python -m scripts.client scale effdet_demo --workers 2
python -m scripts.client describe effdet_demo
python -m scripts.client set-default effdet_demo 2.0
python -m scripts.client unregister effdet_demo 2.0

scale and register check the worker count against this machine's cores and memory (--force skips
that); unregister drains the version before TorchServe drops it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from scripts.client import Client
from scripts.client.capacity import MEMORY_SHARE, WORKERS_PER_CORE, WORKERS_PER_GPU
from scripts.client.draw import draw
from scripts.client.scale import ScaleError, scale, unregister
from scripts.paths import MODEL_STORE
from scripts.settings import MAX_BATCH_SIZE, MAX_WORKERS, InvalidArgument

FORCE_HELP = (
    f"start the workers even above this machine's cap ({WORKERS_PER_CORE} per CPU core, {WORKERS_PER_GPU} per "
    f"GPU) or {MEMORY_SHARE:.0%} of its available memory"
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.client", description=__doc__)
    p.add_argument("--inference-url", default="http://127.0.0.1:8080")
    p.add_argument("--management-url", default="http://127.0.0.1:8081")
    p.add_argument("--key-file")
    p.add_argument(
        "--timeout",
        type=float,
        default=20,
        help="seconds one prediction attempt waits (default 20), sent as its X-Request-Deadline",
    )
    p.add_argument(
        "--no-deadline",
        action="store_true",
        help="send no X-Request-Deadline (when this host's clock may disagree with the server's)",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("predict", help="send images, print JSON")
    pr.add_argument("images", nargs="+", type=Path)
    pr.add_argument("--model", default="effdet_demo")
    pr.add_argument("--version")
    pr.add_argument("--score-threshold", type=float)
    pr.add_argument("--iou-threshold", type=float)
    pr.add_argument("--max-detections", type=int)
    pr.add_argument("--draw", type=Path, help="save the (first) image with its boxes drawn here")
    rg = sub.add_parser("register", help="register an archive from the model store")
    rg.add_argument("url", help="archive file name in the model store, e.g. effdet_demo.mar")
    rg.add_argument("--model-name")
    rg.add_argument("--batch-size", type=int, help=f"1..{MAX_BATCH_SIZE}")
    rg.add_argument("--max-batch-delay", type=int, help="ms")
    rg.add_argument("--response-timeout", type=int, help="s")
    rg.add_argument("--initial-workers", type=int, default=1)
    rg.add_argument("--force", action="store_true", help=FORCE_HELP)
    sc = sub.add_parser(
        "scale", help="set the default version's worker count; scaling down drains first (no request lost)"
    )
    sc.add_argument("model")
    sc.add_argument("--workers", type=int, required=True, help=f"1..{MAX_WORKERS}")
    sc.add_argument("--model-store", default=str(MODEL_STORE), help="the server's model store")
    sc.add_argument("--drain-timeout", type=float, default=120, help="s to wait for the old version's queue")
    sc.add_argument("--start-at-once", type=int, help="scaling up: start this many new workers at a time")
    sc.add_argument("--force", action="store_true", help=FORCE_HELP)
    ds = sub.add_parser("describe")
    ds.add_argument("model")
    ds.add_argument("--version")
    sd = sub.add_parser("set-default")
    sd.add_argument("model")
    sd.add_argument("version")
    ur = sub.add_parser("unregister", help="drain a version (default: the default one), then unregister it")
    ur.add_argument("model")
    ur.add_argument("version", nargs="?")
    ur.add_argument("--drain-timeout", type=float, default=120, help="s to wait for the version's queue")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    client = Client(
        a.inference_url, a.management_url, a.key_file, timeout=a.timeout, deadlines=not a.no_deadline
    )

    try:
        if a.cmd == "predict":
            failed = 0
            for i, path in enumerate(a.images):
                r = client.predict(
                    a.model,
                    path.read_bytes(),
                    a.version,
                    score_threshold=a.score_threshold,
                    iou_threshold=a.iou_threshold,
                    max_detections=a.max_detections,
                )
                body = r.json()
                print(json.dumps({"file": str(path), "status": r.status_code, **body}, indent=2))
                failed += not r.ok
                if a.draw and i == 0 and r.ok:
                    draw(path, body, a.draw)
                    print(f"drew {len(body['detections'])} boxes on {a.draw}", file=sys.stderr)
            return 1 if failed else 0
        if a.cmd == "scale":
            result = scale(
                client, a.model, a.workers, a.model_store, a.drain_timeout, a.start_at_once, force=a.force
            )
            print(json.dumps(result.as_dict(), indent=2))
            return 0
        if a.cmd == "register":
            r = client.register(
                a.url,
                a.model_name,
                a.batch_size,
                a.max_batch_delay,
                a.initial_workers,
                a.response_timeout,
                force=a.force,
            )
        elif a.cmd == "describe":
            print(json.dumps(client.describe(a.model, a.version), indent=2))
            return 0
        elif a.cmd == "set-default":
            r = client.set_default(a.model, a.version)
        else:
            print(json.dumps(unregister(client, a.model, a.version, a.drain_timeout), indent=2))
            return 0
    except (InvalidArgument, ScaleError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(r.text.strip())
    return 0 if r.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
