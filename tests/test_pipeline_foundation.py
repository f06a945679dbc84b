"""Phantom -> cohort -> preprocess on real DICOM files: pairing checked against the phantom's truth."""

import json

import numpy as np
import pandas as pd
import pytest

from bonescreen.cli import main
from bonescreen.phantom import generate_phantom


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom")
    generate_phantom(root, n_per_site=40, pool_size=8, size=96, seed=3, progress=False)
    return root


@pytest.fixture(scope="module")
def cohort(phantom, tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort")
    assert main(["cohort", str(out), "--phantom", str(phantom), "--site-window", "EXT_B=180"]) == 0
    return out


def test_every_pair_is_the_right_patient_and_the_closest_frontal(phantom, cohort):
    m = pd.read_csv(cohort / "manifest.csv", dtype={"patient_id": str})
    truth = pd.read_csv(phantom / "truth_images.csv")
    truth["abs_path"] = [str((phantom / p).resolve()) for p in truth["path"]]
    t = truth.set_index("abs_path")
    assert len(m) > 60
    for row in m.itertuples():
        img = t.loc[str(pd.io.common.stringify_path(row.path))]
        assert img["patient_id"] == row.patient_id  # never the wrong patient
        assert img["view"] in ("PA", "AP")
        assert abs(img["days_from_dxa"]) == row.days_apart
        assert row.days_apart <= (180 if row.site == "EXT_B" else 90)
        frontal = truth[(truth.patient_id == row.patient_id) & truth.view.isin(["PA", "AP"])]
        assert row.days_apart == frontal["days_from_dxa"].abs().min()  # the closest frontal wins


def test_labels_flow_from_dxa_to_manifest(phantom, cohort):
    m = pd.read_csv(cohort / "manifest.csv", dtype={"patient_id": str})
    truth = pd.read_csv(phantom / "truth.csv", dtype={"patient_id": str})
    joined = m.merge(truth[["patient_id", "category"]], on="patient_id", suffixes=("", "_truth"))
    assert len(joined) == len(m)
    assert (joined["category"] == joined["category_truth"]).all()
    cat_only = m[m.site == "EXT_C"]
    assert len(cat_only) and cat_only["t_min"].isna().all() and cat_only["severity"].isna().all()
    assert set(m[m.site == "DEV"]["split"]) == {"train", "tune", "test"}
    assert set(m[m.site != "DEV"]["split"]) == {"test"}
    raw = pd.read_csv(cohort / "manifest.csv", dtype=str, keep_default_na=False)
    assert set(raw["label"]) <= {"0", "1", ""} and set(raw["label_3class"]) <= {"0", "1", "2"}


def test_injected_dxa_defects_are_excluded_with_reasons(phantom, cohort):
    defects = json.loads((phantom / "phantom.json").read_text())["defects"]
    excl = pd.read_csv(cohort / "exclusions.csv", dtype={"patient_id": str})
    m = pd.read_csv(cohort / "manifest.csv", dtype={"patient_id": str})
    expected = {
        "t_score_text": "non_numeric_t_score",
        "impossible_t_score": "implausible_t_score",
        "duplicate_row": "duplicate_row",
        "dxa_without_cxr": "no_cxr_for_patient",
    }
    for d in defects:
        reasons = set(excl[excl.patient_id == d["patient_id"]]["reason"])
        if d["defect"] in expected:
            assert expected[d["defect"]] in reasons, d
        if d["defect"] == "cxr_without_dxa":
            assert d["patient_id"] not in set(m.patient_id)
    flow = json.loads((cohort / "flow.json").read_text())["steps"]
    from bonescreen.evaluate.tables import flow_inconsistencies, read_flow

    assert flow_inconsistencies(read_flow(cohort / "flow.json")) == []  # Figure 1 adds up
    total = flow[0]["remaining"]
    # every DXA row is either in the manifest or excluded exactly once
    assert len(m) + len(excl) == total


def test_preprocess_the_cohort_and_resume(cohort, tmp_path):
    cache = tmp_path / "cache"
    args = ["preprocess", "--manifest", str(cohort / "manifest.csv"), "--cache", str(cache),
            "--size", "64", "--workers", "1", "--no-progress"]
    assert main(args) == 0
    pngs = list(cache.rglob("*.png"))
    m = pd.read_csv(cohort / "manifest.csv")
    assert len(pngs) == len(m)
    mtimes = {p: p.stat().st_mtime_ns for p in pngs}
    assert main(args) == 0  # second run: everything cached, nothing rewritten
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())
    from bonescreen.preprocess import PreprocessCache

    img = PreprocessCache(cache, 64).get(m.iloc[0]["path"])
    assert img.shape == (64, 64) and img.dtype == np.uint8 and img.max() == 255 and img.min() == 0
