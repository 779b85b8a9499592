"""Export a training run to TorchScript: ``python -m export runs/NAME/best.ckpt --out runs/NAME/export``.

Writes ``model.pt`` (TorchScript network), ``model.json`` (carried over from training plus export
provenance: method, torch version, parity figures, sha256) and ``index_to_name.json``
(TorchServe's convention). Fails unless the reloaded TorchScript matches eager effdet within
1e-4 on every head output.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from export.core import (
    ExportError,
    build_eager,
    check_parity,
    load_weights,
    sha256,
    timed_load,
    to_torchscript,
)
from handler.detector import load_card
from train.config import write_json


def export(
    checkpoint: str | Path,
    out: str | Path,
    card_dir: str | Path | None = None,
    method: str = "script",
    freeze: bool = False,
    parity_sizes: list[tuple[int, int]] | None = None,
) -> dict:
    """Checkpoint + model.json -> out/{model.pt, model.json, index_to_name.json}; returns the new card."""
    checkpoint, out = Path(checkpoint), Path(out)
    card = load_card(card_dir or checkpoint.parent)
    size = tuple(card["effdet_config"]["image_size"])
    weights = load_weights(checkpoint, card)
    eager = build_eager(card, weights)
    ts, messages = to_torchscript(build_eager(card, weights), method, size)
    if freeze:
        ts = torch.jit.freeze(ts)
    out.mkdir(parents=True, exist_ok=True)
    pt = out / "model.pt"
    torch.jit.save(ts, str(pt))
    # effdet builds its BiFPN resampling for the config image size: the network takes that size only.
    sizes = parity_sizes or [size]
    parity = check_parity(eager, pt, sizes)
    card = {
        **card,
        "export": {
            "method": method,
            "frozen": freeze,
            "torch": torch.__version__,
            "checkpoint": str(checkpoint),
            "parity": {
                "max_abs_diff": parity.max_abs_diff,
                "tolerance": 1e-4,
                "inputs": parity.inputs,
                "outputs_checked": parity.outputs_checked,
            },
            "warnings": messages,
            "file": pt.name,
            "bytes": pt.stat().st_size,
            "sha256": sha256(pt),
            "load_seconds": round(timed_load(pt), 3),
        },
    }
    write_json(out / "model.json", card)
    write_json(out / "index_to_name.json", {str(i + 1): n for i, n in enumerate(card["classes"])})
    return card


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    p.add_argument("checkpoint", help="training checkpoint, e.g. runs/NAME/best.ckpt")
    p.add_argument("--card", help="directory holding the run's model.json (default: next to the checkpoint)")
    p.add_argument("--out", help="output directory (default: <run>/export)")
    p.add_argument("--method", choices=("script", "trace"), default="script")
    p.add_argument("--freeze", action="store_true", help="torch.jit.freeze the scripted module")
    a = p.parse_args(argv)
    out = Path(a.out) if a.out else Path(a.checkpoint).parent / "export"
    try:
        card = export(a.checkpoint, out, a.card, a.method, a.freeze)
    except (ExportError, FileNotFoundError) as e:
        print(f"export failed: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    e = card["export"]
    print(f"[export] {a.method}{' + freeze' if a.freeze else ''}: {out / e['file']}")
    print(
        f"[export] parity vs eager effdet: max |diff| = {e['parity']['max_abs_diff']:.2e} over "
        f"{e['parity']['outputs_checked']} head outputs, inputs {e['parity']['inputs']}"
    )
    print(
        f"[export] size {e['bytes'] / 1e6:.1f} MB, load {e['load_seconds']:.2f} s, sha256 {e['sha256'][:16]}..."
    )
    for w in e["warnings"]:
        print(f"[export] warning from torch.jit.{a.method}: {w}")
    if a.method == "trace" and e["warnings"]:
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
