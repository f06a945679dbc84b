"""The ``Task`` interface and its registry: one object per kind of model.

A model artifact names its task by a string (``ModelSpec.task``: the file format is
unchanged); everything that differs between tasks is a question to the registered
:class:`Task` (``get_task(spec.task)``) instead of a comparison with that string, so
adding a task means registering one object (:func:`register_task`).

Shaped after timm's model registry (``timm.models._registry``: a name -> entry point
mapping behind ``create_model``, with a listing and a clear error for unknown names) and
its ``timm.task`` classes (one object that owns a model's loss and forward for training).
Only facts and task-specific rules live here; the machinery that uses them (artifact
loading, the screening engine, training) sits in the layers above and asks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import numpy as np

from bonescreen.errors import ModelArtifactError

__all__ = [
    "CASCADE",
    "TASKS",
    "DecisionInputs",
    "DecisionRule",
    "LossFn",
    "Task",
    "UnknownTaskError",
    "get_task",
    "mode_task",
    "register_task",
    "task_names",
]

#: The screening run mode of a stage-2 model run after a stage-1 model (not a task of its own:
#: a run of two models, decided by the stage-2 task with the stage-1 probabilities).
CASCADE = "cascade"

#: ``loss(model, x, batch) -> scalar``: what the training loop minimises (``bonescreen.train.fit``).
LossFn = Callable[[Any, Any, dict[str, Any]], Any]


class UnknownTaskError(ModelArtifactError):
    """A task name no registered :class:`Task` answers to (an artifact from elsewhere, a typo)."""

    reason = "unknown_task"


class DecisionInputs(Protocol):
    """What a task decides from (``bonescreen.screen.decide.ModelOutputs`` fits this)."""

    @property
    def probs_main(self) -> np.ndarray | None: ...

    @property
    def probs_stage1(self) -> np.ndarray | None: ...

    @property
    def pediatric(self) -> Any: ...


class DecisionRule(Protocol):
    """The run's cut-offs (``bonescreen.screen.decide.DecisionPolicy`` fits this)."""

    @property
    def threshold(self) -> float: ...

    @property
    def threshold_stage1(self) -> float: ...

    @property
    def positive(self) -> int: ...

    @property
    def positive_stage1(self) -> int: ...

    @property
    def class_names(self) -> tuple[str, ...]: ...

    @property
    def pediatric_own_rule(self) -> bool: ...


class Task(ABC):
    """One kind of model: its classes, how it is built, predicts, decides, explains and reports.

    Attributes are class-level facts (typed here, set by each subclass); methods are the
    task-specific rules. Instances are registered once (:func:`register_task`).
    """

    #: the artifact's ``task`` string
    name: str
    #: class names in the network's output order (for regression tasks: the decision's classes)
    class_names: tuple[str, ...]
    #: index in ``class_names`` of the class the score is the probability of
    positive_class: int = 1
    #: the network returns class logits (softmax -> probabilities); False: a regression head
    has_logits: bool = True
    #: the network takes the image alone, so it has a single-input scoring graph
    #: (ONNX / OpenVINO export, the bf16, channels_last, compile and CUDA torch backends)
    single_input: bool = True
    #: the network also takes clinical variables (age, sex, height, weight)
    needs_clinical: bool = False
    #: predictions are DXA values (Z-score, BMD), joined to their DXA truth in predictions.csv
    regression: bool = False
    #: its place in the two-stage cascade (1: runs first, 2: runs on what stage 1 did not flag); None: none
    cascade_stage: int | None = None
    #: why it cannot join a cascade, when that needs saying (else the generic message)
    cascade_refusal: str = ""
    #: the results column that records the run's cut-off on this model's score; None: no cut-off
    threshold_column: str | None = None
    #: the results column a site profile recalibrates (``bonescreen calibrate`` / ``adapt``);
    #: None: site profiles and label-free adaptation do not apply
    profile_score: str | None = None
    #: a site profile's abstain band applies to its decisions
    abstain_band: bool = False
    #: Grad-CAM explains the decided class (multi-class) rather than the positive class
    explain_decided_class: bool = False
    #: the only explanation target ``bonescreen explain --target`` accepts; "": any class name
    explain_target: str = ""
    #: the manifest column its training label comes from
    label_column: str = ""

    def __repr__(self) -> str:
        return f"<Task {self.name}>"

    # ------------------------------------------------------------ artifact

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @abstractmethod
    def default_eligibility(self) -> dict[str, Any]:
        """The artifact's ``eligibility`` when training does not say otherwise (a fresh dict)."""

    @abstractmethod
    def build_model(self, spec: Any) -> Any:
        """An untrained network (``torch.nn.Module``) the artifact's ``state_dict`` fits."""

    # ------------------------------------------------------------ training

    @abstractmethod
    def dataset(self, source: Any, labels: Sequence[int] | np.ndarray, **options: Any) -> Any:
        """The training dataset (``torch.utils.data.Dataset``) over preprocessed images."""

    @abstractmethod
    def loss(self, **options: Any) -> LossFn:
        """The training loss ``loss(model, x, batch)``."""

    # ------------------------------------------------------------ screening

    def result_columns(self) -> list[str]:
        """The columns of ``results.csv`` of a run of this task (``bonescreen.schema``)."""
        from bonescreen.schema import RESULT_COLUMNS

        return list(RESULT_COLUMNS)

    def prediction_columns(self) -> list[str]:
        """The columns of a screening run's ``predictions.csv`` (``bonescreen.schema``)."""
        from bonescreen.schema import SCREEN_PREDICTION_COLUMNS

        return list(SCREEN_PREDICTION_COLUMNS)

    def predict_clinical(self, loaded: Any, images: np.ndarray, clinical: np.ndarray,
                         device: Any = "cpu") -> dict[str, np.ndarray]:
        """Predictions from images and clinical rows (tasks with ``needs_clinical`` only)."""
        raise ModelArtifactError(f"predict_pediatric needs a pediatric model, this one is {self.name!r}")

    def predict_table(self, predictor: Any, images: np.ndarray, clinical: Any) -> Any:
        """Per-image prediction table from images + a clinical DataFrame (``needs_clinical`` tasks)."""
        raise ModelArtifactError(f"a {self.name!r} model takes the image alone; it has no clinical inputs")

    def decide_probabilities(
        self,
        probs_main: np.ndarray | None,
        probs_stage1: np.ndarray | None = None,
        *,
        threshold: float = 0.5,
        threshold_stage1: float = 0.5,
        positive: int = 1,
        positive_stage1: int = 1,
        class_names: Sequence[str] = ("normal", "low_bone_mass", "osteoporosis"),
        cascade: bool = False,
    ) -> list[dict[str, Any]]:
        """Rows from class probabilities (classifier tasks; ``bonescreen.screen.decide.decide``)."""
        raise ValueError(f"unknown mode {self.name!r}")

    @abstractmethod
    def decide(self, outputs: DecisionInputs, rule: DecisionRule, *, cascade: bool = False) -> list[dict[str, Any]]:
        """Per-image score columns, category and flag (``bonescreen.screen.decide`` step 2)."""

    @abstractmethod
    def explainer(self, loaded: Any) -> Any:
        """The Grad-CAM explainer of a loaded ``.pt`` model (``.cams(images, target)``)."""

    @abstractmethod
    def sr_result(self, row: Mapping[str, Any], run: Mapping[str, Any], *, cascade: bool = False) -> Any:
        """The ``dicom_out.ScreeningResult`` (the SR's codes and measurements) of one result row."""


#: name -> the registered task
TASKS: dict[str, Task] = {}

_T = TypeVar("_T", bound=Task)


def register_task(task: _T) -> _T:
    """Add ``task`` to the registry under ``task.name``; a second task of the same name is refused."""
    if task.name in TASKS and TASKS[task.name] is not task:
        raise ValueError(f"a task named {task.name!r} is already registered")
    TASKS[task.name] = task
    return task


def task_names() -> list[str]:
    """The registered task names, sorted."""
    return sorted(TASKS)


def get_task(name: str) -> Task:
    """The registered task called ``name``; :class:`UnknownTaskError` names the known ones otherwise."""
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise UnknownTaskError(f"unknown task {name!r}; expected one of {task_names()}") from None


def mode_task(mode: str) -> Task:
    """The task that decides a screening run in ``mode`` (``ModelSet.mode``).

    ``cascade`` is decided by the stage-2 task; ``""`` (no mode given) means an adult
    classifier run, whose tables are the stage-2 task's.
    """
    return get_task("stage2" if mode in ("", CASCADE) else mode)
