"""Model presets, effdet config building, model construction and the model.json card.

Configs are plain dicts (JSON-able) everywhere in this project; they become OmegaConf only at
the moment effdet's ``EfficientDet`` is built, because effdet wants that.
"""

from __future__ import annotations

import copy
import json
import platform
from pathlib import Path

import effdet
import timm
import torch
from effdet.version import __version__ as effdet_version
from omegaconf import OmegaConf

from handler.card import ModelCard
from handler.geometry import Geometry
from handler.postprocess import AnchorConfig, feature_sizes

# The effdet config this project started from (tf_efficientnetv2_l at 512x512), every key as given.
SEED_CONFIG: dict = {
    "name": "tf_efficientnetv2_l",
    "backbone_name": "tf_efficientnetv2_l",
    "backbone_args": {"drop_path_rate": 0.2},
    "backbone_indices": None,
    "image_size": [512, 512],
    "num_classes": 1,
    "min_level": 3,
    "max_level": 7,
    "num_levels": 5,
    "num_scales": 3,
    "aspect_ratios": [[1.0, 1.0], [1.4, 0.7], [0.7, 1.4]],
    "anchor_scale": 4.0,
    "pad_type": "same",
    "act_type": "swish",
    "norm_layer": None,
    "norm_kwargs": {"eps": 0.001, "momentum": 0.01},
    "box_class_repeats": 3,
    "fpn_cell_repeats": 3,
    "fpn_channels": 88,
    "separable_conv": True,
    "apply_resample_bn": True,
    "conv_after_downsample": False,
    "conv_bn_relu_pattern": False,
    "use_native_resize_op": False,
    "downsample_type": "max",
    "upsample_type": "nearest",
    "redundant_bias": True,
    "head_bn_level_first": False,
    "head_act_type": None,
    "fpn_name": None,
    "fpn_config": None,
    "fpn_drop_path_rate": 0.0,
    "alpha": 0.25,
    "gamma": 1.5,
    "label_smoothing": 0.0,
    "legacy_focal": False,
    "jit_loss": False,
    "delta": 0.1,
    "box_loss_weight": 50.0,
    "soft_nms": False,
    "max_detection_points": 5000,
    "max_det_per_image": 100,
    "url": "",
}

# Small enough to train on 2 CPU cores in minutes: a mobilenetv3 backbone, two 64-channel
# BiFPN cells and two head repeats at 256x256.
SMALL_OVERRIDES: dict = {
    "name": "effdet_small",
    "backbone_name": "mobilenetv3_large_100",
    "backbone_args": {"drop_path_rate": 0.0},
    "image_size": [256, 256],
    "fpn_channels": 64,
    "fpn_cell_repeats": 2,
    "box_class_repeats": 2,
    "url": "",
}


# The project's presets by the architecture they build; the starting config is also called "seed".
PRESETS = ("tf_efficientnetv2_l_512", "small")
ALIASES = {"seed": "tf_efficientnetv2_l_512"}


def _effdet_base(name: str) -> dict:
    try:
        cfg = effdet.get_efficientdet_config(name)
    except KeyError:
        known = ", ".join(repr(n) for n in (*PRESETS, *ALIASES))
        raise ValueError(f"unknown model {name!r}: use {known} or an effdet config name") from None
    return json.loads(json.dumps(OmegaConf.to_container(cfg)))


def build_config(model: str, num_classes: int, image_size: int | tuple[int, int] | None = None) -> dict:
    """Preset or effdet config name -> a complete effdet config dict for ``num_classes`` classes."""
    model = ALIASES.get(model, model)
    if model == "tf_efficientnetv2_l_512":
        cfg = copy.deepcopy(SEED_CONFIG)
    elif model == "small":
        cfg = {**_effdet_base("efficientdet_d0"), **copy.deepcopy(SMALL_OVERRIDES)}
    else:
        cfg = _effdet_base(model)
        cfg["url"] = ""
    cfg["num_classes"] = int(num_classes)
    if image_size is not None:
        size = [image_size, image_size] if isinstance(image_size, int) else list(image_size)
        cfg["image_size"] = size
    stride = 2 ** cfg["max_level"]
    if any(s % stride for s in cfg["image_size"]):
        raise ValueError(f"image size {cfg['image_size']} must be a multiple of {stride} (2**max_level)")
    # effdet's top-k needs anchors * classes >= max_detection_points.
    budget = num_anchors(cfg) * cfg["num_classes"]
    if cfg["max_detection_points"] > budget:
        cfg["max_detection_points"] = budget
    return cfg


def num_anchors(cfg: dict) -> int:
    """How many anchors an effdet config has over all its levels."""
    anchor_cfg = AnchorConfig.from_effdet_config(cfg)
    sizes = feature_sizes(anchor_cfg.image_size, cfg["max_level"])
    cells = sum(h * w for h, w in sizes[cfg["min_level"] : cfg["max_level"] + 1])
    return cells * anchor_cfg.anchors_per_location


def create_effdet(
    cfg: dict, pretrained_backbone: bool = False, backbone_weights: str | Path | None = None
) -> effdet.EfficientDet:
    """Build effdet's ``EfficientDet`` from a config dict (heads with effdet's prior-bias init)."""
    omega = OmegaConf.create(copy.deepcopy(cfg))
    try:
        model = effdet.EfficientDet(omega, pretrained_backbone=pretrained_backbone)
    except Exception as e:  # hub download failures come in many exception types
        if not pretrained_backbone:
            raise
        raise RuntimeError(
            f"could not download pretrained weights for backbone {cfg['backbone_name']!r} ({e}). "
            "Offline? Pass a local timm state dict with --backbone-weights PATH instead."
        ) from e
    if backbone_weights is not None:
        load_backbone_weights(model, backbone_weights)
    return model


def load_backbone_weights(model: effdet.EfficientDet, path: str | Path) -> None:
    """Load a local timm state dict (full classifier model or features_only) into the backbone."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--backbone-weights: {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    own = model.backbone.state_dict()
    usable = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    missing = [k for k in own if k not in usable and not k.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(
            f"{path}: {len(missing)} backbone tensors missing or of another shape "
            f"(first: {missing[:3]}); is it a state dict of {model.config.backbone_name}?"
        )
    model.backbone.load_state_dict(usable, strict=False)


def model_card(
    name: str, cfg: dict, classes: list[str], provenance: dict | None = None, metrics: dict | None = None
) -> ModelCard:
    """The model.json of a run: effdet config, classes, the serving geometry, provenance, metrics."""
    return ModelCard(
        name=name,
        effdet_config=cfg,
        classes=tuple(classes),
        preprocessing=Geometry(size=tuple(cfg["image_size"])),
        provenance={
            "torch": torch.__version__,
            "effdet": effdet_version,
            "timm": timm.__version__,
            "python": platform.python_version(),
            **(provenance or {}),
        },
        metrics=metrics or {},
    )
