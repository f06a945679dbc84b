"""The end-to-end demo: the whole OsPenScreen recipe on a phantom cohort, deployed as two stages.

phantom -> cohort -> preprocess -> teacher -> pseudo-labels on the unlabelled
pool -> distilled student (stage 2: normal vs low bone mass) -> stage-1 model
(osteoporosis vs not) -> predictions on every site -> validation report, with
each site's AUC printed beside the phantom's oracle AUC, and the cascade's three
categories (stage 1, then the student on the rest) per site as a 3×3 table ->
trust at each external site (:mod:`bonescreen.adapt.story`): the student before,
after label-free adaptation, and after ``calibrate`` with half the site's pairs.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from bonescreen.evaluate.cascade import cascade_categories

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    """Sizes chosen so the whole recipe fits ~10 minutes on 2 idle CPU cores (README, "The demo")."""

    preset: str = "cpu-tiny"
    n_dev: int = 700
    n_external: int = 180
    pool: int = 600
    render_size: int = 256
    seed: int = 0
    workers: int = 2
    bootstrap: int = 1000
    overrides: dict[str, Any] = field(default_factory=dict)
    # Stage 1 sees ~8 % osteoporosis in the phantom's training split: class-weighted
    # cross-entropy keeps it from calling everyone "not osteoporosis" at the 0.5 cut-off.
    stage1_overrides: dict[str, Any] = field(default_factory=lambda: {"balance": "loss"})
    # continue each training from its checkpoint in the output folder (an interrupted run; a finished
    # training is not repeated: resuming is bit-identical on CPU, README "Resume")
    resume: bool = False


@dataclass
class DemoResult:
    out_dir: Path
    summary: pd.DataFrame
    report_dir: Path
    timings: dict[str, float]
    cascade: dict[str, dict[str, Any]] = field(default_factory=dict)
    # per external site: before / label-free / calibrate (bonescreen.adapt.story.site_story)
    adaptation: list[dict[str, Any]] = field(default_factory=list)


class _Laps:
    """Wall time of each stage, in seconds (``timings.json``)."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._t0 = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round(now - self._t0, 1)
        self._t0 = now
        log.info("demo: %s done in %.1f s", name, self.timings[name])


@dataclass
class _Models:
    """The demo's trained models and the pseudo-labelled pool's counts."""

    teacher: Any
    student: Any
    stage1: Any
    proxy_counts: Any


def _make_phantom(phantom_dir: Path, cfg: DemoConfig, progress: bool) -> None:
    from bonescreen.phantom import default_sites, generate_phantom

    if (phantom_dir / "oracle.json").is_file():
        return
    generate_phantom(
        phantom_dir,
        n_per_site={s.name: cfg.n_dev if s.role == "development" else cfg.n_external for s in default_sites()},
        pool_size=cfg.pool,
        size=cfg.render_size,
        seed=cfg.seed,
        workers=cfg.workers,
        progress=progress,
    )


def _train_models(out: Path, manifest_path: Path, pool_files: list[str], cache: Path, cfg: DemoConfig,
                  progress: bool, lap: _Laps) -> _Models:
    """Teacher, pseudo-labels on the unlabelled pool, distilled student (stage 2), stage-1 model."""
    from bonescreen.config import load_config
    from bonescreen.training.distill import distill
    from bonescreen.pseudolabel import pseudolabel
    from bonescreen.training.jobs import train_model

    def resume(stage: str) -> bool:
        return cfg.resume and (out / stage / "checkpoint.pt").is_file()

    tcfg = load_config(cfg.preset, overrides={"seed": cfg.seed, "progress": progress, **cfg.overrides})
    teacher = train_model(manifest_path, out / "teacher", tcfg, cache_root=cache, model_name="teacher",
                          resume=resume("teacher"))
    lap("teacher")
    proxy = pseudolabel(teacher.artifact_path, pool_files, out / "pseudolabels" / "proxy.csv",
                        thresholds=(tcfg.threshold_normal, tcfg.threshold_low), cache_root=cache, progress=progress)
    lap("pseudolabel")
    student = distill(manifest_path, out / "student", tcfg, teacher=teacher.artifact_path, cache_root=cache,
                      proxy=proxy.out_csv, model_name="student", resume=resume("student"))
    lap("student")
    s1cfg = load_config(cfg.preset, overrides={"seed": cfg.seed, "progress": progress, **cfg.overrides,
                                                 **cfg.stage1_overrides})
    stage1 = train_model(manifest_path, out / "stage1", s1cfg, cache_root=cache, task="stage1",
                         model_name="stage1", resume=resume("stage1"))
    lap("stage1")
    return _Models(teacher, student, stage1, proxy.counts)


def _predict(manifest: pd.DataFrame, models: _Models, cache: Path, pred_dir: Path,
             progress: bool) -> tuple[list[Path], pd.DataFrame]:
    """Internal tune/test splits and every external site, scored by the same artifacts: the stage-2
    prediction files and the cascade's rows. Every row (osteoporosis included) gets a stage-2 score:
    the cascade runs stage 2 on whatever stage 1 passes."""
    from bonescreen.training.inference import predict_manifest

    pred_dir.mkdir(exist_ok=True)
    pred_files = []
    test = manifest[manifest["split"].isin(["tune", "test"])]
    scored: dict[str, pd.DataFrame] = {}
    for name, res in (("teacher", models.teacher), ("student", models.student), ("stage1", models.stage1)):
        preds = predict_manifest(res.artifact_path, test, cache, model_name=name, labelled_only=False,
                                 progress=progress)
        scored[name] = preds
        f = pred_dir / f"{name}.csv"
        preds[preds["label"].notna()].to_csv(f, index=False)  # stage 2: osteoporosis rows have no label
        if name != "stage1":
            pred_files.append(f)
    cascade_rows = _cascade_rows(test, scored["stage1"], scored["student"], models.stage1.artifact_path,
                                 models.student.artifact_path)
    cascade_rows.to_csv(pred_dir / "cascade.csv", index=False)
    return pred_files, cascade_rows


def _reports(out: Path, pred_dir: Path, pred_files: list[Path], cascade: dict[str, Any], paths: dict[str, Path],
             cfg: DemoConfig, progress: bool) -> tuple[Any, Any]:
    """The stage-1 report and the stage-2 report (with the cascade), each against the phantom's oracle."""
    from bonescreen.evaluate.report import EvaluateConfig, run_evaluation

    report_dir = out / "report"
    oracle_path = out / "phantom" / "oracle.json"
    stage1_rep, _ = run_evaluation(
        [pred_dir / "stage1.csv"],
        report_dir / "stage1",
        config=EvaluateConfig(n_boot=cfg.bootstrap, seed=cfg.seed, title="bonescreen stage 1 (osteoporosis vs not)",
                              positive_label="osteoporosis", referral_rule=None),
        oracle=_stage1_oracle(oracle_path, out),
        progress=progress,
    )
    rep, _ = run_evaluation(
        pred_files,
        report_dir,
        config=EvaluateConfig(n_boot=cfg.bootstrap, seed=cfg.seed),
        manifest=paths["manifest"],
        flow=paths["flow"],
        oracle=oracle_path,
        cascade=cascade,
        progress=progress,
    )
    return rep, stage1_rep


def _summary(reports: tuple[Any, ...]) -> pd.DataFrame:
    """One row per model and site: AUC with its CI, the oracle AUC and the share of the headroom."""
    rows = []
    for report in reports:
        for model, sites_ in report.sites.items():
            for site, a in sites_.items():
                auc = a.main.estimates["auc"]
                o = report.oracle.get(site)
                rows.append(
                    {
                        "model": model,
                        "site": site,
                        "n": a.main.n,
                        "auc": round(auc.value, 3) if auc.defined else None,
                        "auc_ci": auc.fmt(),
                        "oracle_auc": round(o, 3) if o is not None else None,
                        # share of the achievable gain above chance: (AUC - 0.5) / (oracle - 0.5)
                        "headroom": round((auc.value - 0.5) / (o - 0.5), 3) if auc.defined and o and o > 0.5 else None,
                    }
                )
    return pd.DataFrame(rows)


def run_demo(out_dir: str | Path, config: DemoConfig | None = None, *, progress: bool = True) -> DemoResult:
    from bonescreen.cohort import CohortConfig, build_cohort, sites_from_phantom
    from bonescreen.config import load_config
    from bonescreen.evaluate.cascade import cascade_by_site
    from bonescreen.preprocess import preprocess_files

    cfg = config or DemoConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lap = _Laps()
    phantom_dir = out / "phantom"
    _make_phantom(phantom_dir, cfg, progress)
    lap("phantom")

    cohort = build_cohort(sites_from_phantom(phantom_dir), CohortConfig(seed=cfg.seed), workers=cfg.workers,
                          progress=progress)
    paths = cohort.write(out / "cohort")
    manifest = cohort.manifest
    lap("cohort")

    image_size = load_config(cfg.preset, overrides={"seed": cfg.seed, "progress": progress,
                                                    **cfg.overrides}).image_size
    cache = out / "cache"
    pool_files = sorted(str(p) for p in (phantom_dir / "pool" / "images").glob("*.dcm"))
    preprocess_files([*manifest["path"].tolist(), *pool_files], cache, size=image_size, workers=cfg.workers,
                     progress=progress)
    lap("preprocess")

    models = _train_models(out, paths["manifest"], pool_files, cache, cfg, progress, lap)
    pred_dir = out / "predictions"
    pred_files, cascade_rows = _predict(manifest, models, cache, pred_dir, progress)
    lap("predict")

    cascade = cascade_by_site(cascade_rows[cascade_rows["split"] == "test"], n_boot=cfg.bootstrap, seed=cfg.seed)
    rep, stage1_rep = _reports(out, pred_dir, pred_files, cascade, paths, cfg, progress)
    lap("report")
    stories = site_stories(models.student.artifact_path, manifest, cache, phantom_dir / "oracle.json",
                           seed=cfg.seed, n_boot=cfg.bootstrap)
    lap("adapt")

    summary = _summary((rep, stage1_rep))
    summary.to_csv(out / "summary.csv", index=False)
    (out / "cascade.json").write_text(json.dumps(cascade, indent=2))
    (out / "site_adaptation.json").write_text(json.dumps(stories, indent=2))
    (out / "timings.json").write_text(json.dumps(lap.timings, indent=2))
    (out / "pseudolabel_counts.json").write_text(json.dumps(models.proxy_counts, indent=2, default=str))
    return DemoResult(out, summary, out / "report", lap.timings, cascade, stories)


#: each half of a site (calibrate's local pairs; the held-out measurement) needs calibrate's minimum
MIN_STORY_HALF = 20


def site_stories(model: Path, manifest: pd.DataFrame, cache: Path, oracle_path: Path, *, seed: int = 0,
                 n_boot: int = 1000) -> list[dict[str, Any]]:
    """Before / label-free / calibrate on every site that is not the development site, as a hospital
    would run ``calibrate`` and ``adapt``.

    The home profile is fitted on the development site's held-out images (its tune and test splits:
    never trained on; the demo's tune split alone is only ~7 % of the site, too few for a calibration
    at small sizes). Without a home profile (too few images, one class) there is no story: logged.
    """
    from bonescreen.adapt.calibrate import manifest_images, select_manifest
    from bonescreen.adapt.recalibrate import CalibrationError
    from bonescreen.adapt.story import SiteData, home_profile, site_story
    from bonescreen.artifact import load_artifact

    loaded = load_artifact(model)
    task = str(loaded.spec.task)
    oracle = json.loads(oracle_path.read_text())

    def data(name: str, splits: tuple[str, ...] | None = None) -> SiteData:
        frame = select_manifest(manifest, task, site=name)
        if splits is not None:
            frame = frame[frame["split"].astype(str).isin(splits)].reset_index(drop=True)
        o = oracle.get(name)
        return SiteData(name, manifest_images(frame, cache, loaded.size), frame["label"].astype(int).to_numpy(),
                        frame["patient_id"].astype(str).to_numpy(),
                        float(o["auc"]) if isinstance(o, dict) and "auc" in o else None)

    dev = str(manifest.loc[manifest["split"] == "train", "site"].mode().iloc[0])  # the training site
    try:
        home = home_profile(loaded, data(dev, ("tune", "test")), seed=seed)
    except CalibrationError as exc:
        log.warning("demo: no home profile on %s's held-out images (%s): no adaptation story", dev, exc)
        return []
    stories = []
    for name in sorted(set(manifest["site"].astype(str)) - {dev}):
        site = data(name)
        if len(site.labels) < 2 * MIN_STORY_HALF:
            log.warning("demo: %s has %d labelled images; the adaptation story needs %d", name, len(site.labels),
                        2 * MIN_STORY_HALF)
            continue
        try:
            stories.append(site_story(loaded, site, home, seed=seed, n_boot=n_boot))
        except CalibrationError as exc:  # e.g. one class only: say so, keep the other sites
            log.warning("demo: no adaptation story for %s: %s", name, exc)
    return stories


def _cascade_rows(rows: pd.DataFrame, stage1: pd.DataFrame, stage2: pd.DataFrame, stage1_model: Path,
                  stage2_model: Path) -> pd.DataFrame:
    """One row per image scored by both models: true category and the cascade's category."""
    from bonescreen.artifact import load_artifact

    t1 = float(load_artifact(stage1_model).spec.threshold)
    t2 = float(load_artifact(stage2_model).spec.threshold)
    both = stage1[["image_id", "score"]].rename(columns={"score": "score_stage1"}).merge(
        stage2[["image_id", "score"]].rename(columns={"score": "score_stage2"}), on="image_id")
    truth = rows[["image_id", "patient_id", "site", "split", "category"]].astype({"image_id": str})
    out = truth.merge(both, on="image_id")
    out["predicted_category"] = cascade_categories(out["score_stage1"], out["score_stage2"],
                                                   threshold_stage1=t1, threshold_stage2=t2)
    out["threshold_stage1"], out["threshold_stage2"] = t1, t2
    return out


def _stage1_oracle(oracle_path: Path, out: Path) -> Path:
    """The phantom's stage-1 oracle AUCs (``auc_stage1``) in the ``{site: {"auc"}}`` form evaluate reads."""
    data = json.loads(oracle_path.read_text())
    s1 = {k: {"auc": v["auc_stage1"]} for k, v in data.items() if isinstance(v, dict) and "auc_stage1" in v}
    path = out / "oracle_stage1.json"
    path.write_text(json.dumps(s1, indent=1))
    return path
