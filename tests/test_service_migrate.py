"""Alembic migrations: revision 0001 is the deployed schema; an old database with rows upgrades and keeps them.

Each test runs on SQLite and on a real PostgreSQL server (``db_url``, tests/conftest.py).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from sqlalchemy import create_engine, insert, select, text

import _service_schema_v0 as v0
from bonescreen.service import migrate
from bonescreen.service.store import Base, Store, normalise_url


def _diff(url: str, metadata: object) -> list[object]:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    engine = create_engine(normalise_url(url))
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            return [d for d in compare_metadata(ctx, metadata)  # type: ignore[arg-type]
                    if not (isinstance(d, tuple) and d[0] == "remove_table" and d[1].name == "alembic_version")]
    finally:
        engine.dispose()


def test_revision_0001_is_the_schema_main_deployed(db_url: str) -> None:
    store = Store(db_url)
    migrate.upgrade(store, "0001")
    assert migrate.current(store) == "0001"
    assert _diff(db_url, v0.Base.metadata) == []
    store.dispose()


def test_head_matches_the_models(db_url: str) -> None:
    """Every model change comes with a revision: the upgraded schema equals the code's."""
    store = Store(db_url)
    migrate.upgrade(store)
    assert migrate.current(store) == migrate.head()
    assert _diff(db_url, Base.metadata) == []
    store.dispose()


def _legacy_database(url: str) -> None:
    """Made the way main's code made it (``create_all``), with rows in it."""
    engine = create_engine(normalise_url(url))
    v0.Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(v0.Job), [
            {"sop_instance_uid": "1.2.3.1", "study_instance_uid": "1.2.3", "spool_path": "", "source": "dicom",
             "status": "done", "attempts": 1, "received_at": dt.datetime(2024, 1, 1, 8)},
            {"sop_instance_uid": "1.2.3.2", "study_instance_uid": "1.2.3", "spool_path": "spool/ab/x.dcm",
             "source": "http", "status": "pending", "attempts": 0, "received_at": dt.datetime(2024, 1, 1, 9)},
            {"sop_instance_uid": "1.2.3.3", "study_instance_uid": "1.2.3", "spool_path": "", "source": "dicom",
             "status": "done", "attempts": 1, "received_at": dt.datetime(2024, 1, 1, 10)},
        ])
        common = {"eligible": True, "flag": True, "category": "low_bone_mass", "review_status": "dxa_ordered",
                  "forward_attempts": 5, "created_at": dt.datetime(2024, 1, 1, 8, 5)}
        conn.execute(insert(v0.Result), [
            {**common, "job_id": 1, "sop_instance_uid": "1.2.3.1", "patient_id": "P1", "score": 0.9,
             "study_date": dt.date(2024, 1, 1), "forward_status": "failed", "forward_error": "PACS down"},
            {**common, "job_id": 3, "sop_instance_uid": "1.2.3.3", "patient_id": "P2", "score": 0.7, "study_date": None,
             "forward_status": "done", "forward_error": None},
        ])
    engine.dispose()


def test_upgrade_from_the_previous_schema_keeps_every_row(db_url: str, tmp_path: Path) -> None:
    from bonescreen.service.config import ServiceConfig
    from bonescreen.service.migrate import MigrationError
    from bonescreen.service.runtime import Service

    _legacy_database(db_url)
    cfg = dict(model="unused.pt", data_dir=str(tmp_path / "data"), db_url=db_url, dicom_enabled=False)
    # refuse, naming the command, when upgrades are not automatic
    with pytest.raises(MigrationError, match="bonescreen db upgrade"):
        Service(ServiceConfig(**cfg, db_auto_upgrade=False), worker=False)
    store = Store(db_url)
    assert migrate.current(store) is None  # pre-migration: no alembic_version
    store.dispose()
    svc = Service(ServiceConfig(**cfg), worker=False)  # upgrades at start (the default)
    store = svc.store
    assert migrate.current(store) == migrate.head()
    r1, r3 = store.get_result("1.2.3.1"), store.get_result("1.2.3.3")
    assert r1 is not None and r3 is not None
    assert (r1.patient_id, r1.score, r1.review_status, r1.forward_error) == ("P1", 0.9, "dxa_ordered", "PACS down")
    assert r1.study_date == dt.date(2024, 1, 1) and r1.reviewed_by is None
    assert r1.forward_status == "dead_letter" and r3.forward_status == "done"  # "failed" became the dead letter
    assert store.job_status("1.2.3.2") == "pending" and store.pending_count() == 1
    # the upgraded queue works: the old pending job is claimed, new rows get new ids
    jobs = store.claim("w:1:a", 5, 60)
    assert [j.sop_instance_uid for j in jobs] == ["1.2.3.2"]
    assert store.enqueue("1.2.3.4", None, "spool/y.dcm", "http").job_id == 4
    assert [e.action for e in store.audit_events()][-1] == "db_upgrade"
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM results")).scalar() == 2
    # a second start finds it current and changes nothing
    assert migrate.upgrade(store) == (migrate.head(), migrate.head())
    store.dispose()


def test_db_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bonescreen.cli import main

    url = f"sqlite:///{tmp_path / 'old.db'}"
    _legacy_database(url)
    assert main(["db", "current", "--db-url", url, "--data-dir", str(tmp_path)]) == 0
    assert "revision none" in capsys.readouterr().out
    assert main(["db", "upgrade", "--db-url", url, "--data-dir", str(tmp_path)]) == 0
    assert f"0001 -> {migrate.head()}" in capsys.readouterr().out
    assert main(["db", "current", "--db-url", url, "--data-dir", str(tmp_path)]) == 0
    assert f"revision {migrate.head()}; newest {migrate.head()}" in capsys.readouterr().out
    engine = create_engine(url)
    with engine.connect() as conn:
        assert conn.execute(select(v0.Result.patient_id).order_by(v0.Result.id)).scalars().all() == ["P1", "P2"]
    engine.dispose()


def test_concurrent_starts_upgrade_once(tmp_path: Path) -> None:
    """Two processes starting at once on one new database: one migrates, the other waits and finds it current."""
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path / 'new.db'}"
    code = ("import sys; from bonescreen.service.store import Store; from bonescreen.service import migrate; "
            "print(migrate.upgrade(Store(sys.argv[1])))")
    procs = [subprocess.Popen([sys.executable, "-c", code, url], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    assert all(p.returncode == 0 for p in procs)
    assert outs == sorted([f"(None, '{migrate.head()}')", f"('{migrate.head()}', '{migrate.head()}')"])
