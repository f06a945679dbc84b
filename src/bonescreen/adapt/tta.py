"""Label-free test-time adaptation of the network to a site's images (never of the stored weights).

Three methods (and one combination), each fitted on the site's own unlabelled, eligible images and kept as plain numbers
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

``intensity`` (histogram standardisation, after Nyúl & Udupa 1999): a site's vendor chain (its
detector response curve, LUT, processing, dose) moves where the same anatomy lands on the grey
scale. One monotone look-up table per site maps the site's pooled grey-level distribution onto the
development site's (quantile matching of the preprocessed 0..255 images, pooled over all the
site's images so one patient's anatomy does not drive it); the network then reads the site's
images on the grey scale it was trained on. It needs the development site's pooled histogram: from
the home profile (``calibrate --adapt intensity|intensity_batchnorm`` at the development site
stores it) or from ``--reference`` images. Works for any network (ConvNeXt included).
``intensity_batchnorm``: the table first, then BatchNorm re-estimated on the mapped images.

Why by hand: these are a few lines over timm's ``forward_features`` / ``forward_head`` hooks,
and the test-time-adaptation libraries (e.g. TENT's reference code) update weights by gradient,
which a screening tool must not do silently.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from bonescreen.adapt.recalibrate import CalibrationError

ADAPTATIONS = ("none", "batchnorm", "feature_align", "intensity", "intensity_batchnorm")
#: adaptations that map the grey scale first (they need the development site's histogram)
INTENSITY_METHODS = ("intensity", "intensity_batchnorm")
LEVELS = 256
BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


def batchnorm_layers(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, BN_TYPES) and m.track_running_stats and m.running_mean is not None}


def _running_stats(m: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's running mean and variance (:func:`batchnorm_layers` keeps only layers that track them)."""
    assert m.running_mean is not None and m.running_var is not None
    return m.running_mean, m.running_var


def has_batchnorm(model: nn.Module) -> bool:
    return bool(batchnorm_layers(model))


def _batches(loaded: Any, images: np.ndarray, batch_size: int, lut: np.ndarray | None = None) -> Any:
    for start in range(0, len(images), batch_size):
        chunk = np.asarray(images[start:start + batch_size])
        # the table's float output goes to the network as it does at screening (IntensityMapped)
        yield loaded.to_tensor(chunk if lut is None else lut[chunk])


def intensity_histogram(images: np.ndarray) -> list[float]:
    """Pooled grey-level distribution (256 bins, sums to 1) of preprocessed uint8 images."""
    arr = np.asarray(images)
    if arr.dtype != np.uint8 or arr.size == 0:
        raise CalibrationError("intensity statistics need preprocessed uint8 images")
    h = np.bincount(arr.reshape(-1), minlength=LEVELS).astype(np.float64)
    hist: list[float] = (h / h.sum()).tolist()
    return hist


def _mid_cdf(hist: np.ndarray) -> np.ndarray:
    """The CDF at each level's mid-mass (so a level's pixels map to the middle of their quantile band)."""
    return np.cumsum(hist) - hist / 2.0


def matching_lut(site_hist: Any, reference_hist: Any) -> np.ndarray:
    """Monotone table level -> float level (0..255) taking ``site_hist``'s quantiles to ``reference_hist``'s."""
    site = np.asarray(site_hist, dtype=np.float64)
    ref = np.asarray(reference_hist, dtype=np.float64)
    if site.shape != (LEVELS,) or ref.shape != (LEVELS,) or ref.sum() <= 0 or site.sum() <= 0:
        raise CalibrationError(f"intensity histograms must have {LEVELS} non-negative bins")
    site, ref = site / site.sum(), ref / ref.sum()
    keep = ref > 0  # interpolate over the reference's occupied levels (its CDF is flat elsewhere)
    lut = np.interp(_mid_cdf(site), _mid_cdf(ref)[keep], np.arange(LEVELS, dtype=np.float64)[keep])
    return np.maximum.accumulate(np.clip(lut, 0.0, LEVELS - 1.0))


def fit_intensity(loaded: Any, images: np.ndarray, reference_hist: Any, *, batch_size: int = 32,
                  batchnorm: bool = False) -> dict[str, Any]:
    """Histogram standardisation of ``images`` to the development site's (+ BatchNorm when asked)."""
    if len(images) < 16:
        raise CalibrationError(f"intensity adaptation needs at least 16 images, got {len(images)}")
    site_hist = intensity_histogram(images)
    lut = matching_lut(site_hist, reference_hist)
    pre = loaded.spec.preprocess
    out: dict[str, Any] = {
        "method": "intensity_batchnorm" if batchnorm else "intensity", "lut": lut.tolist(),
        "reference_histogram": [float(v) for v in reference_hist], "site_histogram": site_hist,
        "mean": float(pre["mean"]), "std": float(pre["std"]), "n_images": int(len(images)),
        # per pixel of the site (levels it does not use do not count)
        "mean_level_shift": float(np.dot(site_hist, np.abs(lut - np.arange(LEVELS)))),
        "max_level_shift": float(np.abs(lut - np.arange(LEVELS))[np.asarray(site_hist) > 0].max()),
    }
    if batchnorm:
        bn = fit_batchnorm(loaded, images, batch_size=batch_size, lut=lut)
        out.update({k: v for k, v in bn.items() if k not in ("method", "n_images")})
    return out


def fit_batchnorm(loaded: Any, images: np.ndarray, *, batch_size: int = 32,
                  lut: np.ndarray | None = None) -> dict[str, Any]:
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
    before: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for n, m in layers.items():
        mean, var = _running_stats(m)
        before[n] = (mean.clone(), var.clone())
    for m in layers.values():
        m.reset_running_stats()
        m.momentum = None
        m.train()
    with torch.no_grad():
        for x in _batches(loaded, images, batch_size, lut):
            if len(x) > 1:  # a batch of one has no variance
                model(x)
    out: dict[str, Any] = {}
    shift = []
    for n, m in layers.items():
        mu0, var0 = before[n]
        mean, var = _running_stats(m)
        out[n] = {"mean": mean.double().tolist(), "var": var.double().tolist()}
        shift.append(((mean - mu0).abs() / var0.clamp_min(1e-8).sqrt()).mean().item())
    return {"method": "batchnorm", "layers": out, "n_images": int(len(images)), "n_layers": len(out),
            "mean_shift_sd": float(np.mean(shift)), "max_layer_shift_sd": float(np.max(shift))}


#: what ``calibrate --adapt`` may fit on the calibrating site's own images
HOME_ADAPTATIONS = ("batchnorm", "intensity", "intensity_batchnorm")


def fit_home_adaptation(loaded: Any, images: np.ndarray, method: str, *, batch_size: int = 32) -> dict[str, Any]:
    """The adaptation a *home* profile is calibrated with, fitted on the development site's images.

    ``intensity*``: the reference histogram is these images' own, so the table is (nearly) the
    identity here; what the profile keeps is that histogram, which ``adapt --home`` matches a new
    site to.
    """
    if method not in HOME_ADAPTATIONS:
        raise CalibrationError(f"--adapt must be one of {HOME_ADAPTATIONS}, got {method!r}")
    if method == "batchnorm":
        return fit_batchnorm(loaded, images, batch_size=batch_size)
    return fit_intensity(loaded, images, intensity_histogram(images), batch_size=batch_size,
                         batchnorm=method == "intensity_batchnorm")


def penultimate(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The classifier head's input (timm: ``forward_head(forward_features(x), pre_logits=True)``)."""
    f: torch.Tensor = model.forward_head(model.forward_features(x), pre_logits=True)  # type: ignore[operator]
    return f


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
        features: torch.Tensor = self.model.forward_features(x)  # type: ignore[operator]
        return features

    def forward_intermediates(self, x: torch.Tensor, **kwargs: Any) -> Any:
        """The wrapped backbone's stages (bonescreen.features reads them for the OOD check)."""
        return self.model.forward_intermediates(x, **kwargs)  # type: ignore[operator]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        f = self.model.forward_head(x, pre_logits=True)  # type: ignore[operator]
        f = (f - self.mu_t) * self.scale + self.mu_s
        out: torch.Tensor = f if pre_logits else self.model.get_classifier()(f)  # type: ignore[operator]
        return out

    def get_classifier(self) -> nn.Module:
        classifier: nn.Module = self.model.get_classifier()  # type: ignore[operator]
        return classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class IntensityMapped(nn.Module):
    """A network that reads its (normalised) input through a site's grey-level table first.

    The table is indexed by the preprocessed 0..255 level, recovered from the normalised tensor
    (``x * std + mean`` times 255, rounded): the engine and every torch backend keep passing what
    they pass today. The backbone's other entry points (features, stages, head) stay reachable for
    the OOD check and Grad-CAM.
    """

    def __init__(self, model: nn.Module, params: Mapping[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.mean = float(params["mean"])
        self.std = float(params["std"])
        lut = torch.tensor(params["lut"], dtype=torch.float32)
        if lut.shape != (LEVELS,):
            raise CalibrationError(f"the profile's intensity table must have {LEVELS} entries")
        self.register_buffer("lut", (lut / 255.0 - self.mean) / self.std)

    def remap(self, x: torch.Tensor) -> torch.Tensor:
        level = ((x.float() * self.std + self.mean) * 255.0).round().clamp(0, LEVELS - 1).long()
        lut = cast(torch.Tensor, self.lut)  # a buffer registered in __init__
        return lut.to(x.device)[level].to(x.dtype)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        features: torch.Tensor = self.model.forward_features(self.remap(x))  # type: ignore[operator]
        return features

    def forward_intermediates(self, x: torch.Tensor, **kwargs: Any) -> Any:
        return self.model.forward_intermediates(self.remap(x), **kwargs)  # type: ignore[operator]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        out: torch.Tensor = self.model.forward_head(x, pre_logits=pre_logits)  # type: ignore[operator]
        return out

    def get_classifier(self) -> nn.Module:
        classifier: nn.Module = self.model.get_classifier()  # type: ignore[operator]
        return classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.remap(x))  # type: ignore[no-any-return]


def _load_batchnorm(new: nn.Module, stored: Mapping[str, Any]) -> None:
    layers = batchnorm_layers(new)
    if set(stored) != set(layers):
        raise CalibrationError("the profile's BatchNorm statistics do not match this network's layers")
    with torch.no_grad():
        for n, m in layers.items():
            running_mean, running_var = _running_stats(m)
            mean = torch.tensor(stored[n]["mean"], dtype=running_mean.dtype)
            var = torch.tensor(stored[n]["var"], dtype=running_var.dtype)
            if mean.shape != running_mean.shape or var.shape != running_var.shape:
                raise CalibrationError(f"BatchNorm statistics for {n} have the wrong size")
            running_mean.copy_(mean)
            running_var.copy_(var)


def adapted_module(model: nn.Module, adaptation: Mapping[str, Any] | None) -> nn.Module:
    """A copy of ``model`` with ``adaptation`` applied (``model`` itself when there is none)."""
    method = (adaptation or {}).get("method", "none")
    if method == "none":
        return model
    if method not in ADAPTATIONS:
        raise CalibrationError(f"unknown adaptation {method!r}; expected one of {ADAPTATIONS}")
    assert adaptation is not None
    new = copy.deepcopy(model).eval()
    if method in INTENSITY_METHODS:
        if method == "intensity_batchnorm":
            _load_batchnorm(new, adaptation["layers"])
        return IntensityMapped(new, adaptation).eval()
    if method == "batchnorm":
        _load_batchnorm(new, adaptation["layers"])
        return new
    return FeatureAligned(new, adaptation).eval()


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
