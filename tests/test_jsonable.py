"""bonescreen.jsonable.plain: the one JSON cleaner (artifacts and strict JSON files)."""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path

import numpy as np
import pytest

from bonescreen.jsonable import plain


def test_plain_for_artifacts_keeps_what_it_does_not_know() -> None:
    obj = object()
    out = plain({1: (np.float32(0.5), np.int64(3)), "p": Path("/x/y"), "nan": np.float64("nan"), "o": obj})
    assert out["1"] == [0.5, 3] and type(out["1"][0]) is float and type(out["1"][1]) is int
    assert out["p"] == "/x/y" and math.isnan(out["nan"]) and out["o"] is obj


def test_plain_strict_is_standard_json() -> None:
    out = plain({"a": np.array([1.0, np.inf]), "d": dt.date(2024, 2, 29), "b": np.bool_(True),
                 "f": float("-inf"), "n": None}, strict=True)
    assert out == {"a": [1.0, None], "d": "2024-02-29", "b": True, "f": None, "n": None}
    json.dumps(out, allow_nan=False)
    with pytest.raises(TypeError, match="set"):
        plain({"s": {1, 2}}, strict=True)
