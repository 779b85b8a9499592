"""An AOTInductor package (``model.pt2``) of the EfficientDet network, called like the TorchScript module.

The ``.pt2`` is opened with the C++ package loader that ``torch._inductor.aoti_load_package``
wraps: the Python route imports ``torch._inductor.package`` and the export archive code, about
0.5-1 s per TorchServe worker on 2 cores, the loader alone 0.03-0.06 s. A compiled package runs
whatever bytes it is given, so ``AotiNetwork`` checks device, dtype and shape before every call.
"""

from __future__ import annotations

from pathlib import Path

import torch

# What export writes into the package's metadata (AOTInductor stores strings only).
META_DTYPE = "effdet_serve.dtype"
META_IMAGE_SIZE = "effdet_serve.image_size"
META_LEVELS = "effdet_serve.levels"
META_MAX_BATCH = "effdet_serve.max_batch"
AOTI_DEVICE_KEY = "AOTI_DEVICE_KEY"  # written by AOTInductor itself: "cpu" or "cuda"


class AotiNetwork:
    """An AOTInductor package of the EfficientDet network: ``x -> ([cls per level], [box per level])``."""

    def __init__(self, path: str | Path, device: torch.device, dtype: torch.dtype):
        self.path = Path(path)
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        index = device.index if device.type == "cuda" else -1
        try:
            self.loader = torch._C._aoti.AOTIModelPackageLoader(str(self.path), "model", False, 1, index)
        except (AttributeError, TypeError):  # another torch's binding: take the public (slower) route
            from torch._inductor import aoti_load_package

            self.loader = aoti_load_package(str(self.path), device_index=index).loader
        meta = self.loader.get_metadata()
        compiled_for = meta.get(AOTI_DEVICE_KEY, "cpu")
        if compiled_for != self.device.type:
            raise ValueError(
                f"{self.path} was compiled for {compiled_for} and cannot run on {self.device}; "
                f"export it again on the serving machine with --device {self.device.type}"
            )
        self.dtype = getattr(torch, meta.get(META_DTYPE, "float32"))
        if self.dtype != dtype:
            raise ValueError(
                f"{self.path} was compiled for {self.dtype} but {dtype} was asked for; "
                "serve it at its own precision or export again with --precision "
                f"{'fp16' if dtype == torch.float16 else 'fp32'}"
            )
        self.image_size = (
            tuple(int(v) for v in meta[META_IMAGE_SIZE].split(",")) if META_IMAGE_SIZE in meta else None
        )
        self.levels = int(meta.get(META_LEVELS, 0))
        self.max_batch = int(meta.get(META_MAX_BATCH, 0))

    def eval(self) -> AotiNetwork:
        return self  # compiled for inference; kept so every format reads alike

    def __call__(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        # The compiled code trusts its input: wrong sizes or dtypes would be read as raw memory.
        if x.dim() != 4 or x.shape[1] != 3 or (self.image_size and tuple(x.shape[2:]) != self.image_size):
            raise ValueError(f"{self.path.name} takes [B, 3, {self.image_size}] batches, got {list(x.shape)}")
        if x.dtype != self.dtype or x.device != self.device:
            raise ValueError(
                f"{self.path.name} takes {self.dtype} on {self.device}, got {x.dtype} on {x.device}"
            )
        if not 1 <= x.shape[0] <= (self.max_batch or x.shape[0]):
            raise ValueError(
                f"{self.path.name} was compiled for batches of 1..{self.max_batch}, got {x.shape[0]}"
            )
        out = self.loader.boxed_run([x.contiguous()])
        half = len(out) // 2
        return out[:half], out[half:]
