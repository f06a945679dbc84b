"""``bonescreen pseudolabel``: proxy labels for an unlabelled pool from a trained teacher."""

from __future__ import annotations

import argparse


def handler(args: argparse.Namespace) -> int:
    from bonescreen.pseudolabel import pseudolabel

    pool = args.pool[0] if len(args.pool) == 1 else args.pool
    result = pseudolabel(
        args.model,
        pool,
        args.out,
        thresholds=(args.threshold_normal, args.threshold_low),
        cache_root=args.cache,
        batch_size=args.batch_size,
        device=args.device,
        progress=not args.no_progress,
    )
    from bonescreen.commands.train import is_rank0

    if is_rank0():
        c = result.counts
        print(f"proxy manifest: {result.out_csv} ({c['n_kept']} of {c['n_pool']} kept)")
        for name, n in c["classes"].items():
            print(f"  {name:15s} kept {n['kept']:6d}  excluded {n['excluded']:6d}")
        if c["n_unreadable"]:
            print(f"  unreadable      {c['n_unreadable']:6d}  {c['unreadable_reasons']}")
        print(f"all scores: {result.scores_csv}; counts: {result.counts_json}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pseudolabel",
        help="proxy-label an unlabelled pool with a trained model",
        description=(
            "Score pool images with the teacher; keep those with P(normal) >= --threshold-normal "
            "or P(low bone mass) >= --threshold-low (paper: 0.99 / 0.75); write the kept rows as "
            "a manifest for 'distill', all scores, and kept/excluded counts per class."
        ),
    )
    p.add_argument("--model", required=True, help="teacher model artifact (model.pt)")
    p.add_argument("--pool", required=True, nargs="+", help="a folder of images, a manifest CSV with 'path', or image files")
    p.add_argument("--out", required=True, help="proxy-label manifest CSV to write")
    p.add_argument("--cache", default="bonescreen-cache", help="preprocessing cache folder (default: %(default)s)")
    p.add_argument("--threshold-normal", type=float, default=0.99, help="default: %(default)s")
    p.add_argument("--threshold-low", type=float, default=0.75, help="default: %(default)s")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=handler)
