"""Prevalence at a site without labels: EM on the model's posteriors (Saerens, Latinne & Decaestecker 2002).

If the model's posteriors ``p_i = P_train(y=1 | x_i)`` are calibrated for its training prevalence
``pi_train`` and only the prevalence differs at the new site (label shift), the site's posteriors are
Bayes' rule with the new prior, and the site prevalence is the fixed point of

    pi <- mean_i  w1 p_i / (w1 p_i + w0 (1 - p_i)),   w1 = pi / pi_train,  w0 = (1 - pi) / (1 - pi_train)

which EM reaches from any start (the log-likelihood is concave in pi). Written out here (a dozen
lines) because no maintained library implements it for pre-computed posteriors; it is run
vectorised over bootstrap resamples for a percentile interval.

What the interval does *not* cover: if the posteriors are miscalibrated at the site (a new vendor
shifts every score), the estimate is biased, whatever its interval says. That is why label-free
adaptation re-centres the model first and reports both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from bonescreen.adapt.recalibrate import EPS, CalibrationError


def _em(p: NDArray[np.float64], w: NDArray[np.float64], train_prior: float, start: NDArray[np.float64],
        tol: float, max_iter: int) -> tuple[NDArray[np.float64], int, bool]:
    """EM for each row of weights ``w`` (B, n) at once; returns (pi (B,), iterations, converged)."""
    pi = start.copy()
    tot = w.sum(axis=1)
    for it in range(1, max_iter + 1):
        w1 = (pi / train_prior)[:, None]
        w0 = ((1.0 - pi) / (1.0 - train_prior))[:, None]
        post = w1 * p / (w1 * p + w0 * (1.0 - p))
        new = np.clip((w * post).sum(axis=1) / tot, EPS, 1.0 - EPS)
        if np.max(np.abs(new - pi)) < tol:
            return new, it, True
        pi = new
    return pi, max_iter, False


def em_prevalence(scores: ArrayLike, train_prior: float, *, tol: float = 1e-7, max_iter: int = 10_000
                  ) -> tuple[float, int, bool]:
    """(site prevalence, iterations, converged) from posteriors ``scores`` of a model trained at ``train_prior``."""
    p = _posteriors(scores)
    _check_prior(train_prior)
    pi, it, ok = _em(p[None, :], np.ones((1, p.size)), float(train_prior), np.array([float(train_prior)]),
                     tol, max_iter)
    return float(pi[0]), it, ok


def adjust_posteriors(scores: ArrayLike, train_prior: float, site_prior: float) -> NDArray[np.float64]:
    """Bayes' rule: posteriors for ``site_prior`` from posteriors made at ``train_prior``."""
    p = _posteriors(scores)
    w1 = site_prior / train_prior
    w0 = (1.0 - site_prior) / (1.0 - train_prior)
    return w1 * p / (w1 * p + w0 * (1.0 - p))


@dataclass(frozen=True)
class PrevalenceEstimate:
    value: float
    lo: float
    hi: float
    train_prior: float
    n: int
    iterations: int
    converged: bool
    n_boot: int
    method: str = "EM (Saerens, Latinne & Decaestecker 2002), bootstrap percentile 95% CI"
    mean_score: float = float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("value", "lo", "hi", "train_prior", "n", "iterations", "converged",
                                               "n_boot", "method", "mean_score")}


def estimate_prevalence(scores: ArrayLike, train_prior: float, *, n_boot: int = 1000, seed: int = 0,
                        alpha: float = 0.05) -> PrevalenceEstimate:
    """EM estimate with a bootstrap percentile interval (images resampled with replacement)."""
    p = _posteriors(scores)
    _check_prior(train_prior)
    value, it, ok = em_prevalence(p, train_prior)
    lo = hi = float("nan")
    if n_boot > 0:
        rng = np.random.default_rng(seed)
        chunk = max(1, 2_000_000 // p.size)  # bounded memory for archive-sized sites
        parts = []
        for start in range(0, n_boot, chunk):
            b = min(chunk, n_boot - start)
            idx = rng.integers(0, p.size, size=(b, p.size))
            w = np.stack([np.bincount(row, minlength=p.size) for row in idx]).astype(float)
            parts.append(_em(p[None, :], w, float(train_prior), np.full(b, value), 1e-7, 10_000)[0])
        boot = np.concatenate(parts)
        lo, hi = (float(v) for v in np.percentile(boot, [100 * alpha / 2, 100 * (1 - alpha / 2)]))
    return PrevalenceEstimate(value, lo, hi, float(train_prior), int(p.size), it, ok, int(n_boot),
                              mean_score=float(p.mean()))


def _posteriors(scores: ArrayLike) -> NDArray[np.float64]:
    p = np.asarray(scores, dtype=float).ravel()
    if p.size == 0:
        raise CalibrationError("no scores to estimate a prevalence from")
    if not np.all(np.isfinite(p)) or p.min() < 0 or p.max() > 1:
        raise CalibrationError("scores must be probabilities in [0, 1]")
    clipped: NDArray[np.float64] = np.clip(p, EPS, 1.0 - EPS)
    return clipped


def _check_prior(train_prior: float) -> None:
    if not 0.0 < float(train_prior) < 1.0:
        raise CalibrationError(f"the model's training prevalence must be in (0, 1), got {train_prior}")


def training_prior(spec: Any) -> float | None:
    """The positive-class share of the model's training data, from its model card (None if absent)."""
    card = getattr(spec, "model_card", None) or {}
    data = (card.get("training_data") or {}).get("train") or {}
    per = data.get("per_class") or {}
    names = list(getattr(spec, "class_names", []) or [])
    pos = int(getattr(spec, "positive_class", 1))
    if not per or pos >= len(names) or names[pos] not in per:
        return None
    total = sum(int(v) for v in per.values())
    return float(per[names[pos]]) / total if total else None
