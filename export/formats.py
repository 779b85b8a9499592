"""The export formats, one registry, and ``export``: checkpoint -> any format's network file + model.json.

    card = export("runs/NAME/best.ckpt")                           # TorchScript -> runs/NAME/export
    card = export("runs/NAME/best.ckpt", fmt="onnx")               # ONNX -> runs/NAME/export_onnx
    card = export("runs/NAME/best.ckpt", fmt="aoti", device="cuda", precision="fp16")

A format is one module here (its ``write``: eager effdet -> file, parity enforced) and one entry
in ``handler.network.NETWORK_FORMATS`` (its file name, loader, and where it can be served); the
archive, the handler, the bench and the demo find it through these two registries. Adding one
means a module with ``write``, a line below, its loader in ``handler/`` and its tests.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from export import aoti, onnx, torchscript
from export.core import load_weights, sha256
from handler.card import MODEL_CARD, ModelCard
from handler.network import DEFAULT_FORMAT, NETWORK_FORMATS, NetworkFormat


@dataclass(frozen=True)
class ExportFormat:
    """How one network format is written."""

    network: NetworkFormat  # its file, loader and placement rules (the serving side)
    out_dir: str  # where ``python -m export`` writes it by default: <run>/<out_dir>
    write: Callable[..., dict]  # (card, weights, out, **options) -> what model.json records
    options: tuple[str, ...] = ()  # the keyword options ``write`` takes

    @property
    def name(self) -> str:
        return self.network.name


EXPORT_FORMATS: dict[str, ExportFormat] = {
    f.name: f
    for f in (
        ExportFormat(NETWORK_FORMATS["torchscript"], "export", torchscript.write, ("method", "freeze")),
        ExportFormat(NETWORK_FORMATS["aoti"], "export_aoti", aoti.write, ("device", "precision")),
        ExportFormat(NETWORK_FORMATS["onnx"], "export_onnx", onnx.write),
    )
}


def export_format(name: str) -> ExportFormat:
    if name not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {name!r}; one of {', '.join(EXPORT_FORMATS)}")
    return EXPORT_FORMATS[name]


def export(
    checkpoint: str | Path,
    out: str | Path | None = None,
    card_dir: str | Path | None = None,
    fmt: str = DEFAULT_FORMAT,
    **options,
) -> ModelCard:
    """Checkpoint + model.json -> ``out/{network file, model.json, index_to_name.json}``; returns the card.

    ``out`` defaults to ``<run>/<the format's out_dir>``; ``options`` are the format's own (a
    TorchScript ``method``, an AOTInductor ``device``, ...): one it does not take is refused by name.
    """
    f = export_format(fmt)
    foreign = sorted(k for k, v in options.items() if v is not None and k not in f.options)
    if foreign:
        takes = f"takes {', '.join(f.options)}" if f.options else "takes no options"
        raise ValueError(f"the {f.network.title} export {takes}, not {', '.join(foreign)}")
    checkpoint = Path(checkpoint)
    out = Path(out) if out is not None else checkpoint.parent / f.out_dir
    card = ModelCard.load(card_dir or checkpoint.parent)
    weights = load_weights(checkpoint, card)
    info = f.write(card, weights, out, **{k: v for k, v in options.items() if v is not None})
    path = out / f.network.file
    card = card.with_export(
        {
            "format": f.name,
            **info,
            "file": path.name,
            "torch": torch.__version__,
            "checkpoint": str(checkpoint),
            "bytes": path.stat().st_size,
            "sha256": sha256(path),
        }
    )
    card.save(out / MODEL_CARD)
    (out / "index_to_name.json").write_text(json.dumps(card.index_to_name(), indent=2) + "\n")
    return card
