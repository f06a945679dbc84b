"""Grayscale truncation, resizing, an on-disk cache and batch preprocessing.

The paper's preprocessing ("grayscale truncation"): take the min and max of
the central region ``[H/4:3H/4, W/4:3W/4]``, clip the whole image to that
range, rescale linearly to 0-255 and resize to 512 x 512. The central region
is mostly lung, mediastinum and spine, so collimation borders, burnt-in
markers and the air around the patient do not set the contrast.

Resizing uses OpenCV: ``INTER_AREA`` when shrinking (it averages the source
pixels each output pixel covers, so a 2000-pixel radiograph does not alias)
and ``INTER_LINEAR`` when enlarging. The aspect ratio is not kept, as in the
paper.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import multiprocessing
import multiprocessing.context
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bonescreen.errors import BonescreenError, ImageReadError
from bonescreen.fsio import atomic_open
from bonescreen.io import read_image

__all__ = [
    "PREPROCESS_VERSION",
    "PreprocessCache",
    "PreprocessResult",
    "SkipRecord",
    "central_range",
    "grayscale_truncation",
    "preprocess_array",
    "preprocess_files",
    "resize",
    "write_skip_list",
]

log = logging.getLogger(__name__)

#: Bump when the pixels ``preprocess_array`` produces change, so caches rebuild.
PREPROCESS_VERSION = 1
SKIP_COLUMNS = ["path", "reason", "message"]


def central_range(img: np.ndarray) -> tuple[float, float]:
    """Min and max of the central region ``[H/4:3H/4, W/4:3W/4]`` (NaNs ignored).

    Images smaller than 4 pixels on a side have an empty central region; the
    whole image is used then.
    """
    arr = np.asarray(img)
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {arr.shape}")
    h, w = arr.shape
    centre = arr[h // 4 : (3 * h) // 4, w // 4 : (3 * w) // 4]
    if centre.size == 0:
        centre = arr
    finite = centre[np.isfinite(centre)]
    if finite.size == 0:
        raise ValueError("image has no finite pixel values in its central region")
    return float(finite.min()), float(finite.max())


def grayscale_truncation(img: np.ndarray) -> np.ndarray:
    """Clip to the central region's range and rescale to ``[0, 255]`` (float32).

    A flat central region (min == max) leaves a constant image after the
    clip, with no contrast to stretch; the result is then all zeros instead
    of a division by zero. NaNs count as the central minimum.
    """
    arr = np.asarray(img, dtype=np.float64)
    lo, hi = central_range(arr)
    arr = np.where(np.isfinite(arr), arr, lo)
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.float32)
    out = (np.clip(arr, lo, hi) - lo) * (255.0 / (hi - lo))
    return out.astype(np.float32)


def resize(img: np.ndarray, size: int | tuple[int, int] = 512) -> np.ndarray:
    """Resize to ``size`` x ``size`` (or ``(height, width)``), float32 in, float32 out.

    INTER_AREA when shrinking (anti-aliased box average), INTER_LINEAR when
    enlarging; OpenCV because it is several times faster than PIL on float
    images and is already installed with albumentations.
    """
    import cv2

    out_h, out_w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if out_h < 1 or out_w < 1:
        raise ValueError(f"size must be positive, got {size!r}")
    arr = np.ascontiguousarray(img, dtype=np.float32)
    if arr.shape == (out_h, out_w):
        return arr.copy()
    shrinking = out_h * out_w < arr.shape[0] * arr.shape[1]
    interp = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(arr, (out_w, out_h), interpolation=interp)


def preprocess_array(img: np.ndarray, size: int = 512) -> np.ndarray:
    """The paper's preprocessing: truncation, then resize; uint8 ``(size, size)``."""
    trunc = grayscale_truncation(img)
    small = resize(trunc, size)
    out: np.ndarray = np.clip(np.rint(small), 0, 255).astype(np.uint8)
    return out


def _atomic_write_png(arr: np.ndarray, dest: Path) -> None:
    """Write to a temporary file beside ``dest`` and rename it into place.

    ``os.replace`` is atomic on one file system, so a killed run leaves either
    no file or a complete one, never a half-written PNG.
    """
    from PIL import Image

    with atomic_open(dest, "wb") as fh:
        Image.fromarray(arr).save(fh, format="PNG", compress_level=1)


class PreprocessCache:
    """Preprocessed uint8 images stored as PNG under ``<root>/<size>/<aa>/<key>.png``.

    The key hashes the resolved path, the file's size and mtime, and the
    preprocessing parameters, so an edited or replaced file is recomputed and
    a cache can be shared between runs with different sizes.
    """

    def __init__(self, root: str | os.PathLike[str], size: int = 512, *, apply_voi: bool = True) -> None:
        if int(size) < 1:
            raise ValueError(f"size must be positive, got {size!r}")
        self.root = Path(root)
        self.size = int(size)
        self.apply_voi = bool(apply_voi)
        self.dir = self.root / str(self.size)

    @property
    def params(self) -> dict[str, object]:
        return {
            "method": "truncation",
            "version": PREPROCESS_VERSION,
            "size": self.size,
            "interpolation": "cv2-area-down/linear-up",
            "apply_voi": self.apply_voi,
        }

    def key(self, path: str | os.PathLike[str]) -> str:
        """Cache key; raises ``FileNotFoundError`` if ``path`` does not exist."""
        resolved = Path(path).resolve()
        st = resolved.stat()
        blob = json.dumps(
            {"path": str(resolved), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns, **self.params},
            sort_keys=True,
        )
        return hashlib.sha1(blob.encode()).hexdigest()

    def path_for(self, path: str | os.PathLike[str]) -> Path:
        key = self.key(path)
        return self.dir / key[:2] / f"{key}.png"

    def __contains__(self, path: object) -> bool:
        try:
            return self.path_for(path).is_file()  # type: ignore[arg-type]
        except OSError:
            return False

    def _load(self, png: Path) -> np.ndarray | None:
        from PIL import Image

        try:
            with Image.open(png) as im:
                arr = np.asarray(im)
        except (OSError, ValueError, SyntaxError):
            log.warning("cache file %s unreadable; recomputing", png)
            return None
        if arr.dtype != np.uint8 or arr.shape != (self.size, self.size):
            return None
        return arr

    def get(self, path: str | os.PathLike[str]) -> np.ndarray:
        """Preprocessed uint8 ``(size, size)`` image; computed and stored on first use.

        Raises ``ImageReadError`` subclasses for unreadable inputs (nothing is cached).
        """
        arr, _ = self.ensure(path)
        return arr

    def ensure(self, path: str | os.PathLike[str]) -> tuple[np.ndarray, bool]:
        """Like :meth:`get`, also saying whether the cache already held it."""
        try:
            png = self.path_for(path)
        except FileNotFoundError as exc:
            raise ImageReadError(f"{path}: file not found", reason="not_found") from exc
        if png.is_file():
            cached = self._load(png)
            if cached is not None:
                return cached, True
        img, _meta = read_image(path, apply_voi=self.apply_voi)
        arr = preprocess_array(img, self.size)
        _atomic_write_png(arr, png)
        return arr, False


# --- batch preprocessing ----------------------------------------------------


@dataclass(frozen=True)
class SkipRecord:
    path: str
    reason: str
    message: str


@dataclass
class PreprocessResult:
    """What a :func:`preprocess_files` run did; ``outputs`` maps input path to cached PNG."""

    n_total: int = 0
    n_computed: int = 0
    n_cached: int = 0
    skipped: list[SkipRecord] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)
    skip_list: str | None = None
    seconds: float = 0.0

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)

    @property
    def n_ok(self) -> int:
        return self.n_computed + self.n_cached

    def reasons(self) -> dict[str, int]:
        return dict(Counter(s.reason for s in self.skipped).most_common())

    def summary(self) -> str:
        rate = self.n_computed / self.seconds if self.seconds > 0 else 0.0
        text = (
            f"{self.n_total} files: {self.n_computed} preprocessed, {self.n_cached} already cached, "
            f"{self.n_skipped} skipped in {self.seconds:.1f} s ({rate:.1f} images/s)"
        )
        if self.skipped:
            text += "; reasons: " + ", ".join(f"{k}={v}" for k, v in self.reasons().items())
        if self.skip_list:
            text += f"; skip list: {self.skip_list}"
        return text


def _process_one(path: str, root: str, size: int, apply_voi: bool) -> tuple[str, str, str, str]:
    """Worker: returns ``(path, status, reason_or_png, message)``; never raises for bad input."""
    cache = PreprocessCache(root, size, apply_voi=apply_voi)
    try:
        _arr, hit = cache.ensure(path)
        return path, ("cached" if hit else "computed"), str(cache.path_for(path)), ""
    except BonescreenError as exc:
        return path, "skipped", exc.reason, str(exc)
    except MemoryError:
        return path, "skipped", "out_of_memory", "out of memory while decoding"
    except Exception as exc:  # one bad file must never stop a batch
        return path, "skipped", "error", f"{type(exc).__name__}: {exc}"


def _init_worker() -> None:
    # Each worker is one process; let it use one core rather than oversubscribing.
    try:
        import cv2

        cv2.setNumThreads(1)
    except Exception:  # pragma: no cover - cv2 always present with albumentations
        pass


def write_skip_list(records: Iterable[SkipRecord], dest: str | os.PathLike[str]) -> Path:
    """Write ``path,reason,message`` CSV atomically."""
    dest = Path(dest)
    with atomic_open(dest, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(SKIP_COLUMNS)
        for r in records:
            writer.writerow([r.path, r.reason, r.message])
    return dest


def preprocess_files(
    paths: Sequence[str | os.PathLike[str]],
    cache_root: str | os.PathLike[str],
    size: int = 512,
    workers: int = 2,
    progress: bool = True,
    *,
    skip_list: str | os.PathLike[str] | None = None,
    apply_voi: bool = True,
) -> PreprocessResult:
    """Preprocess many images into a :class:`PreprocessCache`, in parallel.

    Resumable: files already in the cache are not decoded again. A file that
    cannot be read is recorded (reason + message) and the run goes on; the
    skip list is written to ``skip_list`` (default ``<cache_root>/<size>/skipped.csv``).
    ``workers <= 1`` runs in this process. If a decoder crashes a worker
    process, the files that were in flight are retried one by one in fresh
    processes and the one that crashes again is recorded as ``worker_crashed``.
    """
    from tqdm.auto import tqdm

    start = time.perf_counter()
    cache = PreprocessCache(cache_root, size, apply_voi=apply_voi)
    result = PreprocessResult(n_total=len(paths))
    todo: list[str] = []
    seen: set[str] = set()
    bar = tqdm(total=len(paths), disable=not progress, unit="img", desc="preprocess")

    def record(out: tuple[str, str, str, str]) -> None:
        p, status, info, message = out
        if status == "skipped":
            result.skipped.append(SkipRecord(p, info, message))
        else:
            result.outputs[p] = info
            if status == "cached":
                result.n_cached += 1
            else:
                result.n_computed += 1
        bar.update(1)

    # Resume: a stat and a hash per file is far cheaper than decoding it.
    for raw in paths:
        p = str(raw)
        if p in seen:
            result.n_total -= 1
            continue
        seen.add(p)
        try:
            png = cache.path_for(p)
        except OSError as exc:
            record((p, "skipped", "not_found", f"{p}: {exc.strerror or exc}"))
            continue
        if png.is_file():
            record((p, "cached", str(png), ""))
        else:
            todo.append(p)

    args = (str(cache.root), cache.size, cache.apply_voi)
    if workers <= 1 or len(todo) <= 1:
        for p in todo:
            record(_process_one(p, *args))
    else:
        _run_pool(todo, args, workers, record)
    bar.close()

    result.seconds = time.perf_counter() - start
    dest = Path(skip_list) if skip_list is not None else cache.dir / "skipped.csv"
    result.skip_list = str(write_skip_list(result.skipped, dest))
    return result


def _mp_context() -> multiprocessing.context.BaseContext:
    """Fork is fastest, but forking a process that has started torch's thread
    pools can deadlock; use a fresh interpreter (forkserver/spawn) then."""
    methods = multiprocessing.get_all_start_methods()
    if "torch" in sys.modules:
        return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def _run_pool(todo: list[str], args: tuple[str, int, bool], workers: int, record) -> None:  # type: ignore[no-untyped-def]
    """Keep at most ``2 * workers`` files in flight so a crash affects few files."""
    queue = list(reversed(todo))
    suspects: list[str] = []
    window = 2 * workers
    ctx = _mp_context()

    def new_pool(n: int) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=n, mp_context=ctx, initializer=_init_worker)

    pool = new_pool(workers)
    inflight: dict[Future[tuple[str, str, str, str]], str] = {}
    try:
        while queue or inflight:
            while queue and len(inflight) < window:
                p = queue.pop()
                try:
                    inflight[pool.submit(_process_one, p, *args)] = p
                except BrokenProcessPool:
                    queue.append(p)
                    break
            done, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
            broken = False
            for fut in done:
                p = inflight.pop(fut)
                try:
                    record(fut.result())
                except BrokenProcessPool:
                    suspects.append(p)
                    broken = True
            if broken:
                suspects.extend(inflight.values())
                inflight.clear()
                pool.shutdown(wait=False, cancel_futures=True)
                pool = new_pool(workers)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    for p in suspects:  # isolate: one process per suspect file
        with new_pool(1) as solo:
            try:
                record(solo.submit(_process_one, p, *args).result())
            except BrokenProcessPool:
                record((p, "skipped", "worker_crashed", "the decoder crashed its worker process"))
