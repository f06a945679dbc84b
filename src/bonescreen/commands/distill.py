"""``bonescreen distill``: the student, on labelled + proxy-labelled data with the teacher's soft targets."""

from __future__ import annotations

import argparse


def handler(args: argparse.Namespace) -> int:
    from bonescreen.commands.train import config_for, is_rank0, print_result
    from bonescreen.training.distill import distill

    cfg = config_for(args)
    if args.alpha is not None:
        cfg.distill_alpha = args.alpha
    if args.temperature is not None:
        cfg.distill_temperature = args.temperature
    cfg.validate()
    result = distill(
        args.manifest,
        args.out,
        cfg,
        teacher=args.teacher,
        cache_root=args.cache,
        proxy=args.proxy,
        task=args.task,
        resume=args.resume,
        model_name=args.name or "student",
    )
    if is_rank0():
        print_result(result)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from bonescreen.commands.train import add_common_training_arguments

    p = sub.add_parser(
        "distill",
        help="train the student with knowledge distillation",
        description=(
            "Student on labelled + proxy-labelled images: (1-alpha)*CE + alpha*T^2*KL to the "
            "teacher's soft targets; the teacher sees the weak view (flip), the student the "
            "strong one. Outputs as for 'train'."
        ),
    )
    add_common_training_arguments(p)
    p.add_argument("--teacher", required=True, help="teacher model artifact (model.pt from 'train')")
    p.add_argument("--proxy", help="proxy-label manifest from 'pseudolabel' (omit: labelled data only)")
    p.add_argument("--alpha", type=float, help="weight of the KL term (preset: 0.5)")
    p.add_argument("--temperature", type=float, help="distillation temperature (preset: 2)")
    p.set_defaults(func=handler)
