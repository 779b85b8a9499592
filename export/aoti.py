"""Eager effdet -> ``torch.export`` program -> AOTInductor ``.pt2`` package, parity enforced.

The package holds the same network as the TorchScript file (backbone + BiFPN + heads, per-level
outputs; no post-processing) compiled ahead of time to C++ (CPU) or C++ + Triton (CUDA), with a
dynamic batch dimension. The image size is fixed: effdet builds its BiFPN resampling for the
config size, as for TorchScript. It runs only on the device, precision and torch it was compiled
for (``handler/aoti_network.py`` checks).

Parity: fp32 packages must match eager effdet (fp32, same device, TF32 off on both sides) within
1e-4, the gate of every format; fp16 packages are compared with the same fp32 eager reference
within a tolerance relative to the largest output (``export.core.tolerance``).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from export.core import ExportError, Parity, build_eager, check_parity, describe_failure, levels_of, staged
from handler.aoti_network import META_DTYPE, META_IMAGE_SIZE, META_LEVELS, META_MAX_BATCH, AotiNetwork
from handler.card import ModelCard

MAX_BATCH = 256  # upper end of the dynamic batch dimension (TorchServe batch sizes stay far below)
PACKAGE = "model.pt2"


def capture(
    model: torch.nn.Module, image_size: tuple[int, int], device: torch.device, dtype: torch.dtype
) -> torch.export.ExportedProgram:
    """``torch.export`` of the network with a dynamic batch; an op it cannot capture is named."""
    example = torch.randn(2, 3, *image_size, device=device, dtype=dtype)  # 2: batch 1 would be specialised
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    try:
        with torch.no_grad():
            return torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    except Exception as e:  # torch.export raises many types; the user needs the op and the line
        raise ExportError(f"torch.export cannot capture the network: {describe_failure(e)}") from e


def compile_package(
    program: torch.export.ExportedProgram,
    path: Path,
    image_size: tuple[int, int],
    dtype: torch.dtype,
    levels: int,
) -> float:
    """AOTInductor-compile ``program`` into ``path``; returns the seconds it took."""
    metadata = {
        META_DTYPE: str(dtype).removeprefix("torch."),
        META_IMAGE_SIZE: ",".join(str(s) for s in image_size),
        META_LEVELS: str(levels),
        META_MAX_BATCH: str(MAX_BATCH),
    }
    start = time.perf_counter()
    try:
        torch._inductor.aoti_compile_and_package(
            program, package_path=str(path), inductor_configs={"aot_inductor.metadata": metadata}
        )
    except Exception as e:
        raise ExportError(f"AOTInductor cannot compile the network: {describe_failure(e)}") from e
    return time.perf_counter() - start


def check_aoti_parity(
    eager: torch.nn.Module,
    package: str | Path,
    image_size: tuple[int, int],
    device: torch.device,
    dtype: torch.dtype,
) -> Parity:
    """Eager fp32 effdet vs the loaded package (batch 1 and 3); raise above the tolerance for ``dtype``."""
    return check_parity(
        eager, AotiNetwork(package, device, dtype), image_size, "AOTInductor package", device, dtype
    )


def to_aoti(
    eager: torch.nn.Module,
    reference: torch.nn.Module,
    out: Path,
    image_size: tuple[int, int],
    device: torch.device,
    dtype: torch.dtype,
    levels: int,
) -> tuple[Path, float, Parity]:
    """Capture, compile and check ``eager``; ``out/model.pt2`` appears only once parity has passed.

    The package is built in a private directory next to its destination and renamed into place,
    so a failed capture, compile or parity check leaves nothing behind. ``reference`` is a
    separate fp32 copy of the network (``eager`` may be converted to fp16 for the capture).
    """
    model = eager.to(device=device, dtype=dtype).eval()
    program = capture(model, image_size, device, dtype)
    with staged(out, PACKAGE) as path:
        seconds = compile_package(program, path, image_size, dtype, levels)
        parity = check_aoti_parity(reference, path, image_size, device, dtype)
    return out / PACKAGE, seconds, parity


def write(
    card: ModelCard, weights: dict, out: Path, device: str | None = None, precision: str = "fp32"
) -> dict:
    """``out/model.pt2`` compiled for ``device`` (default: cuda if present) once it has passed parity."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if precision not in ("fp32", "fp16"):
        raise ValueError(f"precision must be 'fp32' or 'fp16', got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("an fp16 package needs --device cuda")
    dtype = torch.float16 if precision == "fp16" else torch.float32
    size = card.preprocessing.size
    path, seconds, parity = to_aoti(
        build_eager(card, weights), build_eager(card, weights), out, size, device, dtype, len(levels_of(card))
    )
    start = time.perf_counter()
    AotiNetwork(path, device, dtype)
    return {
        "method": "torch.export + AOTInductor",
        "device": device.type,
        "precision": precision,
        "max_batch": MAX_BATCH,
        "compile_seconds": round(seconds, 1),
        "parity": parity.as_dict(),
        "warnings": [],
        "load_seconds": round(time.perf_counter() - start, 3),
    }
