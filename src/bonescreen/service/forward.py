"""Sending results back to PACS: the SR (and the Grad-CAM secondary capture) by C-STORE or STOW-RS.

Forwarding is its own queue (``results.forward_status``) on its own thread,
so a slow or absent PACS never holds up screening. A result is ``done`` only
when the destination confirmed every file:

* **C-STORE**: every file answered 0x0000 (or a warning status), and with
  ``forward_commitment`` the PACS's storage commitment report (N-EVENT-REPORT
  after our N-ACTION) lists every instance as committed. The report may come
  on the same association or on a new one to the service's receiver (most
  PACS, Orthanc among them); until then the result is ``committing``.
* **STOW-RS** (dicomweb-client): HTTP 200, and no ``FailedSOPSequence`` in the
  response. An HTTP 202 with failed instances is a *partial failure*: the
  attempt failed and is retried.

A failed attempt is retried with exponential back-off (``forward_backoff_seconds``
doubling up to ``forward_backoff_max_seconds``, with jitter); after
``forward_max_attempts`` the result is **dead-lettered** (``dead_letter``:
shown on the worklist and in ``/metrics``; an admin can re-queue it).
C-STORE may run over DICOM TLS (``forward_tls_*``).
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from bonescreen.errors import BonescreenError
from bonescreen.service.config import ServiceConfig, parse_cstore_target, read_secret_file
from bonescreen.service.store import Store

__all__ = [
    "STORAGE_COMMITMENT",
    "CStoreSender",
    "ForwardError",
    "ForwardLoop",
    "Sender",
    "Sent",
    "StowRsSender",
    "commitment_outcome",
    "senders_from_config",
    "stow_failures",
    "tls_client_context",
]

log = logging.getLogger(__name__)

#: Storage Commitment Push Model SOP Class and its well-known SOP Instance (PS3.4 J.3).
STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
CSTORE_OK = (0x0000, 0xB000, 0xB007, 0xB006)  # success and the warning statuses (stored)


class ForwardError(BonescreenError):
    reason = "forward_failed"


@dataclass(frozen=True)
class Sent:
    """What a sender did: ``commit_uid`` when the result now waits for a storage-commitment report."""

    commit_uid: str | None = None


class Sender(Protocol):
    name: str

    def send(self, files: Sequence[Path], on_commit_request: Callable[[str], None] | None = None
             ) -> Sent | None: ...


def tls_client_context(ca_file: str | None, cert_file: str | None = None, key_file: str | None = None
                       ) -> ssl.SSLContext:
    """A TLS client context: verify the peer against ``ca_file`` (else the system CAs); our certificate if given."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file and key_file:
        ctx.load_cert_chain(cert_file, key_file)
    return ctx


def commitment_outcome(event_type: int, info: Any) -> tuple[str | None, bool, str | None]:
    """An N-EVENT-REPORT's (transaction UID, all committed?, error) from its event type and information."""
    uid = str(getattr(info, "TransactionUID", "") or "") or None
    failed = list(getattr(info, "FailedSOPSequence", []) or [])
    if event_type == 1 and not failed:
        return uid, True, None
    reasons = sorted({f"0x{int(getattr(f, 'FailureReason', 0) or 0):04X}" for f in failed})
    return uid, False, f"storage commitment failed for {len(failed)} instance(s) ({', '.join(reasons) or '?'})"


class CStoreSender:
    """C-STORE SCU: one association per result, every file must be stored (and, if asked, committed)."""

    name = "cstore"

    def __init__(self, target: str, calling_ae: str = "BONESCREEN", timeout: float = 30.0, *,
                 tls: ssl.SSLContext | None = None, commitment: bool = False,
                 on_report: Any = None) -> None:
        self.called_ae, self.host, self.port = parse_cstore_target(target)
        self.calling_ae = calling_ae
        self.timeout = timeout
        self.tls = tls
        self.commitment = commitment
        self.on_report = on_report  # called with (transaction uid, ok, error) for a same-association report

    def send(self, files: Sequence[Path], on_commit_request: Callable[[str], None] | None = None) -> Sent:
        """``on_commit_request(transaction_uid)`` runs just before the N-ACTION (to persist the UID)."""
        import pydicom
        from pydicom.dataset import Dataset
        from pydicom.uid import generate_uid
        from pynetdicom import AE, evt

        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        refs: list[tuple[str, str]] = []
        for f in files:
            meta = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
            refs.append((str(meta.SOPClassUID), str(meta.SOPInstanceUID)))
        for uid in sorted({c for c, _ in refs}):
            ae.add_requested_context(uid)
        if self.commitment:
            ae.add_requested_context(STORAGE_COMMITMENT)

        def on_event_report(event: Any) -> tuple[int, None]:  # the report on this same association
            uid, ok, err = commitment_outcome(int(event.event_type), event.event_information)
            if self.on_report is not None and uid:
                self.on_report(uid, ok, err)
            return 0x0000, None

        tls_args = (self.tls, self.host) if self.tls is not None else None
        assoc = ae.associate(self.host, self.port, ae_title=self.called_ae, tls_args=tls_args,
                             evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_event_report)])
        if not assoc.is_established:
            raise ForwardError(f"association with {self.called_ae}@{self.host}:{self.port} was not established"
                               + (" (TLS)" if self.tls else ""))
        try:
            for f in files:
                status = assoc.send_c_store(f)
                code = getattr(status, "Status", None)
                if code is None:
                    raise ForwardError("no C-STORE response (connection lost or timed out)")
                if int(code) not in CSTORE_OK:
                    raise ForwardError(f"C-STORE refused with status 0x{int(code):04X}")
            if not self.commitment:
                return Sent()
            transaction = str(generate_uid())
            info = Dataset()
            info.TransactionUID = transaction
            info.ReferencedSOPSequence = []
            for c, i in refs:
                item = Dataset()
                item.ReferencedSOPClassUID = c
                item.ReferencedSOPInstanceUID = i
                info.ReferencedSOPSequence.append(item)
            if on_commit_request is not None:
                on_commit_request(transaction)
            status, _reply = assoc.send_n_action(info, 1, STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE)
            code = getattr(status, "Status", None)
            if code is None or int(code) != 0x0000:
                raise ForwardError("storage commitment request refused"
                                   + (f" (status 0x{int(code):04X})" if code is not None else " (no response)"))
            return Sent(commit_uid=transaction)
        finally:
            assoc.release()


def stow_failures(response: Any) -> list[str]:
    """Failure reasons in a STOW-RS response data set (PS3.18 10.5.3: FailedSOPSequence)."""
    out = []
    for item in list(getattr(response, "FailedSOPSequence", []) or []):
        reason = getattr(item, "FailureReason", None)
        out.append(f"0x{int(reason):04X}" if reason is not None else "?")
    return out


class StowRsSender:
    """DICOMweb STOW-RS through dicomweb-client: one POST of all files to ``<base>/studies``."""

    name = "stow-rs"

    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0) -> None:
        url = url.rstrip("/")
        self.base = url[: -len("/studies")] if url.endswith("/studies") else url
        self.token = token
        self.timeout = timeout

    def send(self, files: Sequence[Path], on_commit_request: Callable[[str], None] | None = None) -> Sent:
        import pydicom
        import requests
        from dicomweb_client.api import DICOMwebClient

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        client = DICOMwebClient(url=self.base, headers=headers, timeout=self.timeout)
        client.set_http_retry_params(retry=False)  # retries, back-off and the dead letter are ForwardLoop's
        datasets = [pydicom.dcmread(f) for f in files]
        try:
            response = client.store_instances(datasets)
        except requests.HTTPError as exc:
            code = getattr(exc.response, "status_code", "?")
            failed = []
            try:
                failed = stow_failures(pydicom.Dataset.from_json(exc.response.json()))
            except Exception:  # no parsable body: the status says enough
                pass
            raise ForwardError(f"STOW-RS answered HTTP {code}"
                               + (f"; failed instances: {', '.join(failed)}" if failed else "")) from None
        except (requests.RequestException, OSError) as exc:
            raise ForwardError(f"STOW-RS not reachable ({type(exc).__name__})") from None
        failed = stow_failures(response)
        if failed:  # HTTP 202: some instances stored, these not: not a success
            raise ForwardError(f"STOW-RS stored only part of the result: {len(failed)} of {len(datasets)} "
                               f"instance(s) failed ({', '.join(failed)})")
        return Sent()


def senders_from_config(config: ServiceConfig, on_report: Any = None) -> list[Sender]:
    out: list[Sender] = []
    if config.forward_cstore:
        tls = None
        if config.forward_tls_ca_file or config.forward_tls_cert_file:
            tls = tls_client_context(config.forward_tls_ca_file, config.forward_tls_cert_file,
                                     config.forward_tls_key_file)
        out.append(CStoreSender(config.forward_cstore, config.forward_calling_ae, tls=tls,
                                commitment=config.forward_commitment, on_report=on_report))
    if config.forward_stow_url:
        token = read_secret_file(config.stow_token_file, "stow_token_file") if config.stow_token_file else None
        out.append(StowRsSender(config.forward_stow_url, token))
    return out


class ForwardLoop:
    """Thread that sends due results to every configured destination, with retries and a dead letter."""

    def __init__(self, config: ServiceConfig, store: Store, senders: Sequence[Sender] | None = None,
                 backoff_s: float | None = None, poll_s: float = 0.5) -> None:
        self.config = config
        self.store = store
        self.senders = list(senders if senders is not None else senders_from_config(config, self.on_report))
        self.backoff_s = config.forward_backoff_seconds if backoff_s is None else backoff_s
        self.poll_s = poll_s
        self.sent = 0
        self.failed = 0
        self.dead = 0
        self.committed = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _retry_kw(self) -> dict[str, Any]:
        return {"max_attempts": self.config.forward_max_attempts, "backoff_s": self.backoff_s,
                "backoff_max_s": self.config.forward_backoff_max_seconds}

    def on_report(self, transaction_uid: str, ok: bool, error: str | None) -> int:
        """A storage-commitment report (same association, or received by the service's SCP)."""
        n = self.store.forward_committed(transaction_uid, ok, error, **self._retry_kw())
        if ok:
            self.committed += n
        elif n:
            log.warning("storage commitment failed for %d result(s): %s", n, error)
        return n

    def start(self) -> None:
        if not self.senders:
            return
        self._thread = threading.Thread(target=self._run, name="bonescreen-forward", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is None or self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self.run_once() == 0:
                    self._stop.wait(self.poll_s)
            except Exception:
                log.exception("forwarding loop error; retrying")
                self._stop.wait(2.0)

    def run_once(self, n: int = 10) -> int:
        expired = self.store.forward_expire_commitments(**self._retry_kw())
        if expired:
            log.warning("%d result(s) got no storage commitment report in time; retrying", expired)
        due = self.store.forward_due(n)
        for item in due:
            files = [self.config.data_path / p for p in (item["sr_path"], item["sc_path"]) if p]
            error = None
            commit_uid = None
            sender: Any = None
            deadline = time.time() + self.config.forward_commit_timeout_seconds

            def begin(uid: str, rid: int = item["id"]) -> None:
                self.store.forward_begin_commit(rid, uid, deadline)

            try:
                for sender in self.senders:
                    sent = sender.send(files, begin)
                    if sent is not None and sent.commit_uid:
                        commit_uid = sent.commit_uid
            except Exception as exc:  # recorded and retried; never fatal
                error = f"{getattr(sender, 'name', 'sender')}: {exc}"
                log.warning("forwarding result %d failed (attempt %d): %s", item["id"], item["attempts"] + 1,
                            error)
            status = self.store.forward_done(item["id"], error is None, error, commit_uid=commit_uid,
                                             commit_deadline=deadline if commit_uid else None, **self._retry_kw())
            if error is None:
                self.sent += 1
            else:
                self.failed += 1
            if status == "dead_letter":
                self.dead += 1
                log.error("forwarding result %d gave up after %d attempts: dead-lettered", item["id"],
                          item["attempts"] + 1)
        return len(due) + expired
