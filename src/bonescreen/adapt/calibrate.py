"""``bonescreen calibrate``: a site's own DXA-paired results -> a named site profile.

Input: the model's scores on N local images whose DXA label is known, either scored here from a
cohort manifest (:func:`pairs_from_manifest`) or taken from ``bonescreen screen`` results joined to
a labels table by ``image_id`` then path (:func:`pairs_from_results`). Output: a
:class:`~bonescreen.adapt.profile.SiteProfile` with

- the recalibration (identity / Platt / isotonic) with the lowest cross-validated log-loss;
- the cut-off for the requested operating point (target sensitivity or specificity, Youden, or a
  site probability), with what it achieves on the local pairs (Wilson CIs) and out of fold;
- PPV/NPV at the local prevalence and at a screening-population prevalence if given;
- optionally an abstain band;
- before/after metrics (calibration slope and intercept, ECE, Brier, sensitivity/specificity with
  CIs; "after" is cross-validated so it is not the fit's own flattery) and a learning curve: with
  N = 25, 50, 100, 200, 400 of the pairs, how close the operating point and calibration get on the
  rest.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from bonescreen.adapt.abstain import AbstainBand, band_from_probability, band_from_rates, band_summary
from bonescreen.adapt.profile import PROFILE_TASKS_TEXT, TASK_SCORE, SiteProfile
from bonescreen.adapt.recalibrate import CalibrationError, Recalibration, choose_recalibration, log_loss, one_thread
from bonescreen.errors import TableError
from bonescreen.tasks import TASKS

TARGETS = ("sensitivity", "specificity", "youden", "probability")
#: the label column each task's score is measured against
#: the DXA label column of each task a site profile applies to (its training label, ``Task.label_column``)
TASK_LABEL = {name: TASKS[name].label_column for name in TASK_SCORE}
LEARNING_CURVE_N = (25, 50, 100, 200, 400)


@dataclass
class LocalPairs:
    """Scores and DXA labels of one site's images; nothing that identifies a patient is kept."""

    labels: NDArray[np.int64]
    scores: NDArray[np.float64]
    groups: NDArray[Any] | None = None  # pseudonymous patient keys, only to keep patients together
    dates: list[str] = field(default_factory=list)
    sites: list[str] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.labels.size)

    def subset(self, idx: NDArray[np.intp]) -> LocalPairs:
        return LocalPairs(self.labels[idx], self.scores[idx], None if self.groups is None else self.groups[idx],
                          [self.dates[i] for i in idx] if self.dates else [],
                          [self.sites[i] for i in idx] if self.sites else [], dict(self.source))

    def summary(self) -> dict[str, Any]:
        """Counts and the date range (no identifiers): what the profile records about its data."""
        n_pos = int(self.labels.sum())
        d = sorted(x for x in self.dates if x)
        out: dict[str, Any] = {"n": len(self), "n_positive": n_pos, "n_negative": len(self) - n_pos,
                               "prevalence": n_pos / len(self) if len(self) else None,
                               "date_first": d[0] if d else None, "date_last": d[-1] if d else None,
                               **self.source}
        if self.groups is not None:
            out["n_patients"] = int(len(set(self.groups.tolist())))
        if self.sites:
            out["sites"] = dict(Counter(s or "unknown" for s in self.sites))
        return out


@dataclass
class CalibrateConfig:
    target: str = "sensitivity"
    target_value: float = 0.90
    methods: tuple[str, ...] = ("identity", "platt", "isotonic")
    folds: int = 5
    min_pairs: int = 20
    min_per_class: int = 5
    prevalence: float | None = None  # screening-population prevalence for PPV/NPV
    abstain_width: float | None = None  # abstain band in probability
    abstain_sensitivity: float | None = None  # ... or in rates (both needed)
    abstain_specificity: float | None = None
    learning_curve: tuple[int, ...] = LEARNING_CURVE_N
    repeats: int = 20
    min_rest: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise CalibrationError(f"operating point must be one of {TARGETS}, got {self.target!r}")
        if self.target != "youden" and not 0.0 < float(self.target_value) < 1.0:
            raise CalibrationError(f"target {self.target} must be in (0, 1), got {self.target_value}")
        if (self.abstain_sensitivity is None) != (self.abstain_specificity is None):
            raise CalibrationError("an abstain band in rates needs both a sensitivity and a specificity")
        if self.abstain_width is not None and self.abstain_sensitivity is not None:
            raise CalibrationError("give the abstain band in probability or in rates, not both")
        if self.prevalence is not None and not 0.0 < self.prevalence < 1.0:
            raise CalibrationError(f"prevalence must be in (0, 1), got {self.prevalence}")


# --------------------------------------------------------------------------
# Reading the local pairs
# --------------------------------------------------------------------------


def _label_value(raw: Any) -> int | None:
    try:
        v = float(str(raw).strip())
    except ValueError:
        return None
    if not math.isfinite(v) or v not in (0.0, 1.0):
        return None
    return int(v)


def pairs_from_results(results: str | Path, labels: str | Path, *, artifact: str | Path, task: str = "stage2",
                       allow_unmatched: bool = False) -> LocalPairs:
    """``bonescreen screen`` results (a folder, ``results.csv`` or ``predictions.csv``) + labels.

    Joined by ``image_id``, then by resolved path (``bonescreen.screen``'s join). Refused: results
    from another model (neither this file nor an earlier version of it with the same weights),
    results screened under a site profile (calibration needs the base model's scores), labels for
    images the results never screened (unless ``allow_unmatched``: then they are counted and left out).
    """
    import pandas as pd

    from bonescreen.adapt.profile import artifact_lineage
    from bonescreen.screen.inputs import read_labels

    rp = Path(results)
    if rp.is_dir():
        rp = rp / "results.csv"
    if not rp.is_file():
        raise TableError(f"screening results not found: {rp}")
    try:
        frame = pd.read_csv(rp, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise TableError(f"{rp}: not a readable results table: {exc}") from exc
    score_col = TASK_SCORE[task]
    if score_col not in frame.columns:  # a stage-1 model screened alone: its score is also ``score``
        score_col = "score"
    need = {"image_id", score_col}
    if not need <= set(frame.columns):
        raise TableError(f"{rp}: screening results need columns {sorted(need)}; found {sorted(frame.columns)}")
    if "eligible" in frame.columns:
        frame = frame[frame["eligible"].str.lower().isin(("true", "1"))]
    prof_col = frame.get("site_profile")
    if prof_col is not None and (prof_col.astype(str).str.len() > 0).any():
        used = sorted(set(prof_col[prof_col.astype(str).str.len() > 0]))
        raise CalibrationError(f"{rp} was screened with site profile(s) {used}: calibrate needs the base "
                               "model's scores (screen again without --site-profile)")
    # the first model of a cascade is recorded in model_stage1
    model_col = "model_stage1" if TASKS[task].cascade_stage == 1 and "model_stage1" in frame.columns and \
        (frame["model_stage1"].str.len() > 0).any() else "model"
    if model_col in frame.columns:
        known = {sha[:12] for sha in artifact_lineage(artifact)}
        ids = sorted(set(frame[model_col]) - {""})
        other = [m for m in ids if m.rsplit("@", 1)[-1] not in known]
        if other:
            raise CalibrationError(
                f"{rp} holds scores from {other}, not from {Path(artifact).name} (or an earlier version of it "
                "with the same weights): calibrate the model that screened them"
            )
    frame = frame[frame[score_col].str.len() > 0]  # cascade rows stage 1 flagged have no stage-2 score
    by_id, by_path = read_labels(labels)
    label_col = TASK_LABEL[task]
    records = frame.to_dict("records")
    found = [by_id.get(str(r["image_id"])) or (by_path.get(os.path.realpath(r["path"])) if r.get("path") else None)
             for r in records]
    # each labels-table row is one dict, reachable by its image_id and/or its path
    labelled = {id(v): v for v in (*by_id.values(), *by_path.values())
                if _label_value(v.get(label_col, "")) is not None}
    matched = {id(v) for v in found if v is not None}
    never = [v for k, v in labelled.items() if k not in matched]
    n_unmatched = len(never)
    if n_unmatched and not allow_unmatched:
        raise CalibrationError(
            f"{n_unmatched} of {len(labelled)} labelled image(s) in {Path(labels).name} were never screened "
            f"in {rp.parent.name}/{rp.name}: screen them first, or pass --allow-unmatched to leave them out"
        )
    ys: list[int] = []
    ss: list[float] = []
    gs: list[str] = []
    dates: list[str] = []
    sites: list[str] = []
    n_no_label = 0
    for rec, lab in zip(records, found):
        if not lab:
            continue
        y = _label_value(lab.get(label_col, ""))
        if y is None:
            n_no_label += 1  # e.g. osteoporosis rows have no stage-2 label
            continue
        ys.append(y)
        ss.append(float(rec[score_col]))
        gs.append(str(rec.get("patient_id") or lab.get("patient_id") or rec["image_id"]))
        dates.append(str(rec.get("study_date") or ""))
        sites.append(str(rec.get("site") or lab.get("site") or ""))
    source = {"kind": "screen_results", "results_rows": int(len(frame)), "labels_unmatched": int(n_unmatched),
              "labelled_without_task_label": n_no_label}
    return LocalPairs(np.asarray(ys, dtype=np.int64), np.asarray(ss, dtype=float), np.asarray(gs, dtype=object),
                      dates, sites, source)


def select_manifest(manifest: str | Path | Any, task: str, *, site: str | None = None,
                    split: str | None = None) -> Any:
    """The manifest rows calibrate uses: one site/split, with a DXA label for ``task``."""
    import pandas as pd

    from bonescreen.data import read_manifest

    frame = read_manifest(manifest)
    if site is not None:
        if "site" not in frame.columns:
            raise TableError("the manifest has no 'site' column to select --site from")
        frame = frame[frame["site"].astype(str) == site]
        if frame.empty:
            raise CalibrationError(f"the manifest has no rows for site {site!r}")
    if split is not None:
        if "split" not in frame.columns:
            raise TableError("the manifest has no 'split' column to select --split from")
        frame = frame[frame["split"].astype(str) == split]
    col = TASK_LABEL.get(task)
    if col is None:
        raise CalibrationError(f"calibrate works on {PROFILE_TASKS_TEXT} models, not {task!r}")
    if col not in frame.columns:
        raise TableError(f"the manifest has no {col!r} column (the DXA label a {task} model is measured against)")
    return frame[pd.to_numeric(frame[col], errors="coerce").notna()].reset_index(drop=True)


def manifest_images(frame: Any, cache_root: str | Path, size: int, progress: bool = False) -> NDArray[np.uint8]:
    """The preprocessed images of a manifest's rows (through the training cache), uint8 N×S×S."""
    from bonescreen.data import prepare_images

    prep = prepare_images(frame, cache_root, size, preload="false", workers=2, progress=progress)
    images: NDArray[np.uint8] = prep.source.batch(np.arange(len(prep.source)))
    return images


def pairs_from_manifest(model: Any, manifest: str | Path | Any, cache_root: str | Path, *, site: str | None = None,
                        split: str | None = None, progress: bool = False) -> LocalPairs:
    """Score a cohort manifest's labelled images (optionally one ``site``/``split``) with ``model``."""
    import pandas as pd

    from bonescreen.training.inference import predict_manifest

    frame = select_manifest(manifest, model.spec.task, site=site, split=split)
    preds = predict_manifest(model, frame, cache_root, labelled_only=True, progress=progress)
    lab = pd.to_numeric(preds["label"], errors="coerce")
    preds = preds[lab.notna()]
    dates = frame.set_index("image_id")["study_date"] if "study_date" in frame.columns else None
    return LocalPairs(
        preds["label"].astype(int).to_numpy(), preds["score"].astype(float).to_numpy(),
        preds["patient_id"].astype(str).to_numpy() if "patient_id" in preds.columns else None,
        [str(dates.get(i, "")) if dates is not None else "" for i in preds["image_id"]],
        preds["site"].astype(str).tolist() if "site" in preds.columns else [],
        {"kind": "manifest", "skipped_images": len(preds.attrs.get("skipped", []))},
    )


def check_pairs(pairs: LocalPairs, config: CalibrateConfig) -> None:
    n = len(pairs)
    n_pos = int(pairs.labels.sum()) if n else 0
    if n == 0:
        raise CalibrationError("no DXA-paired results to calibrate on (no screened image has a label)")
    if n_pos in (0, n):
        which = "positive (low bone mass)" if n_pos else "negative (normal)"
        raise CalibrationError(f"all {n} local pairs are {which}: calibration needs both classes")
    if n < config.min_pairs:
        raise CalibrationError(f"only {n} local DXA-paired results; calibrate needs at least {config.min_pairs}")
    if min(n_pos, n - n_pos) < config.min_per_class:
        raise CalibrationError(f"{n_pos} positive and {n - n_pos} negative local pairs; calibrate needs at least "
                               f"{config.min_per_class} of each")


# --------------------------------------------------------------------------
# Operating point and metrics
# --------------------------------------------------------------------------


def choose_threshold(labels: NDArray[Any], scores: NDArray[Any], config: CalibrateConfig,
                     recal: Recalibration) -> float:
    """The cut-off on the score for the requested operating point."""
    from bonescreen.evaluate.metrics import sensitivity_threshold, specificity_threshold, youden_threshold

    if config.target == "sensitivity":
        return sensitivity_threshold(labels, scores, config.target_value)
    if config.target == "specificity":
        return specificity_threshold(labels, scores, config.target_value)
    if config.target == "youden":
        return youden_threshold(labels, scores)
    return float(np.clip(recal.score_for(config.target_value), 0.0, 1.0))


def _est(e: Any) -> dict[str, Any]:
    d: dict[str, Any] = e.to_dict()
    return d


def metrics_block(labels: NDArray[Any], probs: NDArray[Any], decisions: NDArray[Any] | None = None,
                  *, scores: NDArray[Any] | None = None, threshold: float | None = None,
                  prevalence: float | None = None) -> dict[str, Any]:
    """Calibration (slope, intercept, ECE, Brier, log-loss), AUC and sens/spec/PPV/NPV with CIs."""
    from bonescreen.evaluate.metrics import (
        Confusion,
        auc_point,
        brier,
        calibration_slope_intercept,
        expected_calibration_error,
        predictive_values_ci,
    )

    y = np.asarray(labels).astype(int)
    p = np.asarray(probs, dtype=float)
    if decisions is None:
        decisions = np.asarray(scores if scores is not None else p) >= (0.5 if threshold is None else threshold)
    d = np.asarray(decisions).astype(bool)
    conf = Confusion(tp=int((d & (y == 1)).sum()), tn=int((~d & (y == 0)).sum()),
                     fp=int((d & (y == 0)).sum()), fn=int((~d & (y == 1)).sum()))
    props = conf.proportions()
    cal = calibration_slope_intercept(y, p)
    out: dict[str, Any] = {
        "n": int(y.size), "n_positive": int(y.sum()),
        "calibration_slope": _est(cal.slope), "calibration_intercept": _est(cal.intercept),
        "ece": expected_calibration_error(y, p), "brier": brier(y, p), "log_loss": log_loss(y, p),
        "auc": auc_point(y, scores if scores is not None else p),
        "mean_probability": float(p.mean()), "observed_rate": float(y.mean()),
        "threshold": threshold, "flagged": int(d.sum()),
        "confusion": {"tp": conf.tp, "tn": conf.tn, "fp": conf.fp, "fn": conf.fn},
        **{k: _est(props[k]) for k in ("sensitivity", "specificity", "ppv", "npv")},
    }
    if prevalence is not None:
        pv = predictive_values_ci(props["sensitivity"], props["specificity"], prevalence)
        out["at_prevalence"] = {"prevalence": prevalence, "ppv": _est(pv["ppv"]), "npv": _est(pv["npv"])}
    return out


def _splits(y: NDArray[Any], groups: NDArray[Any] | None, folds: int, seed: int) -> list[tuple[Any, Any]]:
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    k = int(min(folds, y.sum(), y.size - y.sum()))
    if groups is not None and len(set(groups.tolist())) < y.size:
        return list(StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed).split(y, y, groups.astype(str)))
    return list(StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(y, y))


def cross_validated(pairs: LocalPairs, config: CalibrateConfig) -> dict[str, NDArray[Any]]:
    """Out-of-fold probabilities and decisions: each fold's map and cut-off fitted on the others."""
    y, s = pairs.labels, pairs.scores
    prob = np.full(y.size, np.nan)
    dec = np.zeros(y.size, dtype=bool)
    for tr, te in _splits(y, pairs.groups, config.folds, config.seed):
        sub = pairs.subset(tr)
        ch = choose_recalibration(sub.labels, sub.scores, methods=config.methods, folds=config.folds,
                                  seed=config.seed, groups=sub.groups)
        t = choose_threshold(sub.labels, sub.scores, config, ch.recalibration)
        prob[te] = ch.recalibration.apply(s[te])
        dec[te] = s[te] >= t
    return {"probability": prob, "decision": dec}


def patient_split(pairs: LocalPairs, n: int, rng: np.random.Generator) -> tuple[NDArray[np.intp], NDArray[np.intp]] | None:
    """``n`` images by whole patients (first ``n`` images of a random patient order); the rest."""
    if pairs.groups is not None:
        units, inv = np.unique(pairs.groups.astype(str), return_inverse=True)
    else:
        units, inv = np.arange(len(pairs)), np.arange(len(pairs))
    order = rng.permutation(len(units))
    rank = np.empty(len(units), dtype=np.intp)
    rank[order] = np.arange(len(units))
    img_order = np.argsort(rank[inv], kind="stable")
    fit = img_order[:n]
    taken = set(inv[fit].tolist())
    rest = np.array([i for i in range(len(pairs)) if inv[i] not in taken], dtype=np.intp)
    y = pairs.labels
    if y[fit].sum() < 2 or (1 - y[fit]).sum() < 2 or y[rest].sum() < 1 or (1 - y[rest]).sum() < 1:
        return None
    return fit, rest


def learning_curve(pairs: LocalPairs, config: CalibrateConfig, base_threshold: float) -> list[dict[str, Any]]:
    """For each N: fit on N local pairs, measure on the rest; medians and 10th-90th percentiles."""
    from bonescreen.evaluate.metrics import calibration_slope_intercept, expected_calibration_error

    rng = np.random.default_rng(config.seed)
    out: list[dict[str, Any]] = []
    for n in config.learning_curve:
        if n > len(pairs) - config.min_rest:
            out.append({"n": n, "skipped": f"needs {n + config.min_rest} pairs (N + {config.min_rest} to test on)"})
            continue
        rows: list[dict[str, float]] = []
        tries = 0
        while len(rows) < config.repeats and tries < 5 * config.repeats:
            tries += 1
            drawn = patient_split(pairs, n, rng)
            if drawn is None:
                continue
            fit, rest = drawn
            sub = pairs.subset(fit)
            try:
                ch = choose_recalibration(sub.labels, sub.scores, methods=config.methods, folds=config.folds,
                                          seed=config.seed, groups=sub.groups)
                t = choose_threshold(sub.labels, sub.scores, config, ch.recalibration)
            except (CalibrationError, ValueError):
                continue
            yr, sr = pairs.labels[rest], pairs.scores[rest]
            pr = ch.recalibration.apply(sr)
            dec = sr >= t
            cal = calibration_slope_intercept(yr, pr)
            rows.append({
                "sensitivity": float(dec[yr == 1].mean()), "specificity": float((~dec[yr == 0]).mean()),
                "slope": cal.slope.value, "intercept": cal.intercept.value,
                "ece": expected_calibration_error(yr, pr), "method": ch.recalibration.method,
                "threshold": float(t), "n_rest": int(rest.size),
            })
        if not rows:
            out.append({"n": n, "skipped": "no draw held both classes"})
            continue
        entry: dict[str, Any] = {"n": n, "repeats": len(rows), "n_rest_median": int(np.median([r["n_rest"] for r in rows]))}
        for k in ("sensitivity", "specificity", "slope", "intercept", "ece", "threshold"):
            v = np.array([r[k] for r in rows], dtype=float)
            v = v[np.isfinite(v)]
            entry[k] = {"median": float(np.median(v)) if v.size else None,
                        "p10": float(np.percentile(v, 10)) if v.size else None,
                        "p90": float(np.percentile(v, 90)) if v.size else None}
        entry["methods"] = dict(Counter(r["method"] for r in rows))
        if config.target in ("sensitivity", "specificity"):
            k = config.target
            dev = np.abs(np.array([r[k] for r in rows]) - config.target_value)
            entry["within_0.05"] = float(np.mean(dev <= 0.05))
        out.append(entry)
    return out


# --------------------------------------------------------------------------
# The whole fit
# --------------------------------------------------------------------------


@dataclass
class CalibrationOutcome:
    profile: SiteProfile
    report: dict[str, Any]


def make_band(labels: NDArray[Any], scores: NDArray[Any], threshold: float, recal: Recalibration,
              config: CalibrateConfig) -> AbstainBand | None:
    if config.abstain_width is not None:
        return band_from_probability(threshold, config.abstain_width, recal)
    if config.abstain_sensitivity is not None:
        assert config.abstain_specificity is not None  # CalibrateConfig requires both or neither
        return band_from_rates(labels, scores, sensitivity=config.abstain_sensitivity,
                               specificity=float(config.abstain_specificity), threshold=threshold)
    return None


@one_thread  # hundreds of tiny fits (cross-validation, learning curve)
def calibrate_pairs(pairs: LocalPairs, *, name: str, fingerprint: str, task: str, base_threshold: float,
                    config: CalibrateConfig | None = None, adaptation: dict[str, Any] | None = None,
                    base_profile: str | None = None) -> CalibrationOutcome:
    """Fit the profile on every pair; report before, after (cross-validated) and the learning curve."""
    cfg = config or CalibrateConfig()
    check_pairs(pairs, cfg)
    y, s = pairs.labels, pairs.scores
    local_prev = float(y.mean())
    choice = choose_recalibration(y, s, methods=cfg.methods, folds=cfg.folds, seed=cfg.seed, groups=pairs.groups)
    rec = choice.recalibration
    t = choose_threshold(y, s, cfg, rec)
    band = make_band(y, s, t, rec, cfg)
    before = metrics_block(y, s, scores=s, threshold=base_threshold, prevalence=cfg.prevalence)
    in_sample = metrics_block(y, rec.apply(s), scores=s, threshold=t, prevalence=cfg.prevalence)
    cv = cross_validated(pairs, cfg)
    after_cv = metrics_block(y, cv["probability"], cv["decision"], scores=s, threshold=t, prevalence=cfg.prevalence)
    op: dict[str, Any] = {
        "target": cfg.target, "value": None if cfg.target == "youden" else float(cfg.target_value),
        "threshold": float(t), "threshold_probability": float(rec.apply([t])[0]),
        "base_threshold": float(base_threshold),
        "achieved": {k: in_sample[k] for k in ("sensitivity", "specificity", "ppv", "npv")},
        "achieved_cross_validated": {k: after_cv[k] for k in ("sensitivity", "specificity")},
    }
    if cfg.prevalence is not None:
        op["at_prevalence"] = in_sample["at_prevalence"]
    report: dict[str, Any] = {
        "data": pairs.summary(), "choice": choice.to_dict(), "operating_point": op,
        "before": before, "after_in_sample": in_sample, "after_cross_validated": after_cv,
        "learning_curve": learning_curve(pairs, cfg, base_threshold) if cfg.learning_curve else [],
    }
    if band is not None:
        report["abstain"] = {"band": band.to_dict(), "in_sample": band_summary(y, s, t, band)}
    profile = SiteProfile(
        name=name, kind="calibrated", model_fingerprint=fingerprint, task=task, threshold=float(t),
        recalibration=rec, abstain=band, adaptation=adaptation, operating_point=op,
        prevalence={"value": local_prev, "method": "local DXA-paired sample",
                    "screening_population": cfg.prevalence},
        data=pairs.summary(), metrics={k: report[k] for k in ("before", "after_cross_validated", "learning_curve")},
        base_profile=base_profile,
    )
    return CalibrationOutcome(profile, report)


# --------------------------------------------------------------------------
# Printing
# --------------------------------------------------------------------------


def _fmt(e: dict[str, Any] | None, digits: int = 2) -> str:
    if not e or e.get("value") is None:
        return "NA"
    v, lo, hi = e["value"], e.get("lo"), e.get("hi")
    if lo is None or hi is None:
        return f"{v:.{digits}f}"
    return f"{v:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def _num(v: Any, digits: int = 3) -> str:
    return "NA" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def format_report(report: dict[str, Any]) -> str:
    """The before/after table, the operating point and the learning curve, as printed by the CLI."""
    d = report["data"]
    lines = [f"local pairs: {d['n']} ({d['n_positive']} low bone mass, {d['n_negative']} normal; prevalence "
             f"{_num(d['prevalence'], 2)}" + (f"; {d['n_patients']} patients" if d.get("n_patients") else "")
             + (f"; {d['date_first']} .. {d['date_last']}" if d.get("date_first") else "") + ")"]
    ch = report["choice"]
    cvs = ", ".join(f"{m} {v['log_loss']:.3f}" for m, v in ch["cv"].items())
    lines.append(f"recalibration: {ch['chosen']} (cross-validated log-loss, {ch['folds']} folds: {cvs})")
    op = report["operating_point"]
    what = "Youden" if op["target"] == "youden" else f"{op['target']} {op['value']:.2f}"
    lines.append(f"operating point ({what}): cut-off {op['threshold']:.4g} on the model score "
                 f"(site probability {op['threshold_probability']:.3f}; was {op['base_threshold']:.3f})")
    b, a, ai = report["before"], report["after_cross_validated"], report["after_in_sample"]
    rows = [
        ("calibration slope (1 = ideal)", _fmt(b["calibration_slope"]), _fmt(a["calibration_slope"])),
        ("calibration intercept (0 = ideal)", _fmt(b["calibration_intercept"]), _fmt(a["calibration_intercept"])),
        ("ECE", _num(b["ece"]), _num(a["ece"])),
        ("Brier", _num(b["brier"]), _num(a["brier"])),
        ("mean probability / observed rate", f"{b['mean_probability']:.3f} / {b['observed_rate']:.3f}",
         f"{a['mean_probability']:.3f} / {a['observed_rate']:.3f}"),
        ("sensitivity", _fmt(b["sensitivity"]), _fmt(a["sensitivity"])),
        ("specificity", _fmt(b["specificity"]), _fmt(a["specificity"])),
        ("PPV", _fmt(b["ppv"]), _fmt(ai["ppv"])),
        ("NPV", _fmt(b["npv"]), _fmt(ai["npv"])),
    ]
    if "at_prevalence" in ai:
        pv = ai["at_prevalence"]
        rows.append((f"PPV at prevalence {pv['prevalence']:.2f}", _fmt(b["at_prevalence"]["ppv"]), _fmt(pv["ppv"])))
        rows.append((f"NPV at prevalence {pv['prevalence']:.2f}", _fmt(b["at_prevalence"]["npv"]), _fmt(pv["npv"])))
    w = max(len(r[0]) for r in rows)
    lines.append("")
    lines.append(f"{'':{w}}  {'before (model, cut-off ' + format(op['base_threshold'], '.2f') + ')':<28}  after (cross-validated)")
    lines += [f"{r[0]:{w}}  {r[1]:<28}  {r[2]}" for r in rows]
    lines.append(f"{'AUC (ranking; unchanged)':{w}}  {_num(b['auc']):<28}  {_num(b['auc'])}")
    lines.append(f"(PPV/NPV after: at the final cut-off on all {d['n']} pairs; in-sample sensitivity "
                 f"{_fmt(ai['sensitivity'])}, specificity {_fmt(ai['specificity'])})")
    if "abstain" in report:
        ab = report["abstain"]
        bs = ab["in_sample"]
        lines.append(f"abstain band [{ab['band']['low']:.4g}, {ab['band']['high']:.4g}) on the score: "
                     f"{bs['n_indeterminate']} of {bs['n']} indeterminate; decided sensitivity "
                     f"{_fmt(bs['decided']['sensitivity'])}, specificity {_fmt(bs['decided']['specificity'])}")
    lc = [e for e in report.get("learning_curve", [])]
    if lc:
        lines.append("")
        lines.append("learning curve: fit on N pairs, measured on the rest (median [10th-90th percentile] "
                     "over repeats)")
        lines.append(f"{'N':>5}  {'sensitivity':<20}  {'specificity':<20}  {'slope':<20}  {'ECE':<20}  within 0.05")
        for e in lc:
            if "skipped" in e:
                lines.append(f"{e['n']:>5}  skipped: {e['skipped']}")
                continue

            def q(k: str) -> str:
                v = e[k]
                return f"{_num(v['median'], 2)} [{_num(v['p10'], 2)}-{_num(v['p90'], 2)}]"

            within = f"{e['within_0.05']:.0%}" if "within_0.05" in e else "-"
            lines.append(f"{e['n']:>5}  {q('sensitivity'):<20}  {q('specificity'):<20}  {q('slope'):<20}  "
                         f"{q('ece'):<20}  {within}")
    return "\n".join(lines)
