"""Eager effdet -> TorchScript ``model.pt`` that saves, loads without effdet, and matches eager effdet.

effdet 0.4.1 scripts after ``toggle_head_bn_level_first()`` but ``torch.jit.save`` then fails
("Could not export Python function call '_forward'", effdet issue #283): ``HeadNet.forward``
still references the ``@torch.jit.ignore``-d ``_forward``. ``SaveableHeadNet`` is a subclass
whose forward only takes the level-first path, so nothing unsaveable is reachable. What goes
into TorchScript is the network (backbone + BiFPN + heads, all levels); top-k, NMS and
rescaling stay in ``handler/``.

The parity gate checks the file as a CPU worker runs it (frozen and optimised for inference,
``handler.network.load_torchscript``) and as loaded plainly (what a CUDA worker casts to fp16).
"""

from __future__ import annotations

import re
import time
import warnings
from pathlib import Path

import torch
from effdet.efficientdet import EfficientDet, HeadNet

from export.core import Parity, build_eager, check_parity, staged
from handler.card import ModelCard
from handler.network import TORCHSCRIPT_NOTICE, load_torchscript, torchscript_on_purpose

METHODS = ("script", "trace")


class SaveableHeadNet(HeadNet):
    """effdet's HeadNet with a forward TorchScript can save (level-first batch norms only)."""

    def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        return self._forward_level_first(x)


def make_scriptable(model: EfficientDet) -> EfficientDet:
    """Level-first head batch norms + saveable HeadNet; values unchanged."""
    model.toggle_head_bn_level_first()
    for head in (model.class_net, model.box_net):
        head.__class__ = SaveableHeadNet
    return model


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
                raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    messages = sorted(
        {
            str(w.message).splitlines()[0]
            for w in caught
            if not (issubclass(w.category, FutureWarning) and re.match(TORCHSCRIPT_NOTICE, str(w.message)))
        }
    )
    return ts, messages


def check_file(eager: EfficientDet, path: Path, image_size: tuple[int, int]) -> Parity:
    """The saved file against eager effdet, as a CPU worker runs it and as loaded plainly: the worse."""
    cpu = torch.device("cpu")
    served = check_parity(
        eager, load_torchscript(path, cpu, torch.float32), image_size, "TorchScript (optimised)"
    )
    with torchscript_on_purpose():
        plain = torch.jit.load(str(path), map_location=cpu).eval()
    loaded = check_parity(eager, plain, image_size, "TorchScript")
    return max(served, loaded, key=lambda p: p.max_abs_diff)


def timed_load(path: Path) -> float:
    """Seconds to load the file as a CPU worker does (load, freeze, optimise)."""
    start = time.perf_counter()
    load_torchscript(path, torch.device("cpu"), torch.float32)
    return time.perf_counter() - start


def write(card: ModelCard, weights: dict, out: Path, method: str = "script", freeze: bool = False) -> dict:
    """``out/model.pt`` once it has passed the parity gate; returns what model.json records."""
    size = card.preprocessing.size
    eager = build_eager(card, weights)
    ts, messages = to_torchscript(build_eager(card, weights), method, size)
    with staged(out, "model.pt") as path:
        with torchscript_on_purpose():
            if freeze:
                ts = torch.jit.freeze(ts)
            torch.jit.save(ts, str(path))
        # effdet builds its BiFPN resampling for the config image size: the network takes that size only.
        parity = check_file(eager, path, size)
    return {
        "method": method,
        "frozen": freeze,
        "device": "cpu",
        "precision": "fp32",
        "parity": parity.as_dict(),
        "warnings": messages,
        "load_seconds": round(timed_load(out / "model.pt"), 3),
    }
