"""What a training run writes: CSV tables, plain-Python values for artifacts, the card's data summary."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd

from bonescreen.artifact import ModelSpec
from bonescreen.fsio import atomic_open, atomic_path
from bonescreen.jsonable import plain


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """Rows with differing keys as one CSV (the union of the keys, in first-seen order)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with atomic_open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def write_frame(frame: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def spec_with_card(spec: ModelSpec, card: dict[str, Any]) -> ModelSpec:
    return replace(spec, model_card=plain(card))


def data_summary(frame: pd.DataFrame, class_names: list[str]) -> dict[str, Any]:
    """Counts per class (and per site and class) for the model card; no identifiers."""
    y = frame["_y"].astype(int)
    out: dict[str, Any] = {
        "n": len(frame),
        "per_class": {class_names[k]: int((y == k).sum()) for k in range(len(class_names))},
    }
    if "patient_id" in frame.columns:
        out["n_patients"] = int(frame["patient_id"].nunique())
    if "site" in frame.columns:
        out["per_site"] = {
            str(site): {class_names[k]: int((g["_y"] == k).sum()) for k in range(len(class_names))}
            for site, g in frame.groupby(frame["site"].astype(str))
        }
    if "proxy" in frame.columns:
        px = frame["proxy"].fillna(0).astype(int) == 1
        out["n_proxy"] = int(px.sum())
        out["proxy_per_class"] = {
            class_names[k]: int(((y == k) & px).sum()) for k in range(len(class_names))
        }
    return out
