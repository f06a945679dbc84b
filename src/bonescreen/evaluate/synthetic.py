"""Synthetic predictions tables for tests, demos and timing of the report.

Not a model of anything: scores are a noisy logistic function of a latent T-score,
so that AUC, subgroups and severity behave plausibly (mild cases are harder).
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def make_predictions(
    n_per_site: int = 300,
    sites: tuple[str, ...] = ("siteA", "siteB"),
    models: tuple[str, ...] = ("teacher",),
    seed: int = 0,
    images_per_patient: int = 1,
    noise: float = 1.0,
) -> pd.DataFrame:
    """One row per (model, image) in the predictions-table schema."""
    rng = np.random.default_rng(seed)
    rows = []
    for si, site in enumerate(sites):
        n_pat = max(1, n_per_site // images_per_patient)
        sex = rng.choice(["F", "M"], size=n_pat, p=[0.6, 0.4])
        age = np.clip(rng.normal(60 + 2 * si, 8, n_pat), 50, 90).round(0)
        t = rng.normal(-1.0 - 0.02 * (age - 60) - 0.3 * (sex == "F"), 0.7)
        t = np.clip(t, -2.49, 2.5)  # stage 2: no osteoporosis
        for k in range(n_pat * images_per_patient):
            p = k % n_pat
            rows.append({"site": site, "patient_id": f"{site}-P{p:05d}", "image_id": f"{site}-I{k:06d}",
                         "sex": sex[p], "age": age[p], "t_min": round(float(t[p]), 2)})
    base = pd.DataFrame(rows)
    base["label"] = (base["t_min"] < -1.0).astype(int)
    frames = []
    for mi, model in enumerate(models):
        z = -(base["t_min"].to_numpy() + 1.0) * 2.5 + rng.normal(0, noise * (1 + 0.3 * mi), len(base))
        df = base.copy()
        df["score"] = np.round(1 / (1 + np.exp(-z)), 4)
        df["model"] = model
        frames.append(df)
    out = pd.concat(frames, ignore_index=True)
    return out[["image_id", "patient_id", "site", "sex", "age", "t_min", "score", "label", "model"]]
