"""Site profiles in the artifact (round trip, refusal for other weights, weights unchanged), the
abstain band, label-free adaptation of a small network, and the calibrate/adapt/profiles CLI."""

from __future__ import annotations

import csv
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from _screen_helpers import make_artifact, radiograph

from bonescreen.adapt.abstain import (
    INDETERMINATE,
    INDETERMINATE_MESSAGE,
    AbstainBand,
    apply_band,
    band_from_probability,
    band_from_rates,
    band_summary,
    classify,
)
from bonescreen.adapt.labelfree import LabelFreeConfig, adapt_images, label_free_profile
from bonescreen.adapt.profile import (
    ProfileError,
    SiteProfile,
    export_profile,
    get_profile,
    import_profile,
    list_profiles,
    profiled_model,
    read_payload,
    remove_profile,
    site_rows,
    write_profile,
)
from bonescreen.adapt.recalibrate import CalibrationError, Recalibration, logit
from bonescreen.adapt.tta import adapted_module, batchnorm_layers, feature_statistics, fit_feature_align, penultimate
from bonescreen.artifact import load_artifact, weights_fingerprint
from bonescreen.cli import main as cli


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def profile_for(path: Path, name: str = "SITE_A", **kw) -> SiteProfile:  # type: ignore[no-untyped-def]
    loaded = load_artifact(path)
    args = dict(name=name, kind="calibrated", model_fingerprint=weights_fingerprint(loaded.model), task="stage2",
                threshold=0.31, recalibration=Recalibration("platt", {"a": -0.2, "b": 0.8}),
                abstain=AbstainBand(0.25, 0.4, "probability", {"width": 0.05}),
                data={"n": 200, "n_positive": 80, "date_first": "2024-01-02"})
    args.update(kw)
    return SiteProfile(**args)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("adapt-models")
    return {"a": make_artifact(d / "a.pt", seed=1), "b": make_artifact(d / "b.pt", seed=2),
            "bn": make_artifact(d / "bn.pt", arch="tf_efficientnet_lite0", size=64, seed=3)}


def test_profile_round_trip_keeps_the_weights_byte_identical(tmp_path: Path, models: dict[str, Path]) -> None:
    src = tmp_path / "m.pt"
    src.write_bytes(models["a"].read_bytes())
    before = read_payload(src)["state_dict"]
    sha_before = sha(src)
    prof = profile_for(src)
    write_profile(src, prof)
    after = read_payload(src)
    assert sha(src) != sha_before  # the file changed (the profile table) ...
    assert after["artifact_lineage"] == [sha_before]  # ... and remembers what it was
    assert list(after["state_dict"]) == list(before)  # ... the weights did not
    for k, v in before.items():
        w = after["state_dict"][k]
        assert w.dtype == v.dtype and w.shape == v.shape
        assert w.numpy().tobytes() == v.numpy().tobytes(), k
    loaded = load_artifact(src)
    assert weights_fingerprint(loaded.model) == prof.model_fingerprint
    got = get_profile(loaded, "SITE_A")
    assert got.to_dict() == prof.to_dict()
    assert got.threshold == pytest.approx(0.31)
    assert got.abstain == prof.abstain
    json.dumps(got.to_dict(), allow_nan=False)  # strict JSON (ONNX metadata carries the spec as JSON)
    # a second profile, in a new file: the original stays as it was
    out = tmp_path / "m2.pt"
    write_profile(src, profile_for(src, "SITE_B"), out=out)
    assert set(list_profiles(out)) == {"SITE_A", "SITE_B"}
    assert set(list_profiles(src)) == {"SITE_A"}
    with pytest.raises(ProfileError, match="already has"):
        write_profile(src, profile_for(src))
    write_profile(src, profile_for(src, threshold=0.4), replace=True)
    assert list_profiles(src)["SITE_A"].threshold == pytest.approx(0.4)
    remove_profile(src, "SITE_A")
    assert list_profiles(src) == {}
    assert [t.numpy().tobytes() for t in read_payload(src)["state_dict"].values()] == \
        [t.numpy().tobytes() for t in before.values()]
    with pytest.raises(ProfileError, match="no site profile"):
        remove_profile(src, "SITE_A")


def test_a_profile_for_another_model_is_refused(tmp_path: Path, models: dict[str, Path]) -> None:
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    a.write_bytes(models["a"].read_bytes())
    b.write_bytes(models["b"].read_bytes())
    prof = profile_for(a)
    with pytest.raises(ProfileError, match="only fits the model it was made with"):
        write_profile(b, prof)
    write_profile(a, prof)
    exported = export_profile(a, "SITE_A", tmp_path / "site_a.json")
    with pytest.raises(ProfileError, match="only fits"):
        import_profile(b, exported)
    import_profile(a, exported, name="SITE_A_COPY")
    assert set(list_profiles(a)) == {"SITE_A", "SITE_A_COPY"}
    # weights swapped under a stored profile (someone edited the file): refused at use
    payload = read_payload(a)
    payload["state_dict"] = read_payload(b)["state_dict"]
    torch.save(payload, tmp_path / "tampered.pt")
    with pytest.raises(ProfileError, match="fitted for other weights"):
        get_profile(load_artifact(tmp_path / "tampered.pt"), "SITE_A")
    with pytest.raises(ProfileError, match="no site profile 'ELSEWHERE'"):
        get_profile(load_artifact(a), "ELSEWHERE")


def test_older_artifacts_without_profiles_still_load(tmp_path: Path, models: dict[str, Path]) -> None:
    payload = read_payload(models["a"])
    payload.pop("site_profiles", None)
    torch.save(payload, tmp_path / "old.pt")
    loaded = load_artifact(tmp_path / "old.pt")
    assert loaded.spec.site_profiles == {}
    assert list_profiles(tmp_path / "old.pt") == {}


def test_malformed_profiles_and_names_are_refused() -> None:
    with pytest.raises(ProfileError, match="profile name"):
        SiteProfile(name="../x", kind="calibrated", model_fingerprint="sha256:x", task="stage2", threshold=0.5)
    with pytest.raises(ProfileError, match="binary"):
        SiteProfile(name="x", kind="calibrated", model_fingerprint="sha256:x", task="pediatric", threshold=0.5)
    with pytest.raises(ProfileError, match="not a bonescreen site profile"):
        SiteProfile.from_dict({"name": "x"})
    d = SiteProfile(name="x", kind="label_free", model_fingerprint="sha256:x", task="stage2", threshold=0.5).to_dict()
    d["version"] = 99
    with pytest.raises(ProfileError, match="version 99"):
        SiteProfile.from_dict(d)


# --------------------------------------------------------------------------
# The abstain band
# --------------------------------------------------------------------------


def test_abstain_band_in_probability_and_in_rates() -> None:
    band = band_from_probability(0.4, 0.1)
    assert (band.low, band.high) == pytest.approx((0.3, 0.5))
    np.testing.assert_array_equal(classify([0.1, 0.31, 0.45, 0.5, 0.9], 0.4, band), [0, -1, -1, 1, 1])
    # through a Platt map the band is symmetric in probability, not in score
    rec = Recalibration("platt", {"a": 1.0, "b": 1.0})
    b2 = band_from_probability(0.3, 0.05, rec)
    p = rec.apply([b2.low, 0.3, b2.high])
    assert p[1] - p[0] == pytest.approx(0.05, abs=1e-6) and p[2] - p[1] == pytest.approx(0.05, abs=1e-6)
    rng = np.random.default_rng(0)
    y = rng.random(2_000) < 0.4
    s = np.clip(0.5 + 0.2 * (y - 0.4) + 0.15 * rng.normal(size=y.size), 0, 1)
    rb = band_from_rates(y, s, sensitivity=0.95, specificity=0.95, threshold=0.5)
    assert rb.low <= 0.5 <= rb.high
    summ = band_summary(y, s, 0.5, rb)
    # below the band: at most 5% of positives; above: at most 5% of negatives
    assert (s[y] < rb.low).mean() <= 0.05 + 1e-9
    assert (s[~y] >= rb.high).mean() <= 0.05 + 1e-9
    assert summ["n_indeterminate"] == int(rb.contains(s).sum()) > 0
    # counted as referred for DXA (what the screen does with them), the band keeps both targets' sides
    assert summ["referred"]["sensitivity"]["value"] >= 0.95
    assert summ["decided"]["specificity"]["value"] >= summ["referred"]["specificity"]["value"]
    with pytest.raises(CalibrationError):
        band_from_probability(0.4, 0.0)
    with pytest.raises(CalibrationError):
        AbstainBand(0.6, 0.4)


def test_apply_band_on_decided_rows() -> None:
    band = AbstainBand(0.4, 0.6)
    rows = [
        {"score": 0.45, "category": "normal", "flag": False, "message": ""},
        {"score": 0.55, "category": "low_bone_mass", "flag": True, "message": "note"},
        {"score": 0.8, "category": "low_bone_mass", "flag": True},
        {"score": None, "score_stage1": 0.9, "category": "osteoporosis", "flag": True},  # stage 1 decided
        {"score": 0.5, "category": "osteoporosis", "flag": True},
    ]
    out = apply_band(rows, band)
    assert [r["category"] for r in out] == [INDETERMINATE, INDETERMINATE, "low_bone_mass", "osteoporosis",
                                           "osteoporosis"]
    assert [r["indeterminate"] for r in out] == [True, True, False, False, False]
    assert out[0]["flag"] is True and out[0]["message"] == INDETERMINATE_MESSAGE
    assert out[1]["message"] == f"note; {INDETERMINATE_MESSAGE}"
    assert rows[0]["category"] == "normal"  # pure: inputs untouched
    assert [r["category"] for r in apply_band(rows, None)] == [r["category"] for r in rows]


def test_site_rows_adds_the_site_probability_and_the_band(tmp_path: Path, models: dict[str, Path]) -> None:
    prof = profile_for(models["a"])
    rows = site_rows([{"score": 0.3, "category": "normal", "flag": False},
                      {"score": 0.7, "category": "low_bone_mass", "flag": True}], prof)
    assert rows[0]["category"] == INDETERMINATE and rows[1]["category"] == "low_bone_mass"
    assert rows[1]["site_probability"] == pytest.approx(float(prof.probability([0.7])[0]))
    assert all(r["site_profile"] == "SITE_A" for r in rows)
    plain = site_rows([{"score": 0.3, "category": "normal"}], None)
    assert plain[0]["site_profile"] is None and plain[0]["indeterminate"] is False


# --------------------------------------------------------------------------
# Label-free adaptation of a network
# --------------------------------------------------------------------------


def _images(n: int, size: int, seed: int, gain: float = 1.0, offset: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.stack([radiograph(int(s), (size, size)) for s in rng.integers(0, 10_000, n)]).astype(float)
    x = base / base.max() * 255.0 * gain + offset
    return np.clip(x, 0, 255).astype(np.uint8)


def test_batchnorm_statistics_are_re_estimated_on_a_copy(models: dict[str, Path]) -> None:
    from bonescreen.adapt.tta import fit_batchnorm

    loaded = load_artifact(models["bn"])
    fp = weights_fingerprint(loaded.model)
    target = _images(24, 64, seed=1, gain=0.5, offset=60)
    ad = fit_batchnorm(loaded, target, batch_size=12)
    assert ad["method"] == "batchnorm" and ad["n_layers"] == len(batchnorm_layers(loaded.model)) > 10
    assert weights_fingerprint(loaded.model) == fp  # the loaded model was not touched
    net = adapted_module(loaded.model, ad)
    first_name, first = next(iter(batchnorm_layers(net).items()))
    # the first BatchNorm's running mean is the per-channel mean of its input over the target images
    seen: list[torch.Tensor] = []
    handle = dict(loaded.model.named_modules())[first_name].register_forward_hook(
        lambda m, i, o: seen.append(i[0].detach()))
    with torch.no_grad():
        loaded.model(loaded.to_tensor(target))
    handle.remove()
    np.testing.assert_allclose(first.running_mean.numpy(), seen[0].mean(dim=(0, 2, 3)).numpy(), rtol=1e-4, atol=1e-5)
    # the profile carries it as plain numbers and rebuilds the same network
    again = adapted_module(loaded.model, json.loads(json.dumps(ad)))
    x = loaded.to_tensor(target[:4])
    with torch.no_grad():
        torch.testing.assert_close(again(x), net(x))
        assert not torch.allclose(net(x), loaded.model(x))


def test_feature_alignment_matches_the_development_statistics(models: dict[str, Path]) -> None:
    loaded = load_artifact(models["a"])  # convnext_atto: LayerNorm, no BatchNorm
    dev = _images(24, 64, seed=2)
    site = _images(24, 64, seed=3, gain=0.6, offset=50)
    src = feature_statistics(loaded, dev)
    ad = fit_feature_align(loaded, site, src)
    net = adapted_module(loaded.model, ad)
    with torch.no_grad():
        f = penultimate(net, loaded.to_tensor(site)).double()
        np.testing.assert_allclose(f.mean(0).numpy(), src["mean"], atol=1e-4)
        np.testing.assert_allclose(f.std(0).numpy(), src["std"], rtol=1e-3, atol=1e-4)
        same = adapted_module(loaded.model, fit_feature_align(loaded, dev, src))  # site == development: no change
        x = loaded.to_tensor(dev[:4])
        torch.testing.assert_close(same(x), loaded.model(x), atol=1e-4, rtol=1e-4)


def test_intensity_table_inverts_a_monotone_site_response() -> None:
    from bonescreen.adapt.tta import intensity_histogram, matching_lut

    dev = _images(24, 64, seed=5)
    # a vendor with a curved response: the same anatomy through a gamma curve and a narrower window
    site = np.clip(255.0 * (dev / 255.0) ** 2.2 * 0.8 + 20, 0, 255).astype(np.uint8)
    lut = matching_lut(intensity_histogram(site), intensity_histogram(dev))
    assert lut.shape == (256,) and np.all(np.diff(lut) >= 0)  # monotone
    mapped = lut[site]
    # per pixel, the table puts the site's levels back where the development site had them
    occupied = dev > 10  # below that the gamma curve merges many development levels into one
    assert np.abs(mapped[occupied] - dev[occupied]).mean() < 3.0
    assert np.abs(site.astype(float)[occupied] - dev[occupied]).mean() > 30.0
    same = matching_lut(intensity_histogram(dev), intensity_histogram(dev))  # home: (nearly) the identity
    levels = np.unique(dev)
    np.testing.assert_allclose(same[levels], levels, atol=1.0)
    with pytest.raises(CalibrationError, match="256"):
        matching_lut([1.0] * 10, intensity_histogram(dev))
    with pytest.raises(CalibrationError, match="uint8"):
        intensity_histogram(dev.astype(float))


@pytest.mark.parametrize("method", ["intensity", "intensity_batchnorm"])
def test_intensity_adaptation_reads_the_site_on_the_development_grey_scale(models: dict[str, Path],
                                                                          method: str) -> None:
    from bonescreen.adapt.labelfree import fit_adaptation
    from bonescreen.adapt.tta import IntensityMapped, intensity_histogram

    loaded = load_artifact(models["bn" if method == "intensity_batchnorm" else "a"])  # "a": ConvNeXt, no BatchNorm
    fp = weights_fingerprint(loaded.model)
    dev = _images(24, 64, seed=6)
    site = np.clip(255.0 * (dev / 255.0) ** 0.5, 0, 255).astype(np.uint8)
    ad, before, after = fit_adaptation(loaded, site, method, None, reference_hist=intensity_histogram(dev))
    assert ad is not None and ad["method"] == method and ad["mean_level_shift"] > 5
    assert weights_fingerprint(loaded.model) == fp
    net = adapted_module(loaded.model, json.loads(json.dumps(ad)))  # plain numbers in the profile
    assert isinstance(net, IntensityMapped)
    lut = np.asarray(ad["lut"], dtype=np.float32)
    x = loaded.to_tensor(site[:4])
    inner = adapted_module(loaded.model, {**ad, "method": "batchnorm"}) if method == "intensity_batchnorm" \
        else loaded.model
    with torch.no_grad():
        # the adapted network == the (BatchNorm-adapted) network on the table-mapped images
        torch.testing.assert_close(net(x), inner(loaded.to_tensor(lut[site[:4]])), atol=1e-5, rtol=1e-5)
    from bonescreen.adapt.tta import adapted_model

    np.testing.assert_allclose(adapted_model(loaded, ad).score(site), after, atol=1e-5)
    assert np.abs(after - before).max() > 1e-4
    with pytest.raises(CalibrationError, match="--home NAME"):
        fit_adaptation(loaded, site, method, None)


def test_label_free_follows_the_home_profiles_intensity_reference(models: dict[str, Path]) -> None:
    from bonescreen.adapt.tta import fit_home_adaptation

    loaded = load_artifact(models["bn"])
    dev = _images(24, 64, seed=7)
    home_ad = fit_home_adaptation(loaded, dev, "intensity_batchnorm")
    assert home_ad["mean_level_shift"] < 1.0  # at home the table is (nearly) the identity
    home = SiteProfile(name="HOME", kind="calibrated", model_fingerprint=weights_fingerprint(loaded.model),
                       task="stage2", threshold=0.3, recalibration=Recalibration("platt", {"a": 0.5, "b": 0.8}),
                       adaptation=home_ad, prevalence={"value": 0.45})
    site = np.clip(255.0 * (_images(40, 64, seed=8) / 255.0) ** 1.8, 0, 255).astype(np.uint8)
    out = adapt_images(loaded, site, name="NEW", config=LabelFreeConfig(n_boot=50), home=home)
    ad = out.profile.adaptation
    assert out.report["method"] == "intensity_batchnorm"  # auto: the home profile's adaptation
    assert ad["reference_histogram"] == pytest.approx(home_ad["reference_histogram"])
    assert out.report["adaptation"]["mean_level_shift"] > 10
    # the home's grey scale wins over --reference images: its calibration was made on that scale
    other = adapt_images(loaded, site, name="NEW", config=LabelFreeConfig(n_boot=50), home=home,
                         reference_hist=[1.0 / 256] * 256)
    assert other.profile.adaptation["reference_histogram"] == pytest.approx(home_ad["reference_histogram"])
    with pytest.raises(CalibrationError, match="adapt this site the same way"):
        adapt_images(loaded, site, name="NEW", config=LabelFreeConfig(method="batchnorm", n_boot=50), home=home)
    with pytest.raises(CalibrationError, match="--adapt must be one of"):
        fit_home_adaptation(loaded, dev, "feature_align")


def test_site_story_measures_three_stages_on_one_held_out_half(models: dict[str, Path]) -> None:
    from bonescreen.adapt.labelfree import score_images
    from bonescreen.adapt.story import SiteData, format_story, home_profile, site_story

    loaded = load_artifact(models["a"])  # ConvNeXt: the grey scale matched, no BatchNorm to re-estimate
    rng = np.random.default_rng(0)

    def site(name: str, n: int, seed: int, gamma: float) -> SiteData:
        imgs = np.clip(255.0 * (_images(n, 64, seed=seed) / 255.0) ** gamma, 0, 255).astype(np.uint8)
        s = score_images(loaded, imgs)  # labels that follow the (random) network's score, plus noise
        y = (s + rng.normal(0, s.std(), n) > np.median(s)).astype(np.int64)
        return SiteData(name, imgs, y, np.array([f"{name}{i // 2}" for i in range(n)]), oracle_auc=0.9)

    home = home_profile(loaded, site("DEV", 40, 9, 1.0))
    assert home.kind == "calibrated" and home.adaptation["method"] == "intensity"
    st = site_story(loaded, site("FAR", 60, 10, 2.0), home, n_boot=50)
    before, lf, cal = st["rows"]
    assert st["n_held_out"] == before["n"] == lf["n"] == cal["n"] and st["n_held_out"] + 30 <= 60 + 1
    assert lf["method"] == "intensity" and before["threshold"] == loaded.spec.threshold
    assert cal["auc"] == pytest.approx(before["auc"]) and cal["recalibration"] in ("identity", "platt", "isotonic")
    assert before["headroom"] == pytest.approx((before["auc"] - 0.5) / 0.4)
    text = format_story([st])
    assert "FAR" in text and "label-free" in text and "calibrate (" in text


def test_label_free_profile_is_opt_in_and_reproduces_its_scores(tmp_path: Path, models: dict[str, Path]) -> None:
    art = tmp_path / "bn.pt"
    art.write_bytes(models["bn"].read_bytes())
    loaded = load_artifact(art)
    site = _images(32, 64, seed=4, gain=0.7, offset=40)
    out = adapt_images(loaded, site, name="NEWSITE", config=LabelFreeConfig(train_prior=0.4, n_boot=100))
    r = out.report
    assert r["method"] == "batchnorm"
    assert 0.0 < r["prevalence"]["lo"] <= r["prevalence"]["value"] <= r["prevalence"]["hi"] < 1.0
    assert out.profile.recalibration.method == "prior_shift"
    assert out.profile.threshold == loaded.spec.threshold  # no home profile: EM reported, cut-off kept
    assert "no home profile" in r["warning"]
    # rule "probability": the artifact's cut-off applied to the prior-adjusted probability
    kw = dict(name="P", base_scores=out.scores_before, scores=out.scores_after, adaptation=out.profile.adaptation)
    pr = label_free_profile(loaded, **kw, config=LabelFreeConfig(train_prior=0.4, rule="probability", n_boot=50),
                            home=None).profile
    assert pr.recalibration.apply([pr.threshold])[0] == pytest.approx(0.5, abs=1e-6)
    # a home profile (calibrated at the development site with the same adaptation) supplies the map and prior
    home = SiteProfile(name="HOME", kind="calibrated", model_fingerprint=weights_fingerprint(loaded.model),
                       task="stage2", threshold=0.3, recalibration=Recalibration("platt", {"a": 0.5, "b": 0.8}),
                       adaptation=out.profile.adaptation, prevalence={"value": 0.45})
    oh = label_free_profile(loaded, **kw, config=LabelFreeConfig(n_boot=50), home=home)
    rec, pi = oh.profile.recalibration, oh.report["prevalence"]["value"]
    assert oh.report["threshold"]["rule"] == "probability" and oh.report["train_prior"] == 0.45
    assert rec.method == "platt" and rec.params["a"] == 0.5
    assert rec.shift == pytest.approx(float(logit(pi) - logit(0.45)))
    assert rec.apply([oh.profile.threshold])[0] == pytest.approx(0.5, abs=1e-6)
    assert label_free_profile(loaded, **kw, config=LabelFreeConfig(rule="home", n_boot=50), home=home
                              ).profile.threshold == 0.3
    with pytest.raises(CalibrationError, match="adapt this site the same way"):
        label_free_profile(loaded, **{**kw, "adaptation": None}, config=LabelFreeConfig(n_boot=50), home=home)
    with pytest.raises(CalibrationError, match="needs a home profile"):
        label_free_profile(loaded, **kw, config=LabelFreeConfig(rule="home", train_prior=0.4), home=None)
    write_profile(art, out.profile)
    reloaded = load_artifact(art)
    np.testing.assert_allclose(reloaded.score(site), out.scores_before, atol=1e-6)  # no profile: base model
    prof = get_profile(reloaded, "NEWSITE")
    np.testing.assert_allclose(profiled_model(reloaded, prof).score(site), out.scores_after, atol=1e-5)
    with pytest.raises(CalibrationError, match="at least 30"):
        adapt_images(loaded, site[:10], name="X", config=LabelFreeConfig(train_prior=0.4))
    with pytest.raises(CalibrationError, match="training prevalence"):
        adapt_images(loaded, site, name="X")  # a random-weight artifact has no model card
    with pytest.raises(CalibrationError, match="feature statistics"):
        adapt_images(loaded, site, name="X", config=LabelFreeConfig(method="feature_align", train_prior=0.4))
    # a LayerNorm network (ConvNeXt) without development statistics: no silent EM-only fallback
    with pytest.raises(CalibrationError, match="no BatchNorm layers"):
        adapt_images(load_artifact(models["a"]), site, name="X", config=LabelFreeConfig(train_prior=0.4))


# --------------------------------------------------------------------------
# CLI: calibrate from screening results + labels, adapt, profiles
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def screened(tmp_path_factory: pytest.TempPathFactory, models: dict[str, Path]) -> dict[str, Path]:
    """A model copy, 44 screened synthetic DICOMs and labels that follow the score (plus noise)."""
    from conftest import build_dicom

    d = tmp_path_factory.mktemp("adapt-screened")
    art = d / "model.pt"
    art.write_bytes(models["a"].read_bytes())
    imgs = d / "images"
    imgs.mkdir()
    for i in range(44):
        px = radiograph(i, (256, 256), levels=1500 + 60 * i)
        build_dicom(px, PatientID=f"P{i:03d}", StudyDate=f"202401{1 + i % 28:02d}").save_as(
            imgs / f"img{i:03d}.dcm", enforce_file_format=True)
    assert cli(["screen", str(imgs), "--model", str(art), "--out", str(d / "screen"), "--no-progress"]) == 0
    with open(d / "screen" / "results.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["eligible"] == "True"]
    assert len(rows) == 44
    order = sorted(rows, key=lambda r: float(r["score"]))
    rng = np.random.default_rng(0)
    labels = d / "labels.csv"
    with open(labels, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image_id", "label"])
        for rank, r in enumerate(order):
            w.writerow([r["image_id"], int(rank + rng.normal(0, 8) > 22)])
    return {"model": art, "results": d / "screen", "labels": labels, "dir": d}


def test_calibrate_cli_from_screening_results(tmp_path: Path, screened: dict[str, Path], capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "site.pt"
    code = cli(["calibrate", str(screened["model"]), "--results", str(screened["results"]), "--labels",
                str(screened["labels"]), "--profile", "HOSP_A", "--out", str(out), "--target-specificity", "0.8",
                "--abstain-width", "0.05", "--prevalence", "0.3", "--learning-curve", "25", "--repeats", "3",
                "--report", str(tmp_path / "report.json")])
    assert code == 0
    text = capsys.readouterr().out
    for what in ("calibration slope", "calibration intercept", "ECE", "sensitivity", "specificity",
                 "PPV at prevalence 0.30", "learning curve", "recalibration:", "operating point (specificity 0.80)"):
        assert what in text, what
    prof = list_profiles(out)["HOSP_A"]
    assert prof.kind == "calibrated"
    assert prof.data["n"] == 44 and prof.data["kind"] == "screen_results"
    assert prof.data["date_first"] == "2024-01-01"
    assert "patient" not in json.dumps(prof.data).replace("n_patients", "")  # counts, no identifiers
    assert prof.abstain is not None and prof.abstain.basis == "probability"
    assert json.loads((tmp_path / "report.json").read_text())["data"]["n"] == 44
    assert list_profiles(screened["model"]) == {}  # --out: the model given was left as it was
    # the profile is usable on the new file, and the results screened with the old file still join
    assert get_profile(load_artifact(out), "HOSP_A").threshold == prof.threshold
    assert cli(["calibrate", str(out), "--results", str(screened["results"]), "--labels", str(screened["labels"]),
                "--profile", "HOSP_A2", "--learning-curve", "", "--dry-run"]) == 0
    assert cli(["profiles", str(out)]) == 0
    assert "HOSP_A: calibrated, 44 images" in capsys.readouterr().out


def test_calibrate_cli_refuses_bad_input(tmp_path: Path, screened: dict[str, Path], models: dict[str, Path],
                                        capsys) -> None:  # type: ignore[no-untyped-def]
    base = ["calibrate", str(screened["model"]), "--results", str(screened["results"]), "--profile", "X",
            "--learning-curve", "", "--dry-run"]

    def labels(rows: list[tuple[str, int]]) -> Path:
        p = tmp_path / f"labels{len(list(tmp_path.iterdir()))}.csv"
        p.write_text("image_id,label\n" + "".join(f"{i},{y}\n" for i, y in rows))
        return p

    def refused(args: list[str], match: str) -> None:
        capsys.readouterr()
        assert cli(args) == 1
        err = capsys.readouterr().err
        assert re.search(match, err), err

    ids = [r.split(",")[0] for r in screened["labels"].read_text().splitlines()[1:]]
    refused([*base, "--labels", str(labels([(i, k % 2) for k, i in enumerate(ids[:12])]))],
            "only 12 local DXA-paired results; calibrate needs at least 20")
    refused([*base, "--labels", str(labels([(i, 0) for i in ids]))], "all 44 local pairs are negative")
    never = labels([*[(i, k % 2) for k, i in enumerate(ids)], ("1.2.3.never.screened", 1)])
    refused([*base, "--labels", str(never)], "1 of 45 labelled image.*never screened")
    assert cli([*base, "--labels", str(never), "--allow-unmatched"]) == 0
    other = tmp_path / "other.pt"  # screening results made by another model
    other.write_bytes(models["b"].read_bytes())
    refused(["calibrate", str(other), "--results", str(screened["results"]), "--labels", str(screened["labels"]),
             "--profile", "X", "--dry-run"], "not from other.pt")
    refused(["calibrate", str(screened["model"]), "--results", str(screened["results"]), "--profile", "X"],
            "--results needs --labels")
    refused([*base, "--labels", str(screened["labels"]), "--profile", "a b"], "profile name")
    refused(["calibrate", str(screened["model"]), "--manifest", str(screened["labels"]), "--results",
             str(screened["results"]), "--profile", "X"], "give the local pairs as --manifest")


def test_adapt_cli_writes_an_opt_in_profile(tmp_path: Path, screened: dict[str, Path], capsys) -> None:  # type: ignore[no-untyped-def]
    art = tmp_path / "m.pt"
    art.write_bytes(screened["model"].read_bytes())
    images = screened["dir"] / "images"
    from conftest import build_dicom

    ref = tmp_path / "reference"  # development-site look: brighter than the site's images
    ref.mkdir()
    for i in range(24):
        build_dicom(radiograph(100 + i, (256, 256), levels=3600), PatientID=f"R{i:03d}").save_as(
            ref / f"ref{i:03d}.dcm", enforce_file_format=True)
    code = cli(["adapt", str(art), str(images), "--profile", "NEW", "--method", "feature_align", "--reference",
                str(ref), "--train-prior", "0.4", "--bootstrap", "50", "--abstain-width", "0.05"])
    assert code == 0
    text = capsys.readouterr().out
    assert "prevalence (EM" in text and "cut-off on the model score" in text and "feature_align" in text
    prof = list_profiles(art)["NEW"]
    assert prof.kind == "label_free" and prof.adaptation["method"] == "feature_align"
    assert prof.data["n"] == 44 and prof.abstain is not None
    # screening with it runs the adapted copy inside the engine: the scores are the adapted network's
    assert cli(["screen", str(images), "--model", str(art), "--out", str(tmp_path / "s"), "--site-profile", "NEW",
                "--no-progress"]) == 0
    with open(tmp_path / "s" / "results.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["eligible"] == "True"]
    assert len(rows) == 44 and {r["site_profile"] for r in rows} == {"NEW"}
    from bonescreen.adapt.labelfree import collect_images

    loaded = load_artifact(art)
    imgs, _, _ = collect_images([images], loaded)
    want = np.sort(profiled_model(loaded, get_profile(loaded, "NEW")).score(imgs))
    got = np.sort([float(r["score"]) for r in rows])
    np.testing.assert_allclose(got, want, atol=1e-5)
    with open(screened["results"] / "results.csv", newline="") as fh:
        base = np.sort([float(r["score"]) for r in csv.DictReader(fh) if r["eligible"] == "True"])
    assert np.abs(got - base).max() > 1e-4  # the adaptation changed the scores
    import dataclasses

    from bonescreen.screen import ScreeningEngine, load_models

    with pytest.raises(ProfileError, match="exported onnx graph does not carry"):
        ScreeningEngine(dataclasses.replace(load_models(art), backend="onnx"), site_profile="NEW", ood="off")
    # chosen by --backend auto (a choice recorded), an exported graph gives way to the adapted torch network
    auto = dataclasses.replace(load_models(art), backend="openvino", choice={"backend": "openvino"})
    eng = ScreeningEngine(auto, site_profile="NEW", ood="off")
    assert eng.models.backend == "torch" and eng.models.main_torch is not auto.main_torch
    capsys.readouterr()
    assert cli(["profiles", str(art), "--show", "NEW"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["adaptation"]["method"] == "feature_align" and "source_mean" not in shown["adaptation"]
    assert cli(["profiles", str(art), "--export", "NEW", str(tmp_path / "new.json")]) == 0
    assert cli(["profiles", str(art), "--remove", "NEW"]) == 0
    assert cli(["profiles", str(art), "--import", str(tmp_path / "new.json"), "--as", "NEW2"]) == 0
    assert set(list_profiles(art)) == {"NEW2"}
    # --reference without --method: the grey scale matched to the reference's (ConvNeXt: no BatchNorm)
    assert cli(["adapt", str(art), str(images), "--profile", "GREY", "--reference", str(ref), "--train-prior", "0.4",
                "--bootstrap", "50"]) == 0
    assert "adaptation: intensity" in capsys.readouterr().out
    grey = get_profile(load_artifact(art), "GREY")
    assert grey.adaptation["method"] == "intensity" and len(grey.adaptation["lut"]) == 256
    assert cli(["screen", str(images), "--model", str(art), "--out", str(tmp_path / "g"), "--site-profile", "GREY",
                "--no-progress"]) == 0
    with open(tmp_path / "g" / "results.csv", newline="") as fh:
        got = np.sort([float(r["score"]) for r in csv.DictReader(fh) if r["eligible"] == "True"])
    np.testing.assert_allclose(got, np.sort(profiled_model(loaded, grey).score(imgs)), atol=1e-5)
