"""Out-of-distribution (OOD) score from the model's own features, several layers deep.

A model trained on frontal adult chest radiographs returns a confident
probability for anything it is shown: a CT slice, a knee, a scanned page. The
OOD part says how far an image's features lie from those of the images the
model was trained on; past a refusal threshold the image is refused, in a
band below it the image is scored but flagged for review.

Method (chosen by measurement, ``bench/bench_ood.py``; README "Out-of-distribution
check"): **per-block Mahalanobis distances, combined by their maximum** (the
feature-ensemble form of Lee et al. 2018). The features (``LoadedModel.features``,
:mod:`bonescreen.features`) are the penultimate embedding plus, for each backbone
stage, the channel means and standard deviations of its output. One Gaussian per
block with a Ledoit-Wolf shrunk covariance (scikit-learn) on the training split:
the penultimate block L2-normalised and class-conditional (smallest distance to a
class mean), the stage blocks (:func:`select_blocks`: the deeper half of the
stages) raw and one-class. Each block's distance is divided by its median on the
tuning split, and an image's distance is the largest block distance: a distilled
student's penultimate layer let knee-like shapes and a real tibia through that its
stage-3/4 statistics place far outside.

Thresholds (:func:`fit_ood`), on the tuning split (images the fit did not see) and
on acquisition-augmented tuning copies (:func:`acquisition_augmentation`: other
detector responses, contrast, collimation): refuse above the larger of the tuning
split's ``quantile`` (0.995) and the augmented copies' ``aug_quantile`` (0.99);
flag above the larger of the tuning ``quantile`` and the augmented copies'
``flag_quantile`` (0.9). Pediatric (regression) models have one "class".

Stored in the artifact under ``ood`` (:meth:`OODModel.to_dict`, artifact format 3):
the blocks (name, columns, means and precision as tensors, scale), thresholds,
quantiles and the fingerprint of the weights the statistics were fitted for
(``artifact.weights_fingerprint``), so an OOD part copied onto other weights is
detected and refused instead of silently giving meaningless distances. A format-2
part (``method`` ``mahalanobis``: the penultimate block alone, no flag band) still
scores, with a warning naming ``bonescreen ood fit``.
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
    "DEFAULT_AUG_QUANTILE",
    "DEFAULT_FLAG_QUANTILE",
    "DEFAULT_QUANTILE",
    "GaussianBlock",
    "OOD_METHODS",
    "OODError",
    "OODModel",
    "attach_ood",
    "check_ood_part",
    "fit_ood",
    "image_features",
    "select_blocks",
]

log = logging.getLogger(__name__)

OOD_METHODS = ("mahalanobis", "mahalanobis_multi")
PENULTIMATE = "penultimate"  # bonescreen.features.PENULTIMATE (not imported: no torch at import)
#: Refusal threshold: this quantile of the tuning split's scores (0.995: about 1 in 200
#: in-distribution images is refused; raise it to refuse fewer, at the cost of letting
#: near-distribution images through).
DEFAULT_QUANTILE = 0.995
#: Below this many tuning images the quantile is a poor estimate: the threshold is then
#: the largest tuning score, widened by the spread of the scores (see fit_ood).
MIN_TUNE_FOR_QUANTILE = 50
#: Acquisition-augmented copies of each tuning image (acquisition_augmentation): chest
#: radiographs as other scanners would render them. The refusal threshold is also at least
#: their AUG_QUANTILE quantile (at most 1 % of such images refused), the flag threshold at
#: least their FLAG_QUANTILE quantile (at most 10 % flagged or refused). 0 copies: no band.
DEFAULT_AUGMENT_COPIES = 4
DEFAULT_AUG_QUANTILE = 0.99
DEFAULT_FLAG_QUANTILE = 0.9


class OODError(BonescreenError):
    """The model has no usable OOD part (absent, or fitted for other weights)."""

    reason = "ood_unavailable"


def _normalise(features: np.ndarray) -> np.ndarray:
    f = np.asarray(features, dtype=np.float64)
    n = np.linalg.norm(f, axis=1, keepdims=True)
    unit: np.ndarray = f / np.maximum(n, 1e-12)
    return unit


def select_blocks(layout: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The feature blocks the OOD part models: the penultimate block + the deeper half of the stages.

    Stage ``k`` of ``n`` is used when ``k > n // 2`` (stages 3-5 of an EfficientNet's 5), both its
    channel means and its channel standard deviations. Chosen on the dev half of the benchmark
    battery (README): the early stages' statistics follow the detector's look (they refused up to
    half of another vendor's chests), the deeper ones follow content.
    """
    stages = sorted({int(b["name"][5:].split("_")[0]) for b in layout if str(b["name"]).startswith("stage")})
    deep = {k for k in stages if k > len(stages) // 2}
    out = []
    for b in layout:
        name = str(b["name"])
        if name == PENULTIMATE or (name.startswith("stage") and int(name[5:].split("_")[0]) in deep):
            out.append({"name": name, "start": int(b["start"]), "stop": int(b["stop"])})
    if not out or out[0]["name"] != PENULTIMATE:
        raise OODError("the feature layout has no penultimate block first")
    return out


@dataclass
class GaussianBlock:
    """One feature block's Gaussian: class means + shared shrunk precision, distances in tuning-median units.

    ``normalise``: L2-normalise the block first (the penultimate embedding, whose direction
    carries the class information); stage statistics are modelled raw (their magnitude is
    what departs for a non-chest image).
    """

    name: str
    start: int
    stop: int
    means: np.ndarray  # (C, D)
    precision: np.ndarray  # (D, D)
    normalise: bool = True
    scale: float = 1.0  # the tuning split's median distance: block distances are comparable
    shrinkage: float = 0.0

    def raw_distance(self, features: np.ndarray) -> np.ndarray:
        f = np.asarray(features, dtype=np.float64)
        if f.shape[1] < self.stop:
            raise OODError(f"features have {f.shape[1]} dimensions; the OOD block {self.name!r} needs "
                           f"columns {self.start}-{self.stop}")
        x = f[:, self.start:self.stop]
        if self.normalise:
            x = _normalise(x)
        out = np.full(len(x), np.inf)
        for mu in self.means:
            d = x - mu
            out = np.minimum(out, np.einsum("nd,de,ne->n", d, self.precision, d))
        dist: np.ndarray = np.sqrt(np.maximum(out, 0.0))
        return dist

    def distance(self, features: np.ndarray) -> np.ndarray:
        return self.raw_distance(features) / self.scale

    def to_dict(self) -> dict[str, Any]:
        import torch

        return {"name": self.name, "start": int(self.start), "stop": int(self.stop),
                "means": torch.as_tensor(self.means, dtype=torch.float64),
                "precision": torch.as_tensor(self.precision, dtype=torch.float32),
                "normalise": bool(self.normalise), "scale": float(self.scale), "shrinkage": float(self.shrinkage)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GaussianBlock:
        means = np.asarray(_np(d["means"]), dtype=np.float64)
        precision = np.asarray(_np(d["precision"]), dtype=np.float64)
        block = cls(name=str(d["name"]), start=int(d["start"]), stop=int(d["stop"]), means=means,
                    precision=precision, normalise=bool(d.get("normalise", True)), scale=float(d.get("scale", 1.0)),
                    shrinkage=float(d.get("shrinkage", 0.0)))
        if (means.ndim != 2 or means.shape[1] != block.stop - block.start
                or precision.shape != (means.shape[1], means.shape[1]) or block.scale <= 0):
            raise OODError(f"the artifact's OOD block {block.name!r} has inconsistent shapes or scale")
        return block


def _fit_block(f: np.ndarray, labels: np.ndarray, spec: dict[str, Any], normalise: bool) -> GaussianBlock:
    from sklearn.covariance import LedoitWolf

    x = np.asarray(f[:, spec["start"]:spec["stop"]], dtype=np.float64)
    if normalise:
        x = _normalise(x)
    classes = np.unique(labels)
    means = np.stack([x[labels == c].mean(axis=0) for c in classes])
    centred = np.concatenate([x[labels == c] - means[k] for k, c in enumerate(classes)])
    lw = LedoitWolf(assume_centered=True).fit(centred)
    return GaussianBlock(name=spec["name"], start=spec["start"], stop=spec["stop"], means=means,
                         precision=np.asarray(lw.precision_), normalise=normalise, shrinkage=float(lw.shrinkage_))


@dataclass
class OODModel:
    """Per-block Gaussians, their combined score, and the refuse / flag thresholds.

    Combined distance: the **maximum** over the blocks of each block's Mahalanobis
    distance in units of its tuning median (an image is as far out as its farthest
    block). ``threshold`` refuses; ``flag_threshold`` (<= threshold) starts the flag
    band: images between the two are scored but marked ``ood_borderline`` for review.
    """

    blocks: list[GaussianBlock]
    threshold: float
    quantile: float
    weights_fingerprint: str
    flag_threshold: float | None = None
    method: str = "mahalanobis_multi"
    estimator: str = "ledoit_wolf"
    n_fit: int = 0  # training images (originals)
    n_tune: int = 0  # tuning images (originals)
    augment_copies: int = 0  # acquisition-augmented copies of each tuning image for the thresholds
    aug_quantile: float = 0.0  # the refusal threshold is at least this quantile of theirs
    flag_quantile: float = 0.0  # ... and the flag threshold at least this one
    fitted: str = ""

    @property
    def feature_dim(self) -> int:
        """Feature columns the model reads (the blocks' last column)."""
        return max(b.stop for b in self.blocks)

    @property
    def legacy(self) -> bool:
        """A format-2 part: the penultimate block alone, no flag band (refit with `bonescreen ood fit`)."""
        return self.method == "mahalanobis"

    @property
    def flag_ratio(self) -> float:
        """The flag threshold in ``score`` units (1.0: no flag band)."""
        if self.flag_threshold is None:
            return 1.0
        return float(min(self.flag_threshold, self.threshold) / self.threshold)

    def block_distances(self, features: np.ndarray) -> dict[str, np.ndarray]:
        return {b.name: b.distance(features) for b in self.blocks}

    def distance(self, features: np.ndarray) -> np.ndarray:
        """Combined distance ``(N,)``: the largest block distance."""
        combined: np.ndarray = np.max(np.stack([b.distance(features) for b in self.blocks]), axis=0)
        return combined

    def score(self, features: np.ndarray) -> np.ndarray:
        """Distance / refusal threshold: 1.0 is the refusal threshold, whatever the model."""
        return self.distance(features) / self.threshold

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method, "estimator": self.estimator, "combine": "max",
            "blocks": [b.to_dict() for b in self.blocks],
            "threshold": float(self.threshold), "quantile": float(self.quantile),
            "flag_threshold": None if self.flag_threshold is None else float(self.flag_threshold),
            "feature_dim": self.feature_dim, "weights_fingerprint": self.weights_fingerprint,
            "n_fit": int(self.n_fit), "n_tune": int(self.n_tune), "augment_copies": int(self.augment_copies),
            "aug_quantile": float(self.aug_quantile), "flag_quantile": float(self.flag_quantile),
            "fitted": self.fitted,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OODModel:
        method = str(d.get("method", ""))
        if method not in OOD_METHODS:
            raise OODError(f"unknown OOD method {method!r}; this bonescreen knows {', '.join(OOD_METHODS)}")
        try:
            if method == "mahalanobis":  # format 2: one penultimate block, distances unscaled
                means = np.asarray(_np(d["means"]), dtype=np.float64)
                blocks = [GaussianBlock.from_dict({"name": PENULTIMATE, "start": 0, "stop": means.shape[1],
                                                   "means": means, "precision": d["precision"], "normalise": True,
                                                   "scale": 1.0, "shrinkage": d.get("shrinkage", 0.0)})]
                feature_dim: Any = d.get("feature_dim", means.shape[1])
                if int(feature_dim) != means.shape[1]:
                    raise OODError("the artifact's OOD part names another feature dimension than its statistics")
            else:
                blocks = [GaussianBlock.from_dict(b) for b in d["blocks"]]
            flag = d.get("flag_threshold")
            model = cls(blocks=blocks, threshold=float(d["threshold"]), quantile=float(d["quantile"]),
                        weights_fingerprint=str(d["weights_fingerprint"]),
                        flag_threshold=None if flag is None else float(flag), method=method,
                        estimator=str(d.get("estimator", "")), n_fit=int(d.get("n_fit", 0)),
                        n_tune=int(d.get("n_tune", 0)), augment_copies=int(d.get("augment_copies", 0)),
                        aug_quantile=float(d.get("aug_quantile", 0.0)),
                        flag_quantile=float(d.get("flag_quantile", 0.0)), fitted=str(d.get("fitted", "")))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise OODError(f"the artifact's OOD part is incomplete: {exc}") from exc
        if not blocks or model.threshold <= 0 or (model.flag_threshold is not None and model.flag_threshold <= 0):
            raise OODError("the artifact's OOD part has no blocks or a non-positive threshold")
        return model


def _np(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def _tune_threshold(ref: np.ndarray, quantile: float) -> float:
    if len(ref) >= MIN_TUNE_FOR_QUANTILE:
        return float(np.quantile(ref, quantile))
    return float(ref.max() + (ref.std() if len(ref) > 1 else 0.1 * ref.max()))


def fit_ood(
    train_features: np.ndarray,
    train_labels: Sequence[int] | np.ndarray | None,
    tune_features: np.ndarray,
    *,
    weights_fingerprint: str,
    layout: Sequence[dict[str, Any]] | None = None,
    quantile: float = DEFAULT_QUANTILE,
    aug_tune_features: np.ndarray | None = None,
    aug_quantile: float = DEFAULT_AUG_QUANTILE,
    flag_quantile: float = DEFAULT_FLAG_QUANTILE,
) -> OODModel:
    """Fit one Gaussian per feature block on training features; thresholds on tuning features.

    ``layout`` (``LoadedModel.feature_layout()``) names the blocks; None: the whole vector is one
    penultimate block. The penultimate block is class-conditional on ``train_labels`` (None: one
    class, regression models); stage blocks are one class. Each block's distances are divided by
    their tuning median, and an image's distance is the largest of them.

    Thresholds on that distance: the tuning part is the ``quantile`` of the tuning distances (with
    fewer than ``MIN_TUNE_FOR_QUANTILE`` tuning images, their largest plus their standard
    deviation). The refusal threshold is at least the ``aug_quantile`` of the
    acquisition-augmented tuning copies' distances, the flag threshold at least their
    ``flag_quantile`` (kept at or below the refusal threshold). Without augmented copies both are
    the tuning part (no flag band).
    """
    if not 0.5 <= quantile < 1.0:
        raise OODError(f"quantile must be in [0.5, 1); got {quantile}")
    for name, q in (("aug_quantile", aug_quantile), ("flag_quantile", flag_quantile)):
        if not 0.5 <= q <= 1.0:
            raise OODError(f"{name} must be in [0.5, 1]; got {q}")
    f = np.asarray(train_features, dtype=np.float64)
    if len(f) < 2:
        raise OODError("at least two training images are needed to fit the OOD model")
    specs = select_blocks(layout) if layout is not None else [{"name": PENULTIMATE, "start": 0, "stop": f.shape[1]}]
    labels = np.zeros(len(f), int) if train_labels is None else np.asarray(train_labels, int)
    one = np.zeros(len(f), int)
    blocks = [_fit_block(f, labels if s["name"] == PENULTIMATE else one, s, s["name"] == PENULTIMATE) for s in specs]
    tune = np.asarray(tune_features, dtype=np.float64)
    if not len(tune):
        log.warning("no tuning images: the OOD threshold is set on the training images (too tight)")
    ref_f = tune if len(tune) else f
    for b in blocks:
        b.scale = max(float(np.median(b.raw_distance(ref_f))), 1e-9)
    model = OODModel(blocks=blocks, threshold=1.0, quantile=float(quantile), weights_fingerprint=weights_fingerprint,
                     n_fit=len(f), n_tune=int(len(tune)),
                     fitted=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    base = max(_tune_threshold(model.distance(ref_f), quantile), 1e-9)
    refuse, flag = base, base
    if aug_tune_features is not None and len(aug_tune_features):
        d_aug = model.distance(aug_tune_features)
        refuse = max(base, float(np.quantile(d_aug, aug_quantile)))
        flag = min(refuse, max(base, float(np.quantile(d_aug, flag_quantile))))
        model.aug_quantile, model.flag_quantile = float(aug_quantile), float(flag_quantile)
    model.threshold, model.flag_threshold = refuse, flag
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
    return ood  # a format-2 (legacy) part scores too; load_artifact warned about it


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
    img: np.ndarray = np.round(x * 255).astype(np.uint8)
    return img


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
    flag_quantile: float = DEFAULT_FLAG_QUANTILE,
    seed: int = 0,
) -> tuple[Path, OODModel]:
    """Fit the OOD part for an artifact's weights and write the artifact with it (current format version).

    The Gaussians are fitted on the training images' feature blocks; the thresholds come from
    the tuning images and ``augment_copies`` acquisition-augmented copies of each (fit_ood).
    ``out`` None rewrites ``artifact`` (what training does with its own fresh file);
    ``bonescreen ood fit`` always passes a new path.
    """
    import torch

    from bonescreen.artifact import FORMAT_VERSION, load_artifact
    from bonescreen.fsio import atomic_torch_save

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
    ood = fit_ood(f_train, labels, f_tune, weights_fingerprint=loaded.fingerprint, layout=loaded.feature_layout(),
                  quantile=quantile, aug_tune_features=f_aug, aug_quantile=aug_quantile, flag_quantile=flag_quantile)
    ood.n_fit, ood.n_tune = len(train_source), len(tune_source)
    ood.augment_copies = int(augment_copies) if f_aug is not None else 0
    payload = torch.load(src, map_location="cpu", weights_only=True)
    payload["format_version"] = FORMAT_VERSION
    payload["ood"] = ood.to_dict()
    dest = Path(out) if out is not None else src
    atomic_torch_save(payload, dest)
    log.info("OOD model (%d feature blocks) fitted on %d training images; refuse above %.4g, flag above %.4g "
             "(%d tuning images)", len(ood.blocks), ood.n_fit, ood.threshold, ood.flag_threshold, ood.n_tune)
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
    flag_quantile: float = DEFAULT_FLAG_QUANTILE,
) -> tuple[Path, OODModel]:
    """``bonescreen ood fit``: an existing artifact (format 1, 2 or 3) + its cohort manifest -> a new v3 file.

    Fitted on the manifest's ``train`` split (class-conditional for classifiers, by the
    model task's label), threshold on its ``tune`` split, as training does. The input
    file is never changed: ``out`` must be another path.
    """
    import shutil
    import tempfile

    import torch

    from bonescreen.artifact import load_artifact
    from bonescreen.fsio import atomic_torch_save
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
    regression = loaded.task.regression  # no classes: one Gaussian instead of one per class
    if regression:
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
    labels = None if regression else preps["train"].frame["_y"].to_numpy()
    # fit into a temporary copy, then move it to ``out``: the input file is only read
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        work = Path(tmp) / src.name
        shutil.copyfile(src, work)
        _, ood = attach_ood(work, preps["train"].source, labels, preps["tune"].source, quantile=quantile,
                            augment_copies=augment_copies, aug_quantile=aug_quantile, flag_quantile=flag_quantile)
        atomic_torch_save(torch.load(work, map_location="cpu", weights_only=True), dest)
    return dest, ood
