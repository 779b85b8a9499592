"""Eager effdet -> ``torch.export`` program -> AOTInductor ``.pt2`` package, parity enforced.

The package holds the same network as the TorchScript file (backbone + BiFPN + heads, per-level
outputs; no post-processing) compiled ahead of time to C++ (CPU) or C++ + Triton (CUDA), with a
dynamic batch dimension. The image size is fixed: effdet builds its BiFPN resampling for the
config size, as for TorchScript.

Parity: fp32 packages must match eager effdet (fp32, same device, TF32 off on both sides) within
``PARITY_TOLERANCE`` (1e-4), the TorchScript gate. fp16 packages are compared with the same fp32
eager reference; half precision keeps ~3 significant digits through ~100 layers, so their gate
is ``FP16_TOLERANCE`` relative to the largest reference output (see ``tolerance``).
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from export.core import PARITY_TOLERANCE, ExportError, Parity
from handler.network import META_DTYPE, META_IMAGE_SIZE, META_LEVELS, META_MAX_BATCH, AotiNetwork

FP16_TOLERANCE = 1e-2  # x max(1, max |reference output|)
MAX_BATCH = 256  # upper end of the dynamic batch dimension (TorchServe batch sizes stay far below)
PACKAGE = "model.pt2"


def tolerance(dtype: torch.dtype, reference_scale: float) -> float:
    """The largest absolute difference from eager fp32 effdet a package of ``dtype`` may show."""
    if dtype == torch.float16:
        return FP16_TOLERANCE * max(1.0, reference_scale)
    return PARITY_TOLERANCE


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


def describe_failure(e: BaseException) -> str:
    """One line: the unsupported op when torch names one, else the first line and the model code at fault."""
    func = getattr(e, "func", None)  # FakeTensor's UnsupportedOperatorException carries the op
    if isinstance(func, torch._ops.OpOverload):
        return f"unsupported op {func.name()} (no meta/fake kernel, so its output shapes cannot be traced)"
    text = str(e).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    at = re.search(r'File "([^"]+)", line (\d+), in (\w+)\n\s*(.+)', text)
    where = f" at {Path(at[1]).name}:{at[2]} in {at[3]}: {at[4].strip()}" if at else ""
    return f"{type(e).__name__}: {first}{where}"


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


@contextmanager
def true_fp32() -> Iterator[None]:
    """TF32 off for both sides of a CUDA parity check (CPU is unaffected)."""
    conv, mm = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, mm


def check_aoti_parity(
    eager: torch.nn.Module,
    package: str | Path,
    image_size: tuple[int, int],
    device: torch.device,
    dtype: torch.dtype,
    batches: tuple[int, ...] = (1, 3),
    seed: int = 0,
) -> Parity:
    """Eager fp32 effdet vs the loaded package on random inputs (batch 1 and 3); raise above tolerance."""
    loaded = AotiNetwork(package, device, dtype)
    eager = eager.to(device).float().eval()
    gen = torch.Generator().manual_seed(seed)
    worst, scale, checked, shapes = 0.0, 0.0, 0, []
    with torch.no_grad(), true_fp32():
        for b in batches:
            x = torch.randn(b, 3, *image_size, generator=gen).to(device)
            ref_cls, ref_box = eager(x)
            got_cls, got_box = loaded(x.to(dtype))
            for ref, got in zip([*ref_cls, *ref_box], [*got_cls, *got_box], strict=True):
                if ref.shape != got.shape:
                    raise ExportError(f"shape mismatch {list(ref.shape)} vs {list(got.shape)} at batch {b}")
                worst = max(worst, float((ref - got.float()).abs().max()))
                scale = max(scale, float(ref.abs().max()))
                checked += 1
            shapes.append([b, 3, *image_size])
    limit = tolerance(dtype, scale)
    if not worst <= limit:  # also refuses NaN
        raise ExportError(
            f"AOTInductor package differs from eager effdet by {worst:.3g} > {limit:.3g} "
            f"({str(dtype).removeprefix('torch.')}, {device.type})"
        )
    return Parity(worst, shapes, checked, scale)


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
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".aoti-", dir=out))
    try:
        staged = staging / PACKAGE
        seconds = compile_package(program, staged, image_size, dtype, levels)
        parity = check_aoti_parity(reference, staged, image_size, device, dtype)
        final = out / PACKAGE
        staged.replace(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final, seconds, parity
