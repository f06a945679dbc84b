"""STARD 2015 (Bossuyt et al., BMJ 2015;351:h5527): where each item is answered in the report.

Every one of the 34 checklist lines gets a pointer to the report section that
answers it (an anchor of ``report.html``), or says plainly that the report
cannot answer it and the authors must (study registration, funding, how
patients were recruited...). A pointer is given only when the section is
actually in this report: no flow figure without ``--flow``, no Table 1 without
``--manifest``.
"""

from __future__ import annotations

from typing import Any

#: (item, section, text) as in the STARD 2015 list.
STARD_2015: tuple[tuple[str, str, str], ...] = (
    ("1", "Title or abstract", "Identification as a study of diagnostic accuracy using at least one measure of "
     "accuracy (such as sensitivity, specificity, predictive values, or AUC)"),
    ("2", "Abstract", "Structured summary of study design, methods, results, and conclusions"),
    ("3", "Introduction", "Scientific and clinical background, including the intended use and clinical role of "
     "the index test"),
    ("4", "Introduction", "Study objectives and hypotheses"),
    ("5", "Methods: study design", "Whether data collection was planned before the index test and reference "
     "standard were performed (prospective study) or after (retrospective study)"),
    ("6", "Methods: participants", "Eligibility criteria"),
    ("7", "Methods: participants", "On what basis potentially eligible participants were identified"),
    ("8", "Methods: participants", "Where and when potentially eligible participants were identified (setting, "
     "location and dates)"),
    ("9", "Methods: participants", "Whether participants formed a consecutive, random or convenience series"),
    ("10a", "Methods: test methods", "Index test, in sufficient detail to allow replication"),
    ("10b", "Methods: test methods", "Reference standard, in sufficient detail to allow replication"),
    ("11", "Methods: test methods", "Rationale for choosing the reference standard (if alternatives exist)"),
    ("12a", "Methods: test methods", "Definition of and rationale for test positivity cut-offs or result "
     "categories of the index test, distinguishing pre-specified from exploratory"),
    ("12b", "Methods: test methods", "Definition of and rationale for test positivity cut-offs or result "
     "categories of the reference standard, distinguishing pre-specified from exploratory"),
    ("13a", "Methods: test methods", "Whether clinical information and reference standard results were available "
     "to the performers or readers of the index test"),
    ("13b", "Methods: test methods", "Whether clinical information and index test results were available to the "
     "assessors of the reference standard"),
    ("14", "Methods: analysis", "Methods for estimating or comparing measures of diagnostic accuracy"),
    ("15", "Methods: analysis", "How indeterminate index test or reference standard results were handled"),
    ("16", "Methods: analysis", "How missing data on the index test and reference standard were handled"),
    ("17", "Methods: analysis", "Any analyses of variability in diagnostic accuracy, distinguishing pre-specified "
     "from exploratory"),
    ("18", "Methods: analysis", "Intended sample size and how it was determined"),
    ("19", "Results: participants", "Flow of participants, using a diagram"),
    ("20", "Results: participants", "Baseline demographic and clinical characteristics of participants"),
    ("21a", "Results: participants", "Distribution of severity of disease in those with the target condition"),
    ("21b", "Results: participants", "Distribution of alternative diagnoses in those without the target condition"),
    ("22", "Results: participants", "Time interval and any clinical interventions between index test and "
     "reference standard"),
    ("23", "Results: test results", "Cross tabulation of the index test results (or their distribution) by the "
     "results of the reference standard"),
    ("24", "Results: test results", "Estimates of diagnostic accuracy and their precision (such as 95% confidence "
     "intervals)"),
    ("25", "Results: test results", "Any adverse events from performing the index test or the reference standard"),
    ("26", "Discussion", "Study limitations, including sources of potential bias, statistical uncertainty, and "
     "generalisability"),
    ("27", "Discussion", "Implications for practice, including the intended use and clinical role of the index test"),
    ("28", "Other information", "Registration number and name of registry"),
    ("29", "Other information", "Where the full study protocol can be accessed"),
    ("30", "Other information", "Sources of funding and other support; role of funders"),
)

AUTHORS = "not answered by this report: the authors must report it"


def stard_checklist(available: set[str]) -> list[dict[str, Any]]:
    """One row per STARD 2015 item: ``where`` (text) and ``anchor`` (report section id or None).

    ``available``: the section ids present in this report (``table1``, ``flow``, ``table2``,
    ``table3``, ``severity``, ``cascade``, ``abstentions``, ``decision``, ``calibration``,
    ``methods``, ``warnings``, ``interval``).
    """

    def at(anchor: str, text: str, missing: str = AUTHORS) -> tuple[str, str | None]:
        return (text, anchor) if anchor in available else (missing, None)

    where: dict[str, tuple[str, str | None]] = {
        "1": at("table2", "Table 2 (AUC, sensitivity, specificity, PPV, NPV per dataset)"),
        "5": (AUTHORS + " (bonescreen pairs existing DXA and CXR records: typically retrospective)", None),
        "6": at("table1", "Table 1 and Figure 1 (the cohort's age range, views, modality and pairing window "
                "are in the cohort's flow.json)", AUTHORS + " (the cohort builder's options in flow.json)"),
        "8": at("table1", "Table 1 (datasets = sites); dates: " + AUTHORS),
        "10a": at("methods", "Statistical methods (score, cut-off); the model card in model.pt holds the "
                  "architecture, preprocessing and training data"),
        "10b": ("DXA: the lowest T-score of lumbar spine, femoral neck and total hip, WHO categories "
                "(README, Labels); scanner and protocol: " + AUTHORS, None),
        "12a": at("methods", "Statistical methods: the fixed cut-off (pre-specified) and the operating points "
                  "tuned on the tuning set (exploratory)"),
        "12b": ("WHO categories (T ≥ −1.0 normal; −2.5 < T < −1.0 low bone mass; T ≤ −2.5 osteoporosis), "
                "pre-specified (README, Labels)", None),
        "13a": ("the index test is automated: it sees the radiograph only (and, for the pediatric model, "
                "age, sex, height and weight), never the DXA result", None),
        "14": at("methods", "Statistical methods"),
        "15": at("abstentions", "Abstentions (indeterminate results) table; rows without a reference label are "
                 "counted in the warnings", "no index-test result was indeterminate in these predictions; "
                 "rows without a reference label are counted in the warnings"),
        "16": at("warnings", "Warnings (rows dropped for a missing score or label, with counts)",
                 "no row was dropped for a missing score or label"),
        "17": at("table3", "Table 3 (sex and age subgroups, pre-specified) and the tuned operating points "
                 "(exploratory)"),
        "19": at("flow", "Figure 1 (cohort flow with the reason for every exclusion)"),
        "20": at("table1", "Table 1 (age, sex, BMD categories, scanner manufacturer per dataset)"),
        "21a": at("severity", "Figure 2 (accuracy by severity grade) and Table 1 (severity counts)"),
        "22": at("interval", "Table 1 (days between CXR and DXA)"),
        "23": at("table2", "Table 2 (TP, TN, FP, FN per dataset)"
                 + ("; the cascade's 3×3 table (true × predicted category)" if "cascade" in available else "")),
        "24": at("table2", "Table 2 (95% CIs: Wilson for proportions, bootstrap for AUC and F1), calibration "
                 "and decision curves"),
        "26": ("the DeLong note, the warnings and the CIs quantify statistical uncertainty; sources of bias "
               "and generalisability: " + AUTHORS, None),
        "27": at("decision", "Decision curves (net benefit against refer-all, refer-none and the age/sex rule); "
                 "the intended use: " + AUTHORS),
    }
    rows = []
    for item, section, text in STARD_2015:
        w, anchor = where.get(item, (AUTHORS, None))
        rows.append({"item": item, "section": section, "text": text, "where": w, "anchor": anchor})
    return rows
