"""DICOM outputs: TID 1500 SR and Grad-CAM secondary capture read back strictly with pydicom."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from _screen_helpers import make_artifact, radiograph

from bonescreen.dicom_out import (
    CATEGORY_CODES,
    DicomOutputError,
    ScreeningResult,
    build_sc,
    build_sr,
    read_source,
)

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR Storage
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage


@pytest.fixture()
def strict(monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", pydicom.config.RAISE)
    monkeypatch.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.RAISE)


@pytest.fixture()
def source(write_dicom) -> Path:  # type: ignore[no-untyped-def]
    return write_dicom(
        radiograph(), name="src.dcm", PatientName="Doe^Jane", PatientID="MRN-42", PatientBirthDate="19600101",
        AccessionNumber="ACC1", StudyID="S1", StudyTime="101500", ReferringPhysicianName="Ref^Doc",
    )


def _roundtrip(ds) -> pydicom.Dataset:  # type: ignore[no-untyped-def]
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    return pydicom.dcmread(buf)


def _items(ds: pydicom.Dataset):  # type: ignore[no-untyped-def]
    """Every content item in the SR tree."""
    stack = list(ds.ContentSequence)
    while stack:
        item = stack.pop()
        yield item
        stack.extend(item.get("ContentSequence", []))


def _result(category: str = "low_bone_mass") -> ScreeningResult:
    return ScreeningResult(category=category, scores={"score_stage2": 0.73, "score_stage1": 0.12},
                           model_id="stage2.pt@abc123", task="cascade",
                           thresholds={"stage2": 0.5, "stage1": 0.6}, model_stage1_id="stage1.pt@def456",
                           arch="convnext_atto")


def _check_copied(out: pydicom.Dataset, src: pydicom.Dataset) -> None:
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
               "AccessionNumber"):
        assert out.get(kw) == src.get(kw), kw
    assert out.SOPInstanceUID != src.SOPInstanceUID and out.SeriesInstanceUID != src.SeriesInstanceUID
    assert pydicom.uid.UID(out.SOPInstanceUID).is_valid and pydicom.uid.UID(out.SeriesInstanceUID).is_valid


@pytest.mark.parametrize("category", ["normal", "low_bone_mass", "osteoporosis"])
def test_sr_valid_and_complete(strict, source: Path, category: str) -> None:  # type: ignore[no-untyped-def]
    src = pydicom.dcmread(source)
    sr = _roundtrip(build_sr(read_source(source), _result(category)))
    assert sr.SOPClassUID == SR_CLASS and sr.Modality == "SR"
    assert sr.file_meta.MediaStorageSOPInstanceUID == sr.SOPInstanceUID
    _check_copied(sr, src)
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
    for kw in ("ContentDate", "ContentTime", "InstanceNumber", "SeriesNumber", "Manufacturer"):
        assert sr.get(kw) not in (None, ""), kw
    # evidence: the source image is referenced in the current requested procedure evidence
    ev = sr.CurrentRequestedProcedureEvidenceSequence[0]
    refs = [i for s in ev.ReferencedSeriesSequence for i in s.ReferencedSOPSequence]
    assert [(r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID) for r in refs] == [(src.SOPClassUID, src.SOPInstanceUID)]
    items = list(_items(sr))
    nums = {i.ConceptNameCodeSequence[0].CodeMeaning: i.MeasuredValueSequence[0] for i in items if i.ValueType == "NUM"}
    assert float(nums["Probability of low bone mass"].NumericValue) == pytest.approx(0.73)
    assert float(nums["Probability of osteoporosis"].NumericValue) == pytest.approx(0.12)
    assert nums["Probability of low bone mass"].MeasurementUnitsCodeSequence[0].CodeValue == "1"
    findings = [i.ConceptCodeSequence[0] for i in items if i.ValueType == "CODE"
                and i.ConceptNameCodeSequence[0].CodeValue == "121071"]
    code, scheme, _ = CATEGORY_CODES[category]
    assert [(f.CodeValue, f.CodingSchemeDesignator) for f in findings] == [(code, scheme)]
    texts = [str(i.TextValue) for i in items if i.ValueType == "TEXT"]
    assert any("stage2.pt@abc123" in t for t in texts)  # algorithm identification names the model
    images = [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in items if i.ValueType == "IMAGE"]
    assert images and set(images) == {src.SOPInstanceUID}


def test_sr_uids_are_reproducible_per_image_and_model(source: Path, write_dicom) -> None:  # type: ignore[no-untyped-def]
    a = build_sr(read_source(source), _result())
    b = build_sr(read_source(source), _result())
    other_model = _result()
    other_model.model_id = "stage2.pt@ffffff"
    c = build_sr(read_source(source), other_model)
    other = write_dicom(radiograph(1), name="other.dcm")
    d = build_sr(read_source(other), _result())
    assert a.SOPInstanceUID == b.SOPInstanceUID
    assert len({a.SOPInstanceUID, c.SOPInstanceUID, d.SOPInstanceUID}) == 3


def test_sr_from_source_missing_type2_attributes(strict, write_dicom) -> None:  # type: ignore[no-untyped-def]
    src = write_dicom(radiograph(), name="bare.dcm")
    ds = pydicom.dcmread(src)
    for kw in ("PatientSex", "StudyDate", "PatientAge"):
        delattr(ds, kw)
    ds.save_as(src, enforce_file_format=True)
    sr = _roundtrip(build_sr(read_source(src), _result("normal")))
    assert sr.PatientID == "TEST-0001" and sr.PatientSex == ""


def test_secondary_capture_valid(strict, source: Path) -> None:  # type: ignore[no-untyped-def]
    src = pydicom.dcmread(source)
    rgb = np.random.default_rng(0).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    sc = _roundtrip(build_sc(read_source(source), rgb, model_id="m@1"))
    assert sc.SOPClassUID == SC_CLASS
    _check_copied(sc, src)
    assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3 and sc.BitsAllocated == 8
    assert np.array_equal(sc.pixel_array, rgb)
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert sc.ImageType[:2] == ["DERIVED", "SECONDARY"] and sc.ConversionType
    assert len(sc.PatientOrientation) == 2
    with pytest.raises(DicomOutputError):
        build_sc(read_source(source), rgb[..., 0])


def test_screen_writes_sr_and_sc_for_dicom_inputs(strict, tmp_path: Path, source: Path) -> None:  # type: ignore[no-untyped-def]
    import csv

    from bonescreen.screen import ScreenOptions, screen

    m2 = make_artifact(tmp_path / "s2.pt", "stage2", size=64)
    m1 = make_artifact(tmp_path / "s1.pt", "stage1", size=64, seed=4)
    out = tmp_path / "out"
    screen([source], m2, out, stage1=m1, options=ScreenOptions(dicom_sr=True, dicom_sc=True, progress=False))
    row = next(csv.DictReader(open(out / "results.csv")))
    study = next(csv.DictReader(open(out / "studies.csv")))  # the SR is per study
    assert study["study_instance_uid"] == row["study_instance_uid"] and study["image_ids"] == row["image_id"]
    sr = pydicom.dcmread(out / study["sr"])
    sc = pydicom.dcmread(out / row["sc"])
    assert sr.PatientID == "MRN-42" and sc.StudyInstanceUID == pydicom.dcmread(source).StudyInstanceUID
    nums = {i.ConceptNameCodeSequence[0].CodeMeaning: float(i.MeasuredValueSequence[0].NumericValue)
            for i in _items(sr) if i.ValueType == "NUM"}
    assert nums["Probability of osteoporosis"] == pytest.approx(float(row["score_stage1"]))
    assert sc.Rows == 64 and sc.Columns == 64
