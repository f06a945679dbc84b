"""The worklist page: one row per patient study (flagged first), its images inside, filters, review status;
sign-in; audit.

A study's row shows the result of the image that decides it (the rule of
``screen``'s studies.csv: ``bonescreen.screen.decide.rollup_study``) with that
image's Grad-CAM thumbnail; the images of the study (screened or skipped, with
the reason) are listed inside the row. The review status is per study: setting
it sets every image of the study.

Server-rendered (Jinja2, autoescaped) so it works without a front-end build;
a few lines of inline JavaScript set the review status through the API,
sending the session's CSRF token. Signing in takes a user name and password
(``bonescreen users add``; or single sign-on, ``service.oidc``) and sets the
signed session cookie (``service.auth``): HttpOnly, SameSite=Lax, Secure
when the request came over HTTPS.
"""

from __future__ import annotations

import datetime as dt
from functools import lru_cache
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from bonescreen import __version__
from bonescreen.schema import OOD_FLAG_REASONS
from bonescreen.service.auth import LOGIN_CSRF_COOKIE, SESSION_COOKIE, Principal, role_at_least
from bonescreen.service.runtime import Service
from bonescreen.service.store import AUDIT_ACTIONS, CATEGORY_LABELS, REVIEW_STATUSES
from bonescreen.service.web import PAGE_HEADERS, client_ip, is_https, principal_at_least, set_session

__all__ = ["add_worklist_routes", "render", "set_session"]

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


def add_worklist_routes(app: FastAPI, service: Service) -> None:
    def page_principal(request: Request, role: str = "viewer") -> Principal | None:
        return principal_at_least(service, request, role)

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/worklist", status_code=303)

    @app.get("/login", include_in_schema=False, response_class=HTMLResponse)
    def login_page(request: Request, error: str | None = None) -> HTMLResponse:
        cookie, form_value = service.auth.login_csrf_pair()
        msg = {"1": "Wrong user name or password.", "throttled": "Too many failed sign-ins; try again later.",
               "sso": "Single sign-on failed or the account is not allowed.",
               "csrf": "The form expired; please sign in again."}.get(error or "")
        resp = HTMLResponse(render("login.html", error=msg, csrf=form_value, version=__version__,
                                   sso=bool(service.config.oidc_issuer)), headers=PAGE_HEADERS)
        resp.set_cookie(LOGIN_CSRF_COOKIE, cookie, httponly=True, samesite="strict", secure=is_https(request),
                        max_age=3600, path="/login")
        return resp

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        form = await request.form(max_files=0, max_fields=8, max_part_size=4096)
        username = str(form.get("username") or "").strip()[:64]
        password = str(form.get("password") or "")[:1024]
        ip = client_ip(request)
        if not service.auth.login_csrf_ok(request.cookies.get(LOGIN_CSRF_COOKIE), str(form.get("csrf") or "")):
            return RedirectResponse("/login?error=csrf", status_code=303)
        if await run_in_threadpool(service.auth.throttled, username or None, ip):
            await run_in_threadpool(lambda: service.store.audit("login_failed", actor=username or None, ip=ip,
                                                                detail={"why": "throttled"}))
            return RedirectResponse("/login?error=throttled", status_code=303)
        user = await run_in_threadpool(service.auth.login_password, username, password, ip)
        if user is None:
            return RedirectResponse("/login?error=1", status_code=303)
        resp = RedirectResponse("/worklist", status_code=303)
        set_session(service, request, resp, user)
        resp.delete_cookie(LOGIN_CSRF_COOKIE, path="/login")
        return resp

    @app.api_route("/logout", methods=["GET", "POST"], include_in_schema=False)
    def logout(request: Request) -> RedirectResponse:
        p = service.auth.principal(request.headers, request.cookies)
        if p is not None and p.via == "session":
            service.store.audit("logout", actor=p.username, ip=client_ip(request))
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(SESSION_COOKIE, path="/")
        return resp

    @app.get("/worklist", tags=["worklist"], response_class=HTMLResponse)
    async def worklist(request: Request, date_from: str | None = None, date_to: str | None = None,
                       category: str | None = None, review_status: str | None = None,
                       show: str = "screened") -> Response:
        """The clinician's page (HTML). ``show``: screened (default), flagged, all (with skipped), dead_letter."""
        p = await run_in_threadpool(page_principal, request)
        if p is None:
            return RedirectResponse("/login", status_code=303)
        d0, d1 = _date(date_from), _date(date_to)
        cat = category if category in CATEGORY_LABELS else None
        rev = review_status if review_status in REVIEW_STATUSES else None
        show = show if show in ("screened", "flagged", "all", "dead_letter") else "screened"
        studies = await run_in_threadpool(
            lambda: service.store.query_studies(
                category=cat, review_status=rev, date_from=d0, date_to=d1,
                flagged=True if show == "flagged" else None,
                eligible=None if show in ("all", "dead_letter") else True,
                forward_status="dead_letter" if show == "dead_letter" else None, limit=500,
            )
        )
        counts = await run_in_threadpool(service.store.counts)
        pending = sum(v for k, v in counts["jobs"].items() if k in ("pending", "processing"))
        html = render(
            "worklist.html",
            studies=studies,
            filters={"date_from": d0.isoformat() if d0 else "", "date_to": d1.isoformat() if d1 else "",
                     "category": cat or "", "review_status": rev or "", "show": show},
            categories=CATEGORY_LABELS, reviews=REVIEW_LABELS, pending=pending, ood_flag_reasons=OOD_FLAG_REASONS,
            dead_letters=counts["forward"].get("dead_letter", 0),
            show_names=service.config.store_patient_name, disclaimer=DISCLAIMER, version=__version__,
            user=p, csrf=p.csrf or "", can_review=role_at_least(p.role, "reviewer"),
            is_admin=role_at_least(p.role, "admin"), forwarding=service.config.forwarding,
        )
        return HTMLResponse(html, headers=PAGE_HEADERS)

    @app.get("/admin/audit", tags=["admin"], response_class=HTMLResponse)
    async def audit_page(request: Request, action: str | None = None, actor: str | None = None) -> Response:
        """The audit trail (HTML, admins): newest first, with a CSV export."""
        p = await run_in_threadpool(page_principal, request)
        if p is None:
            return RedirectResponse("/login", status_code=303)
        if not role_at_least(p.role, "admin"):
            return HTMLResponse("This page needs the admin role.", status_code=403, headers=PAGE_HEADERS)
        act = action if action in AUDIT_ACTIONS else None
        who = (actor or "")[:64] or None
        events = await run_in_threadpool(lambda: service.store.audit_events(action=act, actor=who, limit=500))
        html = render("audit.html", events=[e.as_dict() for e in events], actions=AUDIT_ACTIONS,
                      filters={"action": act or "", "actor": who or ""}, user=p, version=__version__)
        return HTMLResponse(html, headers=PAGE_HEADERS)
