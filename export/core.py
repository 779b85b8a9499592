"""Checkpoint -> TorchScript network that saves, loads without effdet, and matches eager effdet.

effdet 0.4.1 scripts after ``toggle_head_bn_level_first()`` but ``torch.jit.save`` then fails
("Could not export Python function call '_forward'", effdet issue #283): ``HeadNet.forward``
still references the ``@torch.jit.ignore``-d ``_forward``. ``SaveableHeadNet`` is a subclass
whose forward only takes the level-first path, so nothing unsaveable is reachable. What goes
into TorchScript is the network (backbone + BiFPN + heads, all levels); top-k, NMS and
rescaling stay in ``handler/``.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from effdet.efficientdet import EfficientDet, HeadNet

from handler.card import MODEL_CARD, ModelCard
from handler.network import TORCHSCRIPT_NOTICE, AotiNetwork, torchscript_on_purpose
from train.config import create_effdet

PARITY_TOLERANCE = 1e-4


class SaveableHeadNet(HeadNet):
    """effdet's HeadNet with a forward TorchScript can save (level-first batch norms only)."""

    def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        return self._forward_level_first(x)


class ExportError(RuntimeError):
    """Export refused: mismatched checkpoint, or TorchScript not matching eager."""


def load_weights(checkpoint: str | Path, card: ModelCard) -> dict[str, torch.Tensor]:
    """The EfficientDet state dict from a Lightning checkpoint (EMA weights when present).

    The checkpoint must describe the same network as ``card`` (model.json): a different class
    count or image size is refused with both values named.
    """
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    want = card.effdet_config
    have = (ckpt.get("hyper_parameters") or {}).get("effdet_config")
    if have is not None:
        for key in ("num_classes", "image_size", "backbone_name", "fpn_channels"):
            if _plain(have[key]) != _plain(want[key]):
                raise ExportError(
                    f"{checkpoint} was trained with {key}={have[key]} but model.json says {key}={want[key]}; "
                    "export the checkpoint with the model.json of its own run"
                )
    state = ckpt["state_dict"] if "state_dict" in ckpt else ckpt
    prefix = "ema.module." if any(k.startswith("ema.module.") for k in state) else "bench.model."
    weights = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not weights:
        raise ExportError(f"{checkpoint}: no EfficientDet weights found (expected keys under {prefix!r})")
    return weights


def _plain(value):
    return list(value) if isinstance(value, list | tuple) else value


def build_eager(card: ModelCard, weights: dict[str, torch.Tensor]) -> EfficientDet:
    """effdet's EfficientDet with the trained weights, in eval mode (the parity reference)."""
    model = create_effdet(card.effdet_config, pretrained_backbone=False)
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # size mismatch: another class count, width or anchor layout
        first = str(e).split("\n\t")[1] if "\n\t" in str(e) else str(e)
        raise ExportError(f"checkpoint does not fit the model.json network: {first}") from None
    if missing or unexpected:
        raise ExportError(
            f"checkpoint does not fit the model.json network: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return model.eval()


def make_scriptable(model: EfficientDet) -> EfficientDet:
    """Level-first head batch norms + saveable HeadNet; values unchanged."""
    model.toggle_head_bn_level_first()
    for head in (model.class_net, model.box_net):
        head.__class__ = SaveableHeadNet
    return model


@dataclass
class Parity:
    max_abs_diff: float
    inputs: list[list[int]]
    outputs_checked: int
    reference_scale: float = 0.0  # largest |eager output|, for tolerances relative to it


def to_torchscript(
    model: EfficientDet, method: str, image_size: tuple[int, int]
) -> tuple[torch.jit.ScriptModule, list[str]]:
    """Script (default) or trace the network; returns the module and any warnings it raised."""
    model = make_scriptable(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            if method == "script":
                ts = torch.jit.script(model)
            elif method == "trace":
                ts = torch.jit.trace(model, torch.randn(1, 3, *image_size), check_trace=False)
            else:
                raise ValueError(f"method must be 'script' or 'trace', got {method!r}")
    messages = sorted(
        {
            str(w.message).splitlines()[0]
            for w in caught
            if not (issubclass(w.category, FutureWarning) and re.match(TORCHSCRIPT_NOTICE, str(w.message)))
        }
    )
    return ts, messages


def check_parity(
    eager: EfficientDet,
    scripted_path: str | Path,
    sizes: list[tuple[int, int]],
    batches: int = 2,
    seed: int = 0,
) -> Parity:
    """Eager effdet vs the saved-and-reloaded TorchScript on random inputs; raise above tolerance."""
    with torchscript_on_purpose():
        loaded = torch.jit.load(str(scripted_path), map_location="cpu").eval()
    gen = torch.Generator().manual_seed(seed)
    worst, checked, shapes = 0.0, 0, []
    with torch.no_grad():
        for h, w in sizes:
            for b in range(batches):
                x = torch.randn(b + 1, 3, h, w, generator=gen)
                ref_cls, ref_box = eager(x)
                got_cls, got_box = loaded(x)
                for ref, got in zip([*ref_cls, *ref_box], [*got_cls, *got_box], strict=True):
                    if ref.shape != got.shape:
                        raise ExportError(
                            f"shape mismatch {list(ref.shape)} vs {list(got.shape)} at input {h}x{w}"
                        )
                    worst = max(worst, float((ref - got).abs().max()))
                    checked += 1
                shapes.append([b + 1, 3, h, w])
    if worst > PARITY_TOLERANCE:
        raise ExportError(
            f"TorchScript differs from eager effdet by {worst:.3g} > {PARITY_TOLERANCE} (fp32, CPU)"
        )
    return Parity(worst, shapes, checked)


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def timed_load(path: str | Path) -> float:
    """Seconds to ``torch.jit.load`` the file on CPU."""
    start = time.perf_counter()
    with torchscript_on_purpose():
        torch.jit.load(str(path), map_location="cpu")
    return time.perf_counter() - start


# -- the export itself: checkpoint -> network file + model.json ------------------------------------
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
) -> ModelCard:
    """Checkpoint + model.json -> out/{model.pt or model.pt2, model.json, index_to_name.json}; returns the card."""
    if fmt not in DEFAULT_OUT:
        raise ValueError(f"format must be 'script' or 'aoti', got {fmt!r}")
    checkpoint, out = Path(checkpoint), Path(out)
    card = ModelCard.load(card_dir or checkpoint.parent)
    weights = load_weights(checkpoint, card)
    if fmt == "aoti":
        info = _export_aoti(card, weights, out, device, precision)
    else:
        if device not in (None, "cpu") or precision != "fp32":
            raise ValueError("TorchScript export runs on CPU in fp32 (the handler casts to fp16 on CUDA)")
        info = _export_script(card, weights, out, method, freeze, parity_sizes)
    path = out / info["file"]
    card = card.with_export(
        {
            **info,
            "torch": torch.__version__,
            "checkpoint": str(checkpoint),
            "bytes": path.stat().st_size,
            "sha256": sha256(path),
        }
    )
    card.save(out / MODEL_CARD)
    (out / "index_to_name.json").write_text(json.dumps(card.index_to_name(), indent=2) + "\n")
    return card


def _export_script(
    card: ModelCard, weights: dict, out: Path, method: str, freeze: bool, parity_sizes
) -> dict:
    size = card.preprocessing.size
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


def _export_aoti(card: ModelCard, weights: dict, out: Path, device: str | None, precision: str) -> dict:
    from export.aoti import MAX_BATCH, to_aoti, tolerance  # imports torch._inductor: only when asked

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if precision not in ("fp32", "fp16"):
        raise ValueError(f"precision must be 'fp32' or 'fp16', got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("an fp16 package needs --device cuda")
    dtype = torch.float16 if precision == "fp16" else torch.float32
    size = card.preprocessing.size
    cfg = card.effdet_config
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
