"""The unlabelled public pool for pseudo-labelling (NIH ChestX-ray14, CheXpert).

The paper keeps "No Finding" frontal images of people aged 50-99. The metadata
tables ship inside the torchxrayvision wheel, so the selection needs no
download; the images themselves must already be on disk under a user-given
folder.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from bonescreen.errors import TableError
from bonescreen.walk import walk_files

log = logging.getLogger(__name__)

NIH_TABLE = "Data_Entry_2017_v2020.csv.gz"
CHEXPERT_TABLE = "chexpert_train.csv.gz"
POOL_COLUMNS = ["image_id", "path", "dataset", "patient_id", "age", "sex", "view", "exists"]


def _txv_table(name: str) -> Path:
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        raise TableError(
            "the NIH/CheXpert metadata tables come with torchxrayvision: "
            "pip install 'bonescreen[public]' (or pass the table path explicitly)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / name
    if not path.is_file():
        raise TableError(f"{path} not found in the installed torchxrayvision")
    return path


@dataclass
class PoolSelection:
    table: pd.DataFrame
    counts: list[tuple[str, str, int]] = field(default_factory=list)  # (dataset, step, n)

    def counts_text(self) -> str:
        return "\n".join(f"{d:<9} {step:<34} {n:>8}" for d, step, n in self.counts)


def _index_files(root: Path) -> dict[str, str]:
    """filename -> path for every image under root (NIH spreads images over images_0NN/); a name
    found twice keeps its first path in walk order (``bonescreen.walk``: sorted, so the same every run)."""
    out: dict[str, str] = {}
    for f in walk_files(root):
        if f.name.lower().endswith((".png", ".jpg", ".jpeg", ".dcm")):
            out.setdefault(f.name, str(f))
    return out


def select_nih(
    root: Path | None, *, min_age: int = 50, max_age: int = 99, table: Path | None = None
) -> tuple[pd.DataFrame, list[tuple[str, str, int]]]:
    df = pd.read_csv(table or _txv_table(NIH_TABLE))
    counts = [("nih", "all images", len(df))]
    df = df[df["Finding Labels"].str.strip() == "No Finding"]
    counts.append(("nih", "No Finding", len(df)))
    df = df[df["View Position"].isin(["PA", "AP"])]
    counts.append(("nih", "frontal (PA/AP)", len(df)))
    df = df[df["Patient Age"].between(min_age, max_age)]
    counts.append(("nih", f"age {min_age}-{max_age}", len(df)))
    files = _index_files(root) if root else {}
    out = pd.DataFrame(
        {
            "image_id": "nih:" + df["Image Index"],
            "path": [files.get(f, str(root / "images" / f) if root else f) for f in df["Image Index"]],
            "dataset": "nih",
            "patient_id": "nih:" + df["Patient ID"].astype(str),
            "age": df["Patient Age"].astype(float),
            "sex": df["Patient Gender"].str.upper().str[0],
            "view": df["View Position"],
            "exists": [f in files for f in df["Image Index"]],
        }
    )
    return out, counts


def select_chexpert(
    root: Path | None, *, min_age: int = 50, max_age: int = 99, table: Path | None = None
) -> tuple[pd.DataFrame, list[tuple[str, str, int]]]:
    df = pd.read_csv(table or _txv_table(CHEXPERT_TABLE))
    counts = [("chexpert", "all images", len(df))]
    df = df[df["No Finding"] == 1.0]
    counts.append(("chexpert", "No Finding", len(df)))
    df = df[df["Frontal/Lateral"] == "Frontal"]
    counts.append(("chexpert", "frontal", len(df)))
    df = df[df["Age"].between(min_age, max_age)]
    counts.append(("chexpert", f"age {min_age}-{max_age}", len(df)))

    def locate(rel: str) -> tuple[str, bool]:
        if root is None:
            return rel, False
        parts = Path(rel).parts
        # The table's paths start with the archive's folder (CheXpert-v1.0-small/);
        # users often point at that folder or at its parent.
        for cand in (root / rel, root / Path(*parts[1:])):
            if cand.is_file():
                return str(cand), True
        return str(root / Path(*parts[1:])), False

    located = [locate(p) for p in df["Path"]]
    out = pd.DataFrame(
        {
            "image_id": "chexpert:" + df["Path"],
            "path": [p for p, _ in located],
            "dataset": "chexpert",
            "patient_id": "chexpert:" + df["Path"].str.extract(r"(patient\d+)")[0],
            "age": df["Age"].astype(float),
            "sex": df["Sex"].str.upper().str[0],
            "view": df["AP/PA"].fillna(""),
            "exists": [e for _, e in located],
        }
    )
    return out, counts


def select_public_pool(
    *,
    nih_root: str | Path | None = None,
    chexpert_root: str | Path | None = None,
    datasets: tuple[str, ...] = ("nih", "chexpert"),
    min_age: int = 50,
    max_age: int = 99,
    require_files: bool = True,
) -> PoolSelection:
    """Select the paper's public pool; with ``require_files`` keep only images found on disk."""
    frames, counts = [], []
    roots = {"nih": nih_root, "chexpert": chexpert_root}
    selectors = {"nih": select_nih, "chexpert": select_chexpert}
    for name in datasets:
        if name not in selectors:
            raise TableError(f"unknown public dataset {name!r}; expected nih or chexpert")
        root = Path(roots[name]) if roots[name] else None
        if root is not None and not root.is_dir():
            raise TableError(f"{name} image folder not found: {root}")
        df, c = selectors[name](root, min_age=min_age, max_age=max_age)
        if require_files:
            df = df[df["exists"]]
            c.append((name, "image file found under the folder", len(df)))
        frames.append(df)
        counts.extend(c)
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=POOL_COLUMNS)
    return PoolSelection(table[POOL_COLUMNS], counts)
