"""The DICOM C-STORE receiver (pynetdicom), for CR and DX images from PACS or modalities.

Only the configured calling AE titles may associate (pynetdicom's
``require_calling_aet``); with ``dicom_tls_cert_file``/``key_file`` the
receiver speaks DICOM TLS only, and with ``dicom_tls_ca_file`` a sender must
also present a certificate signed by that CA (mutual TLS). It also takes the
storage-commitment reports (N-EVENT-REPORT) that a PACS sends back for
results forwarded with ``forward_commitment``. Each received image is validated, spooled durably
and queued before the success status goes back (see ``intake``); anything the
service cannot use is refused with a failure status, and the receiver keeps
running.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from typing import Any

from bonescreen.service.config import ServiceConfig
from bonescreen.service.intake import STATUS_CANNOT_UNDERSTAND, Intake, IntakeError

__all__ = ["ACCEPTED_SOP_CLASSES", "StoreSCP"]

log = logging.getLogger(__name__)

#: Chest radiographs arrive as CR or DX objects; nothing else is accepted.
ACCEPTED_SOP_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
    "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image Storage - For Processing
)
VERIFICATION = "1.2.840.10008.1.1"  # C-ECHO


class StoreSCP:
    """A pynetdicom Storage SCP bound to an :class:`Intake`."""

    def __init__(self, config: ServiceConfig, intake: Intake, on_received: Callable[[], None] | None = None,
                 on_commit_report: Callable[[str, bool, str | None], int] | None = None) -> None:
        self.config = config
        self.intake = intake
        self.on_received = on_received
        self.on_commit_report = on_commit_report
        self.reports = 0
        self.server: Any = None
        self.received = 0
        self.refused = 0

    def handle_store(self, event: Any) -> int:
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
        except Exception as exc:
            self.refused += 1
            log.warning("C-STORE refused: data set cannot be decoded (%s)", type(exc).__name__)
            return STATUS_CANNOT_UNDERSTAND
        try:
            requested = str(event.request.AffectedSOPInstanceUID or "")
            if requested and str(ds.get("SOPInstanceUID", "")) != requested:
                raise IntakeError("SOP Instance UID in the data set differs from the request's", reason="uid_mismatch",
                                  dicom_status=0xA900, http_status=422)
            self.intake.accept(ds, event.encoded_dataset(), "dicom")
        except IntakeError as exc:
            self.refused += 1
            log.warning("C-STORE refused (%s): %s", exc.reason, exc)
            return exc.dicom_status
        except Exception:  # never let one object take the receiver down
            self.refused += 1
            log.exception("C-STORE failed unexpectedly")
            return 0xA700
        self.received += 1
        if self.on_received is not None:
            self.on_received()
        return 0x0000

    def handle_echo(self, event: Any) -> int:
        return 0x0000

    def handle_event_report(self, event: Any) -> tuple[int, None]:
        """A storage-commitment report for results this service forwarded."""
        from bonescreen.service.forward import commitment_outcome

        try:
            uid, ok, err = commitment_outcome(int(event.event_type), event.event_information)
        except Exception as exc:
            log.warning("N-EVENT-REPORT not understood (%s)", type(exc).__name__)
            return 0x0110, None  # processing failure
        self.reports += 1
        if uid and self.on_commit_report is not None:
            n = self.on_commit_report(uid, ok, err)
            log.info("storage commitment report: %s for %d result(s)", "committed" if ok else "failed", n)
        return 0x0000, None

    def tls_context(self) -> ssl.SSLContext | None:
        c = self.config
        if not c.dicom_tls_cert_file:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(c.dicom_tls_cert_file, c.dicom_tls_key_file)
        if c.dicom_tls_ca_file:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(c.dicom_tls_ca_file)
        return ctx

    def start(self) -> None:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt

        ae = AE(ae_title=self.config.ae_title)
        for uid in ACCEPTED_SOP_CLASSES:
            ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(VERIFICATION)
        from bonescreen.service.forward import STORAGE_COMMITMENT

        # the PACS that reports a commitment proposes the SCP role for itself; accept either role
        ae.add_supported_context(STORAGE_COMMITMENT, scu_role=True, scp_role=True)
        ae.require_calling_aet = [] if self.config.allow_any_ae else list(self.config.allowed_aes)
        ae.maximum_associations = 16
        handlers: list[Any] = [(evt.EVT_C_STORE, self.handle_store), (evt.EVT_C_ECHO, self.handle_echo),
                               (evt.EVT_N_EVENT_REPORT, self.handle_event_report)]
        tls = self.tls_context()
        self.server = ae.start_server((self.config.dicom_host, int(self.config.dicom_port)), block=False,
                                      evt_handlers=handlers, ssl_context=tls)
        log.info("DICOM receiver %s listening on %s:%d%s", self.config.ae_title, self.config.dicom_host,
                 self.port, " (TLS)" if tls else "")

    @property
    def port(self) -> int:
        if self.server is None:
            return int(self.config.dicom_port)
        return int(self.server.server_address[1])

    @property
    def alive(self) -> bool:
        return self.server is not None and self.server.socket is not None and self.server.socket.fileno() >= 0

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None
