"""Decision-curve analysis: is referring on the model's score worth more than the alternatives?

Net benefit at threshold probability ``pt`` (Vickers & Elkin 2006)::

    NB(pt) = TP/n − FP/n · pt / (1 − pt)

``pt`` is the risk at which a clinician is indifferent between referring for
DXA and not; ``pt/(1−pt)`` is the exchange rate: how many unnecessary DXA scans
one found case is worth (pt = 0.2: four). Strategies compared at every ``pt``:

* **model**: refer when ``score ≥ pt`` (the score read as a probability; a
  miscalibrated score shows up here as lost net benefit);
* **refer all**: ``NB = prevalence − (1 − prevalence) · pt/(1 − pt)``;
* **refer none**: ``NB = 0``;
* **age/sex rule**: refer every woman aged ≥ 65 and every man aged ≥ 70 (the
  common DXA screening recommendation), whatever ``pt``: its TP and FP are
  fixed, so its curve is a straight line in ``pt/(1−pt)``.

Hand-written: the formula is one line and no well-kept Python library ships
DCA (``dcurves`` is a small single-maintainer package); tested against
hand-computed net benefit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

#: Threshold probabilities of the curve (figure and ``metrics.json``).
DCA_THRESHOLDS: tuple[float, ...] = tuple(round(0.01 * k, 2) for k in range(1, 81))
#: Threshold probabilities shown in the report's net-benefit table.
DCA_TABLE_THRESHOLDS: tuple[float, ...] = (0.05, 0.10, 0.20, 0.30, 0.40, 0.50)
#: (women, men): refer at this age or older.
DEFAULT_REFERRAL_AGES: tuple[float, float] = (65.0, 70.0)


def net_benefit(labels: ArrayLike, refer: ArrayLike, pt: float) -> float:
    """Net benefit of referring the rows where ``refer`` is true, at threshold probability ``pt``."""
    if not 0.0 < pt < 1.0:
        raise ValueError(f"threshold probability must be in (0, 1), got {pt}")
    y = np.asarray(labels).astype(bool)
    r = np.asarray(refer).astype(bool)
    n = y.size
    if n == 0:
        return math.nan
    tp = float(np.sum(r & y))
    fp = float(np.sum(r & ~y))
    return tp / n - fp / n * pt / (1.0 - pt)


def net_benefit_curve(labels: ArrayLike, scores: ArrayLike, thresholds: Sequence[float] = DCA_THRESHOLDS
                      ) -> NDArray[np.float64]:
    """Net benefit of "refer when score ≥ pt" at each ``pt``."""
    s = np.asarray(scores, dtype=float)
    return np.array([net_benefit(labels, s >= pt, pt) for pt in thresholds])


def refer_all_curve(labels: ArrayLike, thresholds: Sequence[float] = DCA_THRESHOLDS) -> NDArray[np.float64]:
    y = np.asarray(labels).astype(bool)
    return np.array([net_benefit(y, np.ones_like(y), pt) for pt in thresholds])


def age_sex_rule(sex: ArrayLike, age: ArrayLike, ages: tuple[float, float] = DEFAULT_REFERRAL_AGES
                 ) -> NDArray[np.bool_]:
    """True for women aged ≥ ``ages[0]`` and men aged ≥ ``ages[1]`` (sex ``F``/``M``; others never)."""
    sx = np.asarray(sex, dtype=object)
    a = np.asarray(age, dtype=float)
    with np.errstate(invalid="ignore"):
        return ((sx == "F") & (a >= ages[0])) | ((sx == "M") & (a >= ages[1]))


@dataclass
class DecisionCurve:
    """Net benefit of each strategy at each threshold probability, for one model on one dataset."""

    thresholds: list[float]
    strategies: dict[str, list[float]]  # name -> NB per threshold ("model", "refer all", "refer none", rule)
    n: int
    prevalence: float
    rule: str | None = None
    rule_referred: float | None = None  # share of rows the rule refers
    n_left_out: int = 0  # rows without sex/age, left out of every curve so all compare on the same rows
    notes: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"thresholds": self.thresholds, "net_benefit": self.strategies, "n": self.n,
                "prevalence": self.prevalence, "rule": self.rule, "rule_referred": self.rule_referred,
                "n_left_out": self.n_left_out, "notes": list(self.notes or [])}

    def at(self, pt: float) -> dict[str, float]:
        i = int(np.argmin(np.abs(np.asarray(self.thresholds) - pt)))
        return {k: v[i] for k, v in self.strategies.items()}


def decision_curve(
    labels: ArrayLike,
    scores: ArrayLike,
    *,
    sex: ArrayLike | None = None,
    age: ArrayLike | None = None,
    referral_ages: tuple[float, float] | None = DEFAULT_REFERRAL_AGES,
    thresholds: Sequence[float] = DCA_THRESHOLDS,
    model_name: str = "model",
) -> DecisionCurve:
    """Model vs refer-all vs refer-none (vs the age/sex rule when ``sex`` and ``age`` are given)."""
    y = np.asarray(labels).astype(int)
    s = np.asarray(scores, dtype=float)
    notes: list[str] = []
    rule_name = None
    keep = np.ones(y.size, dtype=bool)
    use_rule = referral_ages is not None and sex is not None and age is not None
    if use_rule:
        sx = np.asarray(sex, dtype=object)
        a = np.asarray(age, dtype=float)
        keep = np.isin(sx, ["F", "M"]) & np.isfinite(a)
        if not keep.any():
            use_rule = False
            keep = np.ones(y.size, dtype=bool)
            notes.append("no row has both sex (F/M) and age: the age/sex rule is not shown")
        elif not keep.all():
            notes.append(f"{int((~keep).sum())} row(s) without sex or age left out of every curve "
                         "(so that all strategies are compared on the same patients)")
    elif referral_ages is not None:
        notes.append("no sex or age column: the age/sex rule is not shown")
    y, s = y[keep], s[keep]
    th = [float(t) for t in thresholds]
    strategies = {
        model_name: net_benefit_curve(y, s, th).tolist(),
        "refer all": refer_all_curve(y, th).tolist(),
        "refer none": [0.0] * len(th),
    }
    referred = None
    if use_rule:
        assert referral_ages is not None
        rule = age_sex_rule(np.asarray(sex, dtype=object)[keep], np.asarray(age, dtype=float)[keep], referral_ages)
        rule_name = f"women ≥ {referral_ages[0]:g}, men ≥ {referral_ages[1]:g}"
        strategies[rule_name] = [net_benefit(y, rule, pt) for pt in th]
        referred = float(rule.mean()) if rule.size else None
    return DecisionCurve(th, strategies, int(y.size), float(y.mean()) if y.size else math.nan, rule_name,
                         referred, int((~keep).sum()), notes)
