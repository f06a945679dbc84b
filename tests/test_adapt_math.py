"""Calibration maths on data with a known answer: Platt/isotonic, EM prevalence, operating points, PPV/NPV."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bonescreen.adapt.calibrate import CalibrateConfig, LocalPairs, calibrate_pairs, check_pairs
from bonescreen.adapt.labelfree import expected_rates, sensitivity_cut
from bonescreen.adapt.prevalence import adjust_posteriors, em_prevalence, estimate_prevalence, training_prior
from bonescreen.adapt.recalibrate import (
    CalibrationError,
    Recalibration,
    choose_recalibration,
    fit_isotonic,
    fit_platt,
    logit,
    one_thread,
    prior_shift,
    sigmoid,
)
from bonescreen.evaluate.metrics import (
    Estimate,
    calibration_slope_intercept,
    expected_calibration_error,
    predictive_values,
    predictive_values_ci,
    sensitivity_threshold,
    specificity_threshold,
)


def miscalibrated(n: int, seed: int = 0, slope: float = 2.0, offset: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Outcomes from P(y=1) = sigmoid(z); the reported score is sigmoid(slope*z + offset)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.5, n)
    y = (rng.random(n) < sigmoid(z)).astype(int)
    return y, sigmoid(slope * z + offset)


@one_thread
def test_platt_recovers_a_known_miscalibration() -> None:
    y, s = miscalibrated(20_000)
    before = calibration_slope_intercept(y, s)
    assert before.slope.value == pytest.approx(0.5, abs=0.03)  # scores twice too extreme
    rec = fit_platt(y, s)
    # truth: logit P = (logit s - 1) / 2  ->  b = 0.5, a = -0.5
    assert rec.params["b"] == pytest.approx(0.5, abs=0.03)
    assert rec.params["a"] == pytest.approx(-0.5, abs=0.04)
    after = calibration_slope_intercept(y, rec.apply(s))
    assert after.slope.value == pytest.approx(1.0, abs=0.03)
    assert after.intercept.value == pytest.approx(0.0, abs=0.03)
    assert expected_calibration_error(y, rec.apply(s)) < 0.25 * expected_calibration_error(y, s)


def test_platt_stays_finite_under_separation() -> None:
    y = np.r_[np.zeros(10, int), np.ones(10, int)]
    s = np.r_[np.linspace(0.01, 0.2, 10), np.linspace(0.6, 0.9, 10)]
    rec = fit_platt(y, s)
    p = rec.apply(s)
    assert np.all(np.isfinite(p)) and p.min() > 0.0 and p.max() < 1.0
    assert abs(rec.params["b"]) < 50


def test_isotonic_is_monotone_calibrated_and_inverts() -> None:
    y, s = miscalibrated(5_000, seed=1)
    rec = fit_isotonic(y, s)
    grid = np.linspace(0, 1, 501)
    p = rec.apply(grid)
    assert np.all(np.diff(p) >= -1e-12)
    assert p.min() >= 1e-3 and p.max() <= 1 - 1e-3
    assert expected_calibration_error(y, rec.apply(s)) < 0.3 * expected_calibration_error(y, s)
    for target in (0.2, 0.5, 0.8):
        cut = rec.score_for(target)
        assert rec.apply([cut])[0] == pytest.approx(target, abs=1e-6)
        assert rec.apply([cut - 1e-3])[0] <= target + 1e-9


def test_platt_and_prior_shift_invert_in_closed_form() -> None:
    rec = Recalibration("platt", {"a": -0.3, "b": 0.7})
    for p in (0.1, 0.5, 0.9):
        assert rec.apply([rec.score_for(p)])[0] == pytest.approx(p, abs=1e-9)
    ps = prior_shift(0.4, 0.1)
    assert ps.params["shift"] == pytest.approx(math.log(0.1 / 0.9) - math.log(0.4 / 0.6))
    assert ps.apply([0.4])[0] == pytest.approx(0.1)  # a case at the training prior moves to the site prior
    assert ps.apply([ps.score_for(0.5)])[0] == pytest.approx(0.5)
    np.testing.assert_allclose(ps.apply([0.2, 0.7]), adjust_posteriors([0.2, 0.7], 0.4, 0.1))
    with pytest.raises(CalibrationError):
        prior_shift(0.4, 1.0)
    with pytest.raises(CalibrationError):
        Recalibration("temperature")


def test_cross_validation_chooses_a_recalibration_when_it_pays() -> None:
    y, s = miscalibrated(3_000, seed=2)
    ch = choose_recalibration(y, s, seed=0)
    assert ch.recalibration.method in ("platt", "isotonic")
    assert ch.cv["identity"]["log_loss"] > ch.cv[ch.recalibration.method]["log_loss"] + 0.02
    # already calibrated scores: the identity (or a Platt map close to it) wins, never a worse one
    y2, s2 = miscalibrated(3_000, seed=3, slope=1.0, offset=0.0)
    ch2 = choose_recalibration(y2, s2, seed=0)
    assert ch2.cv[ch2.recalibration.method]["log_loss"] <= ch2.cv["identity"]["log_loss"] + 1e-12
    if ch2.recalibration.method == "platt":
        assert ch2.recalibration.params["b"] == pytest.approx(1.0, abs=0.1)
    with pytest.raises(CalibrationError, match="both classes"):
        choose_recalibration(np.ones(30, int), np.linspace(0.1, 0.9, 30))


@pytest.mark.parametrize("site_prior", [0.1, 0.3, 0.6, 0.85])
def test_em_recovers_a_known_prior(site_prior: float) -> None:
    """Class-conditionals N(+1, 1) vs N(-1, 1); posteriors exact at training prior 0.4."""
    rng = np.random.default_rng(int(site_prior * 100))
    n = 5_000
    y = rng.random(n) < site_prior
    x = rng.normal(np.where(y, 1.0, -1.0), 1.0)
    post = sigmoid(2.0 * x + logit(0.4))  # log LR of N(1,1) vs N(-1,1) is 2x
    value, _, converged = em_prevalence(post, 0.4)
    assert converged
    assert value == pytest.approx(y.mean(), abs=0.02)
    est = estimate_prevalence(post, 0.4, n_boot=200, seed=0)
    assert est.lo <= y.mean() <= est.hi
    assert est.hi - est.lo < 0.06
    assert abs(post.mean() - site_prior) > abs(value - site_prior)  # the naive mean is biased toward 0.4


def test_em_at_the_training_prior_stays_and_rejects_bad_input() -> None:
    rng = np.random.default_rng(5)
    y = rng.random(20_000) < 0.4
    post = sigmoid(2.0 * rng.normal(np.where(y, 1.0, -1.0), 1.0) + logit(0.4))
    assert em_prevalence(post, 0.4)[0] == pytest.approx(0.4, abs=0.015)
    with pytest.raises(CalibrationError):
        em_prevalence([0.2, 1.5], 0.4)
    with pytest.raises(CalibrationError):
        em_prevalence([0.2, 0.5], 0.0)


def test_training_prior_from_the_model_card() -> None:
    class Spec:
        class_names = ["normal", "low_bone_mass"]
        positive_class = 1
        model_card = {"training_data": {"train": {"per_class": {"normal": 60, "low_bone_mass": 40}}}}

    assert training_prior(Spec()) == pytest.approx(0.4)
    Spec.model_card = {}
    assert training_prior(Spec()) is None


def test_operating_point_thresholds_on_known_data() -> None:
    # 10 negatives at 0.05..0.50, 10 positives at 0.30..0.75
    neg = np.round(np.linspace(0.05, 0.50, 10), 4)
    pos = np.round(np.linspace(0.30, 0.75, 10), 4)
    y = np.r_[np.zeros(10, int), np.ones(10, int)]
    s = np.r_[neg, pos]
    t = sensitivity_threshold(y, s, 0.9)
    assert t == pytest.approx(pos[1])  # keeps 9 of 10 positives, the highest cut-off that does
    assert (s[y == 1] >= t).mean() >= 0.9
    t2 = specificity_threshold(y, s, 0.8)
    assert (s[y == 0] < t2).mean() >= 0.8
    assert t2 == pytest.approx(neg[8] + 0.0 if neg[8] > neg[7] else neg[8]) or (s[y == 0] < t2).mean() == 0.8
    # the lowest such cut-off: one step lower loses the specificity target
    lower = s[s < t2].max()
    assert (s[y == 0] < lower).mean() < 0.8
    with pytest.raises(ValueError):
        specificity_threshold(y, s, 0.0)


def test_predictive_values_at_another_prevalence() -> None:
    ppv, npv = predictive_values(0.9, 0.8, 0.1)
    assert ppv == pytest.approx(0.09 / (0.09 + 0.18))
    assert npv == pytest.approx(0.72 / (0.72 + 0.01))
    pv = predictive_values_ci(Estimate(0.9, 0.85, 0.94), Estimate(0.8, 0.75, 0.85), 0.1)
    assert pv["ppv"].lo < pv["ppv"].value < pv["ppv"].hi
    assert pv["npv"].lo < pv["npv"].value < pv["npv"].hi
    with pytest.raises(ValueError):
        predictive_values(0.9, 0.8, 1.5)


def test_label_free_operating_point_from_posteriors() -> None:
    rng = np.random.default_rng(7)
    y = rng.random(20_000) < 0.3
    x = rng.normal(np.where(y, 1.0, -1.0), 1.0)
    post = sigmoid(2.0 * x + logit(0.3))  # calibrated at the site
    cut = sensitivity_cut(post, post, 0.85)
    assert (post[y] >= cut).mean() == pytest.approx(0.85, abs=0.02)
    exp = expected_rates(post, post, cut)
    assert exp["specificity"] == pytest.approx((post[~y] < cut).mean(), abs=0.02)


def _pairs(n: int, seed: int = 0) -> LocalPairs:
    y, s = miscalibrated(n, seed=seed)
    return LocalPairs(y, s, None)


def test_calibrate_pairs_reaches_the_requested_operating_point_out_of_sample() -> None:
    pairs = _pairs(6_000, seed=11)
    fit, rest = pairs.subset(np.arange(2_000)), pairs.subset(np.arange(2_000, 6_000))
    out = calibrate_pairs(fit, name="SYN", fingerprint="sha256:x", task="stage2", base_threshold=0.5,
                          config=CalibrateConfig(target="sensitivity", target_value=0.85, learning_curve=()))
    prof = out.profile
    dec = rest.scores >= prof.threshold
    assert dec[rest.labels == 1].mean() == pytest.approx(0.85, abs=0.03)
    cal = calibration_slope_intercept(rest.labels, prof.probability(rest.scores))
    assert 0.9 < cal.slope.value < 1.1
    rep = out.report
    assert rep["before"]["calibration_slope"]["value"] < 0.6  # the miscalibration it started from
    cv_sens = rep["after_cross_validated"]["sensitivity"]["value"]
    assert cv_sens == pytest.approx(0.85, abs=0.03)
    assert prof.operating_point["achieved"]["sensitivity"]["value"] >= 0.85


def test_learning_curve_tightens_with_n() -> None:
    pairs = _pairs(1_200, seed=12)
    cfg = CalibrateConfig(target="specificity", target_value=0.8, learning_curve=(25, 200, 1_180), repeats=10,
                          methods=("identity", "platt"))
    out = calibrate_pairs(pairs, name="SYN", fingerprint="sha256:x", task="stage2", base_threshold=0.5, config=cfg)
    lc = {e["n"]: e for e in out.report["learning_curve"]}
    assert "skipped" in lc[1_180]  # leaves fewer than 50 to test on
    spread = {n: lc[n]["specificity"]["p90"] - lc[n]["specificity"]["p10"] for n in (25, 200)}
    assert spread[200] < spread[25]
    assert abs(lc[200]["specificity"]["median"] - 0.8) < 0.05
    assert 0.8 < lc[200]["slope"]["median"] < 1.25


def test_bad_local_pairs_are_refused_clearly() -> None:
    cfg = CalibrateConfig()
    with pytest.raises(CalibrationError, match="at least 20"):
        check_pairs(_pairs(12), cfg)
    y = np.zeros(50, int)
    with pytest.raises(CalibrationError, match="all 50 local pairs are negative"):
        check_pairs(LocalPairs(y, np.linspace(0.1, 0.9, 50)), cfg)
    y = np.r_[np.ones(3, int), np.zeros(40, int)]
    with pytest.raises(CalibrationError, match="at least 5 of each"):
        check_pairs(LocalPairs(y, np.linspace(0.1, 0.9, 43)), cfg)
    with pytest.raises(CalibrationError, match="no DXA-paired"):
        check_pairs(LocalPairs(np.zeros(0, int), np.zeros(0)), cfg)
    with pytest.raises(CalibrationError):
        CalibrateConfig(target="accuracy")
    with pytest.raises(CalibrationError):
        CalibrateConfig(abstain_sensitivity=0.95)
