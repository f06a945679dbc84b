"""Decision curves, the cascade's 3x3 table, abstentions, STARD, calibration rows, PSI: checked by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bonescreen.evaluate.cascade import cascade_categories, cascade_table
from bonescreen.evaluate.decision import age_sex_rule, decision_curve, net_benefit, net_benefit_curve
from bonescreen.evaluate.metrics import (
    bootstrap_weights,
    calibration_slope_intercept,
    population_stability_index,
    score_histogram,
    wilson_ci,
)
from bonescreen.evaluate.report import EvaluateConfig, run_evaluation
from bonescreen.evaluate.stard import STARD_2015, stard_checklist

# Ten patients by hand: labels, scores, sex, age.
Y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
S = np.array([0.9, 0.7, 0.4, 0.15, 0.8, 0.3, 0.2, 0.1, 0.05, 0.02])
SEX = np.array(["F", "F", "M", "M", "F", "F", "M", "M", "F", "M"], dtype=object)
AGE = np.array([70, 60, 72, 55, 66, 50, 71, 60, 80, 40], dtype=float)


def test_net_benefit_by_hand() -> None:
    # pt = 0.25: refer score >= 0.25 -> rows 0,1,2,4,5: TP 3 (0,1,2), FP 2 (4,5); odds 1/3
    assert net_benefit(Y, S >= 0.25, 0.25) == pytest.approx(3 / 10 - 2 / 10 * (0.25 / 0.75))
    # pt = 0.5: refer 0,1,4: TP 2, FP 1; odds 1
    assert net_benefit_curve(Y, S, [0.5])[0] == pytest.approx(2 / 10 - 1 / 10)
    # refer all at pt = 0.2: prevalence 0.4 - 0.6 * 0.25
    dc = decision_curve(Y, S, thresholds=[0.2, 0.5])
    assert dc.strategies["refer all"] == pytest.approx([0.4 - 0.6 * 0.25, 0.4 - 0.6 * 1.0])
    assert dc.strategies["refer none"] == [0.0, 0.0]
    with pytest.raises(ValueError):
        net_benefit(Y, S >= 0.5, 1.0)


def test_age_sex_rule_and_its_net_benefit() -> None:
    rule = age_sex_rule(SEX, AGE)  # women >= 65, men >= 70
    assert rule.tolist() == [True, False, True, False, True, False, True, False, True, False]
    # referred: 0 (y1), 2 (y1), 4 (y0), 6 (y0), 8 (y0): TP 2, FP 3 at any pt
    dc = decision_curve(Y, S, sex=SEX, age=AGE, thresholds=[0.1, 0.3])
    nb = dc.strategies[dc.rule]
    assert nb == pytest.approx([2 / 10 - 3 / 10 * (0.1 / 0.9), 2 / 10 - 3 / 10 * (0.3 / 0.7)])
    assert dc.rule_referred == pytest.approx(0.5)
    assert dc.at(0.3)["model"] == pytest.approx(net_benefit(Y, S >= 0.3, 0.3))
    # a row without age leaves every curve, so all strategies compare the same patients
    age = AGE.copy()
    age[3] = np.nan
    dc2 = decision_curve(Y, S, sex=SEX, age=age, thresholds=[0.1])
    assert dc2.n == 9 and dc2.n_left_out == 1 and dc2.notes
    keep = np.arange(10) != 3
    assert dc2.strategies["refer all"][0] == pytest.approx(3 / 9 - 6 / 9 * (0.1 / 0.9))
    assert dc2.strategies["model"][0] == pytest.approx(net_benefit(Y[keep], S[keep] >= 0.1, 0.1))


def test_cascade_categories_follow_screen_decide() -> None:
    cats = cascade_categories([0.9, 0.2, 0.2, 0.5], [0.1, 0.8, 0.3, 0.1], threshold_stage1=0.5, threshold_stage2=0.5)
    assert cats == ["osteoporosis", "low_bone_mass", "normal", "osteoporosis"]


def test_cascade_table_counts_and_wilson_rates() -> None:
    true = ["normal"] * 5 + ["low_bone_mass"] * 4 + ["osteoporosis"] * 3 + [None]
    pred = (["normal"] * 4 + ["low_bone_mass"] + ["low_bone_mass"] * 3 + ["normal"]
            + ["osteoporosis"] * 2 + ["low_bone_mass"] + ["normal"])
    t = cascade_table(true, pred, n_boot=0)
    assert t["counts"] == [[4, 1, 0], [1, 3, 0], [0, 1, 2]]
    assert t["n"] == 12 and t["n_other"] == 1
    r = t["rates"]["low_bone_mass"]["low_bone_mass"]
    assert r["rate"] == pytest.approx(3 / 4) and (r["lo"], r["hi"]) == pytest.approx(wilson_ci(3, 4))
    assert t["accuracy"]["value"] == pytest.approx(9 / 12)
    # several images per patient: CIs from the patient bootstrap instead
    groups = [0, 0, 1, 1, 2, 3, 3, 4, 4, 5, 5, 6, 7]
    tb = cascade_table(true, pred, groups=groups, n_boot=200, seed=1)
    assert tb["ci_method"] == "patient bootstrap"
    rb = tb["rates"]["normal"]["normal"]
    assert rb["lo"] <= rb["rate"] <= rb["hi"]


def test_bootstrap_weights_without_the_two_class_condition() -> None:
    y = np.zeros(6)
    w = bootstrap_weights(y, [0, 0, 1, 2, 2, 2], n_boot=50, seed=0, require_both_classes=False)
    assert w.weights.shape == (50, 6) and w.unit == "patient" and w.shortfall == 0
    # images of one patient always come together
    assert np.all(w.weights[:, 0] == w.weights[:, 1]) and np.all(w.weights[:, 3] == w.weights[:, 5])
    assert bootstrap_weights(y, None, n_boot=20, seed=0).shortfall == 20  # the classic condition still holds


def test_psi() -> None:
    h = score_histogram([0.05, 0.15, 0.15, 0.95, 1.0])
    assert h["counts"] == [1, 2, 0, 0, 0, 0, 0, 0, 0, 2] and len(h["edges"]) == 11
    assert population_stability_index([10, 10], [10, 10]) == pytest.approx(0.0)
    e, a = np.array([0.5, 0.5]), np.array([0.8, 0.2])
    assert population_stability_index(e, a) == pytest.approx(0.3 * math.log(0.8 / 0.5) - 0.3 * math.log(0.2 / 0.5))
    assert math.isnan(population_stability_index([0, 0], [1, 2]))


def test_stard_has_every_item_once() -> None:
    items = [i for i, _, _ in STARD_2015]
    assert len(items) == 34 and len(set(items)) == 34
    assert items[:3] == ["1", "2", "3"] and items[-1] == "30"
    none = {r["item"]: r for r in stard_checklist(set())}
    assert none["19"]["anchor"] is None  # no flow figure: not claimed
    full = {r["item"]: r for r in stard_checklist({"flow", "table1", "table2", "interval"})}
    assert full["19"]["anchor"] == "flow" and full["22"]["anchor"] == "interval"
    assert "authors" in full["28"]["where"]


@pytest.fixture(scope="module")
def abstain_report(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    d = tmp_path_factory.mktemp("abst")
    rng = np.random.default_rng(0)
    n = 200
    y = rng.integers(0, 2, n)
    s = np.clip(0.5 + 0.3 * (y - 0.5) + rng.normal(0, 0.2, n), 0.01, 0.99)
    df = pd.DataFrame({"image_id": [f"i{k}" for k in range(n)], "score": s, "label": y,
                       "sex": rng.choice(["F", "M"], n), "age": rng.uniform(50, 85, n), "site": "S",
                       "category": np.where(s >= 0.5, "low_bone_mass", "normal")})
    ab = (s > 0.45) & (s < 0.55)
    df.loc[ab, "category"] = "indeterminate"
    df.loc[np.flatnonzero(ab)[:3], "score"] = np.nan  # an abstention may carry no score
    df.to_csv(d / "p.csv", index=False)
    rep, files = run_evaluation([d / "p.csv"], d / "out", config=EvaluateConfig(n_boot=50), progress=False)
    return rep, files, df, ab


def test_abstentions_counted_not_dropped(abstain_report: tuple) -> None:
    rep, files, df, ab = abstain_report
    a = rep.sites["p"]["S"]
    assert a.main.n == len(df) - 3  # scored rows in the main table
    assert a.abstentions["abstained"]["num"] == int(ab.sum()) and a.abstentions["n"] == len(df)
    assert a.abstentions["unscored"] == 3
    rest = df[~ab]
    tp = int(((rest["score"] >= 0.5) & (rest["label"] == 1)).sum())
    assert a.abstentions["sensitivity_without"]["num"] == tp
    assert not any("missing or non-numeric score" in w for w in rep.warnings)
    assert "abstentions.csv" in files and "Abstentions" in files["report.html"].read_text()
    m = json.loads(files["metrics.json"].read_text())
    assert m["results"]["p"]["S"]["abstentions"]["abstained"]["num"] == int(ab.sum())
    stard = {r["item"]: r for r in m["stard_2015"]}
    assert stard["15"]["anchor"] == "abstentions"


def test_report_calibration_and_decision_numbers(abstain_report: tuple) -> None:
    rep, files, df, _ = abstain_report
    g = df[df["score"].notna()]
    fit = calibration_slope_intercept(g["label"], g["score"])
    a = rep.sites["p"]["S"]
    assert a.calibration_fit.slope.value == pytest.approx(fit.slope.value)
    assert a.decision.at(0.2)["p"] == pytest.approx(net_benefit(g["label"], g["score"] >= 0.2, 0.2))
    cal = pd.read_csv(files["calibration.csv"])
    assert cal.loc[0, "Calibration slope (95% CI)"].startswith(f"{fit.slope.value:.2f}")
    assert Path(files["figures/decision.png"]).read_bytes()[:4] == b"\x89PNG"


def test_cli_referral_ages(abstain_report: tuple, tmp_path: Path) -> None:
    from bonescreen.cli import main

    _, files, df, _ = abstain_report
    src = tmp_path / "p.csv"
    df.to_csv(src, index=False)
    assert main(["evaluate", str(src), "--out", str(tmp_path / "a"), "--bootstrap", "0", "--no-progress",
                 "--referral-ages", "60,65"]) == 0
    assert "Women ≥ 60, men ≥ 65" in (tmp_path / "a" / "decision_curve.csv").read_text()
    assert main(["evaluate", str(src), "--out", str(tmp_path / "b"), "--bootstrap", "0", "--no-progress",
                 "--referral-ages", "none"]) == 0
    assert "Women" not in (tmp_path / "b" / "decision_curve.csv").read_text()
    assert main(["evaluate", str(src), "--out", str(tmp_path / "c"), "--referral-ages", "65"]) == 1
