"""What the route modules share: the service dependency, HTML page headers and templates, parameter types, CSV."""

from __future__ import annotations

import csv
import io
from functools import lru_cache
from typing import Annotated, Any, cast

from fastapi import Depends, Path, Query, Request

from bonescreen.service.runtime import Service

__all__ = ["CSP", "PAGE_HEADERS", "SopUID", "Svc", "Text32", "Text64", "Uid", "UID_PATTERN", "get_service",
           "render", "to_csv"]

UID_PATTERN = r"^[0-9]+(\.[0-9]+)*$"
CSP = ("default-src 'self'; script-src 'unsafe-inline' 'self'; style-src 'unsafe-inline' 'self'; "
       "img-src 'self'; frame-ancestors 'none'; form-action 'self'")
PAGE_HEADERS = {"Cache-Control": "no-store", "Content-Security-Policy": CSP, "X-Frame-Options": "DENY",
                "Referrer-Policy": "no-referrer", "X-Content-Type-Options": "nosniff"}


def get_service(request: Request) -> Service:
    """The running service (``create_app`` puts it on ``app.state``): a dependency of every route."""
    return cast(Service, request.app.state.service)


Svc = Annotated[Service, Depends(get_service)]
SopUID = Annotated[str, Path(max_length=64, pattern=UID_PATTERN, description="SOP Instance UID")]
Uid = Annotated[str | None, Query(max_length=64, pattern=UID_PATTERN)]
Text64 = Annotated[str | None, Query(max_length=64)]
Text32 = Annotated[str | None, Query(max_length=32)]


@lru_cache(maxsize=1)
def _env() -> Any:
    from jinja2 import Environment, PackageLoader, select_autoescape

    return Environment(loader=PackageLoader("bonescreen.service", "templates"),
                       autoescape=select_autoescape(["html"]))


def render(name: str, **ctx: Any) -> str:
    """An HTML page from ``service/templates`` (Jinja2, autoescaped)."""
    return str(_env().get_template(name).render(**ctx))


def to_csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    return buf.getvalue()
