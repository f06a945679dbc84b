"""One engine: `screen` and the service decide identically; study roll-up, studies.csv and the SR per study."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pydicom
import pytest

from bonescreen.screen import ScreenOptions, rollup_study, screen
from _service_support import make_cxr_bytes, make_tiny_artifact


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _noise_cxr(seed: int) -> bytes:
    """A valid adult chest CR header around uniform noise."""
    import io

    from _service_support import make_cxr_dataset

    ds = make_cxr_dataset(seed=seed, study_uid="1.2.826.0.1.4242.9")
    ds.PixelData = np.random.default_rng(seed).integers(0, 4096, (64, 64), dtype=np.uint16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("same")
    files = {
        "s1_a.dcm": make_cxr_bytes(seed=21, study_uid="1.2.826.0.1.4242.1"),
        "s1_b.dcm": make_cxr_bytes(seed=22, study_uid="1.2.826.0.1.4242.1"),
        "s1_lat.dcm": make_cxr_bytes(seed=23, study_uid="1.2.826.0.1.4242.1", view="LL"),
        "s2_a.dcm": make_cxr_bytes(seed=24, study_uid="1.2.826.0.1.4242.2", modality="DX"),
        "s3_child.dcm": make_cxr_bytes(seed=25, study_uid="1.2.826.0.1.4242.3", age="030Y"),
        "s3_lat.dcm": make_cxr_bytes(seed=26, study_uid="1.2.826.0.1.4242.3", view="LL"),
        "s4_noise.dcm": _noise_cxr(27),
    }
    for name, data in files.items():
        (d / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        (d / "in" / name).write_bytes(data)
    return d


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_artifact(tmp_path_factory.mktemp("m") / "m.pt", size=64, min_size=32)


@pytest.fixture(scope="module")
def band_model(folder: Path, model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same model with its OOD flag band moved so that exactly one eligible image lies in it."""
    import torch

    d = tmp_path_factory.mktemp("band")
    screen([folder / "in"], model, d / "probe", options=ScreenOptions(progress=False))
    scores = sorted(float(r["ood_score"]) for r in _rows(d / "probe" / "results.csv") if r["eligible"] == "True")
    assert len(scores) >= 2 and scores[-1] > scores[-2] and scores[-1] <= 1.0
    payload = torch.load(model, weights_only=True)
    ratio = (scores[-1] + scores[-2]) / 2
    payload["ood"]["flag_threshold"] = float(payload["ood"]["threshold"]) * ratio
    torch.save(payload, d / "band.pt")
    return d / "band.pt"


@pytest.mark.parametrize("kind", ["plain", "flag_band"])
def test_screen_and_service_give_identical_decisions(folder: Path, model: Path, band_model: Path, tmp_path: Path,
                                                     kind: str) -> None:
    from bonescreen.service.config import ServiceConfig
    from bonescreen.service.intake import Intake
    from bonescreen.service.store import Store
    from bonescreen.service.worker import Worker, engine_for

    model = band_model if kind == "flag_band" else model
    screen([folder / "in"], model, tmp_path / "screen", options=ScreenOptions(progress=False, dicom_sr=True))
    by_sop = {r["image_id"]: r for r in _rows(tmp_path / "screen" / "results.csv")}

    cfg = ServiceConfig(model=str(model), data_dir=str(tmp_path / "svc"), dicom_enabled=False)
    cfg.data_path.mkdir(parents=True)
    store = Store(cfg.database_url)
    store.create_all()
    intake = Intake(store, cfg.data_path)
    for f in sorted((folder / "in").iterdir()):
        intake.accept_file_bytes(f.read_bytes())
    worker = Worker(cfg, store, engine_for(cfg))
    worker.process(store.claim(worker.worker_id, 16, 300))
    results = {r.sop_instance_uid: r for r in store.query_results(limit=50)}
    assert set(results) == set(by_sop) and len(results) == 7

    def num(v: object) -> float | None:
        return None if v in (None, "") else float(v)  # type: ignore[arg-type]

    for sop, row in by_sop.items():
        res = results[sop]
        assert (res.reason or "") == row["reason"], (sop, res.reason, row["reason"])
        assert (res.category or "") == row["category"]
        assert res.eligible == (row["eligible"] == "True")
        assert bool(res.flag) == (row["flag"] == "True")
        for a, b in ((res.score, row["score"]), (res.ood_score, row["ood_score"])):
            assert (a is None and b == "") or num(a) == pytest.approx(num(b), abs=1e-9)
        assert res.ood_check == row["ood_check"] == "refuse"
        assert res.series_instance_uid == row["series_instance_uid"] and res.accession_number == row["accession_number"]
        assert res.manufacturer == row["manufacturer"] == "bonescreen-test"
    reasons = {row["reason"] for row in by_sop.values()}
    assert {"lateral_view", "age_out_of_range"} <= reasons
    borderline = [row for row in by_sop.values() if row["reason"] == "ood_borderline"]
    assert len(borderline) == (1 if kind == "flag_band" else 0)
    for row in borderline:  # in the flag band: scored, eligible, and the message says why
        assert row["eligible"] == "True" and row["category"] and "flag band" in row["message"]
        assert float(row["ood_score"]) <= 1.0
        # the study's SR says so in the image's group
        st = {r["study_instance_uid"]: r for r in _rows(tmp_path / "screen" / "studies.csv")}[row["study_instance_uid"]]
        sr = pydicom.dcmread(tmp_path / "screen" / st["sr"])
        texts = [str(c.TextValue) for g in sr.ContentSequence if g.ValueType == "CONTAINER"
                 for gg in g.ContentSequence if gg.ValueType == "CONTAINER"
                 for c in gg.ContentSequence if c.ValueType == "TEXT"]
        assert sum("[OOD review]" in t for t in texts) == 1
    # the study roll-up is the same function on both sides
    studies = {s["study_instance_uid"]: s for s in store.query_studies(limit=50)}
    for st in _rows(tmp_path / "screen" / "studies.csv"):
        svc = studies[st["study_instance_uid"]]
        assert (svc["decided_by"] or "") == st["decided_by"] and (svc["category"] or "") == st["category"]
        assert ";".join(svc["image_ids"]) == st["image_ids"]


def test_studies_table_and_roll_up(folder: Path, model: Path, tmp_path: Path) -> None:
    s = screen([folder / "in"], model, tmp_path / "out", options=ScreenOptions(progress=False, dicom_sr=True))
    assert s.n_studies == 4
    rows = {r["image_id"]: r for r in _rows(tmp_path / "out" / "results.csv")}
    studies = {r["study_instance_uid"]: r for r in _rows(tmp_path / "out" / "studies.csv")}
    assert set(studies) == {f"1.2.826.0.1.4242.{k}" for k in (1, 2, 3, 9)}
    one = studies["1.2.826.0.1.4242.1"]
    used = one["image_ids"].split(";")
    assert one["n_images"] == "3" and one["n_eligible"] == "2" and len(used) == 2  # the lateral is not used
    assert one["decided_by"] in used and one["accession_number"]
    best = max((rows[i] for i in used), key=lambda r: ({"normal": 0, "low_bone_mass": 1}[r["category"]],
                                                        float(r["score"])))
    assert one["decided_by"] == best["image_id"] and one["category"] == best["category"]
    none = studies["1.2.826.0.1.4242.3"]  # a child and a lateral: the study row says why
    assert none["eligible"] == "False" and none["reason"] == "no_eligible_image"
    assert "age_out_of_range x1" in none["message"] and "lateral_view x1" in none["message"]
    assert none["sr"] == ""
    for r in rows.values():  # every row carries the study-level columns
        assert r["study_instance_uid"] and r["series_instance_uid"] and r["accession_number"]
        assert r["sop_class_uid"] and r["manufacturer_model_name"] == "" and r["body_part"] == "CHEST"


def test_one_sr_per_study_references_every_image_it_used(folder: Path, model: Path, tmp_path: Path) -> None:
    screen([folder / "in"], model, tmp_path / "out", options=ScreenOptions(progress=False, dicom_sr=True))
    out = tmp_path / "out"
    study = {r["study_instance_uid"]: r for r in _rows(out / "studies.csv")}["1.2.826.0.1.4242.1"]
    assert sorted(p.name for p in (out / "dicom").glob("*.SR.dcm")) == sorted(
        Path(r["sr"]).name for r in _rows(out / "studies.csv") if r["sr"])  # one file per study, no others
    sr = pydicom.dcmread(out / study["sr"])
    assert sr.StudyInstanceUID == "1.2.826.0.1.4242.1" and sr.Modality == "SR"
    refs = [i.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
            for se in s.ReferencedSeriesSequence for i in se.ReferencedSOPSequence]
    assert sorted(refs) == sorted(study["image_ids"].split(";"))
    groups = [i for i in sr.ContentSequence if i.ValueType == "CONTAINER"][0].ContentSequence
    assert len(groups) == 3  # the study group + one per image
    texts = [str(c.TextValue) for g in groups for c in g.ContentSequence if c.ValueType == "TEXT"]
    assert any("study of 2 images" in t for t in texts) and any("decides the study" in t for t in texts)
    # re-screening the same study gives the same SR UID (a PACS replaces it)
    screen([folder / "in"], model, tmp_path / "again", options=ScreenOptions(progress=False, dicom_sr=True))
    again = {r["study_instance_uid"]: r for r in _rows(tmp_path / "again" / "studies.csv")}["1.2.826.0.1.4242.1"]
    assert pydicom.dcmread(tmp_path / "again" / again["sr"]).SOPInstanceUID == sr.SOPInstanceUID


def test_rollup_policy() -> None:
    rows = [
        {"image_id": "a", "eligible": True, "category": "normal", "score": 0.40, "flag": False},
        {"image_id": "b", "eligible": True, "category": "low_bone_mass", "score": 0.55, "flag": True},
        {"image_id": "c", "eligible": True, "category": "low_bone_mass", "score": 0.70, "flag": True},
        {"image_id": "d", "eligible": False, "reason": "lateral_view"},
    ]
    r = rollup_study(rows)
    assert r["decided_by"] == "c" and r["category"] == "low_bone_mass" and r["flag"] is True
    assert r["image_ids"] == ["a", "b", "c"] and r["n_images"] == 4 and r["n_eligible"] == 3
    # osteoporosis outranks a higher stage-2 score
    r = rollup_study([*rows, {"image_id": "e", "eligible": True, "category": "osteoporosis", "score": None,
                              "score_stage1": 0.8, "flag": True}])
    assert r["decided_by"] == "e"
    # an image flagged out-of-distribution (--ood flag) decides only when nothing else can
    flagged = {"image_id": "f", "eligible": True, "category": "osteoporosis", "score": 0.9, "flag": True,
               "reason": "out_of_distribution", "ood_score": 1.7}
    r = rollup_study([rows[0], flagged])
    assert r["decided_by"] == "a" and r["ood_score"] == 1.7
    assert rollup_study([flagged])["decided_by"] == "f"
    # so does an image in the flag band below the refusal threshold (ood_borderline)
    border = {**flagged, "reason": "ood_borderline", "ood_score": 0.8}
    assert rollup_study([rows[0], border])["decided_by"] == "a"
    r = rollup_study([border])
    assert r["decided_by"] == "f" and r["reason"] == "ood_borderline"
    r = rollup_study([rows[3]])
    assert r["eligible"] is False and r["reason"] == "no_eligible_image" and r["decided_by"] is None
