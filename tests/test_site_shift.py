"""Site-shift augmentation: the pipeline's truncation is re-applied, draws are seeded, components act."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from _train_helpers import make_cohort, tiny_config
from scipy import ndimage

from bonescreen.config import ConfigError, load_config
from bonescreen.data import ImageSource, ManifestDataset
from bonescreen.preprocess import central_range, grayscale_truncation
from bonescreen.site_shift import ShiftedView, SiteShift, from_config, site_shift


def _chest_like(size: int = 96, seed: int = 0) -> np.ndarray:
    """A truncated uint8 image with structure: bright 'spine', dark 'lungs', ribs, noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = 0.3 + 0.5 * np.exp(-((xx - 0.5) ** 2) / 0.004) + 0.15 * np.sin(40 * yy) * (np.abs(xx - 0.5) > 0.1)
    img = img + rng.normal(0, 0.02, img.shape)
    return np.clip(np.rint(grayscale_truncation(img)), 0, 255).astype(np.uint8)


def _detail(img: np.ndarray) -> float:
    x = img.astype(float)
    return float(np.abs(x - ndimage.gaussian_filter(x, 1.0)).mean())


def test_output_is_a_truncated_uint8_image_like_the_pipeline_makes() -> None:
    img = _chest_like()
    for seed in range(30):
        out = site_shift(img, np.random.default_rng(seed), SiteShift(p=1.0, polarity_p=0.2))
        assert out.dtype == np.uint8 and out.shape == img.shape
        lo, hi = central_range(out)
        assert (lo, hi) == (0.0, 255.0)  # re-truncated: the central min/max span the full range
        # truncating again changes nothing (what preprocess would do to it is already done)
        assert np.abs(grayscale_truncation(out) - out).max() <= 1.0


def test_seeded_off_and_different_draws() -> None:
    img = _chest_like()
    cfg = SiteShift(p=1.0)
    a = site_shift(img, np.random.default_rng(5), cfg)
    b = site_shift(img, np.random.default_rng(5), cfg)
    c = site_shift(img, np.random.default_rng(6), cfg)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert site_shift(img, np.random.default_rng(5), SiteShift(p=0.0, polarity_p=0.0)) is img
    outs = [site_shift(img, np.random.default_rng(s), SiteShift(p=0.5, polarity_p=0.0)) for s in range(40)]
    unchanged = sum(np.array_equal(o, img) for o in outs)
    assert 8 <= unchanged <= 32  # about half left alone


def test_polarity_error_inverts_and_strength_scales() -> None:
    img = _chest_like()
    inv = site_shift(img, np.random.default_rng(0), SiteShift(p=0.0, polarity_p=1.0))
    assert np.abs(inv.astype(int) - (255 - img.astype(int))).max() <= 1
    # the mean absolute change grows with the strength
    def change(strength: float) -> float:
        cfg = SiteShift(p=1.0, strength=strength, polarity_p=0.0)
        return float(np.mean([np.abs(site_shift(img, np.random.default_rng(s), cfg).astype(float) - img).mean()
                              for s in range(25)]))
    assert change(0.25) < change(1.0) < change(2.0)
    with pytest.raises(ValueError):
        SiteShift(p=1.5)
    with pytest.raises(ValueError):
        SiteShift(strength=3.0)


def test_components_reach_both_sides_of_dev_look() -> None:
    """Over many draws, detail goes up (edge enhancement, noise) and down (smoothing, blur)."""
    img = _chest_like()
    base = _detail(img)
    d = [_detail(site_shift(img, np.random.default_rng(s), SiteShift(p=1.0, polarity_p=0.0))) for s in range(60)]
    assert min(d) < 0.8 * base and max(d) > 1.25 * base
    means = [site_shift(img, np.random.default_rng(s), SiteShift(p=1.0, polarity_p=0.0)).mean() for s in range(60)]
    assert np.ptp(means) > 30  # brightness / LUT varies widely


def _source(n: int = 6, size: int = 48) -> ImageSource:
    src = ImageSource([str(i) for i in range(n)], size)
    src.array = np.stack([_chest_like(size, seed=i) for i in range(n)])
    return src


def test_dataset_shift_is_seeded_by_epoch_and_leaves_other_draws_alone() -> None:
    src, labels = _source(), np.arange(6) % 2
    plain = ManifestDataset(src, labels, augment="strong", seed=3)
    shifted = ManifestDataset(src, labels, augment="strong", seed=3, site_shift=SiteShift(p=1.0))
    again = ManifestDataset(src, labels, augment="strong", seed=3, site_shift=SiteShift(p=1.0))
    off = ManifestDataset(src, labels, augment="strong", seed=3, site_shift=SiteShift(p=0.0, polarity_p=0.0))
    for i in range(6):
        a, b, c, o = plain[i], shifted[i], again[i], off[i]
        assert a["flipped"] == b["flipped"]  # the flip (and the teacher's view) is unchanged
        assert not np.allclose(a["image"], b["image"])
        assert np.array_equal(b["image"], c["image"])
        assert np.array_equal(a["image"], o["image"])  # inactive shift = no shift at all
    e0 = shifted[0]["image"]
    shifted.set_epoch(1)
    assert not np.array_equal(e0, shifted[0]["image"])


def test_shifted_view_is_fixed() -> None:
    src = _source()
    v = ShiftedView(src, 2, seed=1)
    assert len(v) == 6 and v.batch([0, 3]).shape == (2, 48, 48)
    assert np.array_equal(v.get(3), v.get(3)) and np.array_equal(v.batch([3])[0], v.get(3))
    assert not np.array_equal(v.get(3), ShiftedView(src, 3, seed=1).get(3))
    assert not np.array_equal(v.get(3), src.get(3))


def test_config_keys_validate() -> None:
    cfg = load_config("cpu-tiny", {"site_shift": 0.0})
    assert from_config(cfg) is None
    on = from_config(load_config("cpu-tiny", {"site_shift": 0.7, "site_shift_polarity": 0.1}))
    assert on == SiteShift(p=0.7, strength=1.0, polarity_p=0.1)
    for bad in ({"site_shift": 1.2}, {"site_shift_strength": -1}, {"selection": "best"}, {"selection_shifts": 0}):
        with pytest.raises(ConfigError):
            load_config("cpu-tiny", bad)


def test_training_with_shift_and_shifted_selection(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from bonescreen.training.jobs import train_model

    manifest = make_cohort(tmp_path / "data", n_per_split={"train": 32, "tune": 16, "test": 8}, size=32)
    cfg = tiny_config(image_size=32, epochs=2, tensorboard=False, site_shift=0.8, selection="tune_shifted",
                      selection_shifts=2)
    r = train_model(manifest, tmp_path / "out", cfg, cache_root=tmp_path / "cache")
    m = pd.read_csv(r.metrics_csv)
    assert {"tune_auc", "tune_auc_shifted", "tune_auc_shifted_min", "tune_selection"} <= set(m.columns)
    # the selection score is the mean of the clean and the shifted AUCs, and it picks the epoch
    np.testing.assert_allclose(m["tune_selection"], (m["tune_auc"] + 2 * m["tune_auc_shifted"]) / 3, atol=1e-9)
    assert r.best_epoch == int(m.loc[m["tune_selection"].idxmax(), "epoch"])
    assert r.model_card["config"]["site_shift"] == 0.8
    # resuming with another shift is refused (the batches would differ)
    from bonescreen.training.jobs import train_model as again

    with pytest.raises(ConfigError, match="site_shift"):
        again(manifest, tmp_path / "out", tiny_config(image_size=32, epochs=3, tensorboard=False, site_shift=0.3,
                                                       selection="tune_shifted", selection_shifts=2),
              cache_root=tmp_path / "cache", resume=True)


# --- each step of the chain changes what it claims, keeps the shape, stays finite ------------------


def _ramp(n: int = 64) -> np.ndarray:
    return np.tile(np.linspace(0.0, 1.0, n, dtype=np.float32), (n, 1))


def test_response_is_a_monotone_lut_that_changes_the_curve() -> None:
    from bonescreen.site_shift import _response

    x = _ramp()
    changed = 0
    for seed in range(30):
        y = _response(x, np.random.default_rng(seed), 1.0)
        assert y.shape == x.shape and np.isfinite(y).all()
        row = y[0]
        assert np.all(np.diff(row) >= -1e-6)  # a LUT never reverses contrast (that is polarity's job)
        assert row.min() >= -1e-6 and row.max() <= 1.0 + 1e-6
        changed += float(np.abs(row - x[0]).max()) > 0.05
    assert changed >= 25


def test_processing_moves_detail_and_coarse_range_both_ways() -> None:
    from bonescreen.site_shift import _processing

    img = _chest_like(96).astype(np.float32) / 255.0
    base = _detail(img)
    ratios, spans = [], []
    for seed in range(40):
        y = _processing(img, np.random.default_rng(seed), 1.0)
        assert y.shape == img.shape and np.isfinite(y).all()
        ratios.append(_detail(y) / base)
        spans.append(float(np.ptp(ndimage.gaussian_filter(y, 6))) / float(np.ptp(ndimage.gaussian_filter(img, 6))))
    assert min(ratios) < 0.8 and max(ratios) > 1.5  # smoothing and edge enhancement
    assert min(spans) < 0.85 and max(spans) > 1.15  # range compression and expansion


def test_field_of_view_rescales_the_anatomy() -> None:
    from bonescreen.site_shift import _field_of_view

    n = 96
    yy, xx = np.mgrid[0:n, 0:n]
    disk = (((yy - n / 2) ** 2 + (xx - n / 2) ** 2) < (n / 5) ** 2).astype(np.float32)
    areas = []
    for seed in range(30):
        y = _field_of_view(disk, np.random.default_rng(seed), 1.0)
        assert y.shape == disk.shape and y.min() >= 0.0 and y.max() <= 1.0
        areas.append(float((y > 0.5).sum()) / float(disk.sum()))
    # zoom 0.8-1.25: the disk's area scales by 1/z^2, between ~0.64 and ~1.56, and varies
    assert 0.55 < min(areas) < 0.9 and 1.1 < max(areas) < 1.7


def test_resolution_only_removes_detail() -> None:
    from bonescreen.site_shift import _resolution

    img = _chest_like(96).astype(np.float32) / 255.0
    base = _detail(img)
    ratios = []
    for seed in range(20):
        y = _resolution(img, np.random.default_rng(seed), 1.0)
        assert y.shape == img.shape
        ratios.append(_detail(y) / base)
        assert ratios[-1] <= 1.0 + 1e-6  # never sharper
        assert y.min() >= img.min() - 1e-5 and y.max() <= img.max() + 1e-5  # blur never overshoots
    assert min(ratios) < 0.6 and np.mean(ratios) < 0.85


def test_noise_is_signal_dependent() -> None:
    from bonescreen.site_shift import _noise

    x = np.full((64, 64), 0.1, np.float32)
    x[:, 32:] = 0.9
    for seed in range(10):
        y = _noise(x, np.random.default_rng(seed), 1.0)
        assert y.shape == x.shape and y.dtype == np.float32
        dark, bright = (y - x)[:, :32].std(), (y - x)[:, 32:].std()
        assert dark > 0 and bright > 1.5 * dark  # dense regions receive fewer photons: more noise


def test_bit_depth_limits_the_grey_levels() -> None:
    from bonescreen.site_shift import _bit_depth

    x = _ramp(256)
    for seed in range(10):
        y = _bit_depth(x, np.random.default_rng(seed))
        assert y.shape == x.shape and 0.0 <= y.min() and y.max() <= 1.0
        assert 33 <= len(np.unique(y)) <= 129  # 2**5 + 1 .. 2**7 + 1 levels
        assert np.abs(y - x).max() <= 1 / 64 + 1e-6


def test_collimation_and_text_touch_only_borders_and_edges() -> None:
    from bonescreen.site_shift import _collimate, _text

    img = _chest_like(128).astype(np.float32) / 255.0
    n, c = 128, slice(32, 96)
    collimated = text = 0
    for seed in range(30):
        y = _collimate(img, np.random.default_rng(seed), 1.0)
        assert y.shape == img.shape
        assert np.array_equal(y[c, c], img[c, c])  # the central region (which sets the contrast) is kept
        moved = y != img
        if moved.any():
            collimated += 1
            assert len(np.unique(y[moved])) == 1 and y[moved][0] in (img.min(), img.max())
        t = _text(img, np.random.default_rng(seed))
        rows = np.where((t != img).any(axis=1))[0]
        if rows.size:
            text += 1
            assert rows.max() - rows.min() < 0.12 * n  # one line
            assert rows.min() < 0.2 * n or rows.max() > 0.8 * n  # near the top or the bottom edge
            assert set(np.unique(t[t != img])) <= {img.min(), img.max()}
    assert collimated >= 20 and text >= 28


# --- selection across looks ------------------------------------------------------------------------


def test_shifted_selection_picks_the_epoch_that_ranks_every_look() -> None:
    """Constructed history: epoch 2 fits DEV's look best but breaks under shifts; epoch 3 is robust."""
    from bonescreen.training.selection import selection_score, shifted_selection_score

    history = {  # epoch: (clean tune AUC, AUCs on 4 shifted copies)
        1: (0.70, [0.60, 0.62, 0.58, 0.61]),
        2: (0.86, [0.55, 0.60, 0.52, 0.58]),
        3: (0.82, [0.78, 0.80, 0.76, 0.79]),
        4: (0.80, [0.74, 0.76, 0.72, 0.75]),
    }
    plain = {e: selection_score({"auc": c}) for e, (c, _) in history.items()}
    shifted = {e: shifted_selection_score({"auc": c}, s) for e, (c, s) in history.items()}
    assert max(plain, key=plain.get) == 2  # selecting on DEV's tune AUC rewards fitting DEV
    assert max(shifted, key=lambda e: shifted[e][1]) == 3
    cols, score = shifted[3]
    assert score == pytest.approx(np.mean([0.82, 0.78, 0.80, 0.76, 0.79]))
    assert cols["tune_auc_shifted"] == pytest.approx(0.7825) and cols["tune_auc_shifted_min"] == 0.76
    # undefined AUCs (a single-class split) are left out; none defined: the plain score (minus the loss)
    assert shifted_selection_score({"auc": 0.8}, [float("nan"), 0.6])[1] == pytest.approx(0.7)
    assert shifted_selection_score({"auc": float("nan"), "loss": 0.4}, [float("nan")]) == ({}, -0.4)


def test_pediatric_refuses_shifted_selection(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The pediatric model selects on tuning Z MAE; a setting it would ignore is refused, not dropped."""
    from bonescreen.training.pediatric import train_pediatric

    cfg = load_config("pediatric-cpu-tiny", {"selection": "tune_shifted", "site_shift": 0.8})
    with pytest.raises(ConfigError, match="selection='tune_shifted' is not supported by the pediatric"):
        train_pediatric(tmp_path / "missing.csv", tmp_path / "out", cfg, cache_root=tmp_path / "cache")
    assert not (tmp_path / "out").exists()
