"""Lenient date reading for image metadata (DICOM headers, manifests, clinical tables).

``optional_date`` reads only formats that are unambiguous (year first); anything
else is None, because a missing date is handled downstream while a guessed one
could pair the wrong DXA. DXA exports, where day/month order matters and a bad
date must be refused with a reason, use ``bonescreen.cohort.parse_date``.
"""

from __future__ import annotations

import datetime as dt

__all__ = ["optional_date"]

_FORMATS = ("%Y%m%d", "%Y-%m-%d", "%Y.%m.%d", "%Y/%m/%d")


def optional_date(value: object) -> dt.date | None:
    """DICOM DA (``YYYYMMDD``, a trailing time ignored) or ``YYYY-MM-DD`` / ``YYYY/MM/DD`` /
    ``YYYY.MM.DD`` (a trailing time ignored); dates and datetimes pass through; else None."""
    if value is None or value == "":
        return None
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    text = str(value).strip()
    head = text[:8] if text[:8].isdigit() else text[:10]
    for fmt in _FORMATS:
        try:
            return dt.datetime.strptime(head, fmt).date()
        except ValueError:
            continue
    return None
