"""Cohort builder: DXA validation, pairing windows, exclusions, leakage-free splits."""

from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bonescreen.cohort import (
    CohortConfig,
    DateError,
    SiteInput,
    assign_splits,
    build_cohort,
    parse_date,
    read_dxa,
)
from bonescreen.errors import TableError


def images_table(rows):
    """The frame scan_images would return, without touching files."""
    base = {
        "error": None, "message": None, "image_age": np.nan, "image_sex": None,
        "view": "PA", "lateral": False, "modality": "DX", "manufacturer": "X",
    }
    out = []
    for i, r in enumerate(rows):
        rec = {**base, "path": f"/img/{i}.dcm", "image_id": f"uid{i}", **r}
        rec["study_date"] = parse_date(rec["study_date"])
        out.append(rec)
    return pd.DataFrame(out)


def dxa_frame(rows):
    cols = ["patient_id", "exam_date", "sex", "age", "t_lumbar_spine", "t_femoral_neck", "t_total_hip"]
    return pd.DataFrame([dict(zip(cols, r)) for r in rows], columns=cols)


def build(dxa, imgs, **cfg):
    site = SiteInput("S", [], dxa, role=cfg.pop("role", "development"))
    return build_cohort([site], CohortConfig(**cfg), image_table=lambda _: imgs, progress=False)


# ------------------------------------------------------------------ dates
@pytest.mark.parametrize(
    "text, expected",
    [("2021-03-15", date(2021, 3, 15)), ("20210315", date(2021, 3, 15)), ("03/15/2021", date(2021, 3, 15)),
     ("15/03/2021", date(2021, 3, 15)), ("15.03.2021", date(2021, 3, 15))],
)
def test_parse_date_unambiguous(text, expected):
    assert parse_date(text) == expected


def test_parse_date_refuses_ambiguous_and_garbage():
    with pytest.raises(DateError) as e:
        parse_date("03/04/2021")
    assert e.value.reason == "ambiguous_date"
    assert parse_date("03/04/2021", "%d/%m/%Y") == date(2021, 4, 3)
    with pytest.raises(DateError) as e:
        parse_date("last tuesday")
    assert e.value.reason == "bad_date"
    with pytest.raises(DateError):
        parse_date("2021-02-30")


# ------------------------------------------------------------------ DXA validation
def test_read_dxa_refuses_bad_rows_with_reasons(tmp_path):
    csv = tmp_path / "dxa.csv"
    csv.write_text(
        "patient_id,exam_date,sex,age,t_lumbar_spine,t_femoral_neck,t_total_hip\n"
        "007,2021-01-10,F,61,-1.2,-0.8,-0.5\n"   # ok, leading zero kept
        "007,2021-01-10,F,61,-1.2,-0.8,-0.5\n"   # exact duplicate
        "P2,2021-01-11,M,70,abc,-0.8,-0.5\n"     # text T-score
        "P3,2021-01-12,M,70,+15,-0.8,-0.5\n"     # impossible T-score
        "P4,yesterday,F,55,-1,-1,-1\n"           # bad date
        "P5,2021-01-12,F,55,,,\n"                # no label
        "P6,2021-01-13,F,55,-1,-1,-1\n"
        "P6,2021-01-13,F,55,-2,-1,-1\n"          # conflicting duplicate
        "P7,2021-01-13,F,355,-1,-1,-1\n"         # impossible age
        ",2021-01-13,F,55,-1,-1,-1\n"            # no patient id
    )
    t = read_dxa(csv, site="S")
    assert t.n_rows == 10
    assert list(t.exams["patient_id"]) == ["007"]
    reasons = sorted(t.rejected["reason"])
    assert reasons == sorted(
        ["duplicate_row", "non_numeric_t_score", "implausible_t_score", "bad_date", "no_label",
         "conflicting_duplicate", "conflicting_duplicate", "implausible_age", "missing_patient_id"]
    )
    assert t.exams["category"].iloc[0] == "low_bone_mass"
    assert t.exams["severity"].iloc[0] == "mild"


def test_read_dxa_column_mapping_and_missing_columns(tmp_path):
    csv = tmp_path / "export.csv"
    csv.write_text("PatID,ScanDate,Gender,Age,L1-L4 T,Neck T,Hip T\nA1,2020-05-01,Female,58,-1.7,-1.0,-0.9\n")
    with pytest.raises(TableError, match="patient_id"):
        read_dxa(csv)
    t = read_dxa(
        csv,
        column_map={"PatID": "patient_id", "ScanDate": "exam_date", "Gender": "sex", "Age": "age",
                    "L1-L4 T": "t_lumbar_spine", "Neck T": "t_femoral_neck", "Hip T": "t_total_hip"},
    )
    assert t.exams.iloc[0][["sex", "category", "severity"]].tolist() == ["F", "low_bone_mass", "moderate"]
    with pytest.raises(TableError, match="not in the table"):
        read_dxa(csv, column_map={"Nope": "patient_id"})


def test_category_only_site(tmp_path):
    csv = tmp_path / "dxa.csv"
    csv.write_text("patient_id,exam_date,sex,age,category\nA,2020-01-01,F,70,Osteopenia\nB,2020-01-01,M,71,wat\n")
    t = read_dxa(csv)
    assert list(t.exams["category"]) == ["low_bone_mass"]
    assert pd.isna(t.exams["severity"].iloc[0])
    assert list(t.rejected["reason"]) == ["unknown_category"]


# ------------------------------------------------------------------ pairing
def test_pairing_window_closest_frontal_wins():
    dxa = dxa_frame([("A", "2021-06-01", "F", 60, -1.2, -1, -1)])
    imgs = images_table([
        {"patient_id": "A", "study_date": "2021-03-01"},               # 92 days: outside 90
        {"patient_id": "A", "study_date": "2021-05-01"},               # 31 days
        {"patient_id": "A", "study_date": "2021-06-02", "view": "LL", "lateral": True},  # closest but lateral
        {"patient_id": "A", "study_date": "2021-05-20", "modality": "CT"},  # wrong modality
    ])
    m = build(dxa, imgs).manifest
    assert len(m) == 1
    assert m.iloc[0]["path"] == "/img/1.dcm" and m.iloc[0]["days_apart"] == 31


@pytest.mark.parametrize("window, n", [(0, 0), (30, 0), (31, 1), (90, 1), (180, 1)])
def test_pairing_window_edges(window, n):
    dxa = dxa_frame([("A", "2021-06-01", "F", 60, -1.2, -1, -1)])
    imgs = images_table([{"patient_id": "A", "study_date": "2021-05-01"}])
    r = build(dxa, imgs, window_days=window)
    assert len(r.manifest) == n
    if n == 0:
        assert list(r.exclusions["reason"]) == ["no_cxr_within_window"]


def test_same_day_window():
    dxa = dxa_frame([("A", "2021-06-01", "F", 60, -1.2, -1, -1)])
    imgs = images_table([{"patient_id": "A", "study_date": "2021-06-01"}])
    assert len(build(dxa, imgs, window_days=0).manifest) == 1


def test_exclusion_reasons_and_flow():
    dxa = dxa_frame([
        ("A", "2021-06-01", "F", 60, -1.2, -1, -1),   # ok
        ("B", "2021-06-01", "F", 60, -1.2, -1, -1),   # no CXR at all
        ("C", "2021-06-01", "F", 60, -1.2, -1, -1),   # only lateral in window
        ("D", "2021-06-01", "M", 60, -1.2, -1, -1),   # sex mismatch with DICOM
        ("E", "2021-06-01", "F", 40, -1.2, -1, -1),   # too young
        ("F", "2021-06-01", "F", 60, -3.0, -1, -1),   # osteoporosis
        ("G", "2021-06-01", "F", 60, -0.2, 0, 0),     # age mismatch with DICOM (wrong patient?)
    ])
    imgs = images_table([
        {"patient_id": "A", "study_date": "2021-06-01"},
        {"patient_id": "C", "study_date": "2021-06-01", "view": "LAT", "lateral": True},
        {"patient_id": "D", "study_date": "2021-06-01", "image_sex": "F"},
        {"patient_id": "E", "study_date": "2021-06-01"},
        {"patient_id": "F", "study_date": "2021-06-01"},
        {"patient_id": "G", "study_date": "2021-06-01", "image_age": 75.0},
        {"patient_id": "Z", "study_date": "2021-06-01"},  # CXR without DXA: never paired
    ])
    r = build(dxa, imgs, exclude_osteoporosis=True)
    assert list(r.manifest["patient_id"]) == ["A"]
    reasons = dict(zip(r.exclusions["patient_id"], r.exclusions["reason"]))
    assert reasons == {
        "B": "no_cxr_for_patient", "C": "only_non_frontal_views", "D": "sex_mismatch",
        "E": "age_out_of_range", "F": "osteoporosis", "G": "age_mismatch",
    }
    steps = {s["step"]: s for s in r.flow}
    assert steps["dxa_exams_in_export"]["remaining"] == 7
    assert steps["paired_with_frontal_cxr"]["remaining"] == 3  # A, E, F
    assert steps["osteoporosis_excluded"]["reasons"] == {"osteoporosis": 1}
    # Every DXA row is accounted for: one manifest row or one exclusion.
    assert len(r.manifest) + len(r.exclusions) == 7


def test_one_image_is_paired_once():
    dxa = dxa_frame([("A", "2021-06-01", "F", 60, -1.2, -1, -1), ("A", "2021-07-01", "F", 60, -1.3, -1, -1)])
    imgs = images_table([{"patient_id": "A", "study_date": "2021-06-05"}])
    r = build(dxa, imgs)
    assert len(r.manifest) == 1 and r.manifest.iloc[0]["dxa_date"] == "2021-06-01"
    assert list(r.exclusions["reason"]) == ["image_already_paired"]


def test_quality_flags_exclude():
    dxa = dxa_frame([("A", "2021-06-01", "F", 60, -1.2, -1, -1), ("B", "2021-06-01", "F", 60, -0.2, 0, 0)])
    imgs = images_table([{"patient_id": "A", "study_date": "2021-06-01"}, {"patient_id": "B", "study_date": "2021-06-01"}])
    site = SiteInput("S", [], dxa)
    r = build_cohort([site], CohortConfig(), image_table=lambda _: imgs, progress=False,
                     quality_flags=pd.DataFrame({"image_id": ["uid1"], "flag": ["motion"]}))
    assert list(r.manifest["patient_id"]) == ["A"]
    assert list(r.exclusions["reason"]) == ["quality:motion"]


# ------------------------------------------------------------------ splits
def test_splits_are_patient_level_stratified_and_seeded():
    rng = np.random.default_rng(1)
    pids = [f"P{i:03d}" for i in range(300)]
    rows = []
    for p in pids:
        lab = int(rng.integers(0, 3))
        for _ in range(int(rng.integers(1, 4))):  # several images per patient
            rows.append({"patient_id": p, "label_3class": lab})
    df = pd.DataFrame(rows)
    s1 = assign_splits(df, (0.7, 0.1, 0.2), seed=3)
    s2 = assign_splits(df, (0.7, 0.1, 0.2), seed=3)
    assert (s1 == s2).all()
    assert not (s1 == assign_splits(df, (0.7, 0.1, 0.2), seed=4)).all()
    per_patient = df.assign(split=s1).groupby("patient_id")["split"].nunique()
    assert (per_patient == 1).all()  # no patient in two splits
    frac = df.assign(split=s1).drop_duplicates("patient_id")["split"].value_counts(normalize=True)
    assert abs(frac["train"] - 0.7) < 0.02 and abs(frac["tune"] - 0.1) < 0.02
    # stratified: each class is split roughly 70/10/20
    by_class = df.assign(split=s1).drop_duplicates("patient_id").groupby("label_3class")["split"].value_counts(normalize=True)
    assert all(abs(by_class[(c, "train")] - 0.7) < 0.03 for c in range(3))


def test_external_site_all_test_and_unique_names():
    dxa = dxa_frame([("A", "2021-06-01", "F", 60, -1.2, -1, -1)])
    imgs = images_table([{"patient_id": "A", "study_date": "2021-06-01"}])
    assert list(build(dxa, imgs, role="external").manifest["split"]) == ["test"]
    with pytest.raises(TableError, match="unique"):
        build_cohort([SiteInput("S", [], dxa), SiteInput("S", [], dxa)], image_table=lambda _: imgs)


# --- DXA export presets (--columns lunar|hologic|osteosys|generic) ------------------------


def _export(preset: str) -> pd.DataFrame:
    """A small export under the preset's first header name for each column, the way workstations write it."""
    from bonescreen.cohort import load_preset

    names = {ours: cands[0] for ours, cands in load_preset(preset)["columns"].items()}
    rows = [
        # patient, exam (US), birth (US), sex, height, weight, spine BMD, spine T, neck T, hip T
        ["007", "03/15/2021", "06/01/1950", "Female", "158,5", "61,2", "0,801", "-2,6", "-1,9", "-1,2"],
        ["008", "11/02/2020", "01/20/1948", "Male", "171", "80", "1.010", "-0.4", "-1.1", "-0.8"],
        ["008", "11/02/2020", "01/20/1948", "Male", "171", "80", "1.010", "-0.4", "-1.1", "-0.8"],  # duplicate
        ["009", "01/05/2021", "02/02/1952", "F", "", "", "", "", "", ""],  # blanks: no label
    ]
    cols = ["patient_id", "exam_date", "birth_date", "sex", "height_cm", "weight_kg", "bmd_lumbar_spine",
            "t_lumbar_spine", "t_femoral_neck", "t_total_hip"]
    df = pd.DataFrame(rows, columns=cols)
    return df.rename(columns={c: names.get(c, c) for c in cols})


@pytest.mark.parametrize("preset", ["lunar", "hologic", "osteosys", "generic"])
def test_dxa_presets_map_a_workstation_export(preset: str, tmp_path: Path) -> None:
    from bonescreen.cohort import load_column_map, load_preset

    df = _export(preset)
    if preset != "generic":
        assert "patient_id" not in df.columns  # their names, not ours
    path = tmp_path / "export.csv"
    df.to_csv(path, index=False)
    table = read_dxa(path, site="S", column_map=load_column_map(preset), date_format="%m/%d/%Y")
    ex = table.exams.set_index("patient_id")
    assert sorted(ex.index) == ["007", "008"]  # leading zeros kept
    assert ex.loc["007", "dxa_date"] == date(2021, 3, 15)
    assert ex.loc["007", "age"] == pytest.approx((date(2021, 3, 15) - date(1950, 6, 1)).days / 365.25)
    assert ex.loc["007", "t_lumbar_spine"] == -2.6 and ex.loc["007", "height_cm"] == 158.5  # decimal commas
    assert ex.loc["007", "bmd_lumbar_spine"] == pytest.approx(0.801)
    assert ex.loc["007", "sex"] == "F" and ex.loc["007", "category"] == "osteoporosis"
    assert ex.loc["008", "category"] == "low_bone_mass"
    assert sorted(table.rejected["reason"]) == ["duplicate_row", "no_label"]
    assert load_preset(preset)["description"]


def test_preset_matching_ignores_case_and_spacing_and_takes_overrides(tmp_path: Path) -> None:
    from bonescreen.cohort import load_column_map

    df = _export("lunar").rename(columns={"Patient ID": "PATIENT  id", "Measure Date": "Exam Date"})
    df["Ht"] = df.pop("Height")
    path = tmp_path / "lunar.csv"
    df.to_csv(path, index=False)
    cmap = load_column_map("lunar,Ht=height_cm")
    table = read_dxa(path, column_map=cmap, date_format="%m/%d/%Y")
    ex = table.exams.set_index("patient_id")
    assert ex.loc["007", "height_cm"] == 158.5 and ex.loc["007", "dxa_date"] == date(2021, 3, 15)
    with pytest.raises(TableError, match="unknown DXA export preset|THEIR=OURS"):
        load_column_map("encore")
    with pytest.raises(TableError, match="not in the table"):
        read_dxa(path, column_map=load_column_map("lunar,Nope=height_cm"), date_format="%m/%d/%Y")


def test_hologic_preset_prefers_the_mrn_over_the_internal_key(tmp_path: Path) -> None:
    from bonescreen.cohort import load_column_map

    df = pd.DataFrame({"PATIENT_KEY": ["K1"], "IDENTIFIER1": ["MRN1"], "SCAN_DATE": ["2021-03-15"],
                       "SEX": ["F"], "AGE": ["70"], "TOT_T": ["-1.5"], "NECK_T": ["-2.0"], "HTOT_T": ["-1.0"]})
    path = tmp_path / "apex.csv"
    df.to_csv(path, index=False)
    table = read_dxa(path, column_map=load_column_map("hologic"))
    assert table.exams["patient_id"].tolist() == ["MRN1"]
    assert table.exams["severity"].tolist() == ["advanced"]


def test_pediatric_population_ignores_t_scores_and_refuses_bad_body_size() -> None:
    df = pd.DataFrame({
        "patient_id": ["a", "b", "c", "d", "e"], "exam_date": ["2020-01-01"] * 5, "sex": ["F", "M", "F", "M", "F"],
        "birth_date": ["2010-01-01", "2008-06-01", "2012-01-01", "2009-01-01", "2011-01-01"],
        "z_lumbar_spine": ["-2.3", "0.1", "abc", "-1.0", "9.5"], "z_total_body_less_head": ["-2.0", "", "", "", ""],
        "t_lumbar_spine": ["-4.0", "-2.0", "-3.0", "-3.0", "-3.0"],
        "height_cm": ["120", "150", "140", "1.45", "130"], "weight_kg": ["22", "40", "35", "38", "30"],
    })
    table = read_dxa(df, site="S", population="pediatric")
    ex = table.exams.set_index("patient_id")
    assert sorted(ex.index) == ["a", "b"]
    assert ex.loc["a", "age"] == pytest.approx(10.0, abs=0.01)
    assert "t_lumbar_spine" not in ex.columns and ex["category"].isna().all()
    assert ex.loc["a", "z_total_body_less_head"] == -2.0
    assert sorted(table.rejected["reason"]) == ["implausible_height", "implausible_z_score", "non_numeric_z_score"]
    # adults keep the row and blank the implausible height (not a model input there)
    adult = read_dxa(df.assign(t_lumbar_spine="-1.2", z_lumbar_spine="0"), site="S")
    assert np.isnan(adult.exams.set_index("patient_id").loc["d", "height_cm"])


def test_pediatric_splits_are_by_child_and_stratified_by_low_bmd() -> None:
    from bonescreen.cohort import assign_splits

    rng = np.random.default_rng(0)
    kids = [f"k{i}" for i in range(200) for _ in range(1 + i % 3)]  # 1-3 images per child
    z = {k: (-3.0 if int(k[1:]) % 4 == 0 else 0.0) for k in set(kids)}
    df = pd.DataFrame({"patient_id": kids, "z_lumbar_spine": [z[k] + rng.normal(0, 0.05) for k in kids],
                       "label_3class": pd.array([None] * len(kids), dtype="Int64")})
    split = assign_splits(df, (0.7, 0.1, 0.2), seed=0)
    assert (df.assign(s=split).groupby("patient_id")["s"].nunique() == 1).all()
    low = df.assign(s=split).groupby("patient_id").agg(s=("s", "first"), low=("z_lumbar_spine", "min"))
    share = low.assign(low=low["low"] <= -2).groupby("s")["low"].mean()
    assert share.between(0.2, 0.3).all()  # a quarter of the children have low BMD in every split
