"""Export a training run: ``python -m export runs/NAME/best.ckpt [--format script|aoti]``.

``--format script`` (default) writes ``model.pt``, TorchScript, to ``<run>/export``;
``--format aoti`` writes ``model.pt2``, a ``torch.export`` program compiled by AOTInductor for
this machine's device and torch, to ``<run>/export_aoti``. Beside it: ``model.json`` (carried
over from training plus export provenance: format, torch version, parity figures, sha256) and
``index_to_name.json`` (TorchServe's convention). Fails, writing no network file, unless the
reloaded network matches eager effdet within 1e-4 on every head output (fp16 packages: see
``export/aoti.py``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from export.core import (
    PARITY_TOLERANCE,
    ExportError,
    build_eager,
    check_parity,
    load_weights,
    sha256,
    timed_load,
    to_torchscript,
)
from handler.detector import load_card
from handler.network import AotiNetwork, torchscript_on_purpose
from train.config import write_json

DEFAULT_OUT = {"script": "export", "aoti": "export_aoti"}


def export(
    checkpoint: str | Path,
    out: str | Path,
    card_dir: str | Path | None = None,
    method: str = "script",
    freeze: bool = False,
    parity_sizes: list[tuple[int, int]] | None = None,
    fmt: str = "script",
    device: str | None = None,
    precision: str = "fp32",
) -> dict:
    """Checkpoint + model.json -> out/{model.pt or model.pt2, model.json, index_to_name.json}; returns the card."""
    if fmt not in DEFAULT_OUT:
        raise ValueError(f"format must be 'script' or 'aoti', got {fmt!r}")
    checkpoint, out = Path(checkpoint), Path(out)
    card = load_card(card_dir or checkpoint.parent)
    weights = load_weights(checkpoint, card)
    if fmt == "aoti":
        info = _export_aoti(card, weights, out, device, precision)
    else:
        if device not in (None, "cpu") or precision != "fp32":
            raise ValueError("TorchScript export runs on CPU in fp32 (the handler casts to fp16 on CUDA)")
        info = _export_script(card, weights, out, method, freeze, parity_sizes)
    path = out / info["file"]
    card = {
        **card,
        "export": {
            **info,
            "torch": torch.__version__,
            "checkpoint": str(checkpoint),
            "bytes": path.stat().st_size,
            "sha256": sha256(path),
        },
    }
    write_json(out / "model.json", card)
    write_json(out / "index_to_name.json", {str(i + 1): n for i, n in enumerate(card["classes"])})
    return card


def _export_script(card: dict, weights: dict, out: Path, method: str, freeze: bool, parity_sizes) -> dict:
    size = tuple(card["effdet_config"]["image_size"])
    eager = build_eager(card, weights)
    ts, messages = to_torchscript(build_eager(card, weights), method, size)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".script-", dir=out))
    try:
        staged = staging / "model.pt"
        with torchscript_on_purpose():
            if freeze:
                ts = torch.jit.freeze(ts)
            torch.jit.save(ts, str(staged))
        # effdet builds its BiFPN resampling for the config image size: the network takes that size only.
        parity = check_parity(eager, staged, parity_sizes or [size])
        staged.replace(out / "model.pt")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {
        "format": "script",
        "method": method,
        "frozen": freeze,
        "device": "cpu",
        "precision": "fp32",
        "parity": _parity(parity, PARITY_TOLERANCE),
        "warnings": messages,
        "file": "model.pt",
        "load_seconds": round(timed_load(out / "model.pt"), 3),
    }


def _export_aoti(card: dict, weights: dict, out: Path, device: str | None, precision: str) -> dict:
    from export.aoti import MAX_BATCH, to_aoti, tolerance  # imports torch._inductor: only when asked

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if precision not in ("fp32", "fp16"):
        raise ValueError(f"precision must be 'fp32' or 'fp16', got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("an fp16 package needs --device cuda")
    dtype = torch.float16 if precision == "fp16" else torch.float32
    size = tuple(card["effdet_config"]["image_size"])
    cfg = card["effdet_config"]
    levels = int(cfg["max_level"]) - int(cfg["min_level"]) + 1
    path, seconds, parity = to_aoti(
        build_eager(card, weights), build_eager(card, weights), out, size, device, dtype, levels
    )
    return {
        "format": "aoti",
        "method": "torch.export + AOTInductor",
        "device": device.type,
        "precision": precision,
        "max_batch": MAX_BATCH,
        "compile_seconds": round(seconds, 1),
        "parity": _parity(parity, tolerance(dtype, parity.reference_scale)),
        "warnings": [],
        "file": path.name,
        "load_seconds": round(_timed_aoti_load(path, device, dtype), 3),
    }


def _parity(parity, limit: float) -> dict:
    return {
        "max_abs_diff": parity.max_abs_diff,
        "tolerance": limit,
        "inputs": parity.inputs,
        "outputs_checked": parity.outputs_checked,
    }


def _timed_aoti_load(path: Path, device: torch.device, dtype: torch.dtype) -> float:
    start = time.perf_counter()
    AotiNetwork(path, device, dtype)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    p.add_argument("checkpoint", help="training checkpoint, e.g. runs/NAME/best.ckpt")
    p.add_argument("--card", help="directory holding the run's model.json (default: next to the checkpoint)")
    p.add_argument("--out", help="output directory (default: <run>/export, or <run>/export_aoti for aoti)")
    p.add_argument(
        "--format",
        choices=("script", "aoti"),
        default="script",
        help="script: TorchScript model.pt (default); aoti: torch.export + AOTInductor model.pt2",
    )
    p.add_argument("--method", choices=("script", "trace"), default="script", help="TorchScript only")
    p.add_argument("--freeze", action="store_true", help="torch.jit.freeze the scripted module")
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        help="aoti only: compile for this device (default: cuda if present)",
    )
    p.add_argument("--precision", choices=("fp32", "fp16"), default="fp32", help="aoti only; fp16 needs CUDA")
    a = p.parse_args(argv)
    out = Path(a.out) if a.out else Path(a.checkpoint).parent / DEFAULT_OUT[a.format]
    try:
        card = export(
            a.checkpoint,
            out,
            a.card,
            a.method,
            a.freeze,
            fmt=a.format,
            device=a.device,
            precision=a.precision,
        )
    except (ExportError, FileNotFoundError, ValueError) as e:
        print(f"export failed: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    e = card["export"]
    if e["format"] == "aoti":
        print(f"[export] torch.export + AOTInductor ({e['device']}, {e['precision']}): {out / e['file']}")
        print(
            f"[export] compiled in {e['compile_seconds']:.0f} s for torch {e['torch']}: serve with this torch"
        )
    else:
        print(f"[export] {a.method}{' + freeze' if a.freeze else ''}: {out / e['file']}")
    print(
        f"[export] parity vs eager effdet: max |diff| = {e['parity']['max_abs_diff']:.2e} "
        f"(tolerance {e['parity']['tolerance']:.0e}) over "
        f"{e['parity']['outputs_checked']} head outputs, inputs {e['parity']['inputs']}"
    )
    print(
        f"[export] size {e['bytes'] / 1e6:.1f} MB, load {e['load_seconds']:.2f} s, sha256 {e['sha256'][:16]}..."
    )
    for w in e["warnings"]:
        print(f"[export] warning from torch.jit.{a.method}: {w}")
    if e["format"] == "script" and a.method == "trace" and e["warnings"]:
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
