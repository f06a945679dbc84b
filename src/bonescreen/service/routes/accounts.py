"""Signing in and out: the password form (CSRF double-submit, throttled, audited) and sign-out."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from bonescreen import __version__
from bonescreen.service.auth import (LOGIN_CSRF_COOKIE, clear_session, client_ip, request_principal, set_login_csrf,
                                     set_session)
from bonescreen.service.routes.common import PAGE_HEADERS, Svc, render

__all__ = ["LOGIN_ERRORS", "router"]

#: ``/login?error=...``: what the sign-in page says
LOGIN_ERRORS = {"1": "Wrong user name or password.", "throttled": "Too many failed sign-ins; try again later.",
                "sso": "Single sign-on failed or the account is not allowed.",
                "csrf": "The form expired; please sign in again."}

router = APIRouter(include_in_schema=False)


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/worklist", status_code=303)


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, service: Svc, error: str | None = None) -> HTMLResponse:
    cookie, form_value = service.auth.login_csrf_pair()
    resp = HTMLResponse(render("login.html", error=LOGIN_ERRORS.get(error or ""), csrf=form_value,
                               version=__version__, sso=bool(service.config.oidc_issuer)), headers=PAGE_HEADERS)
    set_login_csrf(request, resp, cookie)
    return resp


@router.post("/login")
async def login(request: Request, service: Svc) -> Response:
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
    set_session(request, resp, user)
    resp.delete_cookie(LOGIN_CSRF_COOKIE, path="/login")
    return resp


@router.api_route("/logout", methods=["GET", "POST"])
def logout(request: Request, service: Svc) -> RedirectResponse:
    p = request_principal(request)
    if p is not None and p.via == "session":
        service.store.audit("logout", actor=p.username, ip=client_ip(request))
    resp = RedirectResponse("/login", status_code=303)
    clear_session(resp)
    return resp
