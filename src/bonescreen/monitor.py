"""Monitoring after deployment: DXA results that arrive after screening are the ground truth.

``run_monitor`` joins a DXA export to earlier screening results (``bonescreen screen``'s
``results.csv`` and/or the service store's ``results`` table): the same patient, a DXA
within ``window_days`` *after* the CXR. On the joined rows it tracks, overall and per
month (rolling), scanner (manufacturer + model), sex and age band: AUC (patient-
clustered bootstrap CI), sensitivity and specificity of the deployed flag (Wilson),
calibration slope / intercept (``evaluate.metrics.calibration_slope_intercept``) and
ECE; on every scored result, month by month, the drift of the score distribution (PSI
against the model card's tuning histogram, a reference period, or the first months).
Metrics below the configured floors become alerts. ``render_monitor_html`` draws the
page (``templates/monitor.html.j2``); the service's ``/monitor`` view is a call to
:func:`monitor_store` and that function.

Patient ids: screening outputs carry keyed pseudonyms (``p:`` + HMAC, ``bonescreen.pseudonym``)
unless raw ids were asked for. The DXA export's raw ids are pseudonymised with the same
key to join; raw ids join raw. Nothing written here carries a raw patient id.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from bonescreen.errors import BonescreenError, TableError
from bonescreen.evaluate.report import json_clean
from bonescreen.labels import normalize_sex, pediatric_low_bmd
from bonescreen.pseudonym import PREFIX as PSEUDONYM_PREFIX
from bonescreen.schema import INDETERMINATE

log = logging.getLogger(__name__)

__all__ = [
    "AlertFloors",
    "MonitorConfig",
    "MonitorError",
    "MonitorResult",
    "join_dxa",
    "load_monitor_config",
    "monitor_store",
    "read_results_csv",
    "read_results_store",
    "render_monitor_html",
    "run_monitor",
]

UNKNOWN_SCANNER = "scanner unknown"
ABSTAIN = INDETERMINATE  # a site profile's abstain band (bonescreen.adapt): the one definition, in schema
#: Columns of a normalised screening-results table (``screen``'s results.csv or the service store).
RESULT_FIELDS = ["image_id", "patient_id", "study_date", "sex", "age", "eligible", "score", "score_stage1",
                 "category", "flag", "model", "site", "manufacturer", "manufacturer_model_name",
                 "study_instance_uid", "accession_number", "source"]


class MonitorError(BonescreenError):
    reason = "monitor_error"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class AlertFloors(_Strict):
    """Floors and ceilings; a metric beyond one raises an alert. ``null`` switches a check off."""

    auc_min: float | None = Field(0.75, ge=0, le=1)
    sensitivity_min: float | None = Field(0.70, ge=0, le=1)
    specificity_min: float | None = Field(0.50, ge=0, le=1)
    calibration_slope_min: float | None = 0.7
    calibration_slope_max: float | None = 1.3
    calibration_intercept_max_abs: float | None = Field(0.5, ge=0)
    ece_max: float | None = Field(0.10, ge=0, le=1)
    # ECE (10 bins) is biased upward in small groups (a calibrated model shows ~0.1 at n = 40):
    # it is judged only where at least this many labelled results are.
    ece_min_cases: int = Field(200, ge=1)
    psi_max: float | None = Field(0.25, ge=0)
    # PSI from sampling alone is about (bins - 1) * (1/n + 1/n_reference) (0.2 at n = 60 a month):
    # months with fewer scored screens are shown, not alerted on.
    psi_min_cases: int = Field(200, ge=1)
    # a group with fewer labelled results (or fewer of either class) is shown, never alerted on
    min_cases: int = Field(30, ge=1)
    min_per_class: int = Field(5, ge=1)
    # "ci": alert when the whole 95% CI lies beyond the limit (the data show it: few false alarms in
    # small monthly groups); "estimate": when the point estimate does. ECE and PSI have no CI: estimate.
    alert_on: Literal["ci", "estimate"] = "ci"


class MonitorConfig(_Strict):
    """``monitor.yaml``: how results and DXA are joined, grouped and judged (unknown keys are errors)."""

    population: Literal["adult", "pediatric"] = "adult"
    window_days: int = Field(180, ge=0, le=3650)  # DXA at most this many days after the CXR
    min_days: int = Field(0, ge=0)  # ... and at least this many (0: the same day counts)
    match: Literal["closest", "all"] = "closest"  # closest: per DXA exam, only the last screen before it
    rolling_months: int = Field(3, ge=1, le=24)
    age_bands: list[float] | None = None  # default 50,55,60,65 (adult) or 6,12,15 (pediatric)
    bootstrap: int = Field(500, ge=0)
    seed: int = 0
    reference: Literal["auto", "model_card", "period", "first_months"] = "auto"
    reference_period: list[dt.date] | None = None  # [first day, last day] of the reference screens
    reference_months: int = Field(3, ge=1)  # for "first_months" (and "auto" without a model card)
    alerts: AlertFloors = AlertFloors()

    @model_validator(mode="after")
    def _check(self) -> MonitorConfig:
        if self.min_days > self.window_days:
            raise ValueError("min_days must not exceed window_days")
        if self.reference_period is not None and (len(self.reference_period) != 2
                                                  or self.reference_period[0] > self.reference_period[1]):
            raise ValueError("reference_period is [first day, last day]")
        if self.reference == "period" and self.reference_period is None:
            raise ValueError("reference: period needs reference_period: [YYYY-MM-DD, YYYY-MM-DD]")
        if self.age_bands is not None and any(b <= a for a, b in zip(self.age_bands, self.age_bands[1:])):
            raise ValueError("age_bands must increase")
        return self

    def bands(self) -> tuple[float, ...]:
        if self.age_bands is not None:
            return tuple(self.age_bands)
        return (6.0, 12.0, 15.0) if self.population == "pediatric" else (50.0, 55.0, 60.0, 65.0)


def load_monitor_config(path: str | Path | None, **overrides: Any) -> MonitorConfig:
    """The YAML file (strict: unknown keys and wrong types are refused) with CLI overrides on top."""
    import yaml

    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise MonitorError(f"monitor config not found: {p}") from None
        except yaml.YAMLError as exc:
            raise MonitorError(f"{p}: not valid YAML ({exc})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise MonitorError(f"{p}: expected a mapping of settings")
        data = dict(loaded or {})
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return MonitorConfig.model_validate(data)
    except ValidationError as exc:
        raise MonitorError(f"monitor config: {exc}") from None


# --------------------------------------------------------------------------- inputs
def _bool(v: Any) -> bool:
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    return str(v).strip().lower() in {"true", "1", "yes"}


def _normalise_results(df: pd.DataFrame, source: str) -> pd.DataFrame:
    """Screening rows -> ``RESULT_FIELDS`` (absent scanner fields become None: "scanner unknown")."""
    out = pd.DataFrame(index=df.index)
    for col in RESULT_FIELDS:
        out[col] = df[col] if col in df.columns else None
    out["source"] = source
    out["image_id"] = out["image_id"].astype(str)
    out["patient_id"] = out["patient_id"].map(lambda v: None if v is None or pd.isna(v) or not str(v).strip()
                                              else str(v).strip())
    out["study_date"] = pd.to_datetime(out["study_date"], errors="coerce").dt.date
    out["sex"] = out["sex"].map(normalize_sex)
    out["age"] = pd.to_numeric(out["age"], errors="coerce")
    out["score"] = pd.to_numeric(out["score"], errors="coerce")
    out["score_stage1"] = pd.to_numeric(out["score_stage1"], errors="coerce")
    out["eligible"] = out["eligible"].map(_bool) if "eligible" in df.columns else out["score"].notna()
    out["flag"] = out["flag"].map(lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else _bool(v))
    out["category"] = out["category"].map(lambda v: None if v is None or pd.isna(v) else str(v).strip())
    return out.reset_index(drop=True)


def read_results_csv(paths: Sequence[str | Path]) -> pd.DataFrame:
    """``results.csv`` files written by ``bonescreen screen`` (one row per image)."""
    frames = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise TableError(f"screening results not found: {path}", reason="missing_file")
        try:
            raw = pd.read_csv(path, dtype={"patient_id": str, "image_id": str, "accession_number": str})
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise TableError(f"{path}: not a readable CSV table ({exc})", reason="bad_table") from exc
        if "image_id" not in raw.columns or "score" not in raw.columns:
            raise TableError(f"{path}: not a screening results table (needs image_id and score; "
                             f"found {list(raw.columns)[:12]})", reason="missing_columns")
        frames.append(_normalise_results(raw, path.name))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=RESULT_FIELDS)


def read_results_store(url_or_engine: Any) -> pd.DataFrame:
    """The service store's ``results`` table (SQLite or PostgreSQL), whatever its schema version.

    The table is reflected, not imported from the service's models: a store written before
    the scanner columns existed still reads, its scanner shown as "scanner unknown".
    """
    from sqlalchemy import MetaData, Table, create_engine, select
    from sqlalchemy.engine import Engine
    from sqlalchemy.exc import NoSuchTableError, SQLAlchemyError

    if isinstance(url_or_engine, Engine):
        engine, own = url_or_engine, False
    else:
        url = str(url_or_engine)
        if url.startswith(("postgresql://", "postgres://")):
            url = "postgresql+psycopg://" + url.split("://", 1)[1]
        engine, own = create_engine(url), True
    try:
        table = Table("results", MetaData(), autoload_with=engine)
        wanted = {"sop_instance_uid": "image_id", **{c: c for c in RESULT_FIELDS if c != "image_id"}}
        cols = [table.c[c].label(alias) for c, alias in wanted.items() if c in table.c]
        with engine.connect() as conn:
            rows = conn.execute(select(*cols)).mappings().all()
    except NoSuchTableError:
        raise MonitorError("the store has no 'results' table (is this a bonescreen service database?)") from None
    except SQLAlchemyError as exc:
        raise MonitorError(f"cannot read the service store: {type(exc).__name__}") from None
    finally:
        if own:
            engine.dispose()
    return _normalise_results(pd.DataFrame([dict(r) for r in rows]), "store")


# --------------------------------------------------------------------------- join
@dataclass
class JoinResult:
    joined: pd.DataFrame
    counts: dict[str, int]


def _pseudonymiser(key_file: str | Path | None) -> Any:
    if key_file is None:
        return None
    from bonescreen.pseudonym import Pseudonymiser, load_key

    return Pseudonymiser(load_key(key_file))


def dxa_truth(exams: pd.DataFrame, population: str) -> pd.DataFrame:
    """Per DXA exam: ``y`` (the score's label), ``y_refer`` (should the screen have flagged?) and the category."""
    out = exams.copy()
    if population == "pediatric":
        zc = "z_lumbar_spine" if "z_lumbar_spine" in out.columns else None
        low = [pediatric_low_bmd(v) if zc else None for v in (out[zc] if zc else [None] * len(out))]
        out["y"] = pd.array([None if v is None else int(v) for v in low], dtype="Int64")
        out["y_refer"] = out["y"]
        out["true_category"] = [None if v is None else ("low_bmd" if v else "normal_bmd") for v in low]
    else:
        out["y"] = out["label"].astype("Int64")  # stage 2: low bone mass 1, normal 0, osteoporosis empty
        out["y_refer"] = pd.array([None if c is None or pd.isna(c) else int(c != "normal") for c in out["category"]],
                                  dtype="Int64")
        out["true_category"] = out["category"]
    return out


def join_dxa(results: pd.DataFrame, exams: pd.DataFrame, cfg: MonitorConfig,
             key_file: str | Path | None = None) -> JoinResult:
    """Each screened image joins the first DXA of the same patient ``min_days``..``window_days`` after it.

    ``match="closest"`` then keeps, per DXA exam, only the screen(s) of the latest CXR date before it
    (one DXA labels one screening study, as the cohort's "closest CXR wins").
    """
    counts: dict[str, int] = {"results": int(len(results))}
    scored = results[results["eligible"].astype(bool) & results["score"].notna()].copy()
    counts["eligible_scored"] = int(len(scored))
    counts["abstained"] = int((results["category"] == ABSTAIN).sum())
    scored = scored[scored["patient_id"].notna() & scored["study_date"].notna()]
    counts["with_patient_and_date"] = int(len(scored))
    pseudo = scored["patient_id"].str.startswith(PSEUDONYM_PREFIX)
    ps = _pseudonymiser(key_file)
    if pseudo.any() and ps is None:
        raise MonitorError(
            f"{int(pseudo.sum())} screening result(s) carry keyed patient pseudonyms ('{PSEUDONYM_PREFIX}...'): "
            "give --pseudonym-key-file (the key screen or the service used) so the DXA export's ids can be "
            "pseudonymised the same way")
    truth = dxa_truth(exams, cfg.population)
    truth = truth.assign(_raw=truth["patient_id"].astype(str))
    keyed = [truth.assign(_key=truth["_raw"])]
    if ps is not None:
        keyed.append(truth.assign(_key=[ps(v) for v in truth["_raw"]]))
    exam_cols = ["_key", "_raw", "dxa_date", "y", "y_refer", "true_category"]
    both = pd.concat(keyed, ignore_index=True)[exam_cols]
    m = scored.assign(_key=scored["patient_id"], _row=np.arange(len(scored))).merge(both, on="_key")
    if len(m):
        m["days_to_dxa"] = (pd.to_datetime(m["dxa_date"]) - pd.to_datetime(m["study_date"])).dt.days
        m = m[(m["days_to_dxa"] >= cfg.min_days) & (m["days_to_dxa"] <= cfg.window_days)]
        # the first DXA after the CXR
        m = m.sort_values(["_row", "days_to_dxa"], kind="mergesort").drop_duplicates("_row", keep="first")
        m["_exam"] = m["_raw"] + "|" + m["dxa_date"].astype(str)
    rows = m.drop(columns=["_key", "_raw", "_row"]).to_dict("records") if len(m) else []
    joined = pd.DataFrame(rows)
    counts["joined_in_window"] = int(len(joined))
    if len(joined) and cfg.match == "closest":
        last = joined.groupby("_exam")["study_date"].transform("max")
        joined = joined[joined["study_date"] == last]
    counts["joined"] = int(len(joined))
    counts["dxa_exams"] = int(len(exams))
    counts["dxa_exams_joined"] = int(joined["_exam"].nunique()) if len(joined) else 0
    if len(joined):
        # no raw patient id leaves this function: pseudonyms stay, raw ids become "patient-<n>"
        pid = joined["patient_id"].astype(str)
        is_ps = pid.str.startswith(PSEUDONYM_PREFIX)
        key = pid.where(is_ps, "")
        codes = pd.factorize(pid[~is_ps])[0]
        key[~is_ps] = [f"patient-{c + 1}" for c in codes]
        joined["patient_key"] = key
        joined = joined.drop(columns=["patient_id", "_exam"]).reset_index(drop=True)
    return JoinResult(joined, counts)


# --------------------------------------------------------------------------- metrics
def scanner_of(row: pd.Series | Any) -> str:
    man = getattr(row, "manufacturer", None)
    mod = getattr(row, "manufacturer_model_name", None)
    parts = [str(x).strip() for x in (man, mod) if x is not None and not pd.isna(x) and str(x).strip()]
    return " ".join(parts) if parts else UNKNOWN_SCANNER


def group_metrics(g: pd.DataFrame, cfg: MonitorConfig, seed: int) -> dict[str, Any]:
    """AUC (cluster bootstrap CI), flag sensitivity/specificity (Wilson), calibration, ECE for one group."""
    from bonescreen.evaluate.metrics import (
        calibration_slope_intercept,
        evaluate_binary,
        expected_calibration_error,
        proportion,
    )

    out: dict[str, Any] = {"n": int(len(g))}
    lab = g[g["y"].notna()]
    y = lab["y"].astype(int).to_numpy()
    s = lab["score"].to_numpy(dtype=float)
    out["n_labelled"], out["n_pos"] = int(len(lab)), int(y.sum())
    res = evaluate_binary(y, s, groups=lab["patient_key"].to_numpy(), n_boot=cfg.bootstrap, seed=seed)
    out["auc"] = res.estimates["auc"].to_dict()
    fit = calibration_slope_intercept(y, s)
    out["calibration_slope"] = fit.slope.to_dict()
    out["calibration_intercept"] = fit.intercept.to_dict()
    out["ece"] = expected_calibration_error(y, s) if len(y) else None
    ref = g[g["y_refer"].notna() & g["flag"].notna() & (g["category"] != ABSTAIN)]
    yr = ref["y_refer"].astype(int).to_numpy().astype(bool)
    fl = ref["flag"].astype(bool).to_numpy()
    out["sensitivity"] = proportion(int((fl & yr).sum()), int(yr.sum())).to_dict()
    out["specificity"] = proportion(int((~fl & ~yr).sum()), int((~yr).sum())).to_dict()
    out["abstained"] = int((g["category"] == ABSTAIN).sum())
    return json_clean(out)


def _months(dates: pd.Series) -> pd.Series:
    return pd.to_datetime(dates).dt.to_period("M").astype(str)


def _reference_histogram(results: pd.DataFrame, cfg: MonitorConfig, card_hist: dict[str, Any] | None
                         ) -> tuple[list[int] | None, str]:
    from bonescreen.evaluate.metrics import score_histogram

    scored = results[results["eligible"].astype(bool) & results["score"].notna() & results["study_date"].notna()]
    kind = cfg.reference
    if kind in ("auto", "model_card") and card_hist and card_hist.get("counts"):
        return [int(c) for c in card_hist["counts"]], f"the model card's tuning split (n = {sum(card_hist['counts'])})"
    if kind == "model_card":
        raise MonitorError("reference: model_card needs --model with a model card holding tune_score_histogram "
                           "(trained by this version of bonescreen)")
    if kind == "period" or (kind == "auto" and cfg.reference_period):
        a, b = cfg.reference_period  # type: ignore[misc]
        ref = scored[(scored["study_date"] >= a) & (scored["study_date"] <= b)]
        desc = f"screens of {a.isoformat()} to {b.isoformat()} (n = {len(ref)})"
    else:
        months = sorted(_months(scored["study_date"]).unique())[: cfg.reference_months]
        ref = scored[_months(scored["study_date"]).isin(months)]
        desc = f"the first {len(months)} month(s) of screens, {months[0] if months else '?'} on (n = {len(ref)})"
    if ref.empty:
        return None, "no reference scores"
    return score_histogram(ref["score"])["counts"], desc


@dataclass
class MonitorResult:
    config: MonitorConfig
    counts: dict[str, int]
    overall: dict[str, Any]
    by: dict[str, dict[str, dict[str, Any]]]  # family -> group -> metrics
    rolling: dict[str, dict[str, Any]]  # month -> metrics over the rolling window ending there
    drift: dict[str, dict[str, Any]]  # month -> {"n", "psi", "histogram"}
    reference: dict[str, Any]
    alerts: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    joined: pd.DataFrame | None = None
    figures: dict[str, bytes] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return json_clean({"format": "bonescreen-monitor", "config": json.loads(self.config.model_dump_json()),
                       "counts": self.counts, "overall": self.overall, "by": self.by, "rolling": self.rolling,
                       "drift": self.drift, "reference": self.reference, "alerts": self.alerts,
                       "notes": self.notes})


def _check(scope: str, group: str, m: dict[str, Any], cfg: MonitorConfig) -> list[dict[str, Any]]:
    a = cfg.alerts
    out: list[dict[str, Any]] = []
    n, pos = m.get("n_labelled", 0), m.get("n_pos", 0)
    enough = n >= a.min_cases and min(pos, n - pos) >= a.min_per_class

    def alert(metric: str, value: float | None, rule: str, limit: float, est: dict[str, Any] | None = None) -> None:
        out.append({"scope": scope, "group": group, "metric": metric, "value": value, "rule": rule,
                    "limit": limit, "n": n, "lo": (est or {}).get("lo"), "hi": (est or {}).get("hi")})

    if not enough:
        return out

    def val(key: str) -> float | None:
        v = m.get(key)
        return v.get("value") if isinstance(v, dict) else v

    checks = [("auc", "<", a.auc_min), ("sensitivity", "<", a.sensitivity_min), ("specificity", "<", a.specificity_min),
              ("calibration_slope", "<", a.calibration_slope_min), ("calibration_slope", ">", a.calibration_slope_max),
              ("ece", ">", a.ece_max if n >= a.ece_min_cases else None)]
    def beyond(key: str, op: str, limit: float) -> bool:
        est = m.get(key) if isinstance(m.get(key), dict) else {}
        v = val(key)
        if v is None:
            return False
        if a.alert_on == "ci" and est.get("lo") is not None and est.get("hi") is not None:
            v = est["hi"] if op == "<" else est["lo"]  # the most favourable end of the interval
        return (op == "<" and v < limit) or (op == ">" and v > limit)

    for key, op, limit in checks:
        if limit is not None and beyond(key, op, limit):
            rule = f"{op} {limit:g}" + (" (whole 95% CI)" if a.alert_on == "ci" and key != "ece" else "")
            alert(key, val(key), rule, limit, m.get(key) if isinstance(m.get(key), dict) else None)
    lim = a.calibration_intercept_max_abs
    if lim is not None and (beyond("calibration_intercept", ">", lim) or beyond("calibration_intercept", "<", -lim)):
        alert("calibration_intercept", val("calibration_intercept"),
              f"|·| > {lim:g}" + (" (whole 95% CI)" if a.alert_on == "ci" else ""), lim, m.get("calibration_intercept"))
    return out


def run_monitor(
    results: pd.DataFrame,
    dxa: str | Path | pd.DataFrame | Sequence[str | Path],
    *,
    config: MonitorConfig | None = None,
    key_file: str | Path | None = None,
    column_map: Any = None,
    date_format: str | None = None,
    model_card: dict[str, Any] | None = None,
    figures: bool = True,
) -> MonitorResult:
    """Join, compute every group's metrics and the drift, and judge them against the floors."""
    from bonescreen.cohort import read_dxa
    from bonescreen.evaluate.compare import age_band_labels, assign_age_band
    from bonescreen.evaluate.metrics import population_stability_index, score_histogram

    cfg = config or MonitorConfig()
    notes: list[str] = []
    sources = [dxa] if isinstance(dxa, (str, Path, pd.DataFrame)) else list(dxa)
    tables = [read_dxa(s, column_map=column_map, date_format=date_format, population=cfg.population) for s in sources]
    exams = pd.concat([t.exams for t in tables], ignore_index=True) if tables else pd.DataFrame()
    rejected = sum(len(t.rejected) for t in tables)
    if rejected:
        notes.append(f"{rejected} DXA row(s) refused while reading the export (bad date, label, duplicate, ...)")
    if exams.empty:
        raise MonitorError("the DXA export holds no valid exam")
    jr = join_dxa(results, exams, cfg, key_file)
    counts = {**jr.counts, "dxa_rows_refused": int(rejected)}
    j = jr.joined
    if j.empty:
        notes.append("no screening result has a DXA of the same patient inside the window: nothing to score yet")
    else:
        j = j.assign(month=_months(j["study_date"]), scanner=[scanner_of(r) for r in j.itertuples()],
                     age_band=assign_age_band(j["age"], cfg.bands()).astype(object).to_numpy(),
                     sex_group=j["sex"].map({"F": "F", "M": "M", "O": "O"}).fillna("unknown"))
        if (j["scanner"] == UNKNOWN_SCANNER).all():
            notes.append("the screening results carry no manufacturer / model: every result is 'scanner unknown'")
    overall = group_metrics(j, cfg, cfg.seed) if len(j) else {"n": 0}
    by: dict[str, dict[str, dict[str, Any]]] = {}
    families = {"month": "month", "scanner": "scanner", "sex": "sex_group", "age_band": "age_band"}
    for k, (family, col) in enumerate(families.items()):
        if j.empty:
            by[family] = {}
            continue
        order = age_band_labels(cfg.bands()) if family == "age_band" else sorted(j[col].dropna().astype(str).unique())
        by[family] = {g: group_metrics(j[j[col].astype(str) == g], cfg, cfg.seed + 101 * (k + 1) + i)
                      for i, g in enumerate(order) if (j[col].astype(str) == g).any()}
    rolling: dict[str, dict[str, Any]] = {}
    if len(j):
        months = sorted(j["month"].unique())
        periods = pd.PeriodIndex(months, freq="M")
        for i, (m, p) in enumerate(zip(months, periods)):
            window = {str(p - d) for d in range(cfg.rolling_months)}
            rolling[m] = {**group_metrics(j[j["month"].isin(window)], cfg, cfg.seed + 7 * i),
                          "months": sorted(window & set(months))}
    # drift: every scored screen, labelled or not
    ref_counts, ref_desc = _reference_histogram(results, cfg, (model_card or {}).get("tune_score_histogram"))
    scored = results[results["eligible"].astype(bool) & results["score"].notna() & results["study_date"].notna()]
    drift: dict[str, dict[str, Any]] = {}
    for m, g in scored.groupby(_months(scored["study_date"])):
        h = score_histogram(g["score"])["counts"]
        psi = population_stability_index(ref_counts, h) if ref_counts is not None else None
        noise = (len(h) - 1) * (1 / len(g) + 1 / sum(ref_counts)) if ref_counts else None
        drift[str(m)] = {"n": int(len(g)), "psi": psi, "psi_sampling_noise": noise, "histogram": h}
    alerts = _check("overall", "all", overall, cfg)
    for family, groups in by.items():
        for g, m in groups.items():
            alerts += _check(family, g, m, cfg)
    for m, r in rolling.items():
        alerts += [{**a, "scope": f"rolling {cfg.rolling_months} months"} for a in _check("rolling", m, r, cfg)]
    if cfg.alerts.psi_max is not None:
        for m, d in drift.items():
            if d["psi"] is not None and d["n"] >= cfg.alerts.psi_min_cases and d["psi"] > cfg.alerts.psi_max:
                alerts.append({"scope": "drift", "group": m, "metric": "psi", "value": d["psi"],
                               "rule": f"> {cfg.alerts.psi_max:g}", "limit": cfg.alerts.psi_max, "n": d["n"],
                               "lo": None, "hi": None})
    reference = {"description": ref_desc, "histogram": ref_counts,
                 "edges": score_histogram([])["edges"]}
    res = MonitorResult(cfg, counts, overall, by, rolling, drift, reference, json_clean(alerts), notes,
                        j.drop(columns=["sex_group"], errors="ignore") if len(j) else j)
    if figures:
        res.figures = _figures(res)
    return res


def monitor_store(url_or_engine: Any, dxa: Any, **kw: Any) -> MonitorResult:
    """:func:`run_monitor` on the service store's results (the service's ``/monitor`` view)."""
    return run_monitor(read_results_store(url_or_engine), dxa, **kw)


# --------------------------------------------------------------------------- output
def _figures(res: MonitorResult) -> dict[str, bytes]:
    from bonescreen.evaluate.plots import pyplot, figure_png

    out: dict[str, bytes] = {}
    plt = pyplot()
    if res.rolling:
        months = list(res.rolling)
        x = np.arange(len(months))
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 3.8), layout="constrained")

        def series(src: dict[str, dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            v = [src.get(m, {}).get(key) or {} for m in months]
            return tuple(np.array([d.get(f) if d.get(f) is not None else np.nan for d in v], float)
                         for f in ("value", "lo", "hi"))  # type: ignore[return-value]

        auc, lo, hi = series(res.rolling, "auc")
        ax1.plot(x, auc, marker="o", color="C0", label=f"AUC, rolling {res.config.rolling_months} months")
        ax1.fill_between(x, lo, hi, color="C0", alpha=0.18, lw=0)
        if res.config.alerts.auc_min is not None:
            ax1.axhline(res.config.alerts.auc_min, color="C3", ls="--", lw=1, label="floor")
        ax1.set(ylim=(0.4, 1.0), ylabel="AUC (95% CI)", title="Discrimination")
        for key, color in (("sensitivity", "C1"), ("specificity", "C2")):
            v, lo, hi = series(res.by.get("month", {}), key)
            err = [np.clip(np.nan_to_num(v - lo), 0, None), np.clip(np.nan_to_num(hi - v), 0, None)]
            ax2.errorbar(x, v, yerr=err, marker="o", color=color,
                         capsize=3, lw=1.2, label=key)
        ax2.set(ylim=(0, 1.02), ylabel="share (Wilson 95% CI)", title="Flag vs DXA, by month")
        for ax in (ax1, ax2):
            ax.set_xticks(x, months, rotation=45, ha="right", fontsize=7)
            ax.legend(fontsize=7, frameon=False, loc="lower left")
        out["trend"] = figure_png(fig)
    if res.drift:
        months = list(res.drift)
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 3.6), layout="constrained")
        psi = np.array([res.drift[m]["psi"] if res.drift[m]["psi"] is not None else np.nan for m in months])
        ax1.bar(np.arange(len(months)), psi, color="C4")
        if res.config.alerts.psi_max is not None:
            ax1.axhline(res.config.alerts.psi_max, color="C3", ls="--", lw=1, label="alert")
            ax1.axhline(0.1, color="0.5", ls=":", lw=1, label="0.1 (moderate)")
        ax1.set_xticks(np.arange(len(months)), months, rotation=45, ha="right", fontsize=7)
        ax1.set(ylabel="PSI", title="Score drift against the reference")
        ax1.legend(fontsize=7, frameon=False)
        edges = np.asarray(res.reference["edges"])
        centres = (edges[:-1] + edges[1:]) / 2
        if res.reference.get("histogram"):
            r = np.asarray(res.reference["histogram"], float)
            ax2.step(centres, r / max(r.sum(), 1), where="mid", color="0.3", label="reference")
        last = np.asarray(res.drift[months[-1]]["histogram"], float)
        ax2.step(centres, last / max(last.sum(), 1), where="mid", color="C4", label=f"{months[-1]}")
        ax2.set(xlabel="score", ylabel="share of screens", title="Score distribution", xlim=(0, 1))
        ax2.legend(fontsize=7, frameon=False)
        out["drift"] = figure_png(fig)
    return out


def _fmt(d: Any, digits: int = 2) -> str:
    """An estimate dict (``Estimate.to_dict``) or a bare number, journal style."""
    from bonescreen.evaluate.metrics import Estimate

    if isinstance(d, (int, float)):
        return f"{d:.{digits}f}"
    return Estimate.from_dict(d if isinstance(d, dict) else None).fmt(digits)


def group_frame(groups: dict[str, dict[str, Any]], label: str) -> pd.DataFrame:
    rows = []
    for g, m in groups.items():
        rows.append({label: g, "n": m.get("n", 0), "with DXA label": m.get("n_labelled", 0),
                     "positive": m.get("n_pos", 0), "AUC (95% CI)": _fmt(m.get("auc")),
                     "Sensitivity (95% CI)": _fmt(m.get("sensitivity")),
                     "Specificity (95% CI)": _fmt(m.get("specificity")),
                     "Calibration slope (95% CI)": _fmt(m.get("calibration_slope")),
                     "Calibration intercept (95% CI)": _fmt(m.get("calibration_intercept")),
                     "ECE": _fmt(m.get("ece"), 3), "Indeterminate": m.get("abstained", 0)})
    return pd.DataFrame(rows)


def render_monitor_html(res: MonitorResult, title: str = "bonescreen monitoring") -> str:
    """The monitoring page (``templates/monitor.html.j2``): alerts, trends, drift, the per-group tables."""
    from bonescreen import __version__
    from bonescreen.render import render

    drift = pd.DataFrame([{"Month": m, "Scored screens": d["n"],
                           "PSI": "NA" if d["psi"] is None else f"{d['psi']:.3f}",
                           "PSI expected from sampling alone": "NA" if d.get("psi_sampling_noise") is None
                           else f"{d['psi_sampling_noise']:.3f}"} for m, d in res.drift.items()])
    alerts = pd.DataFrame([{"Scope": a["scope"], "Group": a["group"], "Metric": a["metric"],
                            "Value": "NA" if a["value"] is None else f"{a['value']:.3f}", "Rule": a["rule"],
                            "n": a["n"]} for a in res.alerts])
    tables = {
        "month": group_frame(res.by.get("month", {}), "Month"),
        "rolling": group_frame(res.rolling, "Rolling window ending"),
        "scanner": group_frame(res.by.get("scanner", {}), "Scanner"),
        "sex": group_frame(res.by.get("sex", {}), "Sex"),
        "age_band": group_frame(res.by.get("age_band", {}), "Age band"),
    }
    return render("monitor.html.j2", title=title, version=__version__, res=res, cfg=res.config,
                  generated=dt.datetime.now().strftime("%Y-%m-%d %H:%M"), overall=group_frame({"all": res.overall},
                                                                                            "Group"),
                  tables=tables, drift=drift, alerts=alerts, figures=res.figures)


def write_monitor(res: MonitorResult, out_dir: str | Path) -> dict[str, Path]:
    """``monitor.html``, ``monitor.json``, ``alerts.csv``, ``groups.csv``, ``joined.csv`` (no raw patient ids)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"html": out / "monitor.html", "json": out / "monitor.json", "alerts": out / "alerts.csv",
             "groups": out / "groups.csv", "joined": out / "joined.csv"}
    files["html"].write_text(render_monitor_html(res), encoding="utf-8")
    files["json"].write_text(json.dumps(res.to_dict(), indent=1, default=str), encoding="utf-8")
    pd.DataFrame(res.alerts, columns=["scope", "group", "metric", "value", "rule", "limit", "n", "lo", "hi"]).to_csv(
        files["alerts"], index=False)
    frames = [group_frame({"all": res.overall}, "group").assign(family="overall")]
    frames += [group_frame(g, "group").assign(family=f) for f, g in res.by.items() if g]
    frames += [group_frame(res.rolling, "group").assign(family=f"rolling_{res.config.rolling_months}m")]
    pd.concat(frames, ignore_index=True).to_csv(files["groups"], index=False)
    j = res.joined if res.joined is not None else pd.DataFrame()
    keep = [c for c in ("image_id", "patient_key", "study_date", "dxa_date", "days_to_dxa", "site", "sex", "age",
                        "score", "category", "flag", "y", "y_refer", "true_category", "scanner", "month", "source")
            if c in j.columns]
    j[keep].to_csv(files["joined"], index=False) if len(j) else pd.DataFrame(columns=keep).to_csv(files["joined"],
                                                                                                  index=False)
    return files
