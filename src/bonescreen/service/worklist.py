"""The worklist page: flagged patients first, thumbnails with Grad-CAM, filters, review status.

Server-rendered (Jinja2, autoescaped) so it works without a front-end build;
a few lines of inline JavaScript set the review status through the API. The
page and its images are behind the same token as the API, held in an
HttpOnly, SameSite=Strict cookie set by the login form.
"""

from __future__ import annotations

import datetime as dt
import urllib.parse
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from bonescreen import __version__
from bonescreen.service.runtime import Service
from bonescreen.service.store import CATEGORY_LABELS, REVIEW_STATUSES

__all__ = ["add_worklist_routes", "render"]

REVIEW_LABELS = {"new": "New", "acknowledged": "Acknowledged", "dxa_ordered": "DXA ordered"}
DISCLAIMER = "Research software output; not a diagnosis. Confirm with DXA."


@lru_cache(maxsize=1)
def _env() -> Any:
    from jinja2 import Environment, PackageLoader, select_autoescape

    return Environment(loader=PackageLoader("bonescreen.service", "templates"),
                       autoescape=select_autoescape(["html"]))


def render(name: str, **ctx: Any) -> str:
    return str(_env().get_template(name).render(**ctx))


def _date(value: str | None) -> dt.date | None:
    if not value:
        return None
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        return None


def add_worklist_routes(app: FastAPI, service: Service, require_token: Callable[[Request], None]) -> None:
    from bonescreen.service.api import COOKIE, token_ok

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/worklist", status_code=303)

    @app.get("/login", include_in_schema=False, response_class=HTMLResponse)
    def login_page(error: str | None = None) -> HTMLResponse:
        return HTMLResponse(render("login.html", error=bool(error), version=__version__))

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        # urlencoded by hand: one field does not justify a form-parsing dependency
        raw = (await request.body())[:4096].decode("utf-8", "replace")
        token = (urllib.parse.parse_qs(raw).get("token") or [""])[0]
        if not token or not token_ok_value(token, service.token):
            return RedirectResponse("/login?error=1", status_code=303)
        resp = RedirectResponse("/worklist", status_code=303)
        resp.set_cookie(COOKIE, token, httponly=True, samesite="strict", secure=request.url.scheme == "https",
                        max_age=12 * 3600)
        return resp

    @app.get("/logout", include_in_schema=False)
    def logout() -> RedirectResponse:
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(COOKIE)
        return resp

    @app.get("/worklist", tags=["worklist"], response_class=HTMLResponse)
    async def worklist(request: Request, date_from: str | None = None, date_to: str | None = None,
                       category: str | None = None, review_status: str | None = None,
                       show: str = "screened") -> Response:
        """The clinician's page (HTML). ``show``: screened (default), flagged, all (also skipped images)."""
        if not token_ok(request, service.token):
            return RedirectResponse("/login", status_code=303)
        d0, d1 = _date(date_from), _date(date_to)
        cat = category if category in CATEGORY_LABELS else None
        rev = review_status if review_status in REVIEW_STATUSES else None
        show = show if show in ("screened", "flagged", "all") else "screened"
        rows = await run_in_threadpool(
            lambda: service.store.query_results(
                category=cat, review_status=rev, date_from=d0, date_to=d1,
                flagged=True if show == "flagged" else None,
                eligible=None if show == "all" else True, limit=500,
            )
        )
        counts = await run_in_threadpool(service.store.counts)
        pending = sum(v for k, v in counts["jobs"].items() if k in ("pending", "processing"))
        html = render(
            "worklist.html",
            rows=[r.as_dict() for r in rows],
            filters={"date_from": d0.isoformat() if d0 else "", "date_to": d1.isoformat() if d1 else "",
                     "category": cat or "", "review_status": rev or "", "show": show},
            categories=CATEGORY_LABELS, reviews=REVIEW_LABELS, pending=pending,
            show_names=service.config.store_patient_name, disclaimer=DISCLAIMER, version=__version__,
        )
        return HTMLResponse(html, headers={"Cache-Control": "no-store",
                                           "Content-Security-Policy": "default-src 'self'; "
                                           "script-src 'unsafe-inline' 'self'; style-src 'unsafe-inline' 'self'; "
                                           "img-src 'self'"})


def token_ok_value(given: str, token: str) -> bool:
    import secrets

    return secrets.compare_digest(given.encode(), token.encode())
