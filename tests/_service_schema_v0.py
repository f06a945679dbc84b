"""The service schema exactly as main made it before migrations (commit 9be03ba, ``create_all``), frozen.

The migration tests build a database the way that code did, fill it, and
upgrade it. Never edit: it is what deployed databases look like.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import Boolean, Date, DateTime, Float, ForeignKey, Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


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
