"""The running service: database, intake, worker, DICOM receiver and forwarder, started and stopped together."""

from __future__ import annotations

import fcntl
import logging
import os
import time
from pathlib import Path
from typing import IO, Any

from bonescreen.service.config import ServiceConfig, ServiceConfigError
from bonescreen.service.forward import ForwardLoop
from bonescreen.service.intake import Intake
from bonescreen.service.scp import StoreSCP
from bonescreen.service.store import Store
from bonescreen.service.worker import ScreeningEngine, Worker

__all__ = ["Service", "quiet_phi_loggers"]

log = logging.getLogger(__name__)

#: Libraries that log patient or study identifiers at INFO/DEBUG (highdicom copies
#: patient attributes by name, pynetdicom prints DIMSE messages with UIDs).
PHI_LOGGERS = ("highdicom", "pynetdicom")


def quiet_phi_loggers() -> None:
    """Keep only warnings from libraries that would log identifiers, whatever the root level."""
    for name in PHI_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    # pydicom's warnings about invalid values quote the value (which may be a name)
    logging.getLogger("pydicom").setLevel(logging.ERROR)


class Service:
    """Owns every part; ``start()`` brings them up (worker first, receiver last), ``stop()`` the reverse.

    ``worker=False`` / ``dicom=False`` leave a part out (API-only replicas, tests).
    """

    def __init__(self, config: ServiceConfig, *, token: str, worker: bool = True, dicom: bool | None = None,
                 engine: ScreeningEngine | None = None) -> None:
        quiet_phi_loggers()
        self.config = config
        self.token = token
        self.data_dir = config.data_path
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(config.database_url)
        self.store.create_all()
        self.intake = Intake(self.store, self.data_dir, max_bytes=config.max_upload_bytes)
        self.worker: Worker | None = Worker(config, self.store, engine) if worker else None
        use_dicom = config.dicom_enabled if dicom is None else dicom
        self.scp: StoreSCP | None = StoreSCP(config, self.intake, self.notify) if use_dicom else None
        self.forwarder = ForwardLoop(config, self.store)
        self.started_at = time.time()
        self.http_uploads = 0
        self.http_refused = 0
        self._lock: IO[Any] | None = None
        self._stopped = False

    def notify(self) -> None:
        if self.worker is not None:
            self.worker.notify()

    def _take_lock(self) -> None:
        # Two services on one data folder would share a spool and (with SQLite) a database
        # file with two "only" workers; refuse the second instead.
        self._lock = open(self.data_dir / "service.lock", "a+")
        try:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            self._lock.close()
            self._lock = None
            raise ServiceConfigError(f"another bonescreen service is using {self.data_dir}") from exc
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(str(os.getpid()))
        self._lock.flush()

    def start(self) -> None:
        self._take_lock()
        try:
            if self.worker is not None:
                self.worker.start()
            self.forwarder.start()
            if self.scp is not None:
                self.scp.start()
        except BaseException:
            self.stop()  # release the lock and whatever did start
            raise

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self.scp is not None:
            self.scp.stop()
        if self.worker is not None:
            self.worker.stop()
        self.forwarder.stop()
        self.store.dispose()
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        log.info("service stopped")

    def health(self) -> dict[str, Any]:
        db = self.store.ping()
        worker_ok = self.worker is None or self.worker.alive
        scp_ok = self.scp is None or self.scp.alive
        return {
            "status": "ok" if db and worker_ok and scp_ok else "degraded",
            "database": db,
            "worker": None if self.worker is None else worker_ok,
            "dicom": None if self.scp is None else scp_ok,
            "uptime_s": round(time.time() - self.started_at, 1),
        }

    def resolve(self, rel: str | None) -> Path | None:
        """A stored relative path -> a file inside the data folder, or None (never outside it)."""
        if not rel:
            return None
        root = self.data_dir.resolve()
        p = (root / rel).resolve()
        if root not in p.parents or not p.is_file():
            return None
        return p
