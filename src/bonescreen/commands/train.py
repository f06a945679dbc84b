"""``bonescreen train``: the supervised teacher (runs under torchrun for multi-GPU)."""

from __future__ import annotations

import argparse

from bonescreen.config import add_config_arguments
from bonescreen.tasks import get_task, task_names

#: what `bonescreen train` learns: every image classifier task (a regression task trains with its own verb)
TASKS = tuple(name for name in task_names() if not get_task(name).regression)


def add_common_training_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by ``train`` and ``distill``."""
    p.add_argument("manifest", help="cohort manifest CSV (splits train/tune/test)")
    p.add_argument("--out", required=True, help="output folder (model.pt, metrics.csv, predictions.csv, ...)")
    p.add_argument("--cache", default="bonescreen-cache", help="preprocessing cache folder (default: %(default)s)")
    p.add_argument("--task", choices=TASKS, default="stage2", help="label to learn (default: %(default)s)")
    p.add_argument("--pretrained", help="starting weights: a file (timm state dict / .safetensors, or a bonescreen model.pt of the "
                        "same architecture), 'timm', 'lite0', 'auto' or 'none'")
    p.add_argument("--arch", help="any timm model name (overrides the preset)")
    p.add_argument("--epochs", type=int, help="number of epochs (overrides the preset)")
    p.add_argument("--batch-size", type=int, help="global batch size (overrides the preset)")
    p.add_argument("--image-size", type=int, help="input size in pixels (overrides the preset)")
    p.add_argument("--device", help="auto | cpu | cuda")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--name", help="model name written into predictions.csv")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_config_arguments(p)


def config_for(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from bonescreen.config import config_from_args

    extra = {
        "pretrained": args.pretrained,
        "arch": args.arch,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "device": args.device,
    }
    if args.no_progress:
        extra["progress"] = False
    # "--pretrained none" stays the string "none", which means random init.
    return config_from_args(args, extra)


def is_rank0() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0


def print_result(result) -> None:  # type: ignore[no-untyped-def]
    import json

    m = result.best_metrics
    print(f"model:        {result.artifact_path}")
    print(f"best epoch:   {result.best_epoch} (tune AUC {m.get('tune_auc', float('nan')):.4f})")
    print(f"stopped:      {result.stopped} after {result.global_step} steps")
    print(f"metrics:      {result.metrics_csv}")
    if result.predictions_path:
        print(f"predictions:  {result.predictions_path}")
    if result.n_skipped_images:
        print(f"skipped:      {result.n_skipped_images} unreadable images (see {result.out_dir / 'skipped.csv'})")
    test = result.model_card.get("test_metrics")
    if test:
        print("test:         " + json.dumps({k: round(v, 4) for k, v in test.items()}))


def handler(args: argparse.Namespace) -> int:
    from bonescreen.training.jobs import train_model

    cfg = config_for(args)
    result = train_model(
        args.manifest,
        args.out,
        cfg,
        cache_root=args.cache,
        task=args.task,
        resume=args.resume,
        model_name=args.name or "teacher",
    )
    if is_rank0():
        print_result(result)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train the supervised (teacher) model",
        description=(
            "Train on the manifest's train split, select the best epoch on the tune split "
            "(AUC), write model.pt, checkpoint.pt, metrics.csv, predictions.csv (test split) "
            "and TensorBoard curves. Multi-GPU: torchrun --nproc_per_node N -m bonescreen train ..."
        ),
    )
    add_common_training_arguments(p)
    p.set_defaults(func=handler)
