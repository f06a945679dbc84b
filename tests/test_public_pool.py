"""Public pool selection from the NIH / CheXpert tables shipped in torchxrayvision."""

import pandas as pd
import pytest

from bonescreen.public_pool import CHEXPERT_TABLE, NIH_TABLE, _txv_table, select_public_pool


def test_selection_filters_and_maps_files(tmp_path):
    nih = pd.read_csv(_txv_table(NIH_TABLE))
    keep = nih[(nih["Finding Labels"] == "No Finding") & nih["Patient Age"].between(50, 99)].head(3)
    drop = nih[(nih["Finding Labels"] != "No Finding") & nih["Patient Age"].between(50, 99)].head(2)
    young = nih[(nih["Finding Labels"] == "No Finding") & (nih["Patient Age"] < 50)].head(1)
    nested = tmp_path / "nih" / "images_003" / "images"
    nested.mkdir(parents=True)
    for f in pd.concat([keep, drop, young])["Image Index"]:
        (nested / f).write_bytes(b"x")

    chex = pd.read_csv(_txv_table(CHEXPERT_TABLE))
    ok = chex[(chex["No Finding"] == 1) & (chex["Frontal/Lateral"] == "Frontal") & chex["Age"].between(50, 99)].head(2)
    lat = chex[(chex["No Finding"] == 1) & (chex["Frontal/Lateral"] == "Lateral") & chex["Age"].between(50, 99)].head(1)
    root = tmp_path / "chexpert"
    for rel in pd.concat([ok, lat])["Path"]:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")

    sel = select_public_pool(nih_root=tmp_path / "nih", chexpert_root=root)
    t = sel.table
    assert sorted(t[t.dataset == "nih"]["image_id"].str[4:]) == sorted(keep["Image Index"])
    assert len(t[t.dataset == "chexpert"]) == 2
    assert t["path"].map(lambda p: __import__("os").path.isfile(p)).all()
    assert t["age"].between(50, 99).all()
    steps = {(d, s): n for d, s, n in sel.counts}
    assert steps[("nih", "all images")] == len(nih)
    assert steps[("nih", "No Finding")] > steps[("nih", "age 50-99")] > 0


def test_missing_folder_is_a_clear_error(tmp_path):
    from bonescreen.errors import TableError

    with pytest.raises(TableError, match="not found"):
        select_public_pool(nih_root=tmp_path / "nope", datasets=("nih",))
