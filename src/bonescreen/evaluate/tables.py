"""Journal tables: Table 1 (cohort), Table 2 (per site), Table 3 (subgroups),
and the Figure 1 flow counts, as pandas DataFrames ready for CSV and HTML."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from bonescreen.errors import TableError
from bonescreen.evaluate.metrics import BinaryResult

METRIC_LABELS = {
    "auc": "AUC (95% CI)",
    "sensitivity": "Sensitivity (95% CI)",
    "specificity": "Specificity (95% CI)",
    "ppv": "PPV (95% CI)",
    "npv": "NPV (95% CI)",
    "accuracy": "Accuracy (95% CI)",
    "f1": "F1 score (95% CI)",
}
SEX_NAMES = {"F": "Female", "M": "Male", "O": "Other"}
DAYS_ROW = "Days between CXR and DXA, median (IQR)"


def _pct(k: int, n: int) -> str:
    return f"{k:,} ({100.0 * k / n:.1f}%)" if n else f"{k:,}"


def _p(p: float) -> str:
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "NA"
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


# --------------------------------------------------------------------------
# Table 2
# --------------------------------------------------------------------------
def table2(results: Mapping[str, BinaryResult], oracle: Mapping[str, float] | None = None) -> pd.DataFrame:
    """Rows as in the paper's Table 2, one column per site."""
    cols: dict[str, list[str]] = {}
    index = ["n", "TP, n (%)", "TN, n (%)", "FP, n (%)", "FN, n (%)", *METRIC_LABELS.values(),
             "Average precision", "Brier score"]
    if oracle:
        index.insert(index.index("AUC (95% CI)") + 1, "Oracle AUC (phantom truth)")
    for site, r in results.items():
        c = r.confusion
        vals = [f"{r.n:,}"]
        if c is None:
            vals += ["NA"] * 4
        else:
            vals += [_pct(v, c.n) for v in (c.tp, c.tn, c.fp, c.fn)]
        vals += [r.estimates[k].fmt() for k in METRIC_LABELS]
        vals += ["NA" if math.isnan(r.average_precision) else f"{r.average_precision:.2f}",
                 "NA" if math.isnan(r.brier) else f"{r.brier:.3f}"]
        if oracle:
            o = oracle.get(site)
            vals.insert(index.index("Oracle AUC (phantom truth)"), "NA" if o is None else f"{o:.2f}")
        cols[site] = vals
    return pd.DataFrame(cols, index=index)


def table2_long(results: Mapping[tuple[str, str], BinaryResult]) -> pd.DataFrame:
    """Machine-readable Table 2: one row per (model, site, metric)."""
    rows = []
    for (model, site), r in results.items():
        c = r.confusion
        for k in ("tp", "tn", "fp", "fn"):
            rows.append({"model": model, "site": site, "metric": k,
                         "value": getattr(c, k) if c else None, "lo": None, "hi": None})
        for k, e in r.estimates.items():
            rows.append({"model": model, "site": site, "metric": k, "value": e.value, "lo": e.lo, "hi": e.hi,
                         "formatted": e.fmt()})
        rows.append({"model": model, "site": site, "metric": "average_precision", "value": r.average_precision})
        rows.append({"model": model, "site": site, "metric": "brier", "value": r.brier})
        rows.append({"model": model, "site": site, "metric": "threshold", "value": r.threshold})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------
# Table 3
# --------------------------------------------------------------------------
def table3(rows_by_site: Mapping[str, Sequence[Any]], hetero_by_site: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """One row per (site, subgroup) as in the paper's Table 3.

    ``p (AUC = 0.5)``: Mann–Whitney, Bonferroni over the site's subgroups.
    The between-subgroup accuracy test is shown on the first row of its family.
    """
    het_col = "Accuracy differs between subgroups, p (Bonferroni)"
    out = []
    for site, rows in rows_by_site.items():
        seen: set[str] = set()
        for r in rows:
            res = r.result
            het = ""
            if r.family not in seen:
                seen.add(r.family)
                h = hetero_by_site.get(site, {}).get(r.family)
                if h:
                    het = f"{_p(h.get('p_adj', math.nan))} ({h.get('test', '')})"
            out.append({
                "Dataset": site,
                "Subgroup": SEX_NAMES.get(r.subgroup, r.subgroup) if r.family == "sex" else r.subgroup,
                "Normal, n (%)": _pct(res.n_neg, res.n),
                "Low bone mass, n (%)": _pct(res.n_pos, res.n),
                **{METRIC_LABELS[k]: res.estimates[k].fmt() for k in
                   ("auc", "sensitivity", "specificity", "ppv", "npv", "accuracy")},
                "p (AUC = 0.5, Bonferroni)": _p(r.p_auc_adj),
                het_col: het,
            })
    return pd.DataFrame(out)


# --------------------------------------------------------------------------
# Table 1 (manifest)
# --------------------------------------------------------------------------
def read_manifest(path: str | Path) -> pd.DataFrame:
    p = Path(path)
    if not p.is_file():
        raise TableError(f"manifest not found: {p}", reason="missing_file")
    df = pd.read_csv(p, dtype={"patient_id": str, "image_id": str})
    missing = [c for c in ("site", "sex", "age", "category") if c not in df.columns]
    if missing:
        raise TableError(f"manifest {p.name} lacks column(s) {missing} needed for Table 1", reason="missing_columns")
    return df


def _norm_sex(s: pd.Series) -> pd.Series:
    from bonescreen.labels import normalize_sex

    return s.map(normalize_sex)


def table1(manifest: pd.DataFrame) -> pd.DataFrame:
    """Per dataset (site, and split where a site has several) and sex: n, age
    mean ± SD, WHO category and severity counts with percentages, vendors."""
    df = manifest.copy()
    df["_sex"] = _norm_sex(df["sex"])
    df["_age"] = pd.to_numeric(df["age"], errors="coerce")
    if "split" in df.columns and df.groupby("site")["split"].nunique(dropna=True).max() > 1:
        df["_dataset"] = df["site"].astype(str) + " " + df["split"].fillna("").astype(str)
    else:
        df["_dataset"] = df["site"].astype(str)
    has_sev = "severity" in df.columns
    rows_index = ["n", "Age, years (mean ± SD)", "BMD categories", "Normal, n (%)", "Low bone mass, n (%)",
                  "Osteoporosis, n (%)", "Mild (−1.5 < T < −1.0)", "Moderate (−2.0 < T ≤ −1.5)",
                  "Advanced (−2.5 < T ≤ −2.0)", "CXR manufacturer"]
    has_days = "days_apart" in df.columns and pd.to_numeric(df["days_apart"], errors="coerce").notna().any()
    if has_days:  # STARD item 22: the interval between index test and reference standard
        rows_index.append(DAYS_ROW)
    cols: dict[tuple[str, str], list[str]] = {}
    for ds, g in df.groupby("_dataset", sort=False):
        sexes = [x for x in ("F", "M", "O") if (g["_sex"] == x).any()]
        if g["_sex"].isna().any():
            sexes.append("unknown")
        for sx in sexes:
            h = g[g["_sex"].isna()] if sx == "unknown" else g[g["_sex"] == sx]
            n = len(h)
            age = h["_age"].dropna()
            age_s = f"{age.mean():.1f} ± {age.std(ddof=1):.1f}" if len(age) > 1 else (
                f"{age.iloc[0]:.1f}" if len(age) == 1 else "NA")
            cat = h["category"].astype(str).str.strip().str.lower()
            sev = h["severity"].astype(str).str.strip().str.lower() if has_sev else pd.Series([], dtype=str)
            sev_known = has_sev and h["severity"].notna().any() and (sev != "").any()
            vals = [f"{n:,}", age_s, "",
                    _pct(int((cat == "normal").sum()), n),
                    _pct(int((cat == "low_bone_mass").sum()), n),
                    _pct(int((cat == "osteoporosis").sum()), n)]
            for grade in ("mild", "moderate", "advanced"):
                vals.append(_pct(int((sev == grade).sum()), n) if sev_known else "NA")
            if "manufacturer" in h.columns and h["manufacturer"].notna().any():
                vc = h["manufacturer"].fillna("unknown").value_counts()
                vals.append("; ".join(f"{k} ({100 * v / n:.1f}%)" for k, v in vc.head(3).items())
                            + ("; others" if len(vc) > 3 else ""))
            else:
                vals.append("NA")
            if has_days:
                d = pd.to_numeric(h["days_apart"], errors="coerce").dropna()
                vals.append(f"{d.median():g} ({d.quantile(0.25):g}–{d.quantile(0.75):g})" if len(d) else "NA")
            label = SEX_NAMES.get(sx, sx)
            cols[(f"{ds} (n = {len(g):,})", f"{label} (n = {n:,})")] = vals
    out = pd.DataFrame(cols, index=rows_index)
    out.columns = pd.MultiIndex.from_tuples(list(cols.keys()))
    return out


# --------------------------------------------------------------------------
# Figure 1 flow counts
# --------------------------------------------------------------------------
def read_flow(path: str | Path) -> dict[str, list[dict[str, Any]]]:
    """Read ``flow.json``: a list of steps, ``{"steps": [...]}`` as ``bonescreen cohort``
    writes it, or ``{name: [steps]}`` for several
    flows (e.g. per site). Each step: ``step``, ``remaining``, ``excluded``,
    ``reasons``. Returned as ``{name: steps}`` (a bare list is named "cohort")."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise TableError(f"flow file not found: {p}", reason="missing_file") from exc
    except json.JSONDecodeError as exc:
        raise TableError(f"flow file {p.name} is not valid JSON: {exc}", reason="bad_json") from exc
    if isinstance(data, dict) and isinstance(data.get("steps"), list):
        data = data["steps"]  # `bonescreen cohort` writes {"steps": [...], "sites": ..., "config": ...}
    flows = {"cohort": data} if isinstance(data, list) else data
    if not isinstance(flows, dict):
        raise TableError(f"flow file {p.name}: expected a list of steps or an object of lists", reason="bad_flow")
    for name, steps in flows.items():
        if not isinstance(steps, list) or not steps:
            raise TableError(f"flow {name!r} in {p.name}: expected a non-empty list of steps", reason="bad_flow")
        for i, st in enumerate(steps):
            if not isinstance(st, dict) or "step" not in st or "remaining" not in st:
                raise TableError(f"flow {name!r} step {i} in {p.name} lacks 'step' or 'remaining'", reason="bad_flow")
            st.setdefault("excluded", 0)
            st.setdefault("reasons", {})
    return flows


def flow_table(flows: Mapping[str, Sequence[Mapping[str, Any]]]) -> pd.DataFrame:
    rows = []
    for name, steps in flows.items():
        for st in steps:
            reasons = st.get("reasons") or {}
            rows.append({"flow": name, "step": st["step"], "remaining": st["remaining"],
                         "excluded": st.get("excluded", 0),
                         "reasons": "; ".join(f"{k}: {v}" for k, v in reasons.items())})
    return pd.DataFrame(rows)


def flow_inconsistencies(flows: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[str]:
    """Arithmetic checks: remaining = previous remaining − excluded; reasons sum to excluded."""
    msgs = []
    for name, steps in flows.items():
        prev = None
        for st in steps:
            exc = int(st.get("excluded") or 0)
            rem = int(st["remaining"])
            if prev is not None and prev - exc != rem:
                msgs.append(f"flow {name!r}, step {st['step']!r}: {prev} − {exc} ≠ {rem}")
            reasons = st.get("reasons") or {}
            if reasons and sum(int(v) for v in reasons.values()) != exc:
                msgs.append(f"flow {name!r}, step {st['step']!r}: reasons sum to "
                            f"{sum(int(v) for v in reasons.values())}, excluded is {exc}")
            prev = rem
    return msgs


def flatten_columns(df: pd.DataFrame) -> pd.DataFrame:
    """MultiIndex columns joined with ' | ' for CSV."""
    out = df.copy()
    if isinstance(out.columns, pd.MultiIndex):
        out.columns = [" | ".join(str(x) for x in c) for c in out.columns]
    return out
