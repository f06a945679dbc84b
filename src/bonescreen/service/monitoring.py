"""The ``/monitor`` page and ``/api/v1/monitor``: later DXA results joined to this store's results.

A thin view over :func:`bonescreen.monitor.monitor_store`: the DXA export files named by
``monitor_dxa`` are read at each request (a hospital drops a fresh export), joined to the
``results`` table with the service's own pseudonym key, and rendered by
:func:`bonescreen.monitor.render_monitor_html`. Aggregates only (no patient row leaves it);
the reviewer role, like the results export.
"""

from __future__ import annotations

from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from bonescreen.service.auth import role_at_least
from bonescreen.service.runtime import Service

__all__ = ["add_monitor_routes"]

ROLE = "reviewer"
NOT_CONFIGURED = "monitoring is not configured: set monitor_dxa (the DXA export file(s)) in the service settings"


def _monitor(service: Service) -> Any:
    from bonescreen.cohort import load_column_map
    from bonescreen.monitor import load_monitor_config, monitor_store

    cfg = service.config
    return monitor_store(
        service.store.engine, list(cfg.monitor_dxa), config=load_monitor_config(cfg.monitor_config),
        key_file=cfg.pseudonym_key_path if cfg.pseudonym_key_path.is_file() else None,
        column_map=load_column_map(cfg.monitor_columns) if cfg.monitor_columns else None,
        date_format=cfg.monitor_date_format,
    )


def add_monitor_routes(app: FastAPI, service: Service) -> None:
    from bonescreen.errors import BonescreenError
    from bonescreen.service.web import PAGE_HEADERS, require

    # the page embeds its figures as data: URIs (self-contained, as the report)
    headers = {**PAGE_HEADERS, "Content-Security-Policy": PAGE_HEADERS["Content-Security-Policy"].replace(
        "img-src 'self'", "img-src 'self' data:")}
    reviewer = require(service, ROLE)

    @app.get("/monitor", tags=["monitor"], response_class=HTMLResponse)
    async def monitor_page(request: Request) -> Response:
        """Monitoring after deployment (HTML, reviewers): AUC, flag sensitivity/specificity, calibration, drift."""
        from bonescreen.monitor import render_monitor_html

        p = service.auth.principal(request.headers, request.cookies)
        if p is None:
            return RedirectResponse("/login", status_code=303)
        if not role_at_least(p.role, ROLE):
            return HTMLResponse(f"This page needs the {ROLE} role.", status_code=403, headers=headers)
        if not service.config.monitor_dxa:
            return HTMLResponse(NOT_CONFIGURED, status_code=404, headers=headers)
        try:
            res = await run_in_threadpool(_monitor, service)
        except BonescreenError as exc:
            return HTMLResponse(f"Monitoring failed: {exc}", status_code=422, headers=headers)
        html = render_monitor_html(res, title="bonescreen monitoring (this service's results)")
        return HTMLResponse(html, headers=headers)

    @app.get("/api/v1/monitor", tags=["monitor"])
    async def monitor_json(_p: Any = Depends(reviewer)) -> dict[str, Any]:
        """The monitoring numbers (JSON, reviewers): the page's content, for dashboards and scripts."""
        if not service.config.monitor_dxa:
            raise HTTPException(404, NOT_CONFIGURED)
        try:
            res = await run_in_threadpool(_monitor, service)
        except BonescreenError as exc:
            raise HTTPException(422, f"monitoring failed: {exc}") from None
        return res.to_dict()
