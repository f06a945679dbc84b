"""The adult classifiers: stage 2 (low bone mass vs normal), stage 1 (osteoporosis), three-class.

A timm backbone with a softmax head (:func:`bonescreen.models.create_model`), trained on
``bonescreen.data.ManifestDataset`` with cross-entropy, explained with Grad-CAM
(:class:`bonescreen.gradcam.Explainer`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from bonescreen.tasks.base import CASCADE, DecisionInputs, DecisionRule, LossFn, Task, register_task

__all__ = [
    "ADULT_ELIGIBILITY",
    "FLAG_CATEGORIES",
    "STAGE1",
    "STAGE2",
    "THREE_CLASS",
    "ClassificationTask",
    "categorize",
    "empty_scores",
]

ADULT_ELIGIBILITY: dict[str, Any] = {
    "modalities": ["CR", "DX"],
    "views": ["PA", "AP"],
    "min_age": 50.0,
    "max_age": 120.0,
}
#: Categories that raise the flag (the abstain band's ``indeterminate`` included).
FLAG_CATEGORIES = ("low_bone_mass", "osteoporosis", "low_bmd", "indeterminate")


def empty_scores() -> dict[str, Any]:
    """The score columns every decided row starts from (None: not this task's)."""
    return {"score": None, "score_stage1": None, "score_stage2": None,
            "p_normal": None, "p_low_bone_mass": None, "p_osteoporosis": None}


def categorize(category: str) -> dict[str, Any]:
    """Category and flag (the abstain band comes after, with the site profile)."""
    return {"category": category, "flag": category in FLAG_CATEGORIES}


class ClassificationTask(Task):
    """A softmax classifier on the image alone."""

    def __init__(self, name: str, class_names: Sequence[str], *, label_column: str) -> None:
        self.name = name
        self.class_names = tuple(class_names)
        #: the manifest column of its integer label (``bonescreen.data.TASK_LABEL_COLUMN``)
        self.label_column = label_column

    def default_eligibility(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, list) else v for k, v in ADULT_ELIGIBILITY.items()}

    def build_model(self, spec: Any) -> Any:
        from bonescreen.models import create_model

        return create_model(spec.arch, spec.num_classes, in_chans=spec.in_chans)

    def dataset(self, source: Any, labels: Sequence[int] | np.ndarray, **options: Any) -> Any:
        """``bonescreen.data.ManifestDataset`` (``options``: augment, seed, mean, std, soft_targets, site_shift)."""
        from bonescreen.data import ManifestDataset

        return ManifestDataset(source, labels, **options)

    def loss(self, **options: Any) -> LossFn:
        """Cross-entropy on the logits, with the batch's class weights and ``label_smoothing``.

        What ``bonescreen.train.supervised_loss`` computes; the training package is to ask
        for this one when it is wired to the registry.
        """
        import torch.nn.functional as F

        label_smoothing = float(options.get("label_smoothing", 0.0))

        def loss_fn(model: Any, x: Any, batch: dict[str, Any]) -> Any:
            logits = model(x).float()
            return F.cross_entropy(logits, batch["label"], weight=batch.get("class_weight"),
                                   label_smoothing=label_smoothing)

        return loss_fn

    # ------------------------------------------------------------ validation (training's predictions.csv)

    def validation_score(self, probs: np.ndarray) -> np.ndarray:
        """``score`` of the validation predictions table: P(positive class)."""
        out: np.ndarray = np.asarray(probs)[:, self.positive_class]
        return out

    def validation_columns(self, probs: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
        """``score`` and ``label`` (the DXA label the report measures ``score`` against), and any extras."""
        return {"score": self.validation_score(probs), "label": y}

    # ------------------------------------------------------------ decisions

    def decide(self, outputs: DecisionInputs, rule: DecisionRule, *, cascade: bool = False) -> list[dict[str, Any]]:
        return self.decide_probabilities(
            outputs.probs_main, outputs.probs_stage1, threshold=rule.threshold, threshold_stage1=rule.threshold_stage1,
            positive=rule.positive, positive_stage1=rule.positive_stage1, class_names=rule.class_names,
            cascade=cascade)

    def decide_probabilities(
        self,
        probs_main: np.ndarray | None,
        probs_stage1: np.ndarray | None = None,
        *,
        threshold: float = 0.5,
        threshold_stage1: float = 0.5,
        positive: int = 1,
        positive_stage1: int = 1,
        class_names: Sequence[str] = ("normal", "low_bone_mass", "osteoporosis"),
        cascade: bool = False,
    ) -> list[dict[str, Any]]:
        """Rows of score columns, category and flag (``bonescreen.screen.decide.decide``)."""
        out: list[dict[str, Any]] = []
        n = len(probs_main) if probs_main is not None else len(probs_stage1)  # type: ignore[arg-type]
        for i in range(n):
            row = empty_scores()
            category = self.categorize_row(row, i, probs_main, probs_stage1, threshold=threshold,
                                           threshold_stage1=threshold_stage1, positive=positive,
                                           positive_stage1=positive_stage1, class_names=class_names,
                                           cascade=cascade)
            row.update(categorize(category))
            out.append(row)
        return out

    def categorize_row(self, row: dict[str, Any], i: int, probs_main: np.ndarray | None,
                       probs_stage1: np.ndarray | None, *, threshold: float, threshold_stage1: float,
                       positive: int, positive_stage1: int, class_names: Sequence[str], cascade: bool) -> str:
        """Fill row ``i``'s score columns and return its category (each task's own rule)."""
        raise NotImplementedError

    # ------------------------------------------------------------ explanation, SR

    def explainer(self, loaded: Any) -> Any:
        from bonescreen.gradcam import Explainer

        return Explainer(loaded)

    def sr_thresholds(self, run: Mapping[str, Any], *, cascade: bool) -> dict[str, float]:
        """The cut-offs an SR reports for this task's decision."""
        return {}

    def sr_result(self, row: Mapping[str, Any], run: Mapping[str, Any], *, cascade: bool = False) -> Any:
        from bonescreen.dicom_out import SCORE_CONCEPTS, ScreeningResult, ood_review

        band = run.get("abstain_band")
        return ScreeningResult(
            category=str(row["category"]), scores={k: float(row[k]) for k in SCORE_CONCEPTS if row.get(k) is not None},
            model_id=str(run["model"]), task=CASCADE if cascade else self.name,
            thresholds=self.sr_thresholds(run, cascade=cascade),
            model_stage1_id=str(run.get("model_stage1") or ""), arch=str(run.get("arch", "")),
            ood_review=ood_review(dict(row)),
            site_profile=str(run.get("site_profile") or ""),
            abstain_band=(float(band[0]), float(band[1])) if band else None,
        )


class Stage2Task(ClassificationTask):
    """Low bone mass vs normal (osteoporosis left out of training): the screening question."""

    cascade_stage = 2
    threshold_column = "threshold_stage2"
    profile_score = "score"
    abstain_band = True

    def categorize_row(self, row: dict[str, Any], i: int, probs_main: np.ndarray | None,
                       probs_stage1: np.ndarray | None, *, threshold: float, threshold_stage1: float,
                       positive: int, positive_stage1: int, class_names: Sequence[str], cascade: bool) -> str:
        s2 = None
        if probs_main is not None and not np.isnan(probs_main[i][positive]):
            s2 = float(probs_main[i][positive])
        row["score_stage2"] = row["score"] = s2
        if cascade:  # stage 1 first: its flag decides osteoporosis, stage 2 the rest
            s1 = float(probs_stage1[i][positive_stage1])  # type: ignore[index]
            row["score_stage1"] = s1
            if s1 >= threshold_stage1:
                return "osteoporosis"
        if s2 is None:
            raise ValueError(f"row {i}: stage-2 score missing for an image stage 1 did not flag")
        return "low_bone_mass" if s2 >= threshold else "normal"

    def sr_thresholds(self, run: Mapping[str, Any], *, cascade: bool) -> dict[str, float]:
        out = {"stage2": float(run["threshold"])}
        if cascade:
            out["stage1"] = float(run["threshold_stage1"])
        return out


class Stage1Task(ClassificationTask):
    """Osteoporosis vs not: alone, or the first stage of the cascade."""

    cascade_stage = 1
    threshold_column = "threshold_stage1"
    profile_score = "score_stage1"

    def categorize_row(self, row: dict[str, Any], i: int, probs_main: np.ndarray | None,
                       probs_stage1: np.ndarray | None, *, threshold: float, threshold_stage1: float,
                       positive: int, positive_stage1: int, class_names: Sequence[str], cascade: bool) -> str:
        s1 = float(probs_main[i][positive])  # type: ignore[index]
        row["score_stage1"] = s1
        return "osteoporosis" if s1 >= threshold else "not_osteoporosis"

    def sr_thresholds(self, run: Mapping[str, Any], *, cascade: bool) -> dict[str, float]:
        return {"stage1": float(run["threshold"])}


class ThreeClassTask(ClassificationTask):
    """Normal / low bone mass / osteoporosis by arg-max; ``score`` = P(low | not osteoporosis)."""

    explain_decided_class = True

    def validation_score(self, probs: np.ndarray) -> np.ndarray:
        """1 - P(normal): any low bone density (what the binary report measures against ``label``)."""
        out: np.ndarray = 1.0 - np.asarray(probs)[:, 0]
        return out

    def validation_columns(self, probs: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
        """Binary ``label`` (any low bone density), ``label_3class`` and the full distribution."""
        cols = {"score": self.validation_score(probs), "label": np.where(np.isnan(y), np.nan, (y > 0).astype(float)),
                "label_3class": y}
        for j, name in enumerate(self.class_names):
            cols[f"prob_{name}"] = np.asarray(probs)[:, j]
        return cols

    def categorize_row(self, row: dict[str, Any], i: int, probs_main: np.ndarray | None,
                       probs_stage1: np.ndarray | None, *, threshold: float, threshold_stage1: float,
                       positive: int, positive_stage1: int, class_names: Sequence[str], cascade: bool) -> str:
        p = np.asarray(probs_main[i], dtype=np.float64)  # type: ignore[index]
        idx = {name: k for k, name in enumerate(class_names)}
        pn, pl, po = (float(p[idx[c]]) for c in ("normal", "low_bone_mass", "osteoporosis"))
        row.update(p_normal=pn, p_low_bone_mass=pl, p_osteoporosis=po)
        row["score"] = pl / (pn + pl) if pn + pl > 0 else None
        return ("normal", "low_bone_mass", "osteoporosis")[int(np.argmax([pn, pl, po]))]


STAGE2 = register_task(Stage2Task("stage2", ["normal", "low_bone_mass"], label_column="label"))
STAGE1 = register_task(Stage1Task("stage1", ["not_osteoporosis", "osteoporosis"], label_column="label_stage1"))
THREE_CLASS = register_task(ThreeClassTask("three_class", ["normal", "low_bone_mass", "osteoporosis"],
                                           label_column="label_3class"))
