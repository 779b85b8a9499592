"""HTTP client for the served detector: predictions and the management API, token from key_file.json.

    python -m scripts.client predict a.jpg b.png --model effdet_demo --score-threshold 0.3 --draw out.png
    python -m scripts.client register effdet_demo_v2.mar --batch-size 4 --max-batch-delay 20 --initial-workers 1
    python -m scripts.client scale effdet_demo --min-worker 2 --max-worker 2
    python -m scripts.client describe effdet_demo
    python -m scripts.client set-default effdet_demo 2.0
    python -m scripts.client unregister effdet_demo 2.0

Tokens are read from the key file and sent as ``Authorization: Bearer``; they are never printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import requests

from scripts.paths import ROOT

DEFAULT_KEY_FILE = ROOT / "runs" / "serve" / "key_file.json"


def find_key_file(explicit: str | Path | None = None) -> Path:
    """--key-file, $EFFDET_SERVE_KEY_FILE, runs/serve/key_file.json, ./key_file.json: the first that exists."""
    for candidate in (
        explicit,
        os.environ.get("EFFDET_SERVE_KEY_FILE"),
        DEFAULT_KEY_FILE,
        Path("key_file.json"),
    ):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise FileNotFoundError("no key_file.json found: start the server (make serve) or pass --key-file")


class Client:
    """Inference + management calls against one TorchServe."""

    def __init__(
        self,
        inference_url: str = "http://127.0.0.1:8080",
        management_url: str = "http://127.0.0.1:8081",
        key_file: str | Path | None = None,
        timeout: float = 120,
    ):
        self.inference_url = inference_url.rstrip("/")
        self.management_url = management_url.rstrip("/")
        keys = json.loads(find_key_file(key_file).read_text())
        self._inference = {"Authorization": f"Bearer {keys['inference']['key']}"}
        self._management = {"Authorization": f"Bearer {keys['management']['key']}"}
        self.timeout = timeout
        self.session = requests.Session()

    # -- inference ---------------------------------------------------------------------------------
    def predict(self, model: str, image: bytes, version: str | None = None, **params) -> requests.Response:
        """POST one image: raw bytes, or multipart (field ``data`` + one field per parameter) with parameters.

        TorchServe 0.12 does not hand the query string of ``/predictions`` to the handler (only
        ``/invocations`` gets it), so parameters travel as form fields next to the image.
        """
        path = f"/predictions/{model}" + (f"/{version}" if version else "")
        fields = {k: str(v) for k, v in params.items() if v is not None}
        if fields:
            return self.session.post(
                self.inference_url + path,
                files={"data": ("image", image, "application/octet-stream")},
                data=fields,
                headers=self._inference,
                timeout=self.timeout,
            )
        return self.session.post(
            self.inference_url + path, data=image, headers=self._inference, timeout=self.timeout
        )

    def ping(self) -> requests.Response:
        return self.session.get(f"{self.inference_url}/ping", headers=self._inference, timeout=self.timeout)

    # -- management --------------------------------------------------------------------------------
    def _manage(self, method: str, path: str, **params) -> requests.Response:
        query = {k: v for k, v in params.items() if v is not None}
        return self.session.request(
            method, self.management_url + path, params=query, headers=self._management, timeout=self.timeout
        )

    def register(
        self,
        url: str,
        model_name: str | None = None,
        batch_size: int | None = None,
        max_batch_delay: int | None = None,
        initial_workers: int = 1,
    ) -> requests.Response:
        """Register an archive from the model store (a file name; remote URLs are refused by config)."""
        return self._manage(
            "POST",
            "/models",
            url=url,
            model_name=model_name,
            batch_size=batch_size,
            max_batch_delay=max_batch_delay,
            initial_workers=initial_workers,
            synchronous="true",
        )

    def scale(
        self, model: str, min_worker: int, max_worker: int | None = None, version: str | None = None
    ) -> requests.Response:
        """Set the worker count and wait for it (synchronous)."""
        path = f"/models/{model}" + (f"/{version}" if version else "")
        return self._manage(
            "PUT", path, min_worker=min_worker, max_worker=max_worker or min_worker, synchronous="true"
        )

    def describe(self, model: str, version: str | None = None) -> list[dict]:
        path = f"/models/{model}" + (f"/{version}" if version else "/all")
        r = self._manage("GET", path)
        r.raise_for_status()
        return r.json()

    def set_default(self, model: str, version: str) -> requests.Response:
        return self._manage("PUT", f"/models/{model}/{version}/set-default")

    def unregister(self, model: str, version: str | None = None) -> requests.Response:
        path = f"/models/{model}" + (f"/{version}" if version else "")
        return self._manage("DELETE", path)


def draw(image_path: Path, response: dict, out: Path) -> None:
    """Render the boxes and labels of one response on its image."""
    from PIL import Image, ImageDraw, ImageOps

    img = ImageOps.exif_transpose(Image.open(image_path)).convert("RGB")
    pen = ImageDraw.Draw(img)
    for det in response.get("detections", []):
        x1, y1, x2, y2 = det["box"]
        pen.rectangle([x1, y1, x2, y2], outline=(255, 40, 40), width=3)
        text = f"{det['label']} {det['score']:.2f}"
        pen.rectangle([x1, max(0, y1 - 12), x1 + 6 * len(text) + 4, y1], fill=(255, 40, 40))
        pen.text((x1 + 2, max(0, y1 - 12)), text, fill=(255, 255, 255))
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.client", description=__doc__)
    p.add_argument("--inference-url", default="http://127.0.0.1:8080")
    p.add_argument("--management-url", default="http://127.0.0.1:8081")
    p.add_argument("--key-file")
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
    rg.add_argument("--batch-size", type=int)
    rg.add_argument("--max-batch-delay", type=int)
    rg.add_argument("--initial-workers", type=int, default=1)
    sc = sub.add_parser("scale", help="set the number of workers (synchronous)")
    sc.add_argument("model")
    sc.add_argument("--min-worker", type=int, required=True)
    sc.add_argument("--max-worker", type=int)
    sc.add_argument("--version")
    ds = sub.add_parser("describe")
    ds.add_argument("model")
    ds.add_argument("--version")
    sd = sub.add_parser("set-default")
    sd.add_argument("model")
    sd.add_argument("version")
    ur = sub.add_parser("unregister")
    ur.add_argument("model")
    ur.add_argument("version", nargs="?")
    a = p.parse_args(argv)
    client = Client(a.inference_url, a.management_url, a.key_file)

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
    if a.cmd == "register":
        r = client.register(a.url, a.model_name, a.batch_size, a.max_batch_delay, a.initial_workers)
    elif a.cmd == "scale":
        r = client.scale(a.model, a.min_worker, a.max_worker, a.version)
    elif a.cmd == "describe":
        print(json.dumps(client.describe(a.model, a.version), indent=2))
        return 0
    elif a.cmd == "set-default":
        r = client.set_default(a.model, a.version)
    else:
        r = client.unregister(a.model, a.version)
    print(r.text.strip())
    return 0 if r.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
