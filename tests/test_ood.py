"""The OOD part: multi-block fit, storage in the artifact (format 3), the v1/v2 upgrade paths, refusal, flag band,
flag, opt-out."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _screen_helpers import make_artifact, ood_images, radiograph

from bonescreen.artifact import FORMAT_VERSION, load_artifact
from bonescreen.ood import OODError, OODModel, fit_ood
from bonescreen.screen import ScreenError, ScreenOptions, screen


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "results.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _checker(size: int = 256) -> np.ndarray:
    """A noisy checkerboard: passes the sanity checks (many grey levels), looks nothing like a chest."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    noise = np.random.default_rng(5).normal(0, 150, (size, size))
    return np.clip((((xx * 8) // 1 + (yy * 8) // 1) % 2) * 3000 + 500 + noise, 0, 4095).astype(np.uint16)


def test_fit_ood_scores_and_round_trip() -> None:
    rng = np.random.default_rng(0)
    centre = rng.normal(size=32)
    train = centre + 0.1 * rng.normal(size=(200, 32))
    labels = np.arange(200) % 2
    tune = centre + 0.1 * rng.normal(size=(60, 32))
    ood = fit_ood(train, labels, tune, weights_fingerprint="abc", quantile=0.99)
    assert len(ood.blocks) == 1 and ood.blocks[0].means.shape == (2, 32) and ood.n_fit == 200 and ood.n_tune == 60
    # the threshold is the tuning quantile: about 1 % of tuning images lie above it
    assert (ood.score(tune) > 1).mean() <= 0.02
    far = -centre + 0.1 * rng.normal(size=(20, 32))
    assert (ood.score(far) > 1).all()
    back = OODModel.from_dict(ood.to_dict())
    np.testing.assert_allclose(back.score(far), ood.score(far), rtol=1e-5)
    with pytest.raises(OODError, match="unknown OOD method"):
        OODModel.from_dict({**ood.to_dict(), "method": "magic"})
    with pytest.raises(OODError):
        fit_ood(train, labels, tune, weights_fingerprint="abc", quantile=0.3)
    # augmented tuning copies (another scanner's look) raise the refusal threshold to their aug_quantile
    # and the flag threshold to their flag_quantile: a band between them
    shifted = tune + 0.15 * rng.normal(size=tune.shape)
    wide = fit_ood(train, labels, tune, weights_fingerprint="abc", quantile=0.99, aug_tune_features=shifted,
                   aug_quantile=0.99, flag_quantile=0.8)
    d_aug = wide.distance(shifted)
    assert wide.threshold == pytest.approx(max(ood.threshold, float(np.quantile(d_aug, 0.99))))
    assert wide.flag_threshold == pytest.approx(max(ood.threshold, float(np.quantile(d_aug, 0.8))))
    assert wide.threshold > wide.flag_threshold > ood.threshold and 0 < wide.flag_ratio < 1
    assert ood.flag_ratio == 1.0  # no augmented copies: no band
    back = OODModel.from_dict(wide.to_dict())
    assert back.flag_ratio == pytest.approx(wide.flag_ratio) and back.flag_quantile == pytest.approx(0.8)


def test_multi_block_catches_what_the_penultimate_block_misses() -> None:
    """A shift only in a deep stage's statistics is caught by that stage's block; early stages are left out."""
    rng = np.random.default_rng(1)
    layout = [{"name": "penultimate", "start": 0, "stop": 16}]
    start = 16
    for k in range(1, 5):
        for kind in ("mean", "std"):
            layout.append({"name": f"stage{k}_{kind}", "start": start, "stop": start + 8})
            start += 8
    train, tune = rng.normal(size=(300, start)), rng.normal(size=(80, start))
    ood = fit_ood(train, None, tune, weights_fingerprint="abc", layout=layout, quantile=0.99)
    # the deeper half of 4 stages: 3 and 4, means and standard deviations
    assert [b.name for b in ood.blocks] == ["penultimate", "stage3_mean", "stage3_std", "stage4_mean", "stage4_std"]
    assert all(np.median(b.distance(tune)) == pytest.approx(1.0) for b in ood.blocks)  # tuning-median units
    odd = rng.normal(size=(20, start))
    odd[:, 64:72] += 6.0  # stage4_mean far off, the penultimate block as usual
    assert (ood.score(odd) > 1).all()
    assert (ood.blocks[0].distance(odd) < ood.blocks[0].distance(tune).max() * 1.5).all()
    early = rng.normal(size=(20, start))
    early[:, 16:24] += 6.0  # stage1_mean: not modelled (follows the detector's look, not content)
    assert (ood.score(early) <= 1).mean() > 0.8
    back = OODModel.from_dict(ood.to_dict())
    np.testing.assert_allclose(back.score(odd), ood.score(odd), rtol=1e-5)
    with pytest.raises(OODError, match="needs"):
        ood.score(odd[:, :40])  # features of another model: too few columns


def test_format2_ood_part_still_scores(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    """A format-2 artifact's penultimate-only OOD part scores the penultimate columns, with a warning."""
    path = make_artifact(tmp_path / "v3.pt", size=48)
    loaded = load_artifact(path)
    x = ood_images(48, 6)
    feats = loaded.features(x)
    pen = next(b for b in loaded.feature_layout() if b["name"] == "penultimate")
    assert pen["start"] == 0 and feats.shape[1] > pen["stop"]  # stage statistics follow the embedding
    new = OODModel.from_dict(loaded.spec.ood)  # type: ignore[arg-type]
    old = fit_ood(feats[:, :pen["stop"]], None, feats[:3, :pen["stop"]], weights_fingerprint=loaded.fingerprint)
    payload = torch.load(path, weights_only=True)
    payload["format_version"] = 2
    payload["ood"] = {"method": "mahalanobis", "means": torch.as_tensor(old.blocks[0].means),
                      "precision": torch.as_tensor(old.blocks[0].precision),
                      "threshold": old.threshold * old.blocks[0].scale,  # format 2: unscaled distances
                      "quantile": 0.995, "feature_dim": pen["stop"], "weights_fingerprint": loaded.fingerprint}
    torch.save(payload, tmp_path / "v2.pt")
    caplog.set_level("WARNING")
    v2 = load_artifact(tmp_path / "v2.pt")
    assert v2.format_version == 2 and "bonescreen ood fit" in caplog.text and "version 2" in caplog.text
    part = OODModel.from_dict(v2.spec.ood)  # type: ignore[arg-type]
    assert part.legacy and part.flag_ratio == 1.0 and not new.legacy
    np.testing.assert_allclose(part.score(v2.features(x)), old.score(feats[:, :pen["stop"]]), rtol=1e-5)


def _v1_copy(src: Path, dest: Path) -> Path:
    payload = torch.load(src, weights_only=True)
    payload["format_version"] = 1
    payload.pop("ood", None)
    torch.save(payload, dest)
    return dest


def test_v1_artifact_message_fit_command_and_v2(tmp_path: Path, write_dicom, caplog) -> None:  # type: ignore[no-untyped-def]
    """v1 loads with a clear message; screen refuses it (naming the command); `ood fit` writes a v2 file."""
    from _train_helpers import make_cohort

    from bonescreen.cli import main

    v2 = make_artifact(tmp_path / "v2.pt", size=48)
    v1 = _v1_copy(v2, tmp_path / "old.pt")
    before = hashlib.sha256(v1.read_bytes()).hexdigest()
    caplog.set_level("WARNING")
    loaded = load_artifact(v1)
    assert loaded.format_version == 1 and loaded.spec.ood is None
    assert "bonescreen ood fit" in caplog.text
    img = write_dicom(radiograph(1), name="in/a.dcm")
    with pytest.raises(Exception, match="bonescreen ood fit"):
        screen([img], v1, tmp_path / "o1", options=ScreenOptions(progress=False))
    manifest = make_cohort(tmp_path / "cohort", {"train": 24, "tune": 12, "test": 0}, size=48)
    new = tmp_path / "new.pt"
    assert main(["ood", "fit", str(v1), "--manifest", str(manifest), "--cache", str(tmp_path / "cache"),
                 "--out", str(new), "--no-progress"]) == 0
    assert hashlib.sha256(v1.read_bytes()).hexdigest() == before  # the input is never changed
    up = load_artifact(new)
    assert up.format_version == FORMAT_VERSION == 3
    ood = OODModel.from_dict(up.spec.ood)  # type: ignore[arg-type]
    assert ood.weights_fingerprint == up.fingerprint and ood.n_fit == 24 and ood.n_tune == 12
    assert ood.blocks[0].name == "penultimate" and ood.blocks[0].means.shape[0] == 2  # class-conditional
    assert len(ood.blocks) > 1 and all(b.means.shape[0] == 1 for b in ood.blocks[1:])  # stage blocks: one class
    assert ood.augment_copies == 4 and ood.aug_quantile == pytest.approx(0.99)
    assert ood.flag_quantile == pytest.approx(0.9) and ood.flag_threshold <= ood.threshold
    # the same weights: probabilities unchanged
    x = ood_images(48, 4)
    np.testing.assert_allclose(up.predict_proba(x), loaded.predict_proba(x), atol=1e-6)
    # the input path as --out, or an existing --out, is refused
    assert main(["ood", "fit", str(v1), "--manifest", str(manifest), "--cache", str(tmp_path / "cache"),
                 "--out", str(v1), "--no-progress"]) == 1
    assert main(["ood", "fit", str(v1), "--manifest", str(manifest), "--cache", str(tmp_path / "cache"),
                 "--out", str(new), "--no-progress"]) == 1


def test_ood_part_of_another_model_is_refused(tmp_path: Path, write_dicom) -> None:  # type: ignore[no-untyped-def]
    a = make_artifact(tmp_path / "a.pt", seed=1)
    b = make_artifact(tmp_path / "b.pt", seed=2, ood=False)
    pa, pb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    pb["ood"] = pa["ood"]  # copied onto other weights
    torch.save(pb, tmp_path / "mixed.pt")
    img = write_dicom(radiograph(1), name="in/a.dcm")
    with pytest.raises(OODError, match="fitted for other weights"):
        screen([img], tmp_path / "mixed.pt", tmp_path / "out", options=ScreenOptions(progress=False))
    # a model without any OOD part: refused too, and the CLI says how to go on
    from bonescreen.cli import main

    assert main(["screen", str(img), "--model", str(b), "--out", str(tmp_path / "o2"), "--no-progress"]) == 1


def test_opt_out_is_recorded_in_run_json_and_every_row(tmp_path: Path, write_dicom) -> None:  # type: ignore[no-untyped-def]
    b = make_artifact(tmp_path / "b.pt", seed=2, ood=False)
    write_dicom(radiograph(1), name="in/a.dcm")
    write_dicom(radiograph(2), name="in/lat.dcm", ViewPosition="LL")
    s = screen([tmp_path / "in"], b, tmp_path / "out", options=ScreenOptions(progress=False, ood="off"))
    assert s.n_screened == 1 and "OUT-OF-DISTRIBUTION CHECK OFF" in s.text()
    assert json.loads((tmp_path / "out" / "run.json").read_text())["ood"] == "off"
    rows = _rows(tmp_path / "out")
    assert [r["ood_check"] for r in rows] == ["off", "off"] and all(r["ood_score"] == "" for r in rows)
    # a resumed run under another OOD policy is refused instead of mixing rows
    with pytest.raises(ScreenError, match="ood"):
        screen([tmp_path / "in"], make_artifact(tmp_path / "b2.pt", seed=2), tmp_path / "out",
               options=ScreenOptions(progress=False))


def _tight(path: Path, inside: np.ndarray, outside: np.ndarray) -> None:
    """Set the OOD threshold between the test's in- and out-of-distribution images (the plumbing is
    under test here; how well the real method separates is bench/bench_ood.py's measurement)."""
    loaded = load_artifact(path)
    ood = OODModel.from_dict(loaded.spec.ood)  # type: ignore[arg-type]
    d_in, d_out = ood.distance(loaded.features(inside)), ood.distance(loaded.features(outside))
    assert d_out.min() > d_in.max()
    payload = torch.load(path, weights_only=True)
    payload["ood"]["threshold"] = float(np.sqrt(d_in.max() * d_out.min()))
    torch.save(payload, path)


def test_out_of_distribution_refused_or_flagged(tmp_path: Path, write_dicom) -> None:  # type: ignore[no-untyped-def]
    from bonescreen.preprocess import preprocess_array

    model = make_artifact(tmp_path / "m.pt", size=64)
    good = [radiograph(i) for i in range(3)]
    for i, g in enumerate(good):
        write_dicom(g, name=f"in/good{i}.dcm")
    write_dicom(_checker(), name="in/checker.dcm")  # a valid adult chest CR header around a checkerboard
    _tight(model, np.stack([preprocess_array(g.astype(np.float32), 64) for g in good]),
           preprocess_array(_checker().astype(np.float32), 64)[None])
    # the lung-field check would catch a checkerboard first; this test is about the OOD check
    gate = {"lung_fields": False}
    s = screen([tmp_path / "in"], model, tmp_path / "out", options=ScreenOptions(progress=False, gate=gate))
    rows = {Path(r["path"]).name: r for r in _rows(tmp_path / "out")}
    bad = rows["checker.dcm"]
    assert bad["eligible"] == "False" and bad["reason"] == "out_of_distribution"
    assert float(bad["ood_score"]) > 1 and bad["score"] == "" and bad["category"] == ""
    assert "OOD score" in bad["message"] and bad["ood_check"] == "refuse"
    for i in range(3):
        r = rows[f"good{i}.dcm"]
        assert r["eligible"] == "True" and float(r["ood_score"]) <= 1 and r["category"] and r["reason"] == ""
    assert s.reasons == {"out_of_distribution": 1}
    # --ood flag: marked, but scored
    s = screen([tmp_path / "in"], model, tmp_path / "flag",
               options=ScreenOptions(progress=False, ood="flag", gate=gate))
    bad = {Path(r["path"]).name: r for r in _rows(tmp_path / "flag")}["checker.dcm"]
    assert bad["eligible"] == "True" and bad["reason"] == "out_of_distribution" and bad["category"]
    assert float(bad["score"]) >= 0 and "flagged, not refused" in bad["message"]
    assert s.n_screened == 4


def test_no_lung_fields_check() -> None:
    """The model-free check: a frontal chest profile passes, noise / gradient / a page do not."""
    from bonescreen.screen.gate import lung_fields

    yy, xx = np.mgrid[0:256, 0:256] / 256
    rng = np.random.default_rng(0)
    lungs = np.exp(-((xx - 0.3) ** 2 + (yy - 0.5) ** 2) / 0.02) + np.exp(-((xx - 0.7) ** 2 + (yy - 0.5) ** 2) / 0.02)
    chest = 1.0 - 0.8 * lungs + 0.02 * rng.normal(size=xx.shape)
    assert lung_fields(chest)[0]
    for img in (rng.random((256, 256)), xx, 1.0 - 0.01 * (rng.random((256, 256)) < 0.05)):
        assert not lung_fields(img)[0]
    # every test radiograph is chest-like enough
    assert all(lung_fields(radiograph(s).astype(np.float64))[0] for s in range(30))


def test_no_lung_fields_refused_in_screen(tmp_path: Path, write_dicom) -> None:  # type: ignore[no-untyped-def]
    yy, xx = np.mgrid[0:256, 0:256] / 256
    write_dicom((xx * 4000).astype(np.uint16), name="in/gradient.dcm")  # a chest CR header, a gradient
    write_dicom(radiograph(3), name="in/chest.dcm")
    model = make_artifact(tmp_path / "m.pt", size=64)
    screen([tmp_path / "in"], model, tmp_path / "out", options=ScreenOptions(progress=False))
    rows = {Path(r["path"]).name: r for r in _rows(tmp_path / "out")}
    assert rows["gradient.dcm"]["reason"] == "no_lung_fields" and "contrast" in rows["gradient.dcm"]["message"]
    assert rows["chest.dcm"]["eligible"] == "True"
    # the opt-out is recorded with the gate settings
    screen([tmp_path / "in"], model, tmp_path / "o2", options=ScreenOptions(progress=False, gate={"lung_fields": False}))
    assert json.loads((tmp_path / "o2" / "run.json").read_text())["gate"]["lung_fields"] is False
    assert {Path(r["path"]).name: r for r in _rows(tmp_path / "o2")}["gradient.dcm"]["reason"] != "no_lung_fields"
