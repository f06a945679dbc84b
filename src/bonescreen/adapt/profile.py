"""Site profiles: what one hospital learnt about a model, stored by name inside the model artifact.

A profile holds, for one site: an optional label-free adaptation of the network (BatchNorm or
feature statistics, :mod:`bonescreen.adapt.tta`), a score -> probability recalibration, the decision
cut-off on the (adapted) model's score, an optional abstain band, the prevalence it assumed, where
its data came from (counts and dates, never identifiers) and the before/after metrics.

Profiles live in ``ModelSpec.site_profiles`` (``{name: profile dict}``, JSON-able) and are bound to
the weights by ``model_fingerprint`` (:func:`bonescreen.artifact.weights_fingerprint`): a profile
made for other weights is refused on write, on import and on use. Writing a profile rewrites only
the profile table (atomically; the tensors of ``state_dict`` are written back unchanged) into the
same file or a new one, and records the file's previous SHA-256 in ``artifact_lineage`` so screening
results made with the earlier file can still be matched to these weights.

Use at screening time (the engine's decide step):

    prof = get_profile(loaded, "ST_ELSEWHERE")          # refuses a profile for other weights
    model = profiled_model(loaded, prof)               # adapted copy (or the same model)
    rows = decide(..., threshold=prof.threshold)       # the profile's cut-off on model.score
    rows = site_rows(rows, prof)                       # + site probability, abstain band
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
from numpy.typing import ArrayLike

from bonescreen import __version__
from bonescreen.adapt.abstain import AbstainBand, apply_band, classify
from bonescreen.adapt.recalibrate import CalibrationError, Recalibration
from bonescreen.errors import ModelArtifactError
from bonescreen.jsonable import plain
from bonescreen.tasks import TASKS, get_task

PROFILE_SCHEMA = "bonescreen-site-profile"
PROFILE_VERSION = 1
KINDS = ("calibrated", "label_free")
#: Which result columns a profile's score and categories are for, per model task: the tasks a site
#: profile applies to (``Task.profile_score``: stage2, stage1).
TASK_SCORE = {name: t.profile_score for name, t in TASKS.items() if t.profile_score}
#: "stage2 and stage1": what the refusals name
PROFILE_TASKS_TEXT = " and ".join(TASK_SCORE)
_NAME_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


class ProfileError(ModelArtifactError):
    """A site profile is missing, malformed, or belongs to other weights."""

    reason = "bad_site_profile"


def check_name(name: str) -> str:
    if not name or len(name) > 64 or not set(name) <= _NAME_OK or name.startswith("."):
        raise ProfileError(f"profile name {name!r}: use 1-64 letters, digits, '_', '-' or '.'")
    return name


@dataclass
class SiteProfile:
    name: str
    kind: str
    model_fingerprint: str
    task: str
    threshold: float
    recalibration: Recalibration = field(default_factory=Recalibration)
    abstain: AbstainBand | None = None
    adaptation: dict[str, Any] | None = None
    operating_point: dict[str, Any] = field(default_factory=dict)
    prevalence: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    base_profile: str | None = None
    created: str = ""
    bonescreen_version: str = __version__
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_name(self.name)
        if self.kind not in KINDS:
            raise ProfileError(f"profile kind must be one of {KINDS}, got {self.kind!r}")
        if self.task not in TASK_SCORE:
            raise ProfileError(f"site profiles are for binary {'/'.join(TASK_SCORE)} models, not {self.task!r}")
        if not (0.0 <= float(self.threshold) <= 1.0):
            raise ProfileError(f"profile threshold must be a probability-scale score, got {self.threshold}")
        if not self.created:
            self.created = dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()

    # --- use --------------------------------------------------------------------------
    def probability(self, scores: ArrayLike) -> np.ndarray:
        """The site probability of each (adapted-model) score."""
        return self.recalibration.apply(scores)

    def classify(self, scores: ArrayLike) -> np.ndarray:
        """1 / 0 / -1 (indeterminate) per score, with the profile's cut-off and band."""
        return classify(scores, self.threshold, self.abstain)

    @property
    def threshold_probability(self) -> float:
        return float(self.recalibration.apply([self.threshold])[0])

    # --- storage ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = {
            "schema": PROFILE_SCHEMA, "version": PROFILE_VERSION, "name": self.name, "kind": self.kind,
            "model_fingerprint": self.model_fingerprint, "task": self.task, "threshold": float(self.threshold),
            "threshold_probability": self.threshold_probability,
            "recalibration": self.recalibration.to_dict(),
            "abstain": self.abstain.to_dict() if self.abstain else None,
            "adaptation": self.adaptation, "operating_point": self.operating_point,
            "prevalence": self.prevalence, "data": self.data, "metrics": self.metrics,
            "base_profile": self.base_profile, "created": self.created,
            "bonescreen_version": self.bonescreen_version, "notes": list(self.notes),
        }
        out: dict[str, Any] = plain(d, strict=True)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SiteProfile:
        if not isinstance(d, Mapping) or d.get("schema") != PROFILE_SCHEMA:
            raise ProfileError("not a bonescreen site profile")
        if int(d.get("version", 0)) != PROFILE_VERSION:
            raise ProfileError(f"site profile version {d.get('version')}; this bonescreen reads {PROFILE_VERSION}")
        try:
            return cls(
                name=str(d["name"]), kind=str(d["kind"]), model_fingerprint=str(d["model_fingerprint"]),
                task=str(d["task"]), threshold=float(d["threshold"]),
                recalibration=Recalibration.from_dict(d.get("recalibration") or {}),
                abstain=AbstainBand.from_dict(d.get("abstain")), adaptation=d.get("adaptation"),
                operating_point=dict(d.get("operating_point") or {}), prevalence=dict(d.get("prevalence") or {}),
                data=dict(d.get("data") or {}), metrics=dict(d.get("metrics") or {}),
                base_profile=d.get("base_profile"), created=str(d.get("created") or ""),
                bonescreen_version=str(d.get("bonescreen_version") or ""), notes=list(d.get("notes") or []),
            )
        except (KeyError, TypeError, ValueError, CalibrationError) as exc:
            raise ProfileError(f"malformed site profile: {exc}") from exc

    def summary(self) -> dict[str, Any]:
        """The profile without per-layer numbers, for listing."""
        from bonescreen.adapt.tta import summarise_adaptation

        d = self.to_dict()
        d["adaptation"] = summarise_adaptation(self.adaptation)
        d.pop("metrics", None)
        return d


# --------------------------------------------------------------------------
# Artifact I/O
# --------------------------------------------------------------------------


def read_payload(path: str | Path) -> dict[str, Any]:
    """The artifact's stored dict (weights-only load: no code runs)."""
    import torch

    from bonescreen.artifact import FORMAT

    p = Path(path)
    if not p.is_file():
        raise ModelArtifactError(f"model artifact not found: {p}")
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelArtifactError(f"{p} is not a readable bonescreen model artifact: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or "state_dict" not in payload:
        raise ModelArtifactError(f"{p} is not a bonescreen model artifact")
    return payload


def artifact_fingerprint(path: str | Path) -> str:
    from bonescreen.artifact import weights_fingerprint

    return weights_fingerprint(read_payload(path)["state_dict"])


def list_profiles(path: str | Path) -> dict[str, SiteProfile]:
    payload = read_payload(path)
    return {k: SiteProfile.from_dict(v) for k, v in (payload.get("site_profiles") or {}).items()}


def artifact_lineage(path: str | Path) -> list[str]:
    """SHA-256 of this file and of its earlier versions with the same weights (profile edits)."""
    from bonescreen.fsio import file_sha256

    return [*list(read_payload(path).get("artifact_lineage") or []), file_sha256(path)]


def _save_profiles(path: Path, payload: dict[str, Any], profiles: dict[str, Any], out: Path | None) -> Path:
    from bonescreen.fsio import atomic_torch_save, file_sha256

    payload = dict(payload)
    payload["site_profiles"] = profiles
    lineage = list(payload.get("artifact_lineage") or [])
    sha = file_sha256(path)
    if sha not in lineage:
        lineage.append(sha)
    payload["artifact_lineage"] = lineage
    dest = out or path
    atomic_torch_save(payload, dest)
    return dest


def write_profile(path: str | Path, profile: SiteProfile, *, out: str | Path | None = None,
                  replace: bool = False) -> Path:
    """Add ``profile`` to the artifact at ``path`` (or to a copy at ``out``); weights untouched.

    Refused when the profile was fitted for other weights, or when a profile of that name exists
    and ``replace`` is False.
    """
    from bonescreen.artifact import weights_fingerprint

    p = Path(path)
    payload = read_payload(p)
    fp = weights_fingerprint(payload["state_dict"])
    if profile.model_fingerprint != fp:
        raise ProfileError(
            f"site profile {profile.name!r} was fitted for weights {profile.model_fingerprint[:12]}..., "
            f"but {p.name} holds {fp[:12]}...: a profile only fits the model it was made with"
        )
    if payload.get("task") != profile.task:
        raise ProfileError(f"profile {profile.name!r} is for a {profile.task!r} model; {p.name} is {payload.get('task')!r}")
    profiles = dict(payload.get("site_profiles") or {})
    if profile.name in profiles and not replace:
        raise ProfileError(f"{p.name} already has a site profile {profile.name!r}; pass --replace to overwrite it")
    profiles[profile.name] = profile.to_dict()
    return _save_profiles(p, payload, profiles, Path(out) if out else None)


def remove_profile(path: str | Path, name: str, *, out: str | Path | None = None) -> Path:
    p = Path(path)
    payload = read_payload(p)
    profiles = dict(payload.get("site_profiles") or {})
    if name not in profiles:
        raise ProfileError(f"{p.name} has no site profile {name!r}; it has {sorted(profiles) or 'none'}")
    del profiles[name]
    return _save_profiles(p, payload, profiles, Path(out) if out else None)


def export_profile(path: str | Path, name: str, dest: str | Path) -> Path:
    """Write one profile as JSON (to move it with a copy of the same model)."""
    prof = _named(list_profiles(path), name, Path(path).name)
    d = Path(dest)
    d.write_text(json.dumps(prof.to_dict(), indent=2))
    return d


def import_profile(path: str | Path, source: str | Path, *, name: str | None = None, replace: bool = False,
                   out: str | Path | None = None) -> Path:
    """Add a profile exported from the same model; one for other weights is refused."""
    try:
        d = json.loads(Path(source).read_text())
    except (OSError, ValueError) as exc:
        raise ProfileError(f"{source}: not a readable site-profile JSON file ({exc})") from exc
    prof = SiteProfile.from_dict(d)
    if name:
        prof.name = check_name(name)
    return write_profile(path, prof, replace=replace, out=out)


def _named(profiles: Mapping[str, SiteProfile], name: str, where: str) -> SiteProfile:
    if name not in profiles:
        raise ProfileError(f"{where} has no site profile {name!r}; it has {sorted(profiles) or 'none'}")
    return profiles[name]


def get_profile(loaded: Any, name: str) -> SiteProfile:
    """The named profile of a loaded model, refused unless it was fitted for these weights."""
    from bonescreen.artifact import weights_fingerprint

    raw = getattr(loaded.spec, "site_profiles", None) or {}
    where = Path(loaded.path).name if getattr(loaded, "path", None) else "this model"
    if name not in raw:
        raise ProfileError(f"{where} has no site profile {name!r}; it has {sorted(raw) or 'none'}")
    prof = SiteProfile.from_dict(raw[name])
    fp = weights_fingerprint(loaded.model)
    if prof.model_fingerprint != fp:
        raise ProfileError(f"site profile {name!r} in {where} was fitted for other weights "
                           f"({prof.model_fingerprint[:12]}... vs {fp[:12]}...): refusing to use it")
    return prof


def profiled_model(loaded: Any, profile: SiteProfile | None) -> Any:
    """The model a profile screens with: an adapted copy, or ``loaded`` itself."""
    from bonescreen.adapt.tta import adapted_model

    return adapted_model(loaded, profile.adaptation if profile else None)


def site_rows(rows: Sequence[dict[str, Any]], profile: SiteProfile | None) -> list[dict[str, Any]]:
    """Rows from the decide step (made with ``threshold=profile.threshold``) + site probability + band.

    Adds ``site_profile`` (name), ``site_probability`` (the recalibrated probability of the score the
    profile is for) and ``indeterminate``; stage-2 rows inside the band become ``indeterminate``.
    """
    if profile is None:
        return [dict(r, site_profile=None, site_probability=None, indeterminate=False) for r in rows]
    key = TASK_SCORE[profile.task]
    out = []
    for r in rows:
        s = r.get(key)
        ok = s is not None and not (isinstance(s, float) and math.isnan(s))
        out.append(dict(r, site_profile=profile.name,
                        site_probability=float(profile.probability([cast(float, s)])[0]) if ok else None))
    return apply_band(out, profile.abstain if get_task(profile.task).abstain_band else None, score_key=key)
