"""The HTTP side of authentication, shared by every route module (API, worklist,
monitor, single sign-on): the peer address, the one principal/role check, the
CSRF check for cookie writes, the session cookie and the HTML pages' headers.

One module so that the route modules import it instead of each other
(``service.api`` registers the others; they never import it back).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

from fastapi import HTTPException, Request, Response

from bonescreen.service.auth import SESSION_COOKIE, Principal, role_at_least
from bonescreen.service.runtime import Service

__all__ = [
    "CSP",
    "PAGE_HEADERS",
    "UNSAFE",
    "client_ip",
    "is_https",
    "principal_at_least",
    "require",
    "set_session",
]

UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})
CSP = ("default-src 'self'; script-src 'unsafe-inline' 'self'; style-src 'unsafe-inline' 'self'; "
       "img-src 'self'; frame-ancestors 'none'; form-action 'self'")
PAGE_HEADERS = {"Cache-Control": "no-store", "Content-Security-Policy": CSP, "X-Frame-Options": "DENY",
                "Referrer-Policy": "no-referrer", "X-Content-Type-Options": "nosniff"}


def client_ip(request: Request) -> str | None:
    """The peer address (uvicorn applies X-Forwarded-For only from ``forwarded_allow_ips``)."""
    return request.client.host if request.client else None


def is_https(request: Request) -> bool:
    return request.url.scheme == "https"


def principal_at_least(service: Service, request: Request, role: str) -> Principal | None:
    """The request's principal (API token or session cookie) if it has at least ``role``."""
    p = service.auth.principal(request.headers, request.cookies)
    return p if p is not None and role_at_least(p.role, role) else None


def require(service: Service, role: str) -> Callable[[Request], Principal]:
    """A dependency: the request's principal, at least ``role``; CSRF-checked for cookie writes."""

    def dep(request: Request) -> Principal:
        p = service.auth.principal(request.headers, request.cookies)
        if p is None:
            raise HTTPException(401, "missing or wrong credentials", headers={"WWW-Authenticate": "Bearer"})
        if not role_at_least(p.role, role):
            raise HTTPException(403, f"this needs the {role} role")
        if p.via == "session" and request.method in UNSAFE:
            given = request.headers.get("x-csrf-token", "")
            if not p.csrf or not secrets.compare_digest(given.encode(), p.csrf.encode()):
                raise HTTPException(403, "missing or wrong CSRF token")
        request.state.principal = p
        return p

    return dep


def set_session(service: Service, request: Request, response: Response, user: Any) -> None:
    """Sign the session cookie for ``user`` onto ``response`` (password and single sign-on alike)."""
    response.set_cookie(SESSION_COOKIE, service.auth.session_cookie(user), httponly=True, samesite="lax",
                        secure=is_https(request), max_age=service.auth.max_age, path="/")
