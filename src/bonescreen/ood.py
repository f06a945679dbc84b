"""Out-of-distribution (OOD) score from the model's own penultimate features.

A model trained on frontal adult chest radiographs returns a confident
probability for anything it is shown: a CT slice, a knee, a scanned page. The
OOD part says how far an image's features lie from those of the images the
model was trained on, and refuses it past a threshold.

Method (chosen by measurement, ``bench/bench_ood.py``; README "Out-of-distribution
check"): **class-conditional Gaussian with a shared, shrunk covariance** (the
Mahalanobis detector of Lee et al. 2018). On the training split's features
``f`` (``LoadedModel.features``, L2-normalised), one mean per class and one
covariance estimated with Ledoit-Wolf shrinkage (scikit-learn; ``D`` features
from a few hundred images need shrinkage to be invertible). The score of an
image is its smallest Mahalanobis distance to a class mean. The refusal
threshold is the ``quantile`` (default 0.995) of the **tuning** split's scores
(images the fit did not see, so the threshold is not set on memorised
features), or, if larger, the ``aug_quantile`` (default 0.9) of the scores of
acquisition-augmented tuning copies (:func:`acquisition_augmentation`: other
detector responses, contrast, collimation): a threshold from one site's tuning
images alone refused up to 23 % of another vendor's chest radiographs in the
benchmark. Pediatric (regression) models have one "class". Other candidates
(energy, max softmax, feature norm, raw-feature and OAS variants, PCA
subspaces, fitting on augmented images) were measured and lost
(``bench/bench_ood.py``; README).

Stored in the artifact under ``ood`` (:meth:`OODModel.to_dict`): method,
means and precision as tensors, threshold, quantile, feature dimension, and
the fingerprint of the weights the statistics were fitted for
(``artifact.weights_fingerprint``), so an OOD part copied onto other weights
is detected and refused instead of silently giving meaningless distances.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bonescreen.errors import BonescreenError

__all__ = [
    "DEFAULT_QUANTILE",
    "OOD_METHODS",
    "OODError",
    "OODModel",
    "attach_ood",
    "check_ood_part",
    "fit_ood",
    "image_features",
]

log = logging.getLogger(__name__)

OOD_METHODS = ("mahalanobis",)
#: Refusal threshold: this quantile of the tuning split's scores (0.995: about 1 in 200
#: in-distribution images is refused; raise it to refuse fewer, at the cost of letting
#: near-distribution images through).
DEFAULT_QUANTILE = 0.995
#: Below this many tuning images the quantile is a poor estimate: the threshold is then
#: the largest tuning score, widened by the spread of the scores (see fit_ood).
MIN_TUNE_FOR_QUANTILE = 50
#: Acquisition-augmented copies of each tuning image (acquisition_augmentation): chest
#: radiographs as other scanners would render them. The threshold is also at least their
#: AUG_QUANTILE quantile, so at most 1 - AUG_QUANTILE of such images are refused. 0 turns it off.
DEFAULT_AUGMENT_COPIES = 4
DEFAULT_AUG_QUANTILE = 0.9


class OODError(BonescreenError):
    """The model has no usable OOD part (absent, or fitted for other weights)."""

    reason = "ood_unavailable"


def _normalise(features: np.ndarray) -> np.ndarray:
    f = np.asarray(features, dtype=np.float64)
    n = np.linalg.norm(f, axis=1, keepdims=True)
    return f / np.maximum(n, 1e-12)


@dataclass
class OODModel:
    """Class means + shared precision of normalised features, and the refusal threshold."""

    means: np.ndarray  # (C, D)
    precision: np.ndarray  # (D, D)
    threshold: float
    quantile: float
    weights_fingerprint: str
    method: str = "mahalanobis"
    estimator: str = "ledoit_wolf"
    shrinkage: float = 0.0
    n_fit: int = 0  # training images (originals)
    n_tune: int = 0  # tuning images (originals)
    augment_copies: int = 0  # acquisition-augmented copies of each tuning image for the threshold
    aug_quantile: float = 0.0  # ... and their quantile the threshold is at least
    fitted: str = ""

    @property
    def feature_dim(self) -> int:
        return int(self.means.shape[1])

    def distance(self, features: np.ndarray) -> np.ndarray:
        """Smallest Mahalanobis distance to a class mean, ``(N,)``."""
        f = _normalise(features)
        if f.shape[1] != self.feature_dim:
            raise OODError(f"features have {f.shape[1]} dimensions; the OOD model was fitted on {self.feature_dim}")
        out = np.full(len(f), np.inf)
        for mu in self.means:
            d = f - mu
            out = np.minimum(out, np.einsum("nd,de,ne->n", d, self.precision, d))
        return np.sqrt(np.maximum(out, 0.0))

    def score(self, features: np.ndarray) -> np.ndarray:
        """Distance / threshold: 1.0 is the refusal threshold, whatever the model."""
        return self.distance(features) / self.threshold

    def to_dict(self) -> dict[str, Any]:
        import torch

        return {
            "method": self.method, "estimator": self.estimator, "shrinkage": float(self.shrinkage),
            "means": torch.as_tensor(self.means, dtype=torch.float64),
            "precision": torch.as_tensor(self.precision, dtype=torch.float32),
            "threshold": float(self.threshold), "quantile": float(self.quantile),
            "feature_dim": self.feature_dim, "weights_fingerprint": self.weights_fingerprint,
            "n_fit": int(self.n_fit), "n_tune": int(self.n_tune), "augment_copies": int(self.augment_copies),
            "aug_quantile": float(self.aug_quantile),
            "fitted": self.fitted,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OODModel:
        method = str(d.get("method", ""))
        if method not in OOD_METHODS:
            raise OODError(f"unknown OOD method {method!r}; this bonescreen knows {', '.join(OOD_METHODS)}")
        try:
            means = np.asarray(_np(d["means"]), dtype=np.float64)
            precision = np.asarray(_np(d["precision"]), dtype=np.float64)
            model = cls(means=means, precision=precision, threshold=float(d["threshold"]),
                        quantile=float(d["quantile"]), weights_fingerprint=str(d["weights_fingerprint"]),
                        method=method, estimator=str(d.get("estimator", "")), shrinkage=float(d.get("shrinkage", 0)),
                        n_fit=int(d.get("n_fit", 0)), n_tune=int(d.get("n_tune", 0)),
                        augment_copies=int(d.get("augment_copies", 0)),
                        aug_quantile=float(d.get("aug_quantile", 0.0)), fitted=str(d.get("fitted", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise OODError(f"the artifact's OOD part is incomplete: {exc}") from exc
        if means.ndim != 2 or precision.shape != (means.shape[1], means.shape[1]) or model.threshold <= 0:
            raise OODError("the artifact's OOD part has inconsistent shapes or a non-positive threshold")
        if int(d.get("feature_dim", means.shape[1])) != means.shape[1]:
            raise OODError("the artifact's OOD part names another feature dimension than its statistics")
        return model


def _np(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def fit_ood(
    train_features: np.ndarray,
    train_labels: Sequence[int] | np.ndarray | None,
    tune_features: np.ndarray,
    *,
    weights_fingerprint: str,
    quantile: float = DEFAULT_QUANTILE,
    aug_tune_features: np.ndarray | None = None,
    aug_quantile: float = DEFAULT_AUG_QUANTILE,
) -> OODModel:
    """Fit the class-conditional Gaussian on training features; threshold on tuning features.

    Threshold: the ``quantile`` of the tuning distances, or, when
    ``aug_tune_features`` (acquisition-augmented tuning images) are given and
    larger, their ``aug_quantile`` quantile. ``train_labels`` None: one class
    (regression models). With fewer than ``MIN_TUNE_FOR_QUANTILE`` tuning images
    the tuning part is the largest tuning score plus the tuning scores' standard
    deviation (a quantile of a handful of values is the maximum itself).
    """
    from sklearn.covariance import LedoitWolf

    if not 0.5 <= quantile < 1.0:
        raise OODError(f"quantile must be in [0.5, 1); got {quantile}")
    f = _normalise(train_features)
    if len(f) < 2:
        raise OODError("at least two training images are needed to fit the OOD model")
    labels = np.zeros(len(f), int) if train_labels is None else np.asarray(train_labels, int)
    classes = [c for c in np.unique(labels) if (labels == c).sum() >= 1]
    means = np.stack([f[labels == c].mean(axis=0) for c in classes])
    centred = np.concatenate([f[labels == c] - means[k] for k, c in enumerate(classes)])
    lw = LedoitWolf(assume_centered=True).fit(centred)
    model = OODModel(means=means, precision=np.asarray(lw.precision_), threshold=1.0, quantile=float(quantile),
                     weights_fingerprint=weights_fingerprint, shrinkage=float(lw.shrinkage_), n_fit=len(f),
                     n_tune=int(len(tune_features)),
                     fitted=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    ref = model.distance(tune_features) if len(tune_features) else model.distance(train_features)
    if not len(tune_features):
        log.warning("no tuning images: the OOD threshold is set on the training images (too tight)")
    if len(ref) >= MIN_TUNE_FOR_QUANTILE:
        model.threshold = float(np.quantile(ref, quantile))
    else:
        model.threshold = float(ref.max() + (ref.std() if len(ref) > 1 else 0.1 * ref.max()))
    if aug_tune_features is not None and len(aug_tune_features):
        if not 0.5 <= aug_quantile <= 1.0:
            raise OODError(f"aug_quantile must be in [0.5, 1]; got {aug_quantile}")
        model.threshold = max(model.threshold, float(np.quantile(model.distance(aug_tune_features), aug_quantile)))
    model.threshold = max(model.threshold, 1e-9)
    return model


def check_ood_part(spec: Any, fingerprint: Callable[[], str], name: str = "the model") -> OODModel:
    """The model's OOD part, validated; :class:`OODError` says what is wrong and how to fix it."""
    from bonescreen.artifact import OOD_FIT_HINT

    raw = getattr(spec, "ood", None)
    if not raw:
        raise OODError(f"{name} has no out-of-distribution model, so it cannot tell a chest radiograph from "
                       f"anything else; {OOD_FIT_HINT}, or screen with --ood off (recorded in every row)")
    ood = OODModel.from_dict(raw)
    have = fingerprint()
    if ood.weights_fingerprint != have:
        raise OODError(f"{name}'s out-of-distribution model was fitted for other weights "
                       f"({ood.weights_fingerprint[:12]} != {have[:12]}); {OOD_FIT_HINT}, or screen with --ood off")
    return ood


class _Arrays:
    """An in-memory stand-in for ``data.ImageSource`` (``len``, ``batch(indices)``)."""

    def __init__(self, images: np.ndarray) -> None:
        self.images = np.asarray(images)

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, indices: Any) -> np.ndarray:
        return self.images[list(indices)]


def acquisition_augmentation(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One preprocessed image (uint8) as another scanner might render it.

    Detector response (a log/linear-like curve ``(e^(a x) - 1) / (e^a - 1)``, a in [-3, 3],
    then a gamma in [0.6, 1.6]), contrast (x0.8-1.2) and brightness (+-0.08), collimation
    (black borders of 2-12 % on some sides, half the time) and a horizontal flip: the ways
    chest radiographs from other sites differ before any anatomy does. Used to set the
    threshold, not to fit the Gaussian (fitting on them moved non-chest images inside).
    """
    x = image.astype(np.float32) / 255.0
    a = rng.uniform(-3, 3)
    if abs(a) > 0.05:
        x = (np.exp(a * x) - 1) / (np.exp(a) - 1)
    x = np.power(x, rng.uniform(0.6, 1.6))
    x = np.clip((x - 0.5) * rng.uniform(0.8, 1.2) + 0.5 + rng.uniform(-0.08, 0.08), 0, 1)
    h, w = x.shape
    if rng.random() < 0.5:
        for side in range(4):
            if rng.random() < 0.5:
                k = max(1, int(rng.uniform(0.02, 0.12) * (h if side < 2 else w)))
                if side == 0:
                    x[:k] = 0
                elif side == 1:
                    x[-k:] = 0
                elif side == 2:
                    x[:, :k] = 0
                else:
                    x[:, -k:] = 0
    if rng.random() < 0.5:
        x = x[:, ::-1]
    return np.round(x * 255).astype(np.uint8)


class _Augmented:
    """``copies`` augmented versions of each image of a source, seeded (reproducible)."""

    def __init__(self, source: Any, copies: int, seed: int) -> None:
        self.source, self.copies, self.seed = source, int(copies), int(seed)
        self.n = len(source)

    def __len__(self) -> int:
        return self.n * self.copies

    def batch(self, indices: Any) -> np.ndarray:
        out = []
        for k in indices:
            img = self.source.batch([int(k) % self.n])[0]
            out.append(acquisition_augmentation(img, np.random.default_rng([self.seed, int(k)])))
        return np.stack(out)


def image_features(loaded: Any, source: Any, batch_size: int = 64) -> np.ndarray:
    """Features of every image of an ``ImageSource``-like object (``len``, ``batch(indices)``) or array."""
    if isinstance(source, np.ndarray):
        source = _Arrays(source)
    n = len(source)
    out = []
    for start in range(0, n, batch_size):
        out.append(loaded.features(source.batch(range(start, min(n, start + batch_size)))))
    return np.concatenate(out) if out else np.zeros((0, 1), np.float32)


def attach_ood(
    artifact: str | Path,
    train_source: Any,
    train_labels: Sequence[int] | np.ndarray | None,
    tune_source: Any,
    *,
    out: str | Path | None = None,
    quantile: float = DEFAULT_QUANTILE,
    augment_copies: int = DEFAULT_AUGMENT_COPIES,
    aug_quantile: float = DEFAULT_AUG_QUANTILE,
    seed: int = 0,
) -> tuple[Path, OODModel]:
    """Fit the OOD part for an artifact's weights and write the artifact with it (format version 2).

    The Gaussian is fitted on the training images; the threshold is the ``quantile`` of the
    tuning images' distances, or the ``aug_quantile`` of ``augment_copies`` acquisition-augmented
    copies of each tuning image, whichever is larger (fit_ood). ``out`` None rewrites ``artifact`` (what training does with its
    own fresh file); ``bonescreen ood fit`` always passes a new path.
    """
    import torch

    from bonescreen.artifact import FORMAT_VERSION, atomic_torch_save, load_artifact

    src = Path(artifact)
    loaded = load_artifact(src)
    if isinstance(train_source, np.ndarray):
        train_source = _Arrays(train_source)
    if isinstance(tune_source, np.ndarray):
        tune_source = _Arrays(tune_source)
    f_train, f_tune = image_features(loaded, train_source), image_features(loaded, tune_source)
    labels = None if train_labels is None else np.asarray(train_labels, int)
    f_aug = None
    ref = tune_source if len(tune_source) else train_source
    if augment_copies > 0 and len(ref):
        f_aug = image_features(loaded, _Augmented(ref, augment_copies, seed))
    ood = fit_ood(f_train, labels, f_tune, weights_fingerprint=loaded.fingerprint, quantile=quantile,
                  aug_tune_features=f_aug, aug_quantile=aug_quantile)
    ood.n_fit, ood.n_tune, ood.augment_copies = len(train_source), len(tune_source), int(augment_copies)
    ood.aug_quantile = float(aug_quantile) if f_aug is not None else 0.0
    payload = torch.load(src, map_location="cpu", weights_only=True)
    payload["format_version"] = FORMAT_VERSION
    payload["ood"] = ood.to_dict()
    dest = Path(out) if out is not None else src
    atomic_torch_save(payload, dest)
    log.info("OOD model fitted on %d training images; threshold %.4g (%.3f quantile of %d tuning images)",
             ood.n_fit, ood.threshold, ood.quantile, ood.n_tune)
    return dest, ood


def fit_ood_for_artifact(
    artifact: str | Path,
    manifest: str | Path | Sequence[str | Path],
    cache_root: str | Path,
    out: str | Path,
    *,
    quantile: float = DEFAULT_QUANTILE,
    overwrite: bool = False,
    progress: bool = True,
    augment_copies: int = DEFAULT_AUGMENT_COPIES,
    aug_quantile: float = DEFAULT_AUG_QUANTILE,
) -> tuple[Path, OODModel]:
    """``bonescreen ood fit``: an existing artifact (format 1 or 2) + its cohort manifest -> a new v2 file.

    Fitted on the manifest's ``train`` split (class-conditional for classifiers, by the
    model task's label), threshold on its ``tune`` split, as training does. The input
    file is never changed: ``out`` must be another path.
    """
    import shutil
    import tempfile

    import torch

    from bonescreen.artifact import atomic_torch_save, load_artifact
    from bonescreen.data import prepare_images, read_manifest, split_rows, task_labels

    src, dest = Path(artifact), Path(out)
    if dest.resolve() == src.resolve():
        raise OODError(f"--out must be a new file, not the input {src.name} (the input is never changed)")
    if dest.exists() and not overwrite:
        raise OODError(f"{dest} exists; pass --overwrite to replace it")
    import pandas as pd

    loaded = load_artifact(src)
    tables = [manifest] if isinstance(manifest, (str, Path)) else list(manifest)
    frame = pd.concat([read_manifest(m) for m in tables], ignore_index=True, sort=False)
    if "proxy" in frame.columns:  # proxy-labelled pool rows (pseudolabel's proxy.csv) are training rows
        frame.loc[pd.to_numeric(frame["proxy"], errors="coerce") == 1, "split"] = "train"
    task = str(loaded.spec.task)
    if task == "pediatric":
        labelled = frame.copy()
        labelled["_y"] = 0
    else:
        labelled = task_labels(frame, task)
    preps = {}
    for split in ("train", "tune"):
        rows = split_rows(labelled, split)
        preps[split] = prepare_images(rows, cache_root, loaded.size, workers=2, progress=progress)
    if preps["train"].frame.empty:
        raise OODError(f"{manifest}: no readable 'train' image to fit the OOD model on")
    labels = None if task == "pediatric" else preps["train"].frame["_y"].to_numpy()
    # fit into a temporary copy, then move it to ``out``: the input file is only read
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        work = Path(tmp) / src.name
        shutil.copyfile(src, work)
        _, ood = attach_ood(work, preps["train"].source, labels, preps["tune"].source, quantile=quantile,
                            augment_copies=augment_copies, aug_quantile=aug_quantile)
        atomic_torch_save(torch.load(work, map_location="cpu", weights_only=True), dest)
    return dest, ood
