"""Atomic file writes: the one implementation every writer uses.

A file is written to a temporary name beside its destination (same file system),
flushed and fsync'ed, then renamed over the destination with ``os.replace``,
which is atomic: a killed run leaves either the old file, or the complete new
one, never half a PNG, CSV, JSON or checkpoint. On any error the temporary file
is removed and the destination is untouched.

Written by hand because the standard library has no atomic-write helper and the
few lines here are easier to audit than a dependency.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = [
    "atomic_open",
    "atomic_path",
    "atomic_torch_save",
    "file_sha256",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
]

PathLike = str | os.PathLike[str]


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(dest: PathLike, *, tmp_dir: PathLike | None = None, sync_dir: bool = False) -> Iterator[Path]:
    """A temporary path to write (by any library: torch, onnx, pydicom); renamed to ``dest`` on success.

    ``tmp_dir`` (default: ``dest``'s folder) must be on the same file system;
    ``sync_dir`` also fsyncs the destination folder, so the rename itself survives a
    power cut (the service's spool needs that; outputs that a rerun rebuilds do not).
    """
    target = Path(dest)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=tmp_dir or target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
        if sync_dir:
            _fsync_dir(target.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_open(dest: PathLike, mode: str = "w", *, encoding: str | None = "utf-8", newline: str | None = None,
                tmp_dir: PathLike | None = None, sync_dir: bool = False) -> Iterator[IO[Any]]:
    """An open file (``"w"`` text or ``"wb"`` bytes) that becomes ``dest`` when the block ends without error."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes a new file: mode 'w' or 'wb', not {mode!r}")
    with atomic_path(dest, tmp_dir=tmp_dir, sync_dir=sync_dir) as tmp:
        fh: IO[Any]
        if mode == "wb":
            fh = open(tmp, "wb")  # noqa: SIM115 - closed below, before the rename
        else:
            fh = open(tmp, "w", encoding=encoding, newline=newline)  # noqa: SIM115
        try:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        finally:
            fh.close()


def atomic_write_bytes(dest: PathLike, data: bytes, **kw: Any) -> Path:
    with atomic_open(dest, "wb", **kw) as fh:
        fh.write(data)
    return Path(dest)


def atomic_write_text(dest: PathLike, text: str, *, encoding: str = "utf-8", **kw: Any) -> Path:
    with atomic_open(dest, "w", encoding=encoding, **kw) as fh:
        fh.write(text)
    return Path(dest)


def atomic_write_json(dest: PathLike, obj: Any, *, indent: int | None = 2, **dumps_kw: Any) -> Path:
    """``json.dumps(obj, indent=indent, **dumps_kw)`` written atomically."""
    return atomic_write_text(dest, json.dumps(obj, indent=indent, **dumps_kw))


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    """``torch.save`` to a temp file then rename: a kill mid-write never leaves a truncated file."""
    import torch  # lazily: most writers never need torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def file_sha256(path: PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks (model ids, artifact lineage)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
