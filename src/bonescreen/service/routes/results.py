"""Results: the filtered list (JSON and CSV), one result, its SR and overlay, review status, forwarding retry."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.responses import FileResponse
from pydantic import BaseModel

from bonescreen.service.auth import VIEWER, Admin, Reviewer, Viewer, client_ip
from bonescreen.service.routes.common import SopUID, Svc, Text32, Text64, Uid, to_csv
from bonescreen.service.runtime import Service
from bonescreen.service.store import CATEGORY_LABELS, FORWARD_STATUSES, REVIEW_STATUSES, StoreError
from bonescreen.service.worker import service_pseudonymiser

__all__ = ["ResultFilters", "ReviewIn", "router"]

CATEGORIES = tuple(CATEGORY_LABELS)

router = APIRouter(tags=["results"])


class ResultFilters:
    """The result filters shared by the JSON and the CSV query (a FastAPI class dependency)."""

    def __init__(
        self,
        study_instance_uid: Uid = None,
        patient_id: Text64 = None,
        category: Text32 = None,
        flagged: bool | None = None,
        review_status: Text32 = None,
        date_from: dt.date | None = None,
        date_to: dt.date | None = None,
        eligible: bool | None = None,
        forward_status: Text32 = None,
    ) -> None:
        self.study_instance_uid, self.patient_id, self.category = study_instance_uid, patient_id, category
        self.flagged, self.review_status, self.eligible = flagged, review_status, eligible
        self.date_from, self.date_to, self.forward_status = date_from, date_to, forward_status


class ReviewIn(BaseModel):
    status: str


def _query(service: Service, f: ResultFilters, limit: int, offset: int) -> list[Any]:
    if f.category and f.category not in CATEGORIES:
        raise HTTPException(422, f"category must be one of {', '.join(CATEGORIES)}")
    if f.review_status and f.review_status not in REVIEW_STATUSES:
        raise HTTPException(422, f"review_status must be one of {', '.join(REVIEW_STATUSES)}")
    if f.forward_status and f.forward_status not in FORWARD_STATUSES:
        raise HTTPException(422, f"forward_status must be one of {', '.join(FORWARD_STATUSES)}")
    patient_id = f.patient_id
    if patient_id and service.config.hash_patient_id:
        patient_id = service_pseudonymiser(service.config)(patient_id)
    return service.store.query_results(
        study_instance_uid=f.study_instance_uid, patient_id=patient_id, category=f.category, flagged=f.flagged,
        review_status=f.review_status, date_from=f.date_from, date_to=f.date_to, eligible=f.eligible,
        forward_status=f.forward_status, limit=limit, offset=offset,
    )


def _result(service: Service, sop: str) -> Any:
    r = service.store.get_result(sop)
    if r is None:
        raise HTTPException(404, "no result for this SOP Instance UID")
    return r


@router.get("/api/v1/results", dependencies=[VIEWER])
def results(
    service: Svc,
    f: ResultFilters = Depends(),
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> dict[str, Any]:
    """Results by study, patient, category, flag, review or forwarding status, study date; flagged first."""
    rows = _query(service, f, limit, offset)
    return {"count": len(rows), "results": [r.as_dict() for r in rows]}


@router.get("/api/v1/results.csv", response_class=Response,
            responses={200: {"content": {"text/csv": {}}, "description": "the results as CSV"}})
def results_csv(request: Request, service: Svc, p: Reviewer, f: ResultFilters = Depends()) -> Response:
    """The filtered results as CSV (audited as an export)."""
    rows = _query(service, f, 100_000, 0)
    service.store.audit("export", actor=p.username, target="results.csv", ip=client_ip(request),
                        detail={"rows": len(rows)})
    data = [r.as_dict() for r in rows]
    cols = list(data[0]) if data else ["sop_instance_uid"]
    return Response(to_csv(data, cols), media_type="text/csv",
                    headers={"Content-Disposition": 'attachment; filename="bonescreen-results.csv"',
                             "Cache-Control": "no-store"})


@router.get("/api/v1/results/{sop_instance_uid}", dependencies=[VIEWER])
def result(sop_instance_uid: SopUID, service: Svc) -> dict[str, Any]:
    return dict(_result(service, sop_instance_uid).as_dict())


@router.get("/api/v1/results/{sop_instance_uid}/sr", response_class=FileResponse,
            responses={200: {"content": {"application/dicom": {}}, "description": "the SR"}})
def result_sr(sop_instance_uid: SopUID, request: Request, service: Svc, p: Viewer) -> FileResponse:
    """The DICOM Structured Report (TID 1500) of this image's result (audited as an export)."""
    path = service.resolve(_result(service, sop_instance_uid).sr_path)
    if path is None:
        raise HTTPException(404, "no SR for this image (not screened, or not eligible)")
    service.store.audit("export", actor=p.username, target=sop_instance_uid, ip=client_ip(request),
                        detail={"what": "sr"})
    return FileResponse(path, media_type="application/dicom", filename="result.SR.dcm")


@router.get("/api/v1/results/{sop_instance_uid}/overlay", dependencies=[VIEWER], response_class=FileResponse,
            responses={200: {"content": {"image/png": {}}, "description": "the overlay"}})
def result_overlay(sop_instance_uid: SopUID, service: Svc) -> FileResponse:
    """The Grad-CAM overlay (PNG) on the preprocessed image."""
    path = service.resolve(_result(service, sop_instance_uid).overlay_path)
    if path is None:
        raise HTTPException(404, "no overlay for this image")
    return FileResponse(path, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


@router.put("/api/v1/results/{sop_instance_uid}/review")
def set_review(sop_instance_uid: SopUID, body: ReviewIn, request: Request, service: Svc,
               p: Reviewer) -> dict[str, Any]:
    """Set the clinician's status: new, acknowledged or dxa_ordered (records who, audited)."""
    try:
        r = service.store.set_review(sop_instance_uid, body.status, who=p.username)
    except StoreError as exc:
        raise HTTPException(422, str(exc)) from exc
    if r is None:
        raise HTTPException(404, "no result for this SOP Instance UID")
    service.store.audit("review", actor=p.username, target=sop_instance_uid, ip=client_ip(request),
                        detail={"status": body.status})
    return dict(r.as_dict())


@router.post("/api/v1/results/{sop_instance_uid}/forward")
def retry_forward(sop_instance_uid: SopUID, request: Request, service: Svc, p: Admin) -> dict[str, Any]:
    """Put a dead-lettered result back into the forwarding queue."""
    if not service.store.forward_retry(sop_instance_uid):
        raise HTTPException(409, "no dead-lettered result for this SOP Instance UID")
    service.store.audit("forward_retry", actor=p.username, target=sop_instance_uid, ip=client_ip(request))
    return {"sop_instance_uid": sop_instance_uid, "forward_status": "pending"}
