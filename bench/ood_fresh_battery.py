"""The "fresh" non-chest battery of bench/bench_ood.py: other files, other generators, never used for a choice.

Differs from the dev / held-out halves on purpose (honest generalisation check):
other files of the installed packages (pydicom-data's ultrasound frames and other
CT windowings, matplotlib's and scikit-learn's sample images, scikit-image images
the battery does not use) and other synthetic generators (fractal noise, gratings,
salt-and-pepper, ellipses, polygons, spine-, pelvis-, skull-, forearm-, foot- and
abdomen-like shapes, barcodes, inverted and large text, Voronoi cells). Every image
is wrapped in the same valid adult chest CR header (bench_ood.chest_header_dicom).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from bench_ood import Item, _data_store, _to_12bit, chest_header_dicom

def _window(ds_path: Path, centre: float, width: float) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_modality_lut

    ds = pydicom.dcmread(ds_path)
    hu = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    return np.clip((hu - (centre - width / 2)) / width, 0, 1)


def _pd_frame(ds_path: Path, which: str) -> np.ndarray:
    import pydicom

    arr = pydicom.dcmread(ds_path).pixel_array
    return np.asarray(arr[0] if which == "first" else arr[-1], dtype=np.float64)


def _pd_colour(ds_path: Path) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_color_lut, convert_color_space

    ds = pydicom.dcmread(ds_path)
    arr = ds.pixel_array
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        arr = arr[0]
    pi = str(ds.get("PhotometricInterpretation", ""))
    if pi == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    elif pi.startswith("YBR"):
        arr = convert_color_space(arr, pi, "RGB")
    return np.asarray(arr, dtype=np.float64)


def _mpl(name: str) -> np.ndarray:
    import gzip

    import matplotlib
    from PIL import Image

    root = Path(matplotlib.get_data_path()) / "sample_data"
    if name == "s1045.ima.gz":  # an MR brain slice, raw 16-bit 256 x 256
        with gzip.open(root / name) as fh:
            return np.frombuffer(fh.read(), np.uint16).reshape(256, 256).astype(np.float64)
    if name.endswith(".npz"):
        z = np.load(root / name)
        return np.asarray(z["elevation" if "elevation" in z.files else "topo"], dtype=np.float64)
    if name.endswith(".npy"):
        return np.load(root / "axes_grid" / name).astype(np.float64)
    return np.asarray(Image.open(root / name).convert("RGB"), dtype=np.float64)


def _sklearn(name: str) -> np.ndarray:
    import sklearn.datasets as skds

    if name == "digits":
        d = skds.load_digits().images[:64]
        return np.block([[d[r * 8 + c] for c in range(8)] for r in range(8)]).astype(np.float64)
    imgs = skds.load_sample_images()
    return np.asarray(imgs.images[[Path(f).name for f in imgs.filenames].index(name)], dtype=np.float64)


def _skimage_extra(name: str) -> np.ndarray:
    import skimage.data as skd

    if name == "lfw_subset":
        f = skd.lfw_subset()[:64]
        return np.block([[f[r * 8 + c] for c in range(8)] for r in range(8)]).astype(np.float64)
    if name == "stereo_motorcycle":
        return np.asarray(skd.stereo_motorcycle()[0], dtype=np.float64)
    return np.asarray(getattr(skd, name)(), dtype=np.float64)


def _blurred(img: np.ndarray, sigma: float, rng: np.random.Generator, noise: float = 0.02) -> np.ndarray:
    import cv2

    return cv2.GaussianBlur(img.astype(np.float32), (0, 0), sigma) + rng.normal(0, noise, img.shape)


def _fresh_synthetic(kind: str, seed: int, size: int = 1024) -> np.ndarray:
    """Generators the dev/held-out halves do not use."""
    import cv2

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    if kind == "fractal_noise":  # 1/f^beta noise
        beta = rng.uniform(1.5, 3.0)
        f = np.fft.fftfreq(size)
        k = np.hypot(*np.meshgrid(f, f))
        k[0, 0] = 1
        spec = (rng.normal(size=(size, size)) + 1j * rng.normal(size=(size, size))) / k ** (beta / 2)
        return np.real(np.fft.ifft2(spec))
    if kind == "grating":
        ang, freq = rng.uniform(0, np.pi), rng.uniform(4, 30)
        return np.sin(2 * np.pi * freq * (np.cos(ang) * xx + np.sin(ang) * yy)) + rng.normal(0, 0.05, (size, size))
    if kind == "salt_pepper":
        img = np.full((size, size), 0.5) + rng.normal(0, 0.05, (size, size))
        m = rng.random((size, size))
        img[m < 0.05], img[m > 0.95] = 0, 1
        return img
    if kind == "ellipses":
        img = np.zeros((size, size), np.float32)
        for _ in range(int(rng.integers(5, 15))):
            c = tuple(int(v) for v in rng.integers(100, size - 100, 2))
            ax = tuple(int(v) for v in rng.integers(20, 250, 2))
            cv2.ellipse(img, c, ax, float(rng.uniform(0, 180)), 0, 360, float(rng.uniform(0.2, 1.0)), -1)
        return _blurred(img, 2, rng)
    if kind == "polygons":
        img = np.full((size, size), float(rng.uniform(0, 0.3)), np.float32)
        for _ in range(int(rng.integers(3, 9))):
            pts = rng.integers(0, size, (int(rng.integers(3, 7)), 2)).astype(np.int32)
            cv2.fillPoly(img, [pts], float(rng.uniform(0.3, 1.0)))
        return _blurred(img, 1.5, rng)
    if kind == "spine":  # a column of vertebral bodies with discs, soft tissue around (a spine view)
        img = np.full((size, size), 0.05, np.float32)
        cx = size // 2 + int(rng.integers(-40, 40))
        cv2.rectangle(img, (cx - int(size * 0.3), 0), (cx + int(size * 0.3), size), 0.35, -1)
        h = int(size / rng.uniform(5.5, 8))
        for y in range(0, size, h):
            w = int(size * rng.uniform(0.09, 0.12))
            cv2.rectangle(img, (cx - w, y + int(0.12 * h)), (cx + w, y + h - int(0.12 * h)), 0.85, -1)
            cv2.circle(img, (cx, y + h // 2), int(w * 0.35), 0.95, -1)
        return _blurred(img, 4, rng)
    if kind == "pelvis":  # iliac wings, a ring, two femoral heads
        img = np.full((size, size), 0.05, np.float32)
        cv2.ellipse(img, (size // 2, size // 2), (int(size * 0.45), int(size * 0.4)), 0, 0, 360, 0.3, -1)
        for s in (-1, 1):
            cv2.ellipse(img, (size // 2 + s * int(size * 0.22), int(size * 0.35)), (int(size * 0.18), int(size * 0.12)),
                        s * 20, 0, 360, 0.8, int(size * 0.04))
            cv2.circle(img, (size // 2 + s * int(size * 0.25), int(size * 0.68)), int(size * 0.07), 0.9, -1)
            cv2.line(img, (size // 2 + s * int(size * 0.28), int(size * 0.7)),
                     (size // 2 + s * int(size * 0.33), size), 0.85, int(size * 0.07))
        cv2.ellipse(img, (size // 2, int(size * 0.62)), (int(size * 0.14), int(size * 0.1)), 0, 0, 360, 0.8,
                    int(size * 0.03))
        return _blurred(img, 3 + rng.uniform(0, 2), rng)
    if kind == "skull":
        img = np.full((size, size), 0.05, np.float32)
        ax = (int(size * rng.uniform(0.33, 0.4)), int(size * rng.uniform(0.4, 0.46)))
        cv2.ellipse(img, (size // 2, size // 2), ax, 0, 0, 360, 0.45, -1)
        cv2.ellipse(img, (size // 2, size // 2), ax, 0, 0, 360, 0.95, int(size * 0.03))
        cv2.ellipse(img, (size // 2, int(size * 0.78)), (int(size * 0.2), int(size * 0.1)), 0, 0, 180, 0.9,
                    int(size * 0.03))
        return _blurred(img, 3, rng)
    if kind == "forearm":  # two long parallel bones (radius, ulna) in soft tissue, oblique
        img = np.full((size, size), 0.05, np.float32)
        ang = rng.uniform(-20, 20)
        m = cv2.getRotationMatrix2D((size / 2, size / 2), ang, 1.0)
        cv2.rectangle(img, (int(size * 0.3), 0), (int(size * 0.7), size), 0.3, -1)
        for x0 in (0.42, 0.56):
            cv2.rectangle(img, (int(size * (x0 - 0.035)), 0), (int(size * (x0 + 0.035)), size), 0.85, -1)
            cv2.rectangle(img, (int(size * (x0 - 0.02)), 0), (int(size * (x0 + 0.02)), size), 0.6, -1)
        img = cv2.warpAffine(img, m, (size, size), borderValue=0.05)
        return _blurred(img, 3, rng)
    if kind == "foot":
        img = np.full((size, size), 0.05, np.float32)
        cv2.ellipse(img, (size // 2, size // 2), (int(size * 0.22), int(size * 0.45)), 0, 0, 360, 0.3, -1)
        cv2.ellipse(img, (size // 2, int(size * 0.82)), (int(size * 0.12), int(size * 0.1)), 0, 0, 360, 0.85, -1)
        for k in range(5):
            x = size // 2 + int((k - 2) * size * 0.07)
            cv2.line(img, (x, int(size * 0.65)), (x + int((k - 2) * 10), int(size * 0.25)), 0.85, int(size * 0.025))
            cv2.line(img, (x + int((k - 2) * 10), int(size * 0.22)), (x + int((k - 2) * 14), int(size * 0.08)), 0.8,
                     int(size * 0.02))
        return _blurred(img, 3, rng)
    if kind == "abdomen":  # soft tissue with dark gas bubbles and a spine
        img = np.full((size, size), 0.05, np.float32)
        cv2.ellipse(img, (size // 2, size // 2), (int(size * 0.46), int(size * 0.44)), 0, 0, 360, 0.5, -1)
        for _ in range(int(rng.integers(10, 25))):
            c = tuple(int(v) for v in rng.integers(int(size * 0.2), int(size * 0.8), 2))
            cv2.circle(img, c, int(rng.integers(15, 60)), 0.2, -1)
        cv2.rectangle(img, (size // 2 - int(size * 0.05), 0), (size // 2 + int(size * 0.05), size), 0.8, -1)
        return _blurred(img, 5, rng)
    if kind == "barcode":
        widths = rng.integers(4, 40, 200)
        cols = np.repeat(np.arange(len(widths)) % 2, widths)[:size]
        cols = np.pad(cols, (0, max(0, size - len(cols))))
        return np.tile(cols, (size, 1)).astype(np.float64) + rng.normal(0, 0.03, (size, size))
    if kind in ("text_inverted", "text_large"):
        from PIL import Image, ImageDraw, ImageFont

        bg, fg = (20, 230) if kind == "text_inverted" else (240, 10)
        img = Image.new("L", (size, size), bg)
        draw = ImageDraw.Draw(img)
        try:
            font = ImageFont.load_default(size=int(rng.integers(40, 90)) if kind == "text_large" else 18)
        except TypeError:  # Pillow < 10.1: one bitmap size
            font = ImageFont.load_default()
        y = 30
        while y < size - 30:
            line = "".join(rng.choice(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789"), int(rng.integers(8, 30))))
            draw.text((30, y), line, fill=fg, font=font)
            y += int(font.size * 1.4) if hasattr(font, "size") else 20
        return np.asarray(img, dtype=np.float64)
    if kind == "voronoi":
        pts = rng.random((int(rng.integers(20, 80)), 2))
        d = np.min(np.stack([np.hypot(yy - p[0], xx - p[1]) for p in pts]), axis=0)
        return d + rng.normal(0, 0.01, (size, size))
    raise ValueError(kind)


FRESH_SYNTHETIC = ("fractal_noise", "grating", "salt_pepper", "ellipses", "polygons", "spine", "pelvis", "skull",
                   "forearm", "foot", "abdomen", "barcode", "text_inverted", "text_large", "voronoi")
FRESH_FILES: list[tuple[str, str, Any]] = [
    ("ct", "pydicom-data/693_UNCR.dcm lung window", lambda d: _window(d / "693_UNCR.dcm", -600, 1500)),
    ("ct", "pydicom-data/693_UNCR.dcm bone window", lambda d: _window(d / "693_UNCR.dcm", 400, 1800)),
    ("ct", "pydicom-data/explicit_VR-UN.dcm soft-tissue window", lambda d: _window(d / "explicit_VR-UN.dcm", 40, 400)),
    ("ct", "pydicom-data/bad_sequence.dcm bone window", lambda d: _window(d / "bad_sequence.dcm", 400, 1800)),
    ("ct", "pydicom-data/eCT_Supplemental.dcm first frame", lambda d: _pd_frame(d / "eCT_Supplemental.dcm", "first")),
    ("mr", "pydicom-data/emri_small.dcm first frame", lambda d: _pd_frame(d / "emri_small.dcm", "first")),
    ("mr", "pydicom-data/emri_small.dcm last frame", lambda d: _pd_frame(d / "emri_small.dcm", "last")),
    ("mr", "matplotlib/s1045.ima.gz", lambda d: _mpl("s1045.ima.gz")),
    ("us", "pydicom-data/OBXXXX1A.dcm", lambda d: _pd_colour(d / "OBXXXX1A.dcm")),
    ("us", "pydicom-data/US1_UNCR.dcm", lambda d: _pd_colour(d / "US1_UNCR.dcm")),
    ("us", "pydicom-data/gdcm-US-ALOKA-16.dcm", lambda d: _pd_colour(d / "gdcm-US-ALOKA-16.dcm")),
    ("photo", "matplotlib/grace_hopper.jpg", lambda d: _mpl("grace_hopper.jpg")),
    ("photo", "matplotlib/Minduka_Present_Blue_Pack.png", lambda d: _mpl("Minduka_Present_Blue_Pack.png")),
    ("text", "matplotlib/logo2.png", lambda d: _mpl("logo2.png")),
    ("terrain", "matplotlib/jacksboro_fault_dem.npz", lambda d: _mpl("jacksboro_fault_dem.npz")),
    ("terrain", "matplotlib/topobathy.npz", lambda d: _mpl("topobathy.npz")),
    ("gradient", "matplotlib/bivariate_normal.npy", lambda d: _mpl("bivariate_normal.npy")),
    ("photo", "sklearn/china.jpg", lambda d: _sklearn("china.jpg")),
    ("photo", "sklearn/flower.jpg", lambda d: _sklearn("flower.jpg")),
    ("text", "sklearn/digits mosaic", lambda d: _sklearn("digits")),
    ("photo", "skimage/cat", lambda d: _skimage_extra("cat")),
    ("pattern", "skimage/colorwheel", lambda d: _skimage_extra("colorwheel")),
    ("text", "skimage/logo", lambda d: _skimage_extra("logo")),
    ("photo", "skimage/lfw_subset mosaic", lambda d: _skimage_extra("lfw_subset")),
    ("photo", "skimage/stereo_motorcycle", lambda d: _skimage_extra("stereo_motorcycle")),
]


def build_fresh(work: Path, per_kind: int = 3) -> list[Item]:
    """The fresh half: files and generators the dev and held-out halves do not use."""
    items: list[Item] = []
    data = _data_store()
    seed = 5000
    for group, name, load in FRESH_FILES:
        try:
            px = load(data)
        except Exception as exc:  # a file missing from this install is left out, and said so
            print(f"  (skipped {name}: {type(exc).__name__}: {exc})", file=sys.stderr)
            continue
        seed += 1
        items.append(Item(name, group, chest_header_dicom(_to_12bit(px), work / "fresh" / f"fr_{seed:04d}.dcm", seed),
                          "fresh"))
    for kind in FRESH_SYNTHETIC:
        for j in range(per_kind):
            seed += 1
            items.append(Item(f"synthetic/{kind}#{j}", kind, chest_header_dicom(
                _to_12bit(_fresh_synthetic(kind, 7000 + j)), work / "fresh" / f"frs_{seed:04d}.dcm", seed), "fresh"))
    return items
