"""Accounts, roles, API tokens, session cookies, CSRF and sign-in throttling: the one auth module.

Every route module (``service.routes``) asks this module who a request is:
:func:`request_principal` is the one place credentials are read (API token,
static service token or session cookie), :func:`require` the one role and
CSRF check of the API, :func:`set_session` / :func:`clear_session` the session
cookie. The routes find the :class:`Authenticator` on ``app.state.service``
(``create_app`` puts it there), so this module imports no route module and
not the runtime.

* **Passwords**: argon2id (argon2-cffi's ``PasswordHasher`` defaults), rehashed on
  sign-in when the parameters change.
* **API tokens**: per user, ``bst_`` + 32 random bytes; only their SHA-256 is stored.
  A token has 256 bits of entropy, so a fast hash is enough (and a slow one would
  cost an argon2 run per request); it is shown once, at creation.
* **Sessions** (the worklist): a cookie signed with itsdangerous
  (``URLSafeTimedSerializer``, key in ``session_key_file``) holding the user id and a
  CSRF token, never a password or API token; it expires after ``session_hours``,
  and a disabled account loses its sessions at once (checked on every request).
* **CSRF**: a request authenticated by the cookie that changes something must carry
  the session's CSRF token (``X-CSRF-Token`` header or ``csrf`` form field); the
  sign-in form uses a signed double-submit cookie. Bearer-token requests need none.
* **Throttling**: failed sign-ins are audit rows; more than ``login_max_failures`` for
  one account or from one address within ``login_window_minutes`` refuses sign-in
  for that window, across every process sharing the database.
* **Roles**: viewer (read results and the worklist) < reviewer (+ set review
  status, upload, export) < admin (+ audit trail, accounts, dead-letter retry).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, cast

from fastapi import Depends, HTTPException, Request, Response

from bonescreen.errors import BonescreenError
from bonescreen.service.config import ROLES, ServiceConfig, read_secret_file
from bonescreen.service.store import Store, User

__all__ = [
    "ADMIN",
    "LOGIN_CSRF_COOKIE",
    "REVIEWER",
    "SESSION_COOKIE",
    "VIEWER",
    "Admin",
    "AuthError",
    "Authenticator",
    "Principal",
    "Reviewer",
    "Viewer",
    "authenticator",
    "clear_session",
    "client_ip",
    "hash_password",
    "is_https",
    "new_token",
    "principal_at_least",
    "request_principal",
    "require",
    "role_at_least",
    "set_login_csrf",
    "set_session",
    "token_digest",
    "verify_password",
]

log = logging.getLogger(__name__)

SESSION_COOKIE = "bonescreen_session"
LOGIN_CSRF_COOKIE = "bonescreen_login_csrf"
TOKEN_PREFIX = "bst_"
MIN_PASSWORD = 10


class AuthError(BonescreenError):
    reason = "auth"


@dataclass(frozen=True)
class Principal:
    """Who a request is: an account (by session or API token) or the static service token."""

    username: str
    role: str
    via: str  # "session" | "token" | "service-token"
    user_id: int | None = None
    csrf: str | None = None  # sessions only


def role_at_least(role: str, needed: str) -> bool:
    return role in ROLES and ROLES.index(role) >= ROLES.index(needed)


def _hasher() -> Any:
    from argon2 import PasswordHasher

    return PasswordHasher()


def hash_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise AuthError(f"a password needs at least {MIN_PASSWORD} characters")
    return str(_hasher().hash(password))


def verify_password(stored: str | None, password: str) -> bool:
    from argon2.exceptions import InvalidHashError, VerificationError

    if not stored:
        _hasher().hash("timing-equaliser")  # as slow as a real check: no account enumeration by timing
        return False
    try:
        return bool(_hasher().verify(stored, password))
    except (VerificationError, InvalidHashError):
        return False


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class Authenticator:
    """Turns a request's credentials into a :class:`Principal`; signs and reads session cookies."""

    def __init__(self, config: ServiceConfig, store: Store, static_token: str | None = None) -> None:
        from itsdangerous import URLSafeTimedSerializer

        from bonescreen.pseudonym import load_or_create_key

        self.config = config
        self.store = store
        if static_token is None and config.token_file:
            static_token = read_secret_file(config.token_file, "token_file")
        self.static_token = static_token
        # the same generator as the pseudonym key: 32 random bytes, mode 0600, created atomically
        key = load_or_create_key(config.session_key_path)
        self._sessions = URLSafeTimedSerializer(key, salt="bonescreen-session")
        self._login = URLSafeTimedSerializer(key, salt="bonescreen-login-csrf")
        self.max_age = int(config.session_hours * 3600)

    # ----------------------------------------------------------- requests

    def principal(self, headers: Any, cookies: Any) -> Principal | None:
        auth = headers.get("authorization", "")
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else headers.get("x-api-token")
        if given:
            return self.from_token(given)
        cookie = cookies.get(SESSION_COOKIE)
        return self.from_session(cookie) if cookie else None

    def from_token(self, token: str) -> Principal | None:
        if self.static_token and secrets.compare_digest(token.encode(), self.static_token.encode()):
            return Principal("token:service", self.config.token_role, "service-token")
        if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
            return None
        user = self.store.user_for_token(token_digest(token))
        if user is None:
            return None
        return Principal(user.username, user.role, "token", user.id)

    def from_session(self, cookie: str) -> Principal | None:
        from itsdangerous import BadSignature

        try:
            data = self._sessions.loads(cookie, max_age=self.max_age)
        except BadSignature:  # includes SignatureExpired
            return None
        if not isinstance(data, dict) or not isinstance(data.get("u"), int):
            return None
        user = self.store.get_user(user_id=data["u"])
        if user is None or user.disabled or user.role not in ROLES:
            return None
        return Principal(user.username, user.role, "session", user.id, str(data.get("c", "")))

    def session_cookie(self, user: User) -> str:
        return str(self._sessions.dumps({"u": user.id, "c": secrets.token_urlsafe(24)}))

    # ------------------------------------------------------- sign-in form

    def login_csrf_pair(self) -> tuple[str, str]:
        """(cookie value, form value) for the sign-in form's double-submit CSRF check."""
        raw = secrets.token_urlsafe(24)
        return str(self._login.dumps(raw)), raw

    def login_csrf_ok(self, cookie: str | None, form_value: str | None) -> bool:
        from itsdangerous import BadSignature

        if not cookie or not form_value:
            return False
        try:
            raw = self._login.loads(cookie, max_age=3600)
        except BadSignature:
            return False
        return isinstance(raw, str) and secrets.compare_digest(raw.encode(), form_value.encode())

    def throttled(self, username: str | None, ip: str | None) -> bool:
        since = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None) - dt.timedelta(
            minutes=self.config.login_window_minutes)
        by_user, by_ip = self.store.failed_logins(username=username, ip=ip, since=since)
        limit = self.config.login_max_failures
        # an address gets more room than one account (several users behind one proxy)
        return by_user >= limit or by_ip >= 4 * limit

    def login_password(self, username: str, password: str, ip: str | None) -> User | None:
        """The account if the password is right (audited either way); None otherwise."""
        user = self.store.get_user(username=username) if username else None
        ok = verify_password(user.password_hash if user else None, password)
        if not ok or user is None or user.disabled:
            self.store.audit("login_failed", actor=username[:64] or None, ip=ip,
                             detail={"why": "disabled" if ok and user is not None else "bad credentials"})
            return None
        self._maybe_rehash(user, password)
        self.store.audit("login", actor=user.username, ip=ip, detail={"via": "password"})
        return user

    def _maybe_rehash(self, user: User, password: str) -> None:
        try:
            if user.password_hash and _hasher().check_needs_rehash(user.password_hash):
                self.store.update_user(user.username, password_hash=hash_password(password))
        except Exception:  # a rehash is an optimisation; never fail a sign-in over it
            log.debug("password rehash skipped", exc_info=True)


# ------------------------------------------------------------------ HTTP side

#: methods that change something: a cookie-authenticated one must carry the session's CSRF token
UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def client_ip(request: Request) -> str | None:
    """The peer address (uvicorn applies X-Forwarded-For only from ``forwarded_allow_ips``)."""
    return request.client.host if request.client else None


def is_https(request: Request) -> bool:
    return request.url.scheme == "https"


def authenticator(request: Request) -> Authenticator:
    """The app's authenticator (``create_app`` puts the service on ``app.state``)."""
    return cast(Authenticator, request.app.state.service.auth)


def request_principal(request: Request) -> Principal | None:
    """Who the request is (API token, static token or session cookie), whatever its role; None if nobody."""
    return authenticator(request).principal(request.headers, request.cookies)


def principal_at_least(request: Request, role: str) -> Principal | None:
    """The request's principal if it has at least ``role`` (the HTML pages, which redirect instead of 401)."""
    p = request_principal(request)
    return p if p is not None and role_at_least(p.role, role) else None


def csrf_ok(principal: Principal, request: Request) -> bool:
    """A cookie-authenticated write carries the session's CSRF token; other requests need none."""
    if principal.via != "session" or request.method not in UNSAFE:
        return True
    given = request.headers.get("x-csrf-token", "")
    return bool(principal.csrf) and secrets.compare_digest(given.encode(), (principal.csrf or "").encode())


def require(role: str) -> Callable[[Request], Principal]:
    """A dependency: the request's principal, at least ``role``; CSRF-checked for cookie writes."""

    def dep(request: Request) -> Principal:
        p = request_principal(request)
        if p is None:
            raise HTTPException(401, "missing or wrong credentials", headers={"WWW-Authenticate": "Bearer"})
        if not role_at_least(p.role, role):
            raise HTTPException(403, f"this needs the {role} role")
        if not csrf_ok(p, request):
            raise HTTPException(403, "missing or wrong CSRF token")
        request.state.principal = p
        return p

    return dep


#: the role dependencies (``dependencies=[VIEWER]``) and the principal parameters (``p: Reviewer``)
VIEWER = Depends(require("viewer"))
REVIEWER = Depends(require("reviewer"))
ADMIN = Depends(require("admin"))
Viewer = Annotated[Principal, VIEWER]
Reviewer = Annotated[Principal, REVIEWER]
Admin = Annotated[Principal, ADMIN]


def set_session(request: Request, response: Response, user: User) -> None:
    """Sign the session cookie for ``user`` onto ``response`` (password and single sign-on alike)."""
    auth = authenticator(request)
    response.set_cookie(SESSION_COOKIE, auth.session_cookie(user), httponly=True, samesite="lax",
                        secure=is_https(request), max_age=auth.max_age, path="/")


def clear_session(response: Response) -> None:
    response.delete_cookie(SESSION_COOKIE, path="/")


def set_login_csrf(request: Request, response: Response, cookie: str) -> None:
    """The sign-in form's signed double-submit cookie (strict, an hour, the sign-in path only)."""
    response.set_cookie(LOGIN_CSRF_COOKIE, cookie, httponly=True, samesite="strict", secure=is_https(request),
                        max_age=3600, path="/login")
