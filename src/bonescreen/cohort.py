"""Cohort builder: DXA export + radiograph folders -> manifest, exclusions, flow counts.

Every DXA row ends either as one manifest row or as one exclusion with its
reason, so the paper's Figure 1 flow can be drawn from ``flow.json`` and every
number in it traced back to rows of ``exclusions.csv``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bonescreen.errors import ImageReadError, TableError
from bonescreen.jsonable import plain
from bonescreen.labels import add_labels, normalize_category, normalize_sex, pediatric_low_bmd
from bonescreen.schema import (
    BIRTH_DATE_COLUMN,
    BMD_COLUMNS,
    DXA_OPTIONAL,
    HEIGHT_CM_RANGE,
    POPULATIONS,
    WEIGHT_KG_RANGE,
    EXCLUSION_COLUMNS,
    MANIFEST_COLUMNS,
    T_SCORE_COLUMNS,
    Z_SCORE_COLUMNS,
)

log = logging.getLogger(__name__)

# Plausible DXA value ranges; outside them a value is a data-entry error, not a patient.
T_SCORE_RANGE = (-7.0, 7.0)
Z_SCORE_RANGE = (-7.0, 7.0)
PEDIATRIC_MAX_AGE = 17.99  # "younger than 18 years"
AGE_RANGE = (0.0, 120.0)
NUMERIC_OPTIONAL = [*Z_SCORE_COLUMNS, *BMD_COLUMNS, "height_cm", "weight_kg"]


# --------------------------------------------------------------------------- dates
_ISO = re.compile(r"^\d{4}-\d{1,2}-\d{1,2}$")
_DICOM = re.compile(r"^\d{8}$")
_SLASH = re.compile(r"^(\d{1,2})[/.](\d{1,2})[/.](\d{4})$")


class DateError(ValueError):
    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def parse_date(value: object, fmt: str | None = None) -> date:
    """Parse a DXA or DICOM date.

    ISO (2021-03-15) and DICOM (20210315) are unambiguous. For 03/04/2021 the
    day/month order is taken from ``fmt`` when given; otherwise only a date
    that reads one way (e.g. 03/15/2021) is accepted and an ambiguous one is
    refused, because a swapped day and month can silently pair the wrong CXR.
    """
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    text = "" if value is None else str(value).strip()
    if not text or text.lower() in {"nan", "nat", "none"}:
        raise DateError("missing date", "missing_date")
    try:
        if fmt:
            return datetime.strptime(text, fmt).date()
        if _ISO.match(text):
            return datetime.strptime(text, "%Y-%m-%d").date()
        if _DICOM.match(text):
            return datetime.strptime(text, "%Y%m%d").date()
    except ValueError as exc:
        raise DateError(f"unparseable date {text!r}", "bad_date") from exc
    m = _SLASH.match(text)
    if m:
        a, b, y = (int(g) for g in m.groups())
        readings = set()
        for month, day in ((a, b), (b, a)):
            try:
                readings.add(date(y, month, day))
            except ValueError:
                pass
        if len(readings) == 1:
            return readings.pop()
        if len(readings) > 1:
            raise DateError(
                f"ambiguous date {text!r} (day/month order unknown; pass --date-format)",
                "ambiguous_date",
            )
    raise DateError(f"unparseable date {text!r}", "bad_date")


# --------------------------------------------------------------------------- DXA table
PRESET_DIR = Path(__file__).resolve().parent / "dxa_presets"


class ColumnMap(dict):  # type: ignore[type-arg]
    """{their_name: our_name}. A preset's map is lenient: it lists several possible names per
    column (workstation software versions differ) and only those present in the export apply.

    A user's explicit ``THEIR=OURS`` entries stay strict: a name not in the table is an error.
    """

    def __init__(self, mapping: dict[str, str] | None = None, *, preset: str | None = None,
                 aliases: dict[str, list[str]] | None = None) -> None:
        super().__init__(mapping or {})
        self.preset = preset
        self.aliases = aliases or {}  # ours -> [their candidates], tried in order

    def __bool__(self) -> bool:  # a preset with no explicit entries still maps columns
        return bool(len(self) or self.aliases)

    def resolve(self, columns: Sequence[str]) -> tuple[dict[str, str], list[str]]:
        """The rename for a table with these ``columns``, and notes (which candidate won, duplicates)."""
        notes: list[str] = []
        missing = [c for c in self if c not in columns]
        if missing:
            raise TableError(f"column mapping names columns not in the table: {missing}")
        rename = dict(self)
        taken = set(rename.values())
        norm = {_norm_header(c): c for c in reversed(list(columns))}  # first spelling wins
        for ours, cands in self.aliases.items():
            if ours in taken:
                continue  # an explicit THEIR=OURS entry overrides the preset
            present = [norm[_norm_header(c)] for c in cands if _norm_header(c) in norm]
            present = [c for c in dict.fromkeys(present) if c not in rename]
            if not present:
                continue
            rename[present[0]] = ours
            if len(present) > 1:
                notes.append(f"{ours}: {present[0]!r} used, {present[1:]} ignored (preset {self.preset})")
        return rename, notes


def _norm_header(name: str) -> str:
    return " ".join(str(name).split()).lower()


def dxa_presets() -> list[str]:
    """Names of the shipped DXA export presets (``bonescreen/dxa_presets/*.yaml``)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str) -> dict[str, Any]:
    """A preset's YAML: ``name``, ``description``, ``columns`` {ours: [their names]}, ``confirmed``."""
    import yaml

    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise TableError(f"unknown DXA export preset {name!r}; choose from {dxa_presets()}")
    data: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    cols = data.get("columns") or {}
    known = {"patient_id", "exam_date", "sex", "age", BIRTH_DATE_COLUMN, *T_SCORE_COLUMNS, *DXA_OPTIONAL}
    bad = sorted(set(cols) - known)
    if bad:  # a preset may only name columns of the documented schema
        raise TableError(f"preset {name}: unknown target column(s) {bad}")
    data["columns"] = {k: [str(v) for v in (vs if isinstance(vs, list) else [vs])] for k, vs in cols.items()}
    return data


def load_column_map(spec: str | Path | dict[str, str] | None) -> ColumnMap:
    """Column mapping from a dict, a YAML/JSON file, 'a=b,c=d', a preset name, or 'PRESET,a=b'.

    Presets: ``generic`` (the documented schema), ``lunar`` (GE Lunar enCORE), ``hologic``
    (Hologic APEX), ``osteosys`` (OsteoSys); see the README for their header lines.
    """
    if spec is None:
        return ColumnMap()
    if isinstance(spec, ColumnMap):
        return spec
    if isinstance(spec, dict):
        return ColumnMap(dict(spec))
    path = Path(spec)
    if path.is_file():
        import yaml

        data = yaml.safe_load(path.read_text())
        if not isinstance(data, dict):
            raise TableError(f"{path}: a column mapping must be a mapping of their_name: our_name")
        return ColumnMap({str(k): str(v) for k, v in data.items()})
    pairs = [p.strip() for p in str(spec).split(",") if p.strip()]
    out: dict[str, str] = {}
    preset: str | None = None
    for i, p in enumerate(pairs):
        if "=" not in p:
            if i == 0 and p.lower() in dxa_presets():
                preset = p.lower()
                continue
            raise TableError(f"bad column mapping {p!r}; expected THEIR=OURS or a preset first "
                             f"({', '.join(dxa_presets())})")
        k, v = p.split("=", 1)
        out[k.strip()] = v.strip()
    if preset is None:
        return ColumnMap(out)
    return ColumnMap(out, preset=preset, aliases=load_preset(preset)["columns"])


def _to_float(text: object) -> float:
    """Float or NaN for empty; ValueError for text that is not a number."""
    if text is None:
        return math.nan
    s = str(text).strip()
    if not s or s.lower() in {"nan", "na", "n/a", "none", ""}:
        return math.nan
    return float(s.replace(",", ".")) if s.count(",") == 1 and "." not in s else float(s)


@dataclass
class DxaTable:
    """Valid DXA exams (one row each) and the rows refused, with reasons."""

    exams: pd.DataFrame
    rejected: pd.DataFrame
    n_rows: int


class _Refused(Exception):
    """One DXA row refused: ``reason`` (a vocabulary word) and what was wrong with it."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason, self.detail = reason, detail


@dataclass
class _DxaRules:
    """What one export's rows are checked against (its columns, the population, the date format)."""

    columns: list[str]
    t_cols: list[str]
    z_only: list[str]
    pediatric: bool
    date_format: str | None
    site: str
    blanked: Counter[str] = field(default_factory=Counter)


def _read_dxa_text(source: str | Path | pd.DataFrame) -> pd.DataFrame:
    if isinstance(source, pd.DataFrame):
        return source.astype(str).where(source.notna(), "")
    path = Path(source)
    if not path.is_file():
        raise TableError(f"DXA export not found: {path}")
    try:
        # Everything as text: patient IDs keep leading zeros and a T-score
        # typed as text is detected instead of silently becoming NaN.
        return pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise TableError(f"{path}: not a readable CSV table ({exc})") from exc


def _dxa_columns(raw: pd.DataFrame, site: str, column_map: dict[str, str] | None, pediatric: bool,
                 ) -> tuple[pd.DataFrame, list[str], list[str]]:
    """The export under our column names; its T-score columns and (Z-score-only exports) its Z-score columns."""
    raw = raw.rename(columns={c: str(c).strip() for c in raw.columns})
    if column_map:
        rename, notes = load_column_map(column_map).resolve(list(raw.columns))
        for n in notes:
            log.warning("%s: %s", site or "DXA export", n)
        clash = [c for c in set(rename.values()) if c in raw.columns and c not in rename]
        raw = raw.drop(columns=clash).rename(columns=rename)
    for col in ("patient_id", "exam_date"):
        if col not in raw.columns:
            raise TableError(
                f"DXA export lacks required column {col!r} (has {list(raw.columns)}); "
                "map your export's names with --columns THEIR=OURS,... or a preset (--columns lunar)"
            )
    if pediatric:
        ignored = [c for c in (*T_SCORE_COLUMNS, "category") if c in raw.columns]
        if ignored:
            log.info("%s: pediatric cohort: %s ignored (children are labelled by Z-score)", site or "DXA", ignored)
            raw = raw.drop(columns=ignored)
    t_cols = [c for c in T_SCORE_COLUMNS if c in raw.columns]
    # Pediatric exports carry Z-scores only (T-scores are meaningless in children).
    z_only = [c for c in Z_SCORE_COLUMNS if c in raw.columns] if not t_cols and "category" not in raw.columns else []
    if not t_cols and "category" not in raw.columns and not z_only:
        raise TableError(
            f"DXA export has neither T-score columns {T_SCORE_COLUMNS}, a 'category' column "
            f"nor Z-score columns {Z_SCORE_COLUMNS}"
            + (" (a pediatric cohort needs Z-scores)" if pediatric else "")
        )
    return raw, t_cols, z_only


def _dxa_scores(row: pd.Series, cols: list[str], kind: str, rng: tuple[float, float]) -> dict[str, float]:
    vals: dict[str, float] = {}
    for col in cols:
        try:
            v = _to_float(row[col])
        except ValueError:
            raise _Refused(f"non_numeric_{kind}_score", f"{col}={row[col]!r}") from None
        if not math.isnan(v) and not (rng[0] <= v <= rng[1]):
            raise _Refused(f"implausible_{kind}_score", f"{col}={v}")
        vals[col] = v
    return vals


def _dxa_age(row: pd.Series, rules: _DxaRules, exam: date) -> float:
    """The age at the exam: the age column, else from the birth date; NaN when neither is given."""
    try:
        age = _to_float(row["age"]) if "age" in rules.columns else math.nan
    except ValueError:
        raise _Refused("implausible_age", f"age={row['age']!r}") from None
    if math.isnan(age) and BIRTH_DATE_COLUMN in rules.columns and str(row[BIRTH_DATE_COLUMN]).strip():
        try:
            birth = parse_date(row[BIRTH_DATE_COLUMN], rules.date_format)
        except DateError as exc:
            raise _Refused("bad_birth_date", str(exc)) from None
        age = (exam - birth).days / 365.25
    if not math.isnan(age) and not (AGE_RANGE[0] <= age <= AGE_RANGE[1]):
        raise _Refused("implausible_age", f"age={age:.2f}")
    return age


def _dxa_optional_numbers(row: pd.Series, rules: _DxaRules) -> dict[str, float]:
    """Z-scores, BMDs, height, weight; an implausible height/weight is left blank (adult) or refused (pediatric)."""
    out: dict[str, float] = {}
    for col in NUMERIC_OPTIONAL:
        if col not in rules.columns:
            continue
        try:
            v = _to_float(row[col])
        except ValueError:
            v = math.inf  # not a number: implausible below
        rng = {"height_cm": HEIGHT_CM_RANGE, "weight_kg": WEIGHT_KG_RANGE}.get(col)
        if rng is not None and not math.isnan(v) and not (rng[0] <= v <= rng[1]):
            if rules.pediatric:  # a model input: refuse the row rather than guess
                raise _Refused(f"implausible_{col.split('_')[0]}", f"{col}={row[col]!r}")
            rules.blanked[col] += 1
            v = math.nan
        out[col] = math.nan if math.isinf(v) else v
    return out


def _dxa_record(row: pd.Series, rules: _DxaRules) -> dict[str, Any]:
    """One valid exam from one row, or :class:`_Refused` with the first thing wrong with it."""
    pid = str(row.get("patient_id", "")).strip()
    if not pid:
        raise _Refused("missing_patient_id")
    try:
        exam = parse_date(row["exam_date"], rules.date_format)
    except DateError as exc:
        raise _Refused(exc.reason, str(exc)) from None
    rec: dict[str, Any] = {"patient_id": pid, "site": rules.site, "dxa_date": exam}
    rec.update(_dxa_scores(row, rules.t_cols, "t", T_SCORE_RANGE))
    if rules.z_only:
        _dxa_scores(row, rules.z_only, "z", Z_SCORE_RANGE)  # checked here; the values come with the numbers
    rec["age"] = _dxa_age(row, rules, exam)
    rec["sex"] = normalize_sex(row["sex"]) if "sex" in rules.columns else None
    try:
        rec["category"] = normalize_category(row["category"]) if "category" in rules.columns else None
    except ValueError as exc:
        raise _Refused("unknown_category", str(exc)) from None
    rec.update(_dxa_optional_numbers(row, rules))
    if all(math.isnan(rec.get(c, math.nan)) for c in rules.t_cols) and rec["category"] is None:
        if not rules.z_only:
            raise _Refused("no_label", "no T-score and no category")
        if all(math.isnan(rec.get(c, math.nan)) for c in rules.z_only):
            raise _Refused("no_label", "no Z-score")
    if "device" in rules.columns:
        rec["device"] = str(row["device"])
    rec["_key"] = tuple(str(row[c]).strip() for c in rules.columns if c != "_row")
    rec["_row"] = row["_row"]
    return rec


def _dxa_refusal(row: pd.Series, site: str, reason: str, detail: str = "") -> dict[str, Any]:
    return {
        "patient_id": str(row.get("patient_id", "")).strip(),
        "site": site,
        "path": "",
        "dxa_date": str(row.get("exam_date", "")),
        "study_date": "",
        "step": "dxa_validation",
        "reason": reason,
        "detail": f"line {row['_row']}: {detail}" if detail else f"line {row['_row']}",
    }


def _dxa_drop_duplicates(exams: pd.DataFrame, site: str, rejected: list[dict[str, Any]]) -> pd.DataFrame:
    """Exact repeats of one row are export artefacts: keep one. The same patient and date with
    different values cannot be resolved safely: refuse all of them."""
    dup = exams.duplicated("_key", keep="first")
    for _, r in exams[dup].iterrows():
        rejected.append(_dxa_refusal(r.rename({"dxa_date": "exam_date"}), site, "duplicate_row",
                                     "exact repeat of an earlier row"))
    exams = exams[~dup]
    conflict = exams.duplicated(["patient_id", "dxa_date"], keep=False)
    for _, r in exams[conflict].iterrows():
        rejected.append(_dxa_refusal(r.rename({"dxa_date": "exam_date"}), site, "conflicting_duplicate",
                                     "same patient and exam date with different values"))
    return exams[~conflict].drop(columns=["_key", "_row"])


def read_dxa(
    source: str | Path | pd.DataFrame,
    *,
    site: str = "",
    column_map: dict[str, str] | None = None,
    date_format: str | None = None,
    population: str = "adult",
) -> DxaTable:
    """Read and validate a DXA export; each bad row is refused with a specific reason.

    ``population="pediatric"``: the labels are Z-scores (lumbar spine, total body less
    head, ...); T-score and category columns are ignored (meaningless in children), and
    height and weight, which the pediatric model takes as inputs, must be plausible.
    """
    if population not in POPULATIONS:
        raise TableError(f"unknown population {population!r}; expected one of {POPULATIONS}")
    pediatric = population == "pediatric"
    raw, t_cols, z_only = _dxa_columns(_read_dxa_text(source), site, column_map, pediatric)
    n_rows = len(raw)
    raw = raw.reset_index(drop=True)
    raw["_row"] = np.arange(n_rows) + 2  # CSV line number (header is line 1)
    rules = _DxaRules(list(raw.columns), t_cols, z_only, pediatric, date_format, site)
    records: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    for _, row in raw.iterrows():
        try:
            records.append(_dxa_record(row, rules))
        except _Refused as refused:
            rejected.append(_dxa_refusal(row, site, refused.reason, refused.detail))
    for col, k in rules.blanked.items():
        log.warning("%s: %d implausible %s value(s) left blank (outside %s)", site or "DXA export", k, col,
                    HEIGHT_CM_RANGE if col == "height_cm" else WEIGHT_KG_RANGE)
    exams = pd.DataFrame(records)
    if len(exams):
        exams = add_labels(_dxa_drop_duplicates(exams, site, rejected), t_cols)
    rej = pd.DataFrame(rejected, columns=[*EXCLUSION_COLUMNS, "detail"])
    return DxaTable(exams.reset_index(drop=True), rej, n_rows)


# --------------------------------------------------------------------------- images
def _meta_row(path: str) -> dict[str, Any]:
    from bonescreen.io import read_dicom_meta

    try:
        m = read_dicom_meta(path)
    except ImageReadError as exc:
        return {"path": path, "error": exc.reason, "message": str(exc)}
    except Exception as exc:  # a batch never dies on one file
        return {"path": path, "error": "unreadable", "message": f"{type(exc).__name__}: {exc}"}
    return {
        "path": path,
        "error": None,
        "image_id": m.sop_instance_uid or _path_id(path),
        "patient_id": (m.patient_id or "").strip(),
        "study_date": m.study_date,
        "image_age": m.age,
        "image_sex": m.sex,
        "view": m.view or "",
        "lateral": bool(m.is_lateral),
        "modality": m.modality or "",
        "manufacturer": m.manufacturer or "",
    }


def _path_id(path: str) -> str:
    return hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()[:20]


def scan_images(
    paths: Sequence[str | Path], *, workers: int = 1, progress: bool = True
) -> pd.DataFrame:
    """Read the header of every image under ``paths``; unreadable files get an ``error``."""
    from tqdm.auto import tqdm

    from bonescreen.io import iter_image_files

    files = [str(p) for p in iter_image_files([Path(p) for p in paths])]
    bar = tqdm(total=len(files), desc="reading headers", unit="img", disable=not progress)
    rows = []
    if workers > 1 and len(files) > 64:
        with ProcessPoolExecutor(workers) as pool:
            for r in pool.map(_meta_row, files, chunksize=32):
                rows.append(r)
                bar.update()
    else:
        for f in files:
            rows.append(_meta_row(f))
            bar.update()
    bar.close()
    return pd.DataFrame(
        rows,
        columns=[
            "path",
            "error",
            "message",
            "image_id",
            "patient_id",
            "study_date",
            "image_age",
            "image_sex",
            "view",
            "lateral",
            "modality",
            "manufacturer",
        ],
    )


# --------------------------------------------------------------------------- pairing
@dataclass
class CohortConfig:
    """Pairing and exclusion rules (defaults follow the paper's external sets)."""

    window_days: int = 90
    min_age: float | None = 50.0
    max_age: float | None = None
    views: tuple[str, ...] = ("PA", "AP")
    allow_unknown_view: bool = True
    modalities: tuple[str, ...] = ("CR", "DX")
    exclude_osteoporosis: bool = False
    max_age_mismatch: float = 2.0
    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)
    seed: int = 0
    date_format: str | None = None
    population: str = "adult"  # or "pediatric": Z-score labels, T-scores ignored (see read_dxa)

    @classmethod
    def pediatric(cls, **kw: Any) -> CohortConfig:
        """The pediatric study's rules: ages 0-17 (< 18 years), CXR and DXA within 3 months (90 days)."""
        return cls(**{"window_days": 90, "min_age": 0.0, "max_age": PEDIATRIC_MAX_AGE, "population": "pediatric",
                      **kw})


@dataclass
class SiteInput:
    """One site: its image folders, DXA export and role."""

    name: str
    images: list[Path]
    dxa: Path | pd.DataFrame
    role: str = "development"  # or "external": every pair goes to the test split
    column_map: dict[str, str] = field(default_factory=dict)
    window_days: int | None = None  # per-site pairing window (e.g. 180 days); None: the config's


@dataclass
class CohortResult:
    manifest: pd.DataFrame
    exclusions: pd.DataFrame
    flow: list[dict[str, Any]]
    image_errors: pd.DataFrame
    config: CohortConfig
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {
            "manifest": out / "manifest.csv",
            "exclusions": out / "exclusions.csv",
            "flow": out / "flow.json",
            "image_errors": out / "image_errors.csv",
        }
        self.manifest.to_csv(paths["manifest"], index=False)
        self.exclusions.to_csv(paths["exclusions"], index=False)
        self.image_errors.to_csv(paths["image_errors"], index=False)
        paths["flow"].write_text(
            json.dumps(
                {"steps": self.flow, "sites": self.sites, "config": plain(asdict(self.config), strict=True)},
                indent=2,
            )
        )
        return paths


class _Flow:
    """Counts for Figure 1: what remained after each step and why the rest left."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []

    def add(self, step: str, remaining: int, reasons: Counter[str] | None = None) -> None:
        reasons = reasons or Counter()
        self.steps.append(
            {
                "step": step,
                "remaining": int(remaining),
                "excluded": int(sum(reasons.values())),
                "reasons": dict(sorted(reasons.items())),
            }
        )


def _pair_site(
    dxa: pd.DataFrame, images: pd.DataFrame, cfg: CohortConfig, window_days: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Choose, for each DXA exam, the closest eligible frontal CXR of the same patient."""
    pairs: list[dict[str, Any]] = []
    excl: list[dict[str, Any]] = []
    by_patient = {pid: g for pid, g in images.groupby("patient_id")}
    views = {v.upper() for v in cfg.views}
    mods = {m.upper() for m in cfg.modalities}
    for exam in dxa.to_dict("records"):
        pid = exam["patient_id"]
        base = {
            "patient_id": pid,
            "site": exam["site"],
            "dxa_date": exam["dxa_date"].isoformat(),
            "step": "pairing",
        }
        cands = by_patient.get(pid)
        if cands is None or cands.empty:
            excl.append({**base, "path": "", "study_date": "", "reason": "no_cxr_for_patient"})
            continue
        cands = cands[cands["study_date"].notna()]
        days = np.array([abs((d - exam["dxa_date"]).days) for d in cands["study_date"]], dtype=float)
        within = cands[days <= window_days].assign(days_apart=days[days <= window_days])
        if within.empty:
            excl.append({**base, "path": "", "study_date": "", "reason": "no_cxr_within_window"})
            continue
        view_ok = within["view"].str.upper().isin(views) | (
            cfg.allow_unknown_view & (within["view"] == "") & ~within["lateral"].astype(bool)
        )
        mod_ok = within["modality"].str.upper().isin(mods)
        ok = within[view_ok & mod_ok]
        if ok.empty:
            reason = "wrong_modality" if not mod_ok.any() else "only_non_frontal_views"
            excl.append({**base, "path": "", "study_date": "", "reason": reason})
            continue
        best = ok.sort_values(["days_apart", "study_date", "path"]).iloc[0]
        pair = {**exam, **best.to_dict()}
        pair["study_date"] = best["study_date"]
        dx_sex = exam.get("sex") if isinstance(exam.get("sex"), str) else None
        im_sex = best["image_sex"] if isinstance(best["image_sex"], str) else None
        if dx_sex and im_sex and dx_sex != im_sex:
            excl.append(
                {**base, "path": best["path"], "study_date": best["study_date"].isoformat(),
                 "reason": "sex_mismatch"}
            )
            continue
        age_dxa, age_img = exam.get("age"), best["image_age"]
        if _num(age_dxa) and _num(age_img):
            expected = age_img + (exam["dxa_date"] - best["study_date"]).days / 365.25
            if abs(expected - age_dxa) > cfg.max_age_mismatch:
                excl.append(
                    {**base, "path": best["path"], "study_date": best["study_date"].isoformat(),
                     "reason": "age_mismatch"}
                )
                continue
        pair["age"] = age_dxa if _num(age_dxa) else age_img
        pair["sex"] = dx_sex or im_sex
        pairs.append(pair)
    return pairs, excl


def _num(x: object) -> bool:
    try:
        return x is not None and not math.isnan(float(x))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def assign_splits(
    df: pd.DataFrame, fractions: tuple[float, float, float], seed: int
) -> pd.Series:
    """Patient-level stratified split: no patient in two splits.

    Hand-written rather than sklearn's StratifiedGroupKFold because the paper's
    70/10/20 fractions are not multiples of one fold and exact, seeded counts
    per stratum are easy to check.
    """
    if not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ValueError(f"split fractions must sum to 1, got {fractions}")
    rng = np.random.default_rng(seed)
    # A patient's stratum: their most severe category (3-class label); children (Z-scores, no
    # WHO category): whether any of their exams has low BMD (Z <= -2.0).
    stratum = df["label_3class"].astype("Float64") if "label_3class" in df.columns else pd.Series(np.nan, index=df.index)
    if stratum.isna().all():
        z = next((c for c in Z_SCORE_COLUMNS if c in df.columns and df[c].notna().any()), None)
        if z is not None:
            stratum = pd.Series([float(bool(pediatric_low_bmd(v))) for v in df[z]], index=df.index)
    strat = stratum.groupby(df["patient_id"]).max().fillna(-1)
    split_of: dict[str, str] = {}
    for _, pids in sorted(strat.groupby(strat), key=lambda kv: kv[0]):
        ids = np.array(sorted(pids.index))
        rng.shuffle(ids)
        n = len(ids)
        n_train = int(round(n * fractions[0]))
        n_tune = int(round(n * (fractions[0] + fractions[1]))) - n_train
        for i, pid in enumerate(ids):
            split_of[pid] = "train" if i < n_train else "tune" if i < n_train + n_tune else "test"
    return df["patient_id"].map(split_of)


@dataclass
class _Paired:
    """The per-site pass of :func:`build_cohort`: every pair, every refusal, every unreadable image."""

    pairs: list[dict[str, Any]] = field(default_factory=list)
    exclusions: list[pd.DataFrame] = field(default_factory=list)
    image_errors: list[pd.DataFrame] = field(default_factory=list)
    n_rows: int = 0
    dxa_reasons: Counter[str] = field(default_factory=Counter)
    pair_reasons: Counter[str] = field(default_factory=Counter)


def _pair_sites(sites: Sequence[SiteInput], cfg: CohortConfig,
                scan: Callable[[Sequence[Path]], pd.DataFrame]) -> _Paired:
    out = _Paired()
    for site in sites:
        table = read_dxa(site.dxa, site=site.name, column_map=site.column_map, date_format=cfg.date_format,
                         population=cfg.population)
        out.n_rows += table.n_rows
        out.exclusions.append(table.rejected)
        out.dxa_reasons.update(table.rejected["reason"])
        imgs = scan(site.images)
        errors = imgs[imgs["error"].notna()]
        out.image_errors.append(errors.assign(site=site.name)[["site", "path", "error", "message"]])
        good = imgs[imgs["error"].isna()].copy()
        if len(errors):
            log.warning("%s: %d image(s) could not be read (see image_errors.csv)", site.name, len(errors))
        window = site.window_days if site.window_days is not None else cfg.window_days
        pairs, excl = _pair_site(table.exams, good, cfg, window)
        for p in pairs:
            p["role"] = site.role
        exc = pd.DataFrame(excl, columns=EXCLUSION_COLUMNS)
        out.exclusions.append(exc)
        out.pair_reasons.update(exc["reason"])
        out.pairs.extend(pairs)
    return out


class _Exclude:
    """The exclusion steps after pairing: each drops rows, records why, and adds a step to the flow."""

    def __init__(self, df: pd.DataFrame, flow: _Flow) -> None:
        self.df, self.flow = df, flow
        self.rows: list[dict[str, Any]] = []

    def step(self, mask: pd.Series, step: str, flow_step: str, reason_of: Callable[[pd.Series], str]) -> None:
        n0 = len(self.rows)
        for _, r in self.df[mask].iterrows():
            self.rows.append({
                "patient_id": r["patient_id"],
                "site": r["site"],
                "path": r["path"],
                "dxa_date": r["dxa_date"].isoformat(),
                "study_date": r["study_date"].isoformat(),
                "step": step,
                "reason": reason_of(r),
            })
        self.df = self.df[~mask]
        self.flow.add(flow_step, len(self.df), Counter(e["reason"] for e in self.rows[n0:]))


def _exclude(df: pd.DataFrame, cfg: CohortConfig, quality_flags: pd.DataFrame | None,
             flow: _Flow) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Age range, one pair per image, quality flags, osteoporosis: (what remains, what left and why)."""
    ex = _Exclude(df, flow)
    if len(df):
        age = df["age"].astype(float)
        lo = cfg.min_age if cfg.min_age is not None else -math.inf
        hi = cfg.max_age if cfg.max_age is not None else math.inf
        ex.step(age.isna() | (age < lo) | (age > hi), "age", "age_in_range",
                lambda r: "age_unknown" if not _num(r["age"]) else "age_out_of_range")
        # One image, one pair: if two DXA exams chose the same CXR keep the closer.
        ex.df = ex.df.sort_values(["days_apart", "dxa_date"]).reset_index(drop=True)
        ex.step(ex.df.duplicated("path", keep="first"), "dedupe", "one_pair_per_image",
                lambda r: "image_already_paired")
        if quality_flags is not None and len(quality_flags):
            flags = _quality_lookup(quality_flags)
            ex.df = ex.df.assign(_flag=[flags.get(str(r.image_id)) or flags.get(str(r.path))
                                        for r in ex.df.itertuples()])
            ex.step(ex.df["_flag"].notna(), "quality", "quality_ok", lambda r: f"quality:{r['_flag']}")
            ex.df = ex.df.drop(columns="_flag")
        if cfg.exclude_osteoporosis:
            ex.step(ex.df["category"] == "osteoporosis", "osteoporosis", "osteoporosis_excluded",
                    lambda r: "osteoporosis")
    return ex.df, pd.DataFrame(ex.rows, columns=EXCLUSION_COLUMNS)


def build_cohort(
    sites: Sequence[SiteInput],
    config: CohortConfig | None = None,
    *,
    workers: int = 1,
    progress: bool = True,
    image_table: Callable[[Sequence[Path]], pd.DataFrame] | None = None,
    quality_flags: pd.DataFrame | None = None,
) -> CohortResult:
    """Pair CXRs with DXA exams per site and apply the configured exclusions."""
    cfg = config or CohortConfig()
    if not sites:
        raise TableError("no sites given")
    names = [s.name for s in sites]
    if len(set(names)) != len(names):
        raise TableError(f"site names must be unique, got {names}")
    scan = image_table or (lambda p: scan_images(p, workers=workers, progress=progress))
    paired = _pair_sites(sites, cfg, scan)
    flow = _Flow()
    flow.add("dxa_exams_in_export", paired.n_rows)
    flow.add("valid_dxa_exams", paired.n_rows - sum(paired.dxa_reasons.values()), paired.dxa_reasons)
    flow.add("paired_with_frontal_cxr", len(paired.pairs), paired.pair_reasons)
    df, excluded = _exclude(pd.DataFrame(paired.pairs), cfg, quality_flags, flow)
    exclusions = [*paired.exclusions, excluded]

    manifest = _finalize_manifest(df, cfg)
    per_site = {
        site.name: {
            "role": site.role,
            "pairs": int((manifest["site"] == site.name).sum()) if len(manifest) else 0,
        }
        for site in sites
    }
    excl_df = pd.concat([e for e in exclusions if len(e)], ignore_index=True) if any(
        len(e) for e in exclusions
    ) else pd.DataFrame(columns=[*EXCLUSION_COLUMNS, "detail"])
    excl_df = excl_df.astype({"study_date": str, "dxa_date": str}).replace({"NaT": "", "None": ""})
    return CohortResult(
        manifest=manifest,
        exclusions=excl_df,
        flow=flow.steps,
        image_errors=pd.concat(paired.image_errors, ignore_index=True) if paired.image_errors else pd.DataFrame(),
        config=cfg,
        sites=per_site,
    )


def _quality_lookup(table: pd.DataFrame) -> dict[str, str]:
    """{image_id or path: flag} from a table with (image_id | path) and flag columns."""
    key = "image_id" if "image_id" in table.columns else "path" if "path" in table.columns else None
    if key is None or "flag" not in table.columns:
        raise TableError("a quality-flag table needs an 'image_id' or 'path' column and a 'flag' column")
    out = {}
    for k, f in zip(table[key].astype(str), table["flag"]):
        if isinstance(f, str) and f.strip():
            out[k if key == "image_id" else str(Path(k).resolve())] = f.strip()
            out[k] = f.strip()
    return out


def _finalize_manifest(df: pd.DataFrame, cfg: CohortConfig) -> pd.DataFrame:
    optional = [c for c in DXA_OPTIONAL if c in df.columns and c != "category"]
    if df.empty:
        return pd.DataFrame(columns=MANIFEST_COLUMNS)
    df = df.copy()
    df["split"] = "test"
    dev = df["role"] == "development"
    if dev.any():
        df.loc[dev, "split"] = assign_splits(df[dev], cfg.split_fractions, cfg.seed)
    df["study_date"] = [d.isoformat() for d in df["study_date"]]
    df["dxa_date"] = [d.isoformat() for d in df["dxa_date"]]
    df["days_apart"] = df["days_apart"].astype(int)
    for c in ("label", "label_stage1", "label_3class"):
        df[c] = df[c].astype("Int64")  # written as 0/1/2 or empty, never 1.0
    for c in T_SCORE_COLUMNS:
        if c not in df.columns:
            df[c] = np.nan
    cols = MANIFEST_COLUMNS + [c for c in optional if c not in MANIFEST_COLUMNS]
    df = df.sort_values(["site", "patient_id", "study_date", "path"]).reset_index(drop=True)
    return df[cols]


# --------------------------------------------------------------------------- phantom helper
def sites_from_phantom(root: str | Path) -> list[SiteInput]:
    """SiteInputs for a phantom folder: its development site first, the others external."""
    root = Path(root)
    meta_path = root / "phantom.json"
    dev_name = None
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        dev_name = meta.get("development_site")
        if dev_name is None:
            for s in meta.get("sites", []):
                if isinstance(s, dict) and s.get("role") == "development":
                    dev_name = s.get("name")
                    break
    sites = []
    for d in sorted(p for p in root.iterdir() if (p / "dxa.csv").is_file()):
        sites.append(SiteInput(d.name, [d / "images"], d / "dxa.csv", role="external"))
    if not sites:
        raise TableError(f"{root}: no site folders with a dxa.csv (is this a phantom folder?)")
    dev = next((s for s in sites if s.name == dev_name), sites[0])
    dev.role = "development"
    sites.remove(dev)
    return [dev, *sites]


def flow_text(flow: Iterable[dict[str, Any]], sites: dict[str, dict[str, Any]] | None = None) -> str:
    """Plain-text rendering of the Figure 1 flow for the terminal."""
    lines = []
    for s in flow:
        lines.append(f"{s['step']:<28} {s['remaining']:>7}")
        for reason, n in s.get("reasons", {}).items():
            lines.append(f"    - {reason:<26} {n:>5}")
    for name, info in (sites or {}).items():
        lines.append(f"  {name:<12} ({info['role']}): {info['pairs']}")
    return "\n".join(lines)
