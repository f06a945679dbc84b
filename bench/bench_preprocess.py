"""Decode + preprocess rate for a 2000 x 2000 16-bit DICOM, on one core.

Writes a synthetic CR (12 bits stored in 16, MONOCHROME1, with a window) in
several transfer syntaxes to a temporary folder, then times
``read_image`` + ``preprocess_array(size=512)`` in this process, ``--repeats``
times per syntax after one warm-up, and prints the median.

    python bench/bench_preprocess.py [--repeats 7] [--size 512] [--syntax ExplicitVRLittleEndian ...]
"""

from __future__ import annotations

import os

# one core: pin the numeric libraries before they are imported
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402


def synthetic_cr(side: int = 2000, seed: int = 0) -> np.ndarray:
    """Smooth 'anatomy' plus noise, 12-bit, stored MONOCHROME1-style (bone dark)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side] / side
    body = np.exp(-(((x - 0.5) / 0.35) ** 2 + ((y - 0.55) / 0.45) ** 2) * 2)
    spine = np.exp(-(((x - 0.5) / 0.04) ** 2))
    att = 600 + 2200 * body + 900 * spine + rng.normal(0, 40, size=(side, side))
    return (4095 - np.clip(att, 0, 4095)).astype(np.uint16)


def write_variants(folder: Path, syntaxes: list[str], side: int) -> dict[str, Path]:
    import pydicom.uid
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    out = {}
    arr = synthetic_cr(side)
    for name in syntaxes:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = "CR"
        ds.Rows, ds.Columns = arr.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME1"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.WindowCenter, ds.WindowWidth = 2048, 4096
        ds.PixelData = arr.tobytes()
        uid = getattr(pydicom.uid, name)
        if uid.is_compressed:
            ds.compress(uid)
        path = folder / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out[name] = path
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--side", type=int, default=2000)
    ap.add_argument(
        "--syntax",
        nargs="+",
        default=["ExplicitVRLittleEndian", "RLELossless", "JPEG2000Lossless", "JPEGLSLossless"],
        help="pydicom.uid names",
    )
    args = ap.parse_args()

    import cv2

    cv2.setNumThreads(1)
    from bonescreen.io import read_image
    from bonescreen.preprocess import preprocess_array

    with tempfile.TemporaryDirectory() as tmp:
        files = write_variants(Path(tmp), args.syntax, args.side)
        print(f"{args.side}x{args.side} 12-bit-in-16 MONOCHROME1 CR -> {args.size}x{args.size} uint8, "
              f"one core, median of {args.repeats} (after 1 warm-up)")
        for name, path in files.items():
            times, decode = [], []
            for i in range(args.repeats + 1):
                t0 = time.perf_counter()
                img, _ = read_image(path)
                t1 = time.perf_counter()
                preprocess_array(img, args.size)
                t2 = time.perf_counter()
                if i:
                    times.append(t2 - t0)
                    decode.append(t1 - t0)
            med = statistics.median(times)
            print(f"  {name:24s} {path.stat().st_size / 1e6:6.1f} MB  total {med * 1000:7.1f} ms "
                  f"(read {statistics.median(decode) * 1000:6.1f} ms)  -> {1 / med:5.1f} images/s")


if __name__ == "__main__":
    main()
