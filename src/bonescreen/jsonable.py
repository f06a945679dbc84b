"""The one JSON cleaner: numpy scalars, paths, dates and containers to plain Python, all the way down.

Two uses, one walk: ``strict=False`` (artifacts, which ``torch.load(weights_only=True)``
must read back: numpy scalars become Python numbers, paths strings, tuples lists, keys
strings; anything else is left as it is) and ``strict=True`` (JSON files and ONNX metadata,
which must be standard JSON: NaN and infinities become ``None``, arrays lists, dates ISO
strings, and a value of any other type is a ``TypeError`` rather than a silent ``str``).
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

import numpy as np

__all__ = ["plain"]


def plain(value: Any, *, strict: bool = False) -> Any:
    """``value`` as plain Python (see the module for what ``strict`` adds)."""
    if isinstance(value, Mapping):
        return {str(k): plain(v, strict=strict) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v, strict=strict) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, PurePath):
        return str(value)
    if not strict or value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, np.ndarray):
        return plain(value.tolist(), strict=True)
    if isinstance(value, (dt.date, dt.datetime)):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON-able")
