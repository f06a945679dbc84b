"""The pediatric fusion model: an image backbone + the clinical variables -> (Z-score, BMD).

The study's design: a CNN (ResNet-50) reads the chest radiograph and the
clinical variables (age, sex, height, weight) join it before the regression
head. Here any timm backbone gives a pooled image embedding; a small MLP
embeds the standardised clinical vector; a head on the concatenation
regresses the standardised Z-score and raw BMD. The low-BMD decision is taken
from the predicted Z (Z <= -2.0), never from a separate classifier.

Everything needed to rebuild and use the model (feature order, standardisation
constants, residual SD for the probability-like score, the fitted BMD
reference curve, ``z_from``: where the reported Z comes from, and ``z_spread``:
the tuning split's undoing of the shrinkage toward the mean) lives in
``ModelSpec.extra`` of the artifact, so ``screen`` needs nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import torch
from torch import nn

from bonescreen.errors import ModelArtifactError, TableError
from bonescreen.labels import PEDIATRIC_LOW_Z
from bonescreen.schema import PEDIATRIC_TASK

CLINICAL_FEATURES = ["age", "sex", "height_cm", "weight_kg"]
TARGETS = ["z", "bmd"]
PEDIATRIC_ELIGIBILITY = {"modalities": ["CR", "DX"], "views": ["PA", "AP"], "min_age": 0.0, "max_age": 17.99}
DEFAULT_HIDDEN = 64
MIN_RESIDUAL_SD = 0.1  # floor for the score's SD (a perfect tuning fit must not make the score a step)


class FusionRegressor(nn.Module):
    """Image backbone + clinical MLP -> standardised (Z, BMD)."""

    def __init__(
        self,
        arch: str,
        *,
        n_clinical: int = len(CLINICAL_FEATURES),
        hidden: int = DEFAULT_HIDDEN,
        in_chans: int = 1,
        pretrained: str | Path | bool | None = None,
        drop_rate: float = 0.0,
        drop_path_rate: float | None = None,
    ) -> None:
        super().__init__()
        from bonescreen.models import create_model

        # num_classes=0: timm returns the pooled embedding instead of logits
        self.backbone = create_model(
            arch, 0, in_chans=in_chans, pretrained=pretrained, drop_rate=drop_rate, drop_path_rate=drop_path_rate
        )
        # timm models carry num_features and forward_features; nn.Module types attributes as Tensor | Module
        n_img = int(cast(int, self.backbone.num_features))
        self.clinical = nn.Sequential(nn.Linear(n_clinical, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU())
        self.head = nn.Sequential(
            nn.Linear(n_img + hidden, hidden), nn.GELU(), nn.Dropout(drop_rate), nn.Linear(hidden, len(TARGETS))
        )
        self.n_clinical = n_clinical

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's last feature map (Grad-CAM finds its target layer through this)."""
        forward_features = cast(Callable[[torch.Tensor], torch.Tensor], self.backbone.forward_features)
        return forward_features(x)

    def image_embedding(self, x: torch.Tensor) -> torch.Tensor:
        embedding: torch.Tensor = self.backbone(x)
        return embedding

    def fuse(self, embedding: torch.Tensor, clinical: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(torch.cat([embedding, self.clinical(clinical)], dim=1))
        return out

    def forward(self, x: torch.Tensor, clinical: torch.Tensor | None = None) -> torch.Tensor:
        if clinical is None:
            raise ModelArtifactError(
                "a pediatric model needs the clinical variables (age, sex, height, weight); "
                "use bonescreen.pediatric.predict_pediatric instead of predict_proba",
                reason="needs_clinical",
            )
        if clinical.shape[-1] != self.n_clinical:
            raise ModelArtifactError(
                f"expected {self.n_clinical} clinical variables, got {clinical.shape[-1]}", reason="needs_clinical"
            )
        return self.fuse(self.image_embedding(x), clinical)


class FusionEnsemble(nn.Module):
    """The mean of K fusion models' standardised (Z, BMD): the cross-fitted members of ``pediatric train --folds K``.

    Why: with a few hundred children one network's ranking varies a lot with its
    seed and its tuning-selected epoch; the mean of K members trained on different
    folds varies less and correlates better with the DXA Z (measured in the README).
    It has the single model's interface, so prediction, screening, SHAP and the
    OOD check need no second path: ``image_embedding`` is the members' embeddings
    side by side and ``fuse`` the mean of each member's head on its own part (so
    SHAP of the mean is exact); ``backbone`` and ``forward_features`` are the first
    member's (the OOD features and Grad-CAM's layer: that member's share of the mean).
    """

    def __init__(self, members: Sequence[FusionRegressor]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ModelArtifactError(f"an ensemble needs at least 2 members, got {len(members)}")
        self.members = nn.ModuleList(members)
        self.n_clinical = members[0].n_clinical
        self.n_img = int(cast(int, members[0].backbone.num_features))

    @property
    def backbone(self) -> nn.Module:
        first = cast(FusionRegressor, self.members[0])
        return first.backbone

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return cast(FusionRegressor, self.members[0]).forward_features(x)

    def image_embedding(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([cast(FusionRegressor, m).image_embedding(x) for m in self.members], dim=1)

    def fuse(self, embedding: torch.Tensor, clinical: torch.Tensor) -> torch.Tensor:
        parts = torch.split(embedding, self.n_img, dim=1)
        outs = [cast(FusionRegressor, m).fuse(e, clinical) for m, e in zip(self.members, parts)]
        return torch.stack(outs).mean(dim=0)

    def forward(self, x: torch.Tensor, clinical: torch.Tensor | None = None) -> torch.Tensor:
        outs = [m(x, clinical) for m in self.members]
        return torch.stack(outs).mean(dim=0)


def build_from_spec(spec: Any) -> FusionRegressor | FusionEnsemble:
    """Rebuild the (untrained) fusion model, or ensemble of them (``extra["ensemble"]``), an artifact describes."""
    extra = spec.extra or {}
    if "clinical_mean" not in extra:
        raise ModelArtifactError("pediatric artifact lacks its clinical standardisation (spec.extra)")

    def one() -> FusionRegressor:
        return FusionRegressor(
            spec.arch,
            n_clinical=len(extra.get("clinical_features", CLINICAL_FEATURES)),
            hidden=int(extra.get("hidden", DEFAULT_HIDDEN)),
            in_chans=int(spec.in_chans),
        )

    ensemble = extra.get("ensemble")
    if not ensemble:
        return one()
    return FusionEnsemble([one() for _ in range(int(ensemble["members"]))])


# --- clinical vectors --------------------------------------------------------------------


def sex_code(value: object) -> float:
    """F -> 1, M -> 0, anything else NaN (the row is then refused, not guessed)."""
    s = str(value).strip().upper() if value is not None and not (isinstance(value, float) and math.isnan(value)) else ""
    return {"F": 1.0, "FEMALE": 1.0, "M": 0.0, "MALE": 0.0}.get(s, math.nan)


def clinical_matrix(frame: pd.DataFrame, features: Sequence[str] = CLINICAL_FEATURES) -> np.ndarray:
    """Raw clinical values ``(N, 4)`` (sex coded F=1, M=0); NaN where missing or unreadable."""
    missing = [c for c in features if c not in frame.columns]
    if missing:
        raise TableError(
            f"pediatric model needs the clinical column(s) {missing} (have {list(frame.columns)})",
            reason="missing_columns",
        )
    cols = []
    for c in features:
        if c == "sex":
            cols.append(np.array([sex_code(v) for v in frame[c]], dtype=float))
        else:
            cols.append(pd.to_numeric(frame[c], errors="coerce").to_numpy(dtype=float))
    return np.stack(cols, axis=1) if len(frame) else np.zeros((0, len(features)))


def missing_reason(row: np.ndarray, features: Sequence[str] = CLINICAL_FEATURES) -> str:
    """'' when the clinical row is complete, else 'missing_clinical:<names>'."""
    bad = [f for f, v in zip(features, row) if not np.isfinite(v)]
    return "" if not bad else "missing_clinical:" + "+".join(bad)


@dataclass
class Standardizer:
    """Training-set means and SDs of the clinical inputs and the targets."""

    clinical_mean: list[float]
    clinical_std: list[float]
    target_mean: list[float]
    target_std: list[float]

    @classmethod
    def fit(cls, clinical: np.ndarray, targets: np.ndarray) -> Standardizer:
        def stats(a: np.ndarray) -> tuple[list[float], list[float]]:
            m = np.nanmean(a, axis=0)
            s = np.nanstd(a, axis=0)
            s = np.where(~np.isfinite(s) | (s < 1e-6), 1.0, s)
            return [float(v) for v in np.nan_to_num(m)], [float(v) for v in s]

        cm, cs = stats(clinical)
        tm, ts = stats(targets)
        return cls(cm, cs, tm, ts)

    @classmethod
    def from_extra(cls, extra: dict[str, Any]) -> Standardizer:
        return cls(extra["clinical_mean"], extra["clinical_std"], extra["target_mean"], extra["target_std"])

    def clinical(self, raw: np.ndarray) -> np.ndarray:
        return ((np.asarray(raw, dtype=float) - self.clinical_mean) / self.clinical_std).astype(np.float32)

    def targets(self, raw: np.ndarray) -> np.ndarray:
        return ((np.asarray(raw, dtype=float) - self.target_mean) / self.target_std).astype(np.float32)

    def untarget(self, std: np.ndarray) -> np.ndarray:
        return np.asarray(std, dtype=float) * self.target_std + self.target_mean

    def to_extra(self) -> dict[str, Any]:
        return {
            "clinical_mean": self.clinical_mean,
            "clinical_std": self.clinical_std,
            "target_mean": self.target_mean,
            "target_std": self.target_std,
        }


# --- scores ------------------------------------------------------------------------------


def low_bmd_probability(z_pred: np.ndarray, residual_sd: float, threshold: float = PEDIATRIC_LOW_Z) -> np.ndarray:
    """P(Z <= threshold) if the true Z ~ Normal(predicted Z, residual SD of the tuning set).

    A monotone (decreasing) function of the predicted Z, so its AUC is the
    predicted Z's, and 0.5 falls exactly at ``predicted Z == threshold``:
    the study's rule (low BMD when the predicted Z <= -2.0) is the 0.5 cut-off.
    """
    from scipy.stats import norm

    sd = max(float(residual_sd), MIN_RESIDUAL_SD)
    prob: np.ndarray = norm.cdf((threshold - np.asarray(z_pred, dtype=float)) / sd)
    return prob


# --- where the predicted Z comes from -----------------------------------------------------

Z_SOURCES = ("head", "reference", "mean")


def reference_of(extra: dict[str, Any]) -> Any:
    """The artifact's fitted BMD reference (``ReferenceCurves``), or None (older artifacts)."""
    from bonescreen.pediatric.reference import ReferenceCurves

    ref = (extra or {}).get("z_reference")
    return ReferenceCurves.from_dict(ref) if ref else None


def z_source(extra: dict[str, Any]) -> str:
    """``extra["z_from"]``; "head" when absent (artifacts written before the reference existed)."""
    src = str((extra or {}).get("z_from", "head"))
    if src not in Z_SOURCES:
        raise ModelArtifactError(f"unknown z_from {src!r} in the artifact (expected one of {Z_SOURCES})")
    if src != "head" and not (extra or {}).get("z_reference"):
        raise ModelArtifactError(f"z_from {src!r} needs a fitted reference curve (spec.extra['z_reference'])")
    return src


def _age_sex(clinical_raw: np.ndarray, extra: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    feats = list((extra or {}).get("clinical_features", CLINICAL_FEATURES))
    c = np.asarray(clinical_raw, dtype=float).reshape(-1, len(feats))
    return c[:, feats.index("age")], c[:, feats.index("sex")]


def combine_z(
    z_head: np.ndarray, bmd_pred: np.ndarray, clinical_raw: np.ndarray, extra: dict[str, Any],
    z_from: str | None = None, *, reference: Any = None,
) -> np.ndarray:
    """The predicted Z the model reports.

    ``head``: the network's Z output. ``reference``: the predicted BMD
    converted as a DXA scanner would, ``(T(BMD) - mu(age, sex)) / sigma(age, sex)``
    with the reference fitted on the training DXA table. ``mean``: their average.
    """
    src = z_from or z_source(extra)
    z_head = np.asarray(z_head, dtype=float)
    if src == "head":
        return z_head
    ref = reference if reference is not None else reference_of(extra)
    if ref is None:
        raise ModelArtifactError(f"z_from {src!r} needs a fitted reference curve")
    age, sex = _age_sex(clinical_raw, extra)
    z_ref = ref.z(np.asarray(bmd_pred, dtype=float), age, sex)
    z: np.ndarray = z_ref if src == "reference" else 0.5 * (z_head + z_ref)
    return z


# --- spread: undo the shrinkage toward the mean ---------------------------------------------

Z_SPREADS = ("match", "none")
MIN_SPREAD_PAIRS = 10
SPREAD_LIMITS = (0.5, 4.0)  # the stretch b is clipped here (a wild b means the tuning split cannot say)


def fit_spread(z_true: np.ndarray, z_pred: np.ndarray, n_boot: int = 0) -> dict[str, Any] | None:
    """``z' = a + b z`` with the tuning split's mean and SD of the DXA Z (moment matching), or None.

    Why: any least-squares (or least-absolute) predictor of Z is shrunk toward
    the mean by its correlation r (SD of the prediction ~ r x SD of Z, and an
    average of two predictions shrinks further), so with r ~ 0.7 far fewer
    children are predicted <= -2.0 than have it. Matching the first two moments
    on held-out pairs restores the spread (and the count below the cut-off)
    while leaving the ranking (r, AUC) untouched; MAE grows a little, the price
    of an unbiased decision threshold. None (no stretch) when there are fewer
    than ``MIN_SPREAD_PAIRS`` pairs or the prediction does not correlate
    positively with the DXA Z (stretching noise helps nobody). ``n_boot`` > 0 adds
    ``b_ci95``, the bootstrap range of the stretch (:func:`spread_interval`).
    """
    t, p = np.asarray(z_true, dtype=float), np.asarray(z_pred, dtype=float)
    ok = np.isfinite(t) & np.isfinite(p)
    t, p = t[ok], p[ok]
    if len(t) < MIN_SPREAD_PAIRS or np.std(p) < 1e-6 or np.std(t) < 1e-6:
        return None
    r = float(np.corrcoef(t, p)[0, 1])
    if not r > 0.05:
        return None
    b = float(np.clip(np.std(t, ddof=1) / np.std(p, ddof=1), *SPREAD_LIMITS))
    a = float(np.mean(t) - b * np.mean(p))
    out: dict[str, Any] = {"method": "moment_match", "a": a, "b": b, "n": int(len(t)), "r": r,
                           "sd_true": float(np.std(t, ddof=1)), "sd_pred": float(np.std(p, ddof=1))}
    if n_boot:
        out["b_ci95"] = spread_interval(t, p, n_boot)
    return out


SPREAD_TOLERANCE = 0.2  # the SD promise: predicted SD within 20 % of the DXA Z's


def spread_interval(t: np.ndarray, p: np.ndarray, n_boot: int = 400, seed: int = 0) -> list[float]:
    """Bootstrap 95 % percentile range of the stretch ``b = SD(t) / SD(p)`` (pairs resampled).

    Why: ``b`` is a ratio of two SDs, so its sampling error on a small tuning split is
    large (about +-25 % at 30 pairs); the range says how far the reported Z's spread can be
    trusted, and training warns when it is wider than the +-20 % the user is promised.
    """
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(t), size=(n_boot, len(t)))
    sd_t, sd_p = np.std(t[idx], axis=1, ddof=1), np.std(p[idx], axis=1, ddof=1)
    ratio = sd_t[sd_p > 1e-9] / sd_p[sd_p > 1e-9]
    lo, hi = np.percentile(ratio, [2.5, 97.5]) if len(ratio) else (np.nan, np.nan)
    return [float(lo), float(hi)]


def spread_z(z: np.ndarray, extra: dict[str, Any]) -> np.ndarray:
    """Apply the artifact's spread calibration (``extra["z_spread"]``); identity when absent."""
    sp = (extra or {}).get("z_spread")
    z = np.asarray(z, dtype=float)
    return z if not sp else float(sp["a"]) + float(sp["b"]) * z


@torch.inference_mode()
def predict_outputs(
    model: FusionRegressor | FusionEnsemble,
    images: np.ndarray,
    clinical_raw: np.ndarray,
    extra: dict[str, Any],
    *,
    mean: float,
    std: float,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """The network's own (Z head, BMD head) for uint8 images ``(N, H, W)`` and raw clinical rows ``(N, 4)``."""
    from bonescreen.data import normalize

    st = Standardizer.from_extra(extra)
    device = torch.device(device)
    model = model.to(device).eval()
    outs = []
    for start in range(0, len(images), batch_size):
        x = normalize(np.ascontiguousarray(images[start : start + batch_size]), mean, std).to(device)
        c = torch.from_numpy(st.clinical(clinical_raw[start : start + batch_size])).to(device)
        outs.append(model(x, c).float().cpu().numpy())
    pred = st.untarget(np.concatenate(outs)) if outs else np.zeros((0, len(TARGETS)))
    return pred[:, 0], pred[:, 1]


def predict_arrays(
    model: FusionRegressor | FusionEnsemble,
    images: np.ndarray,
    clinical_raw: np.ndarray,
    extra: dict[str, Any],
    *,
    mean: float,
    std: float,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """(predicted Z as the artifact reports it (``extra["z_from"]``, then ``extra["z_spread"]``), predicted BMD)."""
    z_head, bmd = predict_outputs(
        model, images, clinical_raw, extra, mean=mean, std=std, batch_size=batch_size, device=device
    )
    return spread_z(combine_z(z_head, bmd, clinical_raw, extra), extra), bmd


PREDICT_COLUMNS = ["pred_z", "pred_bmd", "prob_low_bmd", "low_bmd", "reason"]


def predict_pediatric(
    loaded: Any, images_uint8: np.ndarray, clinical: pd.DataFrame, *, device: str = "cpu"
) -> pd.DataFrame:
    """What ``screen`` calls for a pediatric artifact: one row per image, in input order.

    ``images_uint8``: preprocessed ``(N, size, size)`` uint8 (the artifact's
    preprocessing); ``clinical``: N rows with ``age`` (years), ``sex`` (F/M),
    ``height_cm``, ``weight_kg``. Rows with a missing or unreadable clinical
    value get NaN predictions and ``reason = missing_clinical:<names>``
    instead of failing the batch. ``low_bmd`` is the study's decision:
    predicted Z <= -2.0.
    """
    if getattr(loaded, "spec", None) is None or loaded.spec.task != PEDIATRIC_TASK:
        raise ModelArtifactError("predict_pediatric needs a pediatric model artifact")
    images = np.asarray(images_uint8)
    if images.ndim == 2:
        images = images[None]
    if len(images) != len(clinical):
        raise TableError(f"{len(images)} images but {len(clinical)} clinical rows", reason="bad_table")
    raw = clinical_matrix(clinical.reset_index(drop=True), loaded.spec.extra.get("clinical_features", CLINICAL_FEATURES))
    reasons = [missing_reason(r) for r in raw]
    ok = np.array([r == "" for r in reasons], dtype=bool)
    out = pd.DataFrame(
        {
            "pred_z": np.full(len(images), np.nan),
            "pred_bmd": np.full(len(images), np.nan),
            "prob_low_bmd": np.full(len(images), np.nan),
            "low_bmd": pd.array([pd.NA] * len(images), dtype="boolean"),
            "reason": reasons,
        }
    )
    if ok.any():
        res = loaded.predict_pediatric(images[ok], raw[ok], device=device)
        out.loc[ok, "pred_z"] = res["z"]
        out.loc[ok, "pred_bmd"] = res["bmd"]
        out.loc[ok, "prob_low_bmd"] = res["prob_low_bmd"]
        # unrounded, so it agrees with prob_low_bmd >= 0.5
        out.loc[ok, "low_bmd"] = res["z"] <= float(loaded.spec.extra.get("z_threshold", PEDIATRIC_LOW_Z))
    return out[PREDICT_COLUMNS]
