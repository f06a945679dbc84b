"""Score -> probability maps fitted on a site's own DXA-paired results (or its estimated prevalence).

A recalibration is a monotone map from the model's score (its P(positive)) to a probability that
holds at this site. Four kinds, each a small JSON-able dict so it can live in a site profile:

- ``identity``: the model's own probability;
- ``platt``: logistic recalibration on the logit of the score, ``P = sigmoid(a + b*logit(s))``,
  fitted with Platt's (1999) smoothed targets so a small or separable sample cannot drive it to
  0/1 (scikit-learn's ``LogisticRegression``, unpenalised);
- ``isotonic``: scikit-learn's ``IsotonicRegression`` (non-decreasing step-linear map), outputs
  kept inside ``[ISOTONIC_EPS, 1 - ISOTONIC_EPS]`` because a finite sample never justifies certainty;
- ``prior_shift``: Bayes' rule for a new prevalence (label shift): ``logit P = logit s +
  logit(pi_site) - logit(pi_train)`` (Saerens, Latinne & Decaestecker 2002), for sites without labels.

:func:`choose_recalibration` picks among identity, Platt and isotonic by cross-validated log-loss
(Brier reported beside it), so a small sample gets the two-parameter map and a large one may earn
the flexible one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from bonescreen.errors import BonescreenError
from bonescreen.evaluate.metrics import LOGIT_EPS, logit

EPS = LOGIT_EPS
ISOTONIC_EPS = 1e-3
METHODS = ("identity", "platt", "isotonic", "prior_shift")


class CalibrationError(BonescreenError):
    """The local data cannot support a recalibration (too few pairs, one class, ...)."""

    reason = "calibration"


def sigmoid(x: ArrayLike) -> NDArray[np.float64]:
    z = np.asarray(x, dtype=float)
    p: NDArray[np.float64] = np.exp(-np.logaddexp(0.0, -z))
    return p


@dataclass(frozen=True)
class Recalibration:
    """A fitted score -> probability map (``params`` are plain floats/lists: JSON-able)."""

    method: str = "identity"
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise CalibrationError(f"unknown recalibration {self.method!r}; expected one of {METHODS}")

    @property
    def shift(self) -> float:
        """A logit offset applied after the map (Bayes' rule for another prevalence); 0 when none."""
        return float(self.params.get("shift", 0.0))

    def apply(self, scores: ArrayLike) -> NDArray[np.float64]:
        p = self._map(np.asarray(scores, dtype=float))
        return sigmoid(logit(p) + self.shift) if self.shift else p

    def _map(self, s: NDArray[np.float64]) -> NDArray[np.float64]:
        if self.method in ("identity", "prior_shift"):
            return s.copy()
        if self.method == "platt":
            return sigmoid(self.params["a"] + self.params["b"] * logit(s))
        x = np.asarray(self.params["x"], dtype=float)
        y = np.asarray(self.params["y"], dtype=float)
        p: NDArray[np.float64] = np.clip(np.interp(s, x, y), ISOTONIC_EPS, 1.0 - ISOTONIC_EPS)
        return p

    def score_for(self, probability: float) -> float:
        """The score whose recalibrated probability is ``probability`` (the map is monotone).

        Platt / prior shift invert in closed form; isotonic (flat steps) returns the lowest score
        reaching ``probability``, found on its own knots.
        """
        p = float(probability)
        if self.shift:
            p = float(sigmoid(logit(p) - self.shift))
        if self.method in ("identity", "prior_shift"):
            return p
        if self.method == "platt":
            b = float(self.params["b"])
            if b <= 0:
                raise CalibrationError("a Platt map with a non-positive slope cannot be inverted")
            return float(sigmoid((logit(p) - self.params["a"]) / b))
        x = np.asarray(self.params["x"], dtype=float)
        y = np.clip(np.asarray(self.params["y"], dtype=float), ISOTONIC_EPS, 1.0 - ISOTONIC_EPS)
        above = np.flatnonzero(y >= p)
        if above.size == 0:
            return 1.0
        j = int(above[0])
        if j == 0:
            return float(x[0]) if p >= y[0] - 1e-12 else 0.0
        # linear piece between knots j-1 and j
        y0, y1, x0, x1 = y[j - 1], y[j], x[j - 1], x[j]
        return float(x0 + (p - y0) / (y1 - y0) * (x1 - x0)) if y1 > y0 else float(x1)

    def with_prior(self, from_prior: float, to_prior: float) -> Recalibration:
        """This map followed by Bayes' rule from prevalence ``from_prior`` to ``to_prior``."""
        for name, v in (("from", from_prior), ("to", to_prior)):
            if not 0.0 < float(v) < 1.0:
                raise CalibrationError(f"{name} prevalence must be in (0, 1), got {v}")
        params = dict(self.params)
        params["shift"] = self.shift + float(logit(to_prior)[()] - logit(from_prior)[()])
        params["prior_from"], params["prior_to"] = float(from_prior), float(to_prior)
        return Recalibration("prior_shift" if self.method == "identity" else self.method, params)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "params": dict(self.params)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recalibration:
        return cls(str(d.get("method", "identity")), dict(d.get("params") or {}))


def _check(labels: ArrayLike, scores: ArrayLike, min_per_class: int = 1) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    y = np.asarray(labels).astype(int)
    s = np.asarray(scores, dtype=float)
    if y.shape != s.shape or y.ndim != 1:
        raise CalibrationError(f"labels and scores must be 1-D of one length, got {y.shape} and {s.shape}")
    if not np.all(np.isfinite(s)):
        raise CalibrationError("scores must be finite")
    if not np.isin(y, (0, 1)).all():
        raise CalibrationError("labels must be 0 or 1")
    n_pos = int(y.sum())
    if min(n_pos, y.size - n_pos) < min_per_class:
        raise CalibrationError(
            f"recalibration needs both classes (at least {min_per_class} each); got {n_pos} positive "
            f"and {y.size - n_pos} negative"
        )
    return y, s


def one_thread(fn: Any) -> Any:
    """Run ``fn`` with one BLAS thread: these fits are tiny, and BLAS threads on a busy machine
    cost 10-50x the work (measured: a 200-pair Platt fit 0.86 s vs 0.015 s)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1):
            return fn(*args, **kwargs)

    return wrapper


@one_thread
def fit_platt(labels: ArrayLike, scores: ArrayLike) -> Recalibration:
    """Platt scaling on the logit of the score, with Platt's smoothed targets.

    Each case enters twice, as positive with weight ``t`` and negative with ``1 - t``, where
    ``t = (N+ + 1) / (N+ + 2)`` for positives and ``1 / (N- + 2)`` for negatives (Platt 1999):
    the maximum-likelihood fit of those soft targets, which stays finite under separation.
    """
    from sklearn.linear_model import LogisticRegression

    y, s = _check(labels, scores)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    t = np.where(y == 1, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))
    x = logit(s)[:, None]
    xx = np.vstack([x, x])
    yy = np.r_[np.ones(y.size), np.zeros(y.size)]
    ww = np.r_[t, 1.0 - t]
    lr = LogisticRegression(C=np.inf, max_iter=1000).fit(xx, yy, sample_weight=ww)
    return Recalibration("platt", {"a": float(lr.intercept_[0]), "b": float(lr.coef_[0, 0])})


def fit_isotonic(labels: ArrayLike, scores: ArrayLike) -> Recalibration:
    """Isotonic regression of the outcome on the score (scikit-learn), stored as its knots."""
    from sklearn.isotonic import IsotonicRegression

    y, s = _check(labels, scores)
    iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip").fit(s, y)
    return Recalibration("isotonic", {"x": [float(v) for v in iso.X_thresholds_],
                                      "y": [float(v) for v in iso.y_thresholds_]})


def prior_shift(train_prior: float, site_prior: float) -> Recalibration:
    """Bayes' rule for a new prevalence: the logit moves by ``logit(site) - logit(train)``."""
    return Recalibration("identity").with_prior(train_prior, site_prior)


FITTERS = {"identity": lambda y, s: Recalibration("identity"), "platt": fit_platt, "isotonic": fit_isotonic}


def log_loss(labels: ArrayLike, probs: ArrayLike) -> float:
    from sklearn.metrics import log_loss as _ll

    p = np.clip(np.asarray(probs, dtype=float), EPS, 1.0 - EPS)
    return float(_ll(np.asarray(labels).astype(int), p, labels=[0, 1]))


@dataclass
class CalibrationChoice:
    """The chosen map (refitted on all pairs) and the cross-validated table that chose it."""

    recalibration: Recalibration
    cv: dict[str, dict[str, float]]  # method -> {"log_loss", "brier"}
    folds: int
    criterion: str = "log_loss"

    def to_dict(self) -> dict[str, Any]:
        return {"chosen": self.recalibration.method, "criterion": self.criterion, "folds": self.folds,
                "cv": self.cv}


@one_thread
def choose_recalibration(
    labels: ArrayLike,
    scores: ArrayLike,
    *,
    methods: tuple[str, ...] = ("identity", "platt", "isotonic"),
    folds: int = 5,
    seed: int = 0,
    groups: ArrayLike | None = None,
) -> CalibrationChoice:
    """Pick the map with the lowest cross-validated log-loss; refit it on every pair.

    Stratified k-fold (grouped by patient when ``groups`` is given, so two images of one patient
    never sit on both sides); ``folds`` shrinks to the smaller class count when that is lower.
    Ties go to the simpler map (the order of ``methods``).
    """
    from sklearn.metrics import brier_score_loss
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    y, s = _check(labels, scores, min_per_class=2)
    unknown = [m for m in methods if m not in FITTERS]
    if unknown:
        raise CalibrationError(f"cannot choose among {unknown}; choose from {sorted(FITTERS)}")
    k = int(min(folds, y.sum(), y.size - y.sum()))
    if groups is not None:
        splitter: Any = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        splits = list(splitter.split(s, y, np.asarray(groups).astype(str)))
    else:
        splits = list(StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(s, y))
    cv: dict[str, dict[str, float]] = {}
    for m in methods:
        held = np.full(y.size, np.nan)
        for tr, te in splits:
            if len(np.unique(y[tr])) < 2:
                continue
            held[te] = FITTERS[m](y[tr], s[tr]).apply(s[te])
        ok = np.isfinite(held)
        cv[m] = {"log_loss": log_loss(y[ok], held[ok]),
                 "brier": float(brier_score_loss(y[ok], held[ok], pos_label=1)), "n": int(ok.sum())}
    best = min(methods, key=lambda m: (round(cv[m]["log_loss"], 12), methods.index(m)))
    return CalibrationChoice(FITTERS[best](y, s), cv, k)


def nan_to_none(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)
