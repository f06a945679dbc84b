"""The HTTP API end to end (FastAPI TestClient, real worker and SQLite store)."""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient

from bonescreen.service.api import create_app
from bonescreen.service.config import ServiceConfig
from bonescreen.service.runtime import Service
from _service_support import make_cxr_bytes, make_tiny_artifact

TOKEN = "test-token-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DICOM = {**AUTH, "Content-Type": "application/dicom"}
PHI_ID = "PHI98765"
PHI_NAME = "SECRETNAME^ALICE"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_artifact(tmp_path_factory.mktemp("model") / "tiny.pt", size=64, min_size=32)


@pytest.fixture()
def client(artifact: Path, tmp_path: Path) -> Iterator[TestClient]:
    cfg = ServiceConfig(model=str(artifact), data_dir=str(tmp_path / "data"), dicom_enabled=False,
                        max_upload_mb=0.05, poll_seconds=0.05, token_role="admin").validate()
    svc = Service(cfg, token=TOKEN)
    with TestClient(create_app(svc)) as c:
        yield c


def _wait(c: TestClient, sop: str, timeout: float = 60) -> dict[str, Any]:
    t0 = time.time()
    while time.time() - t0 < timeout:
        r = c.get(f"/api/v1/images/{sop}", headers=AUTH)
        assert r.status_code == 200, r.text
        if r.json()["status"] in ("done", "failed"):
            return r.json()
        time.sleep(0.1)
    raise AssertionError(f"no result for {sop} in {timeout} s")


def test_health_is_open_everything_else_needs_the_token(client: TestClient) -> None:
    assert client.get("/health").json()["status"] == "ok"
    for method, path in [("GET", "/metrics"), ("GET", "/openapi.json"), ("GET", "/api/v1/results"),
                         ("GET", "/api/v1/results/1.2.3"), ("GET", "/api/v1/results/1.2.3/sr"),
                         ("GET", "/api/v1/results/1.2.3/overlay"), ("GET", "/api/v1/images/1.2.3"),
                         ("POST", "/api/v1/images"), ("PUT", "/api/v1/results/1.2.3/review")]:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = client.request(method, path, headers=headers)
            assert r.status_code == 401, (method, path, r.status_code)
    r = client.get("/worklist", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert client.get("/metrics", headers={"X-API-Token": TOKEN}).status_code == 200
    schema = client.get("/openapi.json", headers=AUTH).json()
    for p in ("/api/v1/images", "/api/v1/results", "/api/v1/results/{sop_instance_uid}/sr", "/health"):
        assert p in schema["paths"]


def test_upload_screen_query_sr_overlay_review(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    import pydicom
    from PIL import Image

    caplog.set_level(logging.DEBUG)
    data = make_cxr_bytes(seed=11, patient_id=PHI_ID, patient_name=PHI_NAME, study_uid="1.2.826.0.1.99.1")
    r = client.post("/api/v1/images", content=data, headers=DICOM)
    assert r.status_code == 202, r.text
    sop = r.json()["sop_instance_uid"]
    assert r.json()["duplicate"] is False
    res = _wait(client, sop)["result"]
    assert res["eligible"] and res["category"] in ("normal", "low_bone_mass")
    assert 0.0 <= res["score"] <= 1.0 and res["flag"] == (res["category"] == "low_bone_mass")
    assert res["patient_id"] == PHI_ID and res["patient_name"] is None  # names only when configured
    assert res["study_date"] == "2024-01-15" and res["has_sr"] and res["has_overlay"]
    # same image again: no second job, no second result
    r2 = client.post("/api/v1/images", content=data, headers=DICOM)
    assert r2.status_code == 202 and r2.json()["duplicate"] is True
    by_study = client.get("/api/v1/results", params={"study_instance_uid": "1.2.826.0.1.99.1"}, headers=AUTH).json()
    assert by_study["count"] == 1 and by_study["results"][0]["sop_instance_uid"] == sop
    by_patient = client.get("/api/v1/results", params={"patient_id": PHI_ID}, headers=AUTH).json()
    assert [x["sop_instance_uid"] for x in by_patient["results"]] == [sop]
    assert client.get("/api/v1/results", params={"patient_id": "OTHER"}, headers=AUTH).json()["count"] == 0
    # the SR references the source image and carries the category
    sr = client.get(f"/api/v1/results/{sop}/sr", headers=AUTH)
    assert sr.status_code == 200 and sr.headers["content-type"] == "application/dicom"
    ds = pydicom.dcmread(io.BytesIO(sr.content))
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert ds.PatientID == PHI_ID and ds.StudyInstanceUID == "1.2.826.0.1.99.1"
    refs = [i.ReferencedSOPInstanceUID for e in ds.CurrentRequestedProcedureEvidenceSequence
            for s in e.ReferencedSeriesSequence for i in s.ReferencedSOPSequence]
    assert refs == [sop]
    png = client.get(f"/api/v1/results/{sop}/overlay", headers=AUTH)
    assert png.headers["content-type"] == "image/png"
    img = Image.open(io.BytesIO(png.content))
    assert img.size == (64, 64) and img.mode == "RGB"
    # review status
    r = client.put(f"/api/v1/results/{sop}/review", json={"status": "dxa_ordered"}, headers=AUTH)
    assert r.status_code == 200 and r.json()["review_status"] == "dxa_ordered"
    assert client.put(f"/api/v1/results/{sop}/review", json={"status": "bogus"}, headers=AUTH).status_code == 422
    assert client.get(f"/api/v1/results/{sop}", headers=AUTH).json()["review_status"] == "dxa_ordered"
    metrics = client.get("/metrics", headers=AUTH).text
    assert 'bonescreen_jobs{status="done"} 1.0' in metrics and "bonescreen_http_uploads_total 2.0" in metrics
    # no PHI in any log record of the service (patient id, name, UIDs); the test's own HTTP
    # client (httpx) logs full URLs and is not part of the service
    text = "\n".join(rec.getMessage() for rec in caplog.records if not rec.name.startswith("httpx"))
    assert text, "expected some log records"
    for secret in (PHI_ID, PHI_NAME, "SECRETNAME", sop, "1.2.826.0.1.99.1"):
        assert secret not in text


def test_ineligible_image_gets_a_reason_and_no_sr(client: TestClient) -> None:
    r = client.post("/api/v1/images", content=make_cxr_bytes(seed=3, age="030Y"), headers=DICOM)
    sop = r.json()["sop_instance_uid"]
    res = _wait(client, sop)["result"]
    assert res["eligible"] is False and res["reason"] == "age_out_of_range" and not res["has_sr"]
    assert client.get(f"/api/v1/results/{sop}/sr", headers=AUTH).status_code == 404
    # skipped images stay off the default worklist query of screened images
    assert client.get("/api/v1/results", params={"eligible": "true"}, headers=AUTH).json()["count"] == 0


def test_bad_uploads_are_refused_and_the_service_stays_up(client: TestClient) -> None:
    import pydicom

    assert client.post("/api/v1/images", content=b"hello, not dicom" * 20, headers=DICOM).status_code == 400
    assert client.post("/api/v1/images", content=b"", headers=DICOM).status_code == 400
    data = bytearray(make_cxr_bytes(seed=1))
    assert client.post("/api/v1/images", content=bytes(data[:200]), headers=DICOM).status_code in (400, 422)
    ds = pydicom.dcmread(io.BytesIO(bytes(data)))
    del ds.PixelData
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    r = client.post("/api/v1/images", content=buf.getvalue(), headers=DICOM)
    assert r.status_code == 422 and "no_pixel_data" in r.json()["detail"]
    big = make_cxr_bytes(seed=2, size=256)  # 128 KiB > the 0.05 MB limit of this fixture
    assert client.post("/api/v1/images", content=big, headers=DICOM).status_code == 413
    assert client.get("/health").json()["status"] == "ok"
    assert client.get("/api/v1/results", headers=AUTH).json()["count"] == 0


def test_no_path_traversal(client: TestClient) -> None:
    for path in ("/api/v1/results/..%2F..%2Fetc%2Fpasswd/sr", "/api/v1/results/../../etc/passwd",
                 "/api/v1/results/1.2.3%2F..%2F..%2Fbonescreen.db/overlay", "/api/v1/images/..%2Fspool"):
        assert client.get(path, headers=AUTH).status_code in (404, 422), path
    # even a stored path that points outside the data folder is never served
    r = client.post("/api/v1/images", content=make_cxr_bytes(seed=7), headers=DICOM)
    sop = r.json()["sop_instance_uid"]
    _wait(client, sop)
    svc: Service = client.app.state.service  # type: ignore[attr-defined]
    from sqlalchemy import update

    from bonescreen.service.store import Result

    with svc.store.session() as s:
        s.execute(update(Result).where(Result.sop_instance_uid == sop).values(sr_path="../../../../etc/passwd"))
    assert client.get(f"/api/v1/results/{sop}/sr", headers=AUTH).status_code == 404
    assert svc.resolve("../bonescreen.db") is None and svc.resolve("/etc/passwd") is None


def test_worklist_login_and_filters(client: TestClient) -> None:
    import re

    from bonescreen.service.auth import hash_password

    svc: Service = client.app.state.service  # type: ignore[attr-defined]
    svc.store.add_user("dr.who", "reviewer", hash_password("correct horse battery"))
    for i, date in enumerate(["20240110", "20240320"]):
        r = client.post("/api/v1/images", content=make_cxr_bytes(seed=20 + i, study_date=date), headers=DICOM)
        _wait(client, r.json()["sop_instance_uid"])

    def sign_in(password: str) -> Any:
        page = client.get("/login")
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
        return client.post("/login", data={"username": "dr.who", "password": password, "csrf": csrf},
                           follow_redirects=False)

    assert sign_in("wrong password!").headers["location"] == "/login?error=1"
    r = sign_in("correct horse battery")
    assert r.status_code == 303 and "httponly" in r.headers["set-cookie"].lower()
    page = client.get("/worklist")
    assert page.status_code == 200 and page.text.count('class="row') == 2
    march = client.get("/worklist", params={"date_from": "2024-03-01"})
    assert march.text.count('class="row') == 1 and "2024-03-20" in march.text


def test_serve_cli_refuses_bad_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bonescreen.cli import main

    assert main(["serve", "--model", str(tmp_path / "m.pt"), "--data-dir", str(tmp_path)]) == 1
    assert "calling AE" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path / "missing.pt"), "--data-dir", str(tmp_path), "--no-dicom",
                 "--port", "0"]) == 1
    assert "not found" in capsys.readouterr().err
    cfg = tmp_path / "svc.yaml"
    cfg.write_text("model: m.pt\nallowed_ae: [X]\n")
    assert main(["serve", "--config", str(cfg)]) == 1
    assert "unknown service config key(s): allowed_ae" in capsys.readouterr().err


def test_second_process_with_the_same_instance_name_refused(client: TestClient) -> None:
    from bonescreen.service.config import ServiceConfigError

    svc: Service = client.app.state.service  # type: ignore[attr-defined]
    other = Service(svc.config, token="x", worker=False)
    with pytest.raises(ServiceConfigError, match="already running"):
        other.start()


def test_worker_preparation_gates_like_screen(artifact: Path, tmp_path: Path) -> None:
    """The worker gates and preprocesses each file with screen's own engine."""
    from bonescreen.service.worker import engine_for

    eng = engine_for(ServiceConfig(model=str(artifact), data_dir=str(tmp_path), explain=False))
    cases = [({"seed": 1}, ""), ({"seed": 2, "age": "030Y"}, "age_out_of_range"), ({"seed": 3, "view": "LL"},
                                                                                    "lateral_view")]
    for kw, reason in cases:
        p = tmp_path / "x.dcm"
        p.write_bytes(make_cxr_bytes(**kw))
        prep = eng.prepare(p)
        assert prep.row["reason"] == reason
        assert (prep.images is None) == bool(reason)
    (tmp_path / "junk.dcm").write_bytes(b"junk" * 100)
    assert eng.prepare(tmp_path / "junk.dcm").row["reason"] == "not_dicom"

def test_category_filter_accepts_every_category_and_refuses_others(client) -> None:  # type: ignore[no-untyped-def]
    """Adult and pediatric categories filter; an unknown word is a 422, not an empty list."""
    for cat in ("normal", "low_bone_mass", "osteoporosis", "not_osteoporosis", "low_bmd", "normal_bmd"):
        assert client.get("/api/v1/results", params={"category": cat}, headers=AUTH).status_code == 200
    assert client.get("/api/v1/results", params={"category": "osteopenia"}, headers=AUTH).status_code == 422
