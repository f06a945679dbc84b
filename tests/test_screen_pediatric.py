"""Pediatric models in `screen`, `explain`, the DICOM SR and the service worker.

A tiny random-weight fusion model (resnet10t at 64 px) whose Z offset is set so
that the synthetic children fall on both sides of Z = -2.0; every expected
number is recomputed here from the model itself (``predict_pediatric``), so the
tests check the plumbing (which height/weight reached the model, which row got
which prediction), not hard-coded outputs.
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pydicom
import pytest
from _screen_helpers import make_artifact, radiograph

from bonescreen.errors import ModelArtifactError

ARCH = "resnet10t"
SIZE = 64
# name -> (age, sex, PatientSize m, PatientWeight kg, PatientID); None = tag absent
KIDS: dict[str, tuple[str, str, float | None, float | None, str]] = {
    "k0.dcm": ("006Y", "F", 1.18, 21.0, "K0"),
    "k1.dcm": ("009Y", "M", 1.31, 27.5, "K1"),
    "k2.dcm": ("012Y", "F", 1.49, 40.0, "K2"),
    "k3.dcm": ("015Y", "M", 1.70, 58.0, "K3"),
    "k4.dcm": ("017Y", "F", 1.62, 50.0, "K4"),
    "noweight.dcm": ("010Y", "M", 1.38, None, "NOW"),
    "fromcsv.dcm": ("013Y", "F", None, None, "CSV1"),
    "adult.dcm": ("045Y", "F", 1.70, 70.0, "ADULT"),
}
EXPECTED_HW = {"k0.dcm": (118.0, 21.0), "k1.dcm": (131.0, 27.5), "k2.dcm": (149.0, 40.0),
               "k3.dcm": (170.0, 58.0), "k4.dcm": (162.0, 50.0), "fromcsv.dcm": (152.0, 43.0)}
EXTRA = {
    "clinical_features": ["age", "sex", "height_cm", "weight_kg"], "hidden": 16, "z_threshold": -2.0,
    "residual_sd_z": 0.8, "clinical_mean": [10.0, 0.5, 140.0, 35.0], "clinical_std": [4.0, 0.5, 25.0, 12.0],
    "target_mean": [0.0, 0.6], "target_std": [40.0, 0.15],
}


def _write_kid(folder: Path, name: str, seed: int, **overrides: Any) -> Path:
    from conftest import build_dicom

    age, sex, size_m, weight, pid = KIDS[name]
    tags: dict[str, Any] = {"PatientAge": age, "PatientSex": sex, "PatientID": pid, "PatientName": "Kid^Secret"}
    if size_m is not None:
        tags["PatientSize"] = size_m
    if weight is not None:
        tags["PatientWeight"] = weight
    tags.update(overrides)
    ds = build_dicom(radiograph(seed, shape=(96, 96)), modality="DX", **tags)
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _model_inputs(path: Path, hw: tuple[float, float]) -> tuple[np.ndarray, pd.DataFrame]:
    """What the model must see for ``path``: the preprocessed image and its clinical row."""
    from bonescreen.io import read_image, read_meta
    from bonescreen.preprocess import preprocess_array

    meta = read_meta(path)
    img, _ = read_image(path)
    clin = pd.DataFrame([{"age": meta.age, "sex": meta.sex, "height_cm": hw[0], "weight_kg": hw[1]}])
    return preprocess_array(img, SIZE)[None], clin


def make_pediatric_artifact(path: Path, calibrate: list[tuple[np.ndarray, pd.DataFrame]]) -> Path:
    """Random fusion model; the Z offset puts the median of ``calibrate`` at Z = -2.0 (both classes occur)."""
    import torch

    from bonescreen.artifact import ModelSpec, load_artifact, save_artifact
    from bonescreen.models import GRAY_MEAN, GRAY_STD
    from bonescreen.pediatric import predict_pediatric
    from bonescreen.pediatric.model import PEDIATRIC_ELIGIBILITY, FusionRegressor

    torch.manual_seed(0)
    model = FusionRegressor(ARCH, hidden=16)
    spec = ModelSpec.for_task(ARCH, "pediatric", threshold=0.5, eligibility=dict(PEDIATRIC_ELIGIBILITY),
                              preprocess={"method": "truncation", "size": SIZE, "mean": GRAY_MEAN, "std": GRAY_STD},
                              extra=dict(EXTRA))
    save_artifact(path, model, spec)
    loaded = load_artifact(path)
    z = [float(predict_pediatric(loaded, img, clin)["pred_z"].iloc[0]) for img, clin in calibrate]
    spec.extra = {**EXTRA, "target_mean": [-2.0 - float(np.median(z)), 0.6]}
    save_artifact(path, model, spec)
    # the OOD part, as `pediatric train` fits one (one class), on the kind of image screened here
    from bonescreen.ood import attach_ood
    from bonescreen.preprocess import preprocess_array
    from _service_support import widen_ood_threshold

    imgs = np.stack([preprocess_array(radiograph(100 + i, shape=(96, 96)).astype(np.float32), SIZE)
                     for i in range(48)])
    attach_ood(path, imgs[::2], None, imgs[1::2])
    widen_ood_threshold(path, 1.5)  # test fixture (see its docstring)
    return path


@pytest.fixture(scope="module")
def kids(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kids")
    paths = {name: _write_kid(root / "in", name, seed) for seed, name in enumerate(KIDS)}
    calib = [_model_inputs(paths[n], EXPECTED_HW[n]) for n in ("k0.dcm", "k1.dcm", "k2.dcm", "k3.dcm")]
    model = make_pediatric_artifact(root / "ped.pt", calib)
    uid = {n: str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for n, p in paths.items()}
    # --clinical: the CSV child by patient id; a decoy keyed by another image id must not be used
    (root / "clinical.csv").write_text("image_id,patient_id,height_cm,weight_kg\n"
                                       ",CSV1,152,43\n1.2.3.4.5,,99,99\n")
    # reference labels as a pediatric cohort manifest holds them: empty `label`, Z-scores
    zs = {"k0.dcm": -2.5, "k1.dcm": -0.3, "k2.dcm": -2.0, "k3.dcm": 0.4, "k4.dcm": -1.9, "fromcsv.dcm": -3.1}
    lines = ["image_id,path,patient_id,site,age,label,split,z_lumbar_spine,bmd_lumbar_spine"]
    lines += [f"{uid[n]},{paths[n]},{KIDS[n][4]},PED,,,test,{z},0.5" for n, z in zs.items()]
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return {"root": root, "in": root / "in", "model": model, "clinical": root / "clinical.csv",
            "manifest": root / "manifest.csv", **paths}


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _sr_items(ds: pydicom.Dataset) -> list[pydicom.Dataset]:
    out, stack = [], list(ds.ContentSequence)
    while stack:
        item = stack.pop()
        out.append(item)
        stack.extend(item.get("ContentSequence", []))
    return out


# --- pure pieces ---------------------------------------------------------------------------


def test_decide_pediatric_maps_predictions_and_skips() -> None:
    from bonescreen.screen import decide_pediatric

    preds = pd.DataFrame({
        "pred_z": [-2.6, -1.2, np.nan, np.nan], "pred_bmd": [0.41, 0.7, np.nan, np.nan],
        "prob_low_bmd": [0.77, 0.16, np.nan, np.nan],
        "low_bmd": pd.array([True, False, pd.NA, pd.NA], dtype="boolean"),
        "reason": ["", "", "missing_clinical:height_cm+weight_kg", ""],
    })
    rows = decide_pediatric(preds)
    assert [r["category"] for r in rows[:2]] == ["low_bmd", "normal_bmd"]
    assert [r["flag"] for r in rows[:2]] == [True, False]
    assert rows[0]["score"] == pytest.approx(0.77) and rows[0]["pred_z"] == pytest.approx(-2.6)
    assert rows[0]["p_low_bone_mass"] is None and rows[0]["score_stage2"] is None
    assert rows[2]["eligible"] is False and rows[2]["reason"] == "missing_clinical:height_cm+weight_kg"
    assert "height_cm, weight_kg" in rows[2]["message"] and rows[2]["score"] is None
    assert rows[3]["reason"] == "model_error"  # no reason but no prediction: never a silent "normal"
    # an explicit operating point flags on the score instead of the model's Z rule
    assert [r["flag"] for r in decide_pediatric(preds.iloc[:2], threshold=0.1)] == [True, True]


def test_clinical_table_lookup(tmp_path: Path) -> None:
    import datetime as dt

    from bonescreen.errors import TableError
    from bonescreen.screen import ClinicalTable

    p = tmp_path / "c.csv"
    p.write_text("image_id,patient_id,height_cm,weight_kg,exam_date\n"
                 "IMG1,P1,150,40,2020-01-01\n,P1,160,45,2021-06-01\n,P2,120,22,\n,P2,121,23,\n")
    t = ClinicalTable(p)
    assert t.lookup("IMG1", "P1", None)[0]["height_cm"] == "150"  # image id wins
    near = t.lookup("IMG9", "P1", dt.date(2021, 5, 1))[0]
    assert near is not None and near["height_cm"] == "160"  # the exam nearest the study date
    row, note = t.lookup(None, "P2", dt.date(2021, 5, 1))
    assert row is None and "2 rows" in note  # undated duplicates: refused, not guessed
    assert t.lookup("X", "NOPE", None) == (None, "")
    bad = tmp_path / "bad.csv"
    bad.write_text("mrn,height\n1,150\n")
    with pytest.raises(TableError, match="image_id or patient_id"):
        ClinicalTable(bad)


def test_header_height_is_metres_and_implausible_values_are_ignored(tmp_path: Path) -> None:
    from conftest import build_dicom

    from bonescreen.screen import header_body_size

    ok = tmp_path / "ok.dcm"
    build_dicom(radiograph(0, shape=(32, 32)), PatientSize=1.42, PatientWeight=36.5).save_as(ok)
    assert header_body_size(str(ok)) == (142.0, 36.5, [])
    cm = tmp_path / "cm.dcm"  # PatientSize written in centimetres, weight 0 ("unknown")
    build_dicom(radiograph(0, shape=(32, 32)), PatientSize=142, PatientWeight=0).save_as(cm)
    h, w, notes = header_body_size(str(cm))
    assert h is None and w is None and any("metres" in n for n in notes)


# --- screen end to end ---------------------------------------------------------------------


def test_pediatric_screen_end_to_end(kids: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    from scipy.stats import norm

    from bonescreen.artifact import load_artifact
    from bonescreen.cli import main
    from bonescreen.evaluate.report import read_predictions
    from bonescreen.pediatric import predict_pediatric
    from bonescreen.screen import PEDIATRIC_RESULT_COLUMNS, RESULT_COLUMNS

    out = kids["root"] / "scr"
    rc = main(["screen", str(kids["in"]), "--model", str(kids["model"]), "--clinical", str(kids["clinical"]),
               "--labels", str(kids["manifest"]), "--out", str(out), "--explain", "--dicom-sr",
               "--batch-size", "3", "--no-progress"])
    assert rc == 0
    assert "6 screened" in capsys.readouterr().out
    rows = _rows(out / "results.csv")
    assert list(rows[0]) == RESULT_COLUMNS + PEDIATRIC_RESULT_COLUMNS
    by = {Path(r["path"]).name: r for r in rows}
    assert by["adult.dcm"]["reason"] == "age_out_of_range" and by["adult.dcm"]["eligible"] == "False"
    assert by["noweight.dcm"]["reason"] == "missing_clinical:weight_kg"
    assert by["noweight.dcm"]["score"] == "" and float(by["noweight.dcm"]["height_cm"]) == pytest.approx(138.0)
    assert by["fromcsv.dcm"]["clinical_source"] == "clinical_csv"
    assert by["k0.dcm"]["clinical_source"] == "dicom"

    loaded = load_artifact(kids["model"])
    sd = loaded.spec.extra["residual_sd_z"]
    for name, hw in EXPECTED_HW.items():
        r = by[name]
        assert r["eligible"] == "True", (name, r["reason"], r["message"])
        assert (float(r["height_cm"]), float(r["weight_kg"])) == pytest.approx(hw)
        # the row holds what the model gives for this image with this height/weight (PatientSize x 100)
        img, clin = _model_inputs(kids[name], hw)
        exp = predict_pediatric(loaded, img, clin).iloc[0]
        z, score = float(r["pred_z"]), float(r["score"])
        assert z == pytest.approx(float(exp["pred_z"]), abs=1e-5)
        assert float(r["pred_bmd"]) == pytest.approx(float(exp["pred_bmd"]), abs=1e-5)
        assert score == pytest.approx(norm.cdf((-2.0 - z) / sd), abs=1e-6)
        assert r["category"] == ("low_bmd" if z <= -2.0 else "normal_bmd")
        assert r["flag"] == str(r["category"] == "low_bmd") == str(score >= 0.5)
        assert (out / r["overlay"]).is_file()
    cats = {by[n]["category"] for n in EXPECTED_HW}
    assert cats == {"low_bmd", "normal_bmd"}
    # PHI: neither the raw patient id nor the name is written
    blob = (out / "results.csv").read_text() + (out / "predictions.csv").read_text()
    assert "CSV1" not in blob and "Secret" not in blob

    # predictions.csv: the label is the manifest's DXA Z <= -2.0, readable by `evaluate`
    preds, _ = read_predictions([out / "predictions.csv"])
    assert len(preds) == 6
    labels = dict(zip(preds["path"].map(lambda p: Path(p).name), preds["label"]))
    assert labels == {"k0.dcm": 1, "k1.dcm": 0, "k2.dcm": 1, "k3.dcm": 0, "k4.dcm": 0, "fromcsv.dcm": 1}
    raw = pd.read_csv(out / "predictions.csv")
    assert {"z_true", "z_pred", "bmd_pred", "pred_z"} <= set(raw.columns)
    np.testing.assert_allclose(raw["z_pred"], raw["pred_z"])

    # the SR carries the predicted Z, BMD and P(Z <= -2) as numbers, and the finding
    r = by["k2.dcm"]
    studies = {st["study_instance_uid"]: st for st in csv.DictReader(open(out / "studies.csv"))}
    sr = pydicom.dcmread(out / studies[r["study_instance_uid"]]["sr"])  # one SR per study
    items = _sr_items(sr)
    nums = {i.ConceptNameCodeSequence[0].CodeMeaning: i.MeasuredValueSequence[0] for i in items
            if i.ValueType == "NUM"}
    assert float(nums["Predicted lumbar spine BMD Z-score"].NumericValue) == pytest.approx(float(r["pred_z"]), abs=1e-6)
    assert nums["Predicted lumbar spine BMD Z-score"].MeasurementUnitsCodeSequence[0].CodeValue == "{Z-score}"
    assert float(nums["Predicted lumbar spine BMD"].NumericValue) == pytest.approx(float(r["pred_bmd"]), abs=1e-6)
    assert nums["Predicted lumbar spine BMD"].MeasurementUnitsCodeSequence[0].CodeValue == "g/cm2"
    assert float(nums["Probability of BMD Z-score <= -2.0"].NumericValue) == pytest.approx(float(r["score"]), abs=1e-6)
    assert not any("bone mass" in k for k in nums)  # no adult concepts in a child's report
    findings = {i.ConceptCodeSequence[0].CodeValue for i in items if i.ValueType == "CODE"
                and i.ConceptNameCodeSequence[0].CodeValue == "121071"}
    assert findings == {"low-bmd-for-age" if r["category"] == "low_bmd" else "17621005"}
    assert sr.PatientID == "K2"


def test_pediatric_cascade_onnx_and_clinical_misuse_are_refused(kids: dict[str, Path], tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    from bonescreen.cli import main
    from bonescreen.screen import ScreenError, ScreenOptions, screen

    stage1 = make_artifact(tmp_path / "s1.pt", "stage1", size=SIZE)
    stage2 = make_artifact(tmp_path / "s2.pt", "stage2", size=SIZE)
    opts = ScreenOptions(progress=False)
    with pytest.raises(ModelArtifactError, match="cascade"):
        screen([kids["k0.dcm"]], kids["model"], tmp_path / "o1", stage1=stage1, options=opts)
    assert main(["screen", str(kids["k0.dcm"]), "--model", str(kids["model"]), "--stage1", str(stage1),
                 "--out", str(tmp_path / "o2"), "--no-progress"]) == 1
    assert "cascade" in capsys.readouterr().err
    with pytest.raises(ModelArtifactError, match="onnx backend does not run"):
        screen([kids["k0.dcm"]], kids["model"], tmp_path / "o3", backend="onnx", options=opts)
    assert not (tmp_path / "o3" / ".onnx").exists() or not any((tmp_path / "o3" / ".onnx").iterdir())
    with pytest.raises(ScreenError, match="pediatric"):
        screen([kids["k0.dcm"]], stage2, tmp_path / "o4", options=ScreenOptions(progress=False,
                                                                                clinical=str(kids["clinical"])))
    # an adult model still refuses a child (adult categories and columns unchanged)
    s = screen([kids["k0.dcm"]], stage2, tmp_path / "o5", options=opts)
    assert s.reasons == {"age_out_of_range": 1} and s.n_screened == 0


def test_manifest_columns_fill_height_weight_and_resume_checks_the_clinical_table(
        kids: dict[str, Path], tmp_path: Path) -> None:
    from bonescreen.screen import ScreenError, ScreenOptions, screen

    man = tmp_path / "screen.csv"
    man.write_text(f"path,height_cm,weight_kg\n{kids['fromcsv.dcm']},152,43\n{kids['noweight.dcm']},,31\n"
                   f"{kids['k0.dcm']},999,999\n")  # the header wins over the manifest
    out = tmp_path / "o"
    s = screen([man], kids["model"], out, options=ScreenOptions(progress=False))
    by = {Path(r["path"]).name: r for r in _rows(out / "results.csv")}
    assert s.n_screened == 3 and s.reasons == {}
    assert by["fromcsv.dcm"]["clinical_source"] == "manifest"
    assert by["noweight.dcm"]["clinical_source"] == "dicom+manifest"
    assert (float(by["noweight.dcm"]["height_cm"]), float(by["noweight.dcm"]["weight_kg"])) == (138.0, 31.0)
    assert float(by["k0.dcm"]["height_cm"]) == 118.0
    # a re-run that would mix in values from a clinical table is refused instead of mixing results
    with pytest.raises(ScreenError, match="clinical"):
        screen([man], kids["model"], out, options=ScreenOptions(progress=False, clinical=str(kids["clinical"])))
    again = screen([man], kids["model"], out, options=ScreenOptions(progress=False))
    assert again.n_new == 0 and again.n_resumed == 3


def test_explain_routes_pediatric_models_to_low_bmd_gradcam(kids: dict[str, Path], tmp_path: Path) -> None:
    from PIL import Image

    from bonescreen.artifact import load_artifact
    from bonescreen.cli import main
    from bonescreen.explain import ExplainError, explain_paths, overlay
    from bonescreen.pediatric.explain import gradcam_low_bmd
    from bonescreen.pediatric.model import clinical_matrix

    out = tmp_path / "ex"
    assert main(["explain", str(kids["in"]), "--model", str(kids["model"]), "--clinical", str(kids["clinical"]),
                 "--out", str(out), "--no-progress"]) == 0
    rows = {Path(r["path"]).name: r for r in _rows(out / "explain.csv")}
    assert rows["noweight.dcm"]["reason"] == "missing_clinical:weight_kg" and not rows["noweight.dcm"]["overlay"]
    assert rows["adult.dcm"]["reason"] == "age_out_of_range"
    made = {n: r for n, r in rows.items() if r["overlay"]}
    assert sorted(made) == sorted(EXPECTED_HW) and {r["class"] for r in made.values()} == {"low_bmd"}
    # the overlay is exactly the pediatric Grad-CAM (lower predicted Z) with this child's clinical row
    loaded = load_artifact(kids["model"])
    img, clin = _model_inputs(kids["k1.dcm"], EXPECTED_HW["k1.dcm"])
    cam = gradcam_low_bmd(loaded, img, clinical_matrix(clin))
    png = np.asarray(Image.open(out / made["k1.dcm"]["overlay"]))
    assert png.shape == (SIZE, SIZE, 3)
    assert np.abs(png.astype(int) - overlay(img[0], cam[0]).astype(int)).max() <= 1
    assert float(made["k1.dcm"]["height_cm"]) == 131.0
    with pytest.raises(ExplainError, match="low_bmd"):
        explain_paths([kids["k0.dcm"]], kids["model"], tmp_path / "ex2", target="normal", progress=False)


# --- service worker ------------------------------------------------------------------------


def test_service_screens_children_with_a_pediatric_model(kids: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from bonescreen.artifact import load_artifact
    from bonescreen.pediatric import predict_pediatric
    from bonescreen.service.api import create_app
    from bonescreen.service.config import ServiceConfig
    from bonescreen.service.runtime import Service

    token = {"Authorization": "Bearer tok-ped"}
    cfg = ServiceConfig(model=str(kids["model"]), data_dir=str(tmp_path / "data"), dicom_enabled=False,
                        poll_seconds=0.05, gate={"min_size": SIZE},
                        token_role="reviewer").validate()  # the static token may upload
    svc = Service(cfg, token="tok-ped")
    results: dict[str, dict[str, Any]] = {}
    with TestClient(create_app(svc)) as client:
        sops = {}
        for name in ("k0.dcm", "k3.dcm", "noweight.dcm", "adult.dcm"):
            r = client.post("/api/v1/images", content=kids[name].read_bytes(),
                            headers={**token, "Content-Type": "application/dicom"})
            assert r.status_code == 202, r.text
            sops[name] = r.json()["sop_instance_uid"]
        t0 = time.time()
        while len(results) < len(sops) and time.time() - t0 < 60:
            for name, sop in sops.items():
                j = client.get(f"/api/v1/images/{sop}", headers=token).json()
                if j["status"] in ("done", "failed"):
                    results[name] = j["result"]
            time.sleep(0.1)
        assert len(results) == len(sops)
        sr = pydicom.dcmread(io.BytesIO(client.get(f"/api/v1/results/{sops['k3.dcm']}/sr", headers=token).content))
    loaded = load_artifact(kids["model"])
    expected = {n: predict_pediatric(loaded, *_model_inputs(kids[n], EXPECTED_HW[n])).iloc[0]
                for n in ("k0.dcm", "k3.dcm")}
    for name, exp in expected.items():
        res = results[name]
        assert res["eligible"] and res["category"] == ("low_bmd" if exp["low_bmd"] else "normal_bmd")
        assert res["score"] == pytest.approx(float(exp["prob_low_bmd"]), abs=1e-6)  # height from PatientSize
        assert res["flag"] == (res["category"] == "low_bmd") and res["has_sr"] and res["has_overlay"]
        assert f"{float(exp['pred_z']):.2f}" in res["message"]
    assert results["noweight.dcm"]["eligible"] is False
    assert results["noweight.dcm"]["reason"] == "missing_clinical:weight_kg"
    assert results["adult.dcm"]["reason"] == "age_out_of_range"
    nums = {i.ConceptNameCodeSequence[0].CodeMeaning: float(i.MeasuredValueSequence[0].NumericValue)
            for i in _sr_items(sr) if i.ValueType == "NUM"}
    assert nums["Predicted lumbar spine BMD Z-score"] == pytest.approx(float(expected["k3.dcm"]["pred_z"]), abs=1e-5)
