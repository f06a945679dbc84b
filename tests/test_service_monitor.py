"""The service's /monitor view: the store's results joined to a later DXA export, behind the reviewer role."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from bonescreen.service.api import create_app
from bonescreen.service.auth import hash_password, new_token, token_digest
from bonescreen.service.config import ServiceConfig
from bonescreen.service.runtime import Service


def _service(tmp: Path, **cfg: Any) -> tuple[Service, dict[str, str]]:
    svc = Service(ServiceConfig(model="unused.pt", data_dir=str(tmp / "data"), dicom_enabled=False,
                                worker_enabled=False, **cfg).validate())
    tokens = {}
    for name, role in (("v", "viewer"), ("r", "reviewer")):
        u = svc.store.add_user(name, role, hash_password("monitor-password"))
        tokens[role] = new_token()
        svc.store.add_token(u.id, token_digest(tokens[role]))
    return svc, tokens


@pytest.fixture()
def env(tmp_path: Path) -> Iterator[tuple[TestClient, Service, dict[str, str], pd.DataFrame]]:
    rng = np.random.default_rng(1)
    dxa = []
    rows = []
    for i in range(80):
        day = dt.date(2024, 1 + i % 4, 1 + i % 25)
        score = float(rng.uniform(0.02, 0.98))
        y = int(rng.random() < score)
        rows.append({"patient_id": f"MRN{i}", "study_date": day, "eligible": True, "score": score,
                     "category": "low_bone_mass" if score >= 0.5 else "normal", "flag": score >= 0.5, "sex": "F",
                     "age": 60 + i % 20, "manufacturer": "ACME" if i % 2 else "Other", "manufacturer_model_name": "X"})
        dxa.append({"patient_id": f"MRN{i}", "exam_date": (day + dt.timedelta(days=30)).isoformat(), "sex": "F",
                    "age": str(60 + i % 20), "t_lumbar_spine": "-1.8" if y else "0.2"})
    path = tmp_path / "dxa.csv"
    pd.DataFrame(dxa).to_csv(path, index=False)
    svc, tokens = _service(tmp_path, monitor_dxa=[str(path)])
    for i, r in enumerate(rows):
        job = svc.store.enqueue(f"1.2.3.{i}", f"1.2.4.{i}", f"spool/{i}.dcm", "http")
        svc.store.claim("t:1:x", 1, 60)
        svc.store.complete(job.job_id, "t", r)
    with TestClient(create_app(svc, manage=False, stop_on_shutdown=False)) as c:
        yield c, svc, tokens, pd.DataFrame(rows)
    svc.stop()


def test_monitor_page_and_json(env: tuple) -> None:
    c, _svc, tokens, rows = env
    r = c.get("/monitor", headers={"Authorization": f"Bearer {tokens['reviewer']}"})
    assert r.status_code == 200, r.text[:300]
    assert "bonescreen monitoring" in r.text and "ACME X" in r.text and "data:image/png;base64," in r.text
    assert "img-src 'self' data:" in r.headers["content-security-policy"]
    assert "MRN" not in r.text  # aggregates only
    j = c.get("/api/v1/monitor", headers={"Authorization": f"Bearer {tokens['reviewer']}"}).json()
    assert j["counts"]["joined"] == len(rows) and set(j["by"]["scanner"]) == {"ACME X", "Other X"}
    # least privilege: a viewer may see the worklist, not the monitoring; nobody without credentials
    assert c.get("/monitor", headers={"Authorization": f"Bearer {tokens['viewer']}"}).status_code == 403
    assert c.get("/api/v1/monitor", headers={"Authorization": f"Bearer {tokens['viewer']}"}).status_code == 403
    assert c.get("/monitor", follow_redirects=False).status_code == 303
    assert c.get("/api/v1/monitor").status_code == 401


def test_monitor_not_configured(tmp_path: Path) -> None:
    svc, tokens = _service(tmp_path)
    with TestClient(create_app(svc, manage=False, stop_on_shutdown=False)) as c:
        h = {"Authorization": f"Bearer {tokens['reviewer']}"}
        assert c.get("/monitor", headers=h).status_code == 404
        assert "monitor_dxa" in c.get("/api/v1/monitor", headers=h).json()["detail"]
    svc.stop()
