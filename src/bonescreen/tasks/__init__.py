"""Model tasks (stage2, stage1, three_class, pediatric): one registered :class:`Task` each.

``get_task(spec.task)`` answers what used to be decided by comparing the task string:
classes, model builder, dataset and loss, prediction, decision, result columns, explainer,
SR codes, and whether site profiles apply. See :mod:`bonescreen.tasks.base`.
"""

from bonescreen.tasks.base import (
    CASCADE,
    TASKS,
    DecisionInputs,
    DecisionRule,
    LossFn,
    Task,
    UnknownTaskError,
    get_task,
    mode_task,
    register_task,
    task_names,
)
from bonescreen.tasks.classification import (
    ADULT_ELIGIBILITY,
    FLAG_CATEGORIES,
    STAGE1,
    STAGE2,
    THREE_CLASS,
    ClassificationTask,
    categorize,
)
from bonescreen.tasks.pediatric import PEDIATRIC, PEDIATRIC_CASCADE_REFUSED, PEDIATRIC_CATEGORIES, PediatricTask

__all__ = [
    "ADULT_ELIGIBILITY",
    "CASCADE",
    "FLAG_CATEGORIES",
    "PEDIATRIC",
    "PEDIATRIC_CASCADE_REFUSED",
    "PEDIATRIC_CATEGORIES",
    "STAGE1",
    "STAGE2",
    "TASKS",
    "THREE_CLASS",
    "ClassificationTask",
    "DecisionInputs",
    "DecisionRule",
    "LossFn",
    "PediatricTask",
    "Task",
    "UnknownTaskError",
    "categorize",
    "get_task",
    "mode_task",
    "register_task",
    "task_names",
]
