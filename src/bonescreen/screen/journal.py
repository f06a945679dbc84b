"""The results journal: ``results.jsonl`` (the source of truth) + ``results.csv``, kill-safe.

Rows are appended per batch and fsync'ed. A re-run over the same folder
drops a partially written last line (a run killed mid-write), rewrites the CSV
from the journal, and skips every input that already has a row.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from bonescreen.fsio import atomic_open
from bonescreen.schema import RESULT_COLUMNS

__all__ = ["ResultStore", "csv_value"]

log = logging.getLogger(__name__)


def csv_value(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)
    return v


class ResultStore:
    """``results.jsonl`` (journal, source of truth) + ``results.csv``, appended per batch with fsync."""

    def __init__(self, out_dir: str | os.PathLike[str], columns: Sequence[str] = tuple(RESULT_COLUMNS)) -> None:
        self.dir = Path(out_dir)
        self.columns = list(columns)
        self.jsonl = self.dir / "results.jsonl"
        self.csv = self.dir / "results.csv"
        self._j: Any = None
        self._c: Any = None
        self._writer: Any = None

    def iter_rows(self) -> Iterator[dict[str, Any]]:
        if not self.jsonl.is_file():
            return
        with open(self.jsonl, encoding="utf-8") as fh:
            for line in fh:
                if line.endswith("\n"):
                    yield json.loads(line)

    def recover(self, visit: Callable[[dict[str, Any]], None]) -> int:
        """Drop a torn last line, rewrite the CSV from the journal; call ``visit`` on each row."""
        self.dir.mkdir(parents=True, exist_ok=True)
        n = 0
        if self.jsonl.is_file():
            with open(self.jsonl, "rb+") as fh:
                data_end = fh.seek(0, os.SEEK_END)
                # Scan back to the last newline: anything after it is a torn write.
                pos = data_end
                while pos > 0:
                    step = min(65536, pos)
                    fh.seek(pos - step)
                    chunk = fh.read(step)
                    k = chunk.rfind(b"\n")
                    if k >= 0:
                        pos = pos - step + k + 1
                        break
                    pos -= step
                if pos != data_end:
                    log.warning("dropping a partially written last row in %s", self.jsonl)
                    fh.truncate(pos)
                    fh.flush()
                    os.fsync(fh.fileno())
        with atomic_open(self.csv, "w", newline="") as out:
            w = csv.DictWriter(out, fieldnames=self.columns, extrasaction="ignore")
            w.writeheader()
            bad = 0
            if self.jsonl.is_file():
                with open(self.jsonl, encoding="utf-8") as fh:
                    for line in fh:
                        try:
                            row = json.loads(line)
                        except json.JSONDecodeError:
                            bad += 1
                            continue
                        w.writerow({k: csv_value(row.get(k)) for k in self.columns})
                        visit(row)
                        n += 1
        if bad:  # a corrupt line in the middle (disk trouble): keep only the parseable rows
            log.warning("%d unreadable row(s) in %s dropped", bad, self.jsonl)
            with atomic_open(self.jsonl, "w") as out, open(self.jsonl, encoding="utf-8") as fh:
                for line in fh:
                    try:
                        json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    out.write(line)
        return n

    def open(self) -> None:
        self._j = open(self.jsonl, "a", encoding="utf-8")
        self._c = open(self.csv, "a", newline="", encoding="utf-8")
        self._writer = csv.DictWriter(self._c, fieldnames=self.columns, extrasaction="ignore")

    def append(self, rows: Sequence[dict[str, Any]]) -> None:
        if not rows:
            return
        for row in rows:
            self._j.write(json.dumps({k: row.get(k) for k in self.columns}) + "\n")
            self._writer.writerow({k: csv_value(row.get(k)) for k in self.columns})
        for fh in (self._j, self._c):
            fh.flush()
            os.fsync(fh.fileno())

    def close(self) -> None:
        for fh in (self._j, self._c):
            if fh is not None:
                fh.close()
        self._j = self._c = None
