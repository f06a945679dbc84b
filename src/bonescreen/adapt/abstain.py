"""The abstain band: near the cut-off the result is "indeterminate: consider DXA", not a forced class.

A band is an interval ``[low, high)`` on the score the decision is made on (the model's score, or
the adapted model's under a site profile). A stage-2 decision whose score falls inside becomes the
category ``indeterminate`` with the message :data:`INDETERMINATE_MESSAGE`. Such a row keeps
``flag = True``: the action the screen recommends for it is the same as for a positive (a DXA),
so a worklist sorted by flag shows it, and nobody near the cut-off is silently reassured.

Two ways to set the band, both ending as ``[low, high)`` on the score:

- in probability: the cases whose (site-recalibrated) probability lies within ``width`` of the
  cut-off's probability (:func:`band_from_probability`);
- in sensitivity/specificity, from DXA-paired results: below ``low`` the screen keeps sensitivity
  ``>= sensitivity`` (few positives called normal), above ``high`` it keeps specificity
  ``>= specificity`` (few normals flagged) (:func:`band_from_rates`).

:func:`apply_band` is pure: the screening engine's decide step calls it on the rows it made.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from bonescreen.adapt.recalibrate import CalibrationError, Recalibration
from bonescreen.schema import INDETERMINATE

INDETERMINATE_MESSAGE = "indeterminate: consider DXA"
#: The ``reason`` of an indeterminate row (an eligible row with a reason, like an OOD-flagged one).
ABSTAIN_REASON = "abstain_band"
#: Only the two-class stage-2 decision abstains; stage 1's osteoporosis call keeps its own cut-off.
BAND_CATEGORIES = ("normal", "low_bone_mass")
BASES = ("score", "probability", "rates")


@dataclass(frozen=True)
class AbstainBand:
    """``low <= score < high`` -> indeterminate. ``basis`` and ``params`` say how it was set."""

    low: float
    high: float
    basis: str = "score"
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.basis not in BASES:
            raise CalibrationError(f"abstain band basis must be one of {BASES}, got {self.basis!r}")
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or self.low > self.high:
            raise CalibrationError(f"abstain band needs finite low <= high, got [{self.low}, {self.high})")

    @property
    def empty(self) -> bool:
        return self.high <= self.low

    def contains(self, scores: ArrayLike) -> np.ndarray:
        s = np.asarray(scores, dtype=float)
        return (s >= self.low) & (s < self.high)

    def to_dict(self) -> dict[str, Any]:
        return {"low": float(self.low), "high": float(self.high), "basis": self.basis, "params": dict(self.params)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> AbstainBand | None:
        if not d:
            return None
        return cls(float(d["low"]), float(d["high"]), str(d.get("basis", "score")), dict(d.get("params") or {}))


def band_from_probability(threshold: float, width: float, recalibration: Recalibration | None = None
                          ) -> AbstainBand:
    """Cases whose probability is within ``width`` of the cut-off's probability abstain.

    ``threshold`` is on the score scale; ``recalibration`` maps score -> probability (identity
    when None), and its inverse maps the band's probability edges back to scores.
    """
    if not 0.0 < width < 1.0:
        raise CalibrationError(f"abstain width must be in (0, 1), got {width}")
    rec = recalibration or Recalibration("identity")
    p_cut = float(rec.apply([threshold])[0])
    p_lo, p_hi = max(0.0, p_cut - width), min(1.0, p_cut + width)
    lo = rec.score_for(p_lo) if p_lo > 0 else 0.0
    hi = rec.score_for(p_hi) if p_hi < 1 else 1.0 + 1e-9
    lo, hi = min(lo, threshold), max(hi, threshold)
    return AbstainBand(lo, hi, "probability", {"width": float(width), "probability_low": p_lo,
                                               "probability_high": p_hi, "probability_cut": p_cut})


def band_from_rates(labels: ArrayLike, scores: ArrayLike, *, sensitivity: float, specificity: float,
                    threshold: float | None = None) -> AbstainBand:
    """From DXA-paired results: decide "normal" only below a cut-off that keeps ``sensitivity``,
    "low bone mass" only above one that keeps ``specificity``; between them, abstain.

    When the two cut-offs cross (the model already meets both targets with one cut-off) the band
    is empty at that cut-off. ``threshold`` (the operating cut-off), when given, is kept inside.
    """
    from bonescreen.evaluate.metrics import sensitivity_threshold, specificity_threshold

    lo = sensitivity_threshold(labels, scores, sensitivity)
    hi = specificity_threshold(labels, scores, specificity)
    if hi < lo:
        mid = threshold if threshold is not None else (lo + hi) / 2.0
        lo = hi = float(mid)
    if threshold is not None:
        lo, hi = min(lo, threshold), max(hi, threshold)
    return AbstainBand(float(lo), float(hi), "rates", {"sensitivity": float(sensitivity),
                                                       "specificity": float(specificity)})


def apply_band(rows: Sequence[dict[str, Any]], band: AbstainBand | None, *, score_key: str = "score"
               ) -> list[dict[str, Any]]:
    """Rows from the decide step with stage-2 decisions inside ``band`` turned indeterminate (new dicts).

    Rows whose category is not a stage-2 class (osteoporosis from stage 1, skips) are untouched, as
    are rows without a score. A changed row gets ``category = "indeterminate"``, ``flag = True``,
    ``indeterminate = True``, ``reason = "abstain_band"`` (unless it had one) and the recommendation
    in ``message``; every other row
    ``indeterminate = False``.
    """
    out: list[dict[str, Any]] = []
    for row in rows:
        new = dict(row)
        s = row.get(score_key)
        hit = (band is not None and row.get("category") in BAND_CATEGORIES and s is not None
               and not (isinstance(s, float) and math.isnan(s)) and bool(band.contains([float(s)])[0]))
        new["indeterminate"] = hit
        if hit:
            new["category"] = INDETERMINATE
            new["flag"] = True
            new["reason"] = row.get("reason") or ABSTAIN_REASON
            msg = str(row.get("message") or "")
            new["message"] = f"{msg}; {INDETERMINATE_MESSAGE}" if msg else INDETERMINATE_MESSAGE
        out.append(new)
    return out


def classify(scores: ArrayLike, threshold: float, band: AbstainBand | None = None) -> np.ndarray:
    """Per score: 1 (positive), 0 (negative) or -1 (indeterminate); the array form of the decision."""
    s = np.asarray(scores, dtype=float)
    out = (s >= threshold).astype(int)
    if band is not None:
        out[band.contains(s)] = -1
    return out


def band_summary(labels: ArrayLike, scores: ArrayLike, threshold: float, band: AbstainBand | None
                 ) -> dict[str, Any]:
    """What a band costs and buys on labelled cases: how many abstain, and sens/spec without them.

    ``decided``: sensitivity/specificity among cases given a class. ``referred``: counting an
    indeterminate case as referred for DXA (positive), which is what the screen does with it.
    """
    from bonescreen.evaluate.metrics import proportion

    y = np.asarray(labels).astype(int)
    c = classify(scores, threshold, band)
    ind = c == -1
    dec = ~ind
    ref = c != 0
    pos, neg = y == 1, y == 0
    return {
        "n": int(y.size),
        "n_indeterminate": int(ind.sum()),
        "indeterminate": proportion(int(ind.sum()), int(y.size)).to_dict(),
        "indeterminate_positive": int((ind & pos).sum()),
        "indeterminate_negative": int((ind & neg).sum()),
        "decided": {
            "sensitivity": proportion(int((dec & pos & (c == 1)).sum()), int((dec & pos).sum())).to_dict(),
            "specificity": proportion(int((dec & neg & (c == 0)).sum()), int((dec & neg).sum())).to_dict(),
        },
        "referred": {
            "sensitivity": proportion(int((pos & ref).sum()), int(pos.sum())).to_dict(),
            "specificity": proportion(int((neg & ~ref).sum()), int(neg.sum())).to_dict(),
        },
    }


def count_indeterminate(rows: Iterable[Mapping[str, Any]]) -> int:
    """How many rows abstained (for summaries)."""
    return sum(1 for r in rows if r.get("category") == INDETERMINATE)
