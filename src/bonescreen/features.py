"""The feature vector a model gives besides its prediction: one definition for every backend.

The out-of-distribution check (``bonescreen.ood``) scores these features.
``LoadedModel.predict_with_features`` (torch, and the bf16 / other backends
that wrap it) and the ONNX graph (``onnx_export``) both call
:func:`forward_with_features`, so every backend returns the same vector.

Layout (:func:`feature_layout`), in this order:

- ``penultimate``: the pooled embedding the classifier reads (timm's
  ``forward_head(pre_logits=True)``; pediatric models: the image branch's
  embedding before the clinical variables join). It comes first, so an OOD
  part fitted on the penultimate features alone (artifact format 2 as first
  released) reads the first ``D`` columns and keeps working.
- for each stage of the backbone (timm's ``feature_info`` /
  ``forward_intermediates``), the channel means (``stageK_mean``) and channel
  standard deviations over space (``stageK_std``) of its output: the
  "feature statistics of every layer" of Lee et al. 2018. Early stages keep
  what a distilled or strongly pooled penultimate layer has lost: the
  texture, noise and intensity statistics that say "this is not a radiograph
  of a chest".

A backbone without ``forward_intermediates`` gives the penultimate block alone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["PENULTIMATE", "backbone_of", "feature_layout", "forward_with_features"]

PENULTIMATE = "penultimate"


def backbone_of(net: nn.Module) -> nn.Module:
    """The timm backbone of a classifier (itself) or of a pediatric fusion model (``.backbone``)."""
    return net.backbone if hasattr(net, "image_embedding") else net  # type: ignore[return-value]


def _has_intermediates(backbone: nn.Module) -> bool:
    return callable(getattr(backbone, "forward_intermediates", None))


def forward_with_features(net: nn.Module, x: torch.Tensor, *, logits: bool = True
                          ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """One forward pass -> (logits or None, features ``(N, D)`` float32 in :func:`feature_layout` order).

    ``logits`` False (pediatric models, whose output needs the clinical variables) returns None.
    """
    bb = backbone_of(net)
    if _has_intermediates(bb):
        final, inter = bb.forward_intermediates(x)  # type: ignore[operator]
    else:
        final, inter = bb.forward_features(x), []  # type: ignore[operator]
    pre = bb.forward_head(final, pre_logits=True)  # type: ignore[operator]
    out = bb.forward_head(final).float() if logits else None  # type: ignore[operator]
    parts = [pre.float().flatten(1)]
    for t in inter:
        t = t.float()
        parts.append(t.mean(dim=(2, 3)))
        parts.append(t.std(dim=(2, 3), correction=0))
    return out, torch.cat(parts, dim=1)


@torch.inference_mode()
def feature_layout(net: nn.Module, size: int, in_chans: int = 1) -> list[dict[str, Any]]:
    """``[{"name", "start", "stop"}, ...]``: the blocks of the feature vector (one tiny forward pass)."""
    bb = backbone_of(net)
    was_training = net.training
    net.eval()
    try:
        x = torch.zeros(1, in_chans, size, size)
        if _has_intermediates(bb):
            final, inter = bb.forward_intermediates(x)  # type: ignore[operator]
        else:
            final, inter = bb.forward_features(x), []  # type: ignore[operator]
        dims = [(PENULTIMATE, int(bb.forward_head(final, pre_logits=True).flatten(1).shape[1]))]  # type: ignore[operator]
        for k, t in enumerate(inter, start=1):
            dims += [(f"stage{k}_mean", int(t.shape[1])), (f"stage{k}_std", int(t.shape[1]))]
    finally:
        net.train(was_training)
    out, start = [], 0
    for name, d in dims:
        out.append({"name": name, "start": start, "stop": start + d})
        start += d
    return out
