"""The service's HTTP routes, one ``APIRouter`` per area, included by ``service.api.create_app``.

:mod:`health` (health, metrics, OpenAPI, who am I), :mod:`images` (upload, image
status), :mod:`results` (results, CSV, SR, overlay, review, forwarding retry),
:mod:`admin` (audit trail, accounts, instances), :mod:`accounts` (sign-in and
sign-out pages), :mod:`worklist` (the clinician's and the audit pages),
:mod:`monitor` (monitoring after deployment), :mod:`sso` (OpenID Connect).
They share :mod:`common` (the service dependency, page headers, templates,
parameter types) and ``service.auth`` (who a request is); none imports another.
"""
