"""Task name -> its training hooks (:class:`bonescreen.training.hooks.TaskHooks`) and its entry point.

One entry per task of :mod:`bonescreen.tasks` (the registry says what each task is; here is how
it trains). Classifier tasks' hooks need only the task name; a regression task (pediatric) carries
state fitted on the training split (standardiser, reference curves), so its hooks are built by
``train_pediatric``. ``train(task, ...)`` dispatches a training run by task name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bonescreen.tasks import UnknownTaskError, get_task, task_names
from bonescreen.training.jobs import ClassifierHooks, train_model
from bonescreen.training.pediatric import PediatricHooks, train_pediatric


@dataclass(frozen=True)
class TaskTraining:
    """How one task trains: its hooks class and the entry point that builds them and runs the loop."""

    hooks: type[Any]
    train: Callable[..., Any]


def _classifier(task: str) -> TaskTraining:
    def run(manifest: Any, out_dir: Any, config: Any = None, **kwargs: Any) -> Any:
        return train_model(manifest, out_dir, config, task=task, **kwargs)

    return TaskTraining(ClassifierHooks, run)


def _training(name: str) -> TaskTraining:
    # the one regression task trains with the clinical fusion model's hooks; every classifier alike
    return TaskTraining(PediatricHooks, train_pediatric) if get_task(name).regression else _classifier(name)


TASK_TRAINING: dict[str, TaskTraining] = {name: _training(name) for name in task_names()}


def train(task: str, manifest: Any, out_dir: Any, config: Any = None, **kwargs: Any) -> Any:
    """Train ``task`` (``train_model``'s or ``train_pediatric``'s keyword arguments)."""
    if task not in TASK_TRAINING:
        raise UnknownTaskError(f"unknown task {task!r}; known: {', '.join(TASK_TRAINING)}")
    return TASK_TRAINING[task].train(manifest, out_dir, config, **kwargs)
