"""Accounts, roles, hashed API tokens, signed expiring sessions, CSRF, sign-in throttling and the audit trail.

On SQLite and on a real PostgreSQL server (``db_url`` fixture, tests/conftest.py).
"""

from __future__ import annotations

import hashlib
import io
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("httpx")

from fastapi.testclient import TestClient

from bonescreen.service.api import create_app
from bonescreen.service.auth import hash_password, new_token, token_digest
from bonescreen.service.config import ServiceConfig
from bonescreen.service.runtime import Service

PASSWORD = "correct horse battery"
SOP = "1.2.826.0.1.55.1"


@dataclass
class Env:
    client: TestClient
    svc: Service
    tokens: dict[str, str]


def _config(tmp_path: Path, db_url: str, **kw: Any) -> ServiceConfig:
    return ServiceConfig(model="unused.pt", data_dir=str(tmp_path / "data"), db_url=db_url, dicom_enabled=False,
                         worker_enabled=False, login_max_failures=3, **kw).validate()


def _seed(svc: Service) -> dict[str, str]:
    tokens = {}
    for name, role in (("vera", "viewer"), ("rita", "reviewer"), ("adam", "admin")):
        u = svc.store.add_user(name, role, hash_password(PASSWORD))
        tokens[name] = new_token()
        svc.store.add_token(u.id, token_digest(tokens[name]), "test")
    job = svc.store.enqueue(SOP, "1.2.826.0.1.55", "spool/x.dcm", "http")
    svc.store.claim("t:1:x", 1, 60)
    svc.store.complete(job.job_id, "t", {"eligible": True, "patient_id": "PID1", "category": "low_bone_mass",
                                         "score": 0.8, "flag": True})
    return tokens


@pytest.fixture()
def env(tmp_path: Path, db_url: str) -> Iterator[Env]:
    svc = Service(_config(tmp_path, db_url))
    tokens = _seed(svc)
    with TestClient(create_app(svc)) as c:
        yield Env(c, svc, tokens)


def _bearer(env: Env, who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {env.tokens[who]}"}


def _sign_in(c: TestClient, user: str, password: str = PASSWORD) -> Any:
    page = c.get("/login")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
    return c.post("/login", data={"username": user, "password": password, "csrf": csrf}, follow_redirects=False)


def test_roles_decide_what_each_account_may_do(env: Env) -> None:
    c = env.client
    assert c.get("/api/v1/me", headers=_bearer(env, "vera")).json() == {"username": "vera", "role": "viewer",
                                                                         "via": "token"}
    review = f"/api/v1/results/{SOP}/review"
    for who, results, put, upload, audit in (("vera", 200, 403, 403, 403), ("rita", 200, 200, 400, 403),
                                             ("adam", 200, 200, 400, 200)):
        h = _bearer(env, who)
        assert c.get("/api/v1/results", headers=h).status_code == results
        assert c.put(review, json={"status": "acknowledged"}, headers=h).status_code == put, who
        assert c.post("/api/v1/images", content=b"x" * 200, headers=h).status_code == upload, who
        assert c.get("/api/v1/audit", headers=h).status_code == audit, who
    # every review records who, in the row and in the audit trail
    r = env.svc.store.get_result(SOP)
    assert r is not None and r.reviewed_by == "adam" and r.review_status == "acknowledged"
    events = c.get("/api/v1/audit", params={"action": "review"}, headers=_bearer(env, "adam")).json()["events"]
    assert [(e["actor"], e["target"]) for e in events] == [("adam", SOP), ("rita", SOP)]
    assert c.get("/api/v1/results.csv", headers=_bearer(env, "vera")).status_code == 403
    csv_text = c.get("/api/v1/results.csv", headers=_bearer(env, "rita")).text
    assert csv_text.splitlines()[0].startswith("sop_instance_uid,") and SOP in csv_text
    users = c.get("/api/v1/users", headers=_bearer(env, "adam")).json()["users"]
    assert {u["username"]: u["role"] for u in users} == {"adam": "admin", "rita": "reviewer", "vera": "viewer"}
    assert "argon2" not in str(users)
    audit_csv = c.get("/api/v1/audit.csv", headers=_bearer(env, "adam")).text
    assert "export" in audit_csv and "results.csv" in audit_csv and "review" in audit_csv


def test_tokens_are_stored_hashed_and_die_with_their_account(env: Env) -> None:
    from sqlalchemy import text

    with env.svc.store.engine.connect() as conn:
        stored = [tuple(r) for r in conn.execute(text("SELECT token_hash, name FROM api_tokens"))]
        hashes = [r[0] for r in conn.execute(text("SELECT password_hash FROM users"))]
    assert len(stored) == 3
    for tok in env.tokens.values():
        assert all(tok not in str(row) for row in stored)
        assert (hashlib.sha256(tok.encode()).hexdigest(), "test") in stored
    assert all(h.startswith("$argon2id$") and PASSWORD not in h for h in hashes)
    c = env.client
    assert c.get("/api/v1/results", headers=_bearer(env, "vera")).status_code == 200
    env.svc.store.update_user("vera", disabled=True)
    assert c.get("/api/v1/results", headers=_bearer(env, "vera")).status_code == 401
    assert c.get("/api/v1/results", headers={"Authorization": "Bearer bst_guessed"}).status_code == 401


def test_session_cookie_is_signed_expiring_and_needs_csrf_for_writes(tmp_path: Path, db_url: str) -> None:
    svc = Service(_config(tmp_path, db_url, session_hours=0.0006))  # ~2 s sessions
    _seed(svc)
    with TestClient(create_app(svc)) as c:
        assert _sign_in(c, "rita", "wrong password").headers["location"] == "/login?error=1"
        r = _sign_in(c, "rita")
        assert r.status_code == 303 and r.headers["location"] == "/worklist"
        cookie = c.cookies.get("bonescreen_session")
        assert cookie and PASSWORD not in cookie and "bst_" not in cookie
        page = c.get("/worklist")
        assert page.status_code == 200 and "rita" in page.text
        csrf = re.search(r'name="csrf-token" content="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
        review = f"/api/v1/results/{SOP}/review"
        assert c.put(review, json={"status": "dxa_ordered"}).status_code == 403  # no CSRF token
        assert c.put(review, json={"status": "dxa_ordered"}, headers={"X-CSRF-Token": "forged"}).status_code == 403
        assert c.put(review, json={"status": "dxa_ordered"}, headers={"X-CSRF-Token": csrf}).status_code == 200
        # a tampered cookie is nobody
        c.cookies.clear()
        tampered = cookie[:-3] + ("AAA" if not cookie.endswith("AAA") else "BBB")
        assert c.get("/api/v1/me", headers={"Cookie": f"bonescreen_session={tampered}"}).status_code == 401
        assert c.get("/api/v1/me", headers={"Cookie": f"bonescreen_session={cookie}"}).json()["via"] == "session"
        time.sleep(3.2)  # past session_hours
        assert c.get("/api/v1/me", headers={"Cookie": f"bonescreen_session={cookie}"}).status_code == 401
        assert c.get("/worklist", headers={"Cookie": f"bonescreen_session={cookie}"},
                     follow_redirects=False).headers["location"] == "/login"
        # the sign-in form itself is CSRF-protected (a forged cross-site POST has no matching cookie)
        c.cookies.clear()
        r = c.post("/login", data={"username": "rita", "password": PASSWORD, "csrf": "x"}, follow_redirects=False)
        assert r.headers["location"] == "/login?error=csrf"
        # disabling an account ends its sessions at once
        assert _sign_in(c, "rita").status_code == 303
        assert c.get("/api/v1/me").status_code == 200
        svc.store.update_user("rita", disabled=True)
        assert c.get("/api/v1/me").status_code == 401
    kinds = [(e.actor, e.action) for e in svc.store.audit_events(limit=50)]
    assert ("rita", "login") in kinds and ("rita", "login_failed") in kinds


def test_sign_in_is_throttled_after_repeated_failures(env: Env) -> None:
    c = env.client
    for _ in range(3):
        assert _sign_in(c, "adam", "not the password").headers["location"] == "/login?error=1"
    # the right password no longer helps within the window
    assert _sign_in(c, "adam").headers["location"] == "/login?error=throttled"
    assert "Too many failed sign-ins" in c.get("/login?error=throttled").text
    # another account from another address is unaffected
    assert _sign_in(c, "rita").headers["location"] == "/worklist"
    fails = env.svc.store.audit_events(action="login_failed", actor="adam")
    assert len(fails) == 4 and "throttled" in (fails[0].detail or "")


def test_audit_trail_is_append_only_in_the_database(env: Env) -> None:
    from sqlalchemy import text
    from sqlalchemy.exc import DBAPIError

    env.svc.store.audit("export", actor="adam", target="x")
    for stmt in ("UPDATE audit SET actor = 'mallory'", "DELETE FROM audit"):
        with pytest.raises(DBAPIError, match="append-only"):
            with env.svc.store.session() as s:
                s.execute(text(stmt))
    assert env.svc.store.audit_events(actor="adam")[0].target == "x"


def test_settings_changes_are_audited_at_start(tmp_path: Path, db_url: str) -> None:
    def start(**kw: Any) -> Service:
        svc = Service(_config(tmp_path, db_url, **kw), worker=False)
        svc.start()
        svc.stop()
        return svc

    start(max_upload_mb=10)
    start(max_upload_mb=10)  # unchanged: no new row
    svc = start(max_upload_mb=20, store_patient_name=True)
    rows = Service(_config(tmp_path, db_url), worker=False).store.audit_events(action="settings")
    assert len(rows) == 2
    import json

    newest = json.loads(rows[0].detail or "{}")
    assert newest["changed"] == ["max_upload_mb", "store_patient_name"]
    assert newest["settings"]["max_upload_mb"] == 20.0
    assert svc.instance in (rows[0].actor or "")


@dataclass
class _Run:
    returncode: int
    stdout: str
    stderr: str


def test_users_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from bonescreen.cli import main

    def _cli(args: list[str], stdin: str = "") -> _Run:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))  # not a terminal: the password is its first line
        try:
            rc = main(args)
        except SystemExit as exc:
            rc = int(exc.code or 0)
        out = capsys.readouterr()
        return _Run(rc, out.out, out.err)

    data = ["--data-dir", str(tmp_path / "data")]
    r = _cli(["users", "add", "alice", "--role", "admin", *data], stdin=PASSWORD + "\n")
    assert r.returncode == 0, r.stderr
    assert _cli(["users", "add", "bob", "--role", "viewer", "--password", "x", *data]).returncode == 2  # no argv secrets
    r = _cli(["users", "add", "short", "--role", "viewer", *data], stdin="short\n")
    assert r.returncode == 1 and "at least 10 characters" in r.stderr
    r = _cli(["users", "token", "alice", "--name", "monitoring", *data])
    assert r.returncode == 0, r.stderr
    token = r.stdout.strip()
    assert token.startswith("bst_") and "shown once" in r.stderr
    r = _cli(["users", "list", *data])
    assert "alice\tadmin\tenabled\tpassword\t1 token(s)" in r.stdout
    cfg = ServiceConfig(model="x", data_dir=str(tmp_path / "data"), dicom_enabled=False).validate()
    svc = Service(cfg, worker=False)
    assert svc.auth.from_token(token) is not None
    assert _cli(["users", "disable", "alice", *data]).returncode == 0
    assert svc.auth.from_token(token) is None
    actions = [e.action for e in svc.store.audit_events()]
    assert actions[:3] == ["user_disable", "token_create", "user_add"]
    assert all(e.actor and e.actor.startswith("cli") for e in svc.store.audit_events())
    assert "no account 'nobody'" in _cli(["users", "token", "nobody", *data]).stderr


def test_keyed_pseudonym_key_generated_on_first_start_mode_0600(tmp_path: Path) -> None:
    """hash_patient_id stores HMAC pseudonyms under a key made on first start (never an unkeyed hash)."""
    from bonescreen.pseudonym import Pseudonymiser
    from bonescreen.service.worker import service_pseudonymiser

    cfg = ServiceConfig(model="x", data_dir=str(tmp_path / "data"), dicom_enabled=False, hash_patient_id=True)
    key = cfg.pseudonym_key_path
    assert not key.exists()
    p = service_pseudonymiser(cfg)("MRN0001")
    assert key.is_file() and (key.stat().st_mode & 0o777) == 0o600
    assert p == Pseudonymiser.from_file(key)("MRN0001") and p.startswith("p:")
    assert p != "p:" + hashlib.sha256(b"MRN0001").hexdigest()[:20]  # keyed, not a plain hash
    given = tmp_path / "site.key"
    given.write_text("ab" * 32)
    given.chmod(0o600)
    other = service_pseudonymiser(ServiceConfig(data_dir=str(tmp_path / "d2"), key_file=str(given)))("MRN0001")
    assert other != p and not (tmp_path / "d2" / "pseudonym.key").exists()


def test_session_key_is_made_once_mode_0600(env: Env) -> None:
    key = env.svc.config.session_key_path
    assert key.is_file() and (key.stat().st_mode & 0o777) == 0o600
    assert io.BytesIO(key.read_bytes()).read() not in env.client.get("/login").text.encode()
