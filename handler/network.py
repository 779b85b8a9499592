"""The network formats the handler serves, one registry: TorchScript, AOTInductor, ONNX Runtime.

Every format's loader returns a callable with what effdet's ``EfficientDet.forward`` returns:
per-level class and box head outputs ``([cls_l3..cls_l7], [box_l3..box_l7])``. The rest of the
serving path (geometry, post-processing, answers) does not know which format it runs. A format is
named by its file (``model.pt``, ``model.pt2``, ``model.onnx``); ``export/formats.py`` holds the
writing side of the same formats.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from handler.aoti_network import AotiNetwork
from handler.onnx_network import OnnxNetwork

HeadOutputs = tuple[list[torch.Tensor], list[torch.Tensor]]
Network = Callable[[torch.Tensor], HeadOutputs]

# torch 2.14 warns on every torch.jit.{script,trace,save,load}. Where this project uses TorchScript
# on purpose, that notice (and only that: same category, same wording) is kept out of server logs.
TORCHSCRIPT_NOTICE = r"`torch\.jit\.\w+` is (deprecated|not supported in Python)"


@contextmanager
def torchscript_on_purpose() -> Iterator[None]:
    """Silence torch's TorchScript deprecation FutureWarning inside the block; every other warning passes."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=TORCHSCRIPT_NOTICE, category=FutureWarning)
        yield


def load_torchscript(path: Path, device: torch.device, dtype: torch.dtype) -> torch.jit.ScriptModule:
    """The TorchScript file; on the CPU in fp32 frozen and optimised for inference (constants folded,
    convolutions fused with their batch norms), which runs 1.1-1.9x faster there. The file itself
    stays portable: a CUDA worker casts it to fp16 instead."""
    with torchscript_on_purpose():
        model = torch.jit.load(str(path), map_location=device).eval()
        if device.type == "cpu" and dtype == torch.float32:
            return torch.jit.optimize_for_inference(torch.jit.freeze(model))
    return model.half() if dtype == torch.float16 else model


def _aoti_placement(export: dict, device_type: str, precision: str) -> str | None:
    """Why a .pt2 cannot run on ``device_type`` at ``precision`` (None when it can): it runs only
    on the device and precision it was compiled for."""
    device = "cuda" if device_type in ("cuda", "gpu") else "cpu"
    if export.get("device") != device:
        return (
            f"it was compiled for {export.get('device')} but the workers run on {device}; export again "
            f"with --device {device} or serve on {export.get('device')}"
        )
    if device == "cuda" and export.get("precision") != precision:
        return f"it was compiled for {export.get('precision')} but {precision} was asked for"
    return None


def _anywhere(export: dict, device_type: str, precision: str) -> str | None:
    return None


@dataclass(frozen=True)
class NetworkFormat:
    """What the serving side knows of one format: its name, file, loader and where it can run."""

    name: str  # as export's --format, the bench's --formats and model.json's export.format say
    file: str  # the file export writes and the archive packages
    title: str  # for people: tables, messages
    load: Callable[[Path, torch.device, torch.dtype], Network]
    channels_last: bool  # takes channels_last input (else the batch is made contiguous)
    precisions: tuple[str, ...] = ("fp32", "fp16")  # what it can be served at on CUDA (CPU: fp32)
    # why an export (model.json's ``export`` block) cannot be served on a device type (cpu, cuda or
    # gpu), beyond its precisions, else None
    placement: Callable[[dict, str, str], str | None] = _anywhere

    def problem(self, export: dict, device_type: str, precision: str) -> str | None:
        """Why this export cannot be served on ``device_type`` (cpu, cuda, gpu) at ``precision``, else None."""
        if device_type in ("cuda", "gpu") and precision not in self.precisions:
            return f"{self.title} networks are served in {' or '.join(self.precisions)} here, not {precision}"
        return self.placement(export, device_type, precision)


NETWORK_FORMATS: dict[str, NetworkFormat] = {
    f.name: f
    for f in (
        NetworkFormat("torchscript", "model.pt", "TorchScript", load_torchscript, channels_last=True),
        NetworkFormat("aoti", "model.pt2", "AOTInductor", AotiNetwork, False, placement=_aoti_placement),
        NetworkFormat("onnx", "model.onnx", "ONNX Runtime", OnnxNetwork, False, precisions=("fp32",)),
    )
}
DEFAULT_FORMAT = "torchscript"


def network_format(path: str | Path) -> NetworkFormat:
    """The format of a network file, by its name; anything else is refused by name."""
    name = Path(path).name
    for f in NETWORK_FORMATS.values():
        if Path(f.file).suffix == Path(name).suffix:
            return f
    known = ", ".join(f"{f.file} ({f.title})" for f in NETWORK_FORMATS.values())
    raise ValueError(f"{path}: unknown network format {Path(name).suffix!r}; expected one of {known}")


def load_network(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Network:
    """The network file -> a callable taking a [B, 3, H, W] batch of ``dtype`` on ``device``."""
    fmt = network_format(path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} not found: export the network first (python -m export)")
    return fmt.load(Path(path), torch.device(device), dtype)
