"""Out-of-distribution battery: is a non-chest image refused, and is an unseen chest image kept?

Builds a battery of **non-chest pixel data in valid adult chest CR headers**
(BodyPartExamined CHEST, ViewPosition PA, PatientAge 065Y, Modality CR), so
that only the content checks can catch it:

- real DICOMs shipped by pydicom-data (located through the installed
  ``data_store`` package, never ``get_testdata_file``): CT and MR slices, an NM
  whole-body bone scan, a grayscale ultrasound frame, a CR extremity (tibia)
  radiograph, modality/VOI LUT test patterns;
- images scikit-image ships: photographs (camera, moon, coins, textures, ...),
  a scanned page and a text image, a Shepp-Logan phantom, microscopy;
- synthetic: uniform and Gaussian noise, linear and radial gradients, rendered
  text pages (PIL), hand-like and knee-like shapes, checkerboards.

and the **eligible chest images of the phantom's external sites** (EXT_A, EXT_B,
EXT_C: vendor looks the model never trained on), plus the internal test split.

Every item goes through ``ScreeningEngine.prepare`` (the real gate: header and
pixel checks, lung-field check); the eligible ones are then scored by each
OOD candidate, each with its threshold at ``--quantile`` of the tuning split's
scores:

- ``mahalanobis`` (the product's: class-conditional Gaussian, shared
  Ledoit-Wolf covariance, L2-normalised penultimate features),
- ``mahalanobis_raw`` (the same on raw features), ``mahalanobis_oas`` (OAS shrinkage),
- ``energy`` (-logsumexp of the logits; Liu et al. 2020), ``msp`` (1 - max softmax),
- ``feature_norm`` (distance of the feature norm from the training median),
- ``combined`` (max of mahalanobis and energy, each divided by its threshold).

The battery is split, by source (both encodings of one pydicom-data image land on
the same side; synthetic items by seed), into a **dev** half (used to choose the
method and the quantile) and a **held-out** half reported separately, plus a
**fresh** set (``ood_fresh_battery.py``: other files, other generators) added after
the method was chosen and used for no choice.

``product`` is the artifact's own OOD part (the shipped method: per-block Mahalanobis
on the penultimate embedding and the deeper stages' channel statistics, max of the
scaled block distances; ``bonescreen.ood``) with its stored thresholds, on the full
feature vector (``LoadedModel.features``): rows ``refused`` (score > 1) and
``refused or flagged`` (score above the flag band's start).

    python bench/bench_ood.py --demo demo-out --out bench/results/ood_demo_student.json
    python bench/bench_ood.py --model M.pt --manifest cohort/manifest.csv --cache cache --phantom phantom/
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

EXTERNAL_SITES = ("EXT_A", "EXT_B", "EXT_C")


@dataclass
class Item:
    name: str
    group: str
    path: Path
    half: str  # dev | holdout


def _data_store() -> Path:
    spec = importlib.util.find_spec("data_store")
    if spec is None or not spec.origin:
        raise SystemExit("pydicom-data is not installed (pip install pydicom-data)")
    return Path(spec.origin).parent / "data"


def _to_12bit(img: np.ndarray, size: int = 1024) -> np.ndarray:
    """Any 2-D image -> 12-bit uint16 at ``size`` on the long side (at least 512 on the short one)."""
    import cv2

    a = np.asarray(img, dtype=np.float64)
    if a.ndim == 3:
        a = a[..., :3].mean(axis=2) if a.shape[2] >= 3 else a[..., 0]
    lo, hi = np.nanpercentile(a, 0.5), np.nanpercentile(a, 99.5)
    if hi <= lo:
        lo, hi = float(np.nanmin(a)), float(np.nanmax(a)) + 1e-6
    a = np.clip((np.nan_to_num(a, nan=lo) - lo) / (hi - lo), 0, 1)
    h, w = a.shape
    scale = size / max(h, w)
    nh, nw = max(512, int(round(h * scale))), max(512, int(round(w * scale)))
    a = cv2.resize(a.astype(np.float32), (nw, nh), interpolation=cv2.INTER_LINEAR)
    return np.round(a * 4095).astype(np.uint16)


def chest_header_dicom(pixels: np.ndarray, path: Path, seed: int) -> Path:
    """A valid adult chest CR (PA, 65 years, CHEST) around ``pixels`` (12-bit MONOCHROME2)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["bench_ood", path.name, str(seed)])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["bench_ood-study", path.name, str(seed)])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["bench_ood-series", path.name, str(seed)])
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientAge = "065Y"
    ds.PatientSex = "F"
    ds.PatientID = f"OOD{seed:05d}"
    ds.StudyDate = "20240115"
    ds.Manufacturer = "bench"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelSpacing = [0.2, 0.2]
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


# --------------------------------------------------------------------------- sources


def _dicom_pixels(path: Path) -> np.ndarray:
    """Display pixels of a pydicom-data file (modality + VOI LUT, MONOCHROME1 inverted); middle frame."""
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(path)
    arr = ds.pixel_array
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        arr = arr[len(arr) // 2]
    if ds.get("SamplesPerPixel", 1) == 3 or arr.ndim == 3:
        return np.asarray(arr, dtype=np.float64).mean(axis=-1)
    arr = apply_modality_lut(arr, ds)
    try:
        arr = apply_voi_lut(arr, ds)
    except Exception:
        pass
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        arr = arr.max() - arr
    return np.asarray(arr, dtype=np.float64)


# (group, content key, file): one content key per distinct image (encodings share it)
PYDICOM_DATA = [
    ("ct", "693", "693_UNCR.dcm"), ("ct", "693", "693_J2KR.dcm"),
    ("ct", "ect", "eCT_Supplemental.dcm"), ("ct", "pancreas", "explicit_VR-UN.dcm"),
    ("ct", "neck", "bad_sequence.dcm"),
    ("mr", "shoulder", "MR2_UNCR.dcm"), ("mr", "shoulder", "MR2_J2KR.dcm"),
    ("mr", "abdomen", "MR-SIEMENS-DICOM-WithOverlays.dcm"), ("mr", "head", "emri_small.dcm"),
    ("nm", "bonescan", "JPEG-LL.dcm"),
    ("us", "us8", "JPGLosslessP14SV1_1s_1f_8b.dcm"),
    ("radiograph", "tibia", "RG3_UNCR.dcm"), ("radiograph", "tibia", "RG3_J2KR.dcm"),
    ("pattern", "mlut", "mlut_18.dcm"), ("pattern", "vlut", "vlut_04.dcm"),
    ("seg", "liver", "liver.dcm"),
]
SKIMAGE = [
    ("photo", "camera"), ("photo", "moon"), ("photo", "coins"), ("texture", "brick"), ("texture", "grass"),
    ("texture", "gravel"), ("text", "page"), ("text", "text"), ("pattern", "checkerboard"), ("photo", "clock"),
    ("photo", "cell"), ("phantom", "shepp_logan_phantom"), ("photo", "astronaut"), ("photo", "coffee"),
    ("photo", "rocket"), ("photo", "hubble_deep_field"), ("photo", "immunohistochemistry"), ("photo", "retina"),
    ("photo", "chelsea"), ("shape", "horse"), ("shape", "binary_blobs"), ("photo", "microaneurysms"),
]


def _text_page(rng: np.random.Generator, size: int = 1024) -> np.ndarray:
    from PIL import Image, ImageDraw

    img = Image.new("L", (size, int(size * 1.3)), 235)
    draw = ImageDraw.Draw(img)
    words = ["radiograph", "report", "patient", "findings", "impression", "the", "of", "and", "normal", "chest",
             "bone", "density", "history", "comparison", "technique"]
    y = 40
    while y < img.height - 40:
        line = " ".join(rng.choice(words, size=int(rng.integers(6, 14))))
        draw.text((40, y), line, fill=int(rng.integers(0, 60)))
        y += int(rng.integers(14, 26))
    return np.asarray(img, dtype=np.float64)


def _hand(rng: np.random.Generator, size: int = 1024) -> np.ndarray:
    """Bone-bright palm + five fingers with phalanges, on dark air, under noise."""
    import cv2

    img = np.full((size, size), 0.05, np.float32)
    cx = size // 2 + int(rng.integers(-60, 60))
    soft = np.zeros_like(img)
    cv2.ellipse(soft, (cx, int(size * 0.7)), (int(size * 0.2), int(size * 0.22)), 0, 0, 360, 1.0, -1)
    for k in range(5):
        ang = np.deg2rad(-40 + 20 * k + rng.normal(0, 4))
        x0, y0 = cx + int((k - 2) * size * 0.08), int(size * 0.55)
        length = size * (0.3 if k else 0.2)
        x1, y1 = int(x0 + length * np.sin(ang)), int(y0 - length * np.cos(ang))
        cv2.line(soft, (x0, y0), (x1, y1), 1.0, int(size * 0.05))
        for j in range(3):
            a = j / 3.0
            b = a + 0.28
            cv2.line(img, (int(x0 + (x1 - x0) * a), int(y0 + (y1 - y0) * a)),
                     (int(x0 + (x1 - x0) * b), int(y0 + (y1 - y0) * b)), 0.9, int(size * 0.022))
    img = np.maximum(img, 0.35 * soft)
    for k in range(5):
        cv2.line(img, (cx + int((k - 2) * size * 0.05), int(size * 0.85)),
                 (cx + int((k - 2) * size * 0.08), int(size * 0.56)), 0.8, int(size * 0.025))
    img = cv2.GaussianBlur(img, (0, 0), 3)
    return img + rng.normal(0, 0.02, img.shape)


def _knee(rng: np.random.Generator, size: int = 1024) -> np.ndarray:
    """Femur above, tibia and fibula below a joint space, soft tissue around, dark air outside."""
    import cv2

    img = np.full((size, size), 0.05, np.float32)
    cx = size // 2 + int(rng.integers(-50, 50))
    cv2.rectangle(img, (cx - int(size * 0.22), 0), (cx + int(size * 0.22), size), 0.3, -1)
    jy = int(size * (0.5 + rng.normal(0, 0.03)))
    cv2.rectangle(img, (cx - int(size * 0.07), 0), (cx + int(size * 0.07), jy - int(size * 0.1)), 0.85, -1)
    cv2.ellipse(img, (cx, jy - int(size * 0.06)), (int(size * 0.13), int(size * 0.06)), 0, 0, 360, 0.85, -1)
    cv2.ellipse(img, (cx, jy + int(size * 0.05)), (int(size * 0.12), int(size * 0.045)), 0, 0, 360, 0.8, -1)
    cv2.rectangle(img, (cx - int(size * 0.065), jy + int(size * 0.05)), (cx + int(size * 0.055), size), 0.8, -1)
    cv2.rectangle(img, (cx + int(size * 0.09), jy + int(size * 0.08)), (cx + int(size * 0.12), size), 0.7, -1)
    img = cv2.GaussianBlur(img, (0, 0), 4)
    return img + rng.normal(0, 0.02, img.shape)


def _synthetic(kind: str, seed: int, size: int = 1024) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    if kind == "noise_uniform":
        return rng.random((size, size))
    if kind == "noise_gaussian":
        return rng.normal(0, 1, (size, size))
    if kind == "gradient_linear":
        ang = rng.uniform(0, np.pi)
        return np.cos(ang) * xx + np.sin(ang) * yy + rng.normal(0, 0.01, (size, size))
    if kind == "gradient_radial":
        cy, cx = rng.uniform(0.3, 0.7, 2)
        return np.hypot(yy - cy, xx - cx) + rng.normal(0, 0.01, (size, size))
    if kind == "text_page":
        return _text_page(rng, size)
    if kind == "hand":
        return _hand(rng, size)
    if kind == "knee":
        return _knee(rng, size)
    if kind == "checker":
        n = int(rng.integers(4, 16))
        return ((np.floor(xx * n) + np.floor(yy * n)) % 2) + rng.normal(0, 0.05, (size, size))
    raise ValueError(kind)


SYNTHETIC = ("noise_uniform", "noise_gaussian", "gradient_linear", "gradient_radial", "text_page", "hand", "knee",
             "checker")


def build_battery(work: Path, per_kind: int = 4) -> list[Item]:
    """Write every battery image as a chest CR DICOM under ``work``; dev / held-out halves by source, + fresh."""
    items: list[Item] = []
    data = _data_store()
    keys: dict[str, list[str]] = {}
    for group, key, _ in PYDICOM_DATA:
        keys.setdefault(group, [])
        if key not in keys[group]:
            keys[group].append(key)
    seed = 0
    for group, key, fname in PYDICOM_DATA:
        src = data / fname
        if not src.is_file():
            continue
        try:
            px = _dicom_pixels(src)
        except Exception as exc:  # a file this pydicom cannot decode is left out, and said so
            print(f"  (skipped {fname}: {type(exc).__name__})", file=sys.stderr)
            continue
        half = "dev" if keys[group].index(key) % 2 == 0 else "holdout"
        seed += 1
        items.append(Item(f"pydicom-data/{fname}", group,
                          chest_header_dicom(_to_12bit(px), work / "battery" / f"pd_{seed:03d}.dcm", seed), half))
    import skimage.data as skd

    for k, (group, name) in enumerate(SKIMAGE):
        try:
            px = getattr(skd, name)()
        except Exception:
            continue
        seed += 1
        items.append(Item(f"skimage/{name}", group,
                          chest_header_dicom(_to_12bit(px.astype(np.float64)), work / "battery" / f"sk_{seed:03d}.dcm",
                                             seed), "dev" if k % 2 == 0 else "holdout"))
    for kind in SYNTHETIC:
        for j in range(per_kind):
            seed += 1
            items.append(Item(f"synthetic/{kind}#{j}", kind.split("_")[0],
                              chest_header_dicom(_to_12bit(_synthetic(kind, 1000 + j)),
                                                 work / "battery" / f"syn_{seed:03d}.dcm", seed),
                              "dev" if j % 2 == 0 else "holdout"))
    from ood_fresh_battery import build_fresh

    return items + build_fresh(work, per_kind=3)


# --------------------------------------------------------------------------- scoring


def _features_logits(loaded: Any, images: np.ndarray, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    import torch

    feats, logits = [], []
    with torch.inference_mode():
        for s in range(0, len(images), batch):
            x = loaded.to_tensor(images[s:s + batch])
            f = loaded.model.forward_features(x)
            feats.append(loaded.model.forward_head(f, pre_logits=True).float().numpy())
            logits.append(loaded.model.forward_head(f).float().numpy())
    return np.concatenate(feats), np.concatenate(logits)


class Candidates:
    """Every OOD score candidate, fitted on training features (+ labels), thresholds from tuning."""

    def __init__(self, f_tr: np.ndarray, y_tr: np.ndarray, l_tr: np.ndarray, fingerprint: str) -> None:
        from sklearn.covariance import OAS

        from bonescreen.ood import fit_ood

        self.maha = fit_ood(f_tr, y_tr, f_tr[:0], weights_fingerprint=fingerprint)
        self.raw_means = np.stack([f_tr[y_tr == c].mean(0) for c in np.unique(y_tr)])
        from sklearn.covariance import LedoitWolf

        cen = np.concatenate([f_tr[y_tr == c] - self.raw_means[k] for k, c in enumerate(np.unique(y_tr))])
        self.raw_prec = LedoitWolf(assume_centered=True).fit(cen).precision_
        fn = f_tr / np.linalg.norm(f_tr, axis=1, keepdims=True)
        self.n_means = np.stack([fn[y_tr == c].mean(0) for c in np.unique(y_tr)])
        cen_n = np.concatenate([fn[y_tr == c] - self.n_means[k] for k, c in enumerate(np.unique(y_tr))])
        self.oas_prec = OAS(assume_centered=True).fit(cen_n).precision_
        self.norm_median = float(np.median(np.linalg.norm(f_tr, axis=1)))
        self.norm_mad = float(np.median(np.abs(np.linalg.norm(f_tr, axis=1) - self.norm_median))) + 1e-9

    @staticmethod
    def _maha(f: np.ndarray, means: np.ndarray, prec: np.ndarray) -> np.ndarray:
        out = np.full(len(f), np.inf)
        for mu in means:
            d = f - mu
            out = np.minimum(out, np.einsum("nd,de,ne->n", d, prec, d))
        return np.sqrt(np.maximum(out, 0))

    def scores(self, f: np.ndarray, logits: np.ndarray) -> dict[str, np.ndarray]:
        from scipy.special import logsumexp, softmax

        fn = f / np.linalg.norm(f, axis=1, keepdims=True)
        return {
            "mahalanobis": self.maha.distance(f),
            "mahalanobis_raw": self._maha(f, self.raw_means, self.raw_prec),
            "mahalanobis_oas": self._maha(fn, self.n_means, self.oas_prec),
            "energy": -logsumexp(logits, axis=1),
            "msp": 1.0 - softmax(logits, axis=1).max(axis=1),
            "feature_norm": np.abs(np.linalg.norm(f, axis=1) - self.norm_median) / self.norm_mad,
        }


def lung_fields_present(image: np.ndarray) -> bool:
    """The product's model-free check (bonescreen.screen.gate.lung_fields); imported here."""
    from bonescreen.screen.gate import lung_fields

    return bool(lung_fields(image)[0])


def run(model: Path, manifest: Path, cache: Path, phantom: Path, work: Path, quantiles: list[float],
        per_kind: int, extra_train: Path | None = None) -> dict[str, Any]:
    import pandas as pd

    from bonescreen.artifact import load_artifact
    from bonescreen.data import prepare_images, read_manifest, split_rows, task_labels
    from bonescreen.screen import InputItem, ScreeningEngine, load_models

    t0 = time.perf_counter()
    loaded = load_artifact(model)
    size = loaded.size
    frame = task_labels(read_manifest(manifest), str(loaded.spec.task))
    dev_site = frame.loc[frame["split"] == "train", "site"].astype(str).mode().iloc[0]
    if extra_train is not None:  # what a distilled student also trained on: the proxy-labelled pool
        extra = task_labels(read_manifest(extra_train), str(loaded.spec.task))
        extra["split"] = "train"
        frame = pd.concat([frame, extra], ignore_index=True, sort=False)
    frame_test = frame.loc[(frame["split"] != "test") | (frame["site"].astype(str) == dev_site)]
    prep = {s: prepare_images(split_rows(frame_test, s), cache, size, progress=False)
            for s in ("train", "tune", "test")}
    imgs = {s: p.source.batch(range(len(p.source))) for s, p in prep.items()}
    f_tr, l_tr = _features_logits(loaded, imgs["train"])
    cand = Candidates(f_tr, prep["train"].frame["_y"].to_numpy(), l_tr, loaded.fingerprint)
    f_tu, l_tu = _features_logits(loaded, imgs["tune"])
    f_te, l_te = _features_logits(loaded, imgs["test"])
    tune_scores = cand.scores(f_tu, l_tu)
    test_scores = cand.scores(f_te, l_te)
    ref_scores: dict[str, Any] = dict(tune_scores)  # what each candidate's threshold is a quantile of
    # the product's threshold rule (bonescreen.ood.fit_ood): the larger of the tuning quantile and the
    # aug_quantile of acquisition-augmented tuning copies; swept here to choose aug_quantile on the dev half
    from bonescreen.ood import DEFAULT_AUGMENT_COPIES, _Arrays, _Augmented

    f_tu_aug = loaded.features(_Augmented(_Arrays(imgs["tune"]), DEFAULT_AUGMENT_COPIES, 0)
                               .batch(range(DEFAULT_AUGMENT_COPIES * len(imgs["tune"]))))
    aug_ref = cand.maha.distance(f_tu_aug)
    stored = None
    if loaded.spec.ood:
        from bonescreen.ood import OODModel

        stored = OODModel.from_dict(loaded.spec.ood)
    # the gate (everything but the OOD check), as screen runs it
    engine = ScreeningEngine(load_models(model), ood="off", gate={"lung_fields": False})
    battery = build_battery(work, per_kind)
    ext: list[Item] = []
    for site in EXTERNAL_SITES:
        for p in sorted((phantom / site / "images").glob("*.dcm")):
            ext.append(Item(f"{site}/{p.name}", site, p, "external"))

    def gate(items: list[Item]) -> tuple[list[dict[str, Any]], np.ndarray, np.ndarray]:
        rows, ok_imgs = [], []
        for it in items:
            pr = engine.prepare(InputItem(str(it.path)))
            rows.append({"name": it.name, "group": it.group, "half": it.half, "gate": pr.row["reason"] or "",
                         "eligible": pr.images is not None})
            if pr.images is not None:
                ok_imgs.append(pr.images[size])
        arr = np.stack(ok_imgs) if ok_imgs else np.zeros((0, size, size), np.uint8)
        return rows, arr, np.array([r["eligible"] for r in rows])

    cache_npz = work / f"gated_{size}.npz"
    if cache_npz.is_file():  # the gate's output for this size: reruns skip the decode of ~1000 files
        z = np.load(cache_npz, allow_pickle=True)
        b_rows, b_imgs, b_ok = list(z["b_rows"]), z["b_imgs"], z["b_ok"]
        e_rows, e_imgs, e_ok = list(z["e_rows"]), z["e_imgs"], z["e_ok"]
    else:
        b_rows, b_imgs, b_ok = gate(battery)
        e_rows, e_imgs, e_ok = gate(ext)
        np.savez(cache_npz, b_rows=np.array(b_rows, dtype=object), b_imgs=b_imgs, b_ok=b_ok,
                 e_rows=np.array(e_rows, dtype=object), e_imgs=e_imgs, e_ok=e_ok)
    fb, lb = _features_logits(loaded, b_imgs)
    fe, le = _features_logits(loaded, e_imgs)
    b_scores = cand.scores(fb, lb)
    e_scores = cand.scores(fe, le)
    flag_ratio = 1.0
    if stored is not None:  # the artifact's own OOD part, stored thresholds (ratio > 1 refuses), full features
        flag_ratio = stored.flag_ratio
        for d, x in ((b_scores, b_imgs), (e_scores, e_imgs), (tune_scores, imgs["tune"]), (test_scores, imgs["test"])):
            d["product"] = stored.score(loaded.features(x)) if len(x) else np.zeros(0)
            d["product_flag"] = d["product"] / flag_ratio  # > 1: refused or in the flag band
    for d, f in ((b_scores, fb), (e_scores, fe), (tune_scores, f_tu), (test_scores, f_te)):
        d["mahalanobis_augthr"] = d["mahalanobis"]
        ref_scores["product"] = None  # its threshold is stored: ratio 1.0
    lung_b = np.array([lung_fields_present(x) for x in b_imgs], bool)
    lung_e = np.array([lung_fields_present(x) for x in e_imgs], bool)
    lung_tune = np.array([lung_fields_present(x) for x in imgs["tune"]], bool)
    lung_test = np.array([lung_fields_present(x) for x in imgs["test"]], bool)

    halves = {h: np.array([r["half"] == h for r in b_rows]) for h in ("dev", "holdout", "fresh")}
    result: dict[str, Any] = {
        "model": f"{model.name}", "arch": loaded.spec.arch, "size": size, "task": loaded.spec.task,
        "n_train": len(imgs["train"]), "n_tune": len(imgs["tune"]), "n_test_internal": len(imgs["test"]),
        "battery": {h: int(m.sum()) for h, m in halves.items()},
        "battery_gate_refused": {h: int((m & ~b_ok).sum()) for h, m in halves.items()},
        "gate_reasons_battery": pd.Series([r["gate"] for r in b_rows if r["gate"]]).value_counts().to_dict(),
        "external": {"n": len(ext), "gate_eligible": int(e_ok.sum()),
                     "gate_reasons": pd.Series([r["gate"] for r in e_rows if r["gate"]]).value_counts().to_dict()},
        "lung_fields": {
            "battery_missing_dev": int((~lung_b & halves["dev"][b_ok]).sum()),
            "battery_missing_holdout": int((~lung_b & halves["holdout"][b_ok]).sum()),
            "battery_missing_fresh": int((~lung_b & halves["fresh"][b_ok]).sum()),
            "external_missing": int((~lung_e).sum()), "tune_missing": int((~lung_tune).sum()),
            "test_missing": int((~lung_test).sum()),
        },
        "candidates": {},
    }
    grid = [(name, q, float(np.quantile(ref_scores[name], q))) for name in tune_scores
            if ref_scores.get(name) is not None and name not in ("mahalanobis_augthr", "product_flag")
            for q in quantiles]
    tune_thr = float(np.quantile(tune_scores["mahalanobis"], 0.995))
    grid += [("mahalanobis_augthr", aq, max(tune_thr, float(np.quantile(aug_ref, aq))))
             for aq in (0.8, 0.85, 0.9, 0.95, 0.97)]
    if stored is not None:
        grid.append(("product", stored.aug_quantile or stored.quantile, 1.0))
        if flag_ratio < 1.0:
            grid.append(("product_flag", stored.flag_quantile, 1.0))
        result["product"] = {"method": stored.method, "blocks": [b.name for b in stored.blocks],
                             "threshold": stored.threshold, "flag_threshold": stored.flag_threshold,
                             "flag_ratio": flag_ratio}
    for name, q, thr in grid:
        res: dict[str, Any] = {"threshold": thr}
        for h, m in halves.items():
            caught = np.zeros(len(b_rows), bool)
            caught[~b_ok] = True
            idx = np.flatnonzero(b_ok)
            caught[idx[b_scores[name] > thr]] = True
            caught_l = caught.copy()
            caught_l[idx[~lung_b]] = True
            res[f"battery_{h}_refused"] = round(float(caught[m].mean()), 4)
            res[f"battery_{h}_refused_with_lung_check"] = round(float(caught_l[m].mean()), 4)
            res[f"battery_{h}_missed"] = [b_rows[i]["name"] for i in np.flatnonzero(m & ~caught)]
        res["external_refused"] = round(float((e_scores[name] > thr).mean()), 4)
        res["external_refused_with_lung_check"] = round(float(((e_scores[name] > thr) | ~lung_e).mean()), 4)
        res["external_refused_per_site"] = {
            s: round(float((e_scores[name][np.array([r["group"] == s for r, ok in zip(e_rows, e_ok) if ok])]
                            > thr).mean()), 4) for s in EXTERNAL_SITES}
        res["internal_test_refused"] = round(float((test_scores[name] > thr).mean()), 4)
        result["candidates"][f"{name}@{q:g}"] = res
    result["scores"] = {  # raw scores, for threshold studies
        "tune": {k: v.round(4).tolist() for k, v in tune_scores.items()},
        "test_internal": {k: v.round(4).tolist() for k, v in test_scores.items()},
        "battery": [{**r, **({k: round(float(b_scores[k][j]), 4) for k in b_scores} if r["eligible"] else {})}
                    for r, j in zip(b_rows, np.cumsum(b_ok) - 1)],
        "external": [{"name": r["name"], "site": r["group"], **{k: round(float(e_scores[k][j]), 4)
                                                                  for k in e_scores}}
                     for r, j in zip([r for r, ok in zip(e_rows, e_ok) if ok], range(int(e_ok.sum())))],
    }
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["machine"] = {"python": platform.python_version(), "processor": platform.processor()}
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", type=Path, help="a `bonescreen demo` folder (student model, cohort, cache, phantom)")
    ap.add_argument("--model", type=Path)
    ap.add_argument("--manifest", type=Path)
    ap.add_argument("--cache", type=Path)
    ap.add_argument("--phantom", type=Path)
    ap.add_argument("--extra-train", type=Path, help="more training rows (a student's proxy.csv)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-ood"))
    ap.add_argument("--quantiles", type=float, nargs="+", default=[0.99, 0.995, 1.0])
    ap.add_argument("--per-kind", type=int, default=4, help="synthetic images per kind")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.demo:
        args.model = args.model or args.demo / "student" / "model.pt"
        args.manifest = args.manifest or args.demo / "cohort" / "manifest.csv"
        args.cache = args.cache or args.demo / "cache"
        args.phantom = args.phantom or args.demo / "phantom"
        if args.extra_train is None and "student" in str(args.model) and (args.demo / "pseudolabels" / "proxy.csv").is_file():
            args.extra_train = args.demo / "pseudolabels" / "proxy.csv"
    if not all((args.model, args.manifest, args.cache, args.phantom)):
        ap.error("give --demo, or --model, --manifest, --cache and --phantom")
    res = run(args.model, args.manifest, args.cache, args.phantom, args.work, args.quantiles, args.per_kind,
              args.extra_train)
    print(f"model {res['model']} ({res['arch']}, {res['size']} px); battery dev {res['battery']['dev']}, "
          f"held-out {res['battery']['holdout']}, fresh {res['battery']['fresh']}; external chest "
          f"{res['external']['gate_eligible']} eligible")
    print(f"lung fields missing: {res['lung_fields']}")
    print(f"{'candidate':28s} {'dev':>7s} {'dev+lung':>9s} {'held-out':>9s} {'ho+lung':>8s} {'fr+lung':>8s} "
          f"{'ext':>7s} {'ext+lung':>9s} {'int.test':>9s}")
    for name, r in res["candidates"].items():
        print(f"{name:28s} {r['battery_dev_refused']:7.1%} {r['battery_dev_refused_with_lung_check']:9.1%} "
              f"{r['battery_holdout_refused']:9.1%} {r['battery_holdout_refused_with_lung_check']:8.1%} "
              f"{r['battery_fresh_refused_with_lung_check']:8.1%} "
              f"{r['external_refused']:7.1%} {r['external_refused_with_lung_check']:9.1%} "
              f"{r['internal_test_refused']:9.1%}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
