"""The deployed two-stage cascade scored as what it outputs: three categories.

Stage 1 flags osteoporosis; stage 2 splits the rest into normal vs low bone
mass (``bonescreen.screen.decide``, the one implementation of the cascade
rule). A per-stage AUC says how well each model ranks; what a clinician gets is
the category, so the cascade is also reported as a 3×3 table, true WHO
category × predicted category, with the per-class rates (row percentages: of
the patients truly in a class, the share given each category) and their 95%
confidence intervals.

Intervals: Wilson (``evaluate.metrics.proportion``) when every patient has one
image; otherwise a patient-clustered percentile bootstrap that reuses
``evaluate.metrics.bootstrap_weights`` (patients drawn with all their images).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from bonescreen.evaluate.metrics import bootstrap_weights, percentile_ci, proportion
from bonescreen.schema import CATEGORIES

CATEGORY_NAMES = {"normal": "Normal", "low_bone_mass": "Low bone mass", "osteoporosis": "Osteoporosis"}


def cascade_categories(
    score_stage1: ArrayLike,
    score_stage2: ArrayLike,
    *,
    threshold_stage1: float = 0.5,
    threshold_stage2: float = 0.5,
) -> list[str]:
    """The category ``screen`` would give each image from its two scores (``screen.decide``)."""
    from bonescreen.screen import decide

    s1 = np.asarray(score_stage1, dtype=float)
    s2 = np.asarray(score_stage2, dtype=float)
    rows = decide(
        "cascade",
        np.column_stack([1.0 - s2, s2]),
        np.column_stack([1.0 - s1, s1]),
        threshold=threshold_stage2,
        threshold_stage1=threshold_stage1,
    )
    return [str(r["category"]) for r in rows]


def cascade_table(
    true_category: Sequence[str],
    predicted_category: Sequence[str],
    *,
    groups: ArrayLike | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """3×3 counts and per-class rates with CIs; rows are the truth, columns the prediction.

    Rows whose true or predicted category is not one of the three (missing, or a
    pediatric / abstain category) are counted in ``n_other`` and left out.
    """
    t = np.asarray([str(c) for c in true_category], dtype=object)
    p = np.asarray([str(c) for c in predicted_category], dtype=object)
    keep = np.isin(t, CATEGORIES) & np.isin(p, CATEGORIES)
    n_other = int((~keep).sum())
    t, p = t[keep], p[keep]
    g = None if groups is None else np.asarray(groups).astype(str)[keep]
    counts = np.zeros((3, 3), dtype=int)
    for i, ci in enumerate(CATEGORIES):
        for j, cj in enumerate(CATEGORIES):
            counts[i, j] = int(np.sum((t == ci) & (p == cj)))
    clustered = g is not None and len(set(g)) < len(g)
    weights = None
    if clustered and n_boot > 0 and len(t):
        weights = bootstrap_weights(np.zeros(len(t)), g, n_boot=n_boot, seed=seed,
                                    require_both_classes=False).weights
    rates: dict[str, dict[str, dict[str, Any]]] = {}
    for i, ci in enumerate(CATEGORIES):
        row_n = int(counts[i].sum())
        rates[ci] = {}
        in_row = (t == ci).astype(float)
        for j, cj in enumerate(CATEGORIES):
            est = proportion(int(counts[i, j]), row_n, alpha)
            lo, hi, method = est.lo, est.hi, "wilson"
            if weights is not None and row_n:
                den = weights @ in_row
                num = weights @ (in_row * (p == cj))
                with np.errstate(invalid="ignore", divide="ignore"):
                    boot = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
                lo, hi = percentile_ci(boot, alpha)
                method = "patient bootstrap"
            rates[ci][cj] = {"n": int(counts[i, j]), "of": row_n,
                             "rate": None if math.isnan(est.value) else est.value,
                             "lo": None if math.isnan(lo) else lo, "hi": None if math.isnan(hi) else hi,
                             "method": method}
    correct = int(np.trace(counts))
    acc = proportion(correct, int(counts.sum()), alpha)
    return {
        "categories": list(CATEGORIES),
        "counts": counts.tolist(),
        "rates": rates,
        "n": int(counts.sum()),
        "n_other": n_other,
        "accuracy": acc.to_dict(),
        "ci_method": "patient bootstrap" if weights is not None else "wilson",
    }


def cascade_frame(table: dict[str, Any], digits: int = 2) -> pd.DataFrame:
    """A 3×3 DataFrame: ``n (rate, lo–hi)`` per cell, rows the truth."""
    cats = table["categories"]
    out = {}
    for cj in cats:
        col = []
        for ci in cats:
            r = table["rates"][ci][cj]
            if r["rate"] is None:
                col.append(f"{r['n']}")
            elif r["lo"] is None:
                col.append(f"{r['n']} ({r['rate']:.{digits}f})")
            else:
                col.append(f"{r['n']} ({r['rate']:.{digits}f}, {r['lo']:.{digits}f}–{r['hi']:.{digits}f})")
        out[f"Predicted {CATEGORY_NAMES[cj].lower()}"] = col
    idx = [f"True {CATEGORY_NAMES[c].lower()} (n = {sum(table['counts'][i])})" for i, c in enumerate(cats)]
    return pd.DataFrame(out, index=idx)


def cascade_by_site(
    frame: pd.DataFrame,
    *,
    true_col: str = "category",
    pred_col: str = "predicted_category",
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """:func:`cascade_table` per ``site`` of a table with true and predicted categories."""
    out = {}
    groups_col = "patient_id" if "patient_id" in frame.columns else None
    for k, (site, g) in enumerate(frame.groupby(frame["site"].astype(str), sort=False)):
        out[str(site)] = cascade_table(g[true_col].tolist(), g[pred_col].tolist(),
                                       groups=g[groups_col].to_numpy() if groups_col else None,
                                       n_boot=n_boot, seed=seed + 7919 * k)
    return out
