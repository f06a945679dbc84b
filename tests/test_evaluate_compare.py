"""DeLong against brute-force structural components and a published example;
subgroups, Bonferroni, age bands, severity."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from bonescreen.evaluate.compare import (
    accuracy_heterogeneity_p,
    age_band_labels,
    assign_age_band,
    bonferroni,
    delong_covariance,
    delong_test,
    mann_whitney_p,
    severity_accuracy,
    severity_from_t,
    subgroup_analysis,
)
from bonescreen.evaluate.metrics import bootstrap_weights, weighted_auc


def _brute_delong(y: np.ndarray, scores: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """DeLong et al. (1988) by definition: psi kernel over all (positive, negative)
    pairs, structural components V10/V01, S = S10/m + S01/n. O(m·n)."""
    y = y.astype(bool)
    k = len(scores)
    m, n = y.sum(), (~y).sum()
    v10 = np.empty((k, m))
    v01 = np.empty((k, n))
    aucs = np.empty(k)
    for r, s in enumerate(scores):
        x, z = s[y], s[~y]
        psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
        aucs[r] = psi.mean()
        v10[r] = psi.mean(axis=1)
        v01[r] = psi.mean(axis=0)
    s10 = np.array([[np.sum((v10[a] - aucs[a]) * (v10[b] - aucs[b])) / (m - 1) for b in range(k)] for a in range(k)])
    s01 = np.array([[np.sum((v01[a] - aucs[a]) * (v01[b] - aucs[b])) / (n - 1) for b in range(k)] for a in range(k)])
    return aucs, s10 / m + s01 / n


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_delong_equals_structural_components_by_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = (rng.random(60) < 0.4).astype(int)
    s1 = np.round(rng.normal(y * 0.8, 1.0), 1)  # rounded: ties within and across classes
    s2 = np.round(s1 * 0.5 + rng.normal(y * 0.3, 0.8), 1)
    aucs, cov = delong_covariance(y, [s1, s2])
    ref_aucs, ref_cov = _brute_delong(y, [s1, s2])
    np.testing.assert_allclose(aucs, ref_aucs, atol=1e-12)
    np.testing.assert_allclose(cov, ref_cov, atol=1e-12)
    assert aucs[0] == pytest.approx(roc_auc_score(y, s1))
    res = delong_test(y, s1, s2)
    se = math.sqrt(ref_cov[0, 0] + ref_cov[1, 1] - 2 * ref_cov[0, 1])
    assert res.z == pytest.approx((ref_aucs[0] - ref_aucs[1]) / se)
    assert res.p == pytest.approx(2 * norm.sf(abs(res.z)))


def test_hanley_mcneil_1982_published_example() -> None:
    """Hanley & McNeil (Radiology 1982;143:29–36), Table 1: 109 CT images rated
    1–5; 58 normal (33, 6, 6, 11, 2) and 51 abnormal (3, 2, 2, 11, 33).
    Published area under the (trapezoidal) ROC curve: 0.893."""
    normal = np.repeat([1, 2, 3, 4, 5], [33, 6, 6, 11, 2])
    abnormal = np.repeat([1, 2, 3, 4, 5], [3, 2, 2, 11, 33])
    y = np.r_[np.zeros(58), np.ones(51)]
    s = np.r_[normal, abnormal].astype(float)
    aucs, cov = delong_covariance(y, [s])
    assert f"{aucs[0]:.3f}" == "0.893"
    # DeLong's variance is the unbiased structural-components variance; Hanley–McNeil's
    # exponential approximation gives SE 0.032 for the same data: the two agree closely.
    assert math.sqrt(cov[0, 0]) == pytest.approx(0.032, abs=0.002)


def test_delong_variance_close_to_paired_bootstrap() -> None:
    rng = np.random.default_rng(5)
    y = (rng.random(400) < 0.5).astype(int)
    s1 = rng.normal(y * 1.0, 1.0)
    s2 = s1 + rng.normal(0.3 * y, 0.7)
    res = delong_test(y, s1, s2)
    bw = bootstrap_weights(y, None, n_boot=2000, seed=1)
    diff = weighted_auc(y, s1, bw.weights) - weighted_auc(y, s2, bw.weights)
    assert res.se == pytest.approx(diff.std(ddof=1), rel=0.15)


def test_delong_identical_models_and_too_few_cases() -> None:
    y = np.array([0, 1, 0, 1, 1, 0])
    s = np.array([0.1, 0.9, 0.3, 0.7, 0.4, 0.2])
    r = delong_test(y, s, s)
    assert r.diff == 0 and r.p == 1.0
    with pytest.raises(ValueError, match="two cases"):
        delong_test([0, 1, 1], [0.1, 0.2, 0.3], [0.3, 0.2, 0.1])


# ---------------------------------------------------------------- subgroups
def test_age_bands_labels_and_edges() -> None:
    assert age_band_labels([50, 55, 60, 65]) == ["<50", "50–54", "55–59", "60–64", "≥65"]
    bands = assign_age_band([49.9, 50, 54.9, 55, 64.99, 65, 90, np.nan], [50, 55, 60, 65])
    assert bands.iloc[:7].tolist() == ["<50", "50–54", "50–54", "55–59", "60–64", "≥65", "≥65"]
    assert pd.isna(bands.iloc[7])
    assert age_band_labels([50, 65]) == ["<50", "50–64", "≥65"]
    with pytest.raises(ValueError):
        age_band_labels([60, 50])


def test_bonferroni_matches_hand_computation() -> None:
    p = [0.01, 0.04, math.nan, 0.5]
    out = bonferroni(p)
    assert out[0] == pytest.approx(0.03) and out[1] == pytest.approx(0.12) and out[3] == 1.0
    assert math.isnan(out[2])


def test_mann_whitney_p_tests_auc_half() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random(300) < 0.5).astype(int)
    assert mann_whitney_p(y, rng.normal(y * 1.5, 1)) < 1e-6
    assert mann_whitney_p(y, rng.normal(0, 1, 300)) > 0.001
    assert math.isnan(mann_whitney_p([1, 1], [0.2, 0.4]))


def test_subgroups_with_single_class_and_empty_groups() -> None:
    rng = np.random.default_rng(1)
    n = 200
    df = pd.DataFrame({
        "label": (rng.random(n) < 0.5).astype(int),
        "patient_id": [f"p{i}" for i in range(n)],
    })
    df["score"] = np.clip(rng.normal(0.35 + 0.3 * df["label"], 0.15), 0, 1)
    sex = pd.Series(np.where(rng.random(n) < 0.5, "F", "M"))
    # the "O" subgroup: three images, all positive -> AUC undefined; category "X" empty
    sex.iloc[:3] = "O"
    df.loc[:2, "label"] = 1
    fam = {"sex": pd.Series(pd.Categorical(sex, categories=["F", "M", "O", "X"]))}
    rows, het = subgroup_analysis(df, fam, n_boot=100, seed=0)
    assert [r.subgroup for r in rows] == ["F", "M", "O"]
    o = rows[2]
    assert math.isnan(o.result.estimates["auc"].value) and math.isnan(o.p_auc)
    assert o.result.n == 3 and o.result.estimates["sensitivity"].defined
    # Bonferroni over the two defined p-values only
    assert rows[0].p_auc_adj == pytest.approx(min(1.0, rows[0].p_auc * 2))
    assert "p" in het["sex"] and "p_adj" in het["sex"]


def test_subgroup_auc_equals_sklearn_on_the_subset() -> None:
    rng = np.random.default_rng(2)
    df = pd.DataFrame({"label": (rng.random(300) < 0.4).astype(int)})
    df["score"] = np.clip(rng.normal(0.4 + 0.2 * df["label"], 0.2), 0, 1)
    age = pd.Series(rng.uniform(50, 80, 300))
    bands = assign_age_band(age, [50, 55, 60, 65])
    rows, _ = subgroup_analysis(df, {"age": bands}, n_boot=50)
    for r in rows:
        m = (bands == r.subgroup).to_numpy()
        assert r.result.estimates["auc"].value == pytest.approx(roc_auc_score(df["label"][m], df["score"][m]))
        assert r.result.n == m.sum()


def test_accuracy_heterogeneity_uses_fisher_for_small_tables() -> None:
    from scipy.stats import chi2_contingency, fisher_exact

    p, test = accuracy_heterogeneity_p([1, 1, 1, 0, 0, 1, 0, 0], ["a", "a", "a", "a", "b", "b", "b", "b"])
    assert test == "Fisher exact"
    assert p == pytest.approx(fisher_exact([[1, 3], [3, 1]]).pvalue)
    rng = np.random.default_rng(0)
    g = np.repeat(["a", "b", "c"], 100)
    c = rng.random(300) < np.repeat([0.6, 0.8, 0.9], 100)
    p, test = accuracy_heterogeneity_p(c, g)
    t = [[np.sum(~c[g == k]), np.sum(c[g == k])] for k in "abc"]
    assert test == "chi-square" and p == pytest.approx(chi2_contingency(t).pvalue)
    assert math.isnan(accuracy_heterogeneity_p([1, 1], ["a", "a"])[0])


# ---------------------------------------------------------------- severity
def test_severity_from_t_boundaries() -> None:
    t = [-0.9, -1.0, -1.01, -1.49, -1.5, -1.99, -2.0, -2.49, -2.5, -3.0, np.nan]
    assert severity_from_t(t).tolist() == ["normal", "normal", "mild", "mild", "moderate", "moderate",
                                           "advanced", "advanced", "osteoporosis", "osteoporosis", None]


def test_severity_accuracy_counts_and_wilson() -> None:
    df = pd.DataFrame({
        "severity": ["normal"] * 4 + ["mild"] * 4 + ["advanced"] * 2 + [None],
        "label": [0] * 4 + [1] * 7,
        "score": [0.1, 0.2, 0.7, 0.3, 0.6, 0.4, 0.45, 0.8, 0.9, 0.95, 0.9],
    })
    rows = {r["severity"]: r for r in severity_accuracy(df, 0.5)}
    assert set(rows) == {"normal", "mild", "advanced"}  # moderate: empty, skipped
    assert (rows["normal"]["correct"], rows["normal"]["n"]) == (3, 4)
    assert (rows["mild"]["correct"], rows["mild"]["n"]) == (2, 4)
    assert rows["advanced"]["accuracy"] == 1.0
    from bonescreen.evaluate.metrics import wilson_ci

    assert (rows["mild"]["lo"], rows["mild"]["hi"]) == pytest.approx(wilson_ci(2, 4))
