"""The one folder walker: which files under a folder an input is made of.

Every reader of folders (``screen``'s inputs, ``io.iter_image_files`` for
``cohort`` and ``preprocess``) takes its files from :func:`walk_files`, so they
agree on a tree: hidden files and folders (a name starting with ``.``) are
skipped, symbolic links to files are files (callers de-duplicate by real path),
symbolic links to folders are not followed (no loops, no walking out of the
tree; the same as ``os.walk`` and ``Path.rglob``'s defaults), and the order is
``sorted(Path)``'s (names compared per folder level), produced lazily, one
folder listing at a time, so an archive of millions of files starts at once.
What a caller then does with a file that is not an image is its own business
(``screen`` records a skip with the reason; ``iter_image_files`` leaves it out).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = ["is_hidden", "walk_files"]


def is_hidden(name: str) -> bool:
    return name.startswith(".")


def walk_files(folder: str | os.PathLike[str], *, recursive: bool = True,
               exclude: Iterable[str | os.PathLike[str]] = ()) -> Iterator[Path]:
    """Regular files under ``folder`` (see the module's rules); ``exclude``: folders (any spelling) to skip."""
    skip = {os.path.realpath(e) for e in exclude}
    yield from _walk(Path(folder), recursive, skip)


def _walk(folder: Path, recursive: bool, skip: set[str]) -> Iterator[Path]:
    try:
        with os.scandir(folder) as it:
            entries = sorted((e for e in it if not is_hidden(e.name)), key=lambda e: e.name)
    except OSError:  # unreadable or vanished folder: nothing to take from it (as os.walk)
        return
    for e in entries:
        try:
            if e.is_dir(follow_symlinks=False):
                if recursive and os.path.realpath(e.path) not in skip:
                    yield from _walk(folder / e.name, recursive, skip)
            elif e.is_file():  # follows a link to a file; a dangling link is no file
                yield folder / e.name
        except OSError:
            continue
