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

The routes are ``APIRouter`` s, one module per area (``service.routes``);
:func:`create_app` only builds the app and includes them.
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response

from bonescreen import __version__
from bonescreen.service.routes import accounts, admin, health, images, monitor, results, sso, worklist
from bonescreen.service.runtime import Service

__all__ = ["PUBLIC_ROUTES", "create_app"]

log = logging.getLogger("bonescreen.service.http")

#: (method, path) that answer without a principal; every other route is checked by the tests.
PUBLIC_ROUTES = frozenset({("GET", "/health"), ("GET", "/"), ("GET", "/login"), ("POST", "/login"),
                           ("GET", "/logout"), ("POST", "/logout"), ("GET", "/login/oidc"),
                           ("GET", "/login/oidc/callback")})
#: in this order (the OpenAPI document lists them so); single sign-on last, when configured
ROUTERS = (health.router, images.router, results.router, admin.router, accounts.router, worklist.router,
           monitor.router)


async def access_log(request: Request, call_next: Any) -> Response:
    """Method, route template (never the query string), status and time of each request."""
    t0 = time.perf_counter()
    response: Response = await call_next(request)
    route = request.scope.get("route")
    path = getattr(route, "path", None) or "(unmatched)"
    log.info("%s %s %d %.0fms", request.method, path, response.status_code, 1000 * (time.perf_counter() - t0))
    return response


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
        openapi_url=None,  # served by routes.health, behind a principal
    )
    app.state.service = service  # the routes' dependency (routes.common.get_service) and service.auth's
    app.middleware("http")(access_log)
    for router in ROUTERS:
        app.include_router(router)
    if service.config.oidc_issuer:
        sso.install_sso(app, service)
    return app
