"""Phantom generation throughput (images/s) at a given matrix size.

    python bench/bench_phantom.py --n-per-site 125 --pool 100 --size 512 --workers 1

Default: ~1,000 images at 512 px on one process (4 sites x 125 patients with
1-3 radiographs each, plus 100 pool images). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time

from bonescreen.phantom import generate_phantom


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-per-site", type=int, default=125)
    ap.add_argument("--pool", type=int, default=100)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="keep the cohort here (default: a temporary folder)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = generate_phantom(
            args.out or tmp,
            n_per_site=args.n_per_site,
            pool_size=args.pool,
            size=args.size,
            seed=args.seed,
            workers=args.workers,
            progress=False,
        )
        wall = time.perf_counter() - t0
    n = res.n_images + res.pool_images
    print(
        json.dumps(
            {
                "images": n,
                "size": args.size,
                "workers": args.workers,
                "seconds": round(wall, 1),
                "images_per_s": round(n / wall, 2),
                "python": platform.python_version(),
                "machine": platform.machine(),
            }
        )
    )


if __name__ == "__main__":
    main()
