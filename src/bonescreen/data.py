"""Training data: manifest rows -> preprocessed pixels -> augmented, normalised tensors.

Augmentation follows the paper's split: *weak* = horizontal flip (+ the
normalisation every input gets), *strong* = weak + Blur / MotionBlur /
MedianBlur, Affine (albumentations' replacement for ShiftScaleRotate),
GridDistortion / ElasticTransform / OpticalDistortion, RandomGamma and
GridDropout.

Every random draw of a sample comes from a generator seeded by
``(seed, epoch, index)``, so an epoch's images are the same whatever the
number of DataLoader workers or processes, and a resumed run sees exactly
the batches an uninterrupted one would.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler

from bonescreen.errors import TableError
from bonescreen.models import GRAY_MEAN, GRAY_STD
from bonescreen.site_shift import SiteShift

log = logging.getLogger(__name__)

#: Manifest column holding each task's integer label.
TASK_LABEL_COLUMN = {"stage2": "label", "stage1": "label_stage1", "three_class": "label_3class"}
AUGMENT_LEVELS = ("none", "weak", "strong")
_SHIFT_STREAM = 0x5173  # the site shift's own generator stream (see ManifestDataset._augment)


# --- manifest -----------------------------------------------------------------


def read_manifest(manifest: str | Path | pd.DataFrame) -> pd.DataFrame:
    """A manifest CSV or DataFrame with at least ``path``; ``image_id`` is filled in if absent."""
    if isinstance(manifest, pd.DataFrame):
        frame = manifest.copy()
    else:
        path = Path(manifest)
        if not path.is_file():
            raise TableError(f"manifest not found: {path}")
        try:
            frame = pd.read_csv(path, dtype={"image_id": str, "patient_id": str})
        except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
            raise TableError(f"{path}: not a readable CSV manifest: {exc}") from exc
        # A relative image path is looked up beside the manifest first (so a
        # cohort folder can move), then relative to the working directory.
        if "path" in frame.columns:
            base = path.resolve().parent

            def locate(p: object) -> str:
                if pd.isna(p) or Path(str(p)).is_absolute():
                    return str(p)
                beside = base / str(p)
                return str(beside) if beside.exists() else str(p)

            frame["path"] = [locate(p) for p in frame["path"]]
    if "path" not in frame.columns:
        raise TableError("manifest has no 'path' column")
    if "image_id" not in frame.columns:
        frame["image_id"] = [Path(str(p)).stem for p in frame["path"]]
    frame["image_id"] = frame["image_id"].astype(str)
    return frame.reset_index(drop=True)


def task_labels(frame: pd.DataFrame, task: str) -> pd.DataFrame:
    """Rows with a label for ``task`` (stage 2 drops osteoporosis rows), label as int in ``_y``."""
    if task not in TASK_LABEL_COLUMN:
        raise TableError(f"unknown task {task!r}; expected one of {sorted(TASK_LABEL_COLUMN)}")
    col = TASK_LABEL_COLUMN[task]
    if col not in frame.columns:
        raise TableError(f"manifest has no {col!r} column, needed for task {task!r}")
    values = pd.to_numeric(frame[col], errors="coerce")
    out = frame.loc[values.notna()].copy()
    out["_y"] = values[values.notna()].astype(int).to_numpy()
    n_classes = 3 if task == "three_class" else 2
    bad = ~out["_y"].isin(range(n_classes))
    if bad.any():
        raise TableError(
            f"column {col!r} has values outside 0..{n_classes - 1}: "
            f"{sorted(out.loc[bad, '_y'].unique().tolist())[:5]}"
        )
    return out.reset_index(drop=True)


def split_rows(frame: pd.DataFrame, split: str) -> pd.DataFrame:
    if "split" not in frame.columns:
        raise TableError("manifest has no 'split' column (train/tune/test)")
    return frame.loc[frame["split"].astype(str) == split].reset_index(drop=True)


# --- pixels -------------------------------------------------------------------


@dataclass
class ImageSource:
    """Preprocessed uint8 images for a list of paths: held in memory or read from the cache."""

    paths: list[str]
    size: int
    cache_root: str | None = None
    array: np.ndarray | None = None  # (N, size, size) uint8 when preloaded
    _cache: Any = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.paths)

    def get(self, i: int) -> np.ndarray:
        if self.array is not None:
            img: np.ndarray = self.array[i]
            return img
        if self._cache is None:
            from bonescreen.preprocess import PreprocessCache

            self._cache = PreprocessCache(self.cache_root, self.size)  # type: ignore[arg-type]
        cached: np.ndarray = self._cache.get(self.paths[i])
        return cached

    def batch(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        return np.stack([self.get(int(i)) for i in indices]) if len(indices) else np.zeros(
            (0, self.size, self.size), np.uint8
        )


@dataclass
class PreparedImages:
    """The rows whose image could be preprocessed, and why the others could not."""

    frame: pd.DataFrame
    source: ImageSource
    skipped: pd.DataFrame  # path, reason, message


def prepare_images(
    frame: pd.DataFrame,
    cache_root: str | Path,
    size: int,
    *,
    preload: str | bool = "auto",
    workers: int = 1,
    progress: bool = True,
    compute: bool = True,
    preload_limit_bytes: int = 2 * 1024**3,
) -> PreparedImages:
    """Preprocess every row's image into the cache; drop (and report) unreadable ones.

    ``compute=False`` only looks the images up (other DDP ranks, after rank 0
    filled the cache). ``preload`` holds all pixels in memory: "auto" does so
    when they fit in ``preload_limit_bytes``.
    """
    from bonescreen.preprocess import PreprocessCache, preprocess_files

    paths = [str(p) for p in frame["path"]]
    skipped: list[dict[str, str]] = []
    cache = PreprocessCache(cache_root, size)
    if compute and paths:
        result = preprocess_files(
            sorted(set(paths)),
            cache_root,
            size,
            # A process pool costs a second or two to start: not worth it for a few images.
            workers=workers if len(paths) >= 64 else 1,
            progress=progress,
            skip_list=Path(cache_root) / str(size) / "skipped-last-run.csv",
        )
        bad = {s.path: s for s in result.skipped}
        ok = np.array([p not in bad for p in paths], dtype=bool)
        skipped = [
            {"path": s.path, "reason": s.reason, "message": s.message} for s in result.skipped
        ]
    else:
        ok = np.array([p in cache for p in paths], dtype=bool)
        skipped = [
            {"path": p, "reason": "not_cached", "message": ""} for p, k in zip(paths, ok) if not k
        ]
    if (~ok).any():
        log.warning("%d of %d images could not be preprocessed and are left out", (~ok).sum(), len(ok))
    kept = frame.loc[ok].reset_index(drop=True)
    kept_paths = [p for p, k in zip(paths, ok) if k]
    source = ImageSource(kept_paths, size, str(cache_root))
    want = str(preload).lower()
    if want == "true" or (want == "auto" and len(kept_paths) * size * size <= preload_limit_bytes):
        source.array = _load_all(source, progress)
    return PreparedImages(kept, source, pd.DataFrame(skipped, columns=["path", "reason", "message"]))


def _load_all(source: ImageSource, progress: bool) -> np.ndarray:
    from tqdm.auto import tqdm

    out = np.empty((len(source), source.size, source.size), dtype=np.uint8)
    for i in tqdm(range(len(source)), desc="load", unit="img", disable=not progress, leave=False):
        out[i] = source.get(i)
    return out


def normalize(images: np.ndarray | torch.Tensor, mean: float = GRAY_MEAN, std: float = GRAY_STD) -> torch.Tensor:
    """uint8 ``(N, H, W)`` or ``(H, W)`` -> float ``(N, 1, H, W)``: x/255, then (x - mean)/std.

    The same formula as :meth:`bonescreen.artifact.LoadedModel.to_tensor`, so
    training and inference see identical inputs.
    """
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    if x.ndim == 2:
        x = x[None]
    x = x[:, None] / 255.0
    return (x - float(mean)) / float(std)


# --- augmentation ---------------------------------------------------------------


def _odd(n: float) -> int:
    k = max(3, round(n))
    return k if k % 2 else k + 1


def weak_augmentation() -> Any:
    """The paper's weak augmentation (normalisation is applied separately, to every input)."""
    import albumentations as A

    return A.Compose([A.HorizontalFlip(p=0.5)])


def strong_augmentation(size: int, p: float = 0.5) -> Any:
    """The paper's strong list; blur kernels and dropout holes scale with the image size.

    ``p`` is the probability of each group; blurs and the three warps are each
    one ``OneOf`` group so that an image is rarely warped twice (warps are
    also the slowest transforms on a CPU).
    """
    import albumentations as A
    import cv2

    blur = (3, _odd(size / 64))  # 3..9 px at 512, 3 px at 128
    unit = (max(2, size // 10), max(3, size // 5))
    return A.Compose(
        [
            A.HorizontalFlip(p=0.5),
            A.OneOf(
                [
                    A.Blur(blur_limit=blur, p=1.0),
                    A.MotionBlur(blur_limit=blur, p=1.0),
                    A.MedianBlur(blur_limit=blur, p=1.0),
                ],
                p=p,
            ),
            A.Affine(
                scale=(0.9, 1.1),
                translate_percent=(-0.0625, 0.0625),
                rotate=(-10, 10),
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                p=p,
            ),
            A.OneOf(
                [
                    A.GridDistortion(num_steps=5, distort_limit=0.2, p=1.0),
                    A.ElasticTransform(alpha=size / 8, sigma=size / 16, p=1.0),
                    A.OpticalDistortion(distort_limit=0.1, p=1.0),
                ],
                p=p,
            ),
            A.RandomGamma(gamma_limit=(80, 120), p=p),
            A.GridDropout(ratio=0.2, unit_size_range=unit, random_offset=True, fill=0, p=p / 2),
        ]
    )


def build_augmentation(level: str, size: int, strong_p: float = 0.5) -> Any:
    if level not in AUGMENT_LEVELS:
        raise ValueError(f"augmentation {level!r}; expected one of {AUGMENT_LEVELS}")
    if level == "none":
        return None
    if level == "weak":
        return weak_augmentation()
    return strong_augmentation(size, strong_p)


def _flip_transform(compose: Any) -> Any:
    """The HorizontalFlip inside a pipeline (the first transform of both pipelines)."""
    return compose.transforms[0]


# --- dataset --------------------------------------------------------------------


class ManifestDataset(Dataset[dict[str, Any]]):
    """Images + integer labels, with seeded per-sample augmentation.

    Items are dicts: ``image`` float ``(1, H, W)``, ``label`` int64, ``index``,
    ``flipped`` (whether the horizontal flip was applied) and, when
    ``soft_targets`` ``(N, 2, C)`` is given, ``teacher``: the teacher's logits
    for this image in the same orientation (index 0 unflipped, 1 flipped), i.e.
    on the weak view of the image the student sees strongly augmented.

    ``site_shift`` (:class:`bonescreen.site_shift.SiteShift`) first re-renders
    the image as another site's chain would show it (then the flip and the
    ``augment`` pipeline follow); it draws from its own generator, seeded by
    (seed, epoch, index), so turning it on leaves the other draws unchanged.
    """

    def __init__(
        self,
        source: ImageSource,
        labels: Sequence[int] | np.ndarray,
        *,
        augment: str = "none",
        strong_p: float = 0.5,
        seed: int = 0,
        mean: float = GRAY_MEAN,
        std: float = GRAY_STD,
        soft_targets: np.ndarray | None = None,
        site_shift: SiteShift | None = None,
    ) -> None:
        if len(labels) != len(source):
            raise ValueError(f"{len(labels)} labels for {len(source)} images")
        if soft_targets is not None and (soft_targets.ndim != 3 or soft_targets.shape[:2] != (len(source), 2)):
            raise ValueError(f"soft_targets must be (N, 2, C), got {soft_targets.shape}")
        self.source = source
        self.labels = np.asarray(labels, dtype=np.int64)
        self.augment = augment
        self.transform = build_augmentation(augment, source.size, strong_p)
        self.seed = int(seed)
        self.epoch = 0
        self.mean = float(mean)
        self.std = float(std)
        self.soft_targets = None if soft_targets is None else np.asarray(soft_targets, np.float32)
        self.site_shift = site_shift if site_shift is not None and site_shift.active else None

    def __len__(self) -> int:
        return len(self.source)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _augment(self, image: np.ndarray, index: int) -> tuple[np.ndarray, bool]:
        if self.site_shift is not None:
            shift_rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, int(index), _SHIFT_STREAM]))
            image = self.site_shift(image, shift_rng)
        if self.transform is None:
            return image, False
        seq = np.random.SeedSequence([self.seed, self.epoch, int(index)])
        rng = np.random.default_rng(seq)
        py = random.Random(int(seq.generate_state(1)[0]))
        # One shared generator for the whole pipeline: per-transform seeds
        # would make every transform draw the same first number.
        self.transform.set_random_state(rng, py)
        flip = _flip_transform(self.transform)
        # Decide the flip here, so the teacher's target can follow the orientation.
        flipped = py.random() < 0.5
        flip.p = 1.0 if flipped else 0.0
        out = self.transform(image=np.ascontiguousarray(image))["image"]
        return out, flipped

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = self.source.get(index)
        image, flipped = self._augment(image, index)
        item: dict[str, Any] = {
            "image": normalize(image, self.mean, self.std)[0],
            "label": torch.tensor(self.labels[index], dtype=torch.long),
            "index": torch.tensor(index, dtype=torch.long),
            "flipped": torch.tensor(flipped),
        }
        if self.soft_targets is not None:
            item["teacher"] = torch.from_numpy(self.soft_targets[index, int(flipped)])
        return item


# --- sampling -------------------------------------------------------------------


def balanced_weights(labels: Sequence[int] | np.ndarray) -> np.ndarray:
    """Per-sample weights 1 / n(class): every class is drawn equally often."""
    labels = np.asarray(labels)
    counts = np.bincount(labels)
    weights: np.ndarray = (1.0 / counts[labels]).astype(np.float64)
    return weights


def class_weights(labels: Sequence[int] | np.ndarray, num_classes: int) -> np.ndarray:
    """Loss weights n / (C * n(class)), as sklearn's ``class_weight='balanced'``."""
    counts = np.bincount(np.asarray(labels), minlength=num_classes).astype(np.float64)
    counts[counts == 0] = 1.0
    weights: np.ndarray = counts.sum() / (num_classes * counts)
    return weights


class EpochSampler(DistributedSampler[int]):
    """A ``DistributedSampler`` that can also draw class-balanced samples and skip ahead.

    Works with one process too (``num_replicas=1``). ``weights`` draws a
    seeded multinomial sample with replacement each epoch (class balancing);
    ``set_start(k)`` skips this rank's first ``k`` samples of the current
    epoch, which is how a run resumed mid-epoch sees the batches it had not
    yet seen.
    """

    def __init__(
        self,
        n: int,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        weights: np.ndarray | None = None,
        drop_last: bool = False,
    ) -> None:
        # DistributedSampler only takes len() of its dataset (torch types it Dataset); a range of n is enough
        super().__init__(
            range(n),  # type: ignore[arg-type]
            num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)
        self.start = 0

    def set_start(self, start: int) -> None:
        self.start = int(start)

    def _indices(self) -> list[int]:
        n = len(self.dataset)  # type: ignore[arg-type]
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        if self.weights is not None:
            indices = torch.multinomial(self.weights, n, replacement=True, generator=g).tolist()
        elif self.shuffle:
            indices = torch.randperm(n, generator=g).tolist()
        else:
            indices = list(range(n))
        if self.drop_last:
            indices = indices[: self.total_size]
        else:
            pad = self.total_size - len(indices)
            if pad > 0:
                indices += (indices * math.ceil(pad / max(1, len(indices))))[:pad]
        return indices[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.start :])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)
