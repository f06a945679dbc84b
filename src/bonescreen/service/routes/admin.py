"""Administration (admins only): the audit trail (JSON and CSV), the accounts, the serve instances."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, Response

from bonescreen.service.auth import ADMIN, Admin, client_ip
from bonescreen.service.routes.common import Svc, Text32, Text64, to_csv
from bonescreen.service.store import AUDIT_ACTIONS

__all__ = ["router"]

router = APIRouter(tags=["admin"])


@router.get("/api/v1/audit", dependencies=[ADMIN])
def audit(service: Svc, action: Text32 = None, actor: Text64 = None,
          limit: Annotated[int, Query(ge=1, le=1000)] = 200,
          offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0) -> dict[str, Any]:
    """The audit trail, newest first (admins only)."""
    if action and action not in AUDIT_ACTIONS:
        raise HTTPException(422, f"action must be one of {', '.join(AUDIT_ACTIONS)}")
    rows = service.store.audit_events(action=action, actor=actor, limit=limit, offset=offset)
    return {"count": len(rows), "events": [e.as_dict() for e in rows]}


@router.get("/api/v1/audit.csv", response_class=Response,
            responses={200: {"content": {"text/csv": {}}, "description": "the audit trail as CSV"}})
def audit_csv(request: Request, service: Svc, p: Admin) -> Response:
    """The whole audit trail as CSV (the export itself is audited first)."""
    service.store.audit("export", actor=p.username, target="audit.csv", ip=client_ip(request))
    rows = [e.as_dict() for e in service.store.audit_events(limit=1_000_000)]
    return Response(to_csv(rows, ["id", "at", "actor", "action", "target", "detail", "ip"]), media_type="text/csv",
                    headers={"Content-Disposition": 'attachment; filename="bonescreen-audit.csv"',
                             "Cache-Control": "no-store"})


@router.get("/api/v1/users", dependencies=[ADMIN])
def users(service: Svc) -> dict[str, Any]:
    """Accounts (no hashes): name, role, disabled, single sign-on."""
    return {"users": [{"username": u.username, "role": u.role, "disabled": u.disabled,
                       "sso": u.oidc_subject is not None, "password": u.password_hash is not None}
                      for u in service.store.users()]}


@router.get("/api/v1/instances", dependencies=[ADMIN])
def instances(service: Svc) -> dict[str, Any]:
    """The serve processes sharing this database, their parts and heartbeat age."""
    return {"instances": service.store.instances(), "screened_by": service.store.job_workers()}
