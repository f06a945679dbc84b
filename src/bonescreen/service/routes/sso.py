"""OpenID Connect single sign-on (authlib's Starlette client), for hospitals with an identity provider.

Enabled by ``oidc_issuer`` + ``oidc_client_id`` + ``oidc_client_secret_file``.
``/login/oidc`` sends the browser to the provider (authorization-code flow;
state and nonce kept in a short-lived signed cookie of their own);
``/login/oidc/callback`` exchanges the code at the token endpoint, and authlib
checks the ID token's signature against the provider's JWKS, its issuer,
audience, expiry and nonce. The account is then found:

1. by the ID token's ``sub`` (bound earlier, or given with ``users add --oidc-subject``);
2. else by the ``oidc_username_claim`` (default ``preferred_username``), but only
   for an account created ``--sso-only`` (no password) and not yet bound: it is bound
   now, so a provider-side rename cannot take over another local account;
3. else, with ``oidc_default_role`` set, a new single-sign-on account with that role.

Anything else is refused and audited. The session that follows is the same
signed cookie as a password sign-in.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.middleware.sessions import SessionMiddleware

from bonescreen.pseudonym import load_or_create_key
from bonescreen.service.auth import client_ip, set_session
from bonescreen.service.config import read_secret_file
from bonescreen.service.routes.common import Svc
from bonescreen.service.runtime import Service
from bonescreen.service.store import StoreError, User

__all__ = ["account_for_claims", "install_sso", "router"]

log = logging.getLogger(__name__)

OIDC_COOKIE = "bonescreen_oidc"

router = APIRouter(include_in_schema=False)


def account_for_claims(service: Service, claims: dict[str, Any]) -> tuple[User | None, str]:
    """The enabled account these verified ID-token claims sign in as, or (None, why not)."""
    store, cfg = service.store, service.config
    sub = str(claims.get("sub") or "")
    name = str(claims.get(cfg.oidc_username_claim) or "")[:64]
    if not sub:
        return None, "no subject in the ID token"
    user = store.get_user(oidc_subject=sub)
    if user is None and name:
        local = store.get_user(username=name)
        if local is not None:
            if local.password_hash is None and local.oidc_subject is None:
                user = store.update_user(name, oidc_subject=sub)
            else:
                return None, f"local account {name!r} is not a single-sign-on account"
        elif cfg.oidc_default_role:
            try:
                user = store.add_user(name, cfg.oidc_default_role, None, oidc_subject=sub)
                store.audit("user_add", actor="sso", target=name, detail={"role": cfg.oidc_default_role,
                                                                          "via": "oidc"})
            except StoreError:
                return None, "account could not be created"
    if user is None:
        return None, "no account for this identity"
    if user.disabled:
        return None, "account disabled"
    return user, ""


def install_sso(app: FastAPI, service: Service) -> None:
    """Register the identity provider (``app.state.oidc_client``), its state cookie and the two routes."""
    from authlib.integrations.starlette_client import OAuth

    cfg = service.config
    secret = read_secret_file(cfg.oidc_client_secret_file or "", "oidc_client_secret_file")
    issuer = (cfg.oidc_issuer or "").rstrip("/")
    oauth = OAuth()
    oauth.register("hospital", client_id=cfg.oidc_client_id, client_secret=secret,
                   server_metadata_url=f"{issuer}/.well-known/openid-configuration",
                   client_kwargs={"scope": cfg.oidc_scopes, "code_challenge_method": "S256"})
    app.state.oidc_client = oauth.create_client("hospital")
    key = load_or_create_key(cfg.session_key_path)
    # state + nonce between the redirect and the callback: SameSite=Lax, so the provider's
    # top-level redirect back carries it; 10 minutes to sign in at the provider
    app.add_middleware(SessionMiddleware, secret_key=key.hex() + ":oidc", session_cookie=OIDC_COOKIE,
                       max_age=600, same_site="lax", https_only=False)
    app.include_router(router)


@router.get("/login/oidc")
async def oidc_start(request: Request, service: Svc) -> Response:
    redirect_uri = service.config.oidc_redirect_url or str(request.url_for("oidc_callback"))
    try:
        return await request.app.state.oidc_client.authorize_redirect(  # type: ignore[no-any-return]
            request, redirect_uri)
    except Exception as exc:  # provider unreachable or its discovery document is bad
        log.warning("single sign-on: provider not usable (%s)", type(exc).__name__)
        return RedirectResponse("/login?error=sso", status_code=303)


@router.get("/login/oidc/callback", name="oidc_callback")
async def oidc_callback(request: Request, service: Svc) -> Response:
    from authlib.integrations.starlette_client import OAuthError

    cfg = service.config
    ip = client_ip(request)
    try:
        token = await request.app.state.oidc_client.authorize_access_token(request)
        claims = dict(token.get("userinfo") or {})
    except (OAuthError, Exception) as exc:  # bad state, code, signature, nonce, audience, expiry...
        why = type(exc).__name__
        log.warning("single sign-on refused: %s", why)
        await run_in_threadpool(lambda: service.store.audit("login_failed", actor=None, ip=ip,
                                                            detail={"via": "oidc", "why": why}))
        return RedirectResponse("/login?error=sso", status_code=303)
    user, why = await run_in_threadpool(account_for_claims, service, claims)
    if user is None:
        name = str(claims.get(cfg.oidc_username_claim) or "")[:64] or None
        await run_in_threadpool(lambda: service.store.audit("login_failed", actor=name, ip=ip,
                                                            detail={"via": "oidc", "why": why}))
        return RedirectResponse("/login?error=sso", status_code=303)
    await run_in_threadpool(lambda: service.store.audit("login", actor=user.username, ip=ip,
                                                        detail={"via": "oidc"}))
    resp = RedirectResponse("/worklist", status_code=303)
    set_session(request, resp, user)
    return resp
