"""The pediatric task: BMD Z-score (and BMD) regression from the CXR + age, sex, height, weight.

The network is :class:`bonescreen.pediatric.model.FusionRegressor` (image backbone + clinical
variables); its decision is the predicted Z <= -2.0 (``labels.PEDIATRIC_LOW_Z``), scored as
P(Z <= -2.0) from the tuning split's residual SD. It has no softmax head, takes two inputs
(so no single-input scoring graph: torch on the CPU only), and is explained with Grad-CAM
towards lower predicted Z (:class:`bonescreen.pediatric.explain.PediatricExplainer`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from bonescreen.schema import PEDIATRIC_TASK
from bonescreen.tasks.base import DecisionInputs, DecisionRule, LossFn, Task, register_task
from bonescreen.tasks.classification import empty_scores

__all__ = ["PEDIATRIC", "PEDIATRIC_CASCADE_REFUSED", "PEDIATRIC_CATEGORIES", "PediatricTask"]

#: Pediatric categories: predicted Z <= -2.0 (the study's low BMD for age) or not. Named apart
#: from the adult WHO categories on purpose: a child's low Z-score is not "osteopenia".
PEDIATRIC_CATEGORIES = ("normal_bmd", "low_bmd")
PEDIATRIC_CASCADE_REFUSED = (
    "a pediatric model cannot run in the two-stage cascade (--stage1 is the adult osteoporosis model, "
    "and its eligibility excludes children); screen with --model pediatric.pt alone"
)


class PediatricTask(Task):
    """Z-score regression with clinical variables; the decision is predicted Z <= -2.0."""

    name = PEDIATRIC_TASK
    # the classes name the decision taken from the predicted Z (<= -2.0)
    class_names = ("normal", "low_bmd")
    has_logits = False
    single_input = False
    needs_clinical = True
    regression = True
    cascade_refusal = PEDIATRIC_CASCADE_REFUSED
    threshold_column = "threshold_stage2"
    explain_target = "low_bmd"
    label_column = "z_lumbar_spine"  # bonescreen.pediatric.data.Z_COLUMN

    def default_eligibility(self) -> dict[str, Any]:
        from bonescreen.pediatric.model import PEDIATRIC_ELIGIBILITY

        return dict(PEDIATRIC_ELIGIBILITY)

    def build_model(self, spec: Any) -> Any:
        from bonescreen.pediatric.model import build_from_spec

        return build_from_spec(spec)

    def dataset(self, source: Any, labels: Sequence[int] | np.ndarray, **options: Any) -> Any:
        """``PediatricDataset`` over a ``ManifestDataset``.

        ``options``: ``clinical_raw`` (N, 4), ``targets_raw`` (N, 2: Z, BMD) and ``standardizer``
        (``pediatric.model.Standardizer``) for the regression; the rest go to ``ManifestDataset``.
        """
        from bonescreen.data import ManifestDataset
        from bonescreen.pediatric.data import PediatricDataset

        opts = dict(options)
        clinical, targets, standardizer = (opts.pop(k) for k in ("clinical_raw", "targets_raw", "standardizer"))
        return PediatricDataset(ManifestDataset(source, labels, **opts), clinical, targets, standardizer)

    def loss(self, **options: Any) -> LossFn:
        """``pediatric.data.regression_loss``: MSE on standardised Z + ``bmd_weight`` x BMD."""
        from bonescreen.pediatric.data import regression_loss

        return regression_loss(float(options.get("bmd_weight", 0.5)))  # type: ignore[no-any-return]

    # ------------------------------------------------------------ screening

    def result_columns(self) -> list[str]:
        from bonescreen.schema import PEDIATRIC_RESULT_COLUMNS, RESULT_COLUMNS

        return RESULT_COLUMNS + PEDIATRIC_RESULT_COLUMNS

    def prediction_columns(self) -> list[str]:
        from bonescreen.schema import PEDIATRIC_PREDICTION_COLUMNS, SCREEN_PREDICTION_COLUMNS

        return list(SCREEN_PREDICTION_COLUMNS) + PEDIATRIC_PREDICTION_COLUMNS

    def predict_clinical(self, loaded: Any, images: np.ndarray, clinical: np.ndarray,
                         device: Any = "cpu") -> dict[str, np.ndarray]:
        """Predicted Z, BMD and P(low BMD) from images and raw clinical rows ``(N, 4)``."""
        from bonescreen.pediatric.model import low_bmd_probability, predict_arrays

        spec = loaded.spec
        z, bmd = predict_arrays(
            loaded.model,
            np.asarray(images),
            np.asarray(clinical, dtype=float),
            spec.extra,
            mean=float(spec.preprocess["mean"]),
            std=float(spec.preprocess["std"]),
            device=device,
        )
        prob = low_bmd_probability(z, float(spec.extra.get("residual_sd_z", 1.0)))
        return {"z": z, "bmd": bmd, "prob_low_bmd": prob}

    def predict_table(self, predictor: Any, images: np.ndarray, clinical: Any) -> Any:
        """``pediatric.model.predict_pediatric``: missing clinical values become a reason, not a failure."""
        from bonescreen.pediatric.model import predict_pediatric

        return predict_pediatric(predictor, images, clinical)

    def decide(self, outputs: DecisionInputs, rule: DecisionRule, *, cascade: bool = False) -> list[dict[str, Any]]:
        return self.decide_predictions(outputs.pediatric,
                                       threshold=None if rule.pediatric_own_rule else rule.threshold)

    def decide_predictions(self, preds: Any, *, threshold: float | None = None) -> list[dict[str, Any]]:
        """Rows from ``predict_table`` output (``bonescreen.screen.decide.decide_pediatric``).

        ``score`` = P(Z <= -2.0); ``category`` ``low_bmd`` / ``normal_bmd``. With
        ``threshold`` None the model's own decision (predicted Z <= -2.0, the
        ``low_bmd`` column) flags; a number flags ``score >= threshold`` instead
        (an operating point chosen on a tuning set). A row with a ``reason``
        (``missing_clinical:<names>``) becomes a skip: ``eligible`` False, no score.
        """
        out: list[dict[str, Any]] = []
        for rec in preds.to_dict("records"):
            row: dict[str, Any] = {**empty_scores(), "pred_z": None, "pred_bmd": None, "category": None, "flag": None}
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

    def explainer(self, loaded: Any) -> Any:
        from bonescreen.pediatric.explain import PediatricExplainer

        return PediatricExplainer(loaded)

    def sr_result(self, row: Mapping[str, Any], run: Mapping[str, Any], *, cascade: bool = False) -> Any:
        from bonescreen.dicom_out import PEDIATRIC_MEASUREMENTS, DicomOutputError, ScreeningResult, ood_review

        missing = [col for col in PEDIATRIC_MEASUREMENTS.values() if row.get(col) is None]
        if missing:
            raise DicomOutputError(f"pediatric result lacks {', '.join(missing)}")
        return ScreeningResult(
            category=str(row["category"]), scores={k: float(row[c]) for k, c in PEDIATRIC_MEASUREMENTS.items()},
            model_id=str(run["model"]), task=self.name,
            thresholds={"probability": float(run["threshold"]), "z": float(run["z_threshold"])},
            arch=str(run.get("arch", "")), ood_review=ood_review(dict(row)),
        )


PEDIATRIC = register_task(PediatricTask())
