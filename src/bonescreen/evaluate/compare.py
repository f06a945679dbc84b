"""Comparisons: DeLong test between models, subgroups, severity.

Subgroup p-values (the paper's Table 3 gives Bonferroni-adjusted p-values
without naming the test). We report, for every subgroup, the two-sided
Mann–Whitney U test of H0 "AUC = 0.5" (the model separates low bone mass from
normal no better than chance within the subgroup; U / (n1·n0) is the AUC), and
Bonferroni-adjust over all subgroups of one model on one site. As a second,
separate question we test whether accuracy differs *between* the subgroups of a
family (sex; age bands) with a chi-square test (Fisher's exact test for a 2×2
table with an expected count below 5), Bonferroni-adjusted over the families.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike, NDArray

from bonescreen.evaluate.metrics import (
    BinaryResult,
    evaluate_binary,
    proportion,
)

SEVERITY_ORDER = ["normal", "mild", "moderate", "advanced"]


# --------------------------------------------------------------------------
# DeLong
# --------------------------------------------------------------------------
def _midranks(x: NDArray[np.float64]) -> NDArray[np.float64]:
    from scipy.stats import rankdata

    return rankdata(x, method="average", axis=-1)


def delong_covariance(
    labels: ArrayLike, scores: Sequence[ArrayLike]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """AUCs of k score vectors on the same cases and their DeLong covariance.

    Hand-written because neither scikit-learn nor statsmodels/scipy ship the
    DeLong (1988) test; this is the fast O(k·N log N) algorithm of Sun & Xu
    (2014, IEEE Signal Process. Lett. 21:1389): the structural components
    (placement values) come from mid-ranks instead of the O(m·n) kernel.
    """
    y = np.asarray(labels).astype(bool)
    S = np.atleast_2d(np.asarray(scores, dtype=float))
    m, n = int(y.sum()), int((~y).sum())
    if m < 2 or n < 2:
        raise ValueError("DeLong needs at least two cases of each class")
    pos, neg = S[:, y], S[:, ~y]
    tx, ty = _midranks(pos), _midranks(neg)
    tz = _midranks(np.hstack([pos, neg]))
    aucs = tz[:, :m].sum(axis=1) / (m * n) - (m + 1.0) / (2.0 * n)
    v10 = (tz[:, :m] - tx) / n  # per positive: share of negatives it outranks
    v01 = 1.0 - (tz[:, m:] - ty) / m  # per negative: share of positives above it
    s10 = np.atleast_2d(np.cov(v10))
    s01 = np.atleast_2d(np.cov(v01))
    return aucs, s10 / m + s01 / n


@dataclass(frozen=True)
class DeLongResult:
    auc1: float
    auc2: float
    diff: float
    se: float
    z: float
    p: float
    ci_lo: float
    ci_hi: float
    n: int
    n_pos: int

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in self.__dict__.items()}


def delong_test(labels: ArrayLike, scores1: ArrayLike, scores2: ArrayLike, alpha: float = 0.05) -> DeLongResult:
    """Two-sided DeLong test of AUC1 = AUC2 for paired scores on the same cases."""
    from scipy.stats import norm

    y = np.asarray(labels).astype(bool)
    aucs, cov = delong_covariance(y, [scores1, scores2])
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    diff = float(aucs[0] - aucs[1])
    if var <= 0:  # identical rankings: no difference to test
        z, p, se = 0.0 if diff == 0 else math.copysign(math.inf, diff), 1.0 if diff == 0 else 0.0, 0.0
    else:
        se = math.sqrt(var)
        z = diff / se
        p = float(2 * norm.sf(abs(z)))
    q = float(norm.ppf(1 - alpha / 2))
    return DeLongResult(float(aucs[0]), float(aucs[1]), diff, se, z, p, diff - q * se, diff + q * se,
                        int(y.size), int(y.sum()))


# --------------------------------------------------------------------------
# Subgroups
# --------------------------------------------------------------------------
def age_band_labels(edges: Sequence[float]) -> list[str]:
    """``[50, 55, 60, 65]`` -> ``['<50', '50–54', '55–59', '60–64', '≥65']``."""
    e = [float(x) for x in edges]
    if not e or any(b <= a for a, b in zip(e, e[1:])):
        raise ValueError(f"age band edges must be increasing, got {list(edges)}")

    def num(v: float) -> str:
        return str(int(v)) if float(v).is_integer() else f"{v:g}"

    out = [f"<{num(e[0])}"]
    for a, b in zip(e, e[1:]):
        upper = num(b - 1) if a.is_integer() and b.is_integer() else f"<{num(b)}"
        out.append(f"{num(a)}–{upper}")
    out.append(f"≥{num(e[-1])}")
    return out


def assign_age_band(age: ArrayLike, edges: Sequence[float]) -> pd.Series:
    """Band label per age; NaN ages stay NaN."""
    a = pd.to_numeric(pd.Series(np.asarray(age)), errors="coerce")
    labels = age_band_labels(edges)
    idx = np.searchsorted(np.asarray(edges, dtype=float), a.to_numpy(), side="right")
    out = pd.Series([labels[i] for i in idx], dtype=object)
    out[a.isna().to_numpy()] = np.nan
    return out


def mann_whitney_p(labels: ArrayLike, scores: ArrayLike) -> float:
    """Two-sided p of H0 AUC = 0.5; NaN when a class is missing."""
    from scipy.stats import mannwhitneyu

    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=float)
    if y.sum() == 0 or (~y).sum() == 0:
        return math.nan
    return float(mannwhitneyu(s[y], s[~y], alternative="two-sided").pvalue)


def accuracy_heterogeneity_p(correct: ArrayLike, group: ArrayLike) -> tuple[float, str]:
    """p of H0 "accuracy is the same in every subgroup" and the test used."""
    from scipy.stats import chi2_contingency, fisher_exact

    g = pd.Series(np.asarray(group, dtype=object))
    c = np.asarray(correct).astype(bool)
    names = [x for x in pd.unique(g)]
    t = np.array([[int(np.sum(~c[(g == k).to_numpy()])), int(np.sum(c[(g == k).to_numpy()]))] for k in names])
    table = t[t.sum(axis=1) > 0] if t.size else t.reshape(0, 2)
    if table.shape[0] < 2 or (table.sum(axis=0) == 0).any():
        return math.nan, "undefined (fewer than two non-empty subgroups or no variation)"
    t = table
    if t.shape == (2, 2):
        expected = t.sum(1, keepdims=True) * t.sum(0, keepdims=True) / t.sum()
        if (expected < 5).any():
            return float(fisher_exact(t).pvalue), "Fisher exact"
    return float(chi2_contingency(t, correction=t.shape == (2, 2)).pvalue), "chi-square"


def bonferroni(pvalues: Sequence[float]) -> list[float]:
    """Bonferroni via statsmodels over the defined p-values; NaN stays NaN."""
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        out[ok] = multipletests(p[ok], method="bonferroni")[1]
    return [float(v) for v in out]


@dataclass
class SubgroupRow:
    family: str
    subgroup: str
    result: BinaryResult
    p_auc: float
    p_auc_adj: float = math.nan


def subgroup_analysis(
    df: pd.DataFrame,
    families: dict[str, pd.Series],
    *,
    threshold: float = 0.5,
    n_boot: int = 1000,
    seed: int = 0,
    min_n: int = 1,
) -> tuple[list[SubgroupRow], dict[str, dict[str, Any]]]:
    """Metrics per subgroup plus per-family accuracy heterogeneity tests.

    ``families`` maps a family name (``sex``, ``age``) to a subgroup label per
    row of ``df`` (NaN: not in any subgroup). Empty subgroups are skipped;
    single-class ones get a row whose AUC is undefined.
    """
    rows: list[SubgroupRow] = []
    hetero: dict[str, dict[str, Any]] = {}
    y = df["label"].to_numpy().astype(int)
    s = df["score"].to_numpy(dtype=float)
    groups = df["patient_id"].to_numpy() if "patient_id" in df else None
    for fi, (family, labels) in enumerate(families.items()):
        if isinstance(labels.dtype, pd.CategoricalDtype):  # keep the given order (F, M; bands low to high)
            present = set(labels.dropna().astype(str))
            order = [str(c) for c in labels.cat.categories if str(c) in present]
        else:
            order = sorted(str(g) for g in pd.unique(labels.dropna()))
        lab = pd.Series(np.asarray(labels.astype(object), dtype=object)).map(lambda v: v if pd.isna(v) else str(v))
        for gi, g in enumerate(order):
            mask = (lab == g).to_numpy()
            if mask.sum() < min_n:
                continue
            res = evaluate_binary(
                y[mask], s[mask], groups=None if groups is None else groups[mask],
                threshold=threshold, n_boot=n_boot, seed=seed + 1000 * (fi + 1) + gi,
            )
            rows.append(SubgroupRow(family, str(g), res, mann_whitney_p(y[mask], s[mask])))
        known = lab.notna().to_numpy()
        correct = (s >= threshold).astype(int) == y
        p, test = accuracy_heterogeneity_p(correct[known], lab[known].to_numpy())
        hetero[family] = {"p": p, "test": test}
    for row, padj in zip(rows, bonferroni([r.p_auc for r in rows])):
        row.p_auc_adj = padj
    fam = list(hetero)
    for f, padj in zip(fam, bonferroni([hetero[f]["p"] for f in fam])):
        hetero[f]["p_adj"] = padj
    return rows, hetero


# --------------------------------------------------------------------------
# Severity (Figure 2)
# --------------------------------------------------------------------------
def severity_from_t(t_min: ArrayLike) -> pd.Series:
    """WHO grade per row from the lowest T-score (``bonescreen.labels.severity``)."""
    from bonescreen.labels import severity

    t = pd.to_numeric(pd.Series(np.asarray(t_min)), errors="coerce")
    return pd.Series([severity(v) for v in t], dtype=object)


def severity_accuracy(df: pd.DataFrame, threshold: float = 0.5) -> list[dict[str, Any]]:
    """Accuracy with Wilson CI per severity grade (for grades of low bone mass
    this is the sensitivity within the grade; for normal, the specificity)."""
    sev = df["severity"].astype(object).where(df["severity"].notna(), None)
    correct = (df["score"].to_numpy(dtype=float) >= threshold).astype(int) == df["label"].to_numpy().astype(int)
    out = []
    for grade in SEVERITY_ORDER:
        mask = (sev == grade).to_numpy()
        n = int(mask.sum())
        if n == 0:
            continue
        est = proportion(int(correct[mask].sum()), n)
        out.append({"severity": grade, "n": n, "correct": int(correct[mask].sum()),
                    "accuracy": est.value, "lo": est.lo, "hi": est.hi})
    return out
