"""Site profiles inside the one screening engine: `screen --site-profile`, the service's `site_profile`,
the abstain band in results, studies, the SR and the worklist, and the refusals."""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from bonescreen.adapt.abstain import ABSTAIN_REASON, INDETERMINATE_MESSAGE, AbstainBand
from bonescreen.adapt.profile import ProfileError, SiteProfile, read_payload, write_profile
from bonescreen.adapt.recalibrate import Recalibration
from bonescreen.artifact import atomic_torch_save, load_artifact, weights_fingerprint
from bonescreen.screen import ScreenOptions, rollup_study, screen
from bonescreen.screen.models import ScreenError
from _service_support import make_cxr_bytes, make_tiny_artifact

PROFILE = "SITE_X"
N_STUDIES = 5


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny model, 10 chest CRs in 5 studies of 2, their scores without a profile, and a profile whose
    cut-off is the median score and whose abstain band holds the 3rd-6th lowest scores."""
    d = tmp_path_factory.mktemp("adapt-screen")
    model = make_tiny_artifact(d / "m.pt", size=64, min_size=32)
    folder = d / "in"
    folder.mkdir()
    for i in range(2 * N_STUDIES):
        (folder / f"img{i:02d}.dcm").write_bytes(
            make_cxr_bytes(seed=40 + i, study_uid=f"1.2.826.0.1.4343.{i // 2 + 1}"))
    screen([folder], model, d / "base", options=ScreenOptions(progress=False))
    base = {r["image_id"]: r for r in _rows(d / "base" / "results.csv")}
    assert all(r["eligible"] == "True" for r in base.values()) and len(base) == 2 * N_STUDIES
    scores = sorted(float(r["score"]) for r in base.values())
    assert len(set(scores)) == len(scores)  # distinct, so the band below is not degenerate
    threshold = float(np.median(scores))
    band = AbstainBand(scores[2], scores[6], "score")
    prof = SiteProfile(name=PROFILE, kind="calibrated", model_fingerprint=weights_fingerprint(load_artifact(model).model),
                       task="stage2", threshold=threshold, recalibration=Recalibration("platt", {"a": 0.3, "b": 1.5}),
                       abstain=band, data={"n": 200})
    write_profile(model, prof)
    return {"dir": d, "model": model, "folder": folder, "base": base, "profile": prof}


def _expected(score: float, prof: SiteProfile) -> str:
    assert prof.abstain is not None
    if prof.abstain.low <= score < prof.abstain.high:
        return "indeterminate"
    return "low_bone_mass" if score >= prof.threshold else "normal"


@pytest.fixture(scope="module")
def profiled(site: dict[str, Any]) -> Path:
    out = site["dir"] / "profiled"
    summary = screen([site["folder"]], site["model"], out,
                     options=ScreenOptions(progress=False, dicom_sr=True, site_profile=PROFILE))
    assert summary.site_profile == PROFILE and f"site profile {PROFILE}" in summary.text()
    return out


def test_screen_applies_the_profile_and_the_abstain_band(site: dict[str, Any], profiled: Path) -> None:
    prof: SiteProfile = site["profile"]
    rows = _rows(profiled / "results.csv")
    assert len(rows) == 2 * N_STUDIES
    cats = []
    for r in rows:
        s = float(r["score"])
        assert s == pytest.approx(float(site["base"][r["image_id"]]["score"]), abs=1e-9)  # same network
        assert r["site_profile"] == PROFILE
        assert float(r["site_probability"]) == pytest.approx(float(prof.probability([s])[0]), abs=1e-9)
        assert float(r["threshold_stage2"]) == pytest.approx(prof.threshold)
        want = _expected(s, prof)
        assert r["category"] == want, (s, prof.threshold, prof.abstain)
        if want == "indeterminate":
            assert r["reason"] == ABSTAIN_REASON and r["flag"] == "True" and INDETERMINATE_MESSAGE in r["message"]
        else:
            assert r["reason"] == "" and r["flag"] == str(want == "low_bone_mass")
        cats.append(want)
    assert cats.count("indeterminate") == 4 and "normal" in cats and "low_bone_mass" in cats
    run = json.loads((profiled / "run.json").read_text())
    assert run["site_profile"]["name"] == PROFILE and run["site_profile"]["abstain_band"] == [
        prof.abstain.low, prof.abstain.high]  # type: ignore[union-attr]
    assert json.loads((profiled / "summary.json").read_text())["categories"]["indeterminate"] == 4
    # without the profile the same images get the model's own cut-off: no indeterminate, no site columns
    assert {r["category"] for r in site["base"].values()} <= {"normal", "low_bone_mass"}
    assert all(r["site_profile"] == "" and r["site_probability"] == "" for r in site["base"].values())


def test_study_roll_up_and_sr_carry_the_indeterminate_outcome(site: dict[str, Any], profiled: Path) -> None:
    rows = {r["image_id"]: r for r in _rows(profiled / "results.csv")}
    studies = _rows(profiled / "studies.csv")
    assert len(studies) == N_STUDIES
    risk = {"normal": 0, "indeterminate": 1, "low_bone_mass": 2}
    seen_indeterminate = 0
    for st in studies:
        imgs = [rows[i] for i in st["image_ids"].split(";")]
        best = max(imgs, key=lambda r: (risk[r["category"]], float(r["score"])))
        assert st["category"] == best["category"] and st["decided_by"] == best["image_id"]
        assert st["sr"]
        sr = pydicom.dcmread(profiled / st["sr"])
        codes = _codes(sr)
        texts = " ".join(_texts(sr))
        assert f"site profile={PROFILE}" in texts and "abstain band=[" in texts
        assert "p-site-calibrated" in codes  # the site probability is a measurement
        if st["category"] == "indeterminate":
            seen_indeterminate += 1
            assert st["flag"] == "True" and st["message"] == INDETERMINATE_MESSAGE
        # SNOMED CT Indeterminate is a finding (the study's or an image's) exactly when an image abstained
        assert ("82334004" in codes) == any(r["category"] == "indeterminate" for r in imgs)
    assert seen_indeterminate >= 1


def _walk(ds: Any) -> Iterator[Any]:
    for item in getattr(ds, "ContentSequence", []):
        yield item
        yield from _walk(item)


def _codes(sr: Any) -> set[str]:
    """Code values of every concept name and coded value (long codes are LongCodeValue)."""
    return {str(getattr(c, "CodeValue", None) or getattr(c, "LongCodeValue", ""))
            for item in _walk(sr) for seq in ("ConceptCodeSequence", "ConceptNameCodeSequence")
            for c in getattr(item, seq, [])}


def _texts(sr: Any) -> list[str]:
    out = [str(item.TextValue) for item in _walk(sr) if item.ValueType == "TEXT"]
    out += [str(c.CodeMeaning) for item in _walk(sr) for c in getattr(item, "ConceptCodeSequence", [])]
    return out


def test_service_worker_and_worklist_decide_as_screen(site: dict[str, Any], profiled: Path, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from bonescreen.service.api import create_app
    from bonescreen.service.auth import hash_password
    from bonescreen.service.config import ServiceConfig
    from bonescreen.service.runtime import Service
    from bonescreen.service.worker import Worker, engine_for

    cfg = ServiceConfig(model=str(site["model"]), data_dir=str(tmp_path / "svc"), dicom_enabled=False,
                        site_profile=PROFILE).validate()
    svc = Service(cfg, worker=False)
    for f in sorted(site["folder"].iterdir()):
        svc.intake.accept_file_bytes(f.read_bytes())
    worker = Worker(cfg, svc.store, engine_for(cfg))
    worker.process(svc.store.claim(worker.worker_id, 32, 300))
    by_sop = {r["image_id"]: r for r in _rows(profiled / "results.csv")}
    results = {r.sop_instance_uid: r.as_dict() for r in svc.store.query_results(limit=50)}
    assert set(results) == set(by_sop)
    for sop, row in by_sop.items():
        res = results[sop]
        assert (res["category"], bool(res["flag"]), res["reason"] or "") == (
            row["category"], row["flag"] == "True", row["reason"])
        assert res["score"] == pytest.approx(float(row["score"]), abs=1e-9)
        assert res["site_profile"] == PROFILE
        assert res["site_probability"] == pytest.approx(float(row["site_probability"]), abs=1e-9)
    studies = {s["study_instance_uid"]: s for s in svc.store.query_studies(limit=50)}
    n_ind = 0
    n_any = len({row["study_instance_uid"] for row in by_sop.values() if row["category"] == "indeterminate"})
    for st in _rows(profiled / "studies.csv"):
        assert studies[st["study_instance_uid"]]["category"] == st["category"]
        n_ind += st["category"] == "indeterminate"
        if st["category"] == "indeterminate":  # the service's study SR says so too
            sr_rel = next(r.sr_path for r in svc.store.study_results(st["study_instance_uid"]) if r.sr_path)
            assert "82334004" in _codes(pydicom.dcmread(cfg.data_path / sr_rel))
    assert n_ind >= 1
    # the worklist shows the outcome by its name, and filters on it
    svc.store.add_user("dr.who", "reviewer", hash_password("correct horse battery"))
    with TestClient(create_app(svc)) as client:
        page = client.get("/login")
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
        client.post("/login", data={"username": "dr.who", "password": "correct horse battery", "csrf": csrf})
        html = client.get("/worklist").text
        assert html.count('class="badge cat-indeterminate"') == n_ind
        assert "Indeterminate: consider DXA" in html
        only = client.get("/worklist", params={"category": "indeterminate"}).text
        assert only.count('class="row study') == n_any  # studies with an indeterminate image


def test_profile_refusals(site: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bonescreen.cli import main as cli
    from bonescreen.service.config import ServiceConfig, ServiceConfigError
    from bonescreen.service.worker import engine_for

    opts = ScreenOptions(progress=False, site_profile=PROFILE)
    # a profile copied into another model's artifact: refused at use, naming the reason
    other = make_tiny_artifact(tmp_path / "other.pt", seed=7, size=64, min_size=32)
    payload = read_payload(other)
    payload["site_profiles"] = {PROFILE: site["profile"].to_dict()}
    atomic_torch_save(payload, other)
    with pytest.raises(ProfileError, match="fitted for other weights"):
        screen([site["folder"]], other, tmp_path / "o1", options=opts)
    assert not (tmp_path / "o1" / "results.csv").exists()
    with pytest.raises(ProfileError, match="no site profile 'NOPE'; it has \\['SITE_X'\\]"):
        screen([site["folder"]], site["model"], tmp_path / "o2",
               options=ScreenOptions(progress=False, site_profile="NOPE"))
    with pytest.raises(ScreenError, match="both set the cut-off"):
        screen([site["folder"]], site["model"], tmp_path / "o3",
               options=ScreenOptions(progress=False, site_profile=PROFILE, threshold=0.4))
    # the CLI: a clear message and exit status 1
    capsys.readouterr()
    assert cli(["screen", str(site["folder"]), "--model", str(other), "--out", str(tmp_path / "o4"),
                "--site-profile", PROFILE, "--no-progress"]) == 1
    assert "fitted for other weights" in capsys.readouterr().err
    # the service: typed setting, refused with a threshold, and for another model's weights at start
    with pytest.raises(ServiceConfigError, match="site_profile: profile name"):
        ServiceConfig(model=str(site["model"]), site_profile="a b")
    with pytest.raises(ServiceConfigError, match="both set the cut-off"):
        ServiceConfig(model=str(site["model"]), dicom_enabled=False, site_profile=PROFILE, threshold=0.4).validate()
    with pytest.raises(ProfileError, match="fitted for other weights"):
        engine_for(ServiceConfig(model=str(other), data_dir=str(tmp_path / "svc"), dicom_enabled=False,
                                 site_profile=PROFILE))
    # a resumed run must not mix decisions made with and without the profile
    with pytest.raises(ScreenError, match="different settings.*site_profile"):
        screen([site["folder"]], site["model"], site["dir"] / "base", options=opts)


def test_rollup_ranks_indeterminate_between_normal_and_positive() -> None:
    def row(i: int, cat: str, score: float) -> dict[str, Any]:
        return {"image_id": str(i), "eligible": True, "category": cat, "score": score,
                "flag": cat != "normal", "reason": ABSTAIN_REASON if cat == "indeterminate" else ""}

    st = rollup_study([row(1, "normal", 0.2), row(2, "indeterminate", 0.45)])
    assert st["category"] == "indeterminate" and st["flag"] and st["message"] == INDETERMINATE_MESSAGE
    assert st["decided_by"] == "2" and st["reason"] == ABSTAIN_REASON
    st = rollup_study([row(1, "low_bone_mass", 0.6), row(2, "indeterminate", 0.45)])
    assert st["category"] == "low_bone_mass" and st["message"] == "" and st["decided_by"] == "1"
