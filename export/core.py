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
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from effdet.efficientdet import EfficientDet, HeadNet

from handler.network import TORCHSCRIPT_NOTICE, torchscript_on_purpose
from train.config import create_effdet

PARITY_TOLERANCE = 1e-4


class SaveableHeadNet(HeadNet):
    """effdet's HeadNet with a forward TorchScript can save (level-first batch norms only)."""

    def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        return self._forward_level_first(x)


class ExportError(RuntimeError):
    """Export refused: mismatched checkpoint, or TorchScript not matching eager."""


def load_weights(checkpoint: str | Path, card: dict) -> dict[str, torch.Tensor]:
    """The EfficientDet state dict from a Lightning checkpoint (EMA weights when present).

    The checkpoint must describe the same network as ``card`` (model.json): a different class
    count or image size is refused with both values named.
    """
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    want = card["effdet_config"]
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


def build_eager(card: dict, weights: dict[str, torch.Tensor]) -> EfficientDet:
    """effdet's EfficientDet with the trained weights, in eval mode (the parity reference)."""
    model = create_effdet(card["effdet_config"], pretrained_backbone=False)
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
