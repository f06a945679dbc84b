"""Liveness (no credentials), Prometheus metrics, the OpenAPI document and "who am I"."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse

from bonescreen.service.auth import VIEWER, Viewer
from bonescreen.service.metrics import CONTENT_TYPE_LATEST, render_metrics
from bonescreen.service.routes.common import Svc

__all__ = ["router"]

router = APIRouter()


@router.get("/health", tags=["service"])
def health(service: Svc) -> JSONResponse:
    """Liveness without credentials: database reachable, worker and receiver running."""
    h = service.health()
    return JSONResponse(h, status_code=200 if h["status"] == "ok" else 503)


@router.get("/openapi.json", dependencies=[VIEWER], include_in_schema=False)
def openapi(request: Request) -> JSONResponse:
    app = request.app
    if app.openapi_schema is None:
        app.openapi_schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                         routes=app.routes)
    return JSONResponse(app.openapi_schema)


@router.get("/metrics", dependencies=[VIEWER], tags=["service"],
            responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
def metrics(service: Svc) -> Response:
    """Prometheus text format: queue, results, forwarding (dead letters), worker, receiver, uploads."""
    return Response(render_metrics(service), media_type=CONTENT_TYPE_LATEST)


@router.get("/api/v1/me", tags=["service"])
def me(p: Viewer) -> dict[str, Any]:
    """Who this request is and with which role."""
    return {"username": p.username, "role": p.role, "via": p.via}
