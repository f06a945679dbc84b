"""The phantom generator: plan every site, render every image, write the cohort.

One entry point, :func:`generate_phantom`. Each site is planned by its
population's planner (:data:`PLANNERS`: ``phantom.adult`` or
``phantom.pediatric``; the unlabelled pool by ``adult.plan_pool``), and every
planner returns a :class:`~bonescreen.phantom.common.SitePlan`. One path then
renders the plans' image jobs (``phantom.render``) and writes the truth
tables, the DXA exports, ``oracle.json`` and ``phantom.json``, whatever the
population. The generative models are described in ``phantom.adult`` and
``phantom.pediatric``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from bonescreen.phantom import adult, pediatric
from bonescreen.phantom.common import IMAGE_COLUMNS, TRUTH_COLUMNS, PhantomError, PoolSpec, SitePlan, SiteSpec
from bonescreen.phantom.render import render_job
from bonescreen.phantom.sites import default_pool, default_sites

__all__ = [
    "GENERATOR_VERSION",
    "PLANNERS",
    "SitePlanner",
    "PhantomResult",
    "population",
    "plan_site",
    "generate_phantom",
]

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1

SitePlanner = Callable[[SiteSpec, int, Path, int, int], SitePlan]
"""``planner(spec, n_patients, out_dir, size, seed) -> SitePlan``."""

# one planner per population; a population with its own model also describes it
# in phantom.json (the adult model is always recorded there, at the top of "model")
PLANNERS: dict[str, SitePlanner] = {"adult": adult.plan_site, "pediatric": pediatric.plan_site}
MODEL_DESCRIPTIONS: dict[str, Callable[[], dict[str, Any]]] = {"pediatric": pediatric.model_description}


def population(spec: SiteSpec) -> str:
    """Which planner a site needs: "pediatric" for ``SiteSpec(pediatric=True)``, else "adult"."""
    return "pediatric" if spec.pediatric else "adult"


def plan_site(spec: SiteSpec, n: int, out: Path, size: int, seed: int) -> SitePlan:
    """Plan one site with its population's planner (no files are written)."""
    return PLANNERS[population(spec)](spec, n, out, size, seed)


@dataclass
class PhantomResult:
    """What ``generate_phantom`` wrote, with per-site counts and oracle AUCs."""

    out_dir: Path
    sites: dict[str, dict[str, Any]]
    oracle: dict[str, dict[str, Any]]
    n_images: int
    pool_images: int
    seconds: float
    defects: list[dict[str, str]] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return (self.n_images + self.pool_images) / max(self.seconds, 1e-9)


def _prepare_out(out: Path) -> None:
    """Create ``out``; clear a previous phantom there; refuse any other non-empty folder."""
    if out.exists() and any(out.iterdir()):
        cfg = out / "phantom.json"
        if not cfg.is_file():
            raise PhantomError(f"{out} is not empty and holds no phantom.json; refusing to write into it")
        try:
            old = json.loads(cfg.read_text())
            names = [s["name"] for s in old.get("sites", [])] + ["pool"]
        except (ValueError, KeyError, TypeError) as exc:
            raise PhantomError(f"{cfg} is unreadable ({exc}); remove the folder by hand") from exc
        for name in names:
            sub = out / name
            if sub.is_dir():
                shutil.rmtree(sub)
        for f in ("truth.csv", "truth_images.csv", "truth_pediatric.csv", "oracle.json", "phantom.json"):
            (out / f).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def generate_phantom(
    out_dir: str | Path,
    *,
    sites: Sequence[SiteSpec] | None = None,
    n_per_site: int | dict[str, int] | None = None,
    pool_size: int = 200,
    pool: PoolSpec | None = None,
    size: int = 512,
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
) -> PhantomResult:
    """Write a phantom cohort to ``out_dir`` (layout: docs/ARCHITECTURE.md "Phantom layout").

    ``n_per_site``: patients per site (an int for all, a dict by site name, or
    None for each spec's ``n_patients``). Each patient gets one DXA exam and
    1-3 frontal CXRs (plus sometimes a lateral), so images > patients.
    Same arguments, same bytes: every random draw is keyed by (seed, site,
    patient, image), so ``workers`` does not change the output.
    """
    t0 = time.perf_counter()
    sites = list(sites) if sites is not None else default_sites()
    pool = pool or default_pool()
    counts = _site_counts(sites, n_per_site, pool_size, size)
    out = Path(out_dir)
    _prepare_out(out)
    plans = [plan_site(spec, n, out, size, seed) for spec, n in zip(sites, counts, strict=True)]
    pool_plan = adult.plan_pool(pool, pool_size, out, size, seed) if pool_size > 0 else None
    everything = plans + ([pool_plan] if pool_plan is not None else [])
    _write_site_folders(out, everything)
    image_rows = _run_jobs([job for plan in everything for job in plan.jobs], workers, progress)
    _write_truth(out, everything, image_rows)
    summaries = {plan.name: plan.summary or {} for plan in plans}
    oracle = {plan.name: plan.oracle or {} for plan in plans}
    defects = [d for plan in plans for d in plan.defects]
    (out / "oracle.json").write_text(json.dumps(oracle, indent=2, sort_keys=True) + "\n")
    config = {
        "generator": "bonescreen.phantom",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "size": size,
        "n_per_site": n_per_site,
        "pool_size": pool_size,
        "sites": [dataclasses.asdict(s) for s in sites],
        "pool": dataclasses.asdict(pool),
        "model": _model_description(plans),
        "summary": summaries,
        "defects": defects,
    }
    (out / "phantom.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=list) + "\n")
    n_site_images = sum(len(plan.jobs) for plan in plans)
    return PhantomResult(
        out_dir=out,
        sites=summaries,
        oracle=oracle,
        n_images=n_site_images,
        pool_images=len(image_rows) - n_site_images,
        seconds=time.perf_counter() - t0,
        defects=defects,
    )


def _site_counts(
    sites: Sequence[SiteSpec], n_per_site: int | dict[str, int] | None, pool_size: int, size: int
) -> list[int]:
    """Patients per site, after refusing a request that cannot be generated."""
    if size < 32:
        raise PhantomError(f"size must be at least 32 pixels, got {size}")
    if pool_size < 0:
        raise PhantomError(f"pool_size must be >= 0, got {pool_size}")
    names = [s.name for s in sites]
    if len(set(names)) != len(names):
        raise PhantomError(f"duplicate site names in {names}")
    if isinstance(n_per_site, dict):
        unknown = set(n_per_site) - set(names)
        if unknown:
            raise PhantomError(f"n_per_site names unknown sites: {sorted(unknown)}")
    counts = []
    for spec in sites:
        if n_per_site is None:
            n = spec.n_patients
        else:
            n = n_per_site.get(spec.name, spec.n_patients) if isinstance(n_per_site, dict) else int(n_per_site)
        if n < 1:
            raise PhantomError(f"site {spec.name}: need at least one patient, got {n}")
        counts.append(n)
    return counts


def _model_description(plans: Sequence[SitePlan]) -> dict[str, Any]:
    """phantom.json's "model": the adult model, plus each other population's that was planned."""
    model = adult.model_description()
    for plan in plans:
        if plan.population in MODEL_DESCRIPTIONS and plan.population not in model:
            model[plan.population] = MODEL_DESCRIPTIONS[plan.population]()
    return model


def _write_site_folders(out: Path, plans: Sequence[SitePlan]) -> None:
    """Every plan's image folder and DXA export (before the images are rendered into it)."""
    for plan in plans:
        (out / plan.name / "images").mkdir(parents=True, exist_ok=True)
        if plan.dxa is not None:
            _write_csv(out / plan.name / plan.dxa.name, plan.dxa.columns, plan.dxa.rows)


def _write_truth(out: Path, plans: Sequence[SitePlan], image_rows: list[dict[str, Any]]) -> None:
    """truth.csv, truth_images.csv and each population's own truth table."""
    extra: dict[str, tuple[Sequence[str], list[dict[str, Any]]]] = {}
    for plan in plans:
        if plan.extra_truth is not None:
            extra.setdefault(plan.extra_truth.name, (plan.extra_truth.columns, []))[1].extend(plan.extra_truth.rows)
    _write_csv(out / "truth.csv", TRUTH_COLUMNS, [row for plan in plans for row in plan.truth])
    _write_csv(out / "truth_images.csv", IMAGE_COLUMNS, image_rows)
    for name, (columns, rows) in extra.items():
        if rows:
            _write_csv(out / name, columns, rows)


def _write_csv(path: Path, columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow(r)


def _run_jobs(jobs: list[dict[str, Any]], workers: int, progress: bool) -> list[dict[str, Any]]:
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), desc="phantom", unit="img", disable=not progress)
    rows: list[dict[str, Any]] = []
    try:
        if workers <= 1:
            for job in jobs:
                rows.append(render_job(job))
                bar.update(1)
        else:
            # spawn: safe with threads/BLAS in the parent; results come back in job order
            with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as ex:
                for row in ex.map(render_job, jobs, chunksize=8):
                    rows.append(row)
                    bar.update(1)
    finally:
        bar.close()
    return rows
