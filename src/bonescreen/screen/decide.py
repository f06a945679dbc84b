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

from bonescreen.adapt.abstain import INDETERMINATE, INDETERMINATE_MESSAGE
from bonescreen.schema import OOD_FLAG_REASONS, OOD_POLICIES

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

#: Pediatric categories: predicted Z <= -2.0 (the study's low BMD for age) or not. Named apart
#: from the adult WHO categories on purpose: a child's low Z-score is not "osteopenia".
PEDIATRIC_CATEGORIES = ("normal_bmd", "low_bmd")
#: Risk order of categories (higher decides a study).
#: ``indeterminate`` (the abstain band) ranks above normal and below a decided positive: a study with a
#: normal and an indeterminate image is indeterminate (consider DXA); a low-bone-mass image decides it.
CATEGORY_RISK = {"normal": 0, "not_osteoporosis": 0, "normal_bmd": 0, "indeterminate": 0.5, "low_bone_mass": 1,
                 "low_bmd": 1, "osteoporosis": 2}
FLAG_CATEGORIES = ("low_bone_mass", "osteoporosis", "low_bmd", "indeterminate")


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
    if policy.mode == "pediatric":
        rows = decide_pediatric(outputs.pediatric, threshold=None if policy.pediatric_own_rule else policy.threshold)
    else:
        rows = decide(policy.mode, outputs.probs_main, outputs.probs_stage1, threshold=policy.threshold,
                      threshold_stage1=policy.threshold_stage1, positive=policy.positive,
                      positive_stage1=policy.positive_stage1, class_names=policy.class_names)
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
    ``three_class``: arg-max over (normal, low bone mass, osteoporosis).
    """
    out: list[dict[str, Any]] = []
    n = len(probs_main) if probs_main is not None else len(probs_stage1)  # type: ignore[arg-type]
    for i in range(n):
        row: dict[str, Any] = {
            "score": None, "score_stage1": None, "score_stage2": None,
            "p_normal": None, "p_low_bone_mass": None, "p_osteoporosis": None,
        }
        if mode == "three_class":
            p = np.asarray(probs_main[i], dtype=np.float64)  # type: ignore[index]
            idx = {name: k for k, name in enumerate(class_names)}
            pn, pl, po = (float(p[idx[c]]) for c in ("normal", "low_bone_mass", "osteoporosis"))
            row.update(p_normal=pn, p_low_bone_mass=pl, p_osteoporosis=po)
            row["score"] = pl / (pn + pl) if pn + pl > 0 else None
            category = ("normal", "low_bone_mass", "osteoporosis")[int(np.argmax([pn, pl, po]))]
        elif mode == "stage1":
            s1 = float(probs_main[i][positive])  # type: ignore[index]
            row["score_stage1"] = s1
            category = "osteoporosis" if s1 >= threshold else "not_osteoporosis"
        elif mode in ("stage2", "cascade"):
            s2 = None
            if probs_main is not None and not np.isnan(probs_main[i][positive]):
                s2 = float(probs_main[i][positive])
            row["score_stage2"] = row["score"] = s2
            category = None
            if mode == "cascade":
                s1 = float(probs_stage1[i][positive_stage1])  # type: ignore[index]
                row["score_stage1"] = s1
                if s1 >= threshold_stage1:
                    category = "osteoporosis"
            if category is None:
                if s2 is None:
                    raise ValueError(f"row {i}: stage-2 score missing for an image stage 1 did not flag")
                category = "low_bone_mass" if s2 >= threshold else "normal"
        else:
            raise ValueError(f"unknown mode {mode!r}")
        row.update(categorize(category))
        out.append(row)
    return out


def categorize(category: str) -> dict[str, Any]:
    """Category and flag (the abstain band comes after, with the site profile: step 3)."""
    return {"category": category, "flag": category in FLAG_CATEGORIES}


def decide_pediatric(preds: Any, *, threshold: float | None = None) -> list[dict[str, Any]]:
    """Rows from :func:`bonescreen.pediatric.predict_pediatric` output (pure; easy to test).

    ``score`` = P(Z <= -2.0); ``category`` ``low_bmd`` / ``normal_bmd``. With
    ``threshold`` None the model's own decision (predicted Z <= -2.0, the
    ``low_bmd`` column) flags; a number flags ``score >= threshold`` instead
    (an operating point chosen on a tuning set). A row with a ``reason``
    (``missing_clinical:<names>``) becomes a skip: ``eligible`` False, no score.
    """
    out: list[dict[str, Any]] = []
    for rec in preds.to_dict("records"):
        row: dict[str, Any] = {
            "score": None, "score_stage1": None, "score_stage2": None,
            "p_normal": None, "p_low_bone_mass": None, "p_osteoporosis": None,
            "pred_z": None, "pred_bmd": None, "category": None, "flag": None,
        }
        reason = str(rec.get("reason") or "")
        z, bmd, prob = (float(rec[k]) for k in ("pred_z", "pred_bmd", "prob_low_bmd"))
        if not reason and not all(np.isfinite(v) for v in (z, bmd, prob)):
            reason = "model_error"
        if reason:
            what = reason.split(":", 1)[1].replace("+", ", ") if ":" in reason else ""
            row.update(eligible=False, reason=reason,
                       message=(f"the pediatric model needs {what}" if what
                                else "the model returned no finite prediction"))
            out.append(row)
            continue
        low = bool(rec["low_bmd"]) if threshold is None else prob >= threshold
        row.update(score=prob, pred_z=z, pred_bmd=bmd, category=PEDIATRIC_CATEGORIES[int(low)], flag=low)
        out.append(row)
    return out


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
