"""What every export format shares: the trained weights, eager effdet (the reference), the parity gate,
and writing a network file only once it has passed.

Each format (``export/torchscript.py``, ``export/aoti.py``, ``export/onnx.py``) turns eager effdet
into its file; ``export/formats.py`` is the registry and the one ``export`` function.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from effdet.efficientdet import EfficientDet

from handler.card import ModelCard
from handler.network import Network
from train.config import create_effdet

PARITY_TOLERANCE = 1e-4  # every head output of an fp32 network file against eager fp32 effdet
FP16_TOLERANCE = 1e-2  # x max(1, max |reference output|): half precision keeps ~3 digits over ~100 layers


class ExportError(RuntimeError):
    """Export refused: mismatched checkpoint, a network the format cannot capture, or parity failed."""


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


def levels_of(card: ModelCard) -> range:
    """The feature levels the network outputs (effdet's min_level..max_level, e.g. 3..7)."""
    cfg = card.effdet_config
    return range(int(cfg["min_level"]), int(cfg["max_level"]) + 1)


# -- the parity gate ---------------------------------------------------------------------------------
@dataclass
class Parity:
    max_abs_diff: float
    inputs: list[list[int]]
    outputs_checked: int
    reference_scale: float = 0.0  # largest |eager output|, for tolerances relative to it
    tolerance: float = PARITY_TOLERANCE

    def as_dict(self) -> dict:
        """What model.json records of the check."""
        d = asdict(self)
        d.pop("reference_scale")
        return d


def tolerance(dtype: torch.dtype, reference_scale: float) -> float:
    """The largest absolute difference from eager fp32 effdet a network of ``dtype`` may show."""
    if dtype == torch.float16:
        return FP16_TOLERANCE * max(1.0, reference_scale)
    return PARITY_TOLERANCE


@contextmanager
def true_fp32() -> Iterator[None]:
    """TF32 off for both sides of a CUDA parity check (CPU is unaffected)."""
    conv, mm = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, mm


def check_parity(
    eager: torch.nn.Module,
    network: Network,
    image_size: Sequence[int],
    what: str,
    device: torch.device = torch.device("cpu"),
    dtype: torch.dtype = torch.float32,
    batches: Sequence[int] = (1, 3),
    seed: int = 0,
) -> Parity:
    """Eager fp32 effdet vs a loaded network file on random inputs (batch 1 and 3: the file must
    not be specialised to one batch size); raise ``ExportError`` above the tolerance for ``dtype``."""
    eager = eager.to(device).float().eval()
    gen = torch.Generator().manual_seed(seed)
    worst, scale, checked, shapes = 0.0, 0.0, 0, []
    with torch.no_grad(), true_fp32():
        for b in batches:
            x = torch.randn(b, 3, *image_size, generator=gen).to(device)
            ref_cls, ref_box = eager(x)
            got_cls, got_box = network(x.to(dtype))
            for ref, got in zip([*ref_cls, *ref_box], [*got_cls, *got_box], strict=True):
                if ref.shape != got.shape:
                    raise ExportError(
                        f"{what}: shape {list(got.shape)} instead of {list(ref.shape)} at batch {b}"
                    )
                worst = max(worst, float((ref - got.float()).abs().max()))
                scale = max(scale, float(ref.abs().max()))
                checked += 1
            shapes.append([b, 3, *image_size])
    limit = tolerance(dtype, scale)
    if not worst <= limit:  # also refuses NaN
        raise ExportError(
            f"{what} differs from eager effdet by {worst:.3g} > {limit:.3g} "
            f"({str(dtype).removeprefix('torch.')}, {torch.device(device).type})"
        )
    return Parity(worst, shapes, checked, scale, limit)


@contextmanager
def staged(out: Path, name: str) -> Iterator[Path]:
    """A path to write ``name`` to in a private directory beside ``out/name``; moved into place only
    when the block ends without an error, so a failed capture or parity check leaves nothing behind."""
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
    try:
        path = staging / name
        yield path
        path.replace(out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def describe_failure(e: BaseException) -> str:
    """One line: the unsupported op when torch names one, else the first line and the model code at fault."""
    func = getattr(e, "func", None)  # FakeTensor's UnsupportedOperatorException carries the op
    if isinstance(func, torch._ops.OpOverload):
        return f"unsupported op {func.name()} (no meta/fake kernel, so its output shapes cannot be traced)"
    for inner in (e.__cause__, e.__context__):  # torch.onnx wraps torch.export's error
        if inner is not None and isinstance(getattr(inner, "func", None), torch._ops.OpOverload):
            return describe_failure(inner)
    text = str(e).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    at = re.search(r'File "([^"]+)", line (\d+), in (\w+)\n\s*(.+)', text)
    where = f" at {Path(at[1]).name}:{at[2]} in {at[3]}: {at[4].strip()}" if at else ""
    return f"{type(e).__name__}: {first}{where}"


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
