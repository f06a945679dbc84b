"""bonescreen monitor: join windows, pseudonyms, metrics against direct computation, drift, alerts, store, CLI."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from bonescreen.cli import main
from bonescreen.monitor import (
    MonitorConfig,
    MonitorError,
    join_dxa,
    load_monitor_config,
    read_results_csv,
    read_results_store,
    run_monitor,
    write_monitor,
)
from bonescreen.pseudonym import Pseudonymiser, load_or_create_key

D = dt.date


def _results(rows: list[dict]) -> pd.DataFrame:
    base = {"eligible": True, "sex": "F", "age": 70, "category": "normal", "flag": False, "model": "m"}
    from bonescreen.monitor import _normalise_results

    return _normalise_results(pd.DataFrame([{**base, **r} for r in rows]), "test")


def _dxa(rows: list[tuple[str, str, float]]) -> pd.DataFrame:
    return pd.DataFrame([{"patient_id": p, "exam_date": d, "sex": "F", "age": "70", "t_lumbar_spine": str(t)}
                         for p, d, t in rows])


def test_join_window_first_dxa_after_the_cxr() -> None:
    res = _results([
        {"image_id": "a1", "patient_id": "A", "study_date": "2024-01-10", "score": 0.8},
        {"image_id": "b1", "patient_id": "B", "study_date": "2024-01-10", "score": 0.3},
        {"image_id": "c1", "patient_id": "C", "study_date": "2024-01-10", "score": 0.3},
        {"image_id": "n1", "patient_id": "N", "study_date": "2024-01-10", "score": 0.3, "eligible": False},
    ])
    dxa = _dxa([("A", "2024-01-05", -2.0),  # before the CXR: never
                ("A", "2024-01-10", -1.5),  # same day: day 0
                ("A", "2024-03-01", 0.5),
                ("B", "2024-07-08", -1.2),  # exactly 180 days after
                ("C", "2024-07-09", -1.2),  # 181 days: outside
                ("N", "2024-01-20", -1.2)])  # ineligible screen: never joined
    from bonescreen.cohort import read_dxa

    exams = read_dxa(dxa).exams
    j = join_dxa(res, exams, MonitorConfig()).joined.set_index("image_id")
    assert sorted(j.index) == ["a1", "b1"]
    assert j.loc["a1", "dxa_date"] == D(2024, 1, 10) and j.loc["a1", "days_to_dxa"] == 0
    assert j.loc["b1", "days_to_dxa"] == 180
    j2 = join_dxa(res, exams, MonitorConfig(min_days=1)).joined.set_index("image_id")
    assert j2.loc["a1", "dxa_date"] == D(2024, 3, 1) and j2.loc["a1", "y"] == 0
    j3 = join_dxa(res, exams, MonitorConfig(window_days=181)).joined
    assert sorted(j3["image_id"]) == ["a1", "b1", "c1"]


def test_closest_keeps_the_last_screen_before_each_dxa() -> None:
    res = _results([
        {"image_id": "d1", "patient_id": "D", "study_date": "2024-01-01", "score": 0.4},
        {"image_id": "d2", "patient_id": "D", "study_date": "2024-02-01", "score": 0.6},
        {"image_id": "d3", "patient_id": "D", "study_date": "2024-02-01", "score": 0.7},  # same study, 2nd image
    ])
    from bonescreen.cohort import read_dxa

    exams = read_dxa(_dxa([("D", "2024-03-01", -1.8)])).exams
    closest = join_dxa(res, exams, MonitorConfig()).joined
    assert sorted(closest["image_id"]) == ["d2", "d3"]
    every = join_dxa(res, exams, MonitorConfig(match="all")).joined
    assert sorted(every["image_id"]) == ["d1", "d2", "d3"]


def test_pseudonymised_results_join_with_the_key_only(tmp_path: Path) -> None:
    key_file = tmp_path / "pseudonym.key"
    ps = Pseudonymiser(load_or_create_key(key_file))
    res = _results([
        {"image_id": "e1", "patient_id": ps("MRN-1"), "study_date": "2024-01-10", "score": 0.9},
        {"image_id": "e2", "patient_id": "MRN-2", "study_date": "2024-01-10", "score": 0.2},  # raw joins raw
    ])
    from bonescreen.cohort import read_dxa

    exams = read_dxa(_dxa([("MRN-1", "2024-02-01", -1.6), ("MRN-2", "2024-02-01", 0.0)])).exams
    jr = join_dxa(res, exams, MonitorConfig(), key_file=key_file)
    j = jr.joined.set_index("image_id")
    assert sorted(j.index) == ["e1", "e2"]
    assert j.loc["e1", "patient_key"] == ps("MRN-1")
    assert "MRN-2" not in j.to_csv()  # no raw id in what monitor keeps
    with pytest.raises(MonitorError, match="pseudonym-key-file"):
        join_dxa(res, exams, MonitorConfig())
    other = tmp_path / "other.key"
    assert sorted(join_dxa(res, exams, MonitorConfig(), key_file=(load_or_create_key(other), other)[1])
                  .joined["image_id"]) == ["e2"]  # another key: the pseudonyms do not match


# --- a deployment over six months ---------------------------------------------------------


def _deployment(tmp_path: Path, n: int = 1500, drift_month: int | None = None, scanners: bool = True, seed: int = 0):
    rng = np.random.default_rng(seed)
    key_file = tmp_path / "pseudonym.key"
    ps = Pseudonymiser(load_or_create_key(key_file))
    rows, dxa = [], []
    for i in range(n):
        month = i % 6
        day = D(2024, 1 + month, 1 + (i * 7) % 27)
        # a calibrated score: P(low bone mass) = score; the T-score follows the drawn label
        score = float(np.clip(rng.beta(0.4, 0.4), 0.001, 0.999))
        y = int(rng.random() < score)
        t = (rng.uniform(-2.4, -1.1) if rng.random() < 0.9 else rng.uniform(-3.5, -2.6)) if y else rng.uniform(-0.9, 1.5)
        if drift_month is not None and month == drift_month:
            score = float(np.clip(score * 0.4 + 0.55, 0, 1))
        flag = score >= 0.5
        row = {"path": f"/in/{i}.dcm", "image_id": f"1.2.{i}", "eligible": True, "reason": "", "site": "H",
               "sex": "F" if i % 2 else "M", "age": 50 + i % 40, "view": "PA", "modality": "DX",
               "study_date": day.isoformat(), "patient_id": ps(f"MRN{i:04d}"), "score": round(score, 4),
               "category": ("low_bone_mass" if flag else "normal") if i % 50 != 1 else "indeterminate",
               "flag": bool(flag), "model": "student"}
        if scanners:
            row.update(manufacturer="ACME" if i % 3 else "Other", manufacturer_model_name="X1" if i % 3 else "Y2")
        rows.append(row)
        if i % 5:  # most screened patients get a DXA 10-120 days later
            dxa.append({"patient_id": f"MRN{i:04d}", "exam_date": (day + dt.timedelta(days=10 + i % 110)).isoformat(),
                        "sex": "F" if i % 2 else "M", "age": str(50 + i % 40), "t_lumbar_spine": f"{t:.1f}"})
    rows.append({**rows[0], "image_id": "9.9.9", "eligible": False, "reason": "lateral_view", "score": None,
                 "category": None, "flag": None})
    results = tmp_path / "results.csv"
    pd.DataFrame(rows).to_csv(results, index=False)
    dxa_csv = tmp_path / "dxa.csv"
    pd.DataFrame(dxa).to_csv(dxa_csv, index=False)
    return results, dxa_csv, key_file


def test_metrics_match_direct_computation(tmp_path: Path) -> None:
    results, dxa, key = _deployment(tmp_path)
    res = run_monitor(read_results_csv([results]), dxa, config=MonitorConfig(bootstrap=100), key_file=key, figures=False)
    j = res.joined
    lab = j[j["y"].notna()]
    assert res.overall["auc"]["value"] == pytest.approx(roc_auc_score(lab["y"].astype(int), lab["score"]))
    ref = j[j["y_refer"].notna() & (j["category"] != "indeterminate")]
    pos = ref["y_refer"].astype(int) == 1
    assert res.overall["sensitivity"]["value"] == pytest.approx(ref.loc[pos, "flag"].astype(bool).mean())
    assert res.overall["abstained"] == int((j["category"] == "indeterminate").sum()) > 0
    assert set(res.by["month"]) == {f"2024-0{m}" for m in range(1, 7)}
    assert set(res.by["scanner"]) == {"ACME X1", "Other Y2"}
    assert set(res.by["sex"]) == {"F", "M"}
    m3 = res.rolling["2024-03"]
    assert m3["months"] == ["2024-01", "2024-02", "2024-03"]
    assert m3["n"] == int(j["month"].isin(m3["months"]).sum())
    assert res.counts["eligible_scored"] == 1500 and res.counts["results"] == 1501
    assert res.alerts == [], res.alerts  # a model that works, default floors (whole CI beyond a limit)
    noisy = run_monitor(read_results_csv([results]), dxa, key_file=key, figures=False,
                        config=load_monitor_config(None, bootstrap=100, alerts={"alert_on": "estimate"}))
    assert all(a["scope"] != "overall" for a in noisy.alerts)  # point estimates of small months may cross
    assert all(d["psi"] is not None and d["psi"] < 0.25 for d in res.drift.values())


def test_drift_and_floors_raise_alerts(tmp_path: Path) -> None:
    results, dxa, key = _deployment(tmp_path, drift_month=5)
    res = run_monitor(read_results_csv([results]), dxa, config=MonitorConfig(bootstrap=0), key_file=key, figures=False)
    drift = [a for a in res.alerts if a["metric"] == "psi"]
    assert [a["group"] for a in drift] == ["2024-06"]
    strict = load_monitor_config(None, alerts={"auc_min": 0.99, "min_cases": 20, "alert_on": "estimate"})
    res2 = run_monitor(read_results_csv([results]), dxa, config=strict, key_file=key, figures=False)
    auc_alerts = {(a["scope"], a["group"]) for a in res2.alerts if a["metric"] == "auc"}
    assert ("overall", "all") in auc_alerts and ("month", "2024-01") in auc_alerts
    tiny = load_monitor_config(None, alerts={"auc_min": 0.99, "min_cases": 10_000, "alert_on": "estimate"})
    assert not [a for a in run_monitor(read_results_csv([results]), dxa, config=tiny, key_file=key, figures=False).alerts
                if a["metric"] == "auc"]  # too few cases: shown, never alerted on


def test_reference_from_the_model_card_and_period(tmp_path: Path) -> None:
    results, dxa, key = _deployment(tmp_path)
    table = read_results_csv([results])
    card = {"tune_score_histogram": {"counts": [100, 0, 0, 0, 0, 0, 0, 0, 0, 0]}}
    res = run_monitor(table, dxa, config=MonitorConfig(bootstrap=0), key_file=key, model_card=card, figures=False)
    assert "model card" in res.reference["description"]
    assert all(d["psi"] > 1 for d in res.drift.values())  # nothing like an all-low tuning distribution
    period = load_monitor_config(None, reference="period", reference_period=[D(2024, 2, 1), D(2024, 2, 29)])
    res = run_monitor(table, dxa, config=period, key_file=key, figures=False)
    assert "2024-02-01 to 2024-02-29" in res.reference["description"]
    assert res.drift["2024-02"]["psi"] == pytest.approx(0.0, abs=1e-9)


def test_config_is_typed_and_strict(tmp_path: Path) -> None:
    bad = tmp_path / "m.yaml"
    bad.write_text("window_dayz: 90\n")
    with pytest.raises(MonitorError, match="window_dayz"):
        load_monitor_config(bad)
    bad.write_text("window_days: '90'\n")  # a string where a number belongs
    with pytest.raises(MonitorError, match="window_days"):
        load_monitor_config(bad)
    bad.write_text("alerts:\n  auc_min: 1.5\n")
    with pytest.raises(MonitorError, match="auc_min"):
        load_monitor_config(bad)
    bad.write_text("reference: period\n")
    with pytest.raises(MonitorError, match="reference_period"):
        load_monitor_config(bad)
    ok = tmp_path / "ok.yaml"
    ok.write_text("window_days: 90\nmatch: all\nalerts:\n  auc_min: 0.8\n  psi_max: null\n"
                  "reference_period: [2024-01-01, 2024-03-31]\n")
    cfg = load_monitor_config(ok, window_days=120)
    assert cfg.window_days == 120 and cfg.match == "all" and cfg.alerts.psi_max is None
    assert cfg.reference_period == [D(2024, 1, 1), D(2024, 3, 31)]


def test_service_store_and_csv_agree(tmp_path: Path) -> None:
    from bonescreen.service.store import Store

    results, dxa, key = _deployment(tmp_path, n=120, scanners=False)
    url = f"sqlite:///{tmp_path / 'service.db'}"
    store = Store(url)
    store.create_all()
    for r in pd.read_csv(results).to_dict("records"):
        job = store.enqueue(r["image_id"], None, f"spool/{r['image_id']}.dcm", "dicom").job_id
        store.claim("w", 1, 60)
        rec = {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in r.items()}
        rec["study_date"] = D.fromisoformat(rec["study_date"])
        rec["flag"] = bool(rec["flag"]) if rec["flag"] is not None else False
        store.complete(job, "w", rec)
    store.dispose()
    from_store = read_results_store(url)
    assert len(from_store) == 121 and from_store["manufacturer"].isna().all()
    a = run_monitor(from_store, dxa, config=MonitorConfig(bootstrap=0), key_file=key, figures=False)
    b = run_monitor(read_results_csv([results]), dxa, config=MonitorConfig(bootstrap=0), key_file=key, figures=False)
    assert a.overall["auc"]["value"] == pytest.approx(b.overall["auc"]["value"])
    assert set(a.by["scanner"]) == {"scanner unknown"}
    assert any("scanner unknown" in n for n in a.notes)
    with pytest.raises(MonitorError, match="results"):
        read_results_store(f"sqlite:///{tmp_path / 'empty.db'}")


def test_cli_on_csv_and_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results, dxa, key = _deployment(tmp_path, drift_month=5)
    out = tmp_path / "mon"
    code = main(["monitor", "--results", str(results), "--dxa", str(dxa), "--pseudonym-key-file", str(key),
                 "--out", str(out), "--fail-on-alert"])
    assert code == 3  # the drifted month
    assert "ALERT drift 2024-06: psi" in capsys.readouterr().out
    html = (out / "monitor.html").read_text(encoding="utf-8")
    assert "Score drift" in html and "<script" not in html and html.count("data:image/png;base64,") == 2
    data = json.loads((out / "monitor.json").read_text())
    assert data["format"] == "bonescreen-monitor" and data["counts"]["joined"] > 0
    joined = pd.read_csv(out / "joined.csv")
    assert joined["patient_key"].str.startswith("p:").all() and "MRN" not in (out / "joined.csv").read_text()
    assert main(["monitor", "--store", "postgresql://u:secret@db/x", "--dxa", str(dxa), "--out", str(out)]) == 1
    assert "password" in capsys.readouterr().err


def test_write_monitor_with_nothing_joined(tmp_path: Path) -> None:
    res = _results([{"image_id": "z", "patient_id": "Z", "study_date": "2024-01-01", "score": 0.5}])
    r = run_monitor(res, _dxa([("Y", "2024-01-02", -1.0)]))
    files = write_monitor(r, tmp_path / "o")
    assert r.overall == {"n": 0} and "nothing to score yet" in " ".join(r.notes)
    assert files["html"].read_text().count("No alert") == 1


def test_store_with_scanner_columns_reads_them(tmp_path: Path) -> None:
    """A store whose results table has the scanner columns (the engine's newer schema) groups by scanner."""
    import sqlite3

    db = tmp_path / "new.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE results (id INTEGER PRIMARY KEY, sop_instance_uid TEXT, patient_id TEXT, "
                "study_date DATE, sex TEXT, age REAL, eligible BOOLEAN, score REAL, category TEXT, flag BOOLEAN, "
                "manufacturer TEXT, manufacturer_model_name TEXT, accession_number TEXT)")
    con.executemany("INSERT INTO results (sop_instance_uid, patient_id, study_date, sex, age, eligible, score, category,"
                    " flag, manufacturer, manufacturer_model_name, accession_number) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    [("1.1", "A", "2024-01-02", "F", 70, 1, 0.8, "low_bone_mass", 1, "ACME", "X1", "ACC1"),
                     ("1.2", "B", "2024-01-03", "M", 71, 1, 0.2, "normal", 0, None, None, "ACC2")])
    con.commit()
    con.close()
    table = read_results_store(f"sqlite:///{db}")
    assert table["accession_number"].tolist() == ["ACC1", "ACC2"]
    from bonescreen.monitor import scanner_of

    assert [scanner_of(r) for r in table.itertuples()] == ["ACME X1", "scanner unknown"]
