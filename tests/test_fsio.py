"""bonescreen.fsio (atomic writes) and bonescreen.dates (lenient metadata dates)."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from bonescreen.dates import optional_date
from bonescreen.fsio import atomic_open, atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text


def test_atomic_writes_replace_and_leave_no_temp(tmp_path):
    dest = tmp_path / "sub" / "a.json"
    atomic_write_json(dest, {"x": 1})
    assert json.loads(dest.read_text()) == {"x": 1}
    atomic_write_text(dest, "new")
    assert dest.read_text() == "new"
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["a.json", "b.bin"]


def test_failed_write_keeps_old_file_and_removes_temp(tmp_path):
    dest = tmp_path / "r.csv"
    dest.write_text("old")
    with pytest.raises(RuntimeError), atomic_open(dest, "w") as fh:
        fh.write("half a ")
        raise RuntimeError("killed")
    assert dest.read_text() == "old"
    with pytest.raises(RuntimeError), atomic_path(dest) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert dest.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["r.csv"]


def test_temp_dir_and_mode_checks(tmp_path):
    spool = tmp_path / "tmp"
    spool.mkdir()
    atomic_write_bytes(tmp_path / "x" / "y.dcm", b"DICM", tmp_dir=spool, sync_dir=True)
    assert (tmp_path / "x" / "y.dcm").read_bytes() == b"DICM" and not any(spool.iterdir())
    with pytest.raises(ValueError, match="mode"), atomic_open(tmp_path / "z", "a"):
        pass


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("20210315", dt.date(2021, 3, 15)),
        ("20210315101500", dt.date(2021, 3, 15)),
        ("2021-03-15", dt.date(2021, 3, 15)),
        ("2021-03-15T10:15:00", dt.date(2021, 3, 15)),
        ("2021/03/15", dt.date(2021, 3, 15)),
        ("2021.03.15", dt.date(2021, 3, 15)),
        (dt.datetime(2021, 3, 15, 10), dt.date(2021, 3, 15)),
        (dt.date(2021, 3, 15), dt.date(2021, 3, 15)),
        ("03/15/2021", None),
        ("15.03.2021", None),
        ("2021-13-01", None),
        ("", None),
        (None, None),
        ("garbage", None),
    ],
)
def test_optional_date(value, expected):
    assert optional_date(value) == expected
