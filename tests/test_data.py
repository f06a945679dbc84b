"""Dataset, augmentation and sampling of the training stack."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bonescreen.data import (
    EpochSampler,
    ImageSource,
    ManifestDataset,
    balanced_weights,
    class_weights,
    normalize,
    prepare_images,
    read_manifest,
    strong_augmentation,
    task_labels,
    weak_augmentation,
)
from bonescreen.errors import TableError


def _source(n: int = 6, size: int = 64, seed: int = 0) -> ImageSource:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
    # An asymmetric ramp so that a horizontal flip is visible.
    arr[:, :, : size // 4] = 255
    return ImageSource([f"img{i}" for i in range(n)], size, array=arr)


@pytest.mark.parametrize("size", [64, 512])
def test_strong_augmentation_has_valid_arguments(size: int) -> None:
    """albumentations warns about unknown/deprecated arguments; make any warning fail."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        aug = strong_augmentation(size, p=1.0)
        weak = weak_augmentation()
        img = np.random.default_rng(0).integers(0, 256, (size, size), dtype=np.uint8)
        for seed in range(3):
            aug.set_random_seed(seed)
            out = aug(image=img)["image"]
            assert out.shape == (size, size) and out.dtype == np.uint8
        assert weak(image=img)["image"].shape == (size, size)
    names = {type(t).__name__ for t in _walk(aug)}
    expected = {
        "HorizontalFlip", "Blur", "MotionBlur", "MedianBlur", "Affine", "GridDistortion",
        "ElasticTransform", "OpticalDistortion", "RandomGamma", "GridDropout",
    }
    assert expected <= names
    assert "ShiftScaleRotate" not in names


def _walk(compose):  # type: ignore[no-untyped-def]
    for t in compose.transforms:
        yield t
        if hasattr(t, "transforms"):
            yield from _walk(t)


def test_augmentation_is_seeded_per_epoch_and_index() -> None:
    src = _source()
    ds = ManifestDataset(src, [0, 1] * 3, augment="strong", strong_p=1.0, seed=7)
    a = ds[2]["image"]
    assert torch.equal(a, ds[2]["image"])  # same epoch, same index -> same view
    ds2 = ManifestDataset(src, [0, 1] * 3, augment="strong", strong_p=1.0, seed=7)
    assert torch.equal(a, ds2[2]["image"])  # a fresh dataset (another worker) agrees
    ds.set_epoch(1)
    assert not torch.equal(a, ds[2]["image"])  # a new epoch draws a new view
    ds.set_epoch(0)
    assert not torch.equal(ds[2]["image"], ds[3]["image"])


def test_flip_flag_matches_the_image_and_weak_view_is_only_a_flip() -> None:
    src = _source(n=20)
    ds = ManifestDataset(src, [0] * 20, augment="weak", seed=3)
    flips = []
    for i in range(20):
        item = ds[i]
        raw = src.get(i)
        expect = raw[:, ::-1] if bool(item["flipped"]) else raw
        assert torch.allclose(item["image"], normalize(np.ascontiguousarray(expect))[0])
        flips.append(bool(item["flipped"]))
    assert 0 < sum(flips) < 20  # both orientations occur


def test_soft_targets_follow_the_flip() -> None:
    src = _source(n=10)
    soft = np.zeros((10, 2, 2), np.float32)
    soft[:, 0] = [1.0, 0.0]  # logits for the image as is
    soft[:, 1] = [0.0, 1.0]  # logits for its mirror image
    ds = ManifestDataset(src, [0] * 10, augment="strong", seed=1, soft_targets=soft)
    for i in range(10):
        item = ds[i]
        assert item["teacher"].tolist() == soft[i, int(item["flipped"])].tolist()


def test_normalize_matches_the_artifact_inference_path() -> None:
    from bonescreen.artifact import LoadedModel, ModelSpec

    imgs = _source(n=3, size=32).array
    spec = ModelSpec(arch="test_convnext")
    loaded = LoadedModel(torch.nn.Identity(), spec)
    assert torch.allclose(normalize(imgs), loaded.to_tensor(imgs))


def test_sampler_shards_cover_the_data_and_skip_ahead() -> None:
    n = 11
    shards = [list(EpochSampler(n, num_replicas=2, rank=r, seed=5)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 6
    assert set(shards[0]) | set(shards[1]) == set(range(n))
    s = EpochSampler(n, seed=5)
    s.set_epoch(3)
    full = list(s)
    s.set_start(4)
    assert list(s) == full[4:] and len(s) == n - 4
    s.set_start(0)
    s.set_epoch(4)
    assert list(s) != full  # a new order each epoch


def test_balanced_sampling_and_class_weights() -> None:
    labels = np.array([0] * 90 + [1] * 10)
    w = balanced_weights(labels)
    s = EpochSampler(len(labels), seed=0, weights=w)
    drawn = labels[list(s)]
    assert 0.35 < drawn.mean() < 0.65  # ~ half positives instead of 10 %
    cw = class_weights(labels, 2)
    assert cw[1] / cw[0] == pytest.approx(9.0)


def test_task_labels_drop_osteoporosis_for_stage2() -> None:
    frame = pd.DataFrame(
        {
            "path": ["a", "b", "c"],
            "label": [0, 1, np.nan],
            "label_stage1": [0, 0, 1],
            "label_3class": [0, 1, 2],
        }
    )
    assert task_labels(frame, "stage2")["_y"].tolist() == [0, 1]
    assert task_labels(frame, "stage1")["_y"].tolist() == [0, 0, 1]
    assert task_labels(frame, "three_class")["_y"].tolist() == [0, 1, 2]
    with pytest.raises(TableError, match="outside"):
        task_labels(frame.assign(label=[0, 3, 1]), "stage2")
    with pytest.raises(TableError, match="no 'label_stage1'"):
        task_labels(frame.drop(columns="label_stage1"), "stage1")


def test_read_manifest_resolves_relative_paths_and_rejects_bad_tables(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "x.png").write_bytes(b"")
    pd.DataFrame({"path": ["imgs/x.png"], "label": [1]}).to_csv(tmp_path / "m.csv", index=False)
    frame = read_manifest(tmp_path / "m.csv")
    assert Path(frame.loc[0, "path"]) == tmp_path / "imgs" / "x.png"
    assert frame.loc[0, "image_id"] == "x"
    pd.DataFrame({"file": ["a"]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(TableError, match="no 'path'"):
        read_manifest(tmp_path / "bad.csv")
    with pytest.raises(TableError, match="not found"):
        read_manifest(tmp_path / "missing.csv")


def test_prepare_images_drops_unreadable_files_with_a_reason(tmp_path: Path) -> None:
    from PIL import Image

    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50), dtype=np.uint8)).save(good)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    frame = pd.DataFrame({"image_id": ["g", "b", "m"], "path": [str(good), str(broken), str(tmp_path / "nope.png")]})
    prep = prepare_images(frame, tmp_path / "cache", 32, progress=False)
    assert prep.frame["image_id"].tolist() == ["g"]
    assert prep.source.array is not None and prep.source.array.shape == (1, 32, 32)
    assert len(prep.skipped) == 2 and set(prep.skipped["reason"]) and all(prep.skipped["reason"])
