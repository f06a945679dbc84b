"""The running service: database, intake, worker, DICOM receiver and forwarder, started and stopped together.

Several ``serve`` processes (on one host or several) may share one database:
each registers under its instance name (``--instance``, default the host
name; one live process per name) and a heartbeat thread renews its
registration and the leases of the jobs its worker holds. A process killed
with ``kill -9`` stops renewing, so its jobs return to the queue when their
lease (``lease_seconds``) runs out and another worker screens them; the same
instance restarted on the same host takes its jobs back at once.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from bonescreen.service.config import ServiceConfig, ServiceConfigError
from bonescreen.service.forward import ForwardLoop
from bonescreen.service.intake import Intake
from bonescreen.service.scp import StoreSCP
from bonescreen.service.store import Store
from bonescreen.screen import ScreeningEngine
from bonescreen.service.worker import Worker

__all__ = ["Service", "quiet_phi_loggers"]

log = logging.getLogger(__name__)

#: Libraries that log patient or study identifiers at INFO/DEBUG (highdicom copies
#: patient attributes by name, pynetdicom prints DIMSE messages with UIDs).
PHI_LOGGERS = ("highdicom", "pynetdicom", "dicomweb_client")


def quiet_phi_loggers() -> None:
    """Keep only warnings from libraries that would log identifiers, whatever the root level."""
    for name in PHI_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    # pydicom's warnings about invalid values quote the value (which may be a name)
    logging.getLogger("pydicom").setLevel(logging.ERROR)


class Service:
    """Owns every part; ``start()`` brings them up (worker first, receiver last), ``stop()`` the reverse.

    ``worker=False`` / ``dicom=False`` leave a part out (API-only replicas, tests); by default the
    settings' ``worker_enabled`` / ``dicom_enabled`` decide. ``token``: a static API token (else
    ``token_file``'s), role ``token_role``.
    """

    def __init__(self, config: ServiceConfig, *, token: str | None = None, worker: bool | None = None,
                 dicom: bool | None = None, engine: ScreeningEngine | None = None) -> None:
        from bonescreen.service.auth import Authenticator
        from bonescreen.service.migrate import ensure_schema

        quiet_phi_loggers()
        self.config = config
        self.data_dir = config.data_path
        # the folder holds patient data and keys: readable by the service's user only when we make it
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.store = Store(config.database_url)
        ensure_schema(self.store, auto_upgrade=config.db_auto_upgrade,
                      command_hint="bonescreen db upgrade" + _config_hint())
        self.auth = Authenticator(config, self.store, token)
        self.intake = Intake(self.store, self.data_dir, max_bytes=config.max_upload_bytes)
        use_worker = config.worker_enabled if worker is None else worker
        self.worker: Worker | None = Worker(config, self.store, engine) if use_worker else None
        self.forwarder = ForwardLoop(config, self.store)
        use_dicom = config.dicom_enabled if dicom is None else dicom
        self.scp: StoreSCP | None = (StoreSCP(config, self.intake, self.notify, on_commit_report=self.forwarder.on_report)
                                     if use_dicom else None)
        self.instance = config.instance_name
        self.run_id = uuid.uuid4().hex
        self.started_at = time.time()
        self.http_uploads = 0
        self.http_refused = 0
        self._heartbeat: threading.Thread | None = None
        self._hb_stop = threading.Event()
        self._registered = False
        self._stopped = False

    @property
    def token(self) -> str | None:  # the static token, if any (tests and scripts)
        return self.auth.static_token

    @property
    def parts(self) -> str:
        return ",".join(p for p, on in (("worker", self.worker), ("dicom", self.scp),
                                        ("forward", self.forwarder.senders)) if on)

    def notify(self) -> None:
        if self.worker is not None:
            self.worker.notify()

    @property
    def heartbeat_s(self) -> float:
        return max(0.5, min(5.0, self.config.lease_seconds / 4))

    def _register(self) -> None:
        from bonescreen.service.store import StoreError

        try:
            self.store.register_instance(self.instance, socket.gethostname(), os.getpid(), self.parts,
                                         run_id=self.run_id, stale_after=max(15.0, 3 * self.heartbeat_s))
        except StoreError as exc:
            raise ServiceConfigError(str(exc)) from None
        self._registered = True

    def _beat(self) -> None:
        while not self._hb_stop.wait(self.heartbeat_s):
            try:
                wid = self.worker.worker_id if self.worker is not None else None
                self.store.heartbeat(self.instance, self.run_id, wid, self.config.lease_seconds)
            except Exception:  # a database hiccup: the next beat tries again
                log.warning("heartbeat failed; retrying", exc_info=True)

    def audit_settings(self) -> None:
        """Audit the settings when they differ from the last start's (keys and non-secret values)."""
        now = self.config.public_dict()
        last_text = self.store.last_audit_detail("settings")
        try:
            last = json.loads(last_text)["settings"] if last_text else None
        except (ValueError, KeyError, TypeError):
            last = None
        if last == json.loads(json.dumps(now, default=str)):
            return
        changed = sorted(k for k in now if last is None or last.get(k) != now[k]) if last else None
        self.store.audit("settings", actor=f"serve:{self.instance}",
                         detail={"changed": changed, "settings": now})

    def start(self) -> None:
        self._register()
        try:
            self.audit_settings()
            if self.worker is not None:
                self.worker.start()
            self.forwarder.start()
            if self.scp is not None:
                self.scp.start()
            self._heartbeat = threading.Thread(target=self._beat, name="bonescreen-heartbeat", daemon=True)
            self._heartbeat.start()
        except BaseException:
            self.stop()  # unregister and stop whatever did start
            raise

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._hb_stop.set()
        if self.scp is not None:
            self.scp.stop()
        if self.worker is not None:
            self.worker.stop()
        self.forwarder.stop()
        if self._heartbeat is not None:
            self._heartbeat.join(10)
        if self._registered:
            try:
                self.store.unregister_instance(self.instance, self.run_id)
            except Exception:
                log.warning("could not unregister instance %s", self.instance)
        self.store.dispose()
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
            "instance": self.instance,
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


def _config_hint() -> str:
    import sys

    args = sys.argv[1:]
    for flag in ("--config", "--data-dir", "--db-url"):
        if flag in args:
            i = args.index(flag)
            if i + 1 < len(args):
                return f" {flag} {args[i + 1]}"
    return ""
