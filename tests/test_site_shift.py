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
    from bonescreen.train import train_model

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
    from bonescreen.train import train_model as again

    with pytest.raises(ConfigError, match="site_shift"):
        again(manifest, tmp_path / "out", tiny_config(image_size=32, epochs=3, tensorboard=False, site_shift=0.3,
                                                       selection="tune_shifted", selection_shifts=2),
              cache_root=tmp_path / "cache", resume=True)
