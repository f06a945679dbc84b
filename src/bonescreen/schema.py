"""Data contracts shared between stages (column names and vocabularies).

Stages talk to each other only through these tables, so they are defined once
here. See README "Data contracts".
"""

from __future__ import annotations

# --- DXA export (input) -----------------------------------------------------
DXA_REQUIRED = ["patient_id", "exam_date", "sex", "age"]
T_SCORE_COLUMNS = ["t_lumbar_spine", "t_femoral_neck", "t_total_hip"]
Z_SCORE_COLUMNS = ["z_lumbar_spine", "z_femoral_neck", "z_total_hip"]
BMD_COLUMNS = ["bmd_lumbar_spine", "bmd_femoral_neck", "bmd_total_hip"]
DXA_OPTIONAL = [*Z_SCORE_COLUMNS, *BMD_COLUMNS, "height_cm", "weight_kg", "category", "device"]

# --- Vocabularies -----------------------------------------------------------
CATEGORIES = ["normal", "low_bone_mass", "osteoporosis"]
SEVERITIES = ["normal", "mild", "moderate", "advanced", "osteoporosis"]
SPLITS = ["train", "tune", "test"]
FRONTAL_VIEWS = ["PA", "AP"]

# --- Cohort manifest (one row per paired image) -----------------------------
# ``label`` is the stage-2 binary label (1 = low bone mass, 0 = normal); it is
# empty for osteoporosis rows. ``label_stage1`` is 1 for osteoporosis.
# ``label_3class`` is 0 normal / 1 low bone mass / 2 osteoporosis.
MANIFEST_COLUMNS = [
    "image_id",
    "path",
    "patient_id",
    "site",
    "study_date",
    "dxa_date",
    "days_apart",
    "sex",
    "age",
    "view",
    "modality",
    "manufacturer",
    *T_SCORE_COLUMNS,
    "t_min",
    "category",
    "severity",
    "label",
    "label_stage1",
    "label_3class",
    "split",
]

EXCLUSION_COLUMNS = ["patient_id", "site", "path", "dxa_date", "study_date", "step", "reason"]

# --- Predictions table (train/screen write it, evaluate reads it) -----------
# ``score`` is the model's probability of the positive class (low bone mass for
# stage 2, osteoporosis for stage 1). ``label`` is the reference (0/1).
PREDICTION_REQUIRED = ["image_id", "score", "label"]
PREDICTION_OPTIONAL = ["patient_id", "site", "sex", "age", "t_min", "severity", "model", "split"]
