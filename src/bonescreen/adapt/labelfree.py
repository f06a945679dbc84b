"""``bonescreen adapt``: a site with images but no DXA yet -> a label-free site profile.

1. Adapt the network's normalisation to the site's images (:mod:`bonescreen.adapt.tta`:
   BatchNorm re-estimation, or penultimate-feature alignment to the development data), in a copy.
2. Estimate the site's prevalence from the adapted model's scores by EM (Saerens et al. 2002,
   :mod:`bonescreen.adapt.prevalence`), with a bootstrap interval.
3. Move the cut-off by Bayes' rule for that prevalence (the artifact's cut-off applied to the
   prior-adjusted probability), or to a target sensitivity estimated from those probabilities.

Everything is reported (what was estimated, how far the scores and the cut-off moved, how many
decisions changed) and written as a new named profile, used only when asked for
(``--site-profile NAME``). Nothing here sees a label: whether the adaptation helps at a site is
measured by ``bench/bench_adapt.py`` on phantom sites the model never trained on, and at a real
site by ``bonescreen calibrate`` once DXA results arrive.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from bonescreen.adapt.abstain import band_from_probability
from bonescreen.adapt.prevalence import adjust_posteriors, estimate_prevalence, training_prior
from bonescreen.adapt.profile import SiteProfile
from bonescreen.adapt.recalibrate import CalibrationError, prior_shift
from bonescreen.adapt.tta import (
    adapted_model,
    fit_batchnorm,
    fit_feature_align,
    has_batchnorm,
    source_feature_stats,
    summarise_adaptation,
)

METHODS = ("auto", "none", "batchnorm", "feature_align")
TARGETS = ("threshold", "sensitivity")


@dataclass
class LabelFreeConfig:
    method: str = "auto"
    train_prior: float | None = None  # the model's training prevalence; default from its model card
    target: str = "threshold"  # keep the artifact's cut-off on the prior-adjusted probability ...
    target_value: float | None = None  # ... or the cut-off for this (estimated) sensitivity
    estimate_prevalence: bool = True  # False: keep the training prevalence (adaptation only)
    abstain_width: float | None = None
    n_boot: int = 1000
    seed: int = 0
    min_images: int = 30
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise CalibrationError(f"adaptation method must be one of {METHODS}, got {self.method!r}")
        if self.target not in TARGETS:
            raise CalibrationError(f"label-free operating point must be one of {TARGETS}, got {self.target!r}")
        if self.target == "sensitivity" and not (self.target_value and 0.0 < self.target_value < 1.0):
            raise CalibrationError("a target sensitivity must be in (0, 1)")


@dataclass
class LabelFreeOutcome:
    profile: SiteProfile
    report: dict[str, Any]
    scores_before: NDArray[np.float64] = field(repr=False, default_factory=lambda: np.zeros(0))
    scores_after: NDArray[np.float64] = field(repr=False, default_factory=lambda: np.zeros(0))


def score_images(model: Any, images: NDArray[np.uint8], batch_size: int = 64) -> NDArray[np.float64]:
    """P(positive) per image, in batches (flat memory)."""
    out = [np.asarray(model.score(images[i:i + batch_size]), dtype=float) for i in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros(0)


def resolve_method(loaded: Any, method: str, source_stats: dict[str, Any] | None) -> str:
    """``auto``: BatchNorm re-estimation where the network has BatchNorm, else feature alignment
    when the development data's feature statistics are known, else none."""
    if method != "auto":
        return method
    if has_batchnorm(loaded.model):
        return "batchnorm"
    return "feature_align" if source_stats is not None else "none"


def expected_rates(posteriors: NDArray[np.float64], scores: NDArray[np.float64], threshold: float) -> dict[str, float]:
    """Sensitivity/specificity a cut-off would have if ``posteriors`` were the truth (label-free)."""
    q = np.asarray(posteriors, dtype=float)
    d = np.asarray(scores, dtype=float) >= threshold
    return {"sensitivity": float((q * d).sum() / q.sum()) if q.sum() > 0 else float("nan"),
            "specificity": float(((1 - q) * ~d).sum() / (1 - q).sum()) if (1 - q).sum() > 0 else float("nan")}


def sensitivity_cut(posteriors: NDArray[np.float64], scores: NDArray[np.float64], target: float) -> float:
    """Highest cut-off on ``scores`` whose posterior-expected sensitivity is at least ``target``."""
    order = np.argsort(-scores, kind="stable")
    q = posteriors[order]
    cum = np.cumsum(q) / q.sum()
    k = int(np.searchsorted(cum, target - 1e-12))
    return float(scores[order][min(k, len(order) - 1)])


def adapt_images(loaded: Any, images: NDArray[np.uint8], *, name: str, config: LabelFreeConfig | None = None,
                 source_stats: dict[str, Any] | None = None, meta: Sequence[dict[str, Any]] = (),
                 skipped: dict[str, int] | None = None) -> LabelFreeOutcome:
    """Fit a label-free profile on a site's eligible images (uint8 N×S×S at the model's size)."""
    from bonescreen.artifact import weights_fingerprint

    cfg = config or LabelFreeConfig()
    task = loaded.spec.task
    if task not in ("stage2", "stage1"):
        raise CalibrationError(f"label-free adaptation works on stage2 and stage1 models, not {task!r}")
    n = int(len(images))
    if n < cfg.min_images:
        raise CalibrationError(f"only {n} eligible images; label-free adaptation needs at least {cfg.min_images}")
    pi_train = cfg.train_prior if cfg.train_prior is not None else training_prior(loaded.spec)
    if pi_train is None:
        raise CalibrationError("the model card does not record its training prevalence; pass --train-prior")
    src = source_stats if source_stats is not None else source_feature_stats(loaded.spec)
    method = resolve_method(loaded, cfg.method, src)
    if method == "feature_align" and src is None:
        raise CalibrationError("feature alignment needs the development data's feature statistics: pass "
                               "--reference IMAGES of the development site (the artifact holds none)")
    base_scores = score_images(loaded, images)
    adaptation: dict[str, Any] | None = None
    if method == "batchnorm":
        adaptation = fit_batchnorm(loaded, images, batch_size=cfg.batch_size)
    elif method == "feature_align":
        adaptation = fit_feature_align(loaded, images, src, batch_size=cfg.batch_size)  # type: ignore[arg-type]
    model = adapted_model(loaded, adaptation)
    scores = base_scores if adaptation is None else score_images(model, images)

    t0 = float(loaded.spec.threshold)
    prev_base = estimate_prevalence(base_scores, pi_train, n_boot=cfg.n_boot, seed=cfg.seed)
    prev = estimate_prevalence(scores, pi_train, n_boot=cfg.n_boot, seed=cfg.seed)
    site_prior = prev.value if cfg.estimate_prevalence else pi_train
    rec = prior_shift(pi_train, site_prior)
    post = adjust_posteriors(scores, pi_train, site_prior)
    if cfg.target == "sensitivity":
        t = sensitivity_cut(post, scores, float(cfg.target_value))
    else:
        t = float(np.clip(rec.score_for(t0), 0.0, 1.0))
    band = band_from_probability(t, cfg.abstain_width, rec) if cfg.abstain_width else None
    flag_base = base_scores >= t0
    flag_new = scores >= t
    report: dict[str, Any] = {
        "n_images": n, "skipped": dict(skipped or {}), "method": method,
        "adaptation": summarise_adaptation(adaptation),
        "train_prior": pi_train,
        "prevalence": prev.to_dict(),
        "prevalence_without_adaptation": prev_base.to_dict(),
        "threshold": {"base": t0, "site": t, "site_probability": float(rec.apply([t])[0]),
                      "rule": cfg.target if cfg.target == "threshold" else f"sensitivity {cfg.target_value}"},
        "scores": {"mean_before": float(base_scores.mean()), "mean_after": float(scores.mean()),
                   "median_before": float(np.median(base_scores)), "median_after": float(np.median(scores)),
                   "mean_abs_change": float(np.abs(scores - base_scores).mean()),
                   "rank_correlation": _spearman(base_scores, scores)},
        "flagged": {"before": int(flag_base.sum()), "after": int(flag_new.sum()),
                    "changed": int((flag_base != flag_new).sum())},
        "expected_at_cut": expected_rates(post, scores, t),
    }
    if band is not None:
        report["abstain"] = {"band": band.to_dict(), "n_indeterminate": int(band.contains(scores).sum())}
    dates = sorted(str(m.get("study_date")) for m in meta if m.get("study_date"))
    data = {"kind": "unlabelled images", "n": n, "skipped": dict(skipped or {}),
            "date_first": dates[0] if dates else None, "date_last": dates[-1] if dates else None,
            "sites": dict(Counter(str(m.get("site") or "unknown") for m in meta)) if meta else {}}
    notes = [f"label-free: {method} adaptation, EM prevalence {prev.value:.3f} "
             f"({prev.lo:.3f}-{prev.hi:.3f}); no DXA result was used"]
    profile = SiteProfile(
        name=name, kind="label_free", model_fingerprint=weights_fingerprint(loaded.model), task=task,
        threshold=t, recalibration=rec, abstain=band, adaptation=adaptation,
        operating_point={"target": cfg.target, "value": cfg.target_value, "threshold": t, "base_threshold": t0,
                         "expected": report["expected_at_cut"]},
        prevalence={**prev.to_dict(), "used": site_prior}, data=data, metrics={"label_free": report}, notes=notes,
    )
    return LabelFreeOutcome(profile, report, base_scores, scores)


def _spearman(a: NDArray[np.float64], b: NDArray[np.float64]) -> float:
    from scipy.stats import spearmanr

    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def collect_images(inputs: Sequence[str | os.PathLike[str]], loaded: Any, *, gate: dict[str, Any] | None = None,
                   workers: int = 2, max_images: int | None = None) -> tuple[NDArray[np.uint8], list[dict[str, Any]], dict[str, int]]:
    """Eligible images under ``inputs`` preprocessed as ``screen`` would (its gate and pixels).

    Returns (uint8 N×S×S, per-image ``{site, study_date}``, skip counts by reason). Patient ids are
    not collected.
    """
    from concurrent.futures import ThreadPoolExecutor

    from bonescreen.gate import GatePolicy
    from bonescreen.screen import PrepContext, iter_inputs, prepare

    gate_kw = {k: v for k, v in (gate or {}).items() if v is not None}
    if gate_kw.get("min_size") is None and "min_size" not in (loaded.spec.eligibility or {}):
        gate_kw["min_size"] = min(256, int(loaded.size))  # as screen: a low-resolution model accepts its own size
    policy = GatePolicy.from_eligibility(loaded.spec.eligibility, **gate_kw)
    ctx = PrepContext(policy, (int(loaded.size),), None, False, None)
    images: list[NDArray[np.uint8]] = []
    meta: list[dict[str, Any]] = []
    skipped: Counter[str] = Counter()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for prep in pool.map(lambda it: prepare(it, ctx), iter_inputs(inputs)):
            if prep.images is None:
                skipped[str(prep.row.get("reason") or "skipped")] += 1
                continue
            if max_images is not None and len(images) >= max_images:
                skipped["over_max_images"] += 1
                continue
            images.append(prep.images[int(loaded.size)])
            meta.append({"site": prep.row.get("site"), "study_date": prep.row.get("study_date")})
    arr = np.stack(images) if images else np.zeros((0, int(loaded.size), int(loaded.size)), np.uint8)
    return arr, meta, dict(skipped)


def format_report(report: dict[str, Any]) -> str:
    r = report
    p, pb = r["prevalence"], r["prevalence_without_adaptation"]
    th, sc, fl = r["threshold"], r["scores"], r["flagged"]
    lines = [
        f"images: {r['n_images']} eligible" + (f"; skipped {sum(r['skipped'].values())} "
                                               f"({', '.join(f'{k} {v}' for k, v in r['skipped'].items())})"
                                               if r["skipped"] else ""),
        f"adaptation: {r['method']}" + "".join(f"; {k} {v:.3g}" if isinstance(v, float) else f"; {k} {v}"
                                              for k, v in r["adaptation"].items() if k != "method"),
        f"scores: mean {sc['mean_before']:.3f} -> {sc['mean_after']:.3f}, median {sc['median_before']:.3f} -> "
        f"{sc['median_after']:.3f}; mean |change| {sc['mean_abs_change']:.3f}; rank correlation "
        f"{sc['rank_correlation']:.3f}",
        f"prevalence (EM, training prevalence {r['train_prior']:.3f}): {p['value']:.3f} "
        f"(95% CI {p['lo']:.3f}-{p['hi']:.3f}); on the unadapted scores it would be {pb['value']:.3f} "
        f"({pb['lo']:.3f}-{pb['hi']:.3f})",
        f"cut-off on the model score: {th['base']:.4f} -> {th['site']:.4f} (site probability "
        f"{th['site_probability']:.3f}; rule: {th['rule']})",
        f"flagged: {fl['before']} -> {fl['after']} of {r['n_images']} ({fl['changed']} decisions changed)",
        f"expected at the new cut-off if the adjusted probabilities are right: sensitivity "
        f"{r['expected_at_cut']['sensitivity']:.2f}, specificity {r['expected_at_cut']['specificity']:.2f} "
        "(label-free estimates, not measurements)",
    ]
    if "abstain" in r:
        b = r["abstain"]["band"]
        lines.append(f"abstain band [{b['low']:.4f}, {b['high']:.4f}): {r['abstain']['n_indeterminate']} images")
    return "\n".join(lines)
