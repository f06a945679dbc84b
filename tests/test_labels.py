import math

import pandas as pd
import pytest

from bonescreen.labels import (
    add_labels,
    lowest_t,
    normalize_category,
    pediatric_low_bmd,
    severity,
    stage1_label,
    stage2_label,
    three_class_label,
    who_category,
)


@pytest.mark.parametrize(
    "t, category, grade",
    [
        (0.5, "normal", "normal"),
        (-1.0, "normal", "normal"),  # T >= -1.0 is normal
        (-1.0000000001, "normal", "normal"),  # float noise stays on the reported boundary
        (-1.01, "low_bone_mass", "mild"),
        (-1.49, "low_bone_mass", "mild"),
        (-1.5, "low_bone_mass", "moderate"),  # moderate is -2.0 < T <= -1.5
        (-1.99, "low_bone_mass", "moderate"),
        (-2.0, "low_bone_mass", "advanced"),  # advanced is -2.5 < T <= -2.0
        (-2.49, "low_bone_mass", "advanced"),
        (-2.5, "osteoporosis", "osteoporosis"),  # T <= -2.5
        (-4.0, "osteoporosis", "osteoporosis"),
    ],
)
def test_who_boundaries(t, category, grade):
    assert who_category(t) == category
    assert severity(t) == grade


def test_missing_t_gives_none():
    assert who_category(math.nan) is None
    assert severity(float("nan")) is None
    assert math.isnan(lowest_t([None, math.nan]))


def test_lowest_of_three_sites():
    assert lowest_t([-0.5, -2.6, 0.1]) == -2.6
    assert lowest_t([None, -1.2, math.nan]) == -1.2


def test_stage_labels():
    assert [stage1_label(c) for c in ("normal", "low_bone_mass", "osteoporosis")] == [0, 0, 1]
    assert [stage2_label(c) for c in ("normal", "low_bone_mass", "osteoporosis")] == [0, 1, None]
    assert [three_class_label(c) for c in ("normal", "low_bone_mass", "osteoporosis")] == [0, 1, 2]
    assert stage2_label(None) is None


def test_category_aliases_and_unknown():
    assert normalize_category(" Osteopenia ") == "low_bone_mass"
    assert normalize_category("NORMAL") == "normal"
    assert normalize_category("") is None
    with pytest.raises(ValueError, match="unknown category"):
        normalize_category("nromal")


def test_pediatric_threshold():
    assert pediatric_low_bmd(-2.0) is True
    assert pediatric_low_bmd(-1.99) is False
    assert pediatric_low_bmd(float("nan")) is None


def test_add_labels_mixes_t_scores_and_institutional_category():
    df = pd.DataFrame(
        {
            "t_lumbar_spine": [-0.2, -1.6, float("nan"), float("nan")],
            "t_femoral_neck": [-1.1, -0.4, float("nan"), float("nan")],
            "t_total_hip": [0.0, -3.0, float("nan"), float("nan")],
            "category": [None, None, "low_bone_mass", "normal"],
        }
    )
    out = add_labels(df)
    assert list(out["category"]) == ["low_bone_mass", "osteoporosis", "low_bone_mass", "normal"]
    assert list(out["severity"])[:2] == ["mild", "osteoporosis"]
    assert pd.isna(out["severity"].iloc[2])  # category-only rows have no severity
    assert list(out["label"].astype("float").fillna(-1)) == [1, -1, 1, 0]
    assert list(out["label_stage1"]) == [0, 1, 0, 0]


@pytest.mark.parametrize(
    "value, sex",
    [("F", "F"), (" female ", "F"), ("Woman", "F"), ("M", "M"), ("MALE", "M"), ("O", "O"),
     ("1", "M"), ("2", "F"), ("x", None), ("", None), (None, None), (float("nan"), None)],
)
def test_one_sex_vocabulary_for_dicom_dxa_and_predictions(value, sex):
    from bonescreen.labels import normalize_sex

    assert normalize_sex(value) == sex
