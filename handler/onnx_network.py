"""An ONNX network (``model.onnx``) run by ONNX Runtime, called like the TorchScript module.

ONNX Runtime is imported when an ONNX network is loaded and not before: a worker serving another
format never needs it, and a worker without it says so in one line at load. The session runs
with graph optimisation ALL, intra-op threads = torch's thread count in this process (a worker's
``torch_threads``: its share of the cores) and one inter-op thread (the network is a chain of
convolutions; parallel branches gain nothing). On the CPU the input is handed over as a NumPy
view of the tensor and the outputs come back as tensors over ONNX Runtime's own arrays: no copy
either way. On CUDA (``onnxruntime-gpu``) input and outputs are bound to torch's device memory.
"""

from __future__ import annotations

from pathlib import Path

import torch

INPUT = "images"


def output_names(levels: range) -> list[str]:
    """The network's outputs in the order effdet returns them: class heads, then box heads, per level."""
    return [f"cls_l{level}" for level in levels] + [f"box_l{level}" for level in levels]


def import_onnxruntime(path: Path):
    try:
        import onnxruntime
    except ImportError:
        raise RuntimeError(
            f"{path.name} is an ONNX network and this Python has no onnxruntime: "
            "pip install onnxruntime (onnxruntime-gpu on a CUDA machine) where the workers run"
        ) from None
    return onnxruntime


class OnnxNetwork:
    """An ONNX Runtime session of the EfficientDet network: ``x -> ([cls per level], [box per level])``."""

    def __init__(self, path: str | Path, device: torch.device, dtype: torch.dtype):
        self.path = Path(path)
        self.device = torch.device(device)
        if dtype != torch.float32:
            raise ValueError(f"{self.path.name} runs in fp32 (ONNX Runtime here), not {dtype}")
        ort = import_onnxruntime(self.path)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        if self.device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise RuntimeError(
                    f"{self.path.name}: this onnxruntime has no CUDAExecutionProvider "
                    "(install onnxruntime-gpu to serve an ONNX network on a GPU)"
                )
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            self.device = torch.device("cuda", index)
            providers = [("CUDAExecutionProvider", {"device_id": index})]
        elif self.device.type == "cpu":
            providers = ["CPUExecutionProvider"]
        else:
            raise ValueError(f"{self.path.name}: ONNX Runtime runs on cpu or cuda, not {self.device}")
        self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        (image,) = self.session.get_inputs()
        self.input = image.name
        self.image_size = tuple(image.shape[2:])
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.output_shapes = [tuple(o.shape[1:]) for o in self.session.get_outputs()]

    def eval(self) -> OnnxNetwork:
        return self  # an inference session; kept so every format reads alike

    def __call__(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if x.dim() != 4 or x.shape[1] != 3 or tuple(x.shape[2:]) != self.image_size:
            raise ValueError(f"{self.path.name} takes [B, 3, {self.image_size}] batches, got {list(x.shape)}")
        if x.dtype != torch.float32 or x.device != self.device:
            raise ValueError(f"{self.path.name} takes float32 on {self.device}, got {x.dtype} on {x.device}")
        x = x.contiguous()
        if self.device.type == "cpu":
            outs = [torch.from_numpy(o) for o in self.session.run(self.outputs, {self.input: x.numpy()})]
        else:
            outs = self._run_cuda(x)
        half = len(outs) // 2
        return outs[:half], outs[half:]

    def _run_cuda(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Input and outputs bound to torch's CUDA memory; torch's stream is finished first."""
        import numpy as np

        index = self.device.index
        outs = [
            torch.empty((x.shape[0], *s), dtype=torch.float32, device=self.device) for s in self.output_shapes
        ]
        binding = self.session.io_binding()
        binding.bind_input(self.input, "cuda", index, np.float32, tuple(x.shape), x.data_ptr())
        for name, out in zip(self.outputs, outs, strict=True):
            binding.bind_output(name, "cuda", index, np.float32, tuple(out.shape), out.data_ptr())
        torch.cuda.current_stream(self.device).synchronize()
        self.session.run_with_iobinding(binding)
        return outs
