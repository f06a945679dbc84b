"""Screening: cascade logic, model refusal, mixed good/bad folders, output tables, PHI handling."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from _screen_helpers import FakeModel, make_artifact, radiograph

from bonescreen.errors import ModelArtifactError
from bonescreen.screen import (
    RESULT_COLUMNS,
    ModelSet,
    ScreenOptions,
    decide,
    predict_batch,
    screen,
)

# --- cascade logic ----------------------------------------------------------


def test_decide_cascade_boundaries() -> None:
    p1 = np.array([[0.2, 0.8], [0.7, 0.3], [0.7, 0.3], [0.4, 0.6]])
    p2 = np.array([[np.nan, np.nan], [0.4, 0.6], [0.9, 0.1], [0.5, 0.5]])
    rows = decide("cascade", p2, p1, threshold=0.5, threshold_stage1=0.6)
    assert [r["category"] for r in rows] == ["osteoporosis", "low_bone_mass", "normal", "osteoporosis"]
    assert [r["flag"] for r in rows] == [True, True, False, True]
    assert rows[0]["score_stage2"] is None and rows[0]["score_stage1"] == pytest.approx(0.8)
    assert rows[1]["score"] == pytest.approx(0.6) and rows[1]["score_stage1"] == pytest.approx(0.3)
    # threshold is inclusive; raising it flips the decision
    assert decide("stage2", np.array([[0.5, 0.5]]), threshold=0.5)[0]["category"] == "low_bone_mass"
    assert decide("stage2", np.array([[0.5, 0.5]]), threshold=0.51)[0]["category"] == "normal"
    # stage 2 missing for an image stage 1 did not flag is a bug, not a silent "normal"
    with pytest.raises(ValueError):
        decide("cascade", np.array([[np.nan, np.nan]]), np.array([[0.9, 0.1]]), threshold_stage1=0.5)


def test_decide_three_class_and_stage1() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.3, 0.6]])
    rows = decide("three_class", probs)
    assert [r["category"] for r in rows] == ["normal", "low_bone_mass", "osteoporosis"]
    assert rows[1]["score"] == pytest.approx(0.5 / 0.7)  # P(LBM | not osteoporosis)
    assert rows[2]["p_osteoporosis"] == pytest.approx(0.6)
    s1 = decide("stage1", np.array([[0.3, 0.7], [0.8, 0.2]]), threshold=0.5)
    assert [r["category"] for r in s1] == ["osteoporosis", "not_osteoporosis"]
    assert [r["flag"] for r in s1] == [True, False]


def test_stage2_runs_only_on_images_stage1_did_not_flag() -> None:
    main, s1 = FakeModel("stage2"), FakeModel("stage1")
    models = ModelSet(main, s1, "m2", "m1")
    means = [20, 230, 100, 200, 240]  # p = mean / 255 for both fake models
    imgs = np.stack([np.full((8, 8), m, np.uint8) for m in means])
    rows = predict_batch(models, {8: imgs}, threshold=0.5, threshold_stage1=0.85)
    # 230/255 = 0.90 and 240/255 = 0.94 are osteoporosis; 200/255 = 0.78 goes to stage 2 -> low bone mass
    assert [r["category"] for r in rows] == ["normal", "osteoporosis", "normal", "low_bone_mass", "osteoporosis"]
    assert np.allclose(main.calls[0], [20, 100, 200])  # stage 2 saw only the rest
    assert np.allclose(s1.calls[0], means)
    rows = predict_batch(models, {8: imgs}, threshold=0.5, threshold_stage1=0.85, always_stage2=True)
    assert np.allclose(main.calls[1], means) and rows[1]["score_stage2"] == pytest.approx(230 / 255)
    three = ModelSet(FakeModel("three_class"))
    rows = predict_batch(three, {8: imgs[:3]}, threshold=0.5, threshold_stage1=0.5)
    assert [r["category"] for r in rows] == ["normal", "osteoporosis", "low_bone_mass"]


def test_model_set_refuses_wrong_combinations() -> None:
    with pytest.raises(ModelArtifactError, match="stage1"):
        ModelSet(FakeModel("stage2"), FakeModel("stage2"))
    with pytest.raises(ModelArtifactError, match="cascade"):
        ModelSet(FakeModel("three_class"), FakeModel("stage1"))


# --- real artifacts, end to end -----------------------------------------------


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    return {
        "stage2": make_artifact(d / "stage2.pt", "stage2", seed=1),
        "stage1": make_artifact(d / "stage1.pt", "stage1", seed=2),
        "three": make_artifact(d / "three.pt", "three_class", seed=3),
    }


def test_corrupt_other_version_and_other_task_artifacts_are_refused(tmp_path: Path, artifacts, write_dicom) -> None:  # type: ignore[no-untyped-def]
    import torch

    from bonescreen.cli import main

    img = write_dicom(radiograph(), name="in/a.dcm")
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(artifacts["stage2"].read_bytes()[:5000])
    payload = torch.load(artifacts["stage2"], weights_only=True)
    payload["format_version"] = 99
    old = tmp_path / "v99.pt"
    torch.save(payload, old)
    for model, stage1, match in [
        (bad, None, "not a readable"),
        (old, None, "format version 99"),
        (artifacts["stage2"], artifacts["stage2"], "'stage1' model was expected"),
        (artifacts["three"], artifacts["stage1"], "cascade"),
    ]:
        with pytest.raises(ModelArtifactError, match=match):
            screen([img.parent], model, tmp_path / "out", stage1=stage1, options=ScreenOptions(progress=False))
    assert main(["screen", str(img.parent), "--model", str(bad), "--out", str(tmp_path / "o2"), "--no-progress"]) == 1


def _mixed_folder(root: Path, write_dicom) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """Good images mixed with one of each kind of bad input; name -> expected reason."""
    import pydicom
    from PIL import Image

    expected: dict[str, str] = {}
    for i in range(5):
        write_dicom(radiograph(i), name=f"in/good{i}.dcm", PatientName="Doe^Jane", PatientID=f"MRN{i:04d}")
        expected[f"good{i}.dcm"] = ""
    sub = root / "in" / "sub"
    sub.mkdir(parents=True)
    write_dicom(radiograph(9), name="in/sub/good_nested.dcm")
    expected["good_nested.dcm"] = ""
    write_dicom(radiograph(10), name="in/lateral.dcm", ViewPosition="LL")
    write_dicom(radiograph(11), name="in/ct.dcm", modality="CT")
    write_dicom(radiograph(12), name="in/child.dcm", PatientAge="007Y")
    write_dicom(radiograph(13), name="in/noage.dcm", PatientAge="")
    write_dicom(np.full((256, 256), 5, np.uint16), name="in/blank.dcm")
    write_dicom(radiograph(14, shape=(40, 50), levels=4000), name="in/tiny.dcm")
    write_dicom(np.stack([radiograph(15), radiograph(16)]), name="in/multi.dcm", NumberOfFrames=2)
    p = write_dicom(radiograph(17), name="in/report.dcm")
    ds = pydicom.dcmread(p)
    del ds.PixelData
    ds.save_as(p)
    good = (root / "in" / "good0.dcm").read_bytes()
    (root / "in" / "truncated.dcm").write_bytes(good[: len(good) // 2])
    (root / "in" / "text.dcm").write_text("hello")
    (root / "in" / "empty.dcm").write_bytes(b"")
    (root / "in" / "README.txt").write_text("notes")
    Image.fromarray((radiograph(18) // 16).astype(np.uint8)).save(root / "in" / "photo.png")
    expected.update({
        "lateral.dcm": "lateral_view", "ct.dcm": "wrong_modality", "child.dcm": "age_out_of_range",
        "noage.dcm": "age_unknown", "blank.dcm": "blank", "tiny.dcm": "too_small", "multi.dcm": "multi_frame",
        "report.dcm": "no_pixel_data", "truncated.dcm": "truncated", "text.dcm": "not_dicom",
        "empty.dcm": "empty_file", "README.txt": "not_dicom", "photo.png": "modality_unknown",
    })
    return expected


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "results.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_mixed_folder_cli_rows_reasons_and_exit_code(tmp_path: Path, artifacts, write_dicom, capsys) -> None:  # type: ignore[no-untyped-def]
    from bonescreen.cli import main

    expected = _mixed_folder(tmp_path, write_dicom)
    out = tmp_path / "out"
    rc = main(["screen", str(tmp_path / "in"), "--model", str(artifacts["stage2"]), "--stage1",
               str(artifacts["stage1"]), "--out", str(out), "--no-progress", "--batch-size", "4"])
    assert rc == 0
    assert "6 screened" in capsys.readouterr().out
    rows = _rows(out)
    assert list(rows[0].keys()) == RESULT_COLUMNS
    by_name = {Path(r["path"]).name: r for r in rows}
    assert sorted(by_name) == sorted(expected) and len(rows) == len(expected)
    for name, reason in expected.items():
        r = by_name[name]
        assert r["reason"] == reason, (name, r["reason"], r["message"])
        assert r["eligible"] == str(reason == "")
        if reason:
            assert r["message"] and r["category"] == "" and r["score_stage1"] == ""
        else:
            assert r["category"] in ("normal", "low_bone_mass", "osteoporosis")
            assert 0 <= float(r["score_stage1"]) <= 1
            assert r["flag"] == str(r["category"] != "normal")
            assert r["model"].startswith("stage2.pt@") and r["model_stage1"].startswith("stage1.pt@")
    # JSON lines mirror the CSV
    jrows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [j["path"] for j in jrows] == [r["path"] for r in rows]
    # PHI: no raw patient id or name anywhere in the outputs
    blob = "".join(f.read_text() for f in out.glob("*.*") if f.suffix in (".csv", ".jsonl", ".json"))
    assert "MRN0001" not in blob and "Doe" not in blob
    # a keyed pseudonym (HMAC under the per-user key), the same on every run with that key
    from bonescreen.pseudonym import Pseudonymiser

    assert by_name["good1.dcm"]["patient_id"] == Pseudonymiser.from_file()("MRN0001")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_screened"] == 6 and summary["reasons"]["lateral_view"] == 1

    # the PNG becomes eligible when the user vouches for the unknown facts
    out2 = tmp_path / "out2"
    assert main(["screen", str(tmp_path / "in" / "photo.png"), "--model", str(artifacts["stage2"]), "--out",
                 str(out2), "--allow-unknown", "age,view,modality", "--no-progress"]) == 0
    assert _rows(out2)[0]["eligible"] == "True" and _rows(out2)[0]["image_id"].startswith("sha256:")

    # nothing screenable -> non-zero exit with the reasons
    assert main(["screen", str(tmp_path / "in" / "lateral.dcm"), str(tmp_path / "in" / "text.dcm"), "--model",
                 str(artifacts["stage2"]), "--out", str(tmp_path / "out3"), "--no-progress"]) == 1
    assert "nothing could be screened" in capsys.readouterr().err


def test_include_patient_id_three_class_and_manifest_input(tmp_path: Path, artifacts, write_dicom) -> None:  # type: ignore[no-untyped-def]
    a = write_dicom(radiograph(1), name="a.dcm", PatientID="MRN-A")
    b = write_dicom(radiograph(2), name="b.dcm", PatientID="MRN-B", PatientAge="")
    man = tmp_path / "manifest.csv"
    man.write_text("path,site,age\na.dcm,siteX,\nb.dcm,siteY,71\n")  # relative to the manifest; fills b's age
    s = screen([man], artifacts["three"], tmp_path / "out", options=ScreenOptions(progress=False, include_patient_id=True))
    assert s.n_screened == 2 and s.mode == "three_class"
    rows = {Path(r["path"]).name: r for r in _rows(tmp_path / "out")}
    assert rows["a.dcm"]["patient_id"] == "MRN-A" and rows["b.dcm"]["site"] == "siteY"
    assert float(rows["b.dcm"]["age"]) == 71
    probs = [float(rows["a.dcm"][k]) for k in ("p_normal", "p_low_bone_mass", "p_osteoporosis")]
    assert sum(probs) == pytest.approx(1, abs=1e-5)
    assert rows["a.dcm"]["category"] == ("normal", "low_bone_mass", "osteoporosis")[int(np.argmax(probs))]
    assert a.exists() and b.exists()


def test_predictions_table_joins_labels_and_reads_in_evaluate(tmp_path: Path, artifacts, write_dicom) -> None:  # type: ignore[no-untyped-def]
    import pydicom

    from bonescreen.evaluate.report import read_predictions

    lines = ["image_id,path,label,label_stage1,t_min,severity,split,site"]
    for i in range(6):
        p = write_dicom(radiograph(i), name=f"in/x{i}.dcm")
        uid = pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
        lines.append(f"{uid},{p},{i % 2},0,{-0.5 - 0.4 * i:.1f},,test,siteA")
    labels = tmp_path / "manifest.csv"
    labels.write_text("\n".join(lines) + "\n")
    screen([tmp_path / "in"], artifacts["stage2"], tmp_path / "out",
           options=ScreenOptions(progress=False, labels=str(labels)))
    preds, _warnings = read_predictions([tmp_path / "out" / "predictions.csv"])
    assert len(preds) == 6 and sorted(preds["label"].tolist()) == [0, 0, 0, 1, 1, 1]
    assert set(preds["site"]) == {"siteA"} and preds["score"].between(0, 1).all()
    res = {r["image_id"]: float(r["score"]) for r in _rows(tmp_path / "out")}
    assert all(res[i] == pytest.approx(s) for i, s in zip(preds["image_id"], preds["score"]))
