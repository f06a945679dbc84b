"""Decisions: model outputs -> scores, category, flag, and the OOD verdict (pure functions).

This is the one decision path of every runner (``screen``, ``explain``, the
service worker, later distributed runners), in the order
:func:`decide_outputs` applies it:

1. probabilities -> scores (``score`` = P(low bone mass | not osteoporosis),
   ``score_stage1``, three-class ``p_*``; pediatric: P(Z <= -2.0));
2. scores -> category and flag by the thresholds (:func:`decide`,
   :func:`decide_pediatric`); under a site profile (``screen --site-profile``,
   the service's ``site_profile``) the threshold is the profile's;
3. the site profile, when there is one (:func:`bonescreen.adapt.profile.site_rows`):
   ``site_probability`` (the score recalibrated at that site) and the abstain
   band, which turns a stage-2 decision near the cut-off into the category
   ``indeterminate`` ("indeterminate: consider DXA", flagged, reason
   ``abstain_band``);
4. the out-of-distribution verdict (:func:`apply_ood`): refuse (default) or flag.

:func:`rollup_study` turns the rows of one study into the study's result.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bonescreen.adapt.abstain import INDETERMINATE_MESSAGE
from bonescreen.schema import INDETERMINATE, OOD_FLAG_REASONS, OOD_POLICIES
from bonescreen.tasks import (
    CASCADE,
    PEDIATRIC,
    PEDIATRIC_CATEGORIES,
    Task,
    UnknownTaskError,
    get_task,
    mode_task,
)

__all__ = [
    "PEDIATRIC_CATEGORIES",
    "DecisionPolicy",
    "ModelOutputs",
    "apply_ood",
    "decide",
    "decide_outputs",
    "decide_pediatric",
    "rollup_study",
]

#: Risk order of categories (higher decides a study).
#: ``indeterminate`` (the abstain band) ranks above normal and below a decided positive: a study with a
#: normal and an indeterminate image is indeterminate (consider DXA); a low-bone-mass image decides it.
CATEGORY_RISK = {"normal": 0, "not_osteoporosis": 0, "normal_bmd": 0, "indeterminate": 0.5, "low_bone_mass": 1,
                 "low_bmd": 1, "osteoporosis": 2}


@dataclass(frozen=True)
class DecisionPolicy:
    """How outputs become decisions: the run's thresholds, the model's classes, the OOD policy."""

    mode: str  # stage2 | stage1 | three_class | cascade | pediatric
    threshold: float = 0.5  # the main model's cut-off (stage 2, or stage 1 alone, or P(Z<=-2))
    threshold_stage1: float = 0.5
    positive: int = 1
    positive_stage1: int = 1
    class_names: tuple[str, ...] = ("normal", "low_bone_mass", "osteoporosis")
    ood: str = "refuse"  # schema.OOD_POLICIES
    pediatric_own_rule: bool = True  # threshold is the artifact's: use the model's Z <= -2.0 rule
    # bonescreen.adapt.profile.SiteProfile: site probability + abstain band after the cut-off (its
    # threshold is already ``threshold``); None: no profile, rows say site_profile None
    site_profile: Any = None

    @property
    def task(self) -> Task:
        """The task whose rule decides (``cascade``: the stage-2 task, with the stage-1 probabilities)."""
        return mode_task(self.mode)

    def __post_init__(self) -> None:
        if self.ood not in OOD_POLICIES:
            raise ValueError(f"ood policy must be one of {', '.join(OOD_POLICIES)}; got {self.ood!r}")


@dataclass
class ModelOutputs:
    """What the backends returned for one batch (rows in the batch's order)."""

    probs_main: np.ndarray | None = None  # (N, C); NaN rows: not run (cascade, stage 1 flagged)
    probs_stage1: np.ndarray | None = None
    pediatric: Any = None  # DataFrame from bonescreen.pediatric.predict_pediatric
    ood_scores: np.ndarray | None = None  # (N,) distance / threshold, NaN where not computed
    ood_band: np.ndarray | None = None  # (N,) bool: above a model's flag threshold (OODModel.flag_ratio)


def decide_outputs(policy: DecisionPolicy, outputs: ModelOutputs) -> list[dict[str, Any]]:
    """Steps 1-4 of the module docstring for one batch."""
    rows = policy.task.decide(outputs, policy, cascade=policy.mode == CASCADE)
    if policy.site_profile is not None:
        from bonescreen.adapt.profile import site_rows

        rows = site_rows(rows, policy.site_profile)
        for r in rows:
            r.pop("indeterminate", None)  # the category says it
    apply_ood(rows, outputs.ood_scores, policy.ood, outputs.ood_band)
    return rows


def decide(
    mode: str,
    probs_main: np.ndarray | None,
    probs_stage1: np.ndarray | None = None,
    *,
    threshold: float = 0.5,
    threshold_stage1: float = 0.5,
    positive: int = 1,
    positive_stage1: int = 1,
    class_names: Sequence[str] = ("normal", "low_bone_mass", "osteoporosis"),
) -> list[dict[str, Any]]:
    """Per-image score columns, category and flag from model probabilities (pure; easy to test).

    ``cascade``: stage-1 score >= ``threshold_stage1`` -> osteoporosis; otherwise
    stage-2 score >= ``threshold`` -> low bone mass, else normal. Rows the
    stage-1 model flags may have ``probs_main`` NaN (stage 2 was not run).
    ``stage2``: low bone mass / normal. ``stage1``: osteoporosis / not_osteoporosis.
    ``three_class``: arg-max over (normal, low bone mass, osteoporosis). Each rule is its
    task's (:meth:`bonescreen.tasks.Task.decide_probabilities`).
    """
    try:
        task = mode_task(mode) if mode else get_task(mode)
    except UnknownTaskError:
        raise ValueError(f"unknown mode {mode!r}") from None
    return task.decide_probabilities(probs_main, probs_stage1, threshold=threshold, threshold_stage1=threshold_stage1,
                                     positive=positive, positive_stage1=positive_stage1, class_names=class_names,
                                     cascade=mode == CASCADE)


def decide_pediatric(preds: Any, *, threshold: float | None = None) -> list[dict[str, Any]]:
    """Rows from :func:`bonescreen.pediatric.predict_pediatric` output (pure; easy to test).

    :meth:`bonescreen.tasks.PediatricTask.decide_predictions`: ``score`` = P(Z <= -2.0),
    ``category`` ``low_bmd`` / ``normal_bmd``; ``threshold`` None: the model's own rule
    (predicted Z <= -2.0); a row with a ``reason`` becomes a skip.
    """
    return PEDIATRIC.decide_predictions(preds, threshold=threshold)


def apply_ood(rows: Sequence[dict[str, Any]], scores: np.ndarray | None, policy: str,
              band: np.ndarray | None = None) -> None:
    """Record ``ood_score``/``ood_check``; above 1.0 (the refusal threshold) refuse or flag the row.

    ``refuse``: the row becomes ``eligible`` False with reason ``out_of_distribution``
    and no score or category (the model does not know this kind of image).
    ``flag``: the row keeps its score and category, with reason
    ``out_of_distribution`` and a message saying it was flagged, not refused.
    Either way, a row at or below 1.0 but in the model's **flag band** (``band``: above
    its flag threshold, ``OODModel.flag_ratio``) keeps its score and category and gets
    reason ``ood_borderline``: scored, marked for a reader's review.
    ``off``: no check (an explicit opt-out); the rows say so in ``ood_check``.
    """
    for i, row in enumerate(rows):
        row["ood_check"] = policy
        s = None if scores is None or policy == "off" else float(scores[i])
        row["ood_score"] = None if s is None or not np.isfinite(s) else round(s, 4)
        if row["ood_score"] is None or row.get("eligible") is False:
            continue
        if s <= 1.0:  # type: ignore[operator]
            if band is not None and bool(band[i]) and not row.get("reason"):
                row.update(reason="ood_borderline",
                           message=(f"image features lie near the edge of what the model was trained on (OOD "
                                    f"score {s:.2f}: in the flag band below the refusal threshold 1.00); "
                                    "scored, review the image"))
            continue
        text = (f"image features lie outside what the model was trained on (OOD score {s:.2f}, "
                "threshold 1.00)")
        if policy == "refuse":
            for k in ("score", "score_stage1", "score_stage2", "p_normal", "p_low_bone_mass", "p_osteoporosis",
                      "pred_z", "pred_bmd", "category", "flag", "site_probability"):
                if k in row:
                    row[k] = None
            row.update(eligible=False, reason="out_of_distribution", message=text)
        else:
            note = text + "; flagged, not refused (--ood flag)"
            prior = str(row.get("message") or "")  # e.g. the abstain band's "consider DXA" stays readable
            row.update(reason="out_of_distribution", message=f"{prior}; {note}" if prior else note)


def _risk(row: Mapping[str, Any]) -> tuple[float, float]:
    score = row.get("score")
    if score is None:
        score = row.get("score_stage1")
    return CATEGORY_RISK.get(str(row.get("category")), 0), float(score) if score is not None else -1.0


def rollup_study(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The result of one study from its image rows (screen's ``studies.csv``, the service's worklist).

    Policy: the **highest-risk eligible image decides** (category order
    osteoporosis > low bone mass > normal, then the higher score); every
    eligible image is listed in ``image_ids``. Images flagged out-of-distribution
    (``--ood flag``) or in the flag band (``ood_borderline``) decide only when no
    other eligible image exists. A study with
    no eligible image is ``eligible`` False, reason ``no_eligible_image``, and a
    message counting its images' reasons.
    """
    eligible = [r for r in rows if r.get("eligible") and r.get("category")]
    clean = [r for r in eligible if r.get("reason") not in OOD_FLAG_REASONS]
    pool = clean or eligible
    base: dict[str, Any] = {
        "n_images": len(rows), "n_eligible": len(eligible),
        "image_ids": [str(r.get("image_id")) for r in eligible],
        "ood_score": max((float(r["ood_score"]) for r in rows if r.get("ood_score") is not None), default=None),
    }
    if not pool:
        reasons = Counter(str(r.get("reason") or "unknown") for r in rows)
        return {**base, "eligible": False, "reason": "no_eligible_image",
                "message": "no eligible image: " + ", ".join(f"{k} x{v}" for k, v in reasons.most_common()),
                "category": None, "flag": None, "score": None, "score_stage1": None, "decided_by": None}
    best = max(pool, key=_risk)
    message = INDETERMINATE_MESSAGE if best.get("category") == INDETERMINATE else ""
    return {**base, "eligible": True, "reason": best.get("reason") or "", "message": message,
            "category": best.get("category"), "flag": bool(best.get("flag")), "score": best.get("score"),
            "score_stage1": best.get("score_stage1"), "decided_by": str(best.get("image_id"))}
