"""Why the pediatric model said what it said: SHAP for the clinical variables, Grad-CAM for the image.

* SHAP: the predicted Z-score (as the artifact reports it: Z head, BMD through
  the reference curve, or their mean; ``spec.extra["z_from"]``) is explained in
  terms of age, sex, height and weight **with the image embedding held fixed**
  (the patient's own image).
  With four features, ``shap``'s exact explainer enumerates all 16
  coalitions against an interventional background (training-set clinical
  rows), so the values add up exactly: base + sum(SHAP) = predicted Z.
* Grad-CAM (pytorch-grad-cam) on the image branch, with the target "lower
  predicted Z": red regions are those that pushed the prediction towards
  low BMD, given the patient's clinical variables.
* ``patient_figure`` draws the study's per-patient output: the radiograph with
  Grad-CAM, the SHAP bar chart, and predicted BMD / Z-score beside the DXA
  reference.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from bonescreen.errors import BonescreenError
from bonescreen.gradcam import ExplainableModel, ExplainError, find_target_layer, overlay
from bonescreen.labels import PEDIATRIC_LOW_Z
from bonescreen.schema import PEDIATRIC_TASK
from bonescreen.pediatric.model import (
    CLINICAL_FEATURES,
    Standardizer,
    combine_z,
    reference_of,
    spread_z,
    z_source,
)

log = logging.getLogger(__name__)

FEATURE_LABELS = {"age": "age", "sex": "sex", "height_cm": "height", "weight_kg": "weight"}


class PediatricExplainError(BonescreenError):
    reason = "explain_failed"


@dataclass
class ClinicalShap:
    """SHAP values (N, 4) of the predicted Z per clinical feature; base + sum = prediction."""

    values: np.ndarray
    base: np.ndarray
    prediction: np.ndarray
    features: list[str]

    def frame(self) -> pd.DataFrame:
        out = pd.DataFrame(self.values, columns=[f"shap_{f}" for f in self.features])
        out["shap_base"] = self.base
        out["pred_z"] = self.prediction
        return out


def _embeddings(loaded: Any, images: np.ndarray) -> np.ndarray:
    import torch

    x = loaded.to_tensor(np.asarray(images))
    model = loaded.model
    device = next(model.parameters()).device
    with torch.inference_mode():
        embedding: np.ndarray = model.image_embedding(x.to(device)).float().cpu().numpy()
        return embedding


def clinical_shap(
    loaded: Any, images: np.ndarray, clinical_raw: np.ndarray, background_raw: np.ndarray, *, max_background: int = 100
) -> ClinicalShap:
    """Exact SHAP values of the predicted Z w.r.t. the clinical variables, the image held fixed."""
    import shap
    import torch

    extra = loaded.spec.extra
    st = Standardizer.from_extra(extra)
    feats = list(extra.get("clinical_features", CLINICAL_FEATURES))
    bg = np.asarray(background_raw, dtype=float)
    bg = bg[np.isfinite(bg).all(axis=1)]
    if len(bg) == 0:
        raise PediatricExplainError("SHAP needs at least one complete background clinical row")
    if len(bg) > max_background:
        bg = bg[np.random.default_rng(0).choice(len(bg), max_background, replace=False)]
    emb = _embeddings(loaded, images)
    reference = reference_of(extra)
    model = loaded.model
    device = next(model.parameters()).device
    values, base, pred = [], [], []
    for e, c in zip(emb, np.asarray(clinical_raw, dtype=float)):
        e_t = torch.from_numpy(e)[None].to(device)

        def f(X: np.ndarray, e_t: torch.Tensor = e_t) -> np.ndarray:
            with torch.inference_mode():
                cl = torch.from_numpy(st.clinical(X)).to(device)
                out = model.fuse(e_t.expand(len(X), -1), cl).float().cpu().numpy()
            raw = st.untarget(out)
            return spread_z(combine_z(raw[:, 0], raw[:, 1], X, extra, reference=reference), extra)

        explainer = shap.explainers.Exact(f, shap.maskers.Independent(bg, max_samples=len(bg)))
        r = explainer(c[None])
        values.append(np.asarray(r.values[0], dtype=float))
        base.append(float(np.ravel(r.base_values)[0]))
        pred.append(float(f(c[None])[0]))
    return ClinicalShap(np.array(values).reshape(-1, len(feats)), np.array(base), np.array(pred), feats)


class _WithClinical(nn.Module):
    """An image-only module for pytorch-grad-cam: the fusion model with fixed clinical rows."""

    def __init__(self, model: nn.Module, clinical: torch.Tensor) -> None:
        super().__init__()
        self.inner = model
        self.clinical = clinical

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.inner(x, self.clinical)
        return out


def _lower_z_target(extra: dict[str, Any], st: Standardizer, clinical_row: np.ndarray) -> Any:
    """Grad-CAM target for one image: minus the reported Z, written in torch from the standardised outputs.

    The spread calibration (``z_spread``: a + b z with b > 0) is left out: it
    scales every gradient by the same positive b, and Grad-CAM maps are
    normalised, so the map is the same.
    """
    src = z_source(extra)
    zm, zs = float(st.target_mean[0]), float(st.target_std[0])
    bm, bs = float(st.target_mean[1]), float(st.target_std[1])
    mu = sd = 0.0
    is_log = False
    if src != "head":
        feats = list(extra.get("clinical_features", CLINICAL_FEATURES))
        row = np.asarray(clinical_row, dtype=float).reshape(1, -1)
        m, s_, lg = reference_of(extra).mu_sigma(row[:, feats.index("age")], row[:, feats.index("sex")])
        mu, sd, is_log = float(m[0]), float(s_[0]), bool(lg[0])

    def target(out: torch.Tensor) -> torch.Tensor:
        z_head = out[0] * zs + zm
        if src == "head":
            return -z_head
        from bonescreen.pediatric.reference import MIN_BMD

        bmd = out[1] * bs + bm
        y = torch.log(bmd.clamp_min(MIN_BMD)) if is_log else bmd
        z_ref = (y - mu) / sd
        return -(z_ref if src == "reference" else 0.5 * (z_head + z_ref))

    return target


def gradcam_low_bmd(loaded: Any, images: np.ndarray, clinical_raw: np.ndarray) -> np.ndarray:
    """Grad-CAM maps in [0, 1], ``(N, H, W)``, for "lower predicted Z" on the image branch."""
    import torch
    from pytorch_grad_cam import GradCAM

    model = loaded.model
    layer = find_target_layer(model.backbone, int(loaded.spec.in_chans), min(int(loaded.size), 128))
    st = Standardizer.from_extra(loaded.spec.extra)
    device = next(model.parameters()).device
    x = loaded.to_tensor(np.asarray(images)).to(device)
    cl = torch.from_numpy(st.clinical(np.asarray(clinical_raw, dtype=float))).to(device)
    wrapped = _WithClinical(model, cl)
    rows = np.asarray(clinical_raw, dtype=float)
    targets = [_lower_z_target(loaded.spec.extra, st, rows[i : i + 1]) for i in range(len(x))]
    with torch.inference_mode(False), torch.enable_grad(), GradCAM(model=wrapped, target_layers=[layer]) as cam:
        maps = cam(input_tensor=x.clone(), targets=targets)
    return np.clip(np.nan_to_num(np.asarray(maps, dtype=np.float32)), 0.0, 1.0)


def patient_figure(
    path: str | Path,
    image: np.ndarray,
    cam: np.ndarray,
    shap_values: np.ndarray,
    clinical_raw: np.ndarray,
    *,
    pred_z: float,
    pred_bmd: float,
    ref_z: float | None = None,
    ref_bmd: float | None = None,
    title: str = "",
) -> Path:
    """The study's per-patient output as a PNG: CXR + Grad-CAM | SHAP bars | predicted vs DXA."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    fig, axes = plt.subplots(1, 3, figsize=(13, 4.4), gridspec_kw={"width_ratios": [1.1, 1, 0.9]})
    ax = axes[0]
    ax.imshow(overlay(image, cam))
    ax.set_axis_off()
    ax.set_title("Grad-CAM (towards lower Z)")
    age, sex, height, weight = (float(v) for v in clinical_raw[:4])
    names = [
        f"age = {age:.1f} y",
        f"sex = {'F' if sex >= 0.5 else 'M'}",
        f"height = {height:.0f} cm",
        f"weight = {weight:.1f} kg",
    ]
    ax = axes[1]
    vals = np.asarray(shap_values, dtype=float)
    order = np.argsort(np.abs(vals))
    colors = ["#d62728" if v < 0 else "#1f77b4" for v in vals[order]]
    ax.barh([names[i] for i in order], vals[order], color=colors)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel("SHAP value (Z-score units)")
    ax.set_title("clinical variables (image fixed)")
    ax = axes[2]
    ax.set_axis_off()

    def fmt(v: float | None, nd: int) -> str:
        return "—" if v is None or not np.isfinite(v) else f"{v:.{nd}f}"

    def call(z: float | None) -> str:
        if z is None or not np.isfinite(z):
            return "—"
        return "LOW BMD" if z <= PEDIATRIC_LOW_Z else "normal"

    rows = [
        ["", "model", "DXA"],
        ["BMD (g/cm²)", fmt(pred_bmd, 3), fmt(ref_bmd, 3)],
        ["Z-score", fmt(pred_z, 2), fmt(ref_z, 1)],
        ["Z ≤ −2.0", call(pred_z), call(ref_z)],
    ]
    table = ax.table(cellText=rows, loc="center", cellLoc="center")
    table.scale(1.0, 2.2)
    table.auto_set_font_size(False)
    table.set_fontsize(11)
    ax.set_title("predicted vs DXA reference")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


class PediatricExplainer:
    """Grad-CAM of a pediatric model towards "lower predicted Z" (the low-BMD direction)."""

    def __init__(self, loaded: ExplainableModel) -> None:
        if getattr(loaded, "model", None) is None:
            raise ExplainError("Grad-CAM needs the PyTorch model (.pt artifact), not an ONNX file")
        if loaded.spec.task != PEDIATRIC_TASK:
            raise ExplainError(f"PediatricExplainer needs a pediatric model, this one is {loaded.spec.task!r}")
        self.loaded = loaded

    def cams(self, images: np.ndarray, clinical_raw: np.ndarray) -> np.ndarray:
        """Maps in [0, 1], ``(N, H, W)``; ``clinical_raw`` is ``(N, 4)`` age, sex (F=1), height cm, weight kg."""
        arr = np.asarray(images)
        if arr.ndim == 2:
            arr = arr[None]
        return gradcam_low_bmd(self.loaded, arr, np.asarray(clinical_raw, dtype=float))
