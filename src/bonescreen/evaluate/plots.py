"""Report figures with matplotlib (Agg): ROC with bootstrap band, PR,
calibration, accuracy by severity (Figure 2) and the cohort flow (Figure 1).

Each function returns PNG bytes so the HTML can embed them and the report
folder can keep them as files.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

DPI = 110


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig: Any) -> bytes:
    plt = pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


@dataclass
class Curve:
    """One model's scores on one site, plus what the legends need."""

    model: str
    labels: NDArray[np.int_]
    scores: NDArray[np.float64]
    auc: float = math.nan
    auc_lo: float = math.nan
    auc_hi: float = math.nan
    ap: float = math.nan
    band: dict[str, NDArray[np.float64]] | None = None
    calibration: dict[str, list[float]] = field(default_factory=dict)


def _grid(n: int, size: float = 4.0) -> tuple[Any, Any, list[Any]]:
    plt = pyplot()
    ncols = min(3, max(1, n))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + 0.4), squeeze=False,
                             layout="constrained")
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.axis("off")
    return plt, fig, flat[:n]


def _two_classes(y: NDArray[np.int_]) -> bool:
    return 0 < int(np.sum(y)) < len(y)


def roc_figure(panels: Mapping[str, Sequence[Curve]], oracle: Mapping[str, float] | None = None) -> bytes:
    """One panel per site; each model's ROC, shaded 95% bootstrap band."""
    from sklearn.metrics import roc_curve

    plt, fig, axes = _grid(len(panels))
    for ax, (site, curves) in zip(axes, panels.items()):
        for i, c in enumerate(curves):
            color = f"C{i}"
            if not _two_classes(c.labels):
                ax.text(0.5, 0.5 - 0.08 * i, f"{c.model}: one class, AUC undefined", ha="center", fontsize=8)
                continue
            fpr, tpr, _ = roc_curve(c.labels, c.scores)
            lab = f"{c.model}: AUC {c.auc:.2f}"
            if not math.isnan(c.auc_lo):
                lab += f" ({c.auc_lo:.2f}–{c.auc_hi:.2f})"
            ax.plot(fpr, tpr, color=color, lw=1.6, label=lab)
            if c.band is not None:
                ax.fill_between(c.band["fpr"], c.band["tpr_lo"], c.band["tpr_hi"], color=color, alpha=0.18, lw=0)
        ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=0.8)
        title = site
        if oracle and site in oracle:
            title += f"  (oracle AUC {oracle[site]:.2f})"
        ax.set(title=title, xlabel="1 − specificity", ylabel="Sensitivity", xlim=(0, 1), ylim=(0, 1.01))
        ax.set_aspect("equal")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right", fontsize=7, frameon=False)
    fig.suptitle("ROC curves (shaded: 95% bootstrap band)", fontsize=11)
    return figure_png(fig)


def pr_figure(panels: Mapping[str, Sequence[Curve]]) -> bytes:
    from sklearn.metrics import precision_recall_curve

    plt, fig, axes = _grid(len(panels))
    for ax, (site, curves) in zip(axes, panels.items()):
        prev = None
        for i, c in enumerate(curves):
            if not _two_classes(c.labels):
                ax.text(0.5, 0.5 - 0.08 * i, f"{c.model}: one class, AP undefined", ha="center", fontsize=8)
                continue
            p, r, _ = precision_recall_curve(c.labels, c.scores)
            ax.step(r, p, where="post", color=f"C{i}", lw=1.6, label=f"{c.model}: AP {c.ap:.2f}")
            prev = float(np.mean(c.labels))
        if prev is not None:
            ax.axhline(prev, ls="--", color="0.6", lw=0.8, label=f"prevalence {prev:.2f}")
        ax.set(title=site, xlabel="Recall (sensitivity)", ylabel="Precision (PPV)", xlim=(0, 1), ylim=(0, 1.01))
        ax.set_aspect("equal")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower left", fontsize=7, frameon=False)
    fig.suptitle("Precision–recall curves", fontsize=11)
    return figure_png(fig)


def calibration_figure(panels: Mapping[str, Sequence[Curve]]) -> bytes:
    plt, fig, axes = _grid(len(panels))
    for ax, (site, curves) in zip(axes, panels.items()):
        for i, c in enumerate(curves):
            cal = c.calibration or {}
            if cal.get("mean_predicted"):
                ax.plot(cal["mean_predicted"], cal["fraction_positive"], marker="o", ms=3, color=f"C{i}",
                        lw=1.4, label=c.model)
        ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=0.8, label="perfect")
        ax.set(title=site, xlabel="Mean predicted probability", ylabel="Observed fraction low bone mass",
               xlim=(0, 1), ylim=(0, 1))
        ax.set_aspect("equal")
        ax.legend(loc="upper left", fontsize=7, frameon=False)
    fig.suptitle("Calibration (10 equal-width bins)", fontsize=11)
    return figure_png(fig)


def severity_figure(rows: Mapping[str, Sequence[Mapping[str, Any]]]) -> bytes:
    """Figure 2: accuracy per severity grade, grouped by dataset, Wilson 95% CI."""
    plt = pyplot()
    grades = ["normal", "mild", "moderate", "advanced"]
    names = list(rows)
    fig, ax = plt.subplots(figsize=(min(12.0, max(6.0, 0.8 * len(grades) * max(1, len(names)))), 4.2))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        by = {r["severity"]: r for r in rows[name]}
        xs, ys, lo, hi, ns = [], [], [], [], []
        for j, g in enumerate(grades):
            if g in by:
                r = by[g]
                xs.append(j - 0.4 + width * (i + 0.5))
                ys.append(r["accuracy"])
                lo.append(max(0.0, r["accuracy"] - r["lo"]))  # rounding can put a bound a hair inside
                hi.append(max(0.0, r["hi"] - r["accuracy"]))
                ns.append(r["n"])
        ax.bar(xs, ys, width=width * 0.92, color=f"C{i}", label=name, yerr=[lo, hi], capsize=3,
               error_kw={"lw": 0.8})
        for x, n in zip(xs, ns):
            ax.text(x, 0.02, f"n={n}", rotation=90, ha="center", va="bottom", fontsize=6, color="white")
    ax.set_xticks(range(len(grades)), [g.capitalize() for g in grades])
    ax.set(ylim=(0, 1.05), ylabel="Accuracy (95% CI)", title="Accuracy by severity (normal: specificity; "
           "grades of low bone mass: sensitivity)")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return figure_png(fig)


def flow_figure(flows: Mapping[str, Sequence[Mapping[str, Any]]]) -> bytes:
    """Figure 1: boxes for the remaining count at each step, exclusions to the side."""
    plt = pyplot()
    n_flows = len(flows)
    max_steps = max(len(s) for s in flows.values())
    fig, axes = plt.subplots(1, n_flows, figsize=(5.5 * n_flows, 1.0 * max_steps + 0.8), squeeze=False)
    for ax, (name, steps) in zip(axes[0], flows.items()):
        ax.set_xlim(0, 10)
        ax.set_ylim(-(len(steps) - 1) * 1.2 - 0.6, 0.6)
        ax.axis("off")
        ax.set_title(name, fontsize=10)
        box = {"boxstyle": "round,pad=0.35", "fc": "#f4f6f8", "ec": "#333", "lw": 0.8}
        xbox = {"boxstyle": "round,pad=0.3", "fc": "#fff4f0", "ec": "#a33", "lw": 0.8}
        for i, st in enumerate(steps):
            y = -i * 1.2
            ax.text(3.0, y, f"{st['step']}\nn = {int(st['remaining']):,}", ha="center", va="center",
                    fontsize=9, bbox=box)
            if i:
                ax.annotate("", xy=(3.0, y + 0.33), xytext=(3.0, y + 0.87),
                            arrowprops={"arrowstyle": "-|>", "lw": 0.8})
            exc = int(st.get("excluded") or 0)
            if i and exc:
                reasons = st.get("reasons") or {}
                txt = f"Excluded n = {exc:,}"
                for k, v in list(reasons.items())[:5]:
                    txt += f"\n  {k}: {int(v):,}"
                if len(reasons) > 5:
                    txt += f"\n  … {len(reasons) - 5} more"
                ax.annotate("", xy=(5.6, y + 0.6), xytext=(3.0, y + 0.6), arrowprops={"arrowstyle": "-|>", "lw": 0.6})
                ax.text(5.7, y + 0.6, txt, ha="left", va="center", fontsize=7, bbox=xbox)
    fig.suptitle("Figure 1. Cohort flow", fontsize=11)
    return figure_png(fig)


def decision_figure(panels: Mapping[str, Sequence[Any]]) -> bytes:
    """Decision curves: net benefit vs threshold probability, one panel per site.

    ``panels``: site -> list of ``evaluate.decision.DecisionCurve`` (one per model); the
    reference strategies (refer all / none / the age-sex rule) are drawn once per panel.
    """
    plt, fig, axes = _grid(len(panels))
    refs = {"refer all": ("0.45", "--"), "refer none": ("0.2", ":")}
    for ax, (site, curves) in zip(axes, panels.items()):
        top = 0.0
        for i, dc in enumerate(curves):
            th = np.asarray(dc.thresholds)
            for name, nb in dc.strategies.items():
                if name in refs or name == dc.rule:
                    continue
                ax.plot(th, nb, color=f"C{i}", lw=1.6, label=name)
                top = max(top, float(np.nanmax(nb)))
        if curves:
            dc = curves[0]
            th = np.asarray(dc.thresholds)
            for name, (color, ls) in refs.items():
                ax.plot(th, dc.strategies[name], color=color, ls=ls, lw=1.0, label=name)
            if dc.rule:
                ax.plot(th, dc.strategies[dc.rule], color="C3", ls="-.", lw=1.2, label=dc.rule)
            top = max(top, dc.prevalence if not math.isnan(dc.prevalence) else 0.0)
        ax.set(title=site, xlabel="Threshold probability", ylabel="Net benefit", xlim=(0, float(th[-1]) if curves else 1),
               ylim=(-0.05, max(0.05, top * 1.1)))
        ax.legend(loc="upper right", fontsize=7, frameon=False)
    fig.suptitle("Decision curves (net benefit of referring for DXA)", fontsize=11)
    return figure_png(fig)
