"""Render the HTML report in headless Chromium and check every figure shows."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bonescreen.evaluate.report import EvaluateConfig, run_evaluation
from bonescreen.evaluate.synthetic import make_predictions

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "screenshot_report.py"
HAVE_CHROMIUM = any(shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome"))


def _colour_pixels(img: np.ndarray, rgb: tuple[int, int, int], tol: int = 12) -> int:
    return int(np.all(np.abs(img[..., :3].astype(int) - np.array(rgb)) <= tol, axis=-1).sum())


@pytest.mark.skipif(not HAVE_CHROMIUM, reason="chromium not installed (apt-get install -y chromium); CI installs it")
def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    df = make_predictions(150, sites=("siteA", "siteB"), models=("teacher",), seed=4)
    p = tmp_path / "preds.csv"
    df.to_csv(p, index=False)
    flow = tmp_path / "flow.json"
    flow.write_text(json.dumps([{"step": "DXA exams", "remaining": 400, "excluded": 0},
                                {"step": "paired", "remaining": 300, "excluded": 100, "reasons": {"no_cxr": 100}}]))
    out = tmp_path / "report"
    _, files = run_evaluation([p], out, config=EvaluateConfig(n_boot=50), flow=flow, progress=False)
    shot = tmp_path / "shot.png"
    proc = subprocess.run([sys.executable, str(SCRIPT), str(files["report.html"]), "--out", str(shot),
                           "--height", "7000"], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[1] == 1400 and img.shape[0] >= 4000
    nonwhite = np.mean(np.any(img < 240, axis=-1))
    assert nonwhite > 0.03, f"screenshot nearly blank ({nonwhite:.3f} non-white)"
    # The figures are rendered, not broken-image icons: matplotlib's first colour
    # (C0, #1f77b4) draws the ROC/PR/calibration curves and severity bars, and the
    # flow diagram's exclusion boxes are filled #fff4f0 with a #aa3333 border.
    assert _colour_pixels(img, (0x1F, 0x77, 0xB4)) > 3000
    assert _colour_pixels(img, (0xFF, 0xF4, 0xF0), tol=3) > 500
    # every figure is in the page as an image (a figure chromium cannot decode shows an icon instead)
    html = files["report.html"].read_text(encoding="utf-8")
    assert html.count('<figure id="fig-') == 6  # roc, pr, calibration, severity, flow, decision
