"""Receiving one image (from C-STORE or HTTP): validate, spool durably, enqueue.

The order is what makes "acknowledged" mean "never lost": the bytes are written
to a temporary file, fsync'ed and renamed into the spool (and the folder
fsync'ed), then the job row is committed, and only then does the caller send
C-STORE success or HTTP 2xx. A crash before the commit leaves at worst an
orphan spool file for an image the sender was never told we have.

Spool file names are derived from a hash of the SOP Instance UID, never from
anything a sender chose, so no upload can name a path.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bonescreen.errors import BonescreenError
from bonescreen.fsio import atomic_write_bytes
from bonescreen.service.store import Store

__all__ = ["Intake", "IntakeError", "IntakeResult", "hashed", "validate_dataset"]

log = logging.getLogger(__name__)

# DICOM C-STORE failure statuses (PS3.4 B.2.3, PS3.7 C.4.2)
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC210


class IntakeError(BonescreenError):
    """A received object is refused; carries the DICOM status and HTTP code to answer with."""

    reason = "refused"

    def __init__(self, message: str, *, reason: str, dicom_status: int, http_status: int) -> None:
        super().__init__(message, reason=reason)
        self.dicom_status = dicom_status
        self.http_status = http_status


@dataclass(frozen=True)
class IntakeResult:
    job_id: int
    sop_instance_uid: str
    created: bool


def hashed(value: str, n: int = 12) -> str:
    """A short non-reversible tag for logs (never log a UID that could be joined to a patient)."""
    return hashlib.sha256(value.encode()).hexdigest()[:n]


def _refuse(msg: str, reason: str, dicom: int = STATUS_DATASET_MISMATCH, http: int = 422) -> IntakeError:
    return IntakeError(msg, reason=reason, dicom_status=dicom, http_status=http)


def validate_dataset(ds: Any) -> tuple[str, str | None]:
    """Refuse what the worker could never read; returns (SOP Instance UID, Study Instance UID).

    Every element is decoded here (iteration converts raw elements), so a corrupt
    element is refused at the door instead of failing later in the worker.
    """
    from pydicom.uid import UID

    try:
        for _elem in ds:
            pass
    except Exception as exc:
        raise _refuse(f"the data set cannot be decoded ({type(exc).__name__})", "corrupt",
                      STATUS_CANNOT_UNDERSTAND, 400) from exc
    sop = str(ds.get("SOPInstanceUID", "") or "").strip()
    if not sop or len(sop) > 64 or not UID(sop).is_valid:
        raise _refuse("SOPInstanceUID is missing or not a valid UID", "bad_uid")
    if not ds.get("SOPClassUID"):
        raise _refuse("SOPClassUID is missing", "missing_tag")
    if "PixelData" not in ds:
        raise _refuse("no PixelData: only images can be screened", "no_pixel_data")
    for kw in ("Rows", "Columns", "BitsAllocated"):
        if not ds.get(kw):
            raise _refuse(f"{kw} is missing", "missing_tag")
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts is not None and not UID(str(ts)).is_compressed:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        need = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1) * frames
        need = need * int(ds.BitsAllocated) // 8
        have = len(ds.PixelData or b"")
        if have < need:
            raise _refuse(f"PixelData holds {have} bytes; Rows x Columns needs {need}", "truncated")
    study = ds.get("StudyInstanceUID")
    study_s = str(study).strip() if study else None
    if study_s and (len(study_s) > 64 or not UID(study_s).is_valid):
        study_s = None
    return sop, study_s


class Intake:
    """Spool + enqueue, shared by the C-STORE receiver and the upload endpoint."""

    def __init__(self, store: Store, data_dir: str | os.PathLike[str], *, max_bytes: int | None = None) -> None:
        self.store = store
        self.data_dir = Path(data_dir)
        self.spool = self.data_dir / "spool"
        self.tmp = self.spool / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes

    def spool_relpath(self, sop_instance_uid: str) -> str:
        h = hashlib.sha256(sop_instance_uid.encode()).hexdigest()
        return f"spool/{h[:2]}/{h[:40]}.dcm"

    def _write(self, rel: str, data: bytes) -> None:
        # durable before it is queued: the file and the rename survive a power cut
        atomic_write_bytes(self.data_dir / rel, data, tmp_dir=self.tmp, sync_dir=True)

    def accept(self, ds: Any, encoded: bytes, source: str) -> IntakeResult:
        """``ds``: the decoded data set; ``encoded``: the Part-10 file bytes to spool."""
        sop, study = validate_dataset(ds)
        if self.max_bytes is not None and len(encoded) > self.max_bytes:
            raise _refuse(f"object is {len(encoded)} bytes; the limit is {self.max_bytes}", "too_large",
                          STATUS_OUT_OF_RESOURCES, 413)
        try:
            if self.store.has_sop(sop):
                outcome = self.store.enqueue(sop, study, self.spool_relpath(sop), source)
            else:
                rel = self.spool_relpath(sop)
                self._write(rel, encoded)
                outcome = self.store.enqueue(sop, study, rel, source)
        except OSError as exc:
            log.error("cannot spool a received image: %s", type(exc).__name__)
            raise _refuse("the service cannot store the image now", "out_of_resources",
                          STATUS_OUT_OF_RESOURCES, 503) from exc
        except Exception as exc:
            if isinstance(exc, IntakeError):
                raise
            log.error("cannot queue a received image: %s", type(exc).__name__)
            raise _refuse("the service cannot queue the image now", "out_of_resources",
                          STATUS_OUT_OF_RESOURCES, 503) from exc
        log.info("received job %d (sop#%s) via %s%s", outcome.job_id, hashed(sop), source,
                 "" if outcome.created else ", duplicate")
        return IntakeResult(outcome.job_id, sop, outcome.created)

    def accept_file_bytes(self, data: bytes, source: str = "http") -> IntakeResult:
        """A DICOM Part-10 file (preamble, DICM, file meta) from an upload."""
        import pydicom

        if self.max_bytes is not None and len(data) > self.max_bytes:
            raise _refuse(f"upload is {len(data)} bytes; the limit is {self.max_bytes}", "too_large",
                          STATUS_OUT_OF_RESOURCES, 413)
        if len(data) < 132 or data[128:132] != b"DICM":
            raise _refuse("not a DICOM Part-10 file (no 'DICM' prefix after the 128-byte preamble)",
                          "not_dicom", STATUS_CANNOT_UNDERSTAND, 400)
        try:
            ds = pydicom.dcmread(io.BytesIO(data))
        except Exception as exc:
            raise _refuse(f"the DICOM file cannot be parsed ({type(exc).__name__})", "corrupt",
                          STATUS_CANNOT_UNDERSTAND, 400) from exc
        return self.accept(ds, data, source)
