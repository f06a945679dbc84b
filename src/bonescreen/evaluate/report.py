"""The validation report: read predictions, compute everything, write a folder.

``run_evaluation`` is what ``bonescreen evaluate`` calls. It never dies on a
fixable problem in the input: bad rows are dropped with a counted warning,
analyses whose columns are missing are skipped with a note, undefined numbers
(one class in a subgroup) are reported as NA. It raises ``TableError`` only
when nothing meaningful is left.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bonescreen import schema
from bonescreen.errors import TableError
from bonescreen.labels import normalize_sex
from bonescreen.evaluate import plots, tables
from bonescreen.evaluate.compare import (
    DeLongResult,
    SubgroupRow,
    age_band_labels,
    assign_age_band,
    delong_test,
    severity_accuracy,
    severity_from_t,
    subgroup_analysis,
)
from bonescreen.evaluate.decision import (
    DCA_TABLE_THRESHOLDS,
    DCA_THRESHOLDS,
    DEFAULT_REFERRAL_AGES,
    DecisionCurve,
    decision_curve,
)
from bonescreen.evaluate.metrics import (
    BinaryResult,
    CalibrationFit,
    Estimate,
    bootstrap_weights,
    calibration_slope_intercept,
    evaluate_binary,
    expected_calibration_error,
    proportion,
    sensitivity_threshold,
    weighted_roc_band,
    youden_threshold,
)

DEFAULT_AGE_BANDS = (50.0, 55.0, 60.0, 65.0)
#: The category of a result the model abstained on (site calibration's abstain band).
ABSTAIN_CATEGORY = "indeterminate"


@dataclass
class EvaluateConfig:
    threshold: float = 0.5
    n_boot: int = 1000
    seed: int = 0
    age_bands: tuple[float, ...] = DEFAULT_AGE_BANDS
    target_sensitivity: float = 0.9
    alpha: float = 0.05
    title: str = "bonescreen validation report"
    positive_label: str = "low bone mass"  # what score >= cut-off is called (wording only)
    # decision curves: refer women >= [0] and men >= [1] years as the comparator; None: no such rule
    referral_rule: tuple[float, float] | None = DEFAULT_REFERRAL_AGES


# --------------------------------------------------------------------------
# Reading and checking predictions
# --------------------------------------------------------------------------


def _valid_scores(df: pd.DataFrame, source: str, warnings: list[str]) -> pd.DataFrame:
    """Rows with a probability in [0, 1], and abstentions (scored or not)."""
    # Abstentions ("indeterminate: consider DXA") are a result, not bad rows: they are counted
    # (STARD item 15) even when the model gave them no score.
    df["_abstain"] = (df["category"].astype(str).str.strip().str.lower() == ABSTAIN_CATEGORY
                      if "category" in df.columns else False)
    raw_score = df["score"]
    df["score"] = pd.to_numeric(raw_score, errors="coerce")
    unscored_abstain = df["_abstain"] & raw_score.isna()
    nonnum = int((df["score"].isna() & raw_score.notna()).sum())
    nan = int((raw_score.isna() & ~unscored_abstain).sum())
    out = df["score"].notna() & ((df["score"] < 0) | (df["score"] > 1))
    if nan or nonnum:
        warnings.append(f"{source}: {nan + nonnum} row(s) with a missing or non-numeric score dropped")
    if out.any():
        sc = df.loc[out, "score"]
        warnings.append(
            f"{source}: {int(out.sum())} row(s) with score outside [0, 1] dropped "
            f"(range {sc.min():.3g} to {sc.max():.3g}); 'score' must be the probability of the "
            "positive class, not a logit"
        )
    df = df[(df["score"].notna() | df["_abstain"]) & ~out]
    return df


def _valid_labels(df: pd.DataFrame, source: str, warnings: list[str]) -> pd.DataFrame:
    """Rows labelled 0 or 1 (``true``/``false`` read as 1/0), the label as int."""
    lab_raw = df["label"].map(lambda v: {"true": 1, "false": 0}.get(v.strip().lower(), v) if isinstance(v, str) else v)
    lab = pd.to_numeric(lab_raw, errors="coerce")
    nolab = int(lab.isna().sum())
    badlab = int((lab.notna() & ~lab.isin([0, 1])).sum())
    if nolab:
        warnings.append(f"{source}: {nolab} row(s) without a 0/1 label dropped (e.g. osteoporosis rows, "
                        "which have no stage-2 label)")
    if badlab:
        warnings.append(f"{source}: {badlab} row(s) with a label other than 0 or 1 dropped "
                        f"(values seen: {sorted(set(lab[lab.notna() & ~lab.isin([0, 1])].tolist()))[:5]})")
    df = df[lab.isin([0, 1])].copy()
    df["label"] = lab[lab.isin([0, 1])].astype(int)
    return df


def _optional_columns(df: pd.DataFrame, source: str, warnings: list[str]) -> pd.DataFrame:
    """model (default: the file's stem), site, patient_id (unknown: its own resampling unit), sex, age, severity."""
    stem = Path(source).stem
    if "model" not in df.columns:
        df["model"] = stem
    df["model"] = df["model"].fillna(stem).astype(str)
    if "site" not in df.columns:
        df["site"] = "all"
    df["site"] = df["site"].fillna("unknown site").astype(str)
    if "patient_id" in df.columns:
        df["patient_id"] = df["patient_id"].astype(str).where(df["patient_id"].notna(), None)
        if df["patient_id"].isna().any():  # unknown patient: its own resampling unit
            df.loc[df["patient_id"].isna(), "patient_id"] = "__img__" + df.loc[df["patient_id"].isna(), "image_id"]
    if "sex" in df.columns:
        raw = df["sex"]
        df["sex"] = raw.map(normalize_sex)
        bad = int((df["sex"].isna() & raw.notna()).sum())
        if bad:
            warnings.append(f"{source}: {bad} row(s) with an unrecognised sex value (use F/M) "
                            "left out of sex subgroups")
    if "age" in df.columns:
        df["age"] = pd.to_numeric(df["age"], errors="coerce")
    if "severity" in df.columns:
        df["severity"] = df["severity"].astype(str).str.strip().str.lower().where(df["severity"].notna(), None)
        df.loc[df["severity"].isin(["", "nan", "none"]), "severity"] = None
    if "t_min" in df.columns:
        derived = severity_from_t(df["t_min"]).to_numpy()
        if "severity" not in df.columns:
            df["severity"] = derived
        else:
            df["severity"] = df["severity"].where(df["severity"].notna(), pd.Series(derived, index=df.index))

    return df


def _drop_duplicate_images(df: pd.DataFrame, source: str, warnings: list[str]) -> pd.DataFrame:
    """Within a model, an image listed twice: once if the rows agree, dropped altogether if they conflict."""
    key = ["model", "image_id"]
    dup = df.duplicated(key, keep=False)
    if dup.any():
        d = df[dup]
        conflicting = d.groupby(key)[["score", "label"]].nunique().max(axis=1) > 1
        conf_keys = set(conflicting[conflicting].index)
        if conf_keys:
            mask = pd.Series([k in conf_keys for k in zip(df["model"], df["image_id"])], index=df.index)
            warnings.append(f"{source}: {len(conf_keys)} image id(s) appear more than once with different "
                            f"scores or labels; all {int(mask.sum())} of their rows dropped")
            df = df[~mask]
        df2 = df.drop_duplicates(key)
        if len(df2) < len(df):
            warnings.append(f"{source}: {len(df) - len(df2)} exact duplicate row(s) (same image id) dropped")
        df = df2
    return df


def prepare_predictions(df: pd.DataFrame, source: str) -> tuple[pd.DataFrame, list[str]]:
    """Validate one predictions table; return the usable rows and warnings.

    Rows are dropped (and counted) for: score missing / not a number / outside
    [0, 1]; label missing or not 0/1; conflicting duplicate image ids.
    """
    warnings: list[str] = []
    missing = [c for c in schema.PREDICTION_REQUIRED if c not in df.columns]
    if missing:
        raise TableError(
            f"{source}: missing required column(s) {missing}; found {list(df.columns)}. "
            f"A predictions table needs {schema.PREDICTION_REQUIRED} "
            f"(optional: {schema.PREDICTION_OPTIONAL}).",
            reason="missing_columns",
        )
    df = df.copy()
    n0 = len(df)
    if n0 == 0:
        raise TableError(f"{source}: the predictions table has no rows", reason="empty_table")
    df["image_id"] = df["image_id"].astype(str)
    df = _valid_labels(_valid_scores(df, source, warnings), source, warnings)
    if df.empty:
        raise TableError(f"{source}: no usable rows left out of {n0} (see the warnings above): "
                         + "; ".join(warnings), reason="no_valid_rows")
    df = _drop_duplicate_images(_optional_columns(df, source, warnings), source, warnings)
    if df.empty:
        raise TableError(f"{source}: no usable rows left after removing duplicates", reason="no_valid_rows")
    return df.reset_index(drop=True), warnings


def read_predictions(paths: Sequence[str | Path]) -> tuple[pd.DataFrame, list[str]]:
    """Read and validate one or more predictions CSVs into one table."""
    frames, warnings = [], []
    if not paths:
        raise TableError("no predictions file given", reason="missing_file")
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise TableError(f"predictions file not found: {path}", reason="missing_file")
        try:
            raw = pd.read_csv(path, dtype={"image_id": str, "patient_id": str})
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise TableError(f"{path.name}: not a readable CSV table ({exc})", reason="bad_table") from exc
        df, w = prepare_predictions(raw, path.name)
        frames.append(df)
        warnings += w
    df = pd.concat(frames, ignore_index=True)
    # the same model split over several files is fine; the same image twice is not
    dup = df.duplicated(["model", "image_id"], keep="first")
    if dup.any():
        warnings.append(f"{int(dup.sum())} image id(s) appear in more than one file for the same model; "
                        "the first occurrence is kept")
        df = df[~dup].reset_index(drop=True)
    return df, warnings


def read_oracle(path: str | Path) -> dict[str, float]:
    """``oracle.json`` from the phantom: ``{site: {"auc": ...}}`` (or ``{site: auc}``)."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise TableError(f"oracle file not found: {p}", reason="missing_file") from exc
    except json.JSONDecodeError as exc:
        raise TableError(f"oracle file {p.name} is not valid JSON: {exc}", reason="bad_json") from exc
    out: dict[str, float] = {}
    if not isinstance(data, dict):
        raise TableError(f"oracle file {p.name}: expected an object {{site: {{'auc': ...}}}}", reason="bad_oracle")
    for site, v in data.items():
        auc = v.get("auc") if isinstance(v, dict) else v
        if isinstance(auc, (int, float)) and not isinstance(auc, bool):
            out[str(site)] = float(auc)
    return out


# --------------------------------------------------------------------------
# The analysis
# --------------------------------------------------------------------------
@dataclass
class SiteAnalysis:
    main: BinaryResult
    operating_points: dict[str, BinaryResult]
    subgroups: list[SubgroupRow]
    heterogeneity: dict[str, dict[str, Any]]
    severity: list[dict[str, Any]]
    curve: plots.Curve
    calibration_fit: CalibrationFit | None = None
    ece: float = math.nan
    decision: DecisionCurve | None = None
    abstentions: dict[str, Any] | None = None


@dataclass
class Report:
    config: EvaluateConfig
    inputs: dict[str, Any]
    warnings: list[str]
    notes: list[str]
    thresholds: dict[str, dict[str, float]]
    sites: dict[str, dict[str, SiteAnalysis]]  # model -> site -> analysis
    delong: list[dict[str, Any]]
    oracle: dict[str, float]
    table1: pd.DataFrame | None = None
    flows: dict[str, list[dict[str, Any]]] | None = None
    figures: dict[str, bytes] = field(default_factory=dict)
    cascade: dict[str, dict[str, Any]] | None = None  # site -> evaluate.cascade.cascade_table

    @property
    def models(self) -> list[str]:
        return list(self.sites)


def choose_thresholds(tune: pd.DataFrame, target_sensitivity: float) -> tuple[dict[str, dict[str, float]], list[str]]:
    """Per model, Youden and target-sensitivity cut-offs on the tuning rows."""
    out: dict[str, dict[str, float]] = {}
    warnings = []
    for model, g in tune.groupby("model", sort=False):
        y, s = g["label"].to_numpy(), g["score"].to_numpy()
        try:
            out[str(model)] = {
                "youden": youden_threshold(y, s),
                f"sens≥{target_sensitivity:g}": sensitivity_threshold(y, s, target_sensitivity),
            }
        except ValueError as exc:
            warnings.append(f"tuning set, model {model}: {exc}; no tuned operating points for it")
    return out, warnings


def _site_seed(seed: int, model_i: int, site_i: int) -> int:
    return seed + 7919 * model_i + 104729 * site_i


def _split_rows(df: pd.DataFrame, tune: pd.DataFrame | None, warns: list[str],
                notes: list[str]) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Leave train/tune rows out of the evaluation; the tune rows are the tuning set unless one was given."""
    if "split" not in df.columns:
        return df, tune
    split = df["split"].astype(str).str.strip().str.lower()
    if tune is None and (split == "tune").any():
        tune = df[split == "tune"]
        notes.append(f"{len(tune)} row(s) with split = tune used as the tuning set for operating points "
                     "and left out of the evaluation")
    drop = split.isin(["tune", "train"])
    if (split == "train").any():
        notes.append(f"{int((split == 'train').sum())} row(s) with split = train left out of the evaluation")
    if drop.all():
        warns.append("every row is in the train/tune split; evaluating all of them anyway")
        return df, tune
    return df[~drop], tune


def _tuned_thresholds(df: pd.DataFrame, tune: pd.DataFrame | None, cfg: EvaluateConfig, warns: list[str],
                      notes: list[str]) -> dict[str, dict[str, float]]:
    """Per evaluated model, the operating points chosen on the tuning rows (none without tuning rows)."""
    if tune is None or not len(tune):
        return {}
    thresholds, w = choose_thresholds(tune, cfg.target_sensitivity)
    warns += w
    models_eval = list(pd.unique(df["model"]))
    if len(thresholds) == 1 and len(models_eval) == 1 and models_eval[0] not in thresholds:
        (tuned_name, thr), = thresholds.items()
        notes.append(f"tuning set model {tuned_name!r} applied to evaluated model {models_eval[0]!r} "
                     "(one model on each side)")
        thresholds = {models_eval[0]: thr}
    for m in models_eval:
        if m not in thresholds:
            warns.append(f"no tuning-set rows for model {m!r} (tuning models: {sorted(thresholds)}); "
                         "only the fixed cut-off is reported for it")
    return thresholds


def _available_columns(df: pd.DataFrame, notes: list[str]) -> dict[str, bool]:
    """Which optional columns hold values; a note for each analysis a missing one skips."""
    has = {c: c in df.columns and df[c].notna().any() for c in ("sex", "age", "severity", "patient_id")}
    if not has["patient_id"]:
        notes.append("no patient_id column: the bootstrap resamples images (each image its own patient)")
    if not has["sex"]:
        notes.append("no sex column: sex subgroups skipped")
    if not has["age"]:
        notes.append("no age column: age-band subgroups skipped")
    if not has["severity"]:
        notes.append("no severity or t_min column: accuracy by severity (Figure 2) skipped")
    return has


def _subgroups(g: pd.DataFrame, cfg: EvaluateConfig, has: dict[str, bool], seed: int, label: str,
               warns: list[str]) -> tuple[list[SubgroupRow], dict[str, dict[str, Any]]]:
    """Sex and age-band subgroups with their heterogeneity tests (none without the columns)."""
    fams: dict[str, pd.Series] = {}
    if has["sex"] and "sex" in g:
        fams["sex"] = pd.Series(pd.Categorical(g["sex"], categories=["F", "M", "O"]))
    if has["age"] and "age" in g:
        fams["age"] = pd.Series(pd.Categorical(assign_age_band(g["age"], cfg.age_bands),
                                               categories=age_band_labels(cfg.age_bands)))
    if not fams:
        return [], {}
    sub_rows, hetero = subgroup_analysis(g, fams, threshold=cfg.threshold, n_boot=cfg.n_boot, seed=seed)
    for r in sub_rows:
        if not r.result.estimates["auc"].defined:
            warns.append(f"{label}: subgroup {r.subgroup} has a single class "
                         f"({r.result.n} image(s)): AUC undefined, reported as NA")
    return sub_rows, hetero


def _analyse_site(g_all: pd.DataFrame, model: str, site: str, cfg: EvaluateConfig, seed: int,
                  thresholds: dict[str, float], has: dict[str, bool], warns: list[str]) -> SiteAnalysis | None:
    """Every number of one model on one site (None when no row of it has a score)."""
    abst = abstention_summary(g_all, cfg.threshold, cfg.alpha) if g_all["_abstain"].any() else None
    g = g_all[g_all["score"].notna()].reset_index(drop=True)  # abstentions without a score are counted only
    if g.empty:
        return None
    label = f"{model} / {site}"
    y = g["label"].to_numpy()
    s = g["score"].to_numpy(dtype=float)
    groups = g["patient_id"].to_numpy() if has["patient_id"] else None
    boot = bootstrap_weights(y, groups, n_boot=cfg.n_boot, seed=seed) if 0 < y.sum() < y.size else None
    main = evaluate_binary(y, s, groups=groups, threshold=cfg.threshold, n_boot=cfg.n_boot, seed=seed,
                           alpha=cfg.alpha, boot=boot)
    warns += [f"{label}: {n}" for n in main.notes]
    ops = {name: evaluate_binary(y, s, threshold=thr, n_boot=0, alpha=cfg.alpha) for name, thr in thresholds.items()}
    sub_rows, hetero = _subgroups(g, cfg, has, seed, label, warns)
    sev = severity_accuracy(g, cfg.threshold) if has["severity"] and "severity" in g else []
    band = weighted_roc_band(y, s, boot.weights, alpha=cfg.alpha) if boot is not None and len(boot.weights) else None
    auc = main.estimates["auc"]
    curve = plots.Curve(model, y, s, auc.value, auc.lo, auc.hi, main.average_precision, band, main.calibration)
    cal_fit = calibration_slope_intercept(y, s, cfg.alpha)
    dca = decision_curve(
        y, s, sex=g["sex"].to_numpy() if has["sex"] else None, age=g["age"].to_numpy() if has["age"] else None,
        referral_ages=cfg.referral_rule, model_name=model)
    return SiteAnalysis(main, ops, sub_rows, hetero, sev, curve, cal_fit, expected_calibration_error(y, s), dca,
                        abst)


def evaluate_predictions(
    preds: pd.DataFrame,
    *,
    config: EvaluateConfig | None = None,
    tune: pd.DataFrame | None = None,
    manifest: pd.DataFrame | None = None,
    flows: dict[str, list[dict[str, Any]]] | None = None,
    oracle: Mapping[str, float] | None = None,
    warnings: Sequence[str] = (),
    inputs: Mapping[str, Any] | None = None,
    cascade: Mapping[str, dict[str, Any]] | None = None,
    progress: bool = True,
) -> Report:
    """Compute every table and figure of the report from validated predictions."""
    from tqdm.auto import tqdm

    cfg = config or EvaluateConfig()
    warns = list(warnings)
    notes: list[str] = []
    df = preds if "_abstain" in preds.columns else preds.assign(_abstain=False)
    df, tune = _split_rows(df, tune, warns, notes)
    thresholds = _tuned_thresholds(df, tune, cfg, warns, notes)
    has = _available_columns(df, notes)
    models = list(pd.unique(df["model"]))
    sites_all = list(pd.unique(df["site"]))
    result: dict[str, dict[str, SiteAnalysis]] = {}
    jobs = [(mi, m, si, s) for mi, m in enumerate(models) for si, s in enumerate(sites_all)]
    for mi, model, si, site in tqdm(jobs, desc="evaluate", disable=not progress, unit="site"):
        g_all = df[(df["model"] == model) & (df["site"] == site)].reset_index(drop=True)
        if g_all.empty:
            continue
        analysis = _analyse_site(g_all, model, site, cfg, _site_seed(cfg.seed, mi, si), thresholds.get(model, {}),
                                 has, warns)
        if analysis is not None:
            result.setdefault(model, {})[site] = analysis

    delong_rows = _delong_all(df[df["score"].notna()], models, sites_all, warns)
    if delong_rows and has["patient_id"] and df.groupby(["model", "patient_id"]).size().max() > 1:
        notes.append("DeLong's test assumes independent cases; some patients have several images, "
                     "so its p-values are somewhat optimistic")
    dca_notes = sorted({n for ss in result.values() for a in ss.values() if a.decision for n in a.decision.notes or []})
    notes += [f"decision curves: {n}" for n in dca_notes]
    rep = Report(cfg, dict(inputs or {}), warns, notes, thresholds, result, delong_rows, dict(oracle or {}),
                 cascade=dict(cascade) if cascade else None)
    if manifest is not None:
        rep.table1 = tables.table1(manifest)
    if flows:
        rep.flows = flows
        for msg in tables.flow_inconsistencies(flows):
            warns.append(f"flow counts do not add up: {msg}")
    _make_figures(rep)
    return rep


def abstention_summary(g: pd.DataFrame, threshold: float, alpha: float = 0.05) -> dict[str, Any]:
    """Abstentions of one model on one dataset: how many, their prevalence, and sens/spec without them.

    ``g`` holds every labelled row, ``_abstain`` marking the results whose category is
    ``indeterminate``. The main tables score every row that has a score; this is the
    decision as deployed, where an abstention refers to DXA instead of calling a category.
    """
    ab = g["_abstain"].to_numpy(dtype=bool)
    y = g["label"].to_numpy().astype(int)
    n, k = int(len(g)), int(ab.sum())
    rest = g[~ab]
    called = rest["score"].to_numpy(dtype=float) >= threshold
    yr = rest["label"].to_numpy().astype(int)
    tp, fn = int(np.sum(called & (yr == 1))), int(np.sum(~called & (yr == 1)))
    tn, fp = int(np.sum(~called & (yr == 0))), int(np.sum(called & (yr == 0)))
    return {
        "n": n,
        "abstained": proportion(k, n, alpha).to_dict(),
        "positive_among_abstained": proportion(int(y[ab].sum()), k, alpha).to_dict(),
        "sensitivity_without": proportion(tp, tp + fn, alpha).to_dict(),
        "specificity_without": proportion(tn, tn + fp, alpha).to_dict(),
        "unscored": int(g.loc[ab, "score"].isna().sum()),
    }


def _delong_all(df: pd.DataFrame, models: list[str], sites: list[str], warns: list[str]) -> list[dict[str, Any]]:
    """DeLong for every pair of models scoring the same image ids on a site."""
    rows = []
    for site in sites:
        for i in range(len(models)):
            for j in range(i + 1, len(models)):
                a = df[(df["model"] == models[i]) & (df["site"] == site)].set_index("image_id")
                b = df[(df["model"] == models[j]) & (df["site"] == site)].set_index("image_id")
                common = a.index.intersection(b.index)
                if len(common) == 0:
                    continue
                la, lb = a.loc[common, "label"].to_numpy(), b.loc[common, "label"].to_numpy()
                if (la != lb).any():
                    warns.append(f"DeLong {models[i]} vs {models[j]} / {site}: {int((la != lb).sum())} shared "
                                 "image(s) have different labels in the two files; comparison skipped")
                    continue
                try:
                    res: DeLongResult = delong_test(la, a.loc[common, "score"].to_numpy(),
                                                    b.loc[common, "score"].to_numpy())
                except ValueError as exc:
                    warns.append(f"DeLong {models[i]} vs {models[j]} / {site}: {exc}; skipped")
                    continue
                rows.append({"site": site, "model_1": models[i], "model_2": models[j],
                             "n_only_1": int(len(a) - len(common)), "n_only_2": int(len(b) - len(common)),
                             **res.to_dict()})
    return rows


def _make_figures(rep: Report) -> None:
    sites_order: list[str] = []
    for m in rep.models:
        sites_order += [s for s in rep.sites[m] if s not in sites_order]
    # one panel per site, every model overlaid on it
    panels = {s: [rep.sites[m][s].curve for m in rep.models if s in rep.sites[m]] for s in sites_order}
    if panels:
        rep.figures["roc"] = plots.roc_figure(panels, rep.oracle)
        rep.figures["pr"] = plots.pr_figure(panels)
        rep.figures["calibration"] = plots.calibration_figure(panels)
    sev = {}
    for model, sites in rep.sites.items():
        for site, a in sites.items():
            if a.severity:
                sev[site if len(rep.models) == 1 else f"{model} / {site}"] = a.severity
    if sev:
        rep.figures["severity"] = plots.severity_figure(sev)
    if rep.flows:
        rep.figures["flow"] = plots.flow_figure(rep.flows)
    dca = {s: [rep.sites[m][s].decision for m in rep.models if s in rep.sites[m] and rep.sites[m][s].decision]
           for s in sites_order}
    dca = {s: v for s, v in dca.items() if v}
    if dca:
        rep.figures["decision"] = plots.decision_figure(dca)


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------
def json_clean(o: Any) -> Any:
    """JSON-ready: numpy scalars to Python, NaN and infinities to None, keys to str."""
    if isinstance(o, dict):
        return {str(k): json_clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [json_clean(v) for v in o]
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating, float)):
        f = float(o)
        return None if math.isnan(f) or math.isinf(f) else f
    if isinstance(o, np.ndarray):
        return json_clean(o.tolist())
    return o


def metrics_dict(rep: Report) -> dict[str, Any]:
    from bonescreen import __version__

    out: dict[str, Any] = {
        "format": "bonescreen-evaluation",
        "bonescreen_version": __version__,
        "config": {**rep.config.__dict__, "age_bands": list(rep.config.age_bands)},
        "inputs": rep.inputs,
        "warnings": rep.warnings,
        "notes": rep.notes,
        "tuned_thresholds": rep.thresholds,
        "oracle_auc": rep.oracle,
        "results": {},
        "delong": rep.delong,
        "cascade": rep.cascade,
        "stard_2015": stard_rows(rep),
    }
    for model, sites in rep.sites.items():
        out["results"][model] = {}
        for site, a in sites.items():
            d = a.main.to_dict()
            d["operating_points"] = {k: {**v.to_dict(), "calibration": None} for k, v in a.operating_points.items()}
            d["subgroups"] = [
                {"family": r.family, "subgroup": r.subgroup, "p_auc_0.5": r.p_auc, "p_auc_0.5_bonferroni": r.p_auc_adj,
                 **{k: v for k, v in r.result.to_dict().items() if k != "calibration"}}
                for r in a.subgroups
            ]
            d["subgroup_heterogeneity"] = a.heterogeneity
            d["severity"] = a.severity
            d["calibration_fit"] = a.calibration_fit.to_dict() if a.calibration_fit else None
            d["ece"] = a.ece
            d["decision_curve"] = a.decision.to_dict() if a.decision else None
            d["abstentions"] = a.abstentions
            if site in rep.oracle:
                d["oracle_auc"] = rep.oracle[site]
            out["results"][model][site] = d
    return dict(json_clean(out))


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


def table2_frames(rep: Report) -> dict[str, pd.DataFrame]:
    return {m: tables.table2({s: a.main for s, a in sites.items()}, rep.oracle or None)
            for m, sites in rep.sites.items()}


def table3_frames(rep: Report) -> dict[str, pd.DataFrame]:
    return {m: tables.table3({s: a.subgroups for s, a in sites.items()},
                             {s: a.heterogeneity for s, a in sites.items()})
            for m, sites in rep.sites.items()}


def operating_point_frame(rep: Report) -> pd.DataFrame:
    rows = []
    for model, sites in rep.sites.items():
        for site, a in sites.items():
            for name, r in {f"cut-off {rep.config.threshold:g}": a.main, **a.operating_points}.items():
                rows.append({"Model": model, "Dataset": site, "Operating point": name,
                             "Threshold": f"{r.threshold:.4f}",
                             **{tables.METRIC_LABELS[k]: r.estimates[k].fmt() for k in
                                ("sensitivity", "specificity", "ppv", "npv", "accuracy")}})
    return pd.DataFrame(rows)


def severity_frame(rep: Report) -> pd.DataFrame:
    rows = []
    for model, sites in rep.sites.items():
        for site, a in sites.items():
            for r in a.severity:
                rows.append({"model": model, "site": site, **r})
    return pd.DataFrame(rows)


def calibration_frame(rep: Report) -> pd.DataFrame:
    """Calibration slope and intercept (logistic recalibration, Wald 95% CI), ECE and Brier per model and site."""
    rows = []
    for model, sites in rep.sites.items():
        for site, a in sites.items():
            f = a.calibration_fit
            rows.append({"Model": model, "Dataset": site, "n": a.main.n,
                         "Calibration slope (95% CI)": f.slope.fmt() if f else "NA",
                         "Calibration intercept (95% CI)": f.intercept.fmt() if f else "NA",
                         "ECE": "NA" if math.isnan(a.ece) else f"{a.ece:.3f}",
                         "Brier score": "NA" if math.isnan(a.main.brier) else f"{a.main.brier:.3f}"})
    return pd.DataFrame(rows)


def decision_frame(rep: Report, thresholds: Sequence[float] = DCA_TABLE_THRESHOLDS) -> pd.DataFrame:
    """Net benefit per strategy at a few threshold probabilities (the figure has the whole curve)."""
    rows = []
    for model, sites in rep.sites.items():
        for site, a in sites.items():
            if a.decision is None:
                continue
            for pt in thresholds:
                nb = a.decision.at(pt)
                rows.append({"Model": model, "Dataset": site, "Threshold probability": f"{pt:.2f}",
                             "Model (refer if score ≥ threshold)": f"{nb[model]:.3f}",
                             **{k.capitalize(): f"{v:.3f}" for k, v in nb.items() if k != model}})
    return pd.DataFrame(rows)


def abstention_frame(rep: Report) -> pd.DataFrame:
    rows = []
    for model, sites in rep.sites.items():
        for site, a in sites.items():
            ab = a.abstentions
            if not ab:
                continue

            def fmt(d: dict[str, Any]) -> str:
                return Estimate.from_dict(d).fmt()

            rows.append({"Model": model, "Dataset": site, "n": ab["n"],
                         "Indeterminate, n": ab["abstained"]["num"],
                         "Indeterminate, share (95% CI)": fmt(ab["abstained"]),
                         f"{rep.config.positive_label.capitalize()} among them (95% CI)":
                             fmt(ab["positive_among_abstained"]),
                         "Sensitivity without them (95% CI)": fmt(ab["sensitivity_without"]),
                         "Specificity without them (95% CI)": fmt(ab["specificity_without"])})
    return pd.DataFrame(rows)


def cascade_frames(rep: Report) -> dict[str, pd.DataFrame]:
    from bonescreen.evaluate.cascade import cascade_frame

    return {site: cascade_frame(t) for site, t in (rep.cascade or {}).items()}


def stard_rows(rep: Report) -> list[dict[str, Any]]:
    """The STARD 2015 checklist for this report (``evaluate.stard``)."""
    from bonescreen.evaluate.stard import stard_checklist

    return stard_checklist(available_sections(rep))


def available_sections(rep: Report) -> set[str]:
    have = {"table2", "methods", "calibration"}
    if rep.table1 is not None:
        have.add("table1")
        if tables.DAYS_ROW in rep.table1.index:
            have.add("interval")
    if rep.flows:
        have.add("flow")
    if any(not f.empty for f in table3_frames(rep).values()):
        have.add("table3")
    if "severity" in rep.figures:
        have.add("severity")
    if rep.cascade:
        have.add("cascade")
    if any(a.abstentions for ss in rep.sites.values() for a in ss.values()):
        have.add("abstentions")
    if "decision" in rep.figures:
        have.add("decision")
    if any("dropped" in w for w in rep.warnings):
        have.add("warnings")
    return have


def write_report(rep: Report, out_dir: str | Path) -> dict[str, Path]:
    """Write report.html, metrics.json, CSV tables and figures/*.png."""
    out = Path(out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}

    def put(name: str, df: pd.DataFrame, index: bool = False) -> None:
        if df is None or df.empty:
            return
        p = out / name
        df.to_csv(p, index=index)
        files[name] = p

    t2 = table2_frames(rep)
    wide = pd.concat({m: f for m, f in t2.items()}, names=["model", "measure"]) if t2 else pd.DataFrame()
    put("table2.csv", wide, index=True)
    put("metrics_long.csv", tables.table2_long({(m, s): a.main for m, ss in rep.sites.items() for s, a in ss.items()}))
    t3 = table3_frames(rep)
    if t3:
        put("table3.csv", pd.concat([f.assign(Model=m) for m, f in t3.items() if not f.empty] or [pd.DataFrame()]))
    put("operating_points.csv", operating_point_frame(rep))
    put("severity.csv", severity_frame(rep))
    put("delong.csv", pd.DataFrame(rep.delong))
    put("calibration.csv", calibration_frame(rep))
    put("decision_curve.csv", decision_frame(rep, DCA_THRESHOLDS))
    put("abstentions.csv", abstention_frame(rep))
    put("stard.csv", pd.DataFrame(stard_rows(rep)))
    if rep.cascade:
        put("cascade.csv", pd.concat({s: f for s, f in cascade_frames(rep).items()}, names=["site", "true"]),
            index=True)
    if rep.table1 is not None:
        put("table1.csv", tables.flatten_columns(rep.table1), index=True)
    if rep.flows:
        put("flow.csv", tables.flow_table(rep.flows))
    for name, png in rep.figures.items():
        p = out / "figures" / f"{name}.png"
        p.write_bytes(png)
        files[f"figures/{name}.png"] = p
    mj = out / "metrics.json"
    mj.write_text(json.dumps(metrics_dict(rep), indent=2, ensure_ascii=False), encoding="utf-8")
    files["metrics.json"] = mj
    hp = out / "report.html"
    hp.write_text(render_html(rep), encoding="utf-8")
    files["report.html"] = hp
    return files


# --------------------------------------------------------------------------
# HTML (templates/report.html.j2)
# --------------------------------------------------------------------------
def _table1_blocks(t1: pd.DataFrame) -> list[tuple[pd.DataFrame, str]]:
    """As in the paper: at most three datasets side by side, further ones in a block below."""
    ds = list(dict.fromkeys(c[0] for c in t1.columns))
    out = []
    for i in range(0, len(ds), 3):
        block = t1.loc[:, [c for c in t1.columns if c[0] in ds[i:i + 3]]]
        out.append((block, "Table 1 Characteristics of the datasets" + (" (continued)" if i else "")))
    return out


def _delong_frame(rep: Report) -> pd.DataFrame:
    return pd.DataFrame([{
        "Dataset": r["site"], "Model 1": r["model_1"], "Model 2": r["model_2"], "n": r["n"],
        "AUC 1": f"{r['auc1']:.3f}", "AUC 2": f"{r['auc2']:.3f}",
        "Difference (95% CI)": f"{r['diff']:.3f} ({r['ci_lo']:.3f} to {r['ci_hi']:.3f})",
        "Z": f"{r['z']:.3f}", "p": tables._p(r["p"])} for r in rep.delong])


def _methods_context(rep: Report) -> dict[str, Any]:
    units = sorted({a.main.bootstrap.get("unit", "image") for s in rep.sites.values() for a in s.values()
                    if a.main.bootstrap.get("n_boot")})
    redrawn = sum(a.main.bootstrap.get("redrawn_single_class", 0) for s in rep.sites.values() for a in s.values())
    return {"units": " / ".join(units) or "image", "redrawn": redrawn,
            "age_edges": ", ".join(f"{e:g}" for e in rep.config.age_bands),
            "dca_table": ", ".join(f"{t:g}" for t in DCA_TABLE_THRESHOLDS),
            "dca_range": f"{DCA_THRESHOLDS[0]:g}–{DCA_THRESHOLDS[-1]:g}"}


def render_html(rep: Report) -> str:
    from bonescreen import __version__
    from bonescreen.render import render

    thresholds = None
    if rep.thresholds:
        thresholds = pd.DataFrame(rep.thresholds).T.map(lambda v: f"{v:.4f}")
    t3 = {m: f for m, f in table3_frames(rep).items() if not f.empty}
    return render(
        "report.html.j2",
        rep=rep, cfg=rep.config, version=__version__,
        generated=_dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        inputs=", ".join(rep.inputs.get("predictions", [])),
        table1_blocks=_table1_blocks(rep.table1) if rep.table1 is not None else [],
        table2=table2_frames(rep), thresholds=thresholds,
        operating_points=operating_point_frame(rep) if rep.thresholds else None,
        delong=_delong_frame(rep) if rep.delong else None, table3=t3,
        calibration=calibration_frame(rep), decision=decision_frame(rep), abstentions=abstention_frame(rep),
        cascade=cascade_frames(rep), figures=rep.figures, methods=_methods_context(rep), stard=stard_rows(rep),
    )


# --------------------------------------------------------------------------
# One call for the CLI
# --------------------------------------------------------------------------
def run_evaluation(
    predictions: Sequence[str | Path],
    out_dir: str | Path,
    *,
    config: EvaluateConfig | None = None,
    tune: Sequence[str | Path] | None = None,
    manifest: str | Path | None = None,
    flow: str | Path | None = None,
    oracle: str | Path | None = None,
    cascade: Mapping[str, dict[str, Any]] | None = None,
    progress: bool = True,
) -> tuple[Report, dict[str, Path]]:
    """Read inputs, evaluate, write the report folder.

    ``cascade``: per site, the two-stage cascade's 3×3 table (``evaluate.cascade.cascade_table``),
    shown as its own section.
    """
    preds, warns = read_predictions(predictions)
    tune_df = None
    if tune:
        tune_df, tw = read_predictions(tune)
        warns += [f"tuning set: {w}" for w in tw]
    man = tables.read_manifest(manifest) if manifest else None
    flows = tables.read_flow(flow) if flow else None
    orc = read_oracle(oracle) if oracle else None
    inputs = {"predictions": [Path(p).name for p in predictions],
              "tune": [Path(p).name for p in tune or []],
              "manifest": Path(manifest).name if manifest else None,
              "flow": Path(flow).name if flow else None,
              "oracle": Path(oracle).name if oracle else None,
              "rows": int(len(preds))}
    rep = evaluate_predictions(preds, config=config, tune=tune_df, manifest=man, flows=flows, oracle=orc,
                               warnings=warns, inputs=inputs, cascade=cascade, progress=progress)
    files = write_report(rep, out_dir)
    return rep, files


def summary_text(rep: Report) -> str:
    """A short Table-2-like summary for the terminal."""
    lines = []
    head = f"{'model':<14} {'site':<16} {'n':>6} {'AUC (95% CI)':<19} {'Sens':>5} {'Spec':>5} {'PPV':>5} " \
           f"{'NPV':>5} {'Acc':>5}"
    if rep.oracle:
        head += "  oracle"
    lines.append(head)
    for model, sites in rep.sites.items():
        for site, a in sites.items():
            e = a.main.estimates

            def f(k: str, e: dict[str, Estimate] = e) -> str:
                return "  NA" if not e[k].defined else f"{e[k].value:.2f}"

            line = (f"{model[:14]:<14} {site[:16]:<16} {a.main.n:>6} {e['auc'].fmt():<19} {f('sensitivity'):>5} "
                    f"{f('specificity'):>5} {f('ppv'):>5} {f('npv'):>5} {f('accuracy'):>5}")
            if rep.oracle:
                o = rep.oracle.get(site)
                line += "      NA" if o is None else f"  {o:.2f}"
            lines.append(line)
    for r in rep.delong:
        lines.append(f"DeLong {r['model_1']} vs {r['model_2']} on {r['site']}: ΔAUC {r['diff']:.3f}, "
                     f"Z {r['z']:.2f}, p {r['p']:.3g}")
    for w in rep.warnings:
        lines.append(f"warning: {w}")
    return "\n".join(lines)
