"""``bonescreen cohort``: pair DXA exams with CXRs and write the manifest.

``bonescreen pediatric cohort`` is the same command with the pediatric study's
defaults (:func:`add_cohort_arguments` / :func:`run_cohort` serve both).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_cohort_arguments(p: argparse.ArgumentParser, *, pediatric: bool = False) -> None:
    """The options of ``cohort`` and ``pediatric cohort`` (the defaults differ by population)."""
    p.add_argument("--site", nargs=3, action="append", metavar=("NAME", "IMAGES", "DXA_CSV"), default=[],
                   help="a site: its image folder and DXA export (repeatable)")
    p.add_argument("--development", action="append", default=[], metavar="NAME",
                   help="site split into train/tune/test (repeatable; default: the first site)")
    p.add_argument("--external", action="append", default=[], metavar="NAME",
                   help="site whose pairs all go to the test split (repeatable)")
    p.add_argument("--columns",
                   help="column mapping THEIR=OURS,..., a YAML file, or a DXA export preset "
                        "(generic, lunar, hologic, osteosys; 'lunar,THEIR=OURS' adds to one); applies to every site")
    p.add_argument("--window", type=int, default=90,
                   help="max days between CXR and DXA (default 90" + (": the study's 3 months)" if pediatric else ")"))
    p.add_argument("--site-window", action="append", default=[], metavar="NAME=DAYS",
                   help="pairing window for one site, e.g. EXT_B=180 (repeatable)")
    p.add_argument("--min-age", type=float, default=None,
                   help="youngest age kept (default 50 for adults, 0 for --population pediatric)")
    p.add_argument("--max-age", type=float, default=None,
                   help="oldest age kept (default none for adults, 17.99 for --population pediatric)")
    if not pediatric:
        p.add_argument("--population", choices=["adult", "pediatric"], default="adult",
                       help="adult (T-scores, WHO categories; default) or pediatric (Z-scores, ages 0-17)")
    p.add_argument("--views", default="PA,AP", help="accepted views (default PA,AP)")
    p.add_argument("--strict-view", action="store_true", help="refuse images without ViewPosition")
    if not pediatric:
        p.add_argument("--exclude-osteoporosis", action="store_true",
                       help="drop osteoporosis pairs (the stage-2 cohort of the paper)")
    p.add_argument("--quality-flags", type=Path, help="CSV with image_id|path and flag: flagged images are excluded")
    p.add_argument("--date-format", help="strptime format for non-ISO DXA dates, e.g. %%d/%%m/%%Y")
    p.add_argument("--split", default="0.7,0.1,0.2", help="train,tune,test fractions (default 0.7,0.1,0.2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cohort",
        help="pair DXA exams with chest radiographs -> manifest, exclusions, flow",
        description=(
            "Build the CXR-DXA cohort. Give sites with --site NAME IMAGES_DIR DXA_CSV "
            "(repeatable) or a phantom folder with --phantom DIR. The first site (or the "
            "phantom's development site) is split 70/10/20 by patient; --external sites go "
            "entirely to the test split."
        ),
    )
    p.add_argument("out", type=Path, help="output folder (manifest.csv, exclusions.csv, flow.json)")
    p.add_argument("--phantom", type=Path, help="take all sites from a `bonescreen phantom` folder")
    add_cohort_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return run_cohort(args, population=args.population, phantom=args.phantom)


def run_cohort(args: argparse.Namespace, *, population: str, phantom: Path | None) -> int:
    import pandas as pd

    from bonescreen.cohort import (
        CohortConfig,
        SiteInput,
        build_cohort,
        flow_text,
        load_column_map,
        sites_from_phantom,
    )
    from bonescreen.errors import TableError

    cmap = load_column_map(args.columns)
    sites: list[SiteInput] = []
    if phantom:
        sites.extend(sites_from_phantom(phantom))
    for name, images, dxa in args.site:
        sites.append(SiteInput(name, [Path(images)], Path(dxa), column_map=cmap))
    if not sites:
        raise TableError("give at least one --site NAME IMAGES DXA_CSV or a phantom folder")
    known = {s.name for s in sites}
    unknown = (set(args.development) | set(args.external)) - known
    if unknown:
        raise TableError(f"--development/--external name unknown sites: {sorted(unknown)}")
    # Default: the first site (the phantom's development site) is split; the rest are external.
    dev = set(args.development) or {sites[0].name}
    windows = {}
    for item in args.site_window:
        name, _, days = item.partition("=")
        if name not in known or not days.strip().isdigit():
            raise TableError(f"--site-window {item!r}: expected NAME=DAYS with a known site name")
        windows[name] = int(days)
    for s in sites:
        s.role = "development" if s.name in dev and s.name not in args.external else "external"
        s.window_days = windows.get(s.name, s.window_days)
    fractions = tuple(float(x) for x in args.split.split(","))
    if len(fractions) != 3:
        raise TableError("--split needs three fractions: train,tune,test")
    base = CohortConfig.pediatric() if population == "pediatric" else CohortConfig()
    overrides: dict[str, Any] = {k: v for k, v in (("min_age", args.min_age), ("max_age", args.max_age))
                                 if v is not None}
    cfg = CohortConfig(
        window_days=args.window,
        min_age=overrides.get("min_age", base.min_age),
        max_age=overrides.get("max_age", base.max_age),
        views=tuple(v.strip().upper() for v in args.views.split(",") if v.strip()),
        allow_unknown_view=not args.strict_view,
        exclude_osteoporosis=bool(getattr(args, "exclude_osteoporosis", False)),
        split_fractions=fractions,  # type: ignore[arg-type]
        seed=args.seed,
        date_format=args.date_format,
        population=population,
    )
    flags = pd.read_csv(args.quality_flags, dtype=str) if args.quality_flags else None
    result = build_cohort(sites, cfg, workers=args.workers, quality_flags=flags)
    paths = result.write(args.out)
    print(flow_text(result.flow, result.sites))
    m = result.manifest
    if len(m):
        print("\nsplit counts (images; patients in brackets):")
        counts = m.groupby(["site", "split"]).size().unstack(fill_value=0)
        pats = m.groupby(["site", "split"])["patient_id"].nunique().unstack(fill_value=0)
        print(counts.astype(str).add(" (").add(pats.astype(str)).add(")").to_string())
    print(f"\nwrote {paths['manifest']} ({len(m)} rows), {paths['exclusions']}, {paths['flow']}")
    return 0 if len(m) else 1
