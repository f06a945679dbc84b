"""Grad-CAM: automatic target layer for several timm families, maps, overlays, CLI."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from _screen_helpers import make_artifact, radiograph

from bonescreen.explain import (
    Explainer,
    ExplainError,
    find_target_layer,
    overlay,
    save_png,
)


@pytest.mark.parametrize(
    "arch, expected",
    [("convnext_atto", "stages"), ("resnet18", "layer4"), ("tf_efficientnet_lite0", "bn2")],
)
def test_target_layer_is_the_last_feature_stage(arch: str, expected: str) -> None:
    from bonescreen.models import create_model

    model = create_model(arch, 2)
    layer = find_target_layer(model)
    names = {id(m): n for n, m in model.named_modules()}
    assert names[id(layer)] == expected


def test_transformer_without_feature_map_is_refused() -> None:
    from bonescreen.models import create_model

    vit = create_model("vit_tiny_patch16_224", 2)
    with pytest.raises(ExplainError, match="feature map"):
        find_target_layer(vit, size=224)


@pytest.mark.parametrize("arch", ["convnext_atto", "resnet18"])
def test_cams_shape_range_and_class_dependence(tmp_path: Path, arch: str) -> None:
    from bonescreen.artifact import load_artifact

    loaded = load_artifact(make_artifact(tmp_path / "m.pt", arch=arch, size=64))
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (3, 64, 64), dtype=np.uint8)
    ex = Explainer(loaded)
    pos = ex.cams(imgs)
    neg = ex.cams(imgs, 0)
    assert pos.shape == (3, 64, 64) and pos.dtype == np.float32
    assert pos.min() >= 0 and pos.max() <= 1 and pos.max() > 0.5  # normalised per image
    # for a two-class softmax the classes' gradients differ: the maps must too
    assert not np.allclose(pos, neg, atol=1e-3)
    # one image alone gives the same map as inside the batch (no cross-talk)
    assert np.allclose(ex.cams(imgs[1:2])[0], pos[1], atol=1e-4)
    # the model is left usable for inference
    assert loaded.predict_proba(imgs).shape == (3, 2)


def test_overlay_is_red_where_attention_is_high(tmp_path: Path) -> None:
    img = np.full((32, 32), 128, np.uint8)
    cam = np.zeros((32, 32), np.float32)
    cam[:8, :8] = 1.0
    rgb = overlay(img, cam)
    assert rgb.shape == (32, 32, 3) and rgb.dtype == np.uint8
    hot, cold = rgb[:8, :8].mean(axis=(0, 1)), rgb[20:, 20:].mean(axis=(0, 1))
    assert hot[0] > hot[2] and cold[2] > cold[0]  # jet: red hot, blue cold
    path = save_png(tmp_path / "a" / "o.png", rgb)
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(path)), rgb)


def test_explain_command_and_screen_explain(tmp_path: Path, write_dicom) -> None:  # type: ignore[no-untyped-def]
    from bonescreen.cli import main
    from bonescreen.screen import ScreenOptions, screen

    model = make_artifact(tmp_path / "m.pt", size=64)
    for i in range(3):
        write_dicom(radiograph(i), name=f"in/g{i}.dcm")
    write_dicom(radiograph(5), name="in/lat.dcm", ViewPosition="LAT")
    out = tmp_path / "ex"
    assert main(["explain", str(tmp_path / "in"), "--model", str(model), "--out", str(out), "--no-progress"]) == 0
    rows = list(csv.DictReader(open(out / "explain.csv")))
    made = [r for r in rows if r["overlay"]]
    assert len(made) == 3 and {r["reason"] for r in rows if not r["overlay"]} == {"lateral_view"}
    assert all((out / r["overlay"]).is_file() for r in made)
    # --no-gate explains the lateral too
    assert main(["explain", str(tmp_path / "in" / "lat.dcm"), "--model", str(model), "--out",
                 str(tmp_path / "ex2"), "--no-gate", "--no-progress"]) == 0
    assert len(list((tmp_path / "ex2").glob("*.png"))) == 1

    s = screen([tmp_path / "in"], model, tmp_path / "scr", options=ScreenOptions(explain=True, progress=False))
    res = list(csv.DictReader(open(tmp_path / "scr" / "results.csv")))
    pngs = [r["overlay"] for r in res if r["eligible"] == "True"]
    assert s.n_screened == 3 and all((tmp_path / "scr" / p).is_file() for p in pngs)
