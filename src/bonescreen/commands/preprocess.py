"""``bonescreen preprocess``: fill the preprocessing cache for many images, resumably."""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

from bonescreen.errors import TableError


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "preprocess",
        help="grayscale truncation + resize into an on-disk PNG cache (resumable)",
        description=(
            "Decode DICOM/PNG/JPEG images, apply the paper's grayscale truncation, resize, "
            "and store uint8 PNGs under CACHE/<size>/. Files already cached are skipped; "
            "unreadable files are listed with their reason in CACHE/<size>/skipped.csv."
        ),
    )
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="image files or folders (searched recursively)")
    p.add_argument("--cache", required=True, metavar="DIR", help="cache root directory")
    p.add_argument("--size", type=int, default=512, help="output side length in pixels (default 512)")
    p.add_argument(
        "--workers",
        type=int,
        default=max(1, min(8, (os.cpu_count() or 2) - 1)),
        help="worker processes (default: CPUs - 1, at most 8; 1 = in this process)",
    )
    p.add_argument("--manifest", metavar="CSV", help="a CSV with a 'path' column (e.g. a cohort manifest)")
    p.add_argument("--skip-list", metavar="CSV", help="where to write path,reason,message (default CACHE/<size>/skipped.csv)")
    p.add_argument("--no-voi", action="store_true", help="ignore DICOM VOI LUT / window (modality LUT still applied)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=handler)


def manifest_paths(manifest: str | os.PathLike[str]) -> list[str]:
    """The ``path`` column; relative paths are tried against the CWD, then the manifest's folder."""
    m = Path(manifest)
    try:
        with open(m, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or "path" not in reader.fieldnames:
                raise TableError(f"{m}: manifest needs a 'path' column")
            raw = [row["path"].strip() for row in reader if (row.get("path") or "").strip()]
    except OSError as exc:
        raise TableError(f"{m}: cannot read manifest ({exc.strerror})") from exc
    out = []
    for r in raw:
        p = Path(r)
        if not p.is_absolute() and not p.exists() and (m.parent / p).exists():
            p = m.parent / p
        out.append(str(p))
    return out


def handler(args: argparse.Namespace) -> int:
    from bonescreen.io import iter_image_files
    from bonescreen.preprocess import preprocess_files

    paths: list[str] = [str(p) for p in iter_image_files(args.inputs)] if args.inputs else []
    if args.manifest:
        paths += manifest_paths(args.manifest)
    if not paths:
        print("bonescreen preprocess: no input images found", flush=True)
        return 1
    result = preprocess_files(
        paths,
        args.cache,
        size=args.size,
        workers=args.workers,
        progress=not args.no_progress,
        skip_list=args.skip_list,
        apply_voi=not args.no_voi,
    )
    print(result.summary())
    return 0
