"""The ``/monitor`` page and ``/api/v1/monitor``: later DXA results joined to this store's results.

A thin view over :func:`bonescreen.monitor.monitor_store`: the DXA export files named by
``monitor_dxa`` are read at each request (a hospital drops a fresh export), joined to the
``results`` table with the service's own pseudonym key, and rendered by
:func:`bonescreen.monitor.render_monitor_html`. Aggregates only (no patient row leaves it);
the reviewer role, like the results export.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from bonescreen.errors import BonescreenError
from bonescreen.service.auth import request_principal, require, role_at_least
from bonescreen.service.routes.common import PAGE_HEADERS, Svc
from bonescreen.service.runtime import Service

if TYPE_CHECKING:  # pragma: no cover
    from bonescreen.monitor import MonitorResult

__all__ = ["ROLE", "router"]

ROLE = "reviewer"
NOT_CONFIGURED = "monitoring is not configured: set monitor_dxa (the DXA export file(s)) in the service settings"
# the page embeds its figures as data: URIs (self-contained, as the report)
HEADERS = {**PAGE_HEADERS, "Content-Security-Policy": PAGE_HEADERS["Content-Security-Policy"].replace(
    "img-src 'self'", "img-src 'self' data:")}

router = APIRouter(tags=["monitor"])


def _monitor(service: Service) -> MonitorResult:
    # imported here: pandas and the DXA reader load only when a page asks (the service starts faster)
    from bonescreen.cohort import load_column_map
    from bonescreen.monitor import load_monitor_config, monitor_store

    cfg = service.config
    return monitor_store(
        service.store.engine, list(cfg.monitor_dxa), config=load_monitor_config(cfg.monitor_config),
        key_file=cfg.pseudonym_key_path if cfg.pseudonym_key_path.is_file() else None,
        column_map=load_column_map(cfg.monitor_columns) if cfg.monitor_columns else None,
        date_format=cfg.monitor_date_format,
    )


@router.get("/monitor", response_class=HTMLResponse)
async def monitor_page(request: Request, service: Svc) -> Response:
    """Monitoring after deployment (HTML, reviewers): AUC, flag sensitivity/specificity, calibration, drift."""
    p = request_principal(request)
    if p is None:
        return RedirectResponse("/login", status_code=303)
    if not role_at_least(p.role, ROLE):
        return HTMLResponse(f"This page needs the {ROLE} role.", status_code=403, headers=HEADERS)
    if not service.config.monitor_dxa:
        return HTMLResponse(NOT_CONFIGURED, status_code=404, headers=HEADERS)
    try:
        res = await run_in_threadpool(_monitor, service)
    except BonescreenError as exc:
        return HTMLResponse(f"Monitoring failed: {exc}", status_code=422, headers=HEADERS)
    from bonescreen.monitor import render_monitor_html

    html = render_monitor_html(res, title="bonescreen monitoring (this service's results)")
    return HTMLResponse(html, headers=HEADERS)


@router.get("/api/v1/monitor")
async def monitor_json(service: Svc, _p: Any = Depends(require(ROLE))) -> dict[str, Any]:
    """The monitoring numbers (JSON, reviewers): the page's content, for dashboards and scripts."""
    if not service.config.monitor_dxa:
        raise HTTPException(404, NOT_CONFIGURED)
    try:
        res = await run_in_threadpool(_monitor, service)
    except BonescreenError as exc:
        raise HTTPException(422, f"monitoring failed: {exc}") from None
    return dict(res.to_dict())
