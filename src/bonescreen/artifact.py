"""The single-file model artifact: weights + architecture + preprocessing + threshold + card.

Saved with ``torch.save`` as a dict of plain Python values and tensors, and
loaded with ``weights_only=True`` so that opening an artifact never executes
pickled code (artifacts travel between sites).

Format version 2 adds ``ood``: the out-of-distribution model fitted on the
training split's features (bonescreen.ood), with the fingerprint of the
weights it was fitted for. Version 3 makes it multi-layer (per-block
Gaussians on the penultimate embedding and the deeper stages' channel
statistics, :mod:`bonescreen.features`) with a flag band below the refusal
threshold. Version-1 artifacts still load (``ood`` is None, with a warning
naming the command that adds one: ``bonescreen ood fit``); screening refuses
them unless told ``--ood off``. Version-2 artifacts load and their
penultimate-only OOD part still scores, with a warning naming the same command. Optional fields that an
artifact lacks take their defaults, so later optional fields stay readable.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bonescreen import __version__
from bonescreen.errors import ModelArtifactError
from bonescreen.fsio import atomic_torch_save
from bonescreen.models import GRAY_MEAN, GRAY_STD
from bonescreen.tasks import ADULT_ELIGIBILITY, TASKS, Task, get_task

log = logging.getLogger(__name__)

FORMAT = "bonescreen-model"
FORMAT_VERSION = 3
#: Versions load_artifact reads; 1 has no ``ood`` part, 2 a penultimate-only one (still scored).
READABLE_VERSIONS = (1, 2, 3)
OOD_FIT_HINT = ("fit one with `bonescreen ood fit MODEL --manifest MANIFEST --cache DIR --out NEW.pt` "
                "(a new file; the input is never changed)")

#: task -> class names (the registry's, bonescreen.tasks; kept for callers that read the table)
TASK_CLASSES: dict[str, list[str]] = {name: list(t.class_names) for name, t in TASKS.items()}


@dataclass
class ModelSpec:
    """Everything besides the weights that ``screen`` needs to use a model."""

    arch: str
    task: str = "stage2"
    num_classes: int = 2
    in_chans: int = 1
    class_names: list[str] = field(default_factory=lambda: list(TASK_CLASSES["stage2"]))
    positive_class: int = 1
    preprocess: dict[str, Any] = field(
        default_factory=lambda: {
            "method": "truncation",
            "size": 512,
            "mean": GRAY_MEAN,
            "std": GRAY_STD,
        }
    )
    threshold: float = 0.5
    eligibility: dict[str, Any] = field(default_factory=lambda: dict(ADULT_ELIGIBILITY))
    model_card: dict[str, Any] = field(default_factory=dict)
    # task-specific facts the model cannot run without (pediatric: clinical
    # feature order and standardisation, residual SD of the predicted Z)
    extra: dict[str, Any] = field(default_factory=dict)
    # out-of-distribution model (bonescreen.ood.OODModel.to_dict): None when not fitted
    ood: dict[str, Any] | None = None
    # named site profiles (bonescreen.adapt.profile): recalibration, operating point, abstain band,
    # label-free adaptation learnt at one hospital; JSON-able dicts, each bound to these weights by
    # its ``model_fingerprint``. Absent in older artifacts (loads as no profiles).
    site_profiles: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def for_task(cls, arch: str, task: str, **kwargs: Any) -> "ModelSpec":
        names = get_task(task).class_names  # UnknownTaskError (a ModelArtifactError) names the known tasks
        return cls(arch=arch, task=task, num_classes=len(names), class_names=list(names), **kwargs)


def save_artifact(path: str | Path, model: nn.Module, spec: ModelSpec) -> Path:
    """Write atomically, so an interrupted save never leaves a truncated artifact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "bonescreen_version": __version__,
        **asdict(spec),
        "state_dict": {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()},
    }
    atomic_torch_save(payload, path)
    return path


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DDP / DataParallel


def weights_fingerprint(model_or_state: nn.Module | dict[str, torch.Tensor]) -> str:
    """sha256 over the weights (names, dtypes, shapes, bytes): which weights an OOD part belongs to."""
    state = model_or_state if isinstance(model_or_state, dict) else _unwrap(model_or_state).state_dict()
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class LoadedModel:
    """A model ready for inference: takes preprocessed uint8 images, returns probabilities."""

    def __init__(self, model: nn.Module, spec: ModelSpec, path: Path | None = None,
                 format_version: int = FORMAT_VERSION) -> None:
        self.model = model.eval()
        self.spec = spec
        self.path = path
        self.format_version = format_version
        self._fingerprint: str | None = None
        self._layout: list[dict[str, Any]] | None = None

    @property
    def task(self) -> Task:
        """The registered task of this model (``bonescreen.tasks``)."""
        return get_task(self.spec.task)

    @property
    def fingerprint(self) -> str:
        """:func:`weights_fingerprint` of the loaded weights (computed once)."""
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self.model)
        return self._fingerprint

    @torch.inference_mode()
    def features(self, images: np.ndarray, device: str | torch.device = "cpu") -> np.ndarray:
        """Features ``(N, D)`` float32 (:mod:`bonescreen.features`): penultimate + per-stage statistics.

        What the OOD model scores; :meth:`feature_layout` names the blocks.
        """
        return self.predict_with_features(images, device)[1]

    def feature_layout(self) -> list[dict[str, Any]]:
        """The blocks of :meth:`features` (``bonescreen.features.feature_layout``), computed once."""
        if self._layout is None:
            from bonescreen.features import feature_layout

            self._layout = feature_layout(self.model, self.size, int(self.spec.in_chans))
        return self._layout

    @torch.inference_mode()
    def predict_with_features(self, images: np.ndarray, device: str | torch.device = "cpu"
                              ) -> tuple[np.ndarray | None, np.ndarray]:
        """(probabilities or None for pediatric models, features) from one forward pass."""
        from bonescreen.features import forward_with_features

        x = self.to_tensor(images).to(device)
        logits, feats = forward_with_features(self.model.to(device), x, logits=self.task.has_logits)
        probs = None if logits is None else torch.softmax(logits, dim=1).cpu().numpy()
        return probs, feats.cpu().numpy()

    @property
    def size(self) -> int:
        return int(self.spec.preprocess["size"])

    def scoring_module(self) -> nn.Module:
        """The classifier as one module: float ``(N, H, W)`` in 0..255 -> (probabilities, features).

        Mirrors :meth:`predict_with_features` (normalisation and softmax inside), so the ONNX
        export, the OpenVINO graph and the torch backends (bf16, channels_last, ``torch.compile``,
        CUDA) all run the same computation as the eager reference.
        """
        if not self.task.single_input:
            raise ModelArtifactError(f"a {self.spec.task} model takes the image and the clinical variables; "
                                     "it has no single-input scoring graph")
        return ScoringGraph(self.model, float(self.spec.preprocess["mean"]), float(self.spec.preprocess["std"]))

    def to_tensor(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (N, H, W) in 0..255 -> normalised float (N, 1, H, W)."""
        x = torch.as_tensor(np.asarray(images), dtype=torch.float32)
        if x.ndim == 2:
            x = x[None]
        x = x[:, None] / 255.0
        return (x - float(self.spec.preprocess["mean"])) / float(self.spec.preprocess["std"])

    @torch.inference_mode()
    def predict_pediatric(
        self, images: np.ndarray, clinical: np.ndarray, device: str | torch.device = "cpu"
    ) -> dict[str, np.ndarray]:
        """Pediatric models: predicted Z, BMD and P(low BMD) from images and raw clinical rows.

        ``clinical`` is ``(N, 4)``: age (years), sex (F=1, M=0), height (cm),
        weight (kg); see :func:`bonescreen.pediatric.predict_pediatric` for a
        DataFrame front end that tolerates missing values.
        """
        return self.task.predict_clinical(self, images, clinical, device)

    @torch.inference_mode()
    def predict_proba(self, images: np.ndarray, device: str | torch.device = "cpu") -> np.ndarray:
        x = self.to_tensor(images).to(device)
        logits = self.model.to(device)(x).float()
        return torch.softmax(logits, dim=1).cpu().numpy()

    def score(self, images: np.ndarray, device: str | torch.device = "cpu") -> np.ndarray:
        """Probability of the positive class (binary tasks)."""
        return self.predict_proba(images, device)[:, self.spec.positive_class]


class ScoringGraph(nn.Module):
    """uint8-valued float (N, H, W) -> (probabilities, multi-layer features); see LoadedModel.scoring_module."""

    def __init__(self, net: nn.Module, mean: float, std: float) -> None:
        super().__init__()
        self.net = net
        self.mean = mean
        self.std = std

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from bonescreen.features import forward_with_features

        x = (image.unsqueeze(1) / 255.0 - self.mean) / self.std
        logits, feats = forward_with_features(self.net, x)
        return torch.softmax(logits.float(), dim=1), feats  # type: ignore[union-attr]


def load_artifact(
    path: str | os.PathLike[str], *, expected_task: str | None = None, device: str = "cpu"
) -> LoadedModel:
    """Load and validate an artifact; refuse corrupt files, other versions and other tasks."""
    path = Path(path)
    if not path.is_file():
        raise ModelArtifactError(f"model artifact not found: {path}")
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise ModelArtifactError(f"{path} is not a readable bonescreen model artifact: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelArtifactError(f"{path} is not a bonescreen model artifact")
    version = payload.get("format_version")
    if version not in READABLE_VERSIONS:
        raise ModelArtifactError(
            f"{path} has artifact format version {version}; this bonescreen "
            f"({__version__}) reads versions {', '.join(map(str, READABLE_VERSIONS))}"
        )
    if version == 1:
        log.warning("%s is artifact format version 1: it has no out-of-distribution model, so `screen` "
                    "refuses it unless told --ood off; %s", path.name, OOD_FIT_HINT)
        payload.pop("ood", None)
    elif version == 2 and payload.get("ood"):
        log.warning("%s is artifact format version 2: its out-of-distribution model reads the penultimate "
                    "features only and has no flag band (it let non-chest images through in the benchmark); "
                    "for the multi-layer check %s", path.name, OOD_FIT_HINT)
    fields = {k: payload[k] for k in ModelSpec.__dataclass_fields__ if k in payload}
    try:
        spec = ModelSpec(**fields)
    except TypeError as exc:
        raise ModelArtifactError(f"{path}: incomplete model description: {exc}") from exc
    if expected_task is not None and spec.task != expected_task:
        raise ModelArtifactError(
            f"{path} is a {spec.task!r} model but a {expected_task!r} model was expected"
        )
    model = get_task(spec.task).build_model(spec)
    try:
        model.load_state_dict(payload["state_dict"])
    except (KeyError, RuntimeError) as exc:
        raise ModelArtifactError(f"{path}: weights do not fit {spec.arch}: {exc}") from exc
    return LoadedModel(model.to(device), spec, path, format_version=int(version))
