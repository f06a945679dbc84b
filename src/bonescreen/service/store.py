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
sex, age, the score and category; per image also the study, series and
accession number (PACS and the worklist act per study), the SOP class (the
study's SR references every image by it) and the scanner's manufacturer and
model name (post-deployment monitoring per scanner). No pixel data and no
other header field.

The worklist groups results by patient study (:meth:`Store.query_studies`,
decided by ``bonescreen.screen.decide.rollup_study``, the rule ``screen``'s
``studies.csv`` uses).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Boolean,
    Date,
    Text,
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
    "AUDIT_ACTIONS",
    "FORWARD_STATUSES",
    "REVIEW_STATUSES",
    "ApiToken",
    "AuditEvent",
    "Instance",
    "User",
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
    "indeterminate": "Indeterminate: consider DXA",  # a site profile's abstain band
}
JOB_STATUSES = ("pending", "processing", "done", "failed")
#: ``committing``: sent by C-STORE, waiting for the PACS's storage commitment report;
#: ``dead_letter``: gave up after ``forward_max_attempts`` (shown on the worklist and in /metrics).
FORWARD_STATUSES = ("none", "pending", "committing", "done", "dead_letter")
#: What the audit trail records (``audit.action``).
AUDIT_ACTIONS = ("login", "login_failed", "logout", "review", "export", "settings", "user_add", "user_update",
                 "user_disable", "token_create", "token_revoke", "forward_retry", "db_upgrade")


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
    # study level, per-scanner monitoring, the OOD check (bonescreen.schema.RESULT_COLUMNS)
    series_instance_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    accession_number: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    sop_class_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    manufacturer: Mapped[str | None] = mapped_column(String(64), nullable=True)
    manufacturer_model_name: Mapped[str | None] = mapped_column(String(64), nullable=True)
    ood_score: Mapped[float | None] = mapped_column(Float, nullable=True)
    ood_check: Mapped[str | None] = mapped_column(String(8), nullable=True)
    # the other score columns the study SR reports per image (score_stage2, p_*, pred_z, pred_bmd)
    scores_json: Mapped[str | None] = mapped_column(String(500), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=_utcnow)
    review_status: Mapped[str] = mapped_column(String(16), nullable=False, default="new")
    review_updated_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    forward_status: Mapped[str] = mapped_column(String(16), nullable=False, default="none", index=True)
    forward_attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    forward_next_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    forward_error: Mapped[str | None] = mapped_column(String(500), nullable=True)
    # revision 0002: who set the review status; storage-commitment transaction of the last C-STORE
    reviewed_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    forward_commit_uid: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    forward_commit_deadline: Mapped[float | None] = mapped_column(Float, nullable=True)

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
            "series_instance_uid": self.series_instance_uid,
            "accession_number": self.accession_number,
            "manufacturer": self.manufacturer,
            "manufacturer_model_name": self.manufacturer_model_name,
            "ood_score": self.ood_score,
            "ood_check": self.ood_check,
            **self._site(),
            "has_sr": bool(self.sr_path),
            "has_overlay": bool(self.overlay_path),
            "created_at": self.created_at.isoformat() + "Z" if self.created_at else None,
            "review_status": self.review_status,
            "review_updated_at": self.review_updated_at.isoformat() + "Z" if self.review_updated_at else None,
            "reviewed_by": self.reviewed_by,
            "forward_status": self.forward_status,
            "forward_attempts": self.forward_attempts,
            "forward_error": self.forward_error,
        }


    def _site(self) -> dict[str, Any]:
        """``site_profile`` / ``site_probability`` from ``scores_json`` (None without a profile)."""
        extra: dict[str, Any] = {}
        if self.scores_json:
            try:
                extra = json.loads(self.scores_json)
            except ValueError:
                extra = {}
        return {"site_profile": extra.get("site_profile"), "site_probability": extra.get("site_probability")}

    def as_row(self) -> dict[str, Any]:
        """The result as a screening row (``schema.RESULT_COLUMNS`` names), for the study roll-up and SR."""
        row: dict[str, Any] = {
            "image_id": self.sop_instance_uid, "study_instance_uid": self.study_instance_uid,
            "series_instance_uid": self.series_instance_uid, "sop_class_uid": self.sop_class_uid,
            "accession_number": self.accession_number, "patient_id": self.patient_id,
            "study_date": self.study_date.isoformat() if self.study_date else None, "eligible": self.eligible,
            "reason": self.reason or "", "category": self.category, "flag": self.flag, "score": self.score,
            "score_stage1": self.score_stage1, "ood_score": self.ood_score, "model": self.model,
        }
        if self.scores_json:
            try:
                row.update(json.loads(self.scores_json))
            except ValueError:
                pass
        return row


class User(Base):
    """A local account (revision 0002). ``password_hash`` is argon2id; None for single-sign-on-only accounts."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    username: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    password_hash: Mapped[str | None] = mapped_column(String(255), nullable=True)
    role: Mapped[str] = mapped_column(String(16), nullable=False)
    disabled: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    oidc_subject: Mapped[str | None] = mapped_column(String(255), unique=True, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=_utcnow)
    updated_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)


class ApiToken(Base):
    """A per-user API token, stored as its SHA-256 (the token itself is shown once, at creation)."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), nullable=False, index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    name: Mapped[str] = mapped_column(String(64), nullable=False, default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=_utcnow)
    last_used_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    revoked: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)


class AuditEvent(Base):
    """One line of the append-only audit trail (database triggers refuse UPDATE and DELETE)."""

    __tablename__ = "audit"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=_utcnow, index=True)
    actor: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    action: Mapped[str] = mapped_column(String(32), nullable=False, index=True)
    target: Mapped[str | None] = mapped_column(String(128), nullable=True)
    detail: Mapped[str | None] = mapped_column(Text, nullable=True)
    ip: Mapped[str | None] = mapped_column(String(64), nullable=True)

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "at": self.at.isoformat() + "Z", "actor": self.actor, "action": self.action,
                "target": self.target, "detail": self.detail, "ip": self.ip}


class Instance(Base):
    """A running ``serve`` process sharing this database; its heartbeat renews its job leases."""

    __tablename__ = "instances"

    name: Mapped[str] = mapped_column(String(160), primary_key=True)
    host: Mapped[str] = mapped_column(String(255), nullable=False)
    pid: Mapped[int] = mapped_column(Integer, nullable=False)
    parts: Mapped[str] = mapped_column(String(64), nullable=False, default="")
    run_id: Mapped[str] = mapped_column(String(32), nullable=False)
    started_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=_utcnow)
    heartbeat_at: Mapped[float] = mapped_column(Float, nullable=False)


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
        """Bring the schema to the newest revision (Alembic; see ``service.migrate``)."""
        from bonescreen.service.migrate import upgrade

        upgrade(self)

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
                       Result.forward_status.in_(("none", "done", "dead_letter")))
                .limit(limit)
            ).all()
        return [(int(r[0]), str(r[1])) for r in rows]

    def clear_spool_path(self, job_id: int) -> None:
        with self.session() as s:
            s.execute(update(Job).where(Job.id == job_id).values(spool_path=""))

    # ----------------------------------------------------------- forwarding

    def forward_due(self, n: int, lease_seconds: float = 600.0) -> list[dict[str, Any]]:
        """Claim up to ``n`` results due for forwarding (a lease: another process skips them meanwhile)."""
        now = time.time()
        q = (select(Result).where(Result.forward_status == "pending",
                                  or_(Result.forward_next_at.is_(None), Result.forward_next_at <= now))
             .order_by(Result.id).limit(n))
        if self.dialect == "postgresql":
            q = q.with_for_update(skip_locked=True)
        with self.session() as s:
            rows = s.scalars(q).all()
            out = [{"id": r.id, "sop_instance_uid": r.sop_instance_uid, "sr_path": r.sr_path,
                    "sc_path": r.sc_path, "attempts": r.forward_attempts} for r in rows]
            for r in rows:
                r.forward_next_at = now + lease_seconds
            return out

    @staticmethod
    def _retry_or_dead(r: Result, error: str | None, max_attempts: int, backoff_s: float,
                       backoff_max_s: float) -> None:
        import random

        r.forward_error = (error or "")[:500]
        r.forward_commit_uid = None
        r.forward_commit_deadline = None
        if r.forward_attempts >= max_attempts:
            r.forward_status = "dead_letter"
            r.forward_next_at = None
        else:
            r.forward_status = "pending"
            delay = min(backoff_max_s, backoff_s * (2 ** (r.forward_attempts - 1)))
            r.forward_next_at = time.time() + delay * random.uniform(0.8, 1.0)  # jitter: no thundering herd

    def forward_done(self, result_id: int, ok: bool, error: str | None, *, max_attempts: int,
                     backoff_s: float, backoff_max_s: float = 3600.0, commit_uid: str | None = None,
                     commit_deadline: float | None = None) -> str | None:
        """Record one attempt; returns the new forward status.

        ``ok`` with ``commit_uid``: the files were stored and storage commitment was asked
        for; the result waits in ``committing`` for the PACS's N-EVENT-REPORT.
        """
        with self.session() as s:
            r = s.get(Result, result_id)
            if r is None:
                return None
            if ok and commit_uid and r.forward_commit_uid != commit_uid:
                return r.forward_status  # the commitment report came first and settled this attempt
            r.forward_attempts += 1
            if ok and commit_uid:
                r.forward_status, r.forward_error = "committing", None
                r.forward_commit_uid, r.forward_commit_deadline = commit_uid, commit_deadline
                r.forward_next_at = None
            elif ok:
                r.forward_status, r.forward_error = "done", None
                r.forward_commit_uid = r.forward_commit_deadline = r.forward_next_at = None
            else:
                self._retry_or_dead(r, error, max_attempts, backoff_s, backoff_max_s)
            return r.forward_status

    def forward_begin_commit(self, result_id: int, transaction_uid: str, deadline: float) -> None:
        """Note the storage-commitment transaction before asking, so an early report finds its result."""
        with self.session() as s:
            s.execute(update(Result).where(Result.id == result_id)
                      .values(forward_commit_uid=transaction_uid, forward_commit_deadline=deadline))

    def forward_committed(self, transaction_uid: str, ok: bool, error: str | None, *, max_attempts: int,
                          backoff_s: float, backoff_max_s: float = 3600.0) -> int:
        """A storage-commitment report arrived: done, or (some instances not committed) retry."""
        with self.session() as s:
            rows = s.scalars(select(Result).where(Result.forward_commit_uid == transaction_uid,
                                                  Result.forward_status.in_(("pending", "committing")))).all()
            for r in rows:
                if r.forward_status == "pending":
                    r.forward_attempts += 1  # the attempt still under way ends here
                if ok:
                    r.forward_status, r.forward_error = "done", None
                    r.forward_commit_uid = r.forward_commit_deadline = None
                else:
                    self._retry_or_dead(r, error, max_attempts, backoff_s, backoff_max_s)
            return len(rows)

    def forward_expire_commitments(self, *, max_attempts: int, backoff_s: float,
                                   backoff_max_s: float = 3600.0) -> int:
        """Results whose commitment report never came in time: a failed attempt."""
        now = time.time()
        with self.session() as s:
            rows = s.scalars(select(Result).where(Result.forward_status == "committing",
                                                  Result.forward_commit_deadline < now)).all()
            for r in rows:
                self._retry_or_dead(r, "no storage commitment report in time", max_attempts, backoff_s,
                                    backoff_max_s)
            return len(rows)

    def forward_retry(self, sop_instance_uid: str) -> bool:
        """A dead-lettered result back into the forwarding queue (an admin's action)."""
        with self.session() as s:
            r = s.scalar(select(Result).where(Result.sop_instance_uid == sop_instance_uid))
            if r is None or r.forward_status != "dead_letter":
                return False
            r.forward_status, r.forward_attempts, r.forward_next_at = "pending", 0, 0.0
            return True

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
        forward_status: str | None = None,
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
        if forward_status:
            q = q.where(Result.forward_status == forward_status)
        if date_from:
            q = q.where(Result.study_date >= date_from)
        if date_to:
            q = q.where(Result.study_date <= date_to)
        q = q.order_by(Result.flag.desc(), Result.score.desc().nulls_last(),
                       Result.study_date.desc().nulls_last(), Result.id.desc())
        with self.session() as s:
            return list(s.scalars(q.limit(limit).offset(offset)).all())

    def study_results(self, study_instance_uid: str) -> list[Result]:
        """Every result of one study, oldest first."""
        with self.session() as s:
            return list(s.scalars(select(Result).where(Result.study_instance_uid == study_instance_uid)
                                  .order_by(Result.id)).all())

    def set_study_sr(self, study_instance_uid: str, sr_path: str) -> None:
        """Point every result of a study at the study's latest SR (``GET .../sr`` of any of its images)."""
        with self.session() as s:
            s.execute(update(Result).where(Result.study_instance_uid == study_instance_uid,
                                           Result.eligible.is_(True))
                      .values(sr_path=sr_path).execution_options(synchronize_session=False))

    def query_studies(self, *, limit: int = 200, **filters: Any) -> list[dict[str, Any]]:
        """One entry per patient study: its roll-up (``screen.decide.rollup_study``) and its images.

        ``filters`` are :meth:`query_results`'s; a study is listed when any of its images
        matches, and then shows all of its images. Flagged studies first, then by score.
        """
        from bonescreen.screen.decide import rollup_study

        hits = self.query_results(limit=max(limit * 4, limit), **filters)
        keys: list[str] = []
        for r in hits:
            key = r.study_instance_uid or f"image:{r.sop_instance_uid}"
            if key not in keys:
                keys.append(key)
        studies = []
        for key in keys[:limit]:
            results = (self.study_results(key) if not key.startswith("image:")
                       else [r for r in hits if r.sop_instance_uid == key[6:]])
            images = sorted(results, key=lambda r: (not r.flag, -(r.score if r.score is not None else -1.0)))
            roll = rollup_study([r.as_row() for r in results])
            first = results[0]
            studies.append({
                "study_instance_uid": first.study_instance_uid, "accession_number": first.accession_number,
                "patient_id": first.patient_id, "patient_name": first.patient_name,
                "study_date": first.study_date.isoformat() if first.study_date else None,
                "sex": first.sex, "age": first.age, **roll,
                "review_status": _study_review(results), "images": [r.as_dict() for r in images],
            })
        studies.sort(key=lambda st: (not st["flag"], -(st["score"] if st["score"] is not None else -1.0)))
        return studies

    def set_review(self, sop_instance_uid: str, status: str, who: str | None = None) -> Result | None:
        if status not in REVIEW_STATUSES:
            raise StoreError(f"review status must be one of {', '.join(REVIEW_STATUSES)}; got {status!r}")
        with self.session() as s:
            r = s.scalar(select(Result).where(Result.sop_instance_uid == sop_instance_uid))
            if r is None:
                return None
            r.review_status = status
            r.review_updated_at = _utcnow()
            r.reviewed_by = who
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

    def forward_statuses(self, sops: Sequence[str]) -> dict[str, str]:
        with self.session() as s:
            return {a: b for a, b in s.execute(select(Result.sop_instance_uid, Result.forward_status)
                                               .where(Result.sop_instance_uid.in_(list(sops))))}

    # ------------------------------------------------- instances and leases

    def register_instance(self, name: str, host: str, pid: int, parts: str, *, run_id: str,
                          stale_after: float) -> None:
        """Claim the name ``name`` for this process; refuse while another live process holds it.

        A holder is live while its heartbeat is fresher than ``stale_after`` seconds, unless it
        ran on this host and its process no longer exists (a kill -9 and an immediate restart).
        """
        now = time.time()
        q = select(Instance).where(Instance.name == name)
        if self.dialect == "postgresql":
            q = q.with_for_update()
        with self.session() as s:
            row = s.scalar(q)
            if row is not None and row.run_id != run_id:
                fresh = now - row.heartbeat_at < stale_after
                gone = row.host == host and row.pid != pid and not _pid_alive(row.pid)
                if fresh and not gone:
                    raise StoreError(
                        f"instance {name!r} is already running (host {row.host}, pid {row.pid}, heartbeat "
                        f"{now - row.heartbeat_at:.0f} s ago); give this process another --instance name")
            if row is None:
                s.add(Instance(name=name, host=host, pid=pid, parts=parts, run_id=run_id, heartbeat_at=now))
            else:
                row.host, row.pid, row.parts, row.run_id = host, pid, parts, run_id
                row.heartbeat_at, row.started_at = now, _utcnow()

    def heartbeat(self, name: str, run_id: str, worker_id: str | None, lease_seconds: float) -> int:
        """Refresh this instance's heartbeat and extend the leases of the jobs its worker holds."""
        now = time.time()
        with self.session() as s:
            s.execute(update(Instance).where(Instance.name == name, Instance.run_id == run_id)
                      .values(heartbeat_at=now))
            if worker_id is None:
                return 0
            res = s.execute(update(Job).where(Job.worker == worker_id, Job.status == "processing")
                            .values(lease_until=now + lease_seconds).execution_options(synchronize_session=False))
            return int(getattr(res, "rowcount", 0) or 0)

    def unregister_instance(self, name: str, run_id: str) -> None:
        with self.session() as s:
            s.execute(update(Instance).where(Instance.name == name, Instance.run_id == run_id)
                      .values(heartbeat_at=0.0))

    def instances(self) -> list[dict[str, Any]]:
        with self.session() as s:
            return [{"name": r.name, "host": r.host, "pid": r.pid, "parts": r.parts,
                     "heartbeat_age_s": round(time.time() - r.heartbeat_at, 1)}
                    for r in s.scalars(select(Instance).order_by(Instance.name))]

    def job_workers(self) -> dict[str, int]:
        """Finished jobs by the instance that screened them (the part of ``worker`` before the pid)."""
        with self.session() as s:
            rows = s.execute(select(Job.worker, func.count()).where(Job.status == "done").group_by(Job.worker)).all()
        out: Counter[str] = Counter()
        for w, n in rows:
            out[str(w).rsplit(":", 2)[0] if w else "?"] += int(n)
        return dict(out)

    # --------------------------------------------------------------- audit

    def audit(self, action: str, actor: str | None = None, target: str | None = None, detail: Any = None,
              ip: str | None = None) -> None:
        """Append one event. ``detail``: text or anything JSON can hold."""
        import json

        if action not in AUDIT_ACTIONS:
            raise StoreError(f"unknown audit action {action!r}")
        text = detail if isinstance(detail, str) or detail is None else json.dumps(detail, sort_keys=True,
                                                                                   default=str)
        with self.session() as s:
            s.add(AuditEvent(action=action, actor=(actor or None) and actor[:64], target=(target or None) and
                             target[:128], detail=text, ip=(ip or None) and ip[:64]))

    def audit_events(self, *, action: str | None = None, actor: str | None = None, limit: int = 200,
                     offset: int = 0) -> list[AuditEvent]:
        q = select(AuditEvent)
        if action:
            q = q.where(AuditEvent.action == action)
        if actor:
            q = q.where(AuditEvent.actor == actor)
        with self.session() as s:
            return list(s.scalars(q.order_by(AuditEvent.id.desc()).limit(limit).offset(offset)).all())

    def failed_logins(self, *, username: str | None, ip: str | None, since: dt.datetime) -> tuple[int, int]:
        """(failures for this account, failures from this address) since ``since``."""
        with self.session() as s:
            base = select(func.count()).select_from(AuditEvent).where(AuditEvent.action == "login_failed",
                                                                       AuditEvent.at >= since)
            by_user = int(s.scalar(base.where(AuditEvent.actor == username)) or 0) if username else 0
            by_ip = int(s.scalar(base.where(AuditEvent.ip == ip)) or 0) if ip else 0
        return by_user, by_ip

    def last_audit_detail(self, action: str) -> str | None:
        with self.session() as s:
            return s.scalar(select(AuditEvent.detail).where(AuditEvent.action == action)
                            .order_by(AuditEvent.id.desc()).limit(1))

    # --------------------------------------------------------------- users

    def add_user(self, username: str, role: str, password_hash: str | None, oidc_subject: str | None = None) -> User:
        try:
            with self.session() as s:
                u = User(username=username, role=role, password_hash=password_hash, oidc_subject=oidc_subject,
                         disabled=False)
                s.add(u)
                s.flush()
                return u
        except IntegrityError as exc:
            raise StoreError(f"user {username!r} already exists") from exc

    def get_user(self, *, username: str | None = None, user_id: int | None = None,
                 oidc_subject: str | None = None) -> User | None:
        with self.session() as s:
            if user_id is not None:
                return s.get(User, user_id)
            if oidc_subject is not None:
                return s.scalar(select(User).where(User.oidc_subject == oidc_subject))
            return s.scalar(select(User).where(User.username == username))

    def users(self) -> list[User]:
        with self.session() as s:
            return list(s.scalars(select(User).order_by(User.username)).all())

    def update_user(self, username: str, **values: Any) -> User:
        allowed = {"role", "disabled", "password_hash", "oidc_subject"}
        if set(values) - allowed:
            raise StoreError(f"cannot change {sorted(set(values) - allowed)}")
        with self.session() as s:
            u = s.scalar(select(User).where(User.username == username))
            if u is None:
                raise StoreError(f"no user {username!r}")
            for k, v in values.items():
                setattr(u, k, v)
            u.updated_at = _utcnow()
            if values.get("disabled"):
                s.execute(update(ApiToken).where(ApiToken.user_id == u.id).values(revoked=True))
            return u

    def add_token(self, user_id: int, token_hash: str, name: str = "") -> int:
        with self.session() as s:
            t = ApiToken(user_id=user_id, token_hash=token_hash, name=name[:64], revoked=False)
            s.add(t)
            s.flush()
            return int(t.id)

    def tokens(self, user_id: int) -> list[ApiToken]:
        with self.session() as s:
            return list(s.scalars(select(ApiToken).where(ApiToken.user_id == user_id).order_by(ApiToken.id)).all())

    def revoke_token(self, user_id: int, token_id: int) -> bool:
        with self.session() as s:
            res = s.execute(update(ApiToken).where(ApiToken.id == token_id, ApiToken.user_id == user_id)
                            .values(revoked=True))
            return bool(getattr(res, "rowcount", 0))

    def user_for_token(self, token_hash: str) -> User | None:
        """The enabled user holding this (unrevoked) token; notes its use at most once a minute."""
        with self.session() as s:
            row = s.execute(select(ApiToken, User).join(User, User.id == ApiToken.user_id)
                            .where(ApiToken.token_hash == token_hash, ApiToken.revoked.is_(False),
                                   User.disabled.is_(False))).first()
            if row is None:
                return None
            tok, user = row
            now = _utcnow()
            if tok.last_used_at is None or (now - tok.last_used_at).total_seconds() > 60:
                tok.last_used_at = now
            return user


def _pid_alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _study_review(results: Sequence[Result]) -> str:
    """A study's review status: the furthest any of its images got (dxa_ordered > acknowledged > new)."""
    order = {k: i for i, k in enumerate(REVIEW_STATUSES)}
    return max((r.review_status for r in results), key=lambda v: order.get(v, 0), default="new")
