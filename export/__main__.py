"""Export a training run: ``python -m export runs/NAME/best.ckpt [--format torchscript|aoti|onnx]``.

``--format torchscript`` (default) writes ``model.pt`` to ``<run>/export``; ``--format aoti``
writes ``model.pt2``, a ``torch.export`` program compiled by AOTInductor for this machine's
device and torch, to ``<run>/export_aoti``; ``--format onnx`` writes ``model.onnx`` for ONNX
Runtime to ``<run>/export_onnx``. Beside it: ``model.json`` (carried over from training plus
export provenance: format, torch version, parity figures, sha256) and ``index_to_name.json``
(TorchServe's convention). Fails, writing no network file, unless the reloaded network matches
eager effdet within 1e-4 on every head output (fp16 packages: see ``export/core.py``). The
formats are ``export/formats.py``; this module is the command line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from export.core import ExportError
from export.formats import EXPORT_FORMATS, export, export_format
from export.torchscript import METHODS
from handler.network import DEFAULT_FORMAT


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    p.add_argument("checkpoint", help="training checkpoint, e.g. runs/NAME/best.ckpt")
    p.add_argument("--card", help="directory holding the run's model.json (default: next to the checkpoint)")
    p.add_argument("--out", help="output directory (default: <run>/export, export_aoti or export_onnx)")
    p.add_argument(
        "--format",
        choices=tuple(EXPORT_FORMATS),
        default=DEFAULT_FORMAT,
        help="torchscript: model.pt (default); aoti: torch.export + AOTInductor model.pt2; "
        "onnx: model.onnx for ONNX Runtime (the fastest on a CPU)",
    )
    p.add_argument("--method", choices=METHODS, help="torchscript only: script (default) or trace")
    p.add_argument(
        "--freeze", action="store_true", default=None, help="torchscript only: torch.jit.freeze the file"
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        help="aoti only: compile for this device (default: cuda if present)",
    )
    p.add_argument("--precision", choices=("fp32", "fp16"), help="aoti only (default fp32); fp16 needs CUDA")
    a = p.parse_args(argv)
    out = Path(a.out) if a.out else Path(a.checkpoint).parent / export_format(a.format).out_dir
    options = {"method": a.method, "freeze": a.freeze, "device": a.device, "precision": a.precision}
    try:
        card = export(a.checkpoint, out, a.card, a.format, **options)
    except (ExportError, FileNotFoundError, ValueError) as e:
        print(f"export failed: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    e = card.export
    title = EXPORT_FORMATS[e["format"]].network.title
    if e["format"] == "torchscript":
        print(f"[export] {title}, {e['method']}{' + freeze' if e['frozen'] else ''}: {out / e['file']}")
    else:
        print(f"[export] {title}, {e['method']} ({e['device']}, {e['precision']}): {out / e['file']}")
        print(f"[export] exported in {e['compile_seconds']:.0f} s with torch {e['torch']}")
    print(
        f"[export] parity vs eager effdet: max |diff| = {e['parity']['max_abs_diff']:.2e} "
        f"(tolerance {e['parity']['tolerance']:.0e}) over "
        f"{e['parity']['outputs_checked']} head outputs, inputs {e['parity']['inputs']}"
    )
    print(
        f"[export] size {e['bytes'] / 1e6:.1f} MB, load {e['load_seconds']:.2f} s, sha256 {e['sha256'][:16]}..."
    )
    for w in e["warnings"]:
        print(f"[export] warning from torch.jit.{e['method']}: {w}")
    if e["format"] == "torchscript" and e["method"] == "trace" and e["warnings"]:
        print(
            "[export] trace records one execution at a fixed input size: the warnings above mark Python values "
            "frozen into the graph (feature sizes, anchor counts). Serve only at the model's image size."
        )
    print(
        json.dumps(
            {"model.json": str(out / "model.json"), "index_to_name.json": str(out / "index_to_name.json")}
        )
    )


if __name__ == "__main__":
    main()
