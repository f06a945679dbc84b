"""The worklist page in a real headless Chromium (Debian's /usr/bin/chromium driven by Playwright)."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (no browser download needed)")
uvicorn = pytest.importorskip("uvicorn")

from bonescreen.service.api import create_app
from bonescreen.service.config import ServiceConfig
from bonescreen.service.runtime import Service
from _service_support import free_port

USER, PASSWORD = "dr.house", "vicodin-and-dxa"


def _chromium() -> str | None:
    for cand in (os.environ.get("BONESCREEN_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                 shutil.which("chromium-browser")):
        if cand and Path(cand).is_file():
            return cand
    return None


# (patient, study date, category, score, flag, study); PAT-B's study has a second (normal) image
# and a lateral the gate skipped: the worklist shows one row per study, decided by its riskiest image
ROWS = [
    ("PAT-A", dt.date(2024, 1, 10), "normal", 0.20, False, 1),
    ("PAT-B", dt.date(2024, 2, 10), "low_bone_mass", 0.71, True, 2),
    ("PAT-C", dt.date(2024, 3, 10), "osteoporosis", 0.55, True, 3),
    ("PAT-D", dt.date(2024, 4, 10), "normal", 0.35, False, 4),
    ("PAT-E", dt.date(2024, 5, 10), "low_bone_mass", 0.93, True, 5),
    ("PAT-B", dt.date(2024, 2, 10), "normal", 0.40, False, 2),
    ("PAT-B", dt.date(2024, 2, 10), None, None, False, 2),
]


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[tuple[str, Service]]:
    from PIL import Image

    # no worker here (rows are written directly), so the model path is never opened
    cfg = ServiceConfig(model=str(tmp_path / "unused.pt"), data_dir=str(tmp_path / "data"),
                        dicom_enabled=False).validate()
    svc = Service(cfg, worker=False)
    from bonescreen.service.auth import hash_password

    svc.store.add_user(USER, "reviewer", hash_password(PASSWORD))
    rng = np.random.default_rng(0)
    for i, (pid, date, cat, score, flag, study) in enumerate(ROWS):
        sop = f"1.2.826.0.1.77.{i + 1}"
        job = svc.store.enqueue(sop, f"1.2.826.0.1.78.{study}", f"spool/{i}.dcm", "http")
        rel = f"results/{i:02d}/x{i}.overlay.png"
        (svc.data_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (48, 48, 3)).astype(np.uint8)).save(svc.data_dir / rel)
        svc.store.claim("test:1:x", 1, 60)
        svc.store.complete(job.job_id, "test", {"eligible": cat is not None, "patient_id": pid, "study_date": date,
                                                "category": cat, "score": score, "flag": flag, "sex": "F", "age": 66,
                                                "overlay_path": rel if cat else None,
                                                "reason": None if cat else "lateral_view"})
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(svc), host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    t0 = time.time()
    while not srv.started:
        assert time.time() - t0 < 30, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", svc
    finally:
        srv.should_exit = True
        th.join(15)


@pytest.fixture()
def page() -> Iterator[Any]:
    exe = _chromium()
    if exe is None:
        pytest.skip("Chromium not installed (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox"])
        try:
            yield browser.new_page()
        finally:
            browser.close()


def _patients(page: Any) -> list[str]:
    return [t.strip() for t in page.locator("tr.row td.patient").all_inner_texts()]


def test_worklist_in_chromium(server: tuple[str, Service], page: Any) -> None:
    base, svc = server
    page.goto(f"{base}/worklist")
    assert page.url.endswith("/login")  # no session, no worklist
    page.fill("#username", USER)
    page.fill("#password", "wrong password")
    page.click("#login")
    assert page.locator("#login-error").is_visible()
    page.fill("#username", USER)
    page.fill("#password", PASSWORD)
    page.click("#login")
    page.wait_for_url(f"{base}/worklist")
    # one row per patient study, flagged first (by score), then the rest by score
    assert _patients(page) == ["PAT-E", "PAT-B", "PAT-C", "PAT-D", "PAT-A"]
    flags = page.locator("tr.row").evaluate_all("rs => rs.map(r => r.dataset.flag)")
    assert flags == ["1", "1", "1", "0", "0"]
    # every thumbnail (Grad-CAM overlay, behind the token cookie) actually loaded
    widths = page.locator("img.thumb").evaluate_all("imgs => imgs.map(i => i.complete && i.naturalWidth)")
    assert widths == [48] * 5
    # PAT-B's study: its low-bone-mass image decides; its three images are listed inside
    b = page.locator('tr.row[data-study="1.2.826.0.1.78.2"]')
    assert b.get_attribute("data-sop") == "1.2.826.0.1.77.2" and b.get_attribute("data-category") == "low_bone_mass"
    assert b.locator("li.image").count() == 3 and "2 of 3 screened" in b.locator("summary").inner_text()
    b.locator("summary").click()
    assert "skipped: lateral_view" in b.locator("ul.study-images").inner_text()
    assert "(decides)" in b.locator('li.image[data-sop="1.2.826.0.1.77.2"]').inner_text()
    # filters: category, then date range
    page.select_option("#category", "low_bone_mass")
    page.click("#apply")
    page.wait_for_load_state()
    assert _patients(page) == ["PAT-E", "PAT-B"]
    page.select_option("#category", "")
    page.fill("#date_from", "2024-02-01")
    page.fill("#date_to", "2024-04-30")
    page.click("#apply")
    page.wait_for_load_state()
    assert _patients(page) == ["PAT-B", "PAT-C", "PAT-D"]
    # the status is per study: set on PAT-B's study, every one of its images has it
    page.goto(f"{base}/worklist")
    b = page.locator('tr.row[data-study="1.2.826.0.1.78.2"]')
    b.locator("select.review").select_option("acknowledged")
    b.locator(".saved").wait_for(state="visible")
    assert b.locator(".saved").inner_text() == "saved"
    assert [svc.store.get_result(f"1.2.826.0.1.77.{k}").review_status for k in (2, 6, 7)] == ["acknowledged"] * 3  # type: ignore[union-attr]
    # a clinician sets a status; it is stored and shown after reload
    row = page.locator('tr.row[data-sop="1.2.826.0.1.77.3"]')
    row.locator("select.review").select_option("dxa_ordered")
    row.locator(".saved").wait_for(state="visible")
    assert row.locator(".saved").inner_text() == "saved"
    stored = svc.store.get_result("1.2.826.0.1.77.3")
    assert stored is not None and stored.review_status == "dxa_ordered" and stored.reviewed_by == USER
    events = [(e.actor, e.action, e.target) for e in svc.store.audit_events(action="review")]  # newest first
    assert events[0] == (USER, "review", "1.2.826.0.1.77.3")
    # the study review before it: one audited review per image of PAT-B's study
    assert sorted(events[1:]) == [(USER, "review", f"1.2.826.0.1.77.{k}") for k in (2, 6, 7)]
    page.reload()
    assert page.locator('tr.row[data-sop="1.2.826.0.1.77.3"] select.review').input_value() == "dxa_ordered"
    page.goto(f"{base}/worklist?review_status=dxa_ordered")
    assert _patients(page) == ["PAT-C"]
    page.goto(f"{base}/logout")
    page.goto(f"{base}/worklist")
    assert page.url.endswith("/login")
