"""The HTTP API (FastAPI): upload, results, SR and overlay, review status, audit, health, metrics, OpenAPI.

Every endpoint except ``/health`` and the sign-in pages needs a principal
(``service.auth``): an account's API token (``Authorization: Bearer bst_...``
or ``X-API-Token``), the static service token (``token_file``), or the
worklist's signed session cookie, and a role (viewer < reviewer < admin) at
least the endpoint's. A cookie-authenticated request that changes something
must carry the session's CSRF token. Reviews, exports and sign-ins are
audited. The access log carries route templates only
(``/api/v1/results/{sop_instance_uid}``), never query strings, so patient
ids used as filters never reach a log.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import logging
import time
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request, Response
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from bonescreen import __version__
from bonescreen.service.auth import Principal
from bonescreen.service.intake import IntakeError
from bonescreen.service.runtime import Service
from bonescreen.service.store import AUDIT_ACTIONS, CATEGORY_LABELS, FORWARD_STATUSES, REVIEW_STATUSES, StoreError
from bonescreen.service.web import client_ip, require
from bonescreen.service.worker import service_pseudonymiser

__all__ = ["PUBLIC_ROUTES", "create_app", "client_ip", "require"]

log = logging.getLogger("bonescreen.service.http")

UID_PATTERN = r"^[0-9]+(\.[0-9]+)*$"
CATEGORIES = tuple(CATEGORY_LABELS)
#: (method, path) that answer without a principal; every other route is checked by the tests.
PUBLIC_ROUTES = frozenset({("GET", "/health"), ("GET", "/"), ("GET", "/login"), ("POST", "/login"),
                           ("GET", "/logout"), ("POST", "/logout"), ("GET", "/login/oidc"),
                           ("GET", "/login/oidc/callback")})

SopUID = Annotated[str, Path(max_length=64, pattern=UID_PATTERN, description="SOP Instance UID")]
Uid = Annotated[str | None, Query(max_length=64, pattern=UID_PATTERN)]
Text64 = Annotated[str | None, Query(max_length=64)]
Text32 = Annotated[str | None, Query(max_length=32)]


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


class UploadOut(BaseModel):
    job_id: int
    sop_instance_uid: str
    duplicate: bool
    status: str


def _csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    return buf.getvalue()


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
        openapi_url=None,  # served below, behind a principal
    )
    app.state.service = service
    viewer = Depends(require(service, "viewer"))
    reviewer = Depends(require(service, "reviewer"))
    admin = Depends(require(service, "admin"))

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
        """Liveness without credentials: database reachable, worker and receiver running."""
        h = service.health()
        return JSONResponse(h, status_code=200 if h["status"] == "ok" else 503)

    @app.get("/openapi.json", dependencies=[viewer], include_in_schema=False)
    def openapi() -> JSONResponse:
        if app.openapi_schema is None:
            app.openapi_schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                             routes=app.routes)
        return JSONResponse(app.openapi_schema)

    @app.get("/metrics", dependencies=[viewer], tags=["service"],
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
    def metrics() -> Response:
        """Prometheus text format: queue, results, forwarding (dead letters), worker, receiver, uploads."""
        from bonescreen.service.metrics import CONTENT_TYPE_LATEST, render_metrics

        return Response(render_metrics(service), media_type=CONTENT_TYPE_LATEST)

    @app.get("/api/v1/me", tags=["service"])
    def me(p: Principal = viewer) -> dict[str, Any]:
        """Who this request is and with which role."""
        return {"username": p.username, "role": p.role, "via": p.via}

    @app.post("/api/v1/images", dependencies=[reviewer], tags=["images"], status_code=202,
              response_model=UploadOut,
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

    @app.get("/api/v1/images/{sop_instance_uid}", dependencies=[viewer], tags=["images"])
    def image_status(sop_instance_uid: SopUID) -> dict[str, Any]:
        """Where one received image is: pending, processing, done or failed (and its result when done)."""
        status = service.store.job_status(sop_instance_uid)
        if status is None:
            raise HTTPException(404, "no such image")
        r = service.store.get_result(sop_instance_uid)
        return {"sop_instance_uid": sop_instance_uid, "status": status, "result": r.as_dict() if r else None}

    def _query(f: ResultFilters, limit: int, offset: int) -> list[Any]:
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

    @app.get("/api/v1/results", dependencies=[viewer], tags=["results"])
    def results(
        f: ResultFilters = Depends(),
        limit: Annotated[int, Query(ge=1, le=1000)] = 200,
        offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
    ) -> dict[str, Any]:
        """Results by study, patient, category, flag, review or forwarding status, study date; flagged first."""
        rows = _query(f, limit, offset)
        return {"count": len(rows), "results": [r.as_dict() for r in rows]}

    @app.get("/api/v1/results.csv", tags=["results"], response_class=Response,
             responses={200: {"content": {"text/csv": {}}, "description": "the results as CSV"}})
    def results_csv(request: Request, p: Principal = reviewer, f: ResultFilters = Depends()) -> Response:
        """The filtered results as CSV (audited as an export)."""
        rows = _query(f, 100_000, 0)
        service.store.audit("export", actor=p.username, target="results.csv", ip=client_ip(request),
                            detail={"rows": len(rows)})
        data = [r.as_dict() for r in rows]
        cols = list(data[0]) if data else ["sop_instance_uid"]
        return Response(_csv(data, cols), media_type="text/csv",
                        headers={"Content-Disposition": 'attachment; filename="bonescreen-results.csv"',
                                 "Cache-Control": "no-store"})

    def _result(sop: str) -> Any:
        r = service.store.get_result(sop)
        if r is None:
            raise HTTPException(404, "no result for this SOP Instance UID")
        return r

    @app.get("/api/v1/results/{sop_instance_uid}", dependencies=[viewer], tags=["results"])
    def result(sop_instance_uid: SopUID) -> dict[str, Any]:
        return dict(_result(sop_instance_uid).as_dict())

    @app.get("/api/v1/results/{sop_instance_uid}/sr", tags=["results"], response_class=FileResponse,
             responses={200: {"content": {"application/dicom": {}}, "description": "the SR"}})
    def result_sr(sop_instance_uid: SopUID, request: Request, p: Principal = viewer) -> FileResponse:
        """The DICOM Structured Report (TID 1500) of this image's result (audited as an export)."""
        path = service.resolve(_result(sop_instance_uid).sr_path)
        if path is None:
            raise HTTPException(404, "no SR for this image (not screened, or not eligible)")
        service.store.audit("export", actor=p.username, target=sop_instance_uid, ip=client_ip(request),
                            detail={"what": "sr"})
        return FileResponse(path, media_type="application/dicom", filename="result.SR.dcm")

    @app.get("/api/v1/results/{sop_instance_uid}/overlay", dependencies=[viewer], tags=["results"],
             response_class=FileResponse,
             responses={200: {"content": {"image/png": {}}, "description": "the overlay"}})
    def result_overlay(sop_instance_uid: SopUID) -> FileResponse:
        """The Grad-CAM overlay (PNG) on the preprocessed image."""
        path = service.resolve(_result(sop_instance_uid).overlay_path)
        if path is None:
            raise HTTPException(404, "no overlay for this image")
        return FileResponse(path, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    @app.put("/api/v1/results/{sop_instance_uid}/review", tags=["results"])
    def set_review(sop_instance_uid: SopUID, body: ReviewIn, request: Request,
                   p: Principal = reviewer) -> dict[str, Any]:
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

    @app.post("/api/v1/results/{sop_instance_uid}/forward", tags=["results"])
    def retry_forward(sop_instance_uid: SopUID, request: Request, p: Principal = admin) -> dict[str, Any]:
        """Put a dead-lettered result back into the forwarding queue."""
        if not service.store.forward_retry(sop_instance_uid):
            raise HTTPException(409, "no dead-lettered result for this SOP Instance UID")
        service.store.audit("forward_retry", actor=p.username, target=sop_instance_uid, ip=client_ip(request))
        return {"sop_instance_uid": sop_instance_uid, "forward_status": "pending"}

    @app.get("/api/v1/audit", dependencies=[admin], tags=["admin"])
    def audit(action: Text32 = None, actor: Text64 = None, limit: Annotated[int, Query(ge=1, le=1000)] = 200,
              offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0) -> dict[str, Any]:
        """The audit trail, newest first (admins only)."""
        if action and action not in AUDIT_ACTIONS:
            raise HTTPException(422, f"action must be one of {', '.join(AUDIT_ACTIONS)}")
        rows = service.store.audit_events(action=action, actor=actor, limit=limit, offset=offset)
        return {"count": len(rows), "events": [e.as_dict() for e in rows]}

    @app.get("/api/v1/audit.csv", tags=["admin"], response_class=Response,
             responses={200: {"content": {"text/csv": {}}, "description": "the audit trail as CSV"}})
    def audit_csv(request: Request, p: Principal = admin) -> Response:
        """The whole audit trail as CSV (the export itself is audited first)."""
        service.store.audit("export", actor=p.username, target="audit.csv", ip=client_ip(request))
        rows = [e.as_dict() for e in service.store.audit_events(limit=1_000_000)]
        return Response(_csv(rows, ["id", "at", "actor", "action", "target", "detail", "ip"]), media_type="text/csv",
                        headers={"Content-Disposition": 'attachment; filename="bonescreen-audit.csv"',
                                 "Cache-Control": "no-store"})

    @app.get("/api/v1/users", dependencies=[admin], tags=["admin"])
    def users() -> dict[str, Any]:
        """Accounts (no hashes): name, role, disabled, single sign-on."""
        return {"users": [{"username": u.username, "role": u.role, "disabled": u.disabled,
                           "sso": u.oidc_subject is not None, "password": u.password_hash is not None}
                          for u in service.store.users()]}

    @app.get("/api/v1/instances", dependencies=[admin], tags=["admin"])
    def instances() -> dict[str, Any]:
        """The serve processes sharing this database, their parts and heartbeat age."""
        return {"instances": service.store.instances(), "screened_by": service.store.job_workers()}

    from bonescreen.service.monitoring import add_monitor_routes
    from bonescreen.service.worklist import add_worklist_routes

    add_worklist_routes(app, service)
    add_monitor_routes(app, service)
    if service.config.oidc_issuer:
        from bonescreen.service.oidc import add_oidc_routes

        add_oidc_routes(app, service)
    return app
