"""Agreement between predicted and DXA values: Pearson r, ICC, MAE, Bland-Altman.

The low-BMD classification metrics (AUC, sensitivity, specificity, ...) go
through the project's validation report (:func:`bonescreen.evaluate.report.run_evaluation`)
from the same predictions table; this module adds what a regression needs.

Confidence intervals resample children, not images (a child has 1–3 images):
the cluster bootstrap of the adult report, ``evaluate.metrics.bootstrap_weights``.

ICC is ICC(2,1) (Shrout & Fleiss; McGraw & Wong's ICC(A,1)): two-way random
effects, absolute agreement, single measurement, which penalises a constant
bias as well as scatter, the right question for "does the model give the DXA
value". Hand-written from the two-way ANOVA mean squares because pingouin is
not a dependency and statsmodels has no ICC; the formula is five lines.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bonescreen.errors import TableError
from bonescreen.evaluate.metrics import bootstrap_weights, percentile_ci

PAIRS = {"z": ("z_true", "z_pred"), "bmd": ("bmd_true", "bmd_pred")}


def icc_2_1(a: np.ndarray, b: np.ndarray) -> float:
    """ICC(2,1) of two raters (DXA, model) over n subjects; NaN for n < 3 or no variance."""
    x = np.stack([np.asarray(a, float), np.asarray(b, float)], axis=1)
    n, k = x.shape
    if n < 3:
        return math.nan
    grand = x.mean()
    ss_rows = k * ((x.mean(axis=1) - grand) ** 2).sum()
    ss_cols = n * ((x.mean(axis=0) - grand) ** 2).sum()
    ss_err = ((x - grand) ** 2).sum() - ss_rows - ss_cols
    msr = ss_rows / (n - 1)
    msc = ss_cols / (k - 1)
    mse = ss_err / ((n - 1) * (k - 1))
    denom = msr + (k - 1) * mse + k * (msc - mse) / n
    return float((msr - mse) / denom) if denom > 0 else math.nan


def pearson(a: np.ndarray, b: np.ndarray, alpha: float = 0.05) -> dict[str, float]:
    """Pearson r with its Fisher-z confidence interval (scipy)."""
    from scipy.stats import pearsonr

    if len(a) < 4 or np.std(a) == 0 or np.std(b) == 0:
        return {"value": math.nan, "lo": math.nan, "hi": math.nan, "p": math.nan}
    res = pearsonr(a, b)
    ci = res.confidence_interval(confidence_level=1 - alpha)
    return {"value": float(res.statistic), "lo": float(ci.low), "hi": float(ci.high), "p": float(res.pvalue)}


def agreement(true: np.ndarray, pred: np.ndarray, *, groups: np.ndarray | None = None, n_boot: int = 1000,
              seed: int = 0, alpha: float = 0.05) -> dict[str, Any]:
    """r, ICC(2,1) and MAE with CIs, bias and 95 % limits of agreement.

    CIs resample **patients** (``groups``: one id per row; a child's 1–3 images come
    along together) through :func:`bonescreen.evaluate.metrics.bootstrap_weights`, the
    same cluster bootstrap as the adult report: percentile intervals for ICC, MAE and,
    when some patient has several images, r. With one image per patient (or no
    ``groups``) r keeps its Fisher-z interval, which assumes independent rows.
    """

    t = np.asarray(true, float)
    p = np.asarray(pred, float)
    ok = np.isfinite(t) & np.isfinite(p)
    g = None if groups is None else np.asarray(groups).astype(str)[ok]
    t, p = t[ok], p[ok]
    n = int(t.size)
    out: dict[str, Any] = {"n": n}
    if n < 3:
        out.update({"pearson_r": None, "icc_2_1": None, "mae": None, "bias": None, "loa": None})
        return out
    diff = p - t
    boot = bootstrap_weights(np.zeros(n), g, n_boot=n_boot, seed=seed, require_both_classes=False)
    w = boot.weights
    # a resample as row indices (weights are integer counts): ICC and r need the rows themselves
    idx = [np.repeat(np.arange(n), row.astype(int)) for row in w]
    iccs = np.array([icc_2_1(t[i], p[i]) for i in idx])
    maes = (w @ np.abs(diff)) / w.sum(axis=1) if len(w) else np.array([])
    sd = float(np.std(diff, ddof=1))
    bias = float(diff.mean())
    out["pearson_r"] = pearson(t, p, alpha)
    if boot.unit == "patient":
        rs = np.array([np.corrcoef(t[i], p[i])[0, 1] if np.std(t[i]) > 0 and np.std(p[i]) > 0 else np.nan
                       for i in idx])
        lo, hi = percentile_ci(rs, alpha)
        out["pearson_r"].update({"lo": lo, "hi": hi, "method": "patient bootstrap"})
    else:
        out["pearson_r"]["method"] = "fisher z"
    icc = icc_2_1(t, p)
    lo, hi = percentile_ci(iccs, alpha)
    out["icc_2_1"] = {"value": icc, "lo": lo, "hi": hi}
    lo, hi = percentile_ci(maes, alpha)
    out["mae"] = {"value": float(np.abs(diff).mean()), "lo": lo, "hi": hi}
    out["bias"] = bias
    out["sd_diff"] = sd
    out["loa"] = [bias - 1.96 * sd, bias + 1.96 * sd]
    out["bootstrap"] = {"unit": boot.unit, "n_units": boot.n_units, "n_boot": int(len(w)), "seed": seed}
    return out


def regression_metrics(preds: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Agreement for Z and BMD, overall and per site, from a pediatric predictions table."""
    if not {"z_true", "z_pred"} <= set(preds.columns):
        raise TableError(
            "a pediatric predictions table needs z_true and z_pred (written by `bonescreen pediatric train`)",
            reason="missing_columns",
        )
    def groups(frame: pd.DataFrame) -> np.ndarray | None:
        if "patient_id" not in frame.columns:
            return None
        pid = frame["patient_id"].astype(object)
        # an unknown patient is its own resampling unit
        groups: np.ndarray = np.where(pid.notna(), pid.astype(str),
                                      "__img__" + pd.Series(range(len(frame))).astype(str)).astype(str)
        return groups

    out: dict[str, Any] = {}
    for name, (tc, pc) in PAIRS.items():
        if tc in preds.columns and pc in preds.columns:
            out[name] = agreement(preds[tc].to_numpy(float), preds[pc].to_numpy(float), groups=groups(preds),
                                  n_boot=n_boot, seed=seed)
    if "site" in preds.columns and preds["site"].nunique() > 1:
        out["per_site"] = {
            str(site): {
                name: agreement(g[tc].to_numpy(float), g[pc].to_numpy(float), groups=groups(g), n_boot=n_boot,
                                seed=seed)
                for name, (tc, pc) in PAIRS.items()
                if tc in g.columns and pc in g.columns
            }
            for site, g in preds.groupby(preds["site"].astype(str))
        }
    return out


def bland_altman_png(preds: pd.DataFrame, path: str | Path, *, what: str = "z") -> Path:
    """Bland-Altman plot (difference vs mean, bias and limits of agreement) beside a scatter plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tc, pc = PAIRS[what]
    t = preds[tc].to_numpy(float)
    p = preds[pc].to_numpy(float)
    ok = np.isfinite(t) & np.isfinite(p)
    t, p = t[ok], p[ok]
    unit = "Z-score" if what == "z" else "BMD (g/cm²)"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.4))
    lim = [float(min(t.min(), p.min())), float(max(t.max(), p.max()))] if t.size else [0, 1]
    ax1.scatter(t, p, s=10, alpha=0.6)
    ax1.plot(lim, lim, "k--", lw=1)
    if what == "z":
        ax1.axvline(-2.0, color="r", lw=0.8, ls=":")
        ax1.axhline(-2.0, color="r", lw=0.8, ls=":")
    r = np.corrcoef(t, p)[0, 1] if t.size > 2 else float("nan")
    ax1.set(xlabel=f"DXA {unit}", ylabel=f"predicted {unit}", title=f"r = {r:.2f} (n = {t.size})")
    m, d = (t + p) / 2, p - t
    bias, sd = (float(d.mean()), float(d.std(ddof=1))) if d.size > 1 else (0.0, 0.0)
    ax2.scatter(m, d, s=10, alpha=0.6)
    for y, ls in ((bias, "-"), (bias - 1.96 * sd, "--"), (bias + 1.96 * sd, "--")):
        ax2.axhline(y, color="k", ls=ls, lw=1)
    ax2.set(xlabel=f"mean of DXA and predicted {unit}", ylabel="predicted − DXA",
            title=f"Bland–Altman: bias {bias:+.2f}, LoA {bias - 1.96 * sd:+.2f} to {bias + 1.96 * sd:+.2f}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt_ci(d: dict[str, float] | None) -> str:
    if not d or d.get("value") is None or not np.isfinite(d["value"]):
        return "NA"
    return f"{d['value']:.3f} ({d['lo']:.3f}–{d['hi']:.3f})"


def summary_lines(reg: dict[str, Any], oracle: dict[str, Any] | None = None) -> list[str]:
    """A few terminal lines: r, ICC, MAE for Z and BMD, with the phantom's oracle r when known."""
    lines = []
    for name in ("z", "bmd"):
        a = reg.get(name)
        if not a or a.get("pearson_r") is None:
            continue
        line = (f"{name.upper():<4} n={a['n']:<5} r {_fmt_ci(a['pearson_r'])}  ICC(2,1) {_fmt_ci(a['icc_2_1'])}  "
                f"MAE {_fmt_ci(a['mae'])}  bias {a['bias']:+.3f}")
        key = "r" if name == "z" else "r_bmd"
        if oracle and oracle.get(key) is not None:
            line += f"  [oracle r {oracle[key]:.3f}]"
        lines.append(line)
    return lines


PEDIATRIC_AGE_BANDS = (6.0, 12.0, 15.0)


def run_pediatric_evaluation(
    predictions: list[str | Path],
    out_dir: str | Path,
    *,
    tune: list[str | Path] | None = None,
    oracle: str | Path | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Regression agreement (this module) + the low-BMD classification report (``bonescreen.evaluate``).

    Writes ``regression.json``, ``bland_altman_z.png``, ``bland_altman_bmd.png``
    and the standard report under ``classification/`` (score = P(Z <= -2),
    label = DXA Z <= -2, cut-off 0.5 = predicted Z <= -2).
    """
    import json

    from bonescreen.evaluate.report import EvaluateConfig, run_evaluation, summary_text

    frames = []
    for p in predictions:
        path = Path(p)
        if not path.is_file():
            raise TableError(f"predictions file not found: {path}", reason="missing_file")
        frames.append(pd.read_csv(path, dtype={"image_id": str, "patient_id": str}))
    preds = pd.concat(frames, ignore_index=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reg = regression_metrics(preds, n_boot=n_boot, seed=seed)
    orc: dict[str, Any] = {}
    if oracle:
        orc = json.loads(Path(oracle).read_text(encoding="utf-8"))
        reg["oracle"] = {site: {k: v.get(k) for k in ("auc", "r", "r_bmd", "mae_z")}
                         for site, v in orc.items() if isinstance(v, dict) and "r" in v}
    (out / "regression.json").write_text(json.dumps(reg, indent=1, default=float))
    figures = [bland_altman_png(preds, out / "bland_altman_z.png", what="z")]
    if {"bmd_true", "bmd_pred"} <= set(preds.columns) and preds["bmd_true"].notna().any():
        figures.append(bland_altman_png(preds, out / "bland_altman_bmd.png", what="bmd"))
    cfg = EvaluateConfig(n_boot=n_boot, seed=seed, age_bands=PEDIATRIC_AGE_BANDS,
                         title="bonescreen pediatric validation report (low BMD: Z ≤ −2.0)",
                         positive_label="low BMD (Z ≤ −2.0)", referral_rule=None)
    rep, files = run_evaluation(predictions, out / "classification", config=cfg, tune=tune or None,
                                oracle=oracle, progress=progress)
    lines = summary_lines(reg)
    for site, per in (reg.get("per_site") or {}).items():
        lines += [f"  {site}: " + s for s in summary_lines(per, orc.get(site) if isinstance(orc.get(site), dict) else None)]
    return {
        "regression": reg,
        "classification_summary": summary_text(rep),
        "regression_summary": "\n".join(lines),
        "files": {"regression": str(out / "regression.json"), "figures": [str(f) for f in figures],
                  **{k: str(v) for k, v in files.items()}},
        "report": rep,
    }
