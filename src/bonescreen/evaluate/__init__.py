"""Validation report: metrics with CIs, model comparison, subgroups, journal
tables and figures, a self-contained HTML report (see the README, "Validation report").

The package is lazy (PEP 562): ``import bonescreen.evaluate.metrics`` (the maths the screening
engine, site profiles and training use) does not load the report's tables, figures and HTML;
each name below is imported from its module on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bonescreen.evaluate.compare import (
        DeLongResult,
        age_band_labels,
        assign_age_band,
        delong_covariance,
        delong_test,
        severity_accuracy,
        severity_from_t,
        subgroup_analysis,
    )
    from bonescreen.evaluate.metrics import (
        BinaryResult,
        BootstrapWeights,
        Confusion,
        Estimate,
        bootstrap_weights,
        confusion,
        evaluate_binary,
        sensitivity_threshold,
        weighted_auc,
        wilson_ci,
        youden_threshold,
    )
    from bonescreen.evaluate.report import (
        EvaluateConfig,
        Report,
        evaluate_predictions,
        read_predictions,
        run_evaluation,
        summary_text,
        write_report,
    )

#: public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "DeLongResult": "compare",
    "age_band_labels": "compare",
    "assign_age_band": "compare",
    "delong_covariance": "compare",
    "delong_test": "compare",
    "severity_accuracy": "compare",
    "severity_from_t": "compare",
    "subgroup_analysis": "compare",
    "BinaryResult": "metrics",
    "BootstrapWeights": "metrics",
    "Confusion": "metrics",
    "Estimate": "metrics",
    "bootstrap_weights": "metrics",
    "confusion": "metrics",
    "evaluate_binary": "metrics",
    "sensitivity_threshold": "metrics",
    "weighted_auc": "metrics",
    "wilson_ci": "metrics",
    "youden_threshold": "metrics",
    "EvaluateConfig": "report",
    "Report": "report",
    "evaluate_predictions": "report",
    "read_predictions": "report",
    "run_evaluation": "report",
    "summary_text": "report",
    "write_report": "report",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


__all__ = [
    "BinaryResult",
    "BootstrapWeights",
    "Confusion",
    "DeLongResult",
    "Estimate",
    "EvaluateConfig",
    "Report",
    "age_band_labels",
    "assign_age_band",
    "bootstrap_weights",
    "confusion",
    "delong_covariance",
    "delong_test",
    "evaluate_binary",
    "evaluate_predictions",
    "read_predictions",
    "run_evaluation",
    "sensitivity_threshold",
    "severity_accuracy",
    "severity_from_t",
    "subgroup_analysis",
    "summary_text",
    "weighted_auc",
    "wilson_ci",
    "write_report",
    "youden_threshold",
]
