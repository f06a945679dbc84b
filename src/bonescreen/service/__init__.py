"""``bonescreen serve``: DICOM C-STORE receiver + HTTP API + worklist + worker, one process.

Parts: :mod:`config` (settings), :mod:`store` (SQLAlchemy models and the
job queue), :mod:`intake` (validate, spool, enqueue), :mod:`scp` (pynetdicom
receiver), :mod:`worker` (screening), :mod:`forward` (C-STORE / STOW-RS back
to PACS), :mod:`api` and :mod:`worklist` (FastAPI app), :mod:`runtime`
(starting and stopping them together), :mod:`testing` (synthetic DICOMs and
a throwaway PostgreSQL for tests).
"""

from __future__ import annotations

from bonescreen.service.config import ServiceConfig, ServiceConfigError

__all__ = ["ServiceConfig", "ServiceConfigError"]
