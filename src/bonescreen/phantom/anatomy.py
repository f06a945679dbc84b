"""Chest anatomy drawn as X-ray line integrals (the attenuation domain).

Every structure contributes ``mu * path length`` along the beam, summed into
``A(x, y) = -ln(I / I0)``; the detector model in :mod:`.vendors` then turns
``A`` into stored pixel values. Geometry is in millimetres (x: image left to
right, y: head to feet), so one description renders at any matrix size.

Bone mineral density acts only on bones: cortical thickness, cortical
mineralisation and the trabecular volume fraction / texture of vertebrae,
ribs, clavicles, scapulae and humeri. Nothing global (brightness, exposure,
body size) depends on it, so a model can only learn density from the bones.

Hand-written rather than a library: no maintained Python package renders
parametric chest radiographs; every structure here is a closed-form chord
length (cylinders, ellipsoids, tubes around curves) so an image is a few
dozen vectorised numpy passes.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

# Effective linear attenuation coefficients (1/mm) at a chest beam's mean
# energy (~60 keV). Bone values are the excess over the soft tissue they replace.
MU_SOFT = 0.020
MU_CORTICAL = 0.080  # cortical bone minus soft tissue
MU_TRABECULAR = 0.120  # mineralised trabeculae minus marrow, per mm of bone
MU_METAL = 0.35
MU_WIRE = 0.30

# How strongly one SD of bone density (the latent, T-score units) moves each
# bone property. A T-score of -2.5 is ~30 % less mineral than a young adult.
DENSITY_PER_SD = 0.18
TRAB_BVTV_REF = 0.24  # trabecular bone volume fraction at latent 0
BVTV_EXP = 2.0  # trabeculae are lost first ...
CORTEX_EXP = 1.3  # ... then cortices thin (endosteal resorption) ...
MINERAL_EXP = 0.5  # ... and what is left is less mineralised


@dataclass(frozen=True)
class Anatomy:
    """Patient-level body: identical on every radiograph of the same patient."""

    sex: str  # "F" | "M"
    density: float  # latent bone density, T-score units
    chest_half_width: float  # mm, widest inner rib cage half-width
    chest_half_depth: float  # mm, AP half-depth of the torso
    fat_mm: float  # subcutaneous soft tissue added around the torso
    lung_height: float  # mm, apex to diaphragm dome
    bone_scale: float  # frame size of the skeleton (1 = average)
    heart_ratio: float  # cardiothoracic ratio
    breast_mm: float  # breast soft-tissue depth (0 for men)
    scoliosis_mm: float  # lateral spine curvature amplitude
    rib_slope: float  # posterior-rib obliquity
    shoulder_drop: float  # how far the shoulders slope down laterally
    device: bool  # pacemaker-like implant with a lead
    texture_offset: tuple[int, int]  # where this patient's trabecular texture starts in the bank

    @property
    def rho(self) -> float:
        """Bone mineral relative to a young adult (1.0 at latent 0)."""
        return max(0.35, 1.0 + DENSITY_PER_SD * self.density)

    @property
    def cortex(self) -> float:
        """Cortical thickness relative to a young adult."""
        return float(self.rho**CORTEX_EXP)


@dataclass(frozen=True)
class Acquisition:
    """One exposure: positioning and view, drawn per image."""

    view: str = "PA"  # "PA" | "AP" | "LAT"
    shift_x: float = 0.0  # mm
    shift_y: float = 0.0  # mm
    magnification: float = 1.0
    inspiration: float = 0.0  # mm the diaphragm sits lower (+) or higher (-)
    rotation: float = 0.0  # axial rotation: anterior structures shift (mm)


def anatomy_from_patient(
    sex: str,
    height_cm: float,
    weight_kg: float,
    density: float,
    device: bool,
    rng: np.random.Generator,
    *,
    child_age: float | None = None,
) -> Anatomy:
    """Body dimensions from sex, height and weight plus individual variation.

    Only the bone properties read ``density``; sizes come from height/weight
    (and the tissue they add), never from the label. ``child_age`` (pediatric
    phantom) scales the chest depth with the frame and breast tissue with
    puberty; it changes no random draw, so adult bodies are unaffected.
    """
    female = sex == "F"
    bmi = weight_kg / (height_cm / 100.0) ** 2
    frame = (height_cm / (160.0 if female else 172.0)) * float(rng.normal(1.0, 0.03))
    half_width = (130.0 if female else 142.0) * frame * (1.0 + 0.006 * (bmi - 24.0))
    half_depth = (95.0 if female else 105.0) * (1.0 + 0.022 * (bmi - 24.0)) * float(rng.normal(1.0, 0.05))
    fat = max(4.0, 10.0 + 2.8 * (bmi - 24.0) + float(rng.normal(0.0, 4.0)))
    breast = 0.0
    if female:
        breast = max(10.0, 30.0 + 4.0 * (bmi - 24.0) + float(rng.normal(0.0, 8.0)))
    if child_age is not None:
        half_depth *= min(1.0, frame)
        breast *= float(np.clip((child_age - 9.0) / 6.0, 0.0, 1.0))
    return Anatomy(
        sex="F" if female else "M",
        density=float(density),
        chest_half_width=float(half_width),
        chest_half_depth=float(half_depth),
        fat_mm=float(fat),
        lung_height=float((255.0 if female else 275.0) * frame * rng.normal(1.0, 0.04)),
        bone_scale=float(frame * (0.95 if female else 1.03)),
        heart_ratio=float(np.clip(rng.normal(0.46, 0.04), 0.36, 0.6)),
        breast_mm=float(breast),
        scoliosis_mm=float(rng.normal(0.0, 3.0)),
        rib_slope=float(rng.normal(0.32, 0.05)),
        shoulder_drop=float(rng.normal(0.28, 0.05)),
        device=bool(device),
        texture_offset=(int(rng.integers(0, 1 << 20)), int(rng.integers(0, 1 << 20))),
    )


# --- texture bank -----------------------------------------------------------


@lru_cache(maxsize=8)
def _texture_bank(size: int, spacing_um: int, kind: str) -> np.ndarray:
    """A (2*size)^2 band-pass Gaussian field, unit variance, shared by all images.

    Built once per matrix size with a fixed seed (so it is identical in every
    worker); each patient reads a window at its own offset.
    """
    spacing = spacing_um / 1000.0
    n = 2 * size
    rng = np.random.default_rng(20250131 + (0 if kind == "trabecular" else 1))
    white = rng.standard_normal((n, n)).astype(np.float32)
    f = np.fft.fftfreq(n, d=spacing)  # cycles / mm
    fr = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    if kind == "trabecular":
        # trabecular spacing ~1-2 mm: band around 0.4 cycles/mm, anisotropic
        # (vertical trabeculae dominate in vertebrae): stretch along y.
        fy = np.abs(f)[:, None]
        band = np.exp(-(((fr - 0.45) / 0.25) ** 2)) * (1.0 + 1.5 * (fy / (fr + 1e-6)))
    elif kind == "vessel":
        # streaks: narrow across (columns, ~3 mm), long along (rows, ~40 mm);
        # sampled in polar coordinates around the hila they fan out radially.
        fx = np.abs(f)[None, :]
        fy = np.abs(f)[:, None]
        band = np.exp(-((fy / 0.025) ** 2)) * np.exp(-(((fx - 0.12) / 0.08) ** 2))
    else:  # lung parenchyma: coarse, 4-15 mm blobs
        band = np.exp(-(((fr - 0.06) / 0.05) ** 2))
    field = np.fft.ifft2(np.fft.fft2(white) * band).real.astype(np.float32)
    sd = float(field.std())
    if sd > 0:
        field /= sd
    return field


def _texture(kind: str, size: int, spacing: float, offset: tuple[int, int]) -> np.ndarray:
    bank = _texture_bank(size, int(round(spacing * 1000)), kind)
    oy = offset[0] % size
    ox = offset[1] % size
    return bank[oy : oy + size, ox : ox + size]


# --- helpers ----------------------------------------------------------------


def _vessels(cv: _Canvas, hx: float, hy: float, *, lateral: bool = False) -> np.ndarray:
    """Fraction of lung air displaced by vessels radiating from the hila (0..~0.2)."""
    X, Y = cv.x[None, :], cv.y[:, None]
    cx = np.where(X < 0, -hx, hx) if not lateral else np.float32(hx)
    dx = X - cx
    dy = Y - hy
    r = np.sqrt(dx * dx + dy * dy)
    theta = np.arctan2(dy, dx)
    bank = _texture_bank(cv.size, int(round(cv.spacing * 1000)), "vessel")
    n = bank.shape[0]
    # vessels branch: more of them (finer angular period) further out
    band = np.floor(r / 50.0)
    ri = (r / cv.spacing + 97.0 * band).astype(np.intp) % n
    ci = ((theta + np.pi) * (60.0 / cv.spacing) * (1.0 + 0.8 * band)).astype(np.intp) % n
    streak = np.clip(bank[ri, ci], 0.0, None)
    amp = 0.10 * np.exp(-r / 120.0) * (1.0 - np.exp(-r / 25.0))
    out: np.ndarray = streak * amp.astype(np.float32)
    return out


def _ramp(v: np.ndarray, width: float) -> np.ndarray:
    """Soft step 0->1 as ``v`` crosses 0 over ``width`` mm (anti-aliased edges)."""
    return np.clip(v / width + 0.5, 0.0, 1.0)


def _chord(d2: np.ndarray) -> np.ndarray:
    """sqrt(1 - d2) clipped at 0: normalised chord of a circle/sphere."""
    return np.sqrt(np.clip(1.0 - d2, 0.0, None))


class _Canvas:
    """Pixel grid in mm plus helpers that write into bounding boxes only."""

    def __init__(self, size: int, fov_mm: float, acq: Acquisition) -> None:
        self.size = size
        self.spacing = fov_mm / size
        c = (np.arange(size, dtype=np.float32) + 0.5) * self.spacing - fov_mm / 2.0
        m = 1.0 / acq.magnification
        # patient coordinates: origin between the lung apices' midline
        self.x = (c - acq.shift_x) * m
        self.y = (c - acq.shift_y) * m + 0.40 * fov_mm * m
        self.A = np.zeros((size, size), dtype=np.float32)
        self.bone_cort = np.zeros((size, size), dtype=np.float32)  # cortical path (mm)
        self.bone_trab = np.zeros((size, size), dtype=np.float32)  # trabecular path (mm)

    def box(self, x0: float, x1: float, y0: float, y1: float) -> tuple[slice, slice, np.ndarray, np.ndarray] | None:
        """Slices (rows, cols) and the coordinates inside a mm box; None when off-image."""
        j0, j1 = np.searchsorted(self.x, [x0, x1])
        i0, i1 = np.searchsorted(self.y, [y0, y1])
        if j1 <= j0 or i1 <= i0:
            return None
        return slice(i0, i1), slice(j0, j1), self.x[j0:j1][None, :], self.y[i0:i1][:, None]


def _tube(
    cv: _Canvas,
    pts: np.ndarray,
    radius: float,
    cortex: float,
    *,
    depth_ratio: float = 1.0,
    marrow: bool = False,
    wire: bool = False,
) -> None:
    """A bone shaped as a tube around a polyline (clavicle, scapular spine, lead).

    Cortical shell of thickness ``cortex`` around a trabecular (or marrow, if
    ``marrow``) core; the beam's path is the chord through an elliptical
    cross-section of half-height ``radius`` and half-depth ``radius*depth_ratio``.
    """
    pad = radius + 2 * cv.spacing
    b = cv.box(pts[:, 0].min() - pad, pts[:, 0].max() + pad, pts[:, 1].min() - pad, pts[:, 1].max() + pad)
    if b is None:
        return
    rows, cols, X, Y = b
    d2 = np.full((Y.shape[0], X.shape[1]), np.inf, dtype=np.float32)
    for (ax, ay), (bx, by) in itertools.pairwise(pts):
        vx, vy = bx - ax, by - ay
        L2 = vx * vx + vy * vy + 1e-9
        t = np.clip(((X - ax) * vx + (Y - ay) * vy) / L2, 0.0, 1.0)
        dx = X - (ax + t * vx)
        dy = Y - (ay + t * vy)
        np.minimum(d2, dx * dx + dy * dy, out=d2)
    if wire:  # metal: solid chord straight into the attenuation image
        cv.A[rows, cols] += MU_WIRE * 2 * radius * _chord(d2 / radius**2)
        return
    _shell_into(cv, rows, cols, d2, radius, cortex, depth_ratio, marrow)


def _shell_into(
    cv: _Canvas,
    rows: slice,
    cols: slice,
    d2: np.ndarray,
    radius: float,
    cortex: float,
    depth_ratio: float,
    marrow: bool,
    gain: float = 1.0,
) -> None:
    outer = 2 * radius * depth_ratio * _chord(d2 / radius**2)
    ri = max(radius - cortex, 0.3)
    inner = 2 * ri * max(depth_ratio - cortex / radius, 0.1) * _chord(d2 / ri**2)
    cv.bone_cort[rows, cols] += gain * (outer - inner)
    if not marrow:
        cv.bone_trab[rows, cols] += gain * inner


# --- frontal (PA / AP) --------------------------------------------------------


def _diaphragm(an: Anatomy, acq: Acquisition, X: np.ndarray) -> np.ndarray:
    """y of the diaphragm surface under each x: two domes, the right one higher."""
    w = an.chest_half_width
    base = an.lung_height + acq.inspiration
    ax = np.abs(X) / w
    dome = base - 28.0 * np.clip(1.0 - ((ax - 0.45) / 0.6) ** 2, 0.0, None)
    right_side = X < 0  # patient right is image left (PA convention)
    y: np.ndarray = dome - np.where(right_side, 12.0, 0.0) + 12.0 * np.clip(ax - 0.85, 0, None) / 0.15
    return y


def _vertebrae(an: Anatomy, y0: float) -> list[tuple[float, float, float]]:
    """(centre y, height, half-width) of T1..L2, from ``y0`` downward."""
    out = []
    y = y0
    s = an.bone_scale
    for k in range(14):
        h = (15.0 + 0.75 * k) * s
        half_w = (14.0 + 1.1 * k) * s
        out.append((y + h / 2, h, half_w))
        y += h + (3.5 + 0.15 * k) * s
    return out


def _render_frontal(cv: _Canvas, an: Anatomy, acq: Acquisition, tex_trab: np.ndarray, tex_lung: np.ndarray) -> None:
    """PA / AP: soft tissue and lungs, then spine, ribs, shoulder girdle and any device, in that order."""
    diaph = _diaphragm(an, acq, cv.x[None, :])  # (1, n)
    heart_cy = _frontal_soft_tissue(cv, an, acq, tex_lung, diaph)
    vert = _vertebrae(an, -18.0 * an.bone_scale)
    _frontal_spine(cv, an, acq, vert)
    _frontal_ribs(cv, an, vert, diaph)
    _clavicles(cv, an, acq)
    _scapulae(cv, an, acq)
    _humeri(cv, an)
    if an.device:
        _frontal_device(cv, an, heart_cy)


def _frontal_soft_tissue(cv: _Canvas, an: Anatomy, acq: Acquisition, tex_lung: np.ndarray, diaph: np.ndarray) -> float:
    """Torso, neck, arms and breasts minus the lungs' air and the trachea; returns the heart's centre y."""
    X, Y = cv.x[None, :], cv.y[:, None]
    ap = acq.view == "AP"
    w = an.chest_half_width
    d = an.chest_half_depth
    s = an.bone_scale
    # Soft tissue: torso (elliptic cylinder whose top follows the shoulders),
    # neck and arms.
    shoulder_y = -32.0 + an.shoulder_drop * np.abs(X)
    torso_w = (w + an.fat_mm + 12.0) * (1.0 + 0.05 * np.clip((Y - 60.0) / 200.0, -1.0, 1.0))
    torso = 2.0 * (d + an.fat_mm) * _chord((X / torso_w) ** 2)
    torso = torso * _ramp(Y - shoulder_y, 30.0)
    neck = 2.0 * 52.0 * s * _chord((X / (52.0 * s)) ** 2) * _ramp(shoulder_y + 20.0 - Y, 40.0)
    soft = torso + neck
    # arms hang beside the chest (PA: hands on hips, arms partly off the chest)
    arm_r = 42.0 * s + 0.5 * an.fat_mm
    for side in (-1.0, 1.0):
        ax0, ay0 = side * (w + 30.0), -10.0
        ax1, ay1 = side * (w + 75.0), 320.0
        vx, vy = ax1 - ax0, ay1 - ay0
        L = math.hypot(vx, vy)
        dist = np.abs((X - ax0) * vy - (Y - ay0) * vx) / L
        arm = 2.0 * arm_r * _chord((dist / arm_r) ** 2) * _ramp(Y - (ay0 - 20.0), 40.0)
        soft = soft + arm
    # breasts: soft-tissue hemi-ellipsoids over the lower lung fields
    if an.breast_mm > 0:
        for side in (-1.0, 1.0):
            bx, by = side * 0.55 * w, an.lung_height - 35.0
            r2 = ((X - bx) / (0.5 * w)) ** 2 + ((Y - by) / 70.0) ** 2
            soft = soft + an.breast_mm * np.clip(1.0 - r2, 0.0, None) * _ramp(Y - (by - 40.0), 30.0)
    # Lungs: air path length, subtracted from the soft tissue they replace.
    inner_w = w - 6.0
    lung_depth = 2.0 * (d - 14.0) * _chord((X / inner_w) ** 2)
    apex = 4.0 + 0.0025 * (np.abs(X) - 0.5 * w) ** 2
    heart_cx = 0.18 * w * (1.2 if ap else 1.0)
    heart_a = an.heart_ratio * w * (1.12 if ap else 1.0)
    heart_cy = an.lung_height + acq.inspiration - 0.62 * heart_a
    med = 24.0 + 6.0 * np.clip((Y - 40.0) / 120.0, 0.0, 1.0)  # mediastinal half-width
    lung_mask = (
        _ramp(np.abs(X) - (med + 4.0), 10.0)
        * _ramp(Y - apex, 14.0)
        * _ramp(diaph - Y, 8.0)
        * _ramp(inner_w - np.abs(X), 10.0)
    )
    lung_mask *= np.sqrt(np.clip((Y - apex) / 70.0, 0.0, 1.0))  # conical apices
    # lung markings: vessels fan out from the hila, densest centrally
    air = lung_depth * lung_mask * (1.0 - _vessels(cv, 0.3 * w, 115.0) + 0.01 * tex_lung)
    # heart and great vessels displace lung
    hx = (X - heart_cx) / heart_a
    hy = (Y - heart_cy) / (0.8 * heart_a)
    heart = 2.0 * 1.1 * heart_a * _chord(hx**2 + hy**2)
    knob = 2.0 * 22.0 * _chord(((X - 0.18 * w) / 22.0) ** 2 + ((Y - 55.0) / 22.0) ** 2)
    hila = sum(2.0 * 25.0 * _chord(((X - sx * 0.3 * w) / 22.0) ** 2 + ((Y - 110.0) / 35.0) ** 2) for sx in (-1.0, 1.0))
    air = np.clip(air - heart - knob - 0.6 * hila, 0.0, None)
    # trachea: air column down the upper mediastinum
    trachea = 2.0 * 8.5 * _chord(((X + 3.0) / 8.5) ** 2) * _ramp(70.0 - Y, 10.0)
    cv.A += MU_SOFT * (soft - air - trachea)
    return heart_cy


def _frontal_spine(cv: _Canvas, an: Anatomy, acq: Acquisition, vert: list[tuple[float, float, float]]) -> None:
    """Vertebral bodies (elliptic cylinders) with end plates, pedicles and spinous processes."""
    rho = an.cortex  # scales every cortical thickness below
    cort = 0.8 * rho  # vertebral cortical shell (mm)
    # spine: vertebral bodies (elliptic cylinders) with end plates, pedicles,
    # spinous processes; slight scoliosis.
    top = vert[0][0] - vert[0][1]
    bottom = vert[-1][0] + vert[-1][1]
    max_w = max(v[2] for v in vert) + abs(an.scoliosis_mm) + 6.0
    b = cv.box(-max_w, max_w, top, bottom)
    if b is not None:
        rows, cols, Xb, Yb = b
        sx = an.scoliosis_mm * np.sin(np.pi * (Yb - top) / (bottom - top))
        Xr = Xb - sx
        for yc, h, hw in vert:
            i0, i1 = np.searchsorted(Yb[:, 0], [yc - h / 2 - 2, yc + h / 2 + 2])
            if i1 <= i0:
                continue
            Xs, Ys = Xr[i0:i1], Yb[i0:i1]
            rr = slice(rows.start + i0, rows.start + i1)
            vmask = _ramp(h / 2 - np.abs(Ys - yc), 1.0)
            outer = _chord((Xs / hw) ** 2)
            ri = hw - cort
            inner = _chord((Xs / ri) ** 2)
            depth = 0.7 * hw  # AP half-depth of the body
            endplate = _ramp(np.abs(Ys - yc) - (h / 2 - cort * 1.2), 0.8)
            cv.bone_cort[rr, cols] += vmask * (2 * depth * (outer - inner) + endplate * 2 * depth * inner)
            cv.bone_trab[rr, cols] += vmask * (1.0 - endplate) * 2 * (depth - cort) * inner
            # pedicles: cortical rings in the upper half of the body
            for side in (-1.0, 1.0):
                px, py = side * 0.62 * hw, yc - 0.15 * h
                e2 = ((Xs - px) / (0.18 * hw)) ** 2 + ((Ys - py) / (0.28 * h)) ** 2
                ring = _chord(e2) - 0.55 * _chord(e2 / 0.45)
                cv.bone_cort[rr, cols] += 7.0 * rho * ring
            # spinous process (an anterior-posterior shadow, projects lower)
            e2 = ((Xs - 0.3 * acq.rotation) / (0.14 * hw)) ** 2 + ((Ys - (yc + 0.45 * h)) / (0.32 * h)) ** 2
            cv.bone_cort[rr, cols] += 6.0 * rho * _chord(e2)


def _frontal_ribs(cv: _Canvas, an: Anatomy, vert: list[tuple[float, float, float]], diaph: np.ndarray) -> None:
    """Posterior and (fainter) anterior ribs."""
    w = an.chest_half_width
    s = an.bone_scale
    rho = an.cortex
    # ribs: posterior ribs as iso-lines of u = y - g(|x|), anterior ribs as
    # iso-lines of y - k * (w - |x|); nearest rib index by interpolation.
    rib_r = 6.0 * s  # half-height of a rib
    rib_c = 1.3 * rho  # rib cortex
    rib_origins = np.array([v[0] - 0.2 * v[1] for v in vert[:12]], dtype=np.float32)
    x0 = 22.0 * s
    b = cv.box(-(w + 15.0), w + 15.0, rib_origins[0] - 30.0, diaph.max() + 40.0)
    if b is not None:
        rows, cols, Xb, Yb = b
        axb = np.abs(Xb)
        t = np.clip(axb - x0, 0.0, None)
        g = an.rib_slope * t * 0.35 - 0.15 * t + 0.8 * t**3 / w**2  # up a little, then down the wall
        dg = an.rib_slope * 0.35 - 0.15 + 2.4 * t**2 / w**2
        U = Yb - g
        idx = np.interp(U, rib_origins, np.arange(len(rib_origins), dtype=np.float32))
        k = np.clip(np.rint(idx), 0, len(rib_origins) - 1).astype(np.intp)
        dist = (U - rib_origins[k]) / np.sqrt(1.0 + dg * dg)
        # extent: from the transverse process to the lateral wall, above the
        # lowest visible rib; ribs thicken (longer path) where they turn forward.
        wall = w * (0.55 + 0.45 * np.clip((Yb - 0.0) / 90.0, 0.0, 1.0))
        # floating ribs (11, 12) are short
        reach = np.where(k >= 10, 0.5 * wall, wall + 8.0)
        extent = _ramp(axb - x0, 4.0) * _ramp(reach - axb, 6.0)
        turn = 1.0 + 1.6 * np.clip((axb / wall - 0.72) / 0.28, 0.0, 1.0) ** 2
        d2 = dist**2
        rv = rib_r * (0.8 + 0.025 * k)
        rd = 4.5 * s
        outer = _chord(d2 / rv**2)
        inner = _chord(d2 / (rv - rib_c) ** 2)
        cv.bone_cort[rows, cols] += extent * turn * 2 * (rd * outer - (rd - 0.6 * rib_c) * inner)
        cv.bone_trab[rows, cols] += extent * turn * 2 * (rd - 0.6 * rib_c) * inner
        # anterior ribs: fainter (thinner cortex), running down and inward
        lat_y = rib_origins + (an.rib_slope * 0.35 - 0.15) * (w - x0) + 0.8 * (w - x0) ** 3 / w**2
        gA = 0.55 * (wall - axb)
        UA = Yb - gA
        idxA = np.interp(UA, lat_y[:9], np.arange(9, dtype=np.float32))
        kA = np.clip(np.rint(idxA), 0, 8).astype(np.intp)
        distA = (UA - lat_y[kA]) / math.sqrt(1.0 + 0.55**2)
        extA = _ramp(axb - 0.38 * w, 10.0) * _ramp(wall - 4.0 - axb, 6.0) * _ramp(diaph[:, cols] + 5.0 - Yb, 10.0)
        d2A = distA**2
        rA = 0.85 * rib_r
        cv.bone_cort[rows, cols] += (
            0.6 * extA * 2 * 2.5 * s * (_chord(d2A / rA**2) - _chord(d2A / (rA - 0.8 * rib_c) ** 2))
        )
        cv.bone_trab[rows, cols] += 0.6 * extA * 2 * 2.0 * s * _chord(d2A / (rA - 0.8 * rib_c) ** 2)


def _clavicles(cv: _Canvas, an: Anatomy, acq: Acquisition) -> None:
    """S-shaped tubes from the sternal notch to the acromion (flatter on an AP view)."""
    w = an.chest_half_width
    s = an.bone_scale
    rho = an.cortex
    clav_rise = 0.10 if acq.view == "AP" else 0.22
    for side in (-1.0, 1.0):
        xs = np.linspace(18.0 * s, w + 18.0, 12)
        ys = 18.0 * s - clav_rise * (xs - xs[0]) + 6.0 * np.sin(np.pi * (xs - xs[0]) / (xs[-1] - xs[0]) * 2.0)
        pts = np.stack([side * xs + acq.rotation, ys], axis=1)
        _tube(cv, pts, 7.0 * s, 1.8 * rho, depth_ratio=1.0)


def _scapulae(cv: _Canvas, an: Anatomy, acq: Acquisition) -> None:
    """Plate, lateral border, spine and glenoid of each scapula (pulled medially on an AP view)."""
    w = an.chest_half_width
    s = an.bone_scale
    rho = an.cortex
    med_shift = -25.0 if acq.view == "AP" else 0.0
    for side in (-1.0, 1.0):
        sup = np.array([side * (0.55 * w + med_shift), 4.0])
        inf = np.array([side * (0.70 * w + med_shift), 150.0 * s])
        lat = np.array([side * (w + 6.0), 20.0])
        tri = np.stack([sup, inf, lat])
        b = cv.box(tri[:, 0].min() - 10, tri[:, 0].max() + 10, tri[:, 1].min() - 10, tri[:, 1].max() + 10)
        if b is not None:
            rows, cols, Xb, Yb = b
            inside: np.ndarray | None = None
            cx, cy = tri.mean(axis=0)
            for p, q in ((sup, inf), (inf, lat), (lat, sup)):
                nx, ny = q[1] - p[1], -(q[0] - p[0])
                nn = math.hypot(nx, ny)
                sgn = 1.0 if ((cx - p[0]) * nx + (cy - p[1]) * ny) > 0 else -1.0
                sd = sgn * ((Xb - p[0]) * nx + (Yb - p[1]) * ny) / nn
                inside = sd if inside is None else np.minimum(inside, sd)
            assert inside is not None  # three edges, always set
            plate = _ramp(inside, 3.0)
            cv.bone_cort[rows, cols] += plate * 3.0 * rho
            cv.bone_trab[rows, cols] += plate * 2.0
        _tube(cv, np.stack([inf, lat]), 4.5 * s, 1.8 * rho)  # lateral (axillary) border
        _tube(cv, np.stack([sup + [0, 30.0], lat + [side * 10.0, -25.0]]), 4.0 * s, 1.6 * rho)  # spine
        # glenoid
        gx, gy = lat[0] + side * 4.0, lat[1] + 8.0
        b = cv.box(gx - 16, gx + 16, gy - 24, gy + 24)
        if b is not None:
            rows, cols, Xb, Yb = b
            d2 = ((Xb - gx) / 12.0) ** 2 + ((Yb - gy) / 20.0) ** 2
            _shell_into(cv, rows, cols, d2 * 144.0, 12.0, 2.0 * rho, 1.6, False)


def _humeri(cv: _Canvas, an: Anatomy) -> None:
    """Proximal humeri: head (sphere) and shaft (cylinder with marrow canal)."""
    w = an.chest_half_width
    s = an.bone_scale
    rho = an.cortex
    for side in (-1.0, 1.0):
        hx0, hy0 = side * (w + 30.0), 34.0
        R = 23.0 * s
        b = cv.box(hx0 - R - 2, hx0 + R + 2, hy0 - R - 2, hy0 + R + 2)
        if b is not None:
            rows, cols, Xb, Yb = b
            d2 = (Xb - hx0) ** 2 + (Yb - hy0) ** 2
            _shell_into(cv, rows, cols, d2, R, 1.8 * rho, 1.0, False)
        shaft = np.array([[hx0 + side * 4.0, hy0 + 0.7 * R], [hx0 + side * 45.0, hy0 + 170.0]])
        _tube(cv, shaft, 12.0 * s, 3.8 * rho, marrow=True)


def _frontal_device(cv: _Canvas, an: Anatomy, heart_cy: float) -> None:
    """Pacemaker-like can in the left infraclavicular region plus its lead into the heart."""
    w = an.chest_half_width
    cx0, cy0 = 0.45 * w, 45.0
    b = cv.box(cx0 - 25, cx0 + 25, cy0 - 20, cy0 + 20)
    if b is not None:
        rows, cols, Xb, Yb = b
        can = _ramp(22.0 - np.abs(Xb - cx0), 2.0) * _ramp(17.0 - np.abs(Yb - cy0), 2.0)
        cv.A[rows, cols] += MU_METAL * 7.0 * can
    lead = np.array(
        [[cx0 - 10, cy0 + 5], [0.12 * w, 25.0], [-0.05 * w, 90.0], [0.02 * w, heart_cy], [0.2 * w, heart_cy + 30]]
    )
    _tube(cv, lead, 1.2, 0.0, wire=True)


# --- lateral -----------------------------------------------------------------


def _render_lateral(cv: _Canvas, an: Anatomy, acq: Acquisition, tex_trab: np.ndarray, tex_lung: np.ndarray) -> None:
    """Left lateral: beam right-to-left; anterior at image left, posterior at right."""
    diaph = _lateral_soft_tissue(cv, an, acq, tex_lung)
    vert = _vertebrae(an, -18.0 * an.bone_scale)
    _lateral_spine(cv, an, vert)
    _lateral_chest_wall(cv, an, vert, diaph)


def _lateral_soft_tissue(cv: _Canvas, an: Anatomy, acq: Acquisition, tex_lung: np.ndarray) -> np.ndarray:
    """Torso and neck minus both lungs' air, the heart and the trachea; returns the diaphragm's y."""
    Z, Y = cv.x[None, :], cv.y[:, None]  # Z: anterior (-) to posterior (+)
    w = an.chest_half_width
    d = an.chest_half_depth
    s = an.bone_scale
    dd = d + an.fat_mm
    # torso path across the full width; arms raised out of the field
    shoulder_y = -45.0 + 0.2 * np.clip(-Z, 0, None)
    torso = 2.0 * (w + an.fat_mm + 10.0) * _chord((Z / dd) ** 2) * _ramp(Y - shoulder_y, 30.0)
    neck = 2.0 * 52.0 * s * _chord(((Z - 10.0) / 55.0) ** 2) * _ramp(shoulder_y + 20.0 - Y, 40.0)
    soft = torso + neck
    if an.breast_mm > 0:
        r2 = ((Z + dd) / (an.breast_mm + 5.0)) ** 2 + ((Y - an.lung_height + 35.0) / 70.0) ** 2
        soft = soft + 2.0 * 0.5 * w * np.clip(1.0 - r2, 0.0, None)
    # lungs (both, superimposed): air path ~ twice a hemithorax; rounded apex,
    # diaphragm high in front and deep in the posterior sulcus
    inner_d = d - 12.0
    base = an.lung_height + acq.inspiration
    zn = Z / inner_d
    diaph: np.ndarray = base - 35.0 * np.clip(1.0 - ((zn + 0.15) / 1.0) ** 2, 0.0, None) + 45.0 * np.clip(zn, 0.0, 1.0) ** 2
    apex = 8.0 + 60.0 * np.clip(np.abs(zn + 0.1) - 0.35, 0.0, None) ** 2 * 4.0
    lung_mask = _ramp(inner_d - np.abs(Z), 10.0) * _ramp(Y - apex, 14.0) * _ramp(diaph - Y, 8.0)
    lung_mask *= np.sqrt(np.clip((Y - apex) / 60.0, 0.0, 1.0))
    air = 2.0 * (w - 35.0) * _chord(zn**2) * lung_mask
    air = air * (1.0 - _vessels(cv, 0.0, 115.0, lateral=True) + 0.01 * tex_lung)
    heart_a = an.heart_ratio * w
    hz, hy = -0.3 * d, base - 0.6 * heart_a
    heart = 2.0 * 1.1 * heart_a * _chord(((Z - hz) / (0.6 * d)) ** 2 + ((Y - hy) / (0.8 * heart_a)) ** 2)
    air = np.clip(air - heart, 0.0, None)
    trachea = 2.0 * 9.0 * _chord(((Z + 0.05 * d) / 9.0) ** 2) * _ramp(80.0 - Y, 10.0)
    cv.A += MU_SOFT * (soft - air - trachea)
    return diaph


def _lateral_spine(cv: _Canvas, an: Anatomy, vert: list[tuple[float, float, float]]) -> None:
    """Vertebral bodies in profile (boxes), posterior elements behind."""
    d = an.chest_half_depth
    rho = an.cortex
    z_sp = 0.45 * d
    cort = 1.0 * rho
    for yc, h, hw in vert:
        depth_r = 0.8 * hw  # AP radius of the body, seen in profile
        b = cv.box(z_sp - depth_r - 2, z_sp + depth_r + 45, yc - h / 2 - 2, yc + h / 2 + 2)
        if b is None:
            continue
        rows, cols, Zb, Yb = b
        vmask = _ramp(h / 2 - np.abs(Yb - yc), 1.0)
        zz = (Zb - z_sp) / depth_r
        inside = _ramp(1.0 - np.abs(zz), 0.05)
        endplate = _ramp(np.abs(Yb - yc) - (h / 2 - 1.2 * cort), 0.8)
        wall = _ramp(np.abs(zz) - (1.0 - cort / depth_r), 0.05)
        width = 2.0 * hw  # beam crosses the whole body width
        cv.bone_cort[rows, cols] += vmask * inside * (np.maximum(endplate, wall) * width + 2 * 2 * cort)
        cv.bone_trab[rows, cols] += vmask * inside * (1.0 - np.maximum(endplate, wall)) * (width - 2 * cort)
        # posterior elements: pedicles, laminae and spinous process
        pe = _ramp(Zb - (z_sp + depth_r), 2.0) * _ramp(z_sp + depth_r + 40.0 - Zb, 4.0) * vmask
        cv.bone_cort[rows, cols] += pe * 9.0 * rho


def _lateral_chest_wall(cv: _Canvas, an: Anatomy, vert: list[tuple[float, float, float]], diaph: np.ndarray) -> None:
    """Sternum, both rib families, the scapulae and any device, seen from the side."""
    d = an.chest_half_depth
    s = an.bone_scale
    rho = an.cortex
    dd = d + an.fat_mm
    z_sp = 0.45 * d
    # sternum
    sz = -dd + an.fat_mm + 10.0
    b = cv.box(sz - 8, sz + 8, 20.0, 190.0 * s)
    if b is not None:
        rows, cols, Zb, Yb = b
        st = _chord(((Zb - sz) / 6.0) ** 2) * _ramp(Yb - 25.0, 6.0) * _ramp(185.0 * s - Yb, 6.0)
        cv.bone_cort[rows, cols] += st * 8.0 * rho
        cv.bone_trab[rows, cols] += st * 18.0
    # ribs: two slightly offset families running antero-inferiorly
    rib_origins = np.array([v[0] for v in vert[:12]], dtype=np.float32)
    b = cv.box(-dd, dd, rib_origins[0] - 20.0, float(np.max(diaph)) + 30.0)
    if b is not None:
        rows, cols, Zb, Yb = b
        for off, gain in ((0.0, 1.0), (7.0, 0.8)):
            U = Yb - 0.45 * (z_sp - Zb) - off
            idx = np.interp(U, rib_origins, np.arange(12, dtype=np.float32))
            k = np.clip(np.rint(idx), 0, 11).astype(np.intp)
            dist = (U - rib_origins[k]) / math.sqrt(1 + 0.45**2)
            ext = _ramp(z_sp - Zb, 6.0) * _ramp(Zb + dd - 15.0, 10.0)
            d2 = dist**2
            rv = 5.5 * s
            outer = _chord(d2 / rv**2)
            inner = _chord(d2 / (rv - 1.1 * rho) ** 2)
            cv.bone_cort[rows, cols] += gain * ext * 2 * 3.0 * s * (outer - inner)
            cv.bone_trab[rows, cols] += gain * ext * 2 * 2.4 * s * inner
    # scapulae overlap the upper posterior chest
    b = cv.box(0.2 * d, dd, 0.0, 170.0)
    if b is not None:
        rows, cols, Zb, Yb = b
        plate = _ramp(Zb - (0.35 * d + 0.15 * (Yb - 10.0)), 6.0) * _ramp(Yb - 10.0, 6.0) * _ramp(160.0 * s - Yb, 8.0)
        plate *= _ramp(d - 2.0 - Zb, 4.0)
        cv.bone_cort[rows, cols] += plate * 2 * 3.0 * rho
        cv.bone_trab[rows, cols] += plate * 2 * 2.0
    if an.device:
        cz, cy0 = -dd + an.fat_mm + 20.0, 45.0
        b = cv.box(cz - 12, cz + 12, cy0 - 22, cy0 + 22)
        if b is not None:
            rows, cols, Zb, Yb = b
            can = _ramp(6.0 - np.abs(Zb - cz), 2.0) * _ramp(20.0 - np.abs(Yb - cy0), 2.0)
            cv.A[rows, cols] += MU_METAL * 40.0 * can


# --- public -------------------------------------------------------------------


def render_attenuation(an: Anatomy, acq: Acquisition, size: int, fov_mm: float) -> np.ndarray:
    """Line-integral image ``A = sum(mu * path)`` of one exposure (float32, >= 0).

    Higher is more attenuation; bone density enters only through the bone
    path lengths and their mineral content.
    """
    return render_layers(an, acq, size, fov_mm)[0]


def render_layers(an: Anatomy, acq: Acquisition, size: int, fov_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """``(A, bone_mask)``: the attenuation image and where any bone lies.

    The mask is the bones' outer outline, which does not depend on density
    (only cortical thickness and mineral do), so a detector that ignores
    masked pixels when it auto-ranges cannot rescale the image by density.
    """
    if size < 16:
        raise ValueError(f"size must be >= 16 pixels, got {size}")
    cv = _Canvas(size, fov_mm, acq)
    tex_trab = _texture("trabecular", size, cv.spacing, an.texture_offset)
    tex_lung = _texture("lung", size, cv.spacing, an.texture_offset[::-1])
    if acq.view == "LAT":
        _render_lateral(cv, an, acq, tex_trab, tex_lung)
    else:
        _render_frontal(cv, an, acq, tex_trab, tex_lung)
    bone_mask = (cv.bone_cort + cv.bone_trab) > 0.05
    rho = an.rho
    # Trabecular volume fraction falls faster than cortical mineral, and the
    # network gets sparser and more heterogeneous (coarser texture) as it falls.
    bvtv = TRAB_BVTV_REF * rho**BVTV_EXP
    hetero = 0.25 + 0.5 * max(0.0, 1.0 - rho)
    frac = bvtv * np.clip(1.0 + hetero * tex_trab, 0.0, None)
    cv.A += MU_CORTICAL * rho**MINERAL_EXP * cv.bone_cort
    cv.A += MU_TRABECULAR * cv.bone_trab * frac
    np.maximum(cv.A, 0.0, out=cv.A)
    return cv.A, bone_mask
