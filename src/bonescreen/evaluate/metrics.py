"""Point estimates and confidence intervals for a binary screening test.

Proportions (sensitivity, specificity, PPV, NPV, accuracy) get Wilson score
intervals exactly as R's ``Hmisc::binconf`` computes them (the paper's method);
F1 and AUC get seeded percentile-bootstrap intervals, resampling patients when a
patient has several images. Ranking, AUC, AP, Brier and calibration come from
scikit-learn; only the vectorised weighted bootstrap is written here, because
calling ``roc_auc_score`` 1,000 times per site and subgroup is too slow for the
report's time budget.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

PROPORTIONS = ("sensitivity", "specificity", "ppv", "npv", "accuracy")


# --------------------------------------------------------------------------
# Wilson intervals (Hmisc::binconf)
# --------------------------------------------------------------------------
def wilson_ci(x: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Wilson score interval with Hmisc::binconf's two small-count corrections.

    statsmodels gives the textbook Wilson interval; ``Hmisc::binconf`` replaces
    the lower bound by ``-log(1-alpha)/n`` when ``x == 1`` and the upper bound by
    ``1 + log(1-alpha)/n`` when ``x == n-1`` (Hmisc source, ``bc()``), so we add
    those to match R to the last digit. ``n == 0`` gives NaNs (undefined).
    """
    from statsmodels.stats.proportion import proportion_confint

    if n < 0 or x < 0 or x > n:
        raise ValueError(f"need 0 <= x <= n, got x={x}, n={n}")
    if n == 0:
        return (math.nan, math.nan)
    lo, hi = proportion_confint(int(x), int(n), alpha=alpha, method="wilson")
    lo, hi = float(lo), float(hi)
    if x == 1:
        lo = -math.log(1 - alpha) / n
    if x == n - 1:
        hi = 1 + math.log(1 - alpha) / n
    return (max(0.0, lo), min(1.0, hi))


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its interval; NaN where undefined (with a reason)."""

    value: float
    lo: float = math.nan
    hi: float = math.nan
    num: int | None = None
    den: int | None = None
    method: str = ""
    note: str = ""

    @property
    def defined(self) -> bool:
        return not math.isnan(self.value)

    def fmt(self, digits: int = 2) -> str:
        """Journal style: ``0.75 (0.71–0.78)``; ``NA`` when undefined."""
        if not self.defined:
            return "NA"
        if math.isnan(self.lo) or math.isnan(self.hi):
            return f"{self.value:.{digits}f}"
        return f"{self.value:.{digits}f} ({self.lo:.{digits}f}–{self.hi:.{digits}f})"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("value", "lo", "hi"):
            d[k] = None if math.isnan(d[k]) else float(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Estimate:
        """The inverse of :meth:`to_dict` (``None`` values back to NaN; unknown keys ignored)."""
        d = d or {}
        kw = {k: d[k] for k in ("num", "den", "method", "note") if d.get(k) is not None}
        nan = [math.nan if d.get(k) is None else float(d[k]) for k in ("value", "lo", "hi")]
        return cls(nan[0], nan[1], nan[2], **kw)


def proportion(x: int, n: int, alpha: float = 0.05) -> Estimate:
    if n == 0:
        return Estimate(math.nan, num=x, den=n, method="wilson", note="empty denominator")
    lo, hi = wilson_ci(x, n, alpha)
    return Estimate(x / n, lo, hi, num=int(x), den=int(n), method="wilson")


# --------------------------------------------------------------------------
# Confusion matrix
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class Confusion:
    tp: int
    tn: int
    fp: int
    fn: int

    @property
    def n(self) -> int:
        return self.tp + self.tn + self.fp + self.fn

    def proportions(self, alpha: float = 0.05) -> dict[str, Estimate]:
        """Sensitivity, specificity, PPV, NPV, accuracy with Wilson CIs."""
        return {
            "sensitivity": proportion(self.tp, self.tp + self.fn, alpha),
            "specificity": proportion(self.tn, self.tn + self.fp, alpha),
            "ppv": proportion(self.tp, self.tp + self.fp, alpha),
            "npv": proportion(self.tn, self.tn + self.fn, alpha),
            "accuracy": proportion(self.tp + self.tn, self.n, alpha),
        }

    @property
    def f1(self) -> float:
        den = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / den if den else math.nan


def confusion(labels: ArrayLike, scores: ArrayLike, threshold: float = 0.5) -> Confusion:
    """Counts with ``score >= threshold`` called positive (the paper's 0.5 cut-off)."""
    y = np.asarray(labels).astype(bool)
    pred = np.asarray(scores, dtype=float) >= threshold
    return Confusion(
        tp=int(np.sum(pred & y)),
        tn=int(np.sum(~pred & ~y)),
        fp=int(np.sum(pred & ~y)),
        fn=int(np.sum(~pred & y)),
    )


# --------------------------------------------------------------------------
# Ranking metrics (scikit-learn)
# --------------------------------------------------------------------------
def _two_classes(y: NDArray[Any]) -> bool:
    return bool(y.size) and 0 < int(np.sum(y)) < y.size


def auc_point(labels: ArrayLike, scores: ArrayLike) -> float:
    """ROC AUC, NaN when one class is missing (undefined, not an error)."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(labels).astype(int)
    if not _two_classes(y):
        return math.nan
    return float(roc_auc_score(y, np.asarray(scores, dtype=float)))


def average_precision(labels: ArrayLike, scores: ArrayLike) -> float:
    from sklearn.metrics import average_precision_score

    y = np.asarray(labels).astype(int)
    if not _two_classes(y):
        return math.nan
    return float(average_precision_score(y, np.asarray(scores, dtype=float)))


def brier(labels: ArrayLike, scores: ArrayLike) -> float:
    from sklearn.metrics import brier_score_loss

    y = np.asarray(labels).astype(int)
    if y.size == 0:
        return math.nan
    return float(brier_score_loss(y, np.asarray(scores, dtype=float), pos_label=1))


def calibration(labels: ArrayLike, scores: ArrayLike, n_bins: int = 10) -> dict[str, list[float]]:
    """Reliability curve (uniform bins) plus the count per non-empty bin."""
    from sklearn.calibration import calibration_curve

    y = np.asarray(labels).astype(int)
    s = np.asarray(scores, dtype=float)
    if not _two_classes(y):
        return {"mean_predicted": [], "fraction_positive": [], "count": []}
    frac, mean = calibration_curve(y, s, n_bins=n_bins, strategy="uniform")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    counts = np.bincount(np.searchsorted(edges[1:-1], s), minlength=n_bins)  # sklearn's binning
    counts = counts[counts > 0]
    return {
        "mean_predicted": [float(v) for v in mean],
        "fraction_positive": [float(v) for v in frac],
        "count": [int(c) for c in counts],
    }


@dataclass(frozen=True)
class CalibrationFit:
    """Logistic recalibration of predicted probabilities against outcomes (Cox 1958).

    ``slope``: the coefficient of logit(p) in ``logit P(y=1) = a + b·logit(p)``; 1 is ideal,
    below 1 means the scores are too extreme (over-confident), above 1 too timid.
    ``intercept``: calibration-in-the-large, ``a`` with the slope fixed at 1 (an offset); 0 is
    ideal, negative means the model predicts too many positives. Wald 95% intervals.
    """

    slope: Estimate
    intercept: Estimate
    n: int

    def to_dict(self) -> dict[str, Any]:
        return {"slope": self.slope.to_dict(), "intercept": self.intercept.to_dict(), "n": self.n}


#: probabilities are clipped to [LOGIT_EPS, 1 - LOGIT_EPS] before a logit (0 and 1 stay finite)
LOGIT_EPS = 1e-6


def logit(scores: ArrayLike, eps: float = LOGIT_EPS) -> NDArray[np.float64]:
    """log(p / (1 - p)) of clipped probabilities: the one logit (calibration here, site profiles' maps)."""
    p = np.clip(np.asarray(scores, dtype=float), eps, 1 - eps)
    out: NDArray[np.float64] = np.log(p / (1 - p))
    return out


def calibration_slope_intercept(labels: ArrayLike, scores: ArrayLike, alpha: float = 0.05) -> CalibrationFit:
    """Calibration slope and intercept with Wald CIs (statsmodels GLM, binomial family).

    Scores are clipped to [1e-6, 1 - 1e-6] before the logit. NaN estimates, with a note,
    when the outcome has a single class or the fit does not converge (perfect separation).
    """
    import warnings

    import statsmodels.api as sm

    y = np.asarray(labels).astype(float)
    lp = logit(scores)
    n = int(y.size)
    if not _two_classes(y.astype(int)):
        nan = Estimate(math.nan, note="needs both classes")
        return CalibrationFit(nan, nan, n)
    z = float(_normal_quantile(1 - alpha / 2))
    out: list[Estimate] = []
    for kind in ("slope", "intercept"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # a separation warning makes the estimate meaningless
                if kind == "slope":
                    res = sm.GLM(y, sm.add_constant(lp), family=sm.families.Binomial()).fit()
                    est, se = float(res.params[1]), float(res.bse[1])
                else:
                    res = sm.GLM(y, np.ones((n, 1)), family=sm.families.Binomial(), offset=lp).fit()
                    est, se = float(res.params[0]), float(res.bse[0])
        except Exception as exc:  # PerfectSeparation, convergence failures
            out.append(Estimate(math.nan, method="logistic (Wald)", note=f"fit failed: {type(exc).__name__}"))
            continue
        out.append(Estimate(est, est - z * se, est + z * se, method="logistic (Wald)"))
    return CalibrationFit(out[0], out[1], n)


def _normal_quantile(q: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(q))


def expected_calibration_error(labels: ArrayLike, scores: ArrayLike, n_bins: int = 10) -> float:
    """ECE: the count-weighted mean |observed rate − mean predicted| over equal-width bins."""
    y = np.asarray(labels).astype(float)
    s = np.asarray(scores, dtype=float)
    if y.size == 0:
        return math.nan
    idx = np.clip((s * n_bins).astype(int), 0, n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        m = idx == b
        if m.any():
            total += m.sum() * abs(y[m].mean() - s[m].mean())
    return float(total / y.size)


# --------------------------------------------------------------------------
# Operating points chosen on a tuning set
# --------------------------------------------------------------------------
def youden_threshold(labels: ArrayLike, scores: ArrayLike) -> float:
    """Cut-off maximising sensitivity + specificity - 1 (ties: the higher cut-off)."""
    from sklearn.metrics import roc_curve

    y = np.asarray(labels).astype(int)
    if not _two_classes(y):
        raise ValueError("Youden threshold needs both classes in the tuning set")
    fpr, tpr, thr = roc_curve(y, np.asarray(scores, dtype=float), drop_intermediate=False)
    j = tpr - fpr
    finite = np.isfinite(thr)
    j = np.where(finite, j, -np.inf)
    best = int(np.flatnonzero(j == j.max())[0])  # thresholds descend: first = highest
    return float(thr[best])


def sensitivity_threshold(labels: ArrayLike, scores: ArrayLike, target: float) -> float:
    """Highest cut-off whose sensitivity on the tuning set is at least ``target``."""
    return _rate_threshold(labels, scores, target, "sensitivity")


def specificity_threshold(labels: ArrayLike, scores: ArrayLike, target: float) -> float:
    """Lowest cut-off whose specificity on the tuning set is at least ``target``.

    The mirror of :func:`sensitivity_threshold`: among cut-offs keeping ``specificity >= target``,
    the one that flags the most (highest sensitivity). Cut-offs are observed scores, so
    ``score >= threshold`` calls that case positive.
    """
    return _rate_threshold(labels, scores, target, "specificity")


def _rate_threshold(labels: ArrayLike, scores: ArrayLike, target: float, rate: str) -> float:
    from sklearn.metrics import roc_curve

    if not 0.0 < target <= 1.0:
        raise ValueError(f"target {rate} must be in (0, 1], got {target}")
    y = np.asarray(labels).astype(int)
    if not _two_classes(y):
        raise ValueError(f"target-{rate} threshold needs both classes in the tuning set")
    fpr, tpr, thr = roc_curve(y, np.asarray(scores, dtype=float), drop_intermediate=False)
    achieved = tpr if rate == "sensitivity" else 1.0 - fpr
    ok = np.flatnonzero((achieved >= target - 1e-12) & np.isfinite(thr))
    # thresholds descend: sensitivity wants the first (highest) that qualifies, specificity the last
    return float(thr[ok[0]] if rate == "sensitivity" else thr[ok[-1]])


def predictive_values(sensitivity: float, specificity: float, prevalence: float) -> tuple[float, float]:
    """(PPV, NPV) of a test with this sensitivity and specificity where the prevalence is ``prevalence``.

    Bayes' rule; the way to carry an operating point from a DXA-referred sample to a screening
    population whose prevalence differs. NaN where a denominator is zero.
    """
    se, sp, p = float(sensitivity), float(specificity), float(prevalence)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"prevalence must be in [0, 1], got {prevalence}")
    tp, fp = se * p, (1.0 - sp) * (1.0 - p)
    tn, fn = sp * (1.0 - p), (1.0 - se) * p
    ppv = tp / (tp + fp) if tp + fp > 0 else math.nan
    npv = tn / (tn + fn) if tn + fn > 0 else math.nan
    return ppv, npv


def predictive_values_ci(sens: Estimate, spec: Estimate, prevalence: float) -> dict[str, Estimate]:
    """PPV and NPV at ``prevalence`` with intervals carried from the Wilson intervals of sens and spec.

    PPV rises with both sensitivity and specificity, NPV too, so evaluating Bayes' rule at the
    lower (upper) ends of both intervals bounds it from below (above): a conservative interval
    for a known prevalence (wider than a joint interval would be, never narrower).
    """
    ppv, npv = predictive_values(sens.value, spec.value, prevalence)
    ppv_lo, npv_lo = predictive_values(sens.lo, spec.lo, prevalence)
    ppv_hi, npv_hi = predictive_values(sens.hi, spec.hi, prevalence)
    method = f"Bayes at prevalence {prevalence:.3f}, bounds from the Wilson CIs"
    return {"ppv": Estimate(ppv, ppv_lo, ppv_hi, method=method), "npv": Estimate(npv, npv_lo, npv_hi, method=method)}


# --------------------------------------------------------------------------
# Bootstrap (vectorised, weighted)
# --------------------------------------------------------------------------
@dataclass
class BootstrapWeights:
    """``weights[b, i]``: how many times image ``i`` is in resample ``b``.

    Patients are the resampling unit (cluster bootstrap) when ``patient_id``
    repeats, so all images of a drawn patient come along together.
    """

    weights: NDArray[np.float64]
    unit: str  # "patient" or "image"
    n_units: int
    redrawn: int = 0  # resamples drawn again because they held a single class
    requested: int = 0
    shortfall: int = 0  # resamples still missing after the redraw budget
    notes: list[str] = field(default_factory=list)


def bootstrap_weights(
    labels: ArrayLike,
    groups: ArrayLike | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    max_tries: int = 20,
    *,
    require_both_classes: bool = True,
) -> BootstrapWeights:
    """Draw ``n_boot`` resamples that each hold both classes.

    A resample with a single class (AUC undefined) is discarded and drawn again
    from the same seeded generator; how many were redrawn is recorded. After
    ``max_tries * n_boot`` draws we stop and record the shortfall.
    ``require_both_classes=False`` keeps every resample: the cluster bootstrap of
    statistics that need no two classes (MAE, ICC, r, per-class rates), where
    ``labels`` only gives the number of rows.
    """
    y = np.asarray(labels).astype(bool)
    n = y.size
    rng = np.random.default_rng(seed)
    if groups is not None:
        _, unit_of_image = np.unique(np.asarray(groups).astype(str), return_inverse=True)
        n_units = int(unit_of_image.max()) + 1 if n else 0
        unit = "patient" if n_units < n else "image"
    else:
        unit_of_image = np.arange(n)
        n_units = n
        unit = "image"
    if n == 0 or n_boot <= 0:
        return BootstrapWeights(np.zeros((0, n)), unit, n_units, requested=n_boot, shortfall=n_boot)
    pos = y.astype(float)
    kept: list[NDArray[np.float64]] = []
    got = drawn = redrawn = 0
    while got < n_boot and drawn < max_tries * n_boot:
        batch = n_boot - got
        idx = rng.integers(0, n_units, size=(batch, n_units))
        offs = (np.arange(batch) * n_units)[:, None]
        counts = np.bincount((idx + offs).ravel(), minlength=batch * n_units).reshape(batch, n_units)
        w = counts[:, unit_of_image].astype(float)
        w1 = w @ pos
        w0 = w.sum(axis=1) - w1
        ok = (w1 > 0) & (w0 > 0) if require_both_classes else np.ones(batch, dtype=bool)
        drawn += batch
        redrawn += int(batch - ok.sum())
        kept.append(w[ok])
        got += int(ok.sum())
    weights = np.concatenate(kept, axis=0) if kept else np.zeros((0, n))
    return BootstrapWeights(weights, unit, n_units, redrawn=redrawn, requested=n_boot,
                            shortfall=n_boot - weights.shape[0])


def _score_groups(scores: NDArray[np.float64]) -> tuple[NDArray[np.intp], NDArray[np.intp]]:
    """Sort order and start offsets of runs of equal scores (ties share a group)."""
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    return order, starts


def weighted_auc(labels: ArrayLike, scores: ArrayLike, weights: NDArray[np.float64]) -> NDArray[np.float64]:
    """AUC of each weighted resample (rows of ``weights``), ties counted one half.

    Hand-written (Mann–Whitney with weights over tied score groups) so that
    1,000 resamples cost one sort plus a few matrix sums; equals
    ``roc_auc_score(y, s, sample_weight=w)`` (tested).
    """
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=float)
    w = np.atleast_2d(np.asarray(weights, dtype=float))
    order, starts = _score_groups(s)
    wp = np.add.reduceat((w * y)[:, order], starts, axis=1)
    wn = np.add.reduceat((w * ~y)[:, order], starts, axis=1)
    below = np.cumsum(wn, axis=1) - wn  # negative weight strictly below each group
    num = np.sum(wp * (below + 0.5 * wn), axis=1)
    den = wp.sum(axis=1) * wn.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def weighted_roc_band(
    labels: ArrayLike,
    scores: ArrayLike,
    weights: NDArray[np.float64],
    grid: NDArray[np.float64] | None = None,
    alpha: float = 0.05,
) -> dict[str, NDArray[np.float64]]:
    """Pointwise percentile band of TPR at fixed FPR over bootstrap resamples."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=float)
    w = np.atleast_2d(np.asarray(weights, dtype=float))
    grid = np.linspace(0.0, 1.0, 101) if grid is None else grid
    order, starts = _score_groups(-s)  # descending scores: ROC walks down the cut-off
    wp = np.add.reduceat((w * y)[:, order], starts, axis=1)
    wn = np.add.reduceat((w * ~y)[:, order], starts, axis=1)
    tpr = np.cumsum(wp, axis=1) / wp.sum(axis=1, keepdims=True)
    fpr = np.cumsum(wn, axis=1) / wn.sum(axis=1, keepdims=True)
    tpr = np.hstack([np.zeros((w.shape[0], 1)), tpr])
    fpr = np.hstack([np.zeros((w.shape[0], 1)), fpr])
    # ``interp`` needs increasing x; ties in FPR at vertical steps take the max TPR there
    band = np.empty((w.shape[0], grid.size))
    for b in range(w.shape[0]):
        band[b] = np.interp(grid, fpr[b], tpr[b], left=0.0, right=1.0)
    return {
        "fpr": grid,
        "tpr_lo": np.percentile(band, 100 * alpha / 2, axis=0),
        "tpr_hi": np.percentile(band, 100 * (1 - alpha / 2), axis=0),
    }


def weighted_f1(
    labels: ArrayLike, scores: ArrayLike, weights: NDArray[np.float64], threshold: float
) -> NDArray[np.float64]:
    y = np.asarray(labels).astype(bool)
    pred = np.asarray(scores, dtype=float) >= threshold
    w = np.atleast_2d(np.asarray(weights, dtype=float))
    tp = w @ (pred & y).astype(float)
    fp = w @ (pred & ~y).astype(float)
    fn = w @ (~pred & y).astype(float)
    den = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, 2 * tp / np.where(den > 0, den, 1.0), np.nan)


def percentile_ci(values: NDArray[np.float64], alpha: float = 0.05) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return (math.nan, math.nan)
    lo, hi = np.percentile(v, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return (float(lo), float(hi))


# --------------------------------------------------------------------------
# Everything for one set of predictions
# --------------------------------------------------------------------------
@dataclass
class BinaryResult:
    """All metrics of one model on one set of cases at one cut-off."""

    n: int
    n_pos: int
    n_neg: int
    threshold: float
    confusion: Confusion | None
    estimates: dict[str, Estimate]
    average_precision: float
    brier: float
    calibration: dict[str, list[float]]
    bootstrap: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "n_pos": self.n_pos,
            "n_neg": self.n_neg,
            "threshold": self.threshold,
            "confusion": asdict(self.confusion) if self.confusion else None,
            "metrics": {k: v.to_dict() for k, v in self.estimates.items()},
            "average_precision": None if math.isnan(self.average_precision) else self.average_precision,
            "brier": None if math.isnan(self.brier) else self.brier,
            "calibration": self.calibration,
            "bootstrap": self.bootstrap,
            "notes": list(self.notes),
        }


def evaluate_binary(
    labels: ArrayLike,
    scores: ArrayLike,
    *,
    groups: ArrayLike | None = None,
    threshold: float = 0.5,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    boot: BootstrapWeights | None = None,
) -> BinaryResult:
    """Confusion counts, Wilson CIs, bootstrap AUC/F1 CIs, AP, Brier, calibration.

    Undefined quantities (one class, empty set) come back as NaN with a note,
    never as an exception, so a subgroup with one class still gets a row.
    """
    y = np.asarray(labels).astype(int)
    s = np.asarray(scores, dtype=float)
    n, n_pos = int(y.size), int(y.sum())
    notes: list[str] = []
    if n == 0:
        nan = Estimate(math.nan, note="no cases")
        return BinaryResult(0, 0, 0, threshold, None, {k: nan for k in (*PROPORTIONS, "f1", "auc")}, math.nan, math.nan,
                            calibration(y, s), {"n_boot": 0}, ["no cases"])
    conf = confusion(y, s, threshold)
    ests: dict[str, Estimate] = dict(conf.proportions(alpha))
    two = _two_classes(y)
    if not two:
        notes.append("only one class present: AUC and AP are undefined")
    if boot is None and n_boot > 0 and two:
        boot = bootstrap_weights(y, groups, n_boot=n_boot, seed=seed)
    binfo: dict[str, Any] = {"n_boot": 0}
    f1_ci = auc_ci = (math.nan, math.nan)
    if boot is not None and boot.weights.shape[0] > 0:
        aucs = weighted_auc(y, s, boot.weights)
        f1s = weighted_f1(y, s, boot.weights, threshold)
        auc_ci, f1_ci = percentile_ci(aucs, alpha), percentile_ci(f1s, alpha)
        binfo = {
            "n_boot": int(boot.weights.shape[0]),
            "requested": boot.requested,
            "unit": boot.unit,
            "n_units": boot.n_units,
            "redrawn_single_class": boot.redrawn,
            "shortfall": boot.shortfall,
            "seed": seed,
            "method": "percentile",
        }
        if boot.shortfall:
            notes.append(f"bootstrap: only {boot.weights.shape[0]} of {boot.requested} resamples held both classes")
    auc = auc_point(y, s)
    ests["auc"] = Estimate(auc, *auc_ci, method="bootstrap" if binfo["n_boot"] else "",
                           note="" if two else "one class: undefined")
    ests["f1"] = Estimate(conf.f1, *f1_ci, method="bootstrap" if binfo["n_boot"] else "")
    return BinaryResult(
        n=n, n_pos=n_pos, n_neg=n - n_pos, threshold=float(threshold), confusion=conf,
        estimates=ests, average_precision=average_precision(y, s), brier=brier(y, s),
        calibration=calibration(y, s), bootstrap=binfo, notes=notes,
    )


# --------------------------------------------------------------------------
# Score distributions and drift (model card, monitoring)
# --------------------------------------------------------------------------
PSI_BINS = 10


def score_histogram(scores: ArrayLike, n_bins: int = PSI_BINS) -> dict[str, list[float] | list[int]]:
    """Counts of scores in ``n_bins`` equal-width bins on [0, 1] (the last bin closed).

    Equal-width rather than reference-quantile bins so that a histogram stored in a
    model card years ago and one computed today share their edges exactly.
    """
    s = np.asarray(scores, dtype=float)
    s = s[np.isfinite(s)]
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    counts, _ = np.histogram(np.clip(s, 0.0, 1.0), bins=edges)
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}


def population_stability_index(expected: ArrayLike, actual: ArrayLike, eps: float = 1e-4) -> float:
    """PSI = Σ (a − e) · ln(a / e) over bins, from two count (or share) vectors on the same bins.

    Empty bins get the share ``eps`` so the logarithm stays finite (the usual
    convention). Rules of thumb: < 0.1 stable, 0.1–0.25 a moderate shift, > 0.25 a
    major one. NaN when either side has no counts.
    """
    e = np.asarray(expected, dtype=float)
    a = np.asarray(actual, dtype=float)
    if e.shape != a.shape:
        raise ValueError(f"PSI needs the same bins on both sides, got {e.shape} and {a.shape}")
    if e.sum() <= 0 or a.sum() <= 0:
        return math.nan
    e = np.maximum(e / e.sum(), eps)
    a = np.maximum(a / a.sum(), eps)
    return float(np.sum((a - e) * np.log(a / e)))
