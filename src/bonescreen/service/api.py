"""The HTTP API (FastAPI): upload, results, SR and overlay, review status, health, metrics, OpenAPI.

Every endpoint except ``/health`` needs the token: ``Authorization: Bearer
<token>`` (or ``X-API-Token``), or the ``bonescreen_token`` cookie that the
worklist's login form sets. The access log carries route templates only
(``/api/v1/results/{sop_instance_uid}``), never query strings, so patient
ids used as filters never reach a log.
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
import time
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request, Response
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from bonescreen import __version__
from bonescreen.service.intake import IntakeError
from bonescreen.service.runtime import Service
from bonescreen.service.store import CATEGORY_LABELS, REVIEW_STATUSES, StoreError
from bonescreen.service.worker import service_pseudonymiser

__all__ = ["COOKIE", "create_app"]

log = logging.getLogger("bonescreen.service.http")

COOKIE = "bonescreen_token"
UID_PATTERN = r"^[0-9]+(\.[0-9]+)*$"
CATEGORIES = tuple(CATEGORY_LABELS)

SopUID = Annotated[str, Path(max_length=64, pattern=UID_PATTERN, description="SOP Instance UID")]


class ReviewIn(BaseModel):
    status: str


class UploadOut(BaseModel):
    job_id: int
    sop_instance_uid: str
    duplicate: bool
    status: str


def _presented_token(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.headers.get("x-api-token") or request.cookies.get(COOKIE)


def token_ok(request: Request, token: str) -> bool:
    given = _presented_token(request)
    return bool(given) and secrets.compare_digest(given.encode(), token.encode())  # type: ignore[union-attr]


def create_app(service: Service, *, manage: bool = True, stop_on_shutdown: bool | None = None) -> FastAPI:
    """The app; with ``manage`` its lifespan starts and stops the service's parts.

    ``stop_on_shutdown`` (default: ``manage``) stops them at shutdown only, for a service
    started before the server (so that start-up errors surface as CLI errors).
    """
    stop = manage if stop_on_shutdown is None else stop_on_shutdown

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> Any:
        if manage:
            service.start()
        try:
            yield
        finally:
            if stop:
                service.stop()

    app = FastAPI(
        title="bonescreen service",
        version=__version__,
        description="Opportunistic bone-health screening of chest radiographs received from PACS.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,  # served below, behind the token
    )
    app.state.service = service

    def require_token(request: Request) -> None:
        if not token_ok(request, service.token):
            raise HTTPException(401, "missing or wrong token", headers={"WWW-Authenticate": "Bearer"})

    auth = [Depends(require_token)]

    @app.middleware("http")
    async def access_log(request: Request, call_next: Any) -> Response:
        t0 = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", None) or "(unmatched)"
        log.info("%s %s %d %.0fms", request.method, path, response.status_code, 1000 * (time.perf_counter() - t0))
        return response

    @app.get("/health", tags=["service"])
    def health() -> JSONResponse:
        """Liveness without a token: database reachable, worker and receiver running."""
        h = service.health()
        return JSONResponse(h, status_code=200 if h["status"] == "ok" else 503)

    @app.get("/openapi.json", dependencies=auth, include_in_schema=False)
    def openapi() -> JSONResponse:
        if app.openapi_schema is None:
            app.openapi_schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                             routes=app.routes)
        return JSONResponse(app.openapi_schema)

    @app.get("/metrics", dependencies=auth, tags=["service"], response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        """Prometheus text format: queue, results, worker throughput, receiver counts."""
        c = service.store.counts()
        lines = ["# TYPE bonescreen_up gauge", "bonescreen_up 1"]

        def fam(name: str, label: str, values: dict[str, int], kind: str = "gauge") -> None:
            lines.append(f"# TYPE {name} {kind}")
            for k, v in sorted(values.items()):
                lines.append(f'{name}{{{label}="{k}"}} {v}')

        fam("bonescreen_jobs", "status", c["jobs"])
        fam("bonescreen_results", "category", {k if k != "None" else "none": v for k, v in c["results"].items()})
        fam("bonescreen_results_flagged", "flagged", c["flagged"])
        fam("bonescreen_results_skipped", "reason", c["skipped"])
        fam("bonescreen_review", "status", c["review"])
        fam("bonescreen_forward", "status", c["forward"])
        w = service.worker.stats if service.worker is not None else None
        if w is not None:
            lines += ["# TYPE bonescreen_worker_images_total counter", f"bonescreen_worker_images_total {w.images}",
                      "# TYPE bonescreen_worker_seconds_total counter", f"bonescreen_worker_seconds_total {w.seconds:.3f}"]
        if service.scp is not None:
            lines += ["# TYPE bonescreen_dicom_received_total counter",
                      f"bonescreen_dicom_received_total {service.scp.received}",
                      "# TYPE bonescreen_dicom_refused_total counter",
                      f"bonescreen_dicom_refused_total {service.scp.refused}"]
        lines += ["# TYPE bonescreen_http_uploads_total counter", f"bonescreen_http_uploads_total {service.http_uploads}",
                  "# TYPE bonescreen_http_refused_total counter", f"bonescreen_http_refused_total {service.http_refused}"]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    @app.post("/api/v1/images", dependencies=auth, tags=["images"], status_code=202, response_model=UploadOut,
              responses={400: {"description": "not DICOM / corrupt"}, 413: {"description": "too large"},
                         422: {"description": "not a usable image"}})
    async def upload(request: Request) -> UploadOut:
        """Queue one DICOM Part-10 file sent as the raw body (``Content-Type: application/dicom``)."""
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
        try:
            res = await run_in_threadpool(service.intake.accept_file_bytes, bytes(body), "http")
        except IntakeError as exc:
            service.http_refused += 1
            raise HTTPException(exc.http_status, f"{exc.reason}: {exc}") from exc
        service.http_uploads += 1
        service.notify()
        status = await run_in_threadpool(service.store.job_status, res.sop_instance_uid) or "pending"
        return UploadOut(job_id=res.job_id, sop_instance_uid=res.sop_instance_uid, duplicate=not res.created,
                         status=status)

    @app.get("/api/v1/images/{sop_instance_uid}", dependencies=auth, tags=["images"])
    def image_status(sop_instance_uid: SopUID) -> dict[str, Any]:
        """Where one received image is: pending, processing, done or failed (and its result when done)."""
        status = service.store.job_status(sop_instance_uid)
        if status is None:
            raise HTTPException(404, "no such image")
        r = service.store.get_result(sop_instance_uid)
        return {"sop_instance_uid": sop_instance_uid, "status": status, "result": r.as_dict() if r else None}

    @app.get("/api/v1/results", dependencies=auth, tags=["results"])
    def results(
        study_instance_uid: Annotated[str | None, Query(max_length=64, pattern=UID_PATTERN)] = None,
        patient_id: Annotated[str | None, Query(max_length=64)] = None,
        category: Annotated[str | None, Query(max_length=32)] = None,
        flagged: bool | None = None,
        review_status: Annotated[str | None, Query(max_length=16)] = None,
        date_from: dt.date | None = None,
        date_to: dt.date | None = None,
        eligible: bool | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 200,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> dict[str, Any]:
        """Results by study, patient, category, flag, review status or study date; flagged first."""
        if category and category not in CATEGORIES:
            raise HTTPException(422, f"category must be one of {', '.join(CATEGORIES)}")
        if review_status and review_status not in REVIEW_STATUSES:
            raise HTTPException(422, f"review_status must be one of {', '.join(REVIEW_STATUSES)}")
        if patient_id and service.config.hash_patient_id:
            patient_id = service_pseudonymiser(service.config)(patient_id)
        rows = service.store.query_results(
            study_instance_uid=study_instance_uid, patient_id=patient_id, category=category, flagged=flagged,
            review_status=review_status, date_from=date_from, date_to=date_to, eligible=eligible, limit=limit,
            offset=offset,
        )
        return {"count": len(rows), "results": [r.as_dict() for r in rows]}

    def _result(sop: str) -> Any:
        r = service.store.get_result(sop)
        if r is None:
            raise HTTPException(404, "no result for this SOP Instance UID")
        return r

    @app.get("/api/v1/results/{sop_instance_uid}", dependencies=auth, tags=["results"])
    def result(sop_instance_uid: SopUID) -> dict[str, Any]:
        return _result(sop_instance_uid).as_dict()

    @app.get("/api/v1/results/{sop_instance_uid}/sr", dependencies=auth, tags=["results"],
             response_class=FileResponse)
    def result_sr(sop_instance_uid: SopUID) -> FileResponse:
        """The DICOM Structured Report (TID 1500) of this image's result."""
        p = service.resolve(_result(sop_instance_uid).sr_path)
        if p is None:
            raise HTTPException(404, "no SR for this image (not screened, or not eligible)")
        return FileResponse(p, media_type="application/dicom", filename="result.SR.dcm")

    @app.get("/api/v1/results/{sop_instance_uid}/overlay", dependencies=auth, tags=["results"],
             response_class=FileResponse)
    def result_overlay(sop_instance_uid: SopUID) -> FileResponse:
        """The Grad-CAM overlay (PNG) on the preprocessed image."""
        p = service.resolve(_result(sop_instance_uid).overlay_path)
        if p is None:
            raise HTTPException(404, "no overlay for this image")
        return FileResponse(p, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    @app.put("/api/v1/results/{sop_instance_uid}/review", dependencies=auth, tags=["results"])
    def set_review(sop_instance_uid: SopUID, body: ReviewIn) -> dict[str, Any]:
        """Set the clinician's status: new, acknowledged or dxa_ordered."""
        try:
            r = service.store.set_review(sop_instance_uid, body.status)
        except StoreError as exc:
            raise HTTPException(422, str(exc)) from exc
        if r is None:
            raise HTTPException(404, "no result for this SOP Instance UID")
        return r.as_dict()

    from bonescreen.service.worklist import add_worklist_routes

    add_worklist_routes(app, service, require_token)
    return app

