"""Sending results back to PACS: the SR (and the Grad-CAM secondary capture) by C-STORE or STOW-RS.

Forwarding is its own queue (``results.forward_status``) with retries and
exponential back-off, on its own thread, so a slow or absent PACS never
holds up screening.
"""

from __future__ import annotations

import logging
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from bonescreen.errors import BonescreenError
from bonescreen.service.config import ServiceConfig, parse_cstore_target
from bonescreen.service.store import Store

__all__ = ["CStoreSender", "ForwardError", "ForwardLoop", "Sender", "StowRsSender", "senders_from_config"]

log = logging.getLogger(__name__)


class ForwardError(BonescreenError):
    reason = "forward_failed"


class Sender(Protocol):
    name: str

    def send(self, files: Sequence[Path]) -> None: ...


class CStoreSender:
    """C-STORE SCU: one association per result, every file must get status 0x0000."""

    name = "cstore"

    def __init__(self, target: str, calling_ae: str = "BONESCREEN", timeout: float = 30.0) -> None:
        self.called_ae, self.host, self.port = parse_cstore_target(target)
        self.calling_ae = calling_ae
        self.timeout = timeout

    def send(self, files: Sequence[Path]) -> None:
        import pydicom
        from pynetdicom import AE

        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        classes = set()
        for f in files:
            meta = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SOPClassUID"])
            classes.add(str(meta.SOPClassUID))
        for uid in sorted(classes):
            ae.add_requested_context(uid)
        assoc = ae.associate(self.host, self.port, ae_title=self.called_ae)
        if not assoc.is_established:
            raise ForwardError(f"association with {self.called_ae}@{self.host}:{self.port} was not established")
        try:
            for f in files:
                status = assoc.send_c_store(f)
                code = getattr(status, "Status", None)
                if code is None:
                    raise ForwardError("no C-STORE response (connection lost or timed out)")
                if int(code) not in (0x0000, 0xB000, 0xB007, 0xB006):
                    raise ForwardError(f"C-STORE refused with status 0x{int(code):04X}")
        finally:
            assoc.release()


def _multipart_related(parts: Sequence[bytes]) -> tuple[bytes, str]:
    # Hand-written because the encoding is ten lines and a DICOMweb client library would be
    # a new dependency for one POST; PS3.18 10.5: multipart/related; type="application/dicom".
    boundary = f"bonescreen-{uuid.uuid4().hex}"
    body = bytearray()
    for part in parts:
        body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        body += part
        body += b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return bytes(body), f'multipart/related; type="application/dicom"; boundary={boundary}'


class StowRsSender:
    """DICOMweb STOW-RS: one POST of all files to ``<base>/studies``."""

    name = "stow-rs"

    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0) -> None:
        url = url.rstrip("/")
        self.url = url if url.endswith("/studies") else url + "/studies"
        self.token = token
        self.timeout = timeout

    def send(self, files: Sequence[Path]) -> None:
        body, ctype = _multipart_related([Path(f).read_bytes() for f in files])
        req = urllib.request.Request(self.url, data=body, method="POST")
        req.add_header("Content-Type", ctype)
        req.add_header("Accept", "application/dicom+json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                code = resp.status
        except urllib.error.HTTPError as exc:
            raise ForwardError(f"STOW-RS answered HTTP {exc.code}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise ForwardError(f"STOW-RS not reachable ({type(exc).__name__})") from exc
        if code not in (200, 202):
            raise ForwardError(f"STOW-RS answered HTTP {code}")


def senders_from_config(config: ServiceConfig) -> list[Sender]:
    out: list[Sender] = []
    if config.forward_cstore:
        out.append(CStoreSender(config.forward_cstore, config.forward_calling_ae))
    if config.forward_stow_url:
        out.append(StowRsSender(config.forward_stow_url, config.forward_stow_token))
    return out


class ForwardLoop:
    """Thread that sends due results to every configured destination, with retries."""

    def __init__(self, config: ServiceConfig, store: Store, senders: Sequence[Sender] | None = None,
                 backoff_s: float = 5.0, poll_s: float = 0.5) -> None:
        self.config = config
        self.store = store
        self.senders = list(senders if senders is not None else senders_from_config(config))
        self.backoff_s = backoff_s
        self.poll_s = poll_s
        self.sent = 0
        self.failed = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if not self.senders:
            return
        self._thread = threading.Thread(target=self._run, name="bonescreen-forward", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self.run_once() == 0:
                    self._stop.wait(self.poll_s)
            except Exception:
                log.exception("forwarding loop error; retrying")
                self._stop.wait(2.0)

    def run_once(self, n: int = 10) -> int:
        due = self.store.forward_due(n)
        for item in due:
            files = [self.config.data_path / p for p in (item["sr_path"], item["sc_path"]) if p]
            error = None
            try:
                for sender in self.senders:
                    sender.send(files)
            except Exception as exc:  # recorded and retried; never fatal
                error = f"{getattr(sender, 'name', 'sender')}: {exc}"
                log.warning("forwarding result %d failed (attempt %d): %s", item["id"], item["attempts"] + 1,
                            error)
            self.store.forward_done(item["id"], error is None, error,
                                    max_attempts=self.config.forward_max_attempts, backoff_s=self.backoff_s)
            if error is None:
                self.sent += 1
            else:
                self.failed += 1
        return len(due)
