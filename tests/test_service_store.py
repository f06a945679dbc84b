"""The job queue and results store, on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from bonescreen.service.store import Store, StoreError


@pytest.fixture()
def pg_url(pg_server_url: str) -> str:
    return pg_server_url


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        s = Store(f"sqlite:///{tmp_path / 'q.db'}")
    else:
        url = request.getfixturevalue("pg_url")
        from _service_support import reset_database

        reset_database(url)
        s = Store(url)
    s.create_all()
    yield s
    s.dispose()


def _uid(i: int) -> str:
    return f"1.2.3.4.{i}"


def test_enqueue_is_idempotent_on_sop_uid(store: Store) -> None:
    a = store.enqueue(_uid(1), "1.2.3", "spool/a.dcm", "dicom")
    b = store.enqueue(_uid(1), "1.2.3", "spool/a.dcm", "http")
    c = store.enqueue(_uid(2), "1.2.3", "spool/b.dcm", "http")
    assert a.created and not b.created and c.created
    assert a.job_id == b.job_id != c.job_id
    assert store.pending_count() == 2


def test_claim_complete_and_results(store: Store) -> None:
    for i in range(5):
        store.enqueue(_uid(i), "1.2.9", f"spool/{i}.dcm", "dicom")
    jobs = store.claim("w:1:a", 3, 60)
    assert [j.sop_instance_uid for j in jobs] == [_uid(0), _uid(1), _uid(2)]
    assert all(j.attempts == 1 for j in jobs)
    # leased jobs are not handed out again while the lease runs
    again = store.claim("w:1:b", 10, 60)
    assert [j.sop_instance_uid for j in again] == [_uid(3), _uid(4)]
    for j, score in zip(jobs + again, [0.9, 0.2, 0.7, 0.1, 0.95]):
        flag = score >= 0.5
        assert store.complete(j.id, "w", {"eligible": True, "score": score, "flag": flag,
                                          "category": "low_bone_mass" if flag else "normal",
                                          "patient_id": "P1" if j.id % 2 else "P2",
                                          "study_date": dt.date(2024, 1, 1 + j.id)})
    # a second result for the same job is refused, the first kept
    assert not store.complete(jobs[0].id, "w", {"eligible": True, "score": 0.0})
    assert store.get_result(_uid(0)).score == pytest.approx(0.9)  # type: ignore[union-attr]
    rows = store.query_results()
    assert [r.score for r in rows] == [0.95, 0.9, 0.7, 0.2, 0.1]  # flagged first, then by score
    assert [r.flag for r in rows][:3] == [True] * 3
    assert {r.sop_instance_uid for r in store.query_results(patient_id="P1")} == {_uid(0), _uid(2), _uid(4)}
    assert len(store.query_results(study_instance_uid="1.2.9")) == 5
    assert [r.score for r in store.query_results(category="normal")] == [0.2, 0.1]
    assert len(store.query_results(date_from=dt.date(2024, 1, 4), date_to=dt.date(2024, 1, 5))) == 2
    assert store.pending_count() == 0
    counts = store.counts()
    assert counts["jobs"] == {"done": 5}
    assert counts["results"] == {"low_bone_mass": 3, "normal": 2}


def test_review_status(store: Store) -> None:
    j = store.enqueue(_uid(7), None, "spool/x.dcm", "http")
    store.claim("w:1:a", 1, 60)
    store.complete(j.job_id, "w", {"eligible": True, "score": 0.8, "flag": True, "category": "low_bone_mass"})
    r = store.set_review(_uid(7), "dxa_ordered")
    assert r is not None and r.review_status == "dxa_ordered"
    assert store.query_results(review_status="dxa_ordered")[0].sop_instance_uid == _uid(7)
    assert store.set_review("9.9.9", "acknowledged") is None
    with pytest.raises(StoreError, match="review status"):
        store.set_review(_uid(7), "deleted")


def test_stale_leases_are_requeued(store: Store) -> None:
    for i in range(3):
        store.enqueue(_uid(i), None, f"spool/{i}.dcm", "dicom")
    first = store.claim("hostA:111:aa", 2, lease_seconds=0.05)
    assert len(first) == 2
    time.sleep(0.1)
    # an expired lease is claimable again by anyone (the worker died)
    second = store.claim("hostB:222:bb", 5, 60)
    assert sorted(j.sop_instance_uid for j in second) == [_uid(0), _uid(1), _uid(2)]
    assert {j.sop_instance_uid: j.attempts for j in second}[_uid(0)] == 2
    # a restart of hostB re-queues its own leases at once, however long they run
    assert store.requeue_stale("hostB") == 3
    assert len(store.claim("hostB:333:cc", 5, 60)) == 3
    assert store.requeue_stale("hostA") == 0


def test_concurrent_claims_never_share_a_job(store: Store) -> None:
    n = 120
    for i in range(n):
        store.enqueue(_uid(i), None, f"spool/{i}.dcm", "dicom")
    got: list[str] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        while True:
            jobs = store.claim(name, 4, 60)
            if not jobs:
                return
            for j in jobs:
                store.complete(j.id, name, {"eligible": True, "score": 0.5})
            with lock:
                got.extend(j.sop_instance_uid for j in jobs)

    threads = [threading.Thread(target=worker, args=(f"h:{k}:x",)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    dup = [k for k, v in Counter(got).items() if v > 1]
    assert not dup and len(got) == n
    assert len(store.all_result_sops()) == n


def test_in_memory_sqlite_refused() -> None:
    with pytest.raises(StoreError, match="in-memory"):
        Store("sqlite://")


def test_service_on_postgresql_end_to_end(pg_url: str, tmp_path: Path) -> None:
    """The whole service (intake, worker, results) with PostgreSQL as its database."""
    from bonescreen.service.config import ServiceConfig
    from bonescreen.service.runtime import Service
    from _service_support import make_cxr_bytes, make_tiny_artifact

    art = make_tiny_artifact(tmp_path / "tiny.pt", size=32, min_size=32)
    cfg = ServiceConfig(model=str(art), data_dir=str(tmp_path / "data"), db_url=pg_url.replace("+psycopg", ""),
                        dicom_enabled=False, explain=False, poll_seconds=0.05).validate()
    from _service_support import reset_database

    reset_database(pg_url)
    svc = Service(cfg, token="t")
    assert svc.store.dialect == "postgresql"
    svc.start()
    try:
        sops = [svc.intake.accept_file_bytes(make_cxr_bytes(seed=i), "http").sop_instance_uid for i in range(6)]
        svc.notify()
        t0 = time.time()
        while svc.store.pending_count():
            assert time.time() - t0 < 60
            time.sleep(0.1)
        rows = {r.sop_instance_uid: r for r in svc.store.query_results()}
        assert set(rows) == set(sops)
        assert all(r.eligible and r.sr_path for r in rows.values())
    finally:
        svc.stop()
