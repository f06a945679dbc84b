"""Site-shift augmentation: what differs between hospitals' radiographs, applied where the pipeline allows.

A model trained at one hospital meets other detectors, processing software
and technique elsewhere. Published multi-site CXR work attributes most of the
drop to acquisition and processing, not anatomy: the detector's response (a
log or a linear, dose-like curve, gamma and the display LUT), the window the
console chose, the vendor's multi-scale ("frequency") processing from none to
strong edge enhancement, quantum and electronic noise (dose), blur and pixel
size, the field of view (detector size, distance, patient size: the pipeline
resizes every image to one matrix, so the chest's scale varies), bit depth, collimation, burned-in markers and text, and the odd
inverted image (a MONOCHROME1 / MONOCHROME2 mix-up).

Training reads the preprocessing cache, i.e. images that already went through
the paper's grayscale truncation (clip to the central region's min/max,
rescale to 0-255). So :func:`site_shift` treats the cached image as the
vendor's display image, perturbs it the way another vendor's chain would
(in the order the physical chain applies them: field of view, blur, noise,
response and window, processing, quantisation, collimation and text,
polarity), then
**re-applies the truncation** (:func:`bonescreen.preprocess.grayscale_truncation`)
so the model only ever sees images with the statistics the real pipeline
produces, e.g. noise widens the central min/max and so lowers contrast, as it
does at inference.

Every draw comes from the generator passed in, so a sample's shift is fixed
by (seed, epoch, index) like the rest of the augmentation.
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass

import numpy as np

__all__ = ["ShiftedView", "SiteShift", "from_config", "site_shift"]

_TEXT_CHARS = string.ascii_uppercase + string.digits + "  -:/."


@dataclass(frozen=True)
class SiteShift:
    """How strongly and how often to perturb; ``p`` = probability an image is shifted at all.

    ``strength`` scales every range (1.0: the ranges below, motivated by
    the spread between real vendors; 0 leaves the image alone).
    ``polarity_p``: probability of an inverted image (mislabelled photometric
    interpretation), drawn separately from ``p``.
    """

    p: float = 0.8
    strength: float = 1.0
    polarity_p: float = 0.05

    def __post_init__(self) -> None:
        for name, hi in (("p", 1.0), ("polarity_p", 1.0), ("strength", 2.0)):
            v = getattr(self, name)
            if not 0.0 <= v <= hi:
                raise ValueError(f"site shift {name} must be in [0, {hi:g}], got {v}")

    @property
    def active(self) -> bool:
        return (self.p > 0 and self.strength > 0) or self.polarity_p > 0

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return site_shift(image, rng, self)


def _loguniform(rng: np.random.Generator, lo: float, hi: float, s: float) -> float:
    """exp(U(log lo, log hi)) with the log-range scaled by ``s`` around 1."""
    return float(math.exp(rng.uniform(math.log(lo) * s, math.log(hi) * s)))


def _response(x: np.ndarray, rng: np.random.Generator, s: float) -> np.ndarray:
    """Another detector response / display LUT: exposure and window, then one monotone curve."""
    # window and exposure: the console's auto-ranging anchors elsewhere
    a = rng.uniform(-0.15, 0.15) * s
    b = 1.0 + rng.uniform(-0.15, 0.15) * s
    x = (x - a) / max(b - a, 0.2)
    kind = int(rng.integers(0, 3))
    xc = np.clip(x, 0.0, 1.0)
    if kind == 0:  # gamma (display LUT)
        return xc ** _loguniform(rng, 0.5, 2.0, s)
    if kind == 1:  # log vs linear (dose) response: an exponential curve either way
        k = rng.uniform(-3.0, 3.0) * s
        if abs(k) < 1e-3:
            return xc
        return (1.0 - np.exp(-k * xc)) / (1.0 - math.exp(-k))
    # sigmoid LUT (film-like S curve) of random centre and slope
    c = 0.5 + rng.uniform(-0.2, 0.2) * s
    w = rng.uniform(0.12, 0.4)
    lo, hi = 1.0 / (1.0 + math.exp(c / w)), 1.0 / (1.0 + math.exp(-(1.0 - c) / w))
    return (1.0 / (1.0 + np.exp(-(xc - c) / w)) - lo) / (hi - lo)


def _processing(x: np.ndarray, rng: np.random.Generator, s: float) -> np.ndarray:
    """Multi-scale processing: coarse range compressed or expanded, detail gained or smoothed."""
    from scipy import ndimage

    n = x.shape[0]
    coarse = ndimage.gaussian_filter(x, sigma=n / 36.0, mode="nearest")  # ~12 mm on a 43 cm field
    rc = _loguniform(rng, 0.6, 1.4, s)
    dg = _loguniform(rng, 0.6, 2.2, s)
    return rc * coarse + dg * (x - coarse)


def _field_of_view(x: np.ndarray, rng: np.random.Generator, s: float) -> np.ndarray:
    """Another detector size, source distance or patient size: the chest fills more or less of the image.

    The pipeline resizes every image to a fixed matrix whatever its pixel
    spacing, so a 35 cm cassette, a 43 cm panel or wide collimation show the
    same anatomy at different scales. Zoom about the centre (with a small
    offset) and fill from the border, as air and the table extend it.
    """
    import cv2

    n = x.shape[0]
    z = _loguniform(rng, 0.8, 1.25, s)
    dx, dy = (rng.uniform(-0.04, 0.04, 2) * n * min(s, 1.0)).tolist()
    c = (n - 1) / 2.0
    m = np.array([[z, 0.0, (1 - z) * c + dx], [0.0, z, (1 - z) * c + dy]], dtype=np.float64)
    return cv2.warpAffine(x, m, (n, n), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def _resolution(x: np.ndarray, rng: np.random.Generator, s: float) -> np.ndarray:
    """Coarser pixels (down then up) or a blurrier detector (Gaussian)."""
    import cv2
    from scipy import ndimage

    n = x.shape[0]
    if rng.random() < 0.5:
        f = 1.0 - rng.uniform(0.0, 0.4) * min(s, 1.0)
        m = max(8, int(round(n * f)))
        small = cv2.resize(x, (m, m), interpolation=cv2.INTER_AREA)
        return cv2.resize(small, (n, n), interpolation=cv2.INTER_LINEAR)
    return ndimage.gaussian_filter(x, sigma=rng.uniform(0.2, 0.8) * s * n / 128.0, mode="nearest")


def _noise(x: np.ndarray, rng: np.random.Generator, s: float) -> np.ndarray:
    """Lower dose or a noisier detector: quantum noise (grows with attenuation) plus electronic noise."""
    sd = rng.uniform(0.005, 0.04) * s
    quantum = sd * (0.4 + np.clip(x, 0.0, 1.0))  # dense (bright) regions receive fewer photons
    return x + rng.standard_normal(x.shape, dtype=np.float32) * quantum.astype(np.float32)


def _bit_depth(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Fewer grey levels (5-7 bits: an old digitiser, a lossy export): 2**bits + 1 levels in [0, 1]."""
    levels = float(2 ** int(rng.integers(5, 8)))
    return (np.round(np.clip(x, 0.0, 1.0) * levels) / levels).astype(np.float32)


def _collimate(x: np.ndarray, rng: np.random.Generator, s: float) -> np.ndarray:
    """Blades closer to the body on some sides; masked black or left unexposed (white)."""
    n = x.shape[0]
    fill = float(x.min()) if rng.random() < 0.5 else float(x.max())
    out = x.copy()
    for side in range(4):
        if rng.random() < 0.6:
            w = int(round(rng.uniform(0.0, 0.15) * min(s, 1.5) * n))
            if w <= 0:
                continue
            if side == 0:
                out[:w] = fill
            elif side == 1:
                out[-w:] = fill
            elif side == 2:
                out[:, :w] = fill
            else:
                out[:, -w:] = fill
    return out


def _text(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A burned-in line (site, device, exposure index) or a lead marker near an edge, white or black."""
    import cv2

    n = x.shape[0]
    k = int(rng.integers(1, 24))
    line = "".join(_TEXT_CHARS[int(i)] for i in rng.integers(0, len(_TEXT_CHARS), k)).strip() or "R"
    height = rng.uniform(0.025, 0.06) * n
    scale = height / 22.0
    thick = max(1, int(round(height / 8)))
    (tw, th), _ = cv2.getTextSize(line, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    top = rng.random() < 0.5
    y = int(th + rng.uniform(0.01, 0.08) * n) if top else int(n - rng.uniform(0.01, 0.08) * n)
    x0 = int(rng.uniform(0.01, max(0.02, 1.0 - tw / n - 0.01)) * n)
    ink = np.zeros(x.shape, dtype=np.uint8)  # OpenCV draws text on 8-bit images only
    cv2.putText(ink, line, (x0, y), cv2.FONT_HERSHEY_SIMPLEX, scale, 255, thick, cv2.LINE_8)
    out = x.copy()
    out[ink > 0] = float(x.max()) if rng.random() < 0.8 else float(x.min())
    return out


def site_shift(image: np.ndarray, rng: np.random.Generator, cfg: SiteShift | None = None) -> np.ndarray:
    """uint8 truncated image -> the same anatomy as another site's chain would show it, re-truncated, uint8."""
    from bonescreen.preprocess import grayscale_truncation

    cfg = cfg or SiteShift()
    s = float(cfg.strength)
    shifted = s > 0 and rng.random() < cfg.p
    invert = rng.random() < cfg.polarity_p
    if not shifted and not invert:
        return image
    x = np.asarray(image, dtype=np.float32) / 255.0
    if shifted:
        if rng.random() < 0.5:
            x = _field_of_view(x, rng, s)
        if rng.random() < 0.5:
            x = _resolution(x, rng, s)
        if rng.random() < 0.6:
            x = _noise(x, rng, s)
        if rng.random() < 0.8:
            x = _response(x, rng, s).astype(np.float32)
        if rng.random() < 0.6:
            x = _processing(x, rng, s).astype(np.float32)
        if rng.random() < 0.2:
            x = _bit_depth(x, rng)
        if rng.random() < 0.4:
            x = _collimate(x, rng, s)
        if rng.random() < 0.3:
            x = _text(x, rng)
    if invert:
        x = 1.0 - x
    out = grayscale_truncation(x)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def from_config(cfg: object) -> SiteShift | None:
    """The training config's site shift (``site_shift``, ``_strength``, ``_polarity``); None when off."""
    p = float(getattr(cfg, "site_shift", 0.0))
    if p <= 0.0:
        return None
    return SiteShift(
        p=p,
        strength=float(getattr(cfg, "site_shift_strength", 1.0)),
        polarity_p=float(getattr(cfg, "site_shift_polarity", 0.0)),
    )


class ShiftedView:
    """A fixed site-shifted copy of an image source (same ``get`` / ``batch`` / ``len``).

    Copy ``copy`` of image ``i`` always gets the same shift (seed
    ``(seed, copy, i)``), every image is shifted (``p`` = 1), with no polarity
    errors: a tuning score over such copies asks the same question every
    epoch, "how well does the model rank under another site's look".
    Computed on the fly, so a 512-px tuning split costs no extra memory.
    """

    def __init__(self, base: object, copy: int, *, strength: float = 1.0, seed: int = 0) -> None:
        self.base = base
        self.copy = int(copy)
        self.seed = int(seed)
        self.shift = SiteShift(p=1.0, strength=strength if strength > 0 else 1.0, polarity_p=0.0)
        self.size = int(getattr(base, "size"))

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def get(self, i: int) -> np.ndarray:
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, 7_919 + self.copy, int(i)]))
        return site_shift(self.base.get(i), rng, self.shift)  # type: ignore[attr-defined]

    def batch(self, indices: object) -> np.ndarray:
        idx = [int(i) for i in indices]  # type: ignore[attr-defined]
        if not idx:
            return np.zeros((0, self.size, self.size), np.uint8)
        return np.stack([self.get(i) for i in idx])
