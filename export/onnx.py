"""Eager effdet -> ``model.onnx`` (``torch.onnx.export`` with the dynamo exporter), parity enforced.

The same network as the TorchScript file (backbone + BiFPN + heads, per-level outputs named
``cls_l3..``, ``box_l3..``; no post-processing), opset 18, a dynamic batch dimension, checked by
``onnx.checker`` and then run by ONNX Runtime exactly as the handler runs it
(``handler/onnx_network.py``) against eager effdet within 1e-4. ONNX Runtime runs the network
about three times faster than TorchScript on a CPU (docs/formats.md). The image size is fixed,
as for every format: effdet builds its BiFPN resampling for the config size.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch

from export.core import ExportError, Parity, build_eager, check_parity, describe_failure, levels_of, staged
from handler.card import ModelCard
from handler.onnx_network import INPUT, OnnxNetwork, output_names

OPSET = 18
MAX_BATCH = 256  # the batch dimension's declared upper end (ONNX Runtime itself takes any)
FILE = "model.onnx"


def to_onnx(
    model: torch.nn.Module, reference: torch.nn.Module, out: Path, image_size: tuple[int, int], levels: range
) -> tuple[Path, float, Parity]:
    """Export ``model`` and check it against ``reference`` (eager fp32); ``out/model.onnx`` appears
    only once ``onnx.checker`` and parity have passed. Returns the file, export seconds and parity."""
    import onnx

    example = torch.randn(2, 3, *image_size)  # 2: a batch of 1 would be specialised
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with staged(out, FILE) as path:
        start = time.perf_counter()
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")  # the exporter's progress notes and deprecations
                program = torch.onnx.export(
                    model.eval(),
                    (example,),
                    dynamo=True,
                    opset_version=OPSET,
                    dynamic_shapes=({0: batch},),
                    input_names=[INPUT],
                    output_names=output_names(levels),
                    verbose=False,
                )
            program.save(str(path))
            onnx.checker.check_model(str(path))
        except Exception as e:  # torch.onnx and torch.export raise many types: name the op and the line
            raise ExportError(f"torch.onnx cannot export the network: {describe_failure(e)}") from e
        seconds = time.perf_counter() - start
        network = OnnxNetwork(path, torch.device("cpu"), torch.float32)
        parity = check_parity(reference, network, image_size, "ONNX network (ONNX Runtime)")
    return out / FILE, seconds, parity


def write(card: ModelCard, weights: dict, out: Path) -> dict:
    """``out/model.onnx`` once it has passed the parity gate; returns what model.json records."""
    size = card.preprocessing.size
    path, seconds, parity = to_onnx(
        build_eager(card, weights), build_eager(card, weights), out, size, levels_of(card)
    )
    start = time.perf_counter()
    OnnxNetwork(path, torch.device("cpu"), torch.float32)
    import onnxruntime

    return {
        "method": f"torch.onnx.export (dynamo, opset {OPSET})",
        "device": "cpu",
        "precision": "fp32",
        "max_batch": MAX_BATCH,
        "compile_seconds": round(seconds, 1),
        "onnxruntime": onnxruntime.__version__,
        "parity": parity.as_dict(),
        "warnings": [],
        "load_seconds": round(time.perf_counter() - start, 3),
    }
