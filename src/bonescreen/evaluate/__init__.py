"""Validation report: metrics with CIs, model comparison, subgroups, journal
tables and figures, a self-contained HTML report (see the README, "Validation report")."""

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
