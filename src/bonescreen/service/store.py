"""Persistence: the job queue and the results, in one SQL database (SQLite or PostgreSQL).

The queue lives in the database next to the results so that "received" and
"screened" are facts of the same store: a job row is committed before the
sender is told the image arrived, and a result row is committed in the same
transaction that marks its job done. A kill between the two leaves the job
``processing`` with a lease; the next start (or the lease running out)
puts it back to ``pending``.

Claiming is one ``UPDATE ... WHERE id IN (SELECT ... LIMIT n)`` statement:
atomic on SQLite (whose writers are serialised; every transaction here starts
with ``BEGIN IMMEDIATE`` so no reader-turned-writer deadlocks with another),
and on PostgreSQL the sub-select takes ``FOR UPDATE SKIP LOCKED`` so several
workers never claim the same row.

What is stored about a patient is what the worklist shows: patient id (raw, or
a keyed pseudonym when so configured), name only when configured, study date,
sex, age, the score and category. No pixel data and no other header field.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Boolean,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    and_,
    create_engine,
    event,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from bonescreen.errors import BonescreenError

__all__ = [
    "REVIEW_STATUSES",
    "Base",
    "ClaimedJob",
    "EnqueueOutcome",
    "Job",
    "Result",
    "Store",
    "StoreError",
]

log = logging.getLogger(__name__)

#: What a clinician can set on a worklist row.
REVIEW_STATUSES = ("new", "acknowledged", "dxa_ordered")
# Every category a screening result can carry (adult cascade, stage 1 alone, pediatric),
# with the worklist's wording; the API's category filter accepts exactly these.
CATEGORY_LABELS = {
    "osteoporosis": "Osteoporosis",
    "low_bone_mass": "Low bone mass",
    "normal": "Normal",
    "not_osteoporosis": "No osteoporosis",
    "low_bmd": "Low BMD for age",
    "normal_bmd": "Normal BMD for age",
}
JOB_STATUSES = ("pending", "processing", "done", "failed")
FORWARD_STATUSES = ("none", "pending", "done", "failed")


class StoreError(BonescreenError):
    reason = "store_error"


class Base(DeclarativeBase):
    pass


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Job(Base):
    """One received image waiting for (or done with) screening."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    study_instance_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    spool_path: Mapped[str] = mapped_column(String(255), nullable=False)  # relative to the data dir
    source: Mapped[str] = mapped_column(String(16), nullable=False)  # "dicom" | "http"
    status: Mapped[str] = mapped_column(String(16), nullable=False, default="pending", index=True)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    worker: Mapped[str | None] = mapped_column(String(160), nullable=True)
    claim: Mapped[str | None] = mapped_column(String(40), nullable=True, index=True)
    lease_until: Mapped[float | None] = mapped_column(Float, nullable=True)  # epoch seconds
    received_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=_utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)


class Result(Base):
    """The screening outcome of one image: what the worklist and the API show."""

    __tablename__ = "results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), unique=True, nullable=False)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    study_instance_uid: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    patient_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    patient_name: Mapped[str | None] = mapped_column(String(128), nullable=True)
    study_date: Mapped[dt.date | None] = mapped_column(Date, nullable=True, index=True)
    sex: Mapped[str | None] = mapped_column(String(1), nullable=True)
    age: Mapped[float | None] = mapped_column(Float, nullable=True)
    eligible: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    reason: Mapped[str | None] = mapped_column(String(64), nullable=True)
    message: Mapped[str | None] = mapped_column(String(500), nullable=True)
    score: Mapped[float | None] = mapped_column(Float, nullable=True)
    score_stage1: Mapped[float | None] = mapped_column(Float, nullable=True)
    category: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    flag: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False, index=True)
    model: Mapped[str | None] = mapped_column(String(160), nullable=True)
    sr_path: Mapped[str | None] = mapped_column(String(255), nullable=True)
    overlay_path: Mapped[str | None] = mapped_column(String(255), nullable=True)
    sc_path: Mapped[str | None] = mapped_column(String(255), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=_utcnow)
    review_status: Mapped[str] = mapped_column(String(16), nullable=False, default="new")
    review_updated_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    forward_status: Mapped[str] = mapped_column(String(16), nullable=False, default="none", index=True)
    forward_attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    forward_next_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    forward_error: Mapped[str | None] = mapped_column(String(500), nullable=True)

    def as_dict(self) -> dict[str, Any]:
        return {
            "sop_instance_uid": self.sop_instance_uid,
            "study_instance_uid": self.study_instance_uid,
            "patient_id": self.patient_id,
            "patient_name": self.patient_name,
            "study_date": self.study_date.isoformat() if self.study_date else None,
            "sex": self.sex,
            "age": self.age,
            "eligible": self.eligible,
            "reason": self.reason or None,
            "message": self.message or None,
            "score": self.score,
            "score_stage1": self.score_stage1,
            "category": self.category,
            "flag": self.flag,
            "model": self.model,
            "has_sr": bool(self.sr_path),
            "has_overlay": bool(self.overlay_path),
            "created_at": self.created_at.isoformat() + "Z" if self.created_at else None,
            "review_status": self.review_status,
            "review_updated_at": self.review_updated_at.isoformat() + "Z" if self.review_updated_at else None,
            "forward_status": self.forward_status,
        }


@dataclass(frozen=True)
class EnqueueOutcome:
    job_id: int
    created: bool  # False: this SOP Instance UID was already received (idempotent re-send)


@dataclass(frozen=True)
class ClaimedJob:
    id: int
    sop_instance_uid: str
    study_instance_uid: str | None
    spool_path: str
    attempts: int


def normalise_url(url: str) -> str:
    """``postgresql://`` means psycopg 3 here (psycopg2 is not a dependency)."""
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def make_engine(url: str) -> Engine:
    url = normalise_url(url)
    if url.startswith("sqlite"):
        if url in ("sqlite://", "sqlite:///:memory:"):
            raise StoreError("an in-memory SQLite database cannot hold a durable queue; give a file path")
        engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            # Take transaction control from pysqlite (SQLAlchemy's documented recipe) so that
            # every transaction is BEGIN IMMEDIATE: the write lock is taken up front and
            # concurrent writers wait (busy timeout) instead of failing with "database is locked".
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")  # a committed job survives power loss
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10)


class Store:
    """The database: queue operations for the receiver and worker, queries for the API."""

    def __init__(self, url: str) -> None:
        self.url = normalise_url(url)
        self.engine = make_engine(self.url)
        self.dialect = self.engine.dialect.name
        self._session = sessionmaker(self.engine, expire_on_commit=False)

    def create_all(self) -> None:
        Base.metadata.create_all(self.engine)

    def dispose(self) -> None:
        self.engine.dispose()

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._session() as s, s.begin():
            yield s

    def ping(self) -> bool:
        try:
            with self.session() as s:
                s.execute(select(1))
            return True
        except Exception:  # health check: any failure means "not ok"
            log.debug("database ping failed", exc_info=True)
            return False

    # ---------------------------------------------------------------- queue

    def has_sop(self, sop_instance_uid: str) -> bool:
        with self.session() as s:
            return s.scalar(select(Job.id).where(Job.sop_instance_uid == sop_instance_uid)) is not None

    def enqueue(self, sop_instance_uid: str, study_instance_uid: str | None, spool_path: str,
                source: str) -> EnqueueOutcome:
        """Commit a pending job; a SOP Instance UID already known gives the existing job (idempotent)."""
        try:
            with self.session() as s:
                existing = s.scalar(select(Job.id).where(Job.sop_instance_uid == sop_instance_uid))
                if existing is not None:
                    return EnqueueOutcome(int(existing), False)
                job = Job(sop_instance_uid=sop_instance_uid, study_instance_uid=study_instance_uid,
                          spool_path=spool_path, source=source, status="pending", attempts=0)
                s.add(job)
                s.flush()
                return EnqueueOutcome(int(job.id), True)
        except IntegrityError:  # a concurrent sender of the same image won the insert
            with self.session() as s:
                existing = s.scalar(select(Job.id).where(Job.sop_instance_uid == sop_instance_uid))
            if existing is None:
                raise
            return EnqueueOutcome(int(existing), False)

    def claim(self, worker: str, n: int, lease_seconds: float) -> list[ClaimedJob]:
        """Lease up to ``n`` pending jobs (or jobs whose lease ran out) to ``worker``."""
        now = time.time()
        token = uuid.uuid4().hex
        claimable = or_(Job.status == "pending", and_(Job.status == "processing", Job.lease_until < now))
        sub = select(Job.id).where(claimable).order_by(Job.id).limit(n)
        if self.dialect == "postgresql":
            sub = sub.with_for_update(skip_locked=True)
        with self.session() as s:
            s.execute(
                update(Job)
                .where(Job.id.in_(sub))
                .values(status="processing", worker=worker, claim=token, lease_until=now + lease_seconds,
                        attempts=Job.attempts + 1)
                .execution_options(synchronize_session=False)
            )
            rows = s.execute(
                select(Job.id, Job.sop_instance_uid, Job.study_instance_uid, Job.spool_path, Job.attempts)
                .where(Job.claim == token)
                .order_by(Job.id)
            ).all()
        return [ClaimedJob(int(r[0]), r[1], r[2], r[3], int(r[4])) for r in rows]

    def requeue_stale(self, instance_prefix: str | None = None) -> int:
        """Back to pending: jobs whose lease ran out, and jobs leased by an earlier run of this instance."""
        cond = and_(Job.status == "processing", Job.lease_until < time.time())
        if instance_prefix:
            cond = or_(cond, and_(Job.status == "processing", Job.worker.like(f"{instance_prefix}:%")))
        with self.session() as s:
            res = s.execute(update(Job).where(cond).values(status="pending", claim=None, lease_until=None)
                            .execution_options(synchronize_session=False))
            return int(getattr(res, "rowcount", 0) or 0)

    def complete(self, job_id: int, claim_worker: str, result: dict[str, Any], *, status: str = "done",
                 forward: bool = False) -> bool:
        """Store the result and close the job in one transaction; False if the job already has one.

        ``claim_worker`` (the worker that screened it) only names the loser in the log when two
        leases of one job both finish: the first result stays, the unique job_id keeps it single.
        """
        fields = {k: v for k, v in result.items() if k in Result.__table__.columns}
        try:
            with self.session() as s:
                job = s.get(Job, job_id)
                if job is None:
                    raise StoreError(f"job {job_id} does not exist")
                if s.scalar(select(Result.id).where(Result.job_id == job_id)) is not None:
                    log.info("job %d already has a result; %s's second one discarded", job_id, claim_worker)
                    return False
                fields.setdefault("sop_instance_uid", job.sop_instance_uid)
                fields.setdefault("study_instance_uid", job.study_instance_uid)
                res = Result(job_id=job_id, **fields)
                if forward and (res.sr_path or res.sc_path):
                    res.forward_status = "pending"
                    res.forward_next_at = 0.0
                s.add(res)
                job.status = status
                job.finished_at = _utcnow()
                job.lease_until = None
                job.claim = None
            return True
        except IntegrityError:
            log.info("job %d already has a result; %s's second one discarded", job_id, claim_worker)
            return False

    def release(self, job_id: int) -> None:
        """Hand a claimed job back (e.g. the service is stopping mid-batch)."""
        with self.session() as s:
            s.execute(update(Job).where(and_(Job.id == job_id, Job.status == "processing"))
                      .values(status="pending", claim=None, lease_until=None, attempts=Job.attempts - 1))

    def pending_count(self) -> int:
        with self.session() as s:
            return int(s.scalar(select(func.count()).select_from(Job).where(
                Job.status.in_(("pending", "processing")))) or 0)

    def spool_paths_done(self, limit: int = 500) -> list[tuple[int, str]]:
        """Finished jobs whose spool file may be deleted (their result is forwarded or not to be)."""
        with self.session() as s:
            rows = s.execute(
                select(Job.id, Job.spool_path).join(Result, Result.job_id == Job.id)
                .where(Job.status.in_(("done", "failed")), Job.spool_path != "",
                       Result.forward_status.in_(("none", "done", "failed")))
                .limit(limit)
            ).all()
        return [(int(r[0]), str(r[1])) for r in rows]

    def clear_spool_path(self, job_id: int) -> None:
        with self.session() as s:
            s.execute(update(Job).where(Job.id == job_id).values(spool_path=""))

    # ----------------------------------------------------------- forwarding

    def forward_due(self, n: int) -> list[dict[str, Any]]:
        now = time.time()
        with self.session() as s:
            rows = s.scalars(
                select(Result).where(Result.forward_status == "pending",
                                     or_(Result.forward_next_at.is_(None), Result.forward_next_at <= now))
                .order_by(Result.id).limit(n)
            ).all()
            return [{"id": r.id, "sop_instance_uid": r.sop_instance_uid, "sr_path": r.sr_path,
                     "sc_path": r.sc_path, "attempts": r.forward_attempts} for r in rows]

    def forward_done(self, result_id: int, ok: bool, error: str | None, *, max_attempts: int,
                     backoff_s: float) -> None:
        with self.session() as s:
            r = s.get(Result, result_id)
            if r is None:
                return
            r.forward_attempts += 1
            if ok:
                r.forward_status, r.forward_error = "done", None
            else:
                r.forward_error = (error or "")[:500]
                if r.forward_attempts >= max_attempts:
                    r.forward_status = "failed"
                else:
                    r.forward_next_at = time.time() + backoff_s * (2 ** (r.forward_attempts - 1))

    # -------------------------------------------------------------- queries

    def get_result(self, sop_instance_uid: str) -> Result | None:
        with self.session() as s:
            return s.scalar(select(Result).where(Result.sop_instance_uid == sop_instance_uid))

    def job_status(self, sop_instance_uid: str) -> str | None:
        with self.session() as s:
            return s.scalar(select(Job.status).where(Job.sop_instance_uid == sop_instance_uid))

    def query_results(
        self,
        *,
        study_instance_uid: str | None = None,
        patient_id: str | None = None,
        category: str | None = None,
        flagged: bool | None = None,
        review_status: str | None = None,
        date_from: dt.date | None = None,
        date_to: dt.date | None = None,
        eligible: bool | None = None,
        limit: int = 200,
        offset: int = 0,
    ) -> list[Result]:
        """Flagged first, then highest score, then newest study."""
        q = select(Result)
        if study_instance_uid:
            q = q.where(Result.study_instance_uid == study_instance_uid)
        if patient_id:
            q = q.where(Result.patient_id == patient_id)
        if category:
            q = q.where(Result.category == category)
        if flagged is not None:
            q = q.where(Result.flag.is_(flagged))
        if review_status:
            q = q.where(Result.review_status == review_status)
        if eligible is not None:
            q = q.where(Result.eligible.is_(eligible))
        if date_from:
            q = q.where(Result.study_date >= date_from)
        if date_to:
            q = q.where(Result.study_date <= date_to)
        q = q.order_by(Result.flag.desc(), Result.score.desc().nulls_last(),
                       Result.study_date.desc().nulls_last(), Result.id.desc())
        with self.session() as s:
            return list(s.scalars(q.limit(limit).offset(offset)).all())

    def set_review(self, sop_instance_uid: str, status: str) -> Result | None:
        if status not in REVIEW_STATUSES:
            raise StoreError(f"review status must be one of {', '.join(REVIEW_STATUSES)}; got {status!r}")
        with self.session() as s:
            r = s.scalar(select(Result).where(Result.sop_instance_uid == sop_instance_uid))
            if r is None:
                return None
            r.review_status = status
            r.review_updated_at = _utcnow()
            return r

    def counts(self) -> dict[str, dict[str, int]]:
        """Numbers for /metrics: jobs by status, results by category, flag, review and forward status."""
        out: dict[str, dict[str, int]] = {}
        with self.session() as s:
            out["jobs"] = {k: int(v) for k, v in s.execute(select(Job.status, func.count()).group_by(Job.status))}
            out["results"] = {str(k): int(v) for k, v in
                              s.execute(select(Result.category, func.count()).group_by(Result.category))}
            out["flagged"] = {str(bool(k)).lower(): int(v) for k, v in
                              s.execute(select(Result.flag, func.count()).group_by(Result.flag))}
            out["review"] = {k: int(v) for k, v in
                             s.execute(select(Result.review_status, func.count()).group_by(Result.review_status))}
            out["forward"] = {k: int(v) for k, v in
                              s.execute(select(Result.forward_status, func.count()).group_by(Result.forward_status))}
            out["skipped"] = {str(k): int(v) for k, v in s.execute(
                select(Result.reason, func.count()).where(Result.eligible.is_(False)).group_by(Result.reason))}
        return out

    def all_result_sops(self) -> Sequence[str]:
        with self.session() as s:
            return list(s.scalars(select(Result.sop_instance_uid)).all())
