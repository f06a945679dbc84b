"""Label-free test-time adaptation of the network to a site's images (never of the stored weights).

Two methods, each fitted on the site's own unlabelled, eligible images and kept as plain numbers
in a site profile; :func:`adapted_model` builds a *copy* of the network with them applied.

``batchnorm`` (AdaBN, Li et al. 2016): re-estimate every BatchNorm layer's running mean and
variance on the site's images, so each layer sees its inputs centred and scaled as it did in
training. Only models with BatchNorm (EfficientNet, ResNet: the ``cpu-tiny`` and pediatric
backbones); ConvNeXt normalises each image with LayerNorm and has no running statistics.

``feature_align`` (diagonal CORAL, Sun, Feng & Saenko 2016): re-centre and re-scale each
penultimate feature (the input of the classifier head) from the site's mean and SD to the
development data's, ``f' = (f - mu_site) / sd_site * sd_dev + mu_dev``. Works for any timm
backbone (ConvNeXt included) but needs the development data's feature statistics: from the
artifact (``spec.extra["feature_stats"]``, or an ``ood`` entry holding ``mean``/``std``) or
computed from reference images of the development site.

Why by hand: these are a few lines over timm's ``forward_features`` / ``forward_head`` hooks,
and the test-time-adaptation libraries (e.g. TENT's reference code) update weights by gradient,
which a screening tool must not do silently.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from bonescreen.adapt.recalibrate import CalibrationError

ADAPTATIONS = ("none", "batchnorm", "feature_align")
BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


def batchnorm_layers(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, BN_TYPES) and m.track_running_stats and m.running_mean is not None}


def has_batchnorm(model: nn.Module) -> bool:
    return bool(batchnorm_layers(model))


def _batches(loaded: Any, images: np.ndarray, batch_size: int) -> Any:
    for start in range(0, len(images), batch_size):
        yield loaded.to_tensor(np.asarray(images[start:start + batch_size]))


def fit_batchnorm(loaded: Any, images: np.ndarray, *, batch_size: int = 32) -> dict[str, Any]:
    """AdaBN: running statistics of every BatchNorm layer re-estimated on ``images`` (uint8 N×S×S).

    A copy of the network is put in train mode for its BatchNorm layers only (dropout and drop-path
    stay off), with cumulative averaging (``momentum=None``), and run once over the images. Returns
    ``{"method": "batchnorm", "layers": {name: {"mean": [...], "var": [...]}}, "n_images": N, ...}``.
    """
    model = copy.deepcopy(loaded.model).eval()
    layers = batchnorm_layers(model)
    if not layers:
        raise CalibrationError(f"{loaded.spec.arch} has no BatchNorm layers: use --method feature_align")
    if len(images) < 16:
        raise CalibrationError(f"batchnorm adaptation needs at least 16 images, got {len(images)}")
    before = {n: (m.running_mean.clone(), m.running_var.clone()) for n, m in layers.items()}
    for m in layers.values():
        m.reset_running_stats()
        m.momentum = None
        m.train()
    with torch.no_grad():
        for x in _batches(loaded, images, batch_size):
            if len(x) > 1:  # a batch of one has no variance
                model(x)
    out: dict[str, Any] = {}
    shift = []
    for n, m in layers.items():
        mu0, var0 = before[n]
        out[n] = {"mean": m.running_mean.double().tolist(), "var": m.running_var.double().tolist()}
        shift.append(((m.running_mean - mu0).abs() / var0.clamp_min(1e-8).sqrt()).mean().item())
    return {"method": "batchnorm", "layers": out, "n_images": int(len(images)), "n_layers": len(out),
            "mean_shift_sd": float(np.mean(shift)), "max_layer_shift_sd": float(np.max(shift))}


def penultimate(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The classifier head's input (timm: ``forward_head(forward_features(x), pre_logits=True)``)."""
    return model.forward_head(model.forward_features(x), pre_logits=True)  # type: ignore[operator]


@torch.inference_mode()
def feature_statistics(loaded: Any, images: np.ndarray, *, batch_size: int = 32) -> dict[str, Any]:
    """Per-feature mean and SD of the penultimate features of ``images`` (for ``feature_align``)."""
    model = loaded.model.eval()
    feats = [penultimate(model, x).double() for x in _batches(loaded, images, batch_size)]
    if not feats:
        raise CalibrationError("no images to compute feature statistics from")
    f = torch.cat(feats)
    if len(f) < 2:
        raise CalibrationError("feature statistics need at least 2 images")
    return {"mean": f.mean(0).tolist(), "std": f.std(0).tolist(), "n": int(len(f))}


def source_feature_stats(spec: Any) -> dict[str, Any] | None:
    """The development data's feature statistics stored in an artifact, if any."""
    for holder in ((getattr(spec, "extra", None) or {}).get("feature_stats"), getattr(spec, "ood", None)):
        if isinstance(holder, Mapping) and "mean" in holder and "std" in holder:
            return {"mean": list(holder["mean"]), "std": list(holder["std"]), "n": holder.get("n")}
    return None


def fit_feature_align(loaded: Any, images: np.ndarray, source: Mapping[str, Any], *, batch_size: int = 32,
                      min_std: float = 1e-4) -> dict[str, Any]:
    """Diagonal CORAL from the development data's feature statistics to ``images``'."""
    target = feature_statistics(loaded, images, batch_size=batch_size)
    d = len(target["mean"])
    if len(source["mean"]) != d or len(source["std"]) != d:
        raise CalibrationError(f"source feature statistics have {len(source['mean'])} features, the model {d}")
    mu_s, sd_s = np.asarray(source["mean"], float), np.asarray(source["std"], float)
    mu_t, sd_t = np.asarray(target["mean"], float), np.asarray(target["std"], float)
    pooled = np.sqrt((sd_s ** 2 + sd_t ** 2) / 2.0)
    shift = np.abs(mu_t - mu_s) / np.maximum(pooled, min_std)
    return {"method": "feature_align", "source_mean": mu_s.tolist(), "source_std": sd_s.tolist(),
            "target_mean": mu_t.tolist(), "target_std": sd_t.tolist(), "n_images": target["n"],
            "n_source": source.get("n"), "min_std": float(min_std), "n_features": d,
            "mean_shift_sd": float(shift.mean()), "max_shift_sd": float(shift.max())}


class FeatureAligned(nn.Module):
    """A network whose penultimate features are re-centred/re-scaled before the classifier head."""

    def __init__(self, model: nn.Module, params: Mapping[str, Any]) -> None:
        super().__init__()
        self.model = model
        eps = float(params.get("min_std", 1e-4))

        def t(key: str) -> torch.Tensor:
            return torch.tensor(params[key], dtype=torch.float32)

        self.register_buffer("mu_t", t("target_mean"))
        self.register_buffer("mu_s", t("source_mean"))
        self.register_buffer("scale", t("source_std").clamp_min(eps) / t("target_std").clamp_min(eps))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)  # type: ignore[operator]

    def forward_intermediates(self, x: torch.Tensor, **kwargs: Any) -> Any:
        """The wrapped backbone's stages (bonescreen.features reads them for the OOD check)."""
        return self.model.forward_intermediates(x, **kwargs)  # type: ignore[operator]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        f = self.model.forward_head(x, pre_logits=True)  # type: ignore[operator]
        f = (f - self.mu_t) * self.scale + self.mu_s
        return f if pre_logits else self.model.get_classifier()(f)  # type: ignore[operator]

    def get_classifier(self) -> nn.Module:
        return self.model.get_classifier()  # type: ignore[operator]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def adapted_module(model: nn.Module, adaptation: Mapping[str, Any] | None) -> nn.Module:
    """A copy of ``model`` with ``adaptation`` applied (``model`` itself when there is none)."""
    method = (adaptation or {}).get("method", "none")
    if method == "none":
        return model
    if method not in ADAPTATIONS:
        raise CalibrationError(f"unknown adaptation {method!r}; expected one of {ADAPTATIONS}")
    new = copy.deepcopy(model).eval()
    if method == "batchnorm":
        layers = batchnorm_layers(new)
        stored = adaptation["layers"]  # type: ignore[index]
        if set(stored) != set(layers):
            raise CalibrationError("the profile's BatchNorm statistics do not match this network's layers")
        with torch.no_grad():
            for n, m in layers.items():
                mean = torch.tensor(stored[n]["mean"], dtype=m.running_mean.dtype)
                var = torch.tensor(stored[n]["var"], dtype=m.running_var.dtype)
                if mean.shape != m.running_mean.shape or var.shape != m.running_var.shape:
                    raise CalibrationError(f"BatchNorm statistics for {n} have the wrong size")
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
        return new
    return FeatureAligned(new, adaptation).eval()  # type: ignore[arg-type]


def adapted_model(loaded: Any, adaptation: Mapping[str, Any] | None) -> Any:
    """A LoadedModel running the adapted copy (the same object when there is no adaptation)."""
    from bonescreen.artifact import LoadedModel

    if not adaptation or adaptation.get("method", "none") == "none":
        return loaded
    return LoadedModel(adapted_module(loaded.model, adaptation), loaded.spec, loaded.path)


def summarise_adaptation(adaptation: Mapping[str, Any] | None) -> dict[str, Any]:
    """The adaptation without its per-layer/per-feature numbers (for printing and reports)."""
    if not adaptation:
        return {"method": "none"}
    return {k: v for k, v in adaptation.items() if not isinstance(v, (list, dict))}
