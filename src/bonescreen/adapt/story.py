"""Before / after label-free adaptation / after ``calibrate``, at sites a model never trained on.

What the demo prints (README "The demo") and what a hospital would do, in order, with the library
functions ``bonescreen calibrate`` and ``bonescreen adapt`` run:

1. a **home profile** at the development site: the adaptation of :func:`~bonescreen.adapt.tta.
   fit_home_adaptation` (the grey-scale reference; BatchNorm where the network has it) fitted on
   held-out images (its tune split in the README's commands; the demo takes tune and test), then
   calibrated there (``calibrate --adapt ... --site DEV --split tune``);
2. **before**: the model at its own cut-off;
3. **label-free**: ``adapt --home HOME`` on all of the site's images (no label read);
4. **calibrate**: half of the site's patients as local DXA-paired results (``calibrate`` on the
   model's scores, target sensitivity), the other half kept to measure on.

Every row is measured on that same held-out half, so the three stages compare like with like. The
AUC is quoted beside the site's oracle AUC with the headroom fraction ``(AUC - 0.5)/(oracle - 0.5)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from bonescreen.adapt.calibrate import CalibrateConfig, LocalPairs, calibrate_pairs, patient_split
from bonescreen.adapt.labelfree import LabelFreeConfig, adapt_images, score_images
from bonescreen.adapt.profile import SiteProfile
from bonescreen.adapt.recalibrate import CalibrationError
from bonescreen.adapt.tta import adapted_model, fit_home_adaptation, has_batchnorm


@dataclass
class SiteData:
    """One site's preprocessed images (uint8 N×S×S at the model's size), DXA labels and patient keys."""

    name: str
    images: NDArray[np.uint8]
    labels: NDArray[np.int64]
    groups: NDArray[Any]
    oracle_auc: float | None = None


def home_method(loaded: Any) -> str:
    """The adaptation the demo uses: the grey scale matched, then BatchNorm where the network has it."""
    return "intensity_batchnorm" if has_batchnorm(loaded.model) else "intensity"


def home_profile(loaded: Any, home: SiteData, *, method: str | None = None, target_sensitivity: float = 0.90,
                 seed: int = 0) -> SiteProfile:
    """What ``calibrate --adapt METHOD`` makes on held-out images of the development site."""
    from bonescreen.artifact import weights_fingerprint

    adaptation = fit_home_adaptation(loaded, home.images, method or home_method(loaded))
    scores = score_images(adapted_model(loaded, adaptation), home.images)
    cfg = CalibrateConfig(target="sensitivity", target_value=target_sensitivity, learning_curve=(), seed=seed)
    profile: SiteProfile = calibrate_pairs(LocalPairs(home.labels, scores, home.groups), name="HOME",
                                           fingerprint=weights_fingerprint(loaded.model), task=str(loaded.spec.task),
                                           base_threshold=float(loaded.spec.threshold), config=cfg,
                                           adaptation=adaptation).profile
    return profile


def _row(stage: str, y: NDArray[Any], scores: NDArray[Any], threshold: float, oracle: float | None,
         **extra: Any) -> dict[str, Any]:
    from bonescreen.evaluate.metrics import auc_point

    auc = float(auc_point(y, scores))
    flag = scores >= threshold
    return {"stage": stage, "n": int(len(y)), "auc": auc, "oracle_auc": oracle,
            "headroom": (auc - 0.5) / (oracle - 0.5) if oracle is not None and oracle > 0.5 else None,
            "threshold": float(threshold), "sensitivity": float(flag[y == 1].mean()),
            "specificity": float((~flag[y == 0]).mean()), **extra}


def site_story(loaded: Any, site: SiteData, home: SiteProfile, *, target_sensitivity: float = 0.90,
               seed: int = 0, n_boot: int = 1000) -> dict[str, Any]:
    """The three stages on one site, measured on a held-out half of its patients (see the module)."""
    y_all = np.asarray(site.labels, dtype=np.int64)
    pairs = LocalPairs(y_all, np.zeros(len(y_all)), np.asarray(site.groups))
    drawn = None
    rng = np.random.default_rng(seed)
    for _ in range(50):  # a half with both classes on each side
        drawn = patient_split(pairs, len(y_all) // 2, rng)
        if drawn is not None:
            break
    if drawn is None:
        raise CalibrationError(f"{site.name}: cannot split its {len(y_all)} pairs into two halves with both classes")
    fit, rest = drawn
    y = y_all[rest]
    lf = adapt_images(loaded, site.images, name=f"{site.name}_LABEL_FREE", home=home,
                      config=LabelFreeConfig(n_boot=n_boot, seed=seed))
    base = lf.scores_before  # the unadapted model's scores, already computed by the adaptation
    cfg = CalibrateConfig(target="sensitivity", target_value=target_sensitivity, learning_curve=(), seed=seed)
    cal = calibrate_pairs(LocalPairs(y_all[fit], base[fit], np.asarray(site.groups)[fit]), name=site.name,
                          fingerprint=home.model_fingerprint, task=home.task,
                          base_threshold=float(loaded.spec.threshold), config=cfg).profile
    prev = lf.report["prevalence"]
    rows = [
        _row("before", y, base[rest], float(loaded.spec.threshold), site.oracle_auc),
        _row("label-free (adapt --home)", y, lf.scores_after[rest], lf.profile.threshold, site.oracle_auc,
             method=lf.report["method"], prevalence_estimate=prev["value"],
             prevalence_ci=[prev["lo"], prev["hi"]]),
        _row(f"calibrate ({len(fit)} local pairs, sensitivity {target_sensitivity:.2f})", y, base[rest],
             cal.threshold, site.oracle_auc, recalibration=cal.recalibration.method),
    ]
    return {"site": site.name, "n_images": int(len(y_all)), "n_held_out": int(len(rest)),
            "prevalence": float(y_all.mean()), "prevalence_held_out": float(y.mean()), "rows": rows}


def format_story(stories: list[dict[str, Any]]) -> str:
    """The stories as one plain-text table (what the demo prints)."""
    head = f"{'site':<7} {'stage':<44} {'AUC':>6} {'oracle':>6} {'headroom':>8} {'cut-off':>8} {'sens':>5} {'spec':>5}"
    lines = [head]
    for st in stories:
        for i, r in enumerate(st["rows"]):
            hr = "" if r["headroom"] is None else f"{r['headroom']:.2f}"
            orc = "" if r["oracle_auc"] is None else f"{r['oracle_auc']:.3f}"
            lines.append(f"{st['site'] if i == 0 else '':<7} {r['stage']:<44} {r['auc']:>6.3f} {orc:>6} {hr:>8} "
                         f"{r['threshold']:>8.3g} {r['sensitivity']:>5.2f} {r['specificity']:>5.2f}")
    return "\n".join(lines)
