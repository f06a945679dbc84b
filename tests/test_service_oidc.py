"""OpenID Connect single sign-on against an in-process fake provider (discovery, JWKS, token endpoint,
signed ID token; loopback only, no network)."""

from __future__ import annotations

import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("authlib")

from fastapi.testclient import TestClient

from bonescreen.service.api import create_app
from bonescreen.service.auth import hash_password
from bonescreen.service.config import ServiceConfig
from bonescreen.service.runtime import Service
from _service_support import FakeOIDCProvider


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


@pytest.fixture()
def sso(tmp_path: Path) -> Iterator[tuple[TestClient, Service, FakeOIDCProvider]]:
    idp = FakeOIDCProvider("bonescreen", "client-secret-xyz")
    secret = tmp_path / "oidc.secret"
    secret.write_text("client-secret-xyz\n")
    secret.chmod(0o600)
    cfg = ServiceConfig(model="unused.pt", data_dir=str(tmp_path / "data"), dicom_enabled=False,
                        worker_enabled=False, oidc_issuer=idp.issuer, oidc_client_id="bonescreen",
                        oidc_client_secret_file=str(secret)).validate()
    svc = Service(cfg)
    svc.store.add_user("carol", "reviewer", None)  # --sso-only: bound to the provider's subject on first use
    svc.store.add_user("dave", "admin", hash_password("local-password-123"))  # a local account
    try:
        with TestClient(create_app(svc)) as c:
            yield c, svc, idp
    finally:
        idp.close()


def _sso(c: TestClient) -> Any:
    """Browser round trip: our redirect -> the provider's /authorize -> back to our callback."""
    start = c.get("/login/oidc", follow_redirects=False)
    assert start.status_code == 302, start.text
    auth_url = start.headers["location"]
    q = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(auth_url).query))
    assert q["response_type"] == "code" and q["client_id"] == "bonescreen" and q["nonce"] and q["state"]
    assert q["code_challenge_method"] == "S256" and "openid" in q["scope"].split()
    try:
        urllib.request.build_opener(_NoRedirect).open(auth_url, timeout=10)
        raise AssertionError("the provider did not redirect back")
    except urllib.error.HTTPError as exc:
        back = exc.headers["Location"]
    parts = urllib.parse.urlsplit(back)
    return c.get(f"{parts.path}?{parts.query}", follow_redirects=False)


def test_sso_signs_in_an_sso_account_and_binds_its_subject(sso: tuple[TestClient, Service, FakeOIDCProvider]) -> None:
    c, svc, idp = sso
    assert 'id="sso"' in c.get("/login").text
    r = _sso(c)
    assert r.status_code == 303 and r.headers["location"] == "/worklist"
    assert c.get("/api/v1/me").json() == {"username": "carol", "role": "reviewer", "via": "session"}
    u = svc.store.get_user(username="carol")
    assert u is not None and u.oidc_subject == "idp-0001"
    # bound by subject now: a rename at the provider still signs in as carol
    c.cookies.clear()
    idp.user = {"sub": "idp-0001", "preferred_username": "carol.renamed"}
    assert _sso(c).headers["location"] == "/worklist"
    assert c.get("/api/v1/me").json()["username"] == "carol"
    assert idp.token_requests == 2
    assert [e.detail for e in svc.store.audit_events(action="login")][0] == '{"via": "oidc"}'


def test_sso_refuses_unknown_local_password_and_disabled_accounts(
        sso: tuple[TestClient, Service, FakeOIDCProvider]) -> None:
    c, svc, idp = sso
    idp.user = {"sub": "idp-9999", "preferred_username": "eve"}  # no account, no default role
    assert _sso(c).headers["location"] == "/login?error=sso"
    idp.user = {"sub": "idp-6666", "preferred_username": "dave"}  # a local password account: no takeover
    assert _sso(c).headers["location"] == "/login?error=sso"
    assert svc.store.get_user(username="dave").oidc_subject is None  # type: ignore[union-attr]
    svc.store.update_user("carol", disabled=True)
    idp.user = {"sub": "idp-0001", "preferred_username": "carol"}
    assert _sso(c).headers["location"] == "/login?error=sso"
    assert c.get("/api/v1/me").status_code == 401
    whys = [e.detail for e in svc.store.audit_events(action="login_failed")]
    assert len(whys) == 3 and any("not a single-sign-on account" in (w or "") for w in whys)


def test_sso_refuses_a_forged_id_token_and_a_forged_state(sso: tuple[TestClient, Service, FakeOIDCProvider]) -> None:
    c, svc, idp = sso
    idp.bad_signature = True  # signed with a key the provider's JWKS does not hold
    assert _sso(c).headers["location"] == "/login?error=sso"
    assert c.get("/api/v1/me").status_code == 401
    idp.bad_signature = False
    r = c.get("/login/oidc/callback?code=whatever&state=forged", follow_redirects=False)
    assert r.headers["location"] == "/login?error=sso"
    assert len(svc.store.audit_events(action="login_failed")) == 2


def test_sso_creates_accounts_with_the_default_role_when_configured(tmp_path: Path) -> None:
    idp = FakeOIDCProvider("bonescreen", "s3")
    secret = tmp_path / "s"
    secret.write_text("s3")
    secret.chmod(0o600)
    cfg = ServiceConfig(model="unused.pt", data_dir=str(tmp_path / "data"), dicom_enabled=False, worker_enabled=False,
                        oidc_issuer=idp.issuer, oidc_client_id="bonescreen", oidc_client_secret_file=str(secret),
                        oidc_default_role="viewer").validate()
    svc = Service(cfg)
    try:
        with TestClient(create_app(svc)) as c:
            idp.user = {"sub": "idp-42", "preferred_username": "frank"}
            assert _sso(c).headers["location"] == "/worklist"
            assert c.get("/api/v1/me").json() == {"username": "frank", "role": "viewer", "via": "session"}
    finally:
        idp.close()
    u = svc.store.get_user(username="frank")
    assert u is not None and u.password_hash is None and u.oidc_subject == "idp-42"
