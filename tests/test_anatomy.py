"""Anatomy from headers: the vocabulary, tokenisation, coded regions, the field-precedence rule, io."""

from __future__ import annotations

from pathlib import Path

import pytest
from _screen_helpers import Meta, radiograph

from bonescreen.screen.gate import GatePolicy, check_header, classify_anatomy, classify_text


@pytest.mark.parametrize("text, kind", [
    ("CHEST", "chest"), ("chest", "chest"), ("TORAX PA", "chest"), ("Tórax", "chest"), ("TÓRAX AP", "chest"),
    ("CHEST_PA", "chest"), ("RX TORAX", "chest"), ("THORAX", "chest"), ("Thorax p.a.", "chest"),
    ("TORACE", "chest"), ("POUMON", "chest"), ("POUMONS FACE", "chest"), ("LUNGE", "chest"), ("Lungen", "chest"),
    ("PULMON", "chest"), ("BORST", "chest"), ("CXR", "chest"), ("LUNGS", "chest"), ("Brustkorb", "chest"),
    ("ГРУДНОЙ КЛЕТКИ", "chest"), ("胸部正位", "chest"), ("흉부 PA", "chest"),
    ("THORAX + ABDOMEN", "chest"),  # names the chest: it may be one (the content check decides)
    ("CHESTNUT", "unknown"), ("CHESTER", "unknown"), ("PA ERECT", "unknown"), ("", "unknown"), (None, "unknown"),
    ("KNEE", "non_chest"), ("KNEES AP", "non_chest"), ("HAND PA", "non_chest"), ("RX RODILLA", "non_chest"),
    ("Knie links", "non_chest"), ("GENOU", "non_chest"), ("Fuß", "non_chest"), ("Schädel", "non_chest"),
    ("SKULL", "non_chest"), ("ABDOMEN", "non_chest"), ("PELVIS", "non_chest"), ("Becken", "non_chest"),
    ("THORACIC SPINE", "non_chest"), ("T-SPINE", "non_chest"), ("LSPINE", "non_chest"), ("BWS", "non_chest"),
    ("COLUMNA DORSAL", "non_chest"), ("MAMMOGRAPHIE", "non_chest"), ("BREAST", "non_chest"),
    ("DENTAL BITEWING", "non_chest"), ("OPG", "non_chest"), ("EXTREMITY", "non_chest"), ("TIBIA", "non_chest"),
    ("SENOS PARANASALES", "non_chest"), ("HEADNECK", "non_chest"), ("STERNUM", "non_chest"),
    ("CHESTABDOMEN", "neutral"), ("RIBS", "neutral"),
])
def test_vocabulary(text: str | None, kind: str) -> None:
    assert classify_text(text)[0] == kind, text


def test_codes_match_dicom_cid4() -> None:
    """Each SNOMED CT code of the vocabulary that DICOM CID 4 lists has the meaning CID 4 gives it."""
    from pydicom.sr.codedict import codes

    from bonescreen.schema import CHEST_CODES, NEUTRAL_CODES, NON_CHEST_CODES

    cid4 = {getattr(codes.cid4, n).value: getattr(codes.cid4, n).meaning for n in codes.cid4.dir()}
    checked = 0
    for table in (CHEST_CODES, NEUTRAL_CODES, NON_CHEST_CODES):
        for code, meaning in table.items():
            if code in cid4 and code != "43799004":  # 43799004: "Chest" in older CID 4, "Intrathoracic" today
                assert cid4[code].lower() == meaning.lower(), (code, meaning, cid4[code])
                checked += 1
    assert checked >= 40
    assert not set(CHEST_CODES) & set(NON_CHEST_CODES)


ADULT = GatePolicy.from_eligibility({"min_age": 50})


def test_wrong_body_part_names_field_and_value() -> None:
    d = check_header(Meta(body_part="EXTREMITY"), ADULT)
    assert d.reason == "wrong_body_part" and "BodyPartExamined 'EXTREMITY'" in d.message
    d = check_header(Meta(anatomic_region_code="72696002", anatomic_region_meaning="Knee"), ADULT)
    assert d.reason == "wrong_body_part" and "AnatomicRegionSequence" in d.message and "72696002" in d.message
    d = check_header(Meta(series_description="RX RODILLA AP"), ADULT)
    assert d.reason == "wrong_body_part" and "SeriesDescription" in d.message
    # a coded chest, a chest body part, a chest description: eligible
    for meta in (Meta(anatomic_region_code="51185008"), Meta(anatomic_region_code="816094009"),
                 Meta(body_part="CHEST"), Meta(protocol_name="Thorax pa"), Meta(study_description="RX TORAX")):
        assert check_header(meta, ADULT).eligible, meta
    # the modality is still checked first: a CT knee is wrong_modality
    assert check_header(Meta(modality="CT", body_part="KNEE"), ADULT).reason == "wrong_modality"
    # a lateral chest is still a lateral
    assert check_header(Meta(body_part="CHEST", view="LAT"), ADULT).reason == "lateral_view"


def test_unknown_body_part_policy() -> None:
    assert check_header(Meta(), ADULT).eligible  # default: the content checks decide
    assert check_header(Meta(body_part="RIBS"), ADULT).eligible  # neutral counts as unknown
    strict = GatePolicy.from_eligibility({"min_age": 50}, require_body_part=True)
    d = check_header(Meta(), strict)
    assert d.reason == "body_part_unknown" and "BodyPartExamined" in d.message
    assert check_header(Meta(body_part="CHESTABDOMEN"), strict).reason == "body_part_unknown"
    assert check_header(Meta(body_part="CHEST"), strict).eligible
    assert strict.as_dict()["require_body_part"] is True


def test_conflicting_fields_the_most_authoritative_decides() -> None:
    """Order: AnatomicRegionSequence > BodyPartExamined > ProtocolName > SeriesDescription > StudyDescription."""
    v = classify_anatomy(Meta(body_part="CHEST", series_description="KNEE AP"))
    assert v.kind == "chest" and v.field == "BodyPartExamined" and "SeriesDescription 'KNEE AP'" in v.note
    d = check_header(Meta(body_part="CHEST", series_description="KNEE AP"), ADULT)
    assert d.eligible and "SeriesDescription" in d.message  # noted in the row's message
    assert check_header(Meta(body_part="KNEE", series_description="CHEST PA"), ADULT).reason == "wrong_body_part"
    v = classify_anatomy(Meta(anatomic_region_code="85562004", body_part="CHEST"))
    assert v.kind == "non_chest" and v.field == "AnatomicRegionSequence" and v.group == "hand"
    # StudyDescription covers the whole study: it only decides when nothing image-level names a region
    assert classify_anatomy(Meta(body_part="CHEST", study_description="KNEE AND CHEST")).kind == "chest"
    assert classify_anatomy(Meta(body_part="CHEST", study_description="KNEE")).note == ""
    assert classify_anatomy(Meta(study_description="KNEE 2 VIEWS")).kind == "non_chest"
    assert classify_anatomy(Meta(body_part="RIBS", study_description="RX TORAX")).kind == "chest"


def test_io_reads_anatomy_and_study_fields(write_dicom) -> None:  # type: ignore[no-untyped-def]
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    from bonescreen.io import read_dicom_meta

    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "51185008", "SCT", "Thorax"
    p = write_dicom(radiograph(), name="a.dcm", BodyPartExamined="CHEST", StudyDescription="RX TORAX",
                    SeriesDescription="TORAX PA", ProtocolName="Thorax pa", AccessionNumber="ACC-7",
                    Manufacturer="Vendor", ManufacturerModelName="DR-1", AnatomicRegionSequence=Sequence([item]))
    m = read_dicom_meta(p)
    assert (m.body_part, m.anatomic_region_code, m.anatomic_region_meaning) == ("CHEST", "51185008", "Thorax")
    assert (m.study_description, m.series_description, m.protocol_name) == ("RX TORAX", "TORAX PA", "Thorax pa")
    assert (m.accession_number, m.manufacturer, m.manufacturer_model_name) == ("ACC-7", "Vendor", "DR-1")
    assert m.sop_class_uid == "1.2.840.10008.5.1.4.1.1.1"
    assert classify_anatomy(m).kind == "chest"


def test_screen_refuses_a_tibia_in_its_own_header(tmp_path: Path, pydicom_data_dir: Path) -> None:
    """The issue's first finding: pydicom-data's CR tibia (BodyPartExamined EXTREMITY, age 65) was 'normal'."""
    from _screen_helpers import make_artifact

    from bonescreen.screen import ScreenOptions, screen

    model = make_artifact(tmp_path / "m.pt", size=64)
    import csv

    s = screen([pydicom_data_dir / "RG3_UNCR.dcm", pydicom_data_dir / "RG1_UNCR.dcm"], model, tmp_path / "out",
               options=ScreenOptions(progress=False, gate={"allow_unknown": ["age", "view"]}))
    rows = {Path(r["path"]).name: r for r in csv.DictReader(open(tmp_path / "out" / "results.csv"))}
    assert rows["RG3_UNCR.dcm"]["reason"] == "wrong_body_part"
    assert "EXTREMITY" in rows["RG3_UNCR.dcm"]["message"] and rows["RG3_UNCR.dcm"]["body_part"] == "EXTREMITY"
    assert rows["RG1_UNCR.dcm"]["reason"] != "wrong_body_part"  # the real chest CR (BodyPartExamined CHEST)
    assert s.reasons.get("wrong_body_part") == 1
