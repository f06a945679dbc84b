"""``bonescreen public-pool``: select NIH / CheXpert "No Finding" images aged 50-99."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "public-pool",
        help="select the public unlabelled pool (NIH ChestX-ray14, CheXpert) for pseudo-labels",
        description=(
            "Filter the NIH ChestX-ray14 and CheXpert metadata tables (shipped with "
            "torchxrayvision) to 'No Finding', frontal, age 50-99, map them to image files "
            "under your folders, and print the count at each filter."
        ),
    )
    p.add_argument("out", type=Path, help="output CSV (image_id, path, dataset, patient_id, age, sex, view)")
    p.add_argument("--nih", type=Path, help="folder holding the NIH images (searched recursively)")
    p.add_argument("--chexpert", type=Path, help="CheXpert folder (the one holding train/ or its parent)")
    p.add_argument("--min-age", type=int, default=50)
    p.add_argument("--max-age", type=int, default=99)
    p.add_argument("--keep-missing", action="store_true",
                   help="keep rows whose image file was not found (counts only)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bonescreen.public_pool import select_public_pool

    datasets = tuple(d for d, root in (("nih", args.nih), ("chexpert", args.chexpert)) if root) or (
        "nih",
        "chexpert",
    )
    sel = select_public_pool(
        nih_root=args.nih,
        chexpert_root=args.chexpert,
        datasets=datasets,
        min_age=args.min_age,
        max_age=args.max_age,
        require_files=not args.keep_missing,
    )
    print(sel.counts_text())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sel.table.to_csv(args.out, index=False)
    print(f"wrote {args.out} ({len(sel.table)} images)")
    return 0
