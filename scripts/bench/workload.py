"""What every stage runs on: one exported model (trained, given, or random), in one or more network
formats, and one set of JPEGs."""

from __future__ import annotations

import argparse
import io
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from handler.card import ModelCard
from handler.network import DEFAULT_FORMAT, NETWORK_FORMATS, load_network, network_format
from scripts.bench.timing import Progress, sync
from scripts.paths import ROOT


def make_random_export(
    out: str | Path, model: str = "small", num_classes: int = 3, image_size: int | None = None, seed: int = 0
) -> Path:
    """A random-weight checkpoint of a preset, exported with the project's own ``export``; reused."""
    from export.formats import export
    from train.config import build_config, model_card
    from train.module import EffDetModule

    out = Path(out)
    export_dir = out / "export"
    if (export_dir / "model.pt").is_file() and (export_dir / "model.json").is_file():
        return export_dir
    torch.manual_seed(seed)
    cfg = build_config(model, num_classes, image_size)
    classes = [f"class{i}" for i in range(num_classes)]
    module = EffDetModule(cfg, classes)
    spread_heads(module.model, seed)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "best.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, ckpt)
    model_card(out.name, cfg, classes, provenance={"weights": "random"}).save(out / "model.json")
    export(ckpt, export_dir)
    return export_dir


def spread_heads(model, seed: int = 0) -> None:
    """Make a random-weight EfficientDet score like a detector rather than a constant.

    Freshly initialised heads give every anchor almost the same logit (effdet's prior bias), so
    scores tie and NMS has nothing to do. The class head's bias
    is spread and its weights scaled (logits roughly -7..+1), and the boxes are moved off their anchors.
    """
    g = torch.Generator().manual_seed(seed)

    def last_conv(head):
        return getattr(head.predict, "conv_pw", None) or head.predict.conv

    with torch.no_grad():
        cls_conv, box_conv = last_conv(model.class_net), last_conv(model.box_net)
        cls_conv.bias.add_(torch.randn(cls_conv.bias.shape, generator=g) * 1.5 + 2.0)
        cls_conv.weight.mul_(4.0)
        box_conv.weight.mul_(3.0)
        box_conv.bias.add_(torch.randn(box_conv.bias.shape, generator=g) * 0.3)


def train_export(
    out: str | Path,
    model: str = "small",
    image_size: int | None = None,
    steps: int = 300,
    batch_size: int = 8,
    accelerator: str = "auto",
    precision: str = "32-true",
    seed: int = 0,
    num_workers: int = 0,
) -> Path:
    """Train a preset on synthetic scenes with the project's own trainer for ``steps`` steps and
    export it; reused when its export exists. Trained heads score like a served model does
    (few confident boxes, a long tail), which random heads do not: the post-processing, fp16 and
    served figures need them. The run's model.json keeps the training time (its speed)."""
    from export.formats import export
    from train.__main__ import main as train_main

    out = Path(out)
    export_dir = out / "export"
    if (export_dir / "model.pt").is_file() and (export_dir / "model.json").is_file():
        return export_dir
    train_main(
        ["--data", str(out / "data"), "--format", "synthetic", "--synthetic-train", str(max(64, 4 * batch_size)),
         "--synthetic-val", "16", "--model", model, *(["--image-size", str(image_size)] if image_size else []),
         "--epochs", "100000", "--max-steps", str(steps), "--batch-size", str(batch_size),
         "--val-every", "100000", "--accelerator", accelerator, "--precision", precision,
         "--seed", str(seed), "--num-workers", str(num_workers), "--out", str(out)]
    )  # fmt: skip
    export(out / "best.ckpt", export_dir)
    return export_dir


def resolve_export(a: argparse.Namespace, progress: Progress) -> tuple[Path, str]:
    """--export DIR (an export or a run holding export/), else runs/NAME/export, else a model of
    ``--model`` trained here for ``--train-steps`` (``--weights random``: random weights)."""
    if a.export:
        d = Path(a.export)
        if not (d / "model.pt").is_file() and (d / "export" / "model.pt").is_file():
            d = d / "export"
        if not (d / "model.pt").is_file():
            raise SystemExit(f"--export {a.export}: no model.pt there (run `python -m export` first)")
        return d, "given"
    trained = ROOT / "runs" / a.name / "export"
    if (trained / "model.pt").is_file():
        return trained, "trained"
    size = a.image_size or "preset"
    if a.weights == "trained":
        target = Path(a.out) / f"trained-{a.model}-{size}-{a.train_steps}steps"
        if not (target / "export" / "model.pt").is_file():
            progress.note(
                f"no runs/{a.name}/export: training {a.model} for {a.train_steps} steps into {target}"
            )
        accelerator = "gpu" if a.device.startswith("cuda") else "cpu"
        export_dir = train_export(
            target,
            a.model,
            a.image_size,
            a.train_steps,
            a.train_batch_size,
            accelerator,
            a.train_precision,
            a.seed,
        )
        return export_dir, f"trained here ({a.train_steps} steps)"
    target = Path(a.out) / f"random-{a.model}-{a.num_classes}c-{size}"
    if not (target / "export" / "model.pt").is_file():
        progress.note(f"no runs/{a.name}/export: exporting a random-weight {a.model} model into {target}")
    return make_random_export(target, a.model, a.num_classes, a.image_size, a.seed), "random weights"


def make_images(count: int, side: int = 640, seed: int = 0, quality: int = 90) -> list[bytes]:
    """``count`` distinct synthetic scenes (train.synthetic) as JPEGs whose longer side is ``side`` px."""
    from PIL import Image

    from train.synthetic import make_image

    rng = random.Random(seed)
    out = []
    for _ in range(count):
        img, _ = make_image(rng)
        scale = side / max(img.size)
        img = img.resize(
            (max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR
        )
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def cycle(items: Sequence, n: int) -> list:
    return [items[i % len(items)] for i in range(n)]


@dataclass
class Workload:
    """One network file and one set of images, prepared once for every stage."""

    network: Path  # model.pt, model.pt2 or model.onnx (handler.network), model.json beside it
    card: ModelCard
    device: torch.device
    precision: str
    channels_last: bool  # as the detector runs it (an AOTInductor package takes contiguous input)
    images: list[bytes]
    detector: object  # handler.detector.Detector
    inputs: dict  # batch -> (batch tensor, img_scale, img_size)
    heads: dict  # batch -> (cls outputs, box outputs) of the network
    heads32: dict | None  # the same from the fp32 TorchScript network (``heads`` itself unless fp16)
    load_s: float  # seconds to build the Detector on the network file here (its load, mostly)

    @property
    def cfg(self) -> dict:
        return self.card.effdet_config

    @property
    def export_dir(self) -> Path:
        return self.network.parent

    @property
    def fmt(self) -> str:
        return network_format(self.network).name


def prepare(
    model: Path,
    images: list[bytes],
    batches: Sequence[int],
    device: torch.device,
    precision: str = "fp32",
    channels_last: bool = False,
) -> Workload:
    """Decode and letterbox the images once per batch size; record the network's head outputs.

    ``model``: a network file, or an export directory (its model.pt)."""
    from handler.detector import Detector

    network = Path(model) / "model.pt" if Path(model).is_dir() else Path(model)
    t = time.perf_counter()
    det = Detector(network, device=device, precision=precision, channels_last=channels_last)
    load_s = time.perf_counter() - t  # mostly loading the network file (anchors are milliseconds)
    decoded = [det.decode(b) for b in images]
    inputs, heads = {}, {}
    for b in batches:
        inputs[b] = det.preprocess(cycle(decoded, b))
        heads[b] = det.forward(inputs[b][0])
    heads32 = heads
    if precision != "fp32":
        heads32 = None  # an fp16 AOTInductor package has no fp32 twin in its file
        if network_format(network).name == DEFAULT_FORMAT:
            model32 = load_network(network, device, torch.float32)
            with torch.inference_mode():
                heads32 = {b: model32(inputs[b][0].float()) for b in batches}
    sync(device)
    return Workload(
        network, det.card, device, precision, det.channels_last, images, det, inputs, heads, heads32, load_s
    )


def network_for(export_dir: Path, fmt: str, device: torch.device, precision: str, progress: Progress) -> Path:
    """The network file of ``fmt`` for the model exported in ``export_dir``.

    TorchScript: its model.pt. Another format: a file of the same checkpoint made for this device
    and precision, taken from beside the export (``<run>/export_aoti``, ``<run>/export_onnx``: what
    ``python -m export CKPT --format FMT`` writes) when one matches, else exported here into
    ``<run>/<that folder>_<device>_<precision>`` (minutes for AOTInductor: C++) and reused by later runs.
    """
    if fmt == DEFAULT_FORMAT:
        return export_dir / NETWORK_FORMATS[fmt].file
    from export.formats import export, export_format

    f = export_format(fmt)
    run = export_dir.parent
    checkpoint = _checkpoint_of(export_dir, fmt)
    target = run / f"{f.out_dir}_{device.type}_{precision}"
    for d in (run / f.out_dir, target):
        if _made_from(d / f.network.file, checkpoint, device, precision):
            return d / f.network.file
    progress.note(f"exporting {checkpoint} to {f.network.title} for {device.type} {precision} into {target}")
    options = {"device": str(device), "precision": precision} if "device" in f.options else {}
    export(checkpoint, target, card_dir=export_dir, fmt=fmt, **options)
    return target / f.network.file


def _checkpoint_of(export_dir: Path, fmt: str) -> Path:
    """The checkpoint the export was made from (model.json says), else ``<run>/best.ckpt``."""
    recorded = ModelCard.load(export_dir).export.get("checkpoint")
    candidates = [Path(recorded)] if recorded else []
    candidates.append(export_dir.parent / "best.ckpt")
    for c in candidates:
        if c.is_file():
            return c
    raise SystemExit(
        f"--formats {fmt}: no checkpoint for {export_dir} (looked for {', '.join(map(str, candidates))}); "
        f"export it beside it with `python -m export CKPT --format {fmt}`"
    )


def _made_from(network: Path, checkpoint: Path, device: torch.device, precision: str) -> bool:
    """``network`` was exported from ``checkpoint`` (and after it) for this device and precision."""
    if not network.is_file() or not (network.parent / "model.json").is_file():
        return False
    e = ModelCard.load(network.parent).export
    recorded = e.get("checkpoint")
    return (
        recorded is not None
        and Path(recorded).resolve() == checkpoint.resolve()
        and network.stat().st_mtime >= checkpoint.stat().st_mtime
        and e.get("device") == device.type
        and e.get("precision") == precision
    )


def _to_channels_last(x: torch.Tensor, enabled: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if enabled else x
