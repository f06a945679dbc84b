"""Upload one DICOM file over HTTP, and where a received image is."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from bonescreen.service.auth import REVIEWER, VIEWER
from bonescreen.service.intake import IntakeError
from bonescreen.service.routes.common import SopUID, Svc
from bonescreen.service.runtime import Service

__all__ = ["UploadOut", "router"]

router = APIRouter(tags=["images"])


class UploadOut(BaseModel):
    job_id: int
    sop_instance_uid: str
    duplicate: bool
    status: str


async def _read_body(request: Request, service: Service) -> bytes:
    """The raw body, refused (413) as soon as it passes ``max_upload_bytes``, declared or streamed."""
    limit = service.config.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        service.http_refused += 1
        raise HTTPException(413, f"upload larger than the {limit}-byte limit")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            service.http_refused += 1
            raise HTTPException(413, f"upload larger than the {limit}-byte limit")
    return bytes(body)


@router.post("/api/v1/images", dependencies=[REVIEWER], status_code=202, response_model=UploadOut,
             responses={400: {"description": "not DICOM / corrupt"}, 413: {"description": "too large"},
                        422: {"description": "not a usable image"}})
async def upload(request: Request, service: Svc) -> UploadOut:
    """Queue one DICOM Part-10 file sent as the raw body (``Content-Type: application/dicom``)."""
    body = await _read_body(request, service)
    try:
        res = await run_in_threadpool(service.intake.accept_file_bytes, body, "http")
    except IntakeError as exc:
        service.http_refused += 1
        raise HTTPException(exc.http_status, f"{exc.reason}: {exc}") from exc
    service.http_uploads += 1
    service.notify()
    status = await run_in_threadpool(service.store.job_status, res.sop_instance_uid) or "pending"
    return UploadOut(job_id=res.job_id, sop_instance_uid=res.sop_instance_uid, duplicate=not res.created,
                     status=status)


@router.get("/api/v1/images/{sop_instance_uid}", dependencies=[VIEWER])
def image_status(sop_instance_uid: SopUID, service: Svc) -> dict[str, Any]:
    """Where one received image is: pending, processing, done or failed (and its result when done)."""
    status = service.store.job_status(sop_instance_uid)
    if status is None:
        raise HTTPException(404, "no such image")
    r = service.store.get_result(sop_instance_uid)
    return {"sop_instance_uid": sop_instance_uid, "status": status, "result": r.as_dict() if r else None}
