"""Eligibility gate: every refusal reason, the unknown-fact policy, and io reasons passed through."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _screen_helpers import Meta, radiograph

from bonescreen.screen.gate import GATE_REASONS, GatePolicy, check_header, check_pixels


ADULT = GatePolicy.from_eligibility({"modalities": ["CR", "DX"], "views": ["PA", "AP"], "min_age": 50, "max_age": 120})


@pytest.mark.parametrize(
    "meta, reason",
    [
        (Meta(), ""),
        (Meta(modality="DX", view="AP"), ""),
        (Meta(modality="CT"), "wrong_modality"),
        (Meta(modality=None), "modality_unknown"),
        (Meta(view="LAT"), "lateral_view"),
        (Meta(view="LL"), "lateral_view"),
        (Meta(view="OBLIQUE"), "not_frontal"),
        (Meta(view=None), "view_unknown"),
        (Meta(age=49.9), "age_out_of_range"),
        (Meta(age=121.0), "age_out_of_range"),
        (Meta(age=50.0), ""),  # the range is inclusive
        (Meta(age=None), "age_unknown"),
        (Meta(rows=200, columns=2000), "too_small"),
    ],
)
def test_header_reasons(meta: Meta, reason: str) -> None:
    d = check_header(meta, ADULT)
    assert d.eligible == (reason == "")
    assert d.reason == reason
    if reason:
        assert d.reason in GATE_REASONS and d.message


def test_unknown_facts_can_be_allowed() -> None:
    pol = GatePolicy.from_eligibility({"min_age": 50}, allow_unknown=["age", "view", "modality"])
    assert check_header(Meta(age=None, view=None, modality=None), pol).eligible
    # allowing unknown facts does not let wrong known facts through
    assert check_header(Meta(view="LAT"), pol).reason == "lateral_view"
    with pytest.raises(ValueError):
        GatePolicy.from_eligibility({}, allow_unknown=["sex"])


def test_policy_from_artifact_eligibility_and_overrides() -> None:
    default = GatePolicy.from_eligibility(None)  # no declaration: adult by default
    assert default.min_age == 18 and check_header(Meta(age=17.0), default).reason == "age_out_of_range"
    pol = GatePolicy.from_eligibility({"min_age": 50, "max_age": 90, "modalities": ["dx"]}, min_age=40, max_age=None)
    assert pol.min_age == 40 and pol.max_age == 90 and pol.modalities == ("DX",)
    assert check_header(Meta(modality="CR"), pol).reason == "wrong_modality"


def test_pixel_reasons() -> None:
    good = radiograph().astype(np.float32)
    assert check_pixels(good, ADULT).eligible
    assert check_pixels(good[:100], ADULT).reason == "too_small"
    assert check_pixels(np.full((300, 300), 7.0, np.float32), ADULT).reason == "blank"
    assert check_pixels(np.full((300, 300), np.nan, np.float32), ADULT).reason == "blank"
    # a bright border around a centre with only three grey levels: contrast exists, but not where it counts
    low = np.zeros((300, 300), np.float32)
    low[:, :20] = 1000
    low[75:225, 75:225] = np.random.default_rng(0).integers(0, 3, (150, 150))
    assert check_pixels(low, ADULT).reason == "low_dynamic_range"


def _prepare(path: Path, **policy: object):  # type: ignore[no-untyped-def]
    from bonescreen.screen import InputItem, PrepContext, prepare

    pol = GatePolicy.from_eligibility({"min_age": 50, "max_age": 120}, **policy)
    return prepare(InputItem(str(path)), PrepContext(pol, (64,), None, False, None))


def test_io_reasons_reach_the_row(tmp_path: Path, write_dicom) -> None:  # type: ignore[no-untyped-def]
    import pydicom

    (tmp_path / "notes.dcm").write_text("not an image")
    (tmp_path / "empty.dcm").write_bytes(b"")
    write_dicom(np.stack([radiograph(1), radiograph(2)]), name="multi.dcm", NumberOfFrames=2)
    nopix = write_dicom(radiograph(3), name="nopix.dcm")
    ds = pydicom.dcmread(nopix)
    del ds.PixelData
    ds.save_as(nopix)
    nodec = write_dicom(radiograph(4), name="nodec.dcm")
    ds = pydicom.dcmread(nodec)
    ds.file_meta.TransferSyntaxUID = "1.2.3.4.5.6.7"
    ds.save_as(nodec, enforce_file_format=True)
    good = write_dicom(radiograph(5), name="good.dcm")
    trunc = tmp_path / "trunc.dcm"
    trunc.write_bytes(good.read_bytes()[:-5000])
    expected = {
        "notes.dcm": "not_dicom", "empty.dcm": "empty_file", "multi.dcm": "multi_frame",
        "nopix.dcm": "no_pixel_data", "nodec.dcm": "no_decoder", "trunc.dcm": "truncated",
        "missing.dcm": "not_found", "good.dcm": "",
    }
    for name, reason in expected.items():
        prep = _prepare(tmp_path / name)
        assert prep.row["reason"] == reason, (name, prep.row)
        assert prep.row["eligible"] == (reason == "")
        assert (prep.images is None) == bool(reason)
        if reason:
            assert prep.row["message"]


def test_header_refusal_happens_before_decoding(tmp_path: Path, write_dicom, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import bonescreen.io as bio

    path = write_dicom(radiograph(), name="lat.dcm", ViewPosition="LATERAL")
    calls = []
    real = bio.read_image
    monkeypatch.setattr(bio, "read_image", lambda *a, **k: calls.append(a) or real(*a, **k))
    prep = _prepare(path)
    assert prep.row["reason"] == "lateral_view" and calls == []
    child = write_dicom(radiograph(), name="child.dcm", PatientAge="009Y")
    assert _prepare(child).row["reason"] == "age_out_of_range"
    ct = write_dicom(radiograph(), name="ct.dcm", modality="CT")
    assert _prepare(ct).row["reason"] == "wrong_modality"
    noage = write_dicom(radiograph(), name="noage.dcm", PatientAge="")
    assert _prepare(noage).row["reason"] == "age_unknown"
    assert _prepare(noage, allow_unknown=["age"]).row["eligible"]
    blank = write_dicom(np.full((256, 256), 100, np.uint16), name="blank.dcm")
    assert _prepare(blank).row["reason"] == "blank"
    small = write_dicom(radiograph(shape=(128, 128)), name="small.dcm")
    assert _prepare(small).row["reason"] == "too_small"


@pytest.mark.parametrize("spelling", ["LAT", "LATERAL", "LL", "RL", "LLAT", "RLAT", "LEFT LATERAL",
                                      "RIGHT LATERAL", "LATERAL-LEFT", "LATERAL-RIGHT", "lateral"])
def test_one_lateral_vocabulary(spelling: str) -> None:
    """schema.LATERAL_VIEWS: io normalises every spelling to LAT (and calls it lateral); the gate refuses
    each as a lateral view, normalised or not (a table's view column may hold the raw spelling)."""
    from bonescreen.io import ImageMeta, normalise_view
    from bonescreen.schema import LATERAL_VIEWS

    assert spelling.upper() in LATERAL_VIEWS
    assert normalise_view(spelling) == "LAT" and ImageMeta(path="x", source="dicom", view="LAT").is_lateral
    assert check_header(Meta(view=spelling), ADULT).reason == "lateral_view"
    assert check_header(Meta(view=normalise_view(spelling)), ADULT).reason == "lateral_view"
