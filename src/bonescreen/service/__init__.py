"""``bonescreen serve``: DICOM C-STORE receiver + HTTP API + worklist + worker, one process.

Parts: :mod:`config` (settings), :mod:`store` (SQLAlchemy models and the
job queue), :mod:`intake` (validate, spool, enqueue), :mod:`scp` (pynetdicom
receiver), :mod:`worker` (screening), :mod:`forward` (C-STORE / STOW-RS back
to PACS), :mod:`api` (the FastAPI app, including the routers of
:mod:`routes`, one per area), :mod:`auth` (accounts, tokens, the one
principal/role/CSRF check, session cookies), :mod:`runtime` (starting and
stopping them together). Test support (synthetic DICOMs, a throwaway
PostgreSQL) is ``tests/_service_support.py``.
"""

from __future__ import annotations

from bonescreen.service.config import ServiceConfig, ServiceConfigError

__all__ = ["ServiceConfig", "ServiceConfigError"]
