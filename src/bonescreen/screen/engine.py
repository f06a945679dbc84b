"""The screening engine: one object that every runner calls.

``ScreeningEngine`` loads the model(s), the gate policy, the thresholds and
the OOD parts once; then, per batch::

    prepare (header gate, clinical inputs, decode, pixel gate, preprocess)
      -> infer (backends: probabilities + penultimate features)
      -> decide (scores, category, flag, OOD verdict: bonescreen.screen.decide)

``bonescreen screen`` (:mod:`bonescreen.screen.run`), ``bonescreen explain``,
``bonescreen export`` (calibration images) and the service worker all go
through it, so there is one gate, one decision and one set of reasons.
:meth:`ScreeningEngine.run_config` is what a run records (run.json).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bonescreen import __version__
from bonescreen.errors import BonescreenError
from bonescreen.pseudonym import Pseudonymiser
from bonescreen.screen.decide import DecisionPolicy, ModelOutputs, decide_outputs
from bonescreen.screen.gate import GateDecision, GatePolicy, check_header, check_pixels
from bonescreen.screen.inputs import (
    ClinicalTable,
    InputItem,
    clinical_inputs,
    clinical_raw,
    fill_from_clinical,
    fill_meta,
)
from bonescreen.screen.models import ModelSet, ScreenError, file_sha256
from bonescreen.tasks import get_task

__all__ = ["ALREADY_SCREENED", "PrepContext", "Prepared", "ScreeningEngine", "predict_batch", "prepare"]

#: ``reason`` of an input whose image id (SOP Instance UID) an earlier run already screened
ALREADY_SCREENED = "already_screened"

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    row: dict[str, Any]
    images: dict[int, np.ndarray] | None = None  # size -> uint8 (S, S); None when skipped
    clinical: dict[str, Any] | None = None  # pediatric: age, sex, height_cm, weight_kg


@dataclass(frozen=True)
class PrepContext:
    """How :func:`prepare` gates and preprocesses: the policy, model input sizes, ids."""

    policy: GatePolicy
    sizes: tuple[int, ...]
    site: str | None
    include_patient_id: bool
    pseudonymiser: Pseudonymiser | None
    pediatric: bool = False  # collect height/weight/age/sex for a pediatric model
    clinical: ClinicalTable | None = None
    # image ids (SOP Instance UIDs) that already have a row in the output folder: a resumed run
    # skips them before the pixel decode, also when the file now lies at another path
    finished: frozenset[str] = frozenset()


def _hash_id(path: str) -> str:
    return "sha256:" + file_sha256(path)[:32]


def _patient_key(pid: str | None, include: bool, pseudonymiser: Pseudonymiser | None) -> str | None:
    if not pid:
        return None
    if include:
        return pid
    if pseudonymiser is None:  # callers that do not output patient ids (explain, export)
        return None
    return pseudonymiser(pid)


def prepare(item: InputItem, ctx: PrepContext) -> Prepared:
    """Gate, decode and preprocess one image; never raises for a bad file (returns a skip row)."""
    from bonescreen.io import read_image, read_meta
    from bonescreen.preprocess import preprocess_array

    row: dict[str, Any] = {
        "path": item.path, "image_id": item.extra.get("image_id") or None, "eligible": False,
        "reason": "", "message": "", "site": item.extra.get("site") or ctx.site,
    }
    sidecar = item.extra or None
    clinical: dict[str, Any] | None = None
    try:
        meta = read_meta(item.path, sidecar=sidecar)
        fill_meta(meta, item.extra)
        row["image_id"] = row["image_id"] or meta.sop_instance_uid or _hash_id(item.path)
        csv_row, csv_note = None, ""
        if ctx.pediatric and ctx.clinical is not None:
            csv_row, csv_note = ctx.clinical.lookup(row["image_id"], meta.patient_id, meta.study_date)
            fill_from_clinical(meta, csv_row)
        row.update(
            sex=meta.sex, age=None if meta.age is None else round(float(meta.age), 2), view=meta.view,
            modality=meta.modality, study_date=meta.study_date.isoformat() if meta.study_date else None,
            patient_id=_patient_key(meta.patient_id, ctx.include_patient_id, ctx.pseudonymiser),
            study_instance_uid=meta.study_instance_uid, series_instance_uid=meta.series_instance_uid,
            accession_number=meta.accession_number, sop_class_uid=meta.sop_class_uid,
            manufacturer=meta.manufacturer, manufacturer_model_name=meta.manufacturer_model_name,
            body_part=meta.body_part,
        )
        if row["image_id"] in ctx.finished:
            return _skip(row, GateDecision.refuse(
                ALREADY_SCREENED, "this image (SOP Instance UID) already has a row in this output folder, "
                "from another file; it is not screened twice"))
        decision = check_header(meta, ctx.policy)
        if not decision.eligible:
            return _skip(row, decision)
        if decision.message:  # eligible, with a note (e.g. anatomy fields that disagree)
            row["message"] = decision.message
        if ctx.pediatric:
            clinical, cols, missing, message = clinical_inputs(item, meta, csv_row, csv_note)
            row.update(cols)
            if missing:  # decided before the (costly) pixel decode
                return _skip(row, GateDecision.refuse(missing, message))
            if message:
                _note(row, message)
        image, _ = read_image(item.path, sidecar=sidecar, allowed_modalities=None)
        decision = check_pixels(image, ctx.policy)
        if not decision.eligible:
            return _skip(row, decision)
        images = {s: preprocess_array(image, s) for s in ctx.sizes}
        del image
    except BonescreenError as exc:
        return _skip(row, GateDecision.refuse(exc.reason, str(exc)))
    except MemoryError:
        return _skip(row, GateDecision.refuse("out_of_memory", "out of memory while decoding"))
    except Exception as exc:  # one bad file must never stop the run
        log.debug("unexpected error on %s", item.path, exc_info=True)
        return _skip(row, GateDecision.refuse("error", f"{type(exc).__name__}: {exc}"))
    row["eligible"] = True
    return Prepared(row, images, clinical)


def _skip(row: dict[str, Any], decision: GateDecision) -> Prepared:
    row["eligible"] = False
    row["reason"] = decision.reason
    # io messages start with the path; the row already has it.
    msg = decision.message
    if msg.startswith(row["path"] + ":"):
        msg = msg[len(row["path"]) + 1 :].strip()
    row["message"] = msg
    if row.get("image_id") is None and os.path.isfile(row["path"]):
        try:
            row["image_id"] = _hash_id(row["path"])
        except OSError:
            pass
    return Prepared(row, None)


def _note(row: dict[str, Any], text: str) -> None:
    row["message"] = f"{row['message']}; {text}" if row.get("message") else text


def _pos(p: Any) -> int:
    return int(p.spec.positive_class)


class ScreeningEngine:
    """Model(s) + gate policy + thresholds + OOD parts, loaded once; prepare -> infer -> decide per batch.

    ``ood``: ``refuse`` (default) or ``flag`` need a valid OOD part in every
    model (else :class:`bonescreen.ood.OODError` at construction, with the
    command that fits one); ``off`` is the explicit opt-out.

    ``site_profile``: the name of a site profile stored in the main model's artifact
    (``bonescreen calibrate`` / ``bonescreen adapt``). It must have been fitted for these
    weights (else :class:`bonescreen.adapt.ProfileError`); its label-free adaptation (if any)
    replaces the network the engine runs (a copy; the artifact is not changed), its cut-off is
    the threshold, and the decide step adds its site probability and abstain band.
    """

    def __init__(
        self,
        models: ModelSet,
        *,
        threshold: float | None = None,
        threshold_stage1: float | None = None,
        always_stage2: bool = False,
        gate: Mapping[str, Any] | None = None,
        ood: str = "refuse",
        explain: bool = False,
        site: str | None = None,
        include_patient_id: bool = False,
        pseudonymiser: Pseudonymiser | None = None,
        clinical: ClinicalTable | None = None,
        site_profile: str | None = None,
    ) -> None:
        self.profile = _site_profile(models, site_profile, threshold) if site_profile else None
        if self.profile is not None:
            models = _profiled_models(models, self.profile)
            threshold = self.profile.threshold
        self.models = models
        spec = models.main.spec
        gate_kw = dict(gate or {})
        if gate_kw.get("min_size") is None and "min_size" not in (spec.eligibility or {}):
            # thumbnails are refused, but a low-resolution model (cpu-tiny presets) accepts its own size
            gate_kw["min_size"] = min(256, min(models.sizes))
        self.policy = GatePolicy.from_eligibility(spec.eligibility, **gate_kw)
        self.t2 = float(threshold if threshold is not None else spec.threshold)
        s1 = models.stage1
        self.t1 = float(threshold_stage1 if threshold_stage1 is not None else
                        (s1.spec.threshold if s1 is not None else 0.5))
        self.always_stage2 = always_stage2
        if clinical is not None and not models.pediatric:
            raise ScreenError("--clinical gives height/weight to a pediatric model; this is a "
                              f"{models.mode!r} run, which does not use them")
        self.ctx = PrepContext(self.policy, tuple(models.sizes), site, include_patient_id, pseudonymiser,
                               pediatric=models.pediatric, clinical=clinical)
        self.decision = DecisionPolicy(
            mode=models.mode, threshold=self.t2, threshold_stage1=self.t1, positive=_pos(models.main),
            positive_stage1=_pos(s1) if s1 is not None else 1, class_names=tuple(spec.class_names), ood=ood,
            # the artifact's cut-off (0.5 = predicted Z <= -2.0): the model's own rule, exact at the boundary
            pediatric_own_rule=self.t2 == float(spec.threshold), site_profile=self.profile,
        )
        self.ood = models.ood_parts() if ood != "off" else {}
        self.explainers: dict[str, Any] = {}
        if explain:
            if models.main_torch is None:
                raise ScreenError("Grad-CAM needs the .pt artifact (an ONNX file has no gradients); "
                                  "pass the .pt with --backend onnx instead")
            self.explainers["main"] = models.task.explainer(models.main_torch)
            if models.stage1_torch is not None:
                self.explainers["stage1"] = get_task(models.stage1_torch.spec.task).explainer(models.stage1_torch)

    # ------------------------------------------------------------ facts

    @property
    def model_id(self) -> str:
        return str(self.models.main_id)

    @property
    def common(self) -> dict[str, Any]:
        """Columns every row of this engine carries (refused rows too)."""
        m = self.models
        out = {
            "threshold_stage1": self.t1 if m.stage1 is not None else None,
            "threshold_stage2": None,
            "model": m.main_id, "model_stage1": m.stage1_id or None,
            "backend": m.backend, "bonescreen_version": __version__, "ood_check": self.decision.ood,
            "site_profile": self.profile.name if self.profile is not None else None,
        }
        if m.task.threshold_column:  # the column that records the main model's cut-off
            out[m.task.threshold_column] = self.t2
        return out

    def run_config(self) -> dict[str, Any]:
        """The settings that decide results (recorded in run.json; a resumed run must match)."""
        m = self.models
        return {
            "model": m.main_id,
            "model_stage1": m.stage1_id or None,
            "mode": m.mode,
            "threshold_stage2": self.t2,
            "threshold_stage1": self.t1 if m.stage1 is not None else None,
            "always_stage2": self.always_stage2,
            "gate": self.policy.as_dict(),
            "ood": self.decision.ood,
            "ood_thresholds": {k: v.threshold for k, v in self.ood.items()} or None,
            "ood_flag_ratios": {k: round(v.flag_ratio, 6) for k, v in self.ood.items()} or None,
            "include_patient_id": self.ctx.include_patient_id,
            "clinical": self.ctx.clinical.id if self.ctx.clinical is not None else None,
            "site_profile": self.site_profile_facts(),
        }

    def site_profile_facts(self) -> dict[str, Any] | None:
        """What run.json records of the site profile (None without one): name, when made, cut-off, band."""
        p = self.profile
        if p is None:
            return None
        return {"name": p.name, "kind": p.kind, "created": p.created, "threshold": p.threshold,
                "recalibration": p.recalibration.method,
                "abstain_band": [p.abstain.low, p.abstain.high] if p.abstain is not None else None,
                "adaptation": (p.adaptation or {}).get("method", "none")}

    # ------------------------------------------------------------ pipeline

    def prepare(self, item: InputItem | str | os.PathLike[str]) -> Prepared:
        if not isinstance(item, InputItem):
            item = InputItem(str(item))
        prep = prepare(item, self.ctx)
        if prep.images is None:
            prep.row.update(self.common)
        return prep

    def infer(self, batch: Sequence[Prepared]) -> ModelOutputs:
        """Run the backends on prepared (eligible) images: probabilities and OOD scores."""
        m = self.models
        imgs = {s: np.stack([b.images[s] for b in batch]) for s in m.sizes}  # type: ignore[index]
        main_x = imgs[m.main.size]
        n = len(main_x)
        want = bool(self.ood)
        ood = np.full(n, np.nan)
        band = np.zeros(n, bool)  # in a model's flag band (ood_borderline) or above

        def score(key: str, feats: np.ndarray, rows: np.ndarray) -> None:
            if key in self.ood:
                part = self.ood[key]
                s = part.score(feats)
                ood[rows] = np.fmax(ood[rows], s)
                band[rows] |= s > part.flag_ratio

        if m.task.needs_clinical:
            import pandas as pd

            clin = [b.clinical or {} for b in batch]
            frame = pd.DataFrame([{k: c.get(k) for k in ("age", "sex", "height_cm", "weight_kg")} for c in clin],
                                 columns=["age", "sex", "height_cm", "weight_kg"])
            preds = m.task.predict_table(m.main, main_x, frame)
            if want:
                score("main", m.main.predict_with_features(main_x)[1], np.arange(n))
            return ModelOutputs(pediatric=preds, ood_scores=ood if want else None,
                                ood_band=band if want else None)
        if m.stage1 is None:
            if want:
                probs, feats = m.main.predict_with_features(main_x)
                score("main", feats, np.arange(n))
            else:
                probs = m.main.predict_proba(main_x)
            return ModelOutputs(probs_main=np.asarray(probs), ood_scores=ood if want else None,
                                ood_band=band if want else None)
        x1 = imgs[m.stage1.size]
        if want:
            p1, f1 = m.stage1.predict_with_features(x1)
            score("stage1", f1, np.arange(n))
        else:
            p1 = m.stage1.predict_proba(x1)
        p1 = np.asarray(p1)
        s1 = p1[:, _pos(m.stage1)]
        run = np.ones(n, bool) if self.always_stage2 else s1 < self.t1
        if want and self.decision.ood == "refuse":
            run &= ~(ood > 1.0)  # refused by stage 1's OOD part: stage 2 would be wasted on it
        p2 = np.full((n, int(m.main.spec.num_classes)), np.nan)
        if run.any():
            if want:
                probs, feats = m.main.predict_with_features(main_x[run])
                score("main", feats, np.flatnonzero(run))
            else:
                probs = m.main.predict_proba(main_x[run])
            p2[run] = probs
        if want and self.decision.ood == "refuse":
            # a row refused before stage 2 still needs a value for decide(); apply_ood clears it
            p2[~run & (ood > 1.0)] = 0.0
        return ModelOutputs(probs_main=p2, probs_stage1=p1, ood_scores=ood if want else None,
                                ood_band=band if want else None)

    def decide(self, outputs: ModelOutputs) -> list[dict[str, Any]]:
        return decide_outputs(self.decision, outputs)

    def run_batch(self, batch: Sequence[Prepared]) -> list[dict[str, Any]]:
        """infer + decide; every prepared row is updated in place and returned."""
        if not batch:
            return []
        decided = self.decide(self.infer(batch))
        for b, d in zip(batch, decided):
            b.row.update(d)
            b.row.update(self.common)
        return [b.row for b in batch]

    # ------------------------------------------------------------ Grad-CAM

    def overlays(self, batch: Sequence[Prepared]) -> list[np.ndarray | None]:
        """Grad-CAM overlays (RGB) of the model that decided: stage 1 for osteoporosis, else the main model.

        Rows that were not scored get None; so does a group whose Grad-CAM failed (the score stands).
        """
        from bonescreen.gradcam import overlay

        out: list[np.ndarray | None] = [None] * len(batch)
        if not self.explainers:
            return out
        groups: dict[str, list[int]] = {}
        for i, b in enumerate(batch):
            if not b.row.get("eligible") or b.images is None or b.row.get("category") is None:
                continue
            key = "stage1" if b.row.get("category") == "osteoporosis" and "stage1" in self.explainers else "main"
            groups.setdefault(key, []).append(i)
        for key, idx in groups.items():
            ex = self.explainers[key]
            size = int(ex.loaded.size)
            imgs = np.stack([batch[i].images[size] for i in idx])  # type: ignore[index]
            try:
                if self.models.task.needs_clinical:  # towards lower predicted Z, each clinical row held fixed
                    cams = ex.cams(imgs, clinical_raw([batch[i].clinical or {} for i in idx]))
                elif key == "main" and self.models.task.explain_decided_class:
                    cams = ex.cams(imgs, [ex.loaded.spec.class_names.index(batch[i].row["category"]) for i in idx])
                else:
                    cams = ex.cams(imgs, None)  # the positive class
            except Exception as exc:  # the score stands without its picture
                log.warning("Grad-CAM failed on %d image(s): %s", len(idx), type(exc).__name__)
                for i in idx:
                    _note(batch[i].row, f"Grad-CAM failed ({type(exc).__name__})")
                continue
            for j, i in enumerate(idx):
                out[i] = overlay(imgs[j], cams[j])
        return out


def _site_profile(models: ModelSet, name: str, threshold: float | None) -> Any:
    """The named profile of the main model, checked against these weights and this run."""
    from bonescreen.adapt.profile import ProfileError, get_profile

    if threshold is not None:
        raise ScreenError(f"--threshold and --site-profile {name} both set the cut-off; the profile holds the "
                          "site's cut-off (make another profile for another operating point)")
    if models.main_torch is None:
        raise ProfileError(f"site profile {name!r}: profiles live in the .pt artifact and are checked against "
                           "its weights; pass the .pt (with --backend onnx for ONNX speed), not an ONNX file")
    prof = get_profile(models.main_torch, name)  # refuses a profile fitted for other weights
    if prof.task != models.main.spec.task:
        raise ProfileError(f"site profile {name!r} is for a {prof.task!r} model; {models.main_id} is a "
                           f"{models.main.spec.task!r} model")
    return prof


def _profiled_models(models: ModelSet, profile: Any) -> ModelSet:
    """The model set with the profile's label-free adaptation applied to the main network (a copy).

    The adapted weights exist only as a torch module, so the adapted network runs on the torch
    variant of the run's backend (same device, bf16 / channels_last / compile as asked). An exported
    graph (ONNX, OpenVINO, int8) holds the unadapted weights: asked for explicitly, it is refused;
    chosen by ``--backend auto``, the run falls back to eager torch and says so.
    """
    import dataclasses

    from bonescreen.adapt.profile import ProfileError, profiled_model
    from bonescreen.screen.backends import TORCH_VARIANTS, TorchPredictor

    adapted = profiled_model(models.main_torch, profile)
    if adapted is models.main_torch:
        return models
    label = models.backend
    name = label.split("@")[0].removesuffix("+compile")
    device = label.split("@")[1] if "@" in label else "cpu"
    compiled = "+compile" in label
    method = (profile.adaptation or {}).get("method")
    if name not in TORCH_VARIANTS:
        if models.choice is None:
            raise ProfileError(f"site profile {profile.name!r} adapts the network ({method}), which the exported "
                               f"{name} graph does not carry: screen with --backend torch or torch-bf16")
        log.warning("site profile %r adapts the network (%s); --backend auto chose %s, whose exported graph "
                    "holds the unadapted weights: screening with eager torch instead", profile.name, method, name)
        name, compiled = "torch", False
    bf16, channels_last = TORCH_VARIANTS[name]
    main: Any = adapted
    if name != "torch" or device != "cpu" or compiled:
        main = TorchPredictor(adapted, device=device, bf16=bf16, channels_last=channels_last, compile=compiled)
    backend = name + ("+compile" if compiled else "") + ("" if device == "cpu" else f"@{device}")
    return dataclasses.replace(models, main=main, main_torch=adapted, backend=backend)


def predict_batch(
    models: ModelSet,
    images: Mapping[int, np.ndarray],
    *,
    threshold: float,
    threshold_stage1: float,
    always_stage2: bool = False,
    clinical: Sequence[Mapping[str, Any]] | None = None,
    ood: str = "off",
) -> list[dict[str, Any]]:
    """Decide one batch of preprocessed images (``images``: size -> uint8 N×S×S) without the gate.

    For callers that hold pixels already (tests, notebooks); runners go through
    :meth:`ScreeningEngine.run_batch`.
    """
    engine = ScreeningEngine(models, threshold=threshold, threshold_stage1=threshold_stage1,
                             always_stage2=always_stage2, ood=ood)
    n = len(next(iter(images.values())))
    preps = [Prepared({}, {s: arr[i] for s, arr in images.items()}, dict(clinical[i]) if clinical else None)
             for i in range(n)]
    return engine.decide(engine.infer(preps))
