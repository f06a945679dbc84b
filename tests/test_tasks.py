"""The task registry (bonescreen.tasks): lookup, per-task facts and rules, artifacts of every task."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from bonescreen import __version__
from bonescreen.errors import ModelArtifactError
from bonescreen.schema import (
    PEDIATRIC_PREDICTION_COLUMNS,
    PEDIATRIC_RESULT_COLUMNS,
    RESULT_COLUMNS,
    SCREEN_PREDICTION_COLUMNS,
)
from bonescreen.tasks import (
    TASKS,
    Task,
    UnknownTaskError,
    get_task,
    mode_task,
    register_task,
    task_names,
)

ARCH = "resnet10t"  # the tiny timm backbone the pediatric screening tests use
SIZE = 32
PEDIATRIC_EXTRA = {
    "clinical_features": ["age", "sex", "height_cm", "weight_kg"], "hidden": 16, "z_threshold": -2.0,
    "residual_sd_z": 0.8, "clinical_mean": [10.0, 0.5, 140.0, 35.0], "clinical_std": [4.0, 0.5, 25.0, 12.0],
    "target_mean": [0.0, 0.6], "target_std": [40.0, 0.15],
}


# --------------------------------------------------------------------------- registry


def test_registry_lists_the_four_tasks_and_looks_them_up() -> None:
    assert task_names() == ["pediatric", "stage1", "stage2", "three_class"]
    for name in task_names():
        task = get_task(name)
        assert isinstance(task, Task) and task.name == name and TASKS[name] is task
    assert mode_task("cascade") is get_task("stage2")
    assert mode_task("") is get_task("stage2")
    assert mode_task("pediatric") is get_task("pediatric")


def test_unknown_task_is_a_clear_artifact_error() -> None:
    from bonescreen.artifact import ModelSpec

    with pytest.raises(UnknownTaskError) as err:
        get_task("stage3")
    assert isinstance(err.value, ModelArtifactError)
    assert err.value.reason == "unknown_task"
    assert "'stage3'" in str(err.value) and "three_class" in str(err.value)
    with pytest.raises(ModelArtifactError, match=r"unknown task 'regression'; expected one of \['pediatric'"):
        ModelSpec.for_task(ARCH, "regression")


def test_a_second_task_of_the_same_name_is_refused() -> None:
    class Clone(type(get_task("stage2"))):  # type: ignore[misc]
        pass

    with pytest.raises(ValueError, match="already registered"):
        register_task(Clone("stage2", ["normal", "low_bone_mass"], label_column="label"))
    assert register_task(get_task("stage2")) is get_task("stage2")  # the same object again is a no-op


def test_classes_positive_class_and_capabilities() -> None:
    s2, s1, s3, ped = (get_task(n) for n in ("stage2", "stage1", "three_class", "pediatric"))
    assert s2.class_names == ("normal", "low_bone_mass") and s2.positive_class == 1
    assert s1.class_names == ("not_osteoporosis", "osteoporosis")
    assert s3.class_names == ("normal", "low_bone_mass", "osteoporosis") and s3.num_classes == 3
    assert ped.class_names == ("normal", "low_bmd")
    for t in (s2, s1, s3):
        assert t.has_logits and t.single_input and not t.needs_clinical and not t.regression
        assert t.default_eligibility() == {"modalities": ["CR", "DX"], "views": ["PA", "AP"],
                                           "min_age": 50.0, "max_age": 120.0}
    assert not ped.has_logits and not ped.single_input and ped.needs_clinical and ped.regression
    assert ped.default_eligibility()["max_age"] == 17.99
    # a fresh dict each time: editing one artifact's eligibility never changes the default
    s2.default_eligibility()["views"].append("LAT")
    assert s2.default_eligibility()["views"] == ["PA", "AP"]
    # site profiles: stage2 (score, abstain band) and stage1 (score_stage1) only
    assert (s2.profile_score, s1.profile_score, s3.profile_score, ped.profile_score) == (
        "score", "score_stage1", None, None)
    assert s2.abstain_band and not s1.abstain_band
    assert (s1.cascade_stage, s2.cascade_stage, s3.cascade_stage, ped.cascade_stage) == (1, 2, None, None)
    assert ped.cascade_refusal and not s2.cascade_refusal
    assert (s2.threshold_column, s1.threshold_column, s3.threshold_column, ped.threshold_column) == (
        "threshold_stage2", "threshold_stage1", None, "threshold_stage2")


def test_result_and_prediction_columns_come_from_schema() -> None:
    for name in ("stage2", "stage1", "three_class"):
        assert get_task(name).result_columns() == RESULT_COLUMNS
        assert get_task(name).prediction_columns() == SCREEN_PREDICTION_COLUMNS
    ped = get_task("pediatric")
    assert ped.result_columns() == RESULT_COLUMNS + PEDIATRIC_RESULT_COLUMNS
    assert ped.prediction_columns() == SCREEN_PREDICTION_COLUMNS + PEDIATRIC_PREDICTION_COLUMNS
    ped.result_columns().append("x")  # a copy: schema's lists are never changed through a task
    assert "x" not in RESULT_COLUMNS
    from bonescreen.screen import prediction_columns, result_columns

    assert result_columns("cascade") == RESULT_COLUMNS
    assert result_columns("pediatric") == RESULT_COLUMNS + PEDIATRIC_RESULT_COLUMNS
    assert prediction_columns("stage1") == SCREEN_PREDICTION_COLUMNS


# --------------------------------------------------------------------------- decisions


def test_classifier_decisions_on_known_probabilities() -> None:
    probs = np.array([[0.3, 0.7], [0.8, 0.2]])
    rows = get_task("stage2").decide_probabilities(probs, threshold=0.5)
    assert [(r["category"], r["flag"], r["score"], r["score_stage2"]) for r in rows] == [
        ("low_bone_mass", True, 0.7, 0.7), ("normal", False, 0.2, 0.2)]
    rows = get_task("stage1").decide_probabilities(probs, threshold=0.6)
    assert [(r["category"], r["flag"], r["score_stage1"], r["score"]) for r in rows] == [
        ("osteoporosis", True, 0.7, None), ("not_osteoporosis", False, 0.2, None)]
    # cascade: stage 1 flags row 0 (its stage-2 score is NaN: not run); stage 2 decides row 1
    s1 = np.array([[0.1, 0.9], [0.9, 0.1]])
    s2 = np.array([[np.nan, np.nan], [0.4, 0.6]])
    rows = get_task("stage2").decide_probabilities(s2, s1, threshold=0.5, threshold_stage1=0.5, cascade=True)
    assert [(r["category"], r["score_stage1"], r["score"]) for r in rows] == [
        ("osteoporosis", 0.9, None), ("low_bone_mass", 0.1, 0.6)]
    with pytest.raises(ValueError, match="stage-2 score missing"):
        get_task("stage2").decide_probabilities(s2, s1, threshold_stage1=0.95, cascade=True)
    p3 = np.array([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    rows = get_task("three_class").decide_probabilities(p3, class_names=("normal", "low_bone_mass", "osteoporosis"))
    assert [r["category"] for r in rows] == ["osteoporosis", "normal"]
    assert rows[0]["score"] == pytest.approx(0.3 / 0.5) and rows[1]["p_normal"] == 0.6
    with pytest.raises(ValueError, match="unknown mode 'pediatric'"):
        get_task("pediatric").decide_probabilities(probs)


def test_the_screen_decision_functions_are_the_tasks_rules() -> None:
    from bonescreen.screen.decide import DecisionPolicy, ModelOutputs, decide, decide_outputs, decide_pediatric

    probs = np.array([[0.3, 0.7], [0.55, 0.45]])
    for mode in ("stage2", "stage1"):
        assert decide(mode, probs, threshold=0.6) == get_task(mode).decide_probabilities(probs, threshold=0.6)
    with pytest.raises(ValueError, match="unknown mode 'stage9'"):
        decide("stage9", probs)
    policy = DecisionPolicy(mode="stage2", threshold=0.6, ood="off")
    rows = decide_outputs(policy, ModelOutputs(probs_main=probs))
    assert [(r["category"], r["ood_check"]) for r in rows] == [("low_bone_mass", "off"), ("normal", "off")]
    preds = pd.DataFrame({"pred_z": [-2.5, -1.0, np.nan], "pred_bmd": [0.5, 0.7, np.nan],
                          "prob_low_bmd": [0.73, 0.11, np.nan], "low_bmd": [True, False, pd.NA],
                          "reason": ["", "", "missing_clinical:height_cm"]})
    ped = get_task("pediatric")
    assert decide_pediatric(preds) == ped.decide_predictions(preds)
    rows = decide_outputs(DecisionPolicy(mode="pediatric", threshold=0.1, pediatric_own_rule=False, ood="off"),
                          ModelOutputs(pediatric=preds))
    assert [(r.get("eligible", True), r["category"], r["flag"]) for r in rows] == [
        (True, "low_bmd", True), (True, "low_bmd", True), (False, None, None)]
    assert rows[2]["message"] == "the pediatric model needs height_cm"


def test_sr_results_carry_each_tasks_thresholds() -> None:
    run = {"model": "m.pt@abc", "model_stage1": "s1.pt@def", "threshold": 0.4, "threshold_stage1": 0.7,
           "z_threshold": -2.0, "arch": ARCH}
    row = {"category": "low_bone_mass", "score": 0.6, "score_stage2": 0.6, "score_stage1": 0.1, "reason": ""}
    res = get_task("stage2").sr_result(row, run, cascade=True)
    assert (res.task, res.thresholds) == ("cascade", {"stage2": 0.4, "stage1": 0.7})
    assert res.scores == {"score_stage2": 0.6, "score_stage1": 0.1}
    assert get_task("stage1").sr_result(row, run).thresholds == {"stage1": 0.4}
    assert get_task("three_class").sr_result(row, run).thresholds == {}
    kid = {"category": "low_bmd", "score": 0.8, "pred_z": -2.4, "pred_bmd": 0.5, "reason": "ood_borderline"}
    res = get_task("pediatric").sr_result(kid, run)
    assert (res.task, res.thresholds, res.ood_review) == ("pediatric", {"probability": 0.4, "z": -2.0}, True)
    assert res.scores == {"prob_low_bmd": 0.8, "pred_z": -2.4, "pred_bmd": 0.5}


# --------------------------------------------------------------------------- training factories


def test_dataset_and_loss_factories() -> None:
    import torch.nn.functional as F

    from bonescreen.data import ImageSource, ManifestDataset
    from bonescreen.pediatric.data import PediatricDataset, regression_loss
    from bonescreen.pediatric.model import Standardizer

    src = ImageSource([f"i{i}" for i in range(4)], SIZE, array=np.full((4, SIZE, SIZE), 100, np.uint8))
    ds = get_task("stage2").dataset(src, [0, 1, 0, 1], seed=3)
    assert isinstance(ds, ManifestDataset) and len(ds) == 4 and int(ds[1]["label"]) == 1
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.25]])
    batch = {"label": torch.tensor([1, 0])}
    loss = get_task("three_class").loss(label_smoothing=0.1)(lambda x: x, logits, batch)
    assert float(loss) == pytest.approx(float(F.cross_entropy(logits, batch["label"], label_smoothing=0.1)))
    clinical = np.array([[8.0, 1, 130, 25], [12, 0, 150, 40], [10, 1, 140, 33], [15, 0, 165, 52]])
    targets = np.array([[-1.0, 0.6], [0.5, np.nan], [-2.5, 0.5], [0.0, 0.7]])
    st = Standardizer.fit(clinical, targets)
    ped = get_task("pediatric").dataset(src, [0, 0, 1, 0], clinical_raw=clinical, targets_raw=targets, standardizer=st)
    assert isinstance(ped, PediatricDataset) and ped[1]["target_mask"].tolist() == [1.0, 0.0]

    def fake(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(x), 2)

    pb = {"clinical": torch.zeros(2, 4), "target": torch.tensor([[1.0, 2.0], [3.0, 0.0]]),
          "target_mask": torch.tensor([[1.0, 1.0], [1.0, 0.0]])}
    x = torch.zeros(2, 1, 4, 4)
    assert float(get_task("pediatric").loss(bmd_weight=0.25)(fake, x, pb)) == pytest.approx(
        float(regression_loss(0.25)(fake, x, pb)))


# --------------------------------------------------------------------------- artifacts


def _model_and_spec(task: str) -> tuple[torch.nn.Module, Any]:
    from bonescreen.artifact import ModelSpec
    from bonescreen.models import GRAY_MEAN, GRAY_STD

    torch.manual_seed(7)
    prep = {"method": "truncation", "size": SIZE, "mean": GRAY_MEAN, "std": GRAY_STD}
    t = get_task(task)
    spec = ModelSpec.for_task(ARCH, task, preprocess=prep, eligibility=t.default_eligibility(),
                              extra=dict(PEDIATRIC_EXTRA) if t.needs_clinical else {})
    return t.build_model(spec), spec


def _legacy_payload(model: torch.nn.Module, spec: Any) -> dict[str, Any]:
    """An artifact dict written field by field, as the code before the task registry wrote it."""
    return {
        "format": "bonescreen-model", "format_version": 3, "bonescreen_version": __version__,
        "arch": spec.arch, "task": spec.task, "num_classes": spec.num_classes, "in_chans": 1,
        "class_names": list(spec.class_names), "positive_class": 1, "preprocess": dict(spec.preprocess),
        "threshold": 0.5, "eligibility": dict(spec.eligibility), "model_card": {}, "extra": dict(spec.extra),
        "ood": None, "site_profiles": {},
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }


@pytest.mark.parametrize("task", ["stage2", "stage1", "three_class", "pediatric"])
def test_artifact_round_trip_per_task(task: str, tmp_path: Path) -> None:
    from bonescreen.artifact import load_artifact, save_artifact

    model, spec = _model_and_spec(task)
    legacy = tmp_path / "legacy.pt"
    torch.save(_legacy_payload(model, spec), legacy)
    new = save_artifact(tmp_path / "new.pt", model, spec)
    # the file format is unchanged: the same fields and values as before the registry
    a = torch.load(legacy, weights_only=True)
    b = torch.load(new, weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        if k == "state_dict":
            assert all(torch.equal(a[k][n], b[k][n]) for n in a[k])
        else:
            assert a[k] == b[k], k
    images = np.random.default_rng(0).integers(0, 256, (2, SIZE, SIZE), dtype=np.uint8)
    old, cur = load_artifact(legacy, expected_task=task), load_artifact(new)
    assert old.spec == cur.spec and old.task is get_task(task) and old.fingerprint == cur.fingerprint
    p_old, f_old = old.predict_with_features(images)
    p_cur, f_cur = cur.predict_with_features(images)
    assert np.array_equal(f_old, f_cur)
    explainer = cur.task.explainer(cur)
    if get_task(task).has_logits:
        assert p_old is not None and p_cur is not None and np.array_equal(p_old, p_cur)
        assert p_cur.shape == (2, len(spec.class_names))
        assert cur.scoring_module() is not None
        assert type(explainer).__name__ == "Explainer"
    else:
        assert p_old is None and p_cur is None
        with pytest.raises(ModelArtifactError, match="no single-input scoring graph"):
            cur.scoring_module()
        clinical = np.array([[10.0, 1.0, 140.0, 33.0], [14.0, 0.0, 160.0, 50.0]])
        r_old, r_cur = old.predict_pediatric(images, clinical), cur.predict_pediatric(images, clinical)
        assert all(np.array_equal(r_old[k], r_cur[k]) for k in ("z", "bmd", "prob_low_bmd"))
        assert type(explainer).__name__ == "PediatricExplainer"
    if task != "pediatric":
        with pytest.raises(ModelArtifactError, match="predict_pediatric needs a pediatric model"):
            cur.predict_pediatric(images, np.zeros((2, 4)))


def test_an_artifact_of_an_unknown_task_is_refused(tmp_path: Path) -> None:
    from bonescreen.artifact import load_artifact

    model, spec = _model_and_spec("stage2")
    payload = _legacy_payload(model, spec)
    payload["task"] = "stage9"
    torch.save(payload, tmp_path / "x.pt")
    with pytest.raises(UnknownTaskError, match="unknown task 'stage9'"):
        load_artifact(tmp_path / "x.pt")


def test_validation_table_columns_per_classifier_task() -> None:
    """training's predictions.csv asks the task: P(positive) for binary tasks, 1 - P(normal) + the distribution for three_class."""
    import numpy as np

    from bonescreen.tasks import get_task

    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    y = np.array([0.0, 2.0])
    cols = get_task("three_class").validation_columns(probs, y)
    np.testing.assert_allclose(cols["score"], [0.3, 0.9])
    np.testing.assert_array_equal(cols["label"], [0.0, 1.0])
    np.testing.assert_array_equal(cols["label_3class"], y)
    assert [k for k in cols if k.startswith("prob_")] == ["prob_normal", "prob_low_bone_mass", "prob_osteoporosis"]
    binary = get_task("stage1").validation_columns(probs[:, :2], np.array([1.0, 0.0]))
    assert set(binary) == {"score", "label"} and binary["score"].tolist() == [0.2, 0.3]
