"""The age- and sex-matched BMD reference a DXA scanner uses, recovered from the training DXA table.

A scanner reports ``Z = (T(BMD) - mu(age, sex)) / sigma(age, sex)`` against its
reference database (``T`` the identity, or the log for a log-normal/LMS-type
reference with L = 0). The training DXA export holds BMD *and* Z for every
child, so for each sex ``T(BMD) = mu(age) + Z * sigma(age)`` is linear in the
unknown spline coefficients of mu and sigma and is fitted by least squares.
The model's predicted BMD then becomes a Z-score exactly as the scanner would
compute it, instead of asking the network to learn the division by an
age-dependent SD from a few hundred images.

The flexibility (transform, number of spline knots for mu and sigma) is chosen
by 5-fold cross-validation of the Z reconstruction error on the training
pairs. Everything is stored as plain floats/lists (``to_dict``) so it travels
in ``ModelSpec.extra`` of an artifact loaded with ``weights_only=True``.

Outside the training age range a curve is held constant at its end value
(splines extrapolate badly); a sex with too few rows uses the pooled curve.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

TRANSFORMS = ("linear", "log")
MU_DEGREE = 3  # cubic: the pubertal spurt is smooth but steep
SIGMA_DEGREE = 2
MU_KNOTS = (0, 1, 2, 3, 4, 5)  # interior knots tried (at age quantiles)
SIGMA_KNOTS = (0, 1, 2)
CV_FOLDS = 5
MIN_BMD = 1e-3  # g/cm^2: floor before the log (a predicted BMD can be <= 0)
SIGMA_FLOOR_FRAC = 0.05  # sigma(age) never below 5 % of its median (no division blow-up)


class ReferenceFitError(ValueError):
    """Too few or unusable (age, sex, BMD, Z) rows to fit a reference curve."""


def _knot_vector(ages: np.ndarray, n_interior: int, degree: int, lo: float, hi: float) -> np.ndarray:
    inner = np.quantile(ages, np.linspace(0, 1, n_interior + 2)[1:-1]) if n_interior else np.array([])
    inner = np.unique(inner[(inner > lo) & (inner < hi)])
    return np.concatenate([[lo] * (degree + 1), inner, [hi] * (degree + 1)])


def _design(age: np.ndarray, knots: np.ndarray, degree: int) -> np.ndarray:
    """B-spline basis (scipy) at ``age``, clamped to the knots' span (constant extrapolation)."""
    from scipy.interpolate import BSpline

    lo, hi = float(knots[degree]), float(knots[-degree - 1])
    a = np.clip(np.asarray(age, dtype=float), lo, hi)
    design: np.ndarray = BSpline.design_matrix(a, knots, degree).toarray()
    return design


def _transform(bmd: np.ndarray, name: str) -> np.ndarray:
    bmd = np.asarray(bmd, dtype=float)
    return np.log(np.maximum(bmd, MIN_BMD)) if name == "log" else bmd


@dataclass
class SexCurve:
    """mu(age) and sigma(age) of one sex on the ``transform`` scale."""

    transform: str
    mu_knots: list[float]
    mu_coef: list[float]
    sigma_knots: list[float]
    sigma_coef: list[float]
    sigma_floor: float
    n: int
    rmse_z: float  # cross-validated Z reconstruction error on the training pairs

    def mu(self, age: np.ndarray) -> np.ndarray:
        mu: np.ndarray = _design(age, np.asarray(self.mu_knots), MU_DEGREE) @ np.asarray(self.mu_coef)
        return mu

    def sigma(self, age: np.ndarray) -> np.ndarray:
        s = _design(age, np.asarray(self.sigma_knots), SIGMA_DEGREE) @ np.asarray(self.sigma_coef)
        sigma: np.ndarray = np.maximum(s, self.sigma_floor)
        return sigma

    def z(self, bmd: np.ndarray, age: np.ndarray) -> np.ndarray:
        z: np.ndarray = (_transform(bmd, self.transform) - self.mu(age)) / self.sigma(age)
        return z

    def bmd(self, z: np.ndarray, age: np.ndarray) -> np.ndarray:
        y = self.mu(age) + np.asarray(z, dtype=float) * self.sigma(age)
        bmd: np.ndarray = np.exp(y) if self.transform == "log" else y
        return bmd


def _fit_one(age: np.ndarray, z: np.ndarray, bmd: np.ndarray, transform: str, n_mu: int, n_sig: int,
             lo: float, hi: float, knots_from: np.ndarray) -> SexCurve | None:
    km = _knot_vector(knots_from, n_mu, MU_DEGREE, lo, hi)
    ks = _knot_vector(knots_from, n_sig, SIGMA_DEGREE, lo, hi)
    bm, bs = _design(age, km, MU_DEGREE), _design(age, ks, SIGMA_DEGREE)
    X = np.hstack([bm, z[:, None] * bs])
    if len(age) < 2 * X.shape[1]:
        return None
    coef, *_ = np.linalg.lstsq(X, _transform(bmd, transform), rcond=None)
    cm, cs = coef[: bm.shape[1]], coef[bm.shape[1]:]
    grid_sigma = _design(np.linspace(lo, hi, 50), ks, SIGMA_DEGREE) @ cs
    med = float(np.median(grid_sigma))
    if not np.isfinite(med) or med <= 0:
        return None  # sigma came out negative: Z and BMD disagree in this sample
    return SexCurve(transform, km.tolist(), cm.tolist(), ks.tolist(), cs.tolist(), SIGMA_FLOOR_FRAC * med,
                    len(age), float("nan"))


def fit_sex_curve(age: np.ndarray, z: np.ndarray, bmd: np.ndarray, *, seed: int = 0) -> SexCurve:
    """Best (transform, knots) by K-fold CV of the Z error, then refitted on all rows."""
    age, z, bmd = (np.asarray(v, dtype=float) for v in (age, z, bmd))
    ok = np.isfinite(age) & np.isfinite(z) & np.isfinite(bmd) & (bmd > 0)
    age, z, bmd = age[ok], z[ok], bmd[ok]
    if len(age) < 2 * (MU_DEGREE + 1 + SIGMA_DEGREE + 1):
        raise ReferenceFitError(f"{len(age)} usable (age, BMD, Z) rows: too few for a reference curve")
    if np.ptp(age) <= 0 or np.ptp(z) <= 0:
        raise ReferenceFitError("ages or Z-scores do not vary: mu and sigma are not identifiable")
    lo, hi = float(age.min()), float(age.max())
    folds = np.random.default_rng(seed).permutation(len(age)) % CV_FOLDS
    best: tuple[float, tuple[str, int, int]] | None = None
    for transform in TRANSFORMS:
        for n_mu in MU_KNOTS:
            for n_sig in SIGMA_KNOTS:
                sq, cnt = 0.0, 0
                for k in range(CV_FOLDS):
                    tr, te = folds != k, folds == k
                    c = _fit_one(age[tr], z[tr], bmd[tr], transform, n_mu, n_sig, lo, hi, age)
                    if c is None:
                        sq = np.inf
                        break
                    err = c.z(bmd[te], age[te]) - z[te]
                    sq += float(np.sum(err**2))
                    cnt += int(te.sum())
                rmse = float(np.sqrt(sq / max(cnt, 1)))
                if np.isfinite(rmse) and (best is None or rmse < best[0] - 1e-9):
                    best = (rmse, (transform, n_mu, n_sig))
    if best is None:
        raise ReferenceFitError(f"no reference curve could be fitted to {len(age)} rows")
    transform, n_mu, n_sig = best[1]
    curve = _fit_one(age, z, bmd, transform, n_mu, n_sig, lo, hi, age)
    if curve is None:  # pragma: no cover - the CV folds were smaller than the full set
        raise ReferenceFitError("the selected reference curve could not be refitted")
    curve.rmse_z = best[0]
    return curve


@dataclass
class ReferenceCurves:
    """Per-sex reference curves ("F", "M"); what turns a predicted BMD into a Z-score."""

    curves: dict[str, SexCurve]

    @classmethod
    def fit(cls, age: np.ndarray, sex_code: np.ndarray, z: np.ndarray, bmd: np.ndarray, *, seed: int = 0
            ) -> ReferenceCurves:
        """``sex_code``: F = 1, M = 0 (the clinical coding). Sexes with too few rows share the pooled curve."""
        age, sex_code, z, bmd = (np.asarray(v, dtype=float) for v in (age, sex_code, z, bmd))
        curves: dict[str, SexCurve] = {}
        pooled: SexCurve | None = None
        for name, code in (("F", 1.0), ("M", 0.0)):
            m = sex_code == code
            try:
                curves[name] = fit_sex_curve(age[m], z[m], bmd[m], seed=seed)
            except ReferenceFitError as exc:
                if pooled is None:
                    pooled = fit_sex_curve(age, z, bmd, seed=seed)  # raises when even the pool is too small
                log.warning("reference curve for sex %s: %s; using the pooled curve", name, exc)
                curves[name] = pooled
        return cls(curves)

    def z(self, bmd: np.ndarray, age: np.ndarray, sex_code: np.ndarray) -> np.ndarray:
        bmd, age, sex_code = (np.asarray(v, dtype=float) for v in (bmd, age, sex_code))
        out = np.full(bmd.shape, np.nan)
        for name, code in (("F", 1.0), ("M", 0.0)):
            m = sex_code == code
            if m.any():
                out[m] = self.curves[name].z(bmd[m], age[m])
        return out

    def mu_sigma(self, age: np.ndarray, sex_code: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mu, sigma, is_log) per row, for callers that apply the conversion themselves (Grad-CAM)."""
        age, sex_code = np.asarray(age, dtype=float), np.asarray(sex_code, dtype=float)
        mu, sd, is_log = np.full(age.shape, np.nan), np.full(age.shape, np.nan), np.zeros(age.shape, bool)
        for name, code in (("F", 1.0), ("M", 0.0)):
            m = sex_code == code
            if m.any():
                c = self.curves[name]
                mu[m], sd[m], is_log[m] = c.mu(age[m]), c.sigma(age[m]), c.transform == "log"
        return mu, sd, is_log

    def to_dict(self) -> dict[str, Any]:
        return {name: {k: (float(v) if isinstance(v, (float, np.floating)) else v)
                       for k, v in vars(c).items()} for name, c in self.curves.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReferenceCurves:
        return cls({name: SexCurve(**c) for name, c in d.items()})
