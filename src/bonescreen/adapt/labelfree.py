"""``bonescreen adapt``: a site with images but no DXA yet -> a label-free site profile.

1. Adapt the network to the site's images (:mod:`bonescreen.adapt.tta`: the grey scale matched to
   the development site's histogram, then BatchNorm re-estimation; feature alignment only when
   asked), in a copy.
2. Turn the adapted scores into probabilities with the *home profile* (the development site's
   calibration of scores adapted the same way) and estimate the site's prevalence from them by EM
   (Saerens et al. 2002, :mod:`bonescreen.adapt.prevalence`), with a bootstrap interval.
3. Set the cut-off by a rule (:data:`RULES`): by default, with a home profile, flag when the
   probability Bayes-shifted to that prevalence reaches the artifact's cut-off.

Everything is reported (what was estimated, how far the scores and the cut-off moved, how many
decisions changed) and written as a new named profile, used only when asked for by name.
Nothing here sees a label of the site: whether it helps was measured by ``bench/bench_adapt.py``
on phantom sites the model never trained on (README "Adapting to a new site"), and at a real site
``bonescreen calibrate`` measures it once DXA results arrive.
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
from bonescreen.adapt.prevalence import estimate_prevalence, training_prior
from bonescreen.adapt.profile import PROFILE_TASKS_TEXT, TASK_SCORE, SiteProfile
from bonescreen.adapt.recalibrate import CalibrationError, Recalibration
from bonescreen.adapt.tta import (
    INTENSITY_METHODS,
    adapted_model,
    fit_batchnorm,
    fit_feature_align,
    fit_intensity,
    has_batchnorm,
    source_feature_stats,
    summarise_adaptation,
)

METHODS = ("auto", "none", "batchnorm", "feature_align", "intensity", "intensity_batchnorm")
#: How the label-free cut-off is set (README "Adapting to a new site"):
#: keep        the artifact's cut-off on the adapted model's score (EM only reported);
#: probability flag when the site probability (home-calibrated, prior-shifted to the EM prevalence)
#:             is at least the artifact's cut-off (0.5: "more likely than not");
#: home        the home profile's cut-off on the adapted score (its sensitivity/specificity carry over
#:             when only the prevalence differs);
#: sensitivity the cut-off whose sensitivity, estimated from the site probabilities, is ``target_value``.
RULES = ("keep", "probability", "home", "sensitivity")


@dataclass
class LabelFreeConfig:
    method: str = "auto"
    train_prior: float | None = None  # no home profile: the model's training prevalence (model card)
    rule: str | None = None  # None: "probability" with a home profile, else "keep"
    target_value: float | None = None  # rule "sensitivity"
    estimate_prevalence: bool = True  # False: keep the home/training prevalence (adaptation only)
    abstain_width: float | None = None
    n_boot: int = 1000
    seed: int = 0
    min_images: int = 30
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise CalibrationError(f"adaptation method must be one of {METHODS}, got {self.method!r}")
        if self.rule is not None and self.rule not in RULES:
            raise CalibrationError(f"label-free cut-off rule must be one of {RULES}, got {self.rule!r}")
        if self.rule == "sensitivity" and not (self.target_value and 0.0 < self.target_value < 1.0):
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


def resolve_method(loaded: Any, method: str, source_stats: dict[str, Any] | None,
                   home: SiteProfile | None = None, reference_hist: Sequence[float] | None = None) -> str:
    """``auto``: the home profile's adaptation when there is one (its calibration is only valid for
    scores made the same way); else, with the development site's grey-level histogram (from
    ``--reference`` images), ``intensity_batchnorm`` (``intensity`` for a network without BatchNorm);
    else ``batchnorm`` where the network has BatchNorm layers; otherwise refused.

    Chosen by measurement (bench/bench_adapt.py, README "Adapting to a new site"): matching the grey
    scale to the development site's, then re-estimating BatchNorm, raised the ranking on the far
    sites where BatchNorm alone barely moved it; feature alignment did not help (kept as an explicit
    ``--method feature_align``), and EM on the unadapted scores moved the cut-off the wrong way,
    because a new vendor shifts every score and EM assumes only the prevalence changed (explicit
    ``--method none``).
    """
    if method != "auto":
        return method
    if home is not None:
        return str((home.adaptation or {}).get("method", "none"))
    bn = has_batchnorm(loaded.model)
    if reference_hist is not None:
        return "intensity_batchnorm" if bn else "intensity"
    if bn:
        return "batchnorm"
    raise CalibrationError(
        f"{loaded.spec.arch} has no BatchNorm layers to re-estimate (LayerNorm networks such as ConvNeXt "
        "normalise each image on their own): give the development site's grey scale to match "
        "(--home NAME, a home profile made with `calibrate --adapt intensity`, or --reference IMAGES of the "
        "development site) for --method intensity, calibrate with local DXA results, or ask explicitly for "
        "--method feature_align (with --reference) or --method none (EM on the unadapted scores; biased when "
        "the site's vendor shifts the scores)"
    )


def reference_histogram(home: SiteProfile | None, given: Sequence[float] | None) -> list[float] | None:
    """The development site's pooled grey-level histogram: the home profile's when it holds one (its
    calibration was made on that grey scale), else the one given (``--reference`` images)."""
    stored = (home.adaptation or {}).get("reference_histogram") if home is not None else None
    chosen = stored if stored is not None else given
    return [float(v) for v in chosen] if chosen is not None else None


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
                 source_stats: dict[str, Any] | None = None, home: SiteProfile | None = None,
                 meta: Sequence[dict[str, Any]] = (), skipped: dict[str, int] | None = None,
                 reference_hist: Sequence[float] | None = None) -> LabelFreeOutcome:
    """Fit a label-free profile on a site's eligible images (uint8 N×S×S at the model's size).

    ``home``: a *calibrated* profile of the development site made with the same adaptation
    (``bonescreen calibrate --adapt intensity_batchnorm`` on its tune split; it also holds the
    development site's grey-level histogram that the intensity adaptation matches). ``reference_hist``:
    that histogram from reference images instead (``tta.intensity_histogram``). EM needs probabilities that are
    calibrated at a known prevalence; a model's raw scores usually are not even at home (measured:
    the demo student's mean score on its own test split is 0.22 at a prevalence of 0.43), so
    without ``home`` the EM estimate is only reported and the cut-off is kept (rule ``keep``).
    """
    cfg = config or LabelFreeConfig()
    task = loaded.spec.task
    if task not in TASK_SCORE:
        raise CalibrationError(f"label-free adaptation works on {PROFILE_TASKS_TEXT} models, not {task!r}")
    n = int(len(images))
    if n < cfg.min_images:
        raise CalibrationError(f"only {n} eligible images; label-free adaptation needs at least {cfg.min_images}")
    reference(loaded, home, cfg)  # refuse a bad home profile before the (costly) adaptation
    src = source_stats if source_stats is not None else source_feature_stats(loaded.spec)
    ref_hist = reference_histogram(home, reference_hist)
    method = resolve_method(loaded, cfg.method, src, home, ref_hist)
    _same_adaptation(home, method)
    adaptation, base_scores, scores = fit_adaptation(loaded, images, method, src, batch_size=cfg.batch_size,
                                                     reference_hist=ref_hist)
    return label_free_profile(loaded, name=name, base_scores=base_scores, scores=scores, adaptation=adaptation,
                              config=cfg, home=home, meta=meta, skipped=skipped)


def reference(loaded: Any, home: SiteProfile | None, cfg: LabelFreeConfig) -> tuple[Recalibration, float, str]:
    """(score -> probability map, the prevalence it is calibrated for, cut-off rule)."""
    task = loaded.spec.task
    rule = cfg.rule or ("probability" if home is not None else "keep")
    if home is not None:
        if home.kind != "calibrated" or home.task != task:
            raise CalibrationError(f"the home profile {home.name!r} must be a calibrated {task} profile "
                                   f"(from `bonescreen calibrate`), not {home.kind} {home.task}")
        home_map, prior = home.recalibration, float(home.prevalence.get("value") or 0.0)
        if not 0.0 < prior < 1.0:
            raise CalibrationError(f"the home profile {home.name!r} records no prevalence")
    else:
        if rule == "home":
            raise CalibrationError("rule 'home' needs a home profile (--home NAME)")
        home_map = Recalibration("identity")
        prior = cfg.train_prior if cfg.train_prior is not None else training_prior(loaded.spec)  # type: ignore[assignment]
        if prior is None:
            raise CalibrationError("the model card does not record its training prevalence; pass --train-prior "
                                   "(or --home NAME, a calibrated profile of the development site)")
    return home_map, float(prior), rule


def _same_adaptation(home: SiteProfile | None, method: str) -> None:
    """A home map is only valid for scores made the same way (an adapted score is another scale)."""
    if home is not None and method != (home.adaptation or {}).get("method", "none"):
        raise CalibrationError(f"the home profile {home.name!r} was calibrated with adaptation "
                               f"{(home.adaptation or {}).get('method', 'none')!r}; adapt this site the same "
                               f"way (--method), not {method!r}")


def fit_adaptation(loaded: Any, images: NDArray[np.uint8], method: str, source_stats: dict[str, Any] | None,
                   *, batch_size: int = 32, reference_hist: Sequence[float] | None = None
                   ) -> tuple[dict[str, Any] | None, NDArray[np.float64], NDArray[np.float64]]:
    """(adaptation or None, scores of the model, scores of the adapted copy) on ``images``."""
    if method == "feature_align" and source_stats is None:
        raise CalibrationError("feature alignment needs the development data's feature statistics: pass "
                               "--reference IMAGES of the development site (the artifact holds none)")
    if method in INTENSITY_METHODS and reference_hist is None:
        raise CalibrationError(f"{method} adaptation matches the site's grey scale to the development site's: "
                               "pass --home NAME (a home profile made with `calibrate --adapt "
                               f"{method}`) or --reference IMAGES of the development site")
    base_scores = score_images(loaded, images)
    adaptation: dict[str, Any] | None = None
    if method in INTENSITY_METHODS:
        adaptation = fit_intensity(loaded, images, reference_hist, batch_size=batch_size,
                                   batchnorm=method == "intensity_batchnorm")
    elif method == "batchnorm":
        adaptation = fit_batchnorm(loaded, images, batch_size=batch_size)
    elif method == "feature_align":
        adaptation = fit_feature_align(loaded, images, source_stats, batch_size=batch_size)  # type: ignore[arg-type]
    scores = base_scores if adaptation is None else score_images(adapted_model(loaded, adaptation), images)
    return adaptation, base_scores, scores


def label_free_profile(loaded: Any, *, name: str, base_scores: NDArray[np.float64], scores: NDArray[np.float64],
                       adaptation: dict[str, Any] | None, config: LabelFreeConfig, home: SiteProfile | None,
                       meta: Sequence[dict[str, Any]] = (), skipped: dict[str, int] | None = None) -> LabelFreeOutcome:
    """Steps 2-3 (EM prevalence, cut-off) on scores already computed; see :func:`adapt_images`."""
    from bonescreen.artifact import weights_fingerprint

    cfg = config
    home_map, prior, rule = reference(loaded, home, cfg)
    _same_adaptation(home, (adaptation or {}).get("method", "none"))
    n = int(len(scores))
    task = loaded.spec.task
    method = (adaptation or {}).get("method", "none")
    t0 = float(loaded.spec.threshold)
    p_home = home_map.apply(scores)
    # what EM says without any of this: raw scores of the unadapted model at its training prevalence
    pi_card = cfg.train_prior if cfg.train_prior is not None else (training_prior(loaded.spec) or prior)
    prev_base = estimate_prevalence(base_scores, pi_card, n_boot=cfg.n_boot, seed=cfg.seed)
    prev = estimate_prevalence(p_home, prior, n_boot=cfg.n_boot, seed=cfg.seed)
    site_prior = prev.value if cfg.estimate_prevalence else prior
    rec = home_map.with_prior(prior, site_prior)
    post = rec.apply(scores)
    if rule == "sensitivity":
        assert cfg.target_value is not None  # LabelFreeConfig refuses rule "sensitivity" without one
        t = sensitivity_cut(post, scores, float(cfg.target_value))
    elif rule == "probability":
        t = float(np.clip(rec.score_for(t0), 0.0, 1.0))
    elif rule == "home":
        t = float(home.threshold)  # type: ignore[union-attr]
    else:
        t = t0
    band = band_from_probability(t, cfg.abstain_width, rec) if cfg.abstain_width else None
    flag_base = base_scores >= t0
    flag_new = scores >= t
    rule_text = {"keep": "the artifact's cut-off kept", "probability": f"site probability >= {t0:g}",
                 "home": f"the home profile {home.name if home else ''!s}'s cut-off",
                 "sensitivity": f"estimated sensitivity {cfg.target_value}"}[rule]
    report: dict[str, Any] = {
        "n_images": n, "skipped": dict(skipped or {}), "method": method,
        "adaptation": summarise_adaptation(adaptation),
        "home": None if home is None else {"name": home.name, "prevalence": prior, "n": home.data.get("n"),
                                           "recalibration": home.recalibration.method},
        "train_prior": prior,
        "prevalence": prev.to_dict(),
        "prevalence_without_adaptation": prev_base.to_dict(),
        "threshold": {"base": t0, "site": t, "site_probability": float(rec.apply([t])[0]), "rule": rule,
                      "rule_text": rule_text},
        "scores": {"mean_before": float(base_scores.mean()), "mean_after": float(scores.mean()),
                   "median_before": float(np.median(base_scores)), "median_after": float(np.median(scores)),
                   "mean_abs_change": float(np.abs(scores - base_scores).mean()),
                   "rank_correlation": _spearman(base_scores, scores)},
        "flagged": {"before": int(flag_base.sum()), "after": int(flag_new.sum()),
                    "changed": int((flag_base != flag_new).sum())},
        "expected_at_cut": expected_rates(post, scores, t),
    }
    if home is None:
        report["warning"] = ("no home profile: EM took the raw scores as probabilities calibrated at the "
                             f"training prevalence {prior:.3f}; if they are not (measured for the demo models), "
                             "the prevalence estimate is biased")
    if band is not None:
        report["abstain"] = {"band": band.to_dict(), "n_indeterminate": int(band.contains(scores).sum())}
    dates = sorted(str(m.get("study_date")) for m in meta if m.get("study_date"))
    data = {"kind": "unlabelled images", "n": n, "skipped": dict(skipped or {}),
            "date_first": dates[0] if dates else None, "date_last": dates[-1] if dates else None,
            "sites": dict(Counter(str(m.get("site") or "unknown") for m in meta)) if meta else {}}
    notes = [f"label-free: {method} adaptation, EM prevalence {prev.value:.3f} ({prev.lo:.3f}-{prev.hi:.3f}), "
             f"cut-off rule {rule}; no DXA result of this site was used"]
    profile = SiteProfile(
        name=name, kind="label_free", model_fingerprint=weights_fingerprint(loaded.model), task=task,
        threshold=t, recalibration=rec, abstain=band, adaptation=adaptation,
        operating_point={"rule": rule, "value": cfg.target_value, "threshold": t, "base_threshold": t0,
                         "expected": report["expected_at_cut"]},
        prevalence={**prev.to_dict(), "used": site_prior}, data=data, metrics={"label_free": report},
        base_profile=home.name if home is not None else None, notes=notes,
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

    from bonescreen.screen import ModelSet, ScreeningEngine, iter_inputs

    # screen's own gate and preprocessing (the engine's prepare step); no model runs here
    engine = ScreeningEngine(ModelSet(loaded, main_torch=loaded), ood="off",
                             gate={k: v for k, v in (gate or {}).items() if v is not None})
    images: list[NDArray[np.uint8]] = []
    meta: list[dict[str, Any]] = []
    skipped: Counter[str] = Counter()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for prep in pool.map(engine.prepare, iter_inputs(inputs)):
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
        f"prevalence (EM from {'home profile ' + r['home']['name'] if r['home'] else 'the raw scores'}, "
        f"reference prevalence {r['train_prior']:.3f}): {p['value']:.3f} "
        f"(95% CI {p['lo']:.3f}-{p['hi']:.3f}); on the unadapted scores it would be {pb['value']:.3f} "
        f"({pb['lo']:.3f}-{pb['hi']:.3f})",
        f"cut-off on the model score: {th['base']:.4g} -> {th['site']:.4g} (site probability "
        f"{th['site_probability']:.3f}; rule {th['rule']}: {th['rule_text']})",
        f"flagged: {fl['before']} -> {fl['after']} of {r['n_images']} ({fl['changed']} decisions changed)",
        f"expected at the new cut-off if the adjusted probabilities are right: sensitivity "
        f"{r['expected_at_cut']['sensitivity']:.2f}, specificity {r['expected_at_cut']['specificity']:.2f} "
        "(label-free estimates, not measurements)",
    ]
    if r.get("warning"):
        lines.append(f"warning: {r['warning']}")
    if "abstain" in r:
        b = r["abstain"]["band"]
        lines.append(f"abstain band [{b['low']:.4g}, {b['high']:.4g}): {r['abstain']['n_indeterminate']} images")
    return "\n".join(lines)
