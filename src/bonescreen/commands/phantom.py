"""``bonescreen phantom OUT``: write the synthetic CXR-DXA cohort with known truth."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser(
        "phantom",
        help="generate the synthetic CXR-DXA cohort (known truth, oracle AUC)",
        description=(
            "Write DICOM radiographs, DXA exports, truth.csv, oracle.json and phantom.json for "
            "a development site, four external sites (one with category labels only, one (FAR) "
            "with the vendor look farthest from the development site's) and an unlabelled pool. Same seed, same bytes."
        ),
    )
    p.add_argument("out", help="output folder (created; a previous phantom there is replaced)")
    p.add_argument("--n-per-site", type=int, default=200, help="patients per site (default 200)")
    p.add_argument("--pool", type=int, default=200, help="unlabelled pool images (default 200)")
    p.add_argument("--size", type=int, default=512, help="image matrix in pixels (default 512)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--workers", type=int, default=1, help="parallel processes (output is identical)")
    p.add_argument(
        "--sites",
        default=None,
        help="comma-separated subset of the default sites (DEV,EXT_A,EXT_B,EXT_C,FAR)",
    )
    p.add_argument("--no-messy", action="store_true", help="leave the DEV DXA export clean")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import dataclasses

    from bonescreen.phantom import PhantomError, default_sites, generate_phantom

    sites = default_sites()
    if args.sites:
        wanted = [s.strip() for s in args.sites.split(",") if s.strip()]
        known = {s.name for s in sites}
        unknown = [w for w in wanted if w not in known]
        if unknown:
            raise PhantomError(f"unknown site(s) {unknown}; choose from {sorted(known)}")
        sites = [s for s in sites if s.name in wanted]
    if args.no_messy:
        sites = [dataclasses.replace(s, messy=False) for s in sites]
    result = generate_phantom(
        args.out,
        sites=sites,
        n_per_site=args.n_per_site,
        pool_size=args.pool,
        size=args.size,
        seed=args.seed,
        workers=args.workers,
        progress=not args.quiet,
    )
    print(f"phantom written to {result.out_dir}")
    header = (
        f"{'site':<8}{'labels':<10}{'patients':>9}{'images':>8}{'n(stage2)':>11}{'prevalence':>12}{'oracle AUC':>12}"
    )
    print(header)
    for name, o in result.oracle.items():
        s = result.sites[name]
        auc = "n/a" if o["auc"] is None else f"{o['auc']:.3f}"
        prev = "n/a" if o["prevalence"] is None else f"{o['prevalence']:.3f}"
        print(f"{name:<8}{s['label_type']:<10}{s['n_patients']:>9}{s['n_images']:>8}{o['n']:>11}{prev:>12}{auc:>12}")
    print(f"{'pool':<8}{'none':<10}{'':>9}{result.pool_images:>8}")
    total = result.n_images + result.pool_images
    print(f"{total} images in {result.seconds:.1f} s ({result.images_per_second:.1f} images/s)")
    return 0
