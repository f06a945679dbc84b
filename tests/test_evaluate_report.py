"""The report end to end: files, numbers in metrics.json, bad input, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from bonescreen.cli import main
from bonescreen.errors import TableError
from bonescreen.evaluate.compare import delong_test
from bonescreen.evaluate.metrics import confusion, wilson_ci
from bonescreen.evaluate.report import EvaluateConfig, read_predictions, run_evaluation
from bonescreen.evaluate.synthetic import make_predictions

CFG = EvaluateConfig(n_boot=100, seed=3)


def _write(df: pd.DataFrame, path: Path) -> Path:
    df.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("evalin")
    df = make_predictions(160, sites=("siteA", "siteB"), models=("teacher", "student"), seed=1,
                          images_per_patient=2)
    files = {m: _write(g, d / f"preds_{m}.csv") for m, g in df.groupby("model")}
    tune = make_predictions(120, sites=("siteA",), models=("teacher", "student"), seed=9)
    man = df[df["model"] == "teacher"].copy()
    man["category"] = np.where(man["label"] == 1, "low_bone_mass", "normal")
    man["severity"] = None
    man.loc[man["site"] == "siteA", "severity"] = np.where(
        man.loc[man["site"] == "siteA", "t_min"] >= -1.0, "normal",
        np.where(man.loc[man["site"] == "siteA", "t_min"] > -1.5, "mild", "moderate"))
    man["manufacturer"] = "ACME"
    flow = [{"step": "DXA exams", "remaining": 500, "excluded": 0, "reasons": {}},
            {"step": "paired", "remaining": 320, "excluded": 180, "reasons": {"no_cxr": 150, "lateral": 30}}]
    (d / "flow.json").write_text(json.dumps(flow))
    (d / "oracle.json").write_text(json.dumps({"siteA": {"auc": 0.95, "n": 160, "prevalence": 0.5}}))
    return {"teacher": files["teacher"], "student": files["student"], "tune": _write(tune, d / "tune.csv"),
            "manifest": _write(man, d / "manifest.csv"), "flow": d / "flow.json", "oracle": d / "oracle.json",
            "dir": d}


@pytest.fixture(scope="module")
def full_report(inputs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple:
    out = tmp_path_factory.mktemp("report")
    rep, files = run_evaluation([inputs["teacher"], inputs["student"]], out, config=CFG, tune=[inputs["tune"]],
                                manifest=inputs["manifest"], flow=inputs["flow"], oracle=inputs["oracle"],
                                progress=False)
    return rep, files, out


def test_report_folder_contents(full_report: tuple) -> None:
    rep, files, out = full_report
    for name in ("report.html", "metrics.json", "table1.csv", "table2.csv", "table3.csv", "delong.csv",
                 "operating_points.csv", "severity.csv", "flow.csv", "metrics_long.csv"):
        assert (out / name).is_file(), name
    for fig in ("roc", "pr", "calibration", "severity", "flow", "decision"):
        assert (out / "figures" / f"{fig}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (out / "report.html").read_text(encoding="utf-8")
    assert html.count("src=\"data:image/png;base64,") == len(rep.figures) == 6  # every figure embedded
    assert "src=\"http" not in html and "<script" not in html  # self-contained
    for caption in ("Table 1", "Table 2 Performance of teacher", "Table 2 Performance of student",
                    "Table 3 Performance of teacher", "Figure 1", "Figure 2", "DeLong", "Oracle AUC"):
        assert caption in html, caption


def test_metrics_json_numbers_match_direct_computation(full_report: tuple, inputs: dict[str, Path]) -> None:
    _, _, out = full_report
    m = json.loads((out / "metrics.json").read_text())
    df = pd.read_csv(inputs["teacher"])
    g = df[df["site"] == "siteB"]
    r = m["results"]["teacher"]["siteB"]
    c = confusion(g["label"], g["score"], 0.5)
    assert r["confusion"] == {"tp": c.tp, "tn": c.tn, "fp": c.fp, "fn": c.fn}
    sens = r["metrics"]["sensitivity"]
    assert (sens["lo"], sens["hi"]) == pytest.approx(wilson_ci(c.tp, c.tp + c.fn))
    assert r["metrics"]["auc"]["value"] == pytest.approx(roc_auc_score(g["label"], g["score"]))
    assert r["bootstrap"]["unit"] == "patient" and r["bootstrap"]["n_boot"] == 100
    assert m["results"]["teacher"]["siteA"]["oracle_auc"] == 0.95
    # tuned on the tuning file, applied unchanged
    thr = m["tuned_thresholds"]["teacher"]["youden"]
    assert r["operating_points"]["youden"]["threshold"] == thr
    # DeLong on the shared images
    s = pd.read_csv(inputs["student"])
    gs = s[s["site"] == "siteB"].set_index("image_id").loc[g["image_id"]]
    ref = delong_test(g["label"].to_numpy(), g["score"].to_numpy(), gs["score"].to_numpy())
    d = [x for x in m["delong"] if x["site"] == "siteB"][0]
    assert (d["model_1"], d["model_2"]) == ("teacher", "student")
    assert d["z"] == pytest.approx(ref.z) and d["p"] == pytest.approx(ref.p)
    # subgroups: sex then age bands, p adjusted
    fams = [x["family"] for x in r["subgroups"]]
    assert fams[:2] == ["sex", "sex"] and "age" in fams
    assert all(x["p_auc_0.5_bonferroni"] >= x["p_auc_0.5"] for x in r["subgroups"] if x["p_auc_0.5"] is not None)
    # severity only where known (derived from t_min in the predictions)
    assert {x["severity"] for x in r["severity"]} <= {"normal", "mild", "moderate", "advanced"}


def test_table1_from_manifest(full_report: tuple, inputs: dict[str, Path]) -> None:
    rep, _, out = full_report
    t1 = rep.table1
    man = pd.read_csv(inputs["manifest"])
    fa = man[(man["site"] == "siteA") & (man["sex"] == "F")]
    col = [c for c in t1.columns if c[0].startswith("siteA") and c[1].startswith("Female")][0]
    assert t1.loc["n", col] == f"{len(fa):,}"
    assert t1.loc["Age, years (mean ± SD)", col] == f"{fa['age'].mean():.1f} ± {fa['age'].std():.1f}"
    k = int((fa["category"] == "normal").sum())
    assert t1.loc["Normal, n (%)", col] == f"{k:,} ({100 * k / len(fa):.1f}%)"
    colb = [c for c in t1.columns if c[0].startswith("siteB")][0]
    assert t1.loc["Mild (−1.5 < T < −1.0)", colb] == "NA"  # siteB: category only
    assert (out / "table1.csv").read_text().count("siteA") >= 2


def test_same_seed_same_report(inputs: dict[str, Path], tmp_path: Path) -> None:
    a, _ = run_evaluation([inputs["teacher"]], tmp_path / "a", config=CFG, progress=False)
    b, _ = run_evaluation([inputs["teacher"]], tmp_path / "b", config=CFG, progress=False)
    ja = json.loads((tmp_path / "a" / "metrics.json").read_text())["results"]
    jb = json.loads((tmp_path / "b" / "metrics.json").read_text())["results"]
    assert ja == jb


# ---------------------------------------------------------------- bad input
def test_bad_rows_are_dropped_with_counted_warnings(tmp_path: Path) -> None:
    df = make_predictions(80, sites=("s",), seed=2)
    df.loc[0, "score"] = 1.7
    df.loc[1, "score"] = -0.2
    df.loc[2, "score"] = np.nan
    df.loc[3, "label"] = np.nan
    df = pd.concat([df, df.iloc[[10]]])  # exact duplicate
    dup = df.iloc[[11]].copy()
    dup["score"] = 0.01  # conflicting duplicate
    df = pd.concat([df, dup])
    p = _write(df, tmp_path / "p.csv")
    preds, warns = read_predictions([p])
    text = " | ".join(warns)
    assert "2 row(s) with score outside [0, 1]" in text and "not a logit" in text
    assert "1 row(s) with a missing or non-numeric score" in text
    assert "1 row(s) without a 0/1 label" in text
    assert "1 exact duplicate" in text and "1 image id(s) appear more than once with different" in text
    assert len(preds) == 80 - 4 - 1
    assert preds["image_id"].is_unique
    assert df.iloc[11]["image_id"] not in text  # ids are never echoed


def test_missing_required_column_is_a_clear_error(tmp_path: Path) -> None:
    p = _write(pd.DataFrame({"image_id": ["a"], "score": [0.3]}), tmp_path / "p.csv")
    with pytest.raises(TableError, match=r"missing required column\(s\) \['label'\]"):
        read_predictions([p])
    q = _write(pd.DataFrame({"image_id": ["a", "b"], "score": [3.0, 5.0], "label": [0, 1]}), tmp_path / "q.csv")
    with pytest.raises(TableError, match="no usable rows"):
        read_predictions([q])
    with pytest.raises(TableError, match="not found"):
        read_predictions([tmp_path / "nope.csv"])


def test_minimal_columns_and_single_class_site_give_partial_report(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    y = (rng.random(100) < 0.5).astype(int)
    df = pd.DataFrame({"image_id": [f"i{k}" for k in range(100)], "score": rng.random(100), "label": y})
    df["site"] = "mixed"
    one = pd.DataFrame({"image_id": [f"j{k}" for k in range(20)], "score": rng.random(20), "label": 1,
                        "site": "positives_only"})
    p = _write(pd.concat([df, one]), tmp_path / "minimal.csv")
    rep, files = run_evaluation([p], tmp_path / "out", config=CFG, progress=False)
    assert any("no sex column" in n for n in rep.notes) and any("no patient_id" in n for n in rep.notes)
    r = rep.sites["minimal"]["positives_only"].main
    assert math.isnan(r.estimates["auc"].value) and r.estimates["sensitivity"].defined
    assert any("positives_only" in w and "one class" in w for w in rep.warnings)
    html = files["report.html"].read_text(encoding="utf-8")
    assert "NA" in html and "roc" in rep.figures


def test_cli_prints_summary_and_fails_cleanly(inputs: dict[str, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["evaluate", str(inputs["teacher"]), "--out", str(tmp_path / "r"), "--bootstrap", "50",
               "--oracle", str(inputs["oracle"]), "--age-bands", "55,65", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "AUC (95% CI)" in out and "siteA" in out and "oracle" in out
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert {x["subgroup"] for x in m["results"]["teacher"]["siteA"]["subgroups"] if x["family"] == "age"} <= \
        {"<55", "55–64", "≥65"}
    bad = _write(pd.DataFrame({"image_id": ["a"], "label": [1]}), tmp_path / "bad.csv")
    assert main(["evaluate", str(bad), "--out", str(tmp_path / "r2")]) == 1
    assert "missing required column" in capsys.readouterr().err
    assert main(["evaluate", str(inputs["teacher"]), "--out", str(tmp_path / "r3"), "--age-bands", "65,50"]) == 1
