"""The worklist page: one row per patient study (flagged first), its images inside, filters, review status;
and the audit trail page.

A study's row shows the result of the image that decides it (the rule of
``screen``'s studies.csv: ``bonescreen.screen.decide.rollup_study``) with that
image's Grad-CAM thumbnail; the images of the study (screened or skipped, with
the reason) are listed inside the row. The review status is per study: setting
it sets every image of the study.

Server-rendered (Jinja2, autoescaped) so it works without a front-end build;
a few lines of inline JavaScript set the review status through the API,
sending the session's CSRF token. Signing in is ``routes.accounts`` (or single
sign-on, ``routes.sso``); the session cookie is ``service.auth``'s: HttpOnly,
SameSite=Lax, Secure when the request came over HTTPS.
"""

from __future__ import annotations

import datetime as dt

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from bonescreen import __version__
from bonescreen.schema import OOD_FLAG_REASONS
from bonescreen.service.auth import principal_at_least, role_at_least
from bonescreen.service.routes.common import PAGE_HEADERS, Svc, render
from bonescreen.service.store import AUDIT_ACTIONS, CATEGORY_LABELS, REVIEW_STATUSES

__all__ = ["DISCLAIMER", "REVIEW_LABELS", "router"]

REVIEW_LABELS = {"new": "New", "acknowledged": "Acknowledged", "dxa_ordered": "DXA ordered"}
DISCLAIMER = "Research software output; not a diagnosis. Confirm with DXA."
SHOW = ("screened", "flagged", "all", "dead_letter")

router = APIRouter()


def _date(value: str | None) -> dt.date | None:
    if not value:
        return None
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        return None


@router.get("/worklist", tags=["worklist"], response_class=HTMLResponse)
async def worklist(request: Request, service: Svc, date_from: str | None = None, date_to: str | None = None,
                   category: str | None = None, review_status: str | None = None,
                   show: str = "screened") -> Response:
    """The clinician's page (HTML). ``show``: screened (default), flagged, all (with skipped), dead_letter."""
    p = await run_in_threadpool(principal_at_least, request, "viewer")
    if p is None:
        return RedirectResponse("/login", status_code=303)
    d0, d1 = _date(date_from), _date(date_to)
    cat = category if category in CATEGORY_LABELS else None
    rev = review_status if review_status in REVIEW_STATUSES else None
    show = show if show in SHOW else "screened"
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


@router.get("/admin/audit", tags=["admin"], response_class=HTMLResponse)
async def audit_page(request: Request, service: Svc, action: str | None = None,
                     actor: str | None = None) -> Response:
    """The audit trail (HTML, admins): newest first, with a CSV export."""
    p = await run_in_threadpool(principal_at_least, request, "viewer")
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
