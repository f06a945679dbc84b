"""Data contracts shared between stages (column names and vocabularies).

Stages talk to each other only through these tables, so they are defined once
here. See README "Data contracts".
"""

from __future__ import annotations

# --- DXA export (input) -----------------------------------------------------
DXA_REQUIRED = ["patient_id", "exam_date", "sex", "age"]
T_SCORE_COLUMNS = ["t_lumbar_spine", "t_femoral_neck", "t_total_hip"]
# Children: lumbar spine and total body less head (TBLH) are the sites that count (ISCD).
Z_SCORE_COLUMNS = ["z_lumbar_spine", "z_femoral_neck", "z_total_hip", "z_total_body_less_head"]
BMD_COLUMNS = ["bmd_lumbar_spine", "bmd_femoral_neck", "bmd_total_hip", "bmd_total_body_less_head"]
DXA_OPTIONAL = [*Z_SCORE_COLUMNS, *BMD_COLUMNS, "height_cm", "weight_kg", "category", "device"]
#: Accepted in a DXA export instead of ``age``: the age at the exam is computed from it.
BIRTH_DATE_COLUMN = "birth_date"
#: Plausible body size; outside it a value is a unit or entry error (PatientSize in metres, pounds).
HEIGHT_CM_RANGE = (30.0, 250.0)
WEIGHT_KG_RANGE = (0.5, 350.0)
#: Cohort populations: the adult OsPenScreen study (T-scores) and the pediatric one (Z-scores).
POPULATIONS = ("adult", "pediatric")
#: The artifact task string of pediatric models: registered by ``bonescreen.tasks.pediatric``, named
#: here for the pediatric modules below the registry (``pediatric.model``, ``pediatric.explain``)
PEDIATRIC_TASK = "pediatric"

# --- Vocabularies -----------------------------------------------------------
CATEGORIES = ["normal", "low_bone_mass", "osteoporosis"]
#: The screening outcome near the cut-off under a site profile's abstain band (bonescreen.adapt.abstain).
INDETERMINATE = "indeterminate"
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

# --- Screening results (``bonescreen screen`` and the service write them) ----------------
# One row per input file; a refused image still has its row (``eligible`` False, ``reason``).
# ``ood_score`` is the out-of-distribution distance divided by the model's refusal threshold
# (1.0 = the threshold; see bonescreen.ood); ``ood_check`` records the policy the row was
# screened under (refuse | flag | off) so an opted-out row can never pass for a checked one.
# ``site_profile`` names the site profile the row was decided under (``screen --site-profile``,
# the service's ``site_profile``; empty: the model's own cut-off) and ``site_probability`` is
# the score recalibrated at that site (bonescreen.adapt). Under a profile with an abstain band,
# ``category`` ``indeterminate`` (reason ``abstain_band``, flagged) means "consider DXA".
RESULT_COLUMNS = [
    "path",
    "image_id",
    "eligible",
    "reason",
    "message",
    "site",
    "sex",
    "age",
    "view",
    "modality",
    "study_date",
    "patient_id",
    "study_instance_uid",
    "series_instance_uid",
    "accession_number",
    "sop_class_uid",
    "manufacturer",
    "manufacturer_model_name",
    "body_part",
    "score",
    "score_stage1",
    "score_stage2",
    "p_normal",
    "p_low_bone_mass",
    "p_osteoporosis",
    "category",
    "flag",
    "site_probability",
    "ood_score",
    "ood_check",
    "site_profile",
    "threshold_stage1",
    "threshold_stage2",
    "model",
    "model_stage1",
    "backend",
    "bonescreen_version",
    "overlay",
    "sc",
]
#: Added to the results table for pediatric models.
PEDIATRIC_RESULT_COLUMNS = ["pred_z", "pred_bmd", "height_cm", "weight_kg", "clinical_source"]
#: What ``predictions.csv`` holds: ``PREDICTION_*`` plus the screening extras.
SCREEN_PREDICTION_COLUMNS = [
    *PREDICTION_REQUIRED,
    *PREDICTION_OPTIONAL,
    "score_stage1",
    "label_stage1",
    "category",
    "flag",
    "study_instance_uid",
    "path",
]
#: Added to ``predictions.csv`` for pediatric models (names ``bonescreen pediatric evaluate`` reads).
PEDIATRIC_PREDICTION_COLUMNS = ["pred_z", "pred_bmd", "z_pred", "bmd_pred", "z_true", "bmd_true",
                                "height_cm", "weight_kg"]

# --- Study table (``studies.csv``: one row per patient study) ----------------------------
# ``decided_by`` is the image whose result is the study's (bonescreen.screen.decide.rollup_study);
# ``image_ids`` every eligible image that contributed, ``n_images``/``n_eligible`` all images of
# the study in the run; a study with no eligible image has ``eligible`` False and a ``reason``.
STUDY_COLUMNS = [
    "study_instance_uid",
    "accession_number",
    "patient_id",
    "study_date",
    "site",
    "eligible",
    "reason",
    "message",
    "category",
    "flag",
    "score",
    "score_stage1",
    "ood_score",
    "decided_by",
    "image_ids",
    "n_images",
    "n_eligible",
    "model",
    "sr",
]

# --- Screening reasons ------------------------------------------------------------------
#: Why the gate refused an image (``reason`` column). I/O reasons (not_dicom, truncated, ...)
#: come from bonescreen.io and pass through unchanged.
GATE_REASONS = (
    "wrong_modality",
    "lateral_view",
    "not_frontal",
    "age_out_of_range",
    "age_unknown",
    "view_unknown",
    "modality_unknown",
    "wrong_body_part",
    "body_part_unknown",
    "too_small",
    "blank",
    "low_dynamic_range",
    "no_lung_fields",
    "out_of_distribution",
    "ood_borderline",
)
#: Reasons of eligible, scored rows the OOD check marked for review: above the refusal
#: threshold under ``--ood flag``, or in the flag band below it (any policy but ``off``).
OOD_FLAG_REASONS = ("out_of_distribution", "ood_borderline")
#: ``ood_check`` values: refuse images above the threshold (default), flag them but still score,
#: or off (no check; an explicit opt-out, recorded in run.json and every row).
OOD_POLICIES = ("refuse", "flag", "off")

# --- Anatomy vocabulary (header check; bonescreen.screen.gate.classify_anatomy) -----------
# Matching is on tokens: accents folded, upper-cased, split on anything that is not a letter
# or digit, so "TORAX PA", "Tórax" and "CHEST_PA" match while "CHESTNUT" does not. A term of
# several words matches that run of tokens. Scripts without spaces (CJK) match as substrings.
# Plurals ("LUNGS", "KNEES") match their singular.
CHEST_TERMS = (
    "CHEST", "THORAX", "CXR", "LUNG",  # English / Latin
    "TORAX", "PECHO", "PULMON", "PULMONES",  # Spanish, Portuguese (tórax, pulmão -> PULMAO)
    "PULMAO", "PULMOES",
    "TORACE", "POLMONE", "POLMONI",  # Italian
    "POUMON",  # French ("thorax" as in English)
    "LUNGE", "LUNGEN", "BRUST", "BRUSTKORB",  # German (Brust: the chest in radiology)
    "BORST", "BORSTKAS", "LONGEN",  # Dutch ("long" alone is an English word)
    "BRYST", "BRYSTKASSE", "LUNGOR", "BROSTKORG",  # Scandinavian
    "KLATKA PIERSIOWA", "PLUCA", "HRUDNIK", "PLICE",  # Polish, Czech/Slovak/Slovene
    "MELLKAS", "TUDO",  # Hungarian
    "TORAKS", "AKCIGER", "GOGUS",  # Turkish, Polish
    "ΘΩΡΑΚΑΣ", "ΘΩΡΑΚΟΣ", "ΠΝΕΥΜΟΝΕΣ",  # Greek
    "ГРУДНОИ КЛЕТКИ", "ГРУДНАЯ КЛЕТКА", "ОГК", "ЛЕГКИХ", "ЛЕГКИЕ",  # Russian (й folds to и)
)
#: Substring terms for scripts written without spaces (Chinese, Japanese, Korean).
CHEST_SUBSTRINGS = ("胸部", "胸片", "胸廓", "肺", "흉부", "흉곽")
#: Known non-chest regions, by group (the group names the region in the refusal message).
NON_CHEST_TERMS: dict[str, tuple[str, ...]] = {
    "upper extremity": (
        "HAND", "FINGER", "THUMB", "WRIST", "FOREARM", "ELBOW", "HUMERUS", "UPPER ARM", "SHOULDER",
        "CLAVICLE", "SCAPULA", "ACROMIOCLAVICULAR", "ULNA", "SCAPHOID", "UPPERARM",
        "MANO", "DEDO", "MUNECA", "CODO", "HOMBRO", "ANTEBRAZO", "BRAZO", "CLAVICULA", "ESCAPULA",
        "DOIGT", "POIGNET", "COUDE", "EPAULE", "AVANT BRAS",  # not "main": an English word
        "DITO", "POLSO", "GOMITO", "SPALLA", "BRACCIO", "AVAMBRACCIO",
        "HANDGELENK", "ELLENBOGEN", "SCHULTER", "OBERARM", "UNTERARM", "SCHLUSSELBEIN",
        "SCHOUDER", "POLS", "ELLEBOOG", "PULSO", "OMBRO", "COTOVELO",
    ),
    "extremity": (
        "EXTREMITY", "EXTREMITIES", "LIMB", "UPPER LIMB", "LOWER LIMB", "EXTREMIDAD", "EXTREMIDADES", "MIEMBRO",
        "EXTREMITE", "MEMBRE", "ESTREMITA", "ARTO", "EXTREMITAT", "UPPEREXTREMITY", "LOWEREXTREMITY",
    ),
    "lower extremity": (
        "LEG", "HIP", "FEMUR", "THIGH", "KNEE",
        "PATELLA", "TIBIA", "FIBULA", "ANKLE", "FOOT", "FEET", "TOE", "HEEL", "CALCANEUS", "LOWER LEG",
        "LOWERLEG",
        "RODILLA", "TOBILLO", "PIE", "CADERA", "PIERNA", "MUSLO",
        "GENOU", "CHEVILLE", "PIED", "HANCHE", "JAMBE", "CUISSE",
        "GINOCCHIO", "CAVIGLIA", "PIEDE", "ANCA", "GAMBA", "COSCIA",
        "KNIE", "KNIEGELENK", "SPRUNGGELENK", "OSG", "FUSS", "HUFTE", "UNTERSCHENKEL",
        "OBERSCHENKEL", "ZEHE", "ZEHEN", "BEIN", "ENKEL", "VOET", "HEUP", "JOELHO", "TORNOZELO", "QUADRIL",
    ),
    "head": (
        "HEAD", "SKULL", "CRANIUM", "BRAIN", "FACE", "FACIAL", "SINUS", "SINUSES", "ORBIT", "NASAL", "NOSE",
        "MANDIBLE", "JAW", "TMJ", "ZYGOMA", "SELLA", "MASTOID", "HEADNECK",
        "CRANEO", "CABEZA", "CARA", "SENOS PARANASALES", "MANDIBULA", "CRANE", "TETE", "CERVEAU", "VISAGE",
        "CRANIO", "TESTA", "CERVELLO", "SCHADEL", "KOPF", "GEHIRN", "NASENNEBENHOHLEN", "NNH", "SCHEDEL",
    ),
    "dental": (
        "DENTAL", "TOOTH", "TEETH", "BITEWING", "PERIAPICAL", "CEPHALOMETRIC", "CEPH", "OPG",
        "ORTHOPANTOMOGRAM", "PANORAMIC", "PANORAMIX", "DIENTE", "DIENTES", "DENT", "DENTS", "DENTI",
        "ZAHN", "ZAHNE", "KIEFER",
    ),
    "neck": ("NECK", "SOFT TISSUE NECK", "CUELLO", "COU", "COLLO", "HALS", "LARYNX", "THYROID"),
    "abdomen": (
        "ABDOMEN", "ABDOMINAL", "ABD", "KUB", "ABDOMENPELVIS", "ABDOMEN PELVIS", "BAUCH", "ABDOME", "ADDOME",
        "BUIK", "VIENTRE", "STOMACH", "BOWEL", "COLON", "KIDNEY", "RENAL", "URETHRA", "BLADDER",
    ),
    "pelvis": ("PELVIS", "PELVIC", "SACRUM", "COCCYX", "SACROILIAC", "BECKEN", "BASSIN", "BACINO", "BEKKEN",
               "PELVE", "SSPINE"),
    "spine": (
        "SPINE", "SPINAL", "LSPINE", "CSPINE", "TSPINE", "CTSPINE", "TLSPINE", "LSSPINE", "LUMBAR",
        "CERVICAL", "SACRAL", "VERTEBRA", "VERTEBRAE", "VERTEBRAL", "SCOLIOSIS", "LUMBOSACRAL",
        "THORACOLUMBAR", "CERVICOTHORACIC", "COLUMNA", "RACHIS", "COLONNA", "WIRBELSAULE", "LWS", "HWS", "BWS",
        "COLUNA", "WERVELKOLOM",
    ),
    "breast": (
        "BREAST", "MAMMO", "MAMMOGRAM", "MAMMOGRAPHY", "MAMMOGRAPHIE", "MAMOGRAFIA", "MAMMOGRAFIA", "MAMMA",
        "MAMA", "SEIN", "SENO", "TOMOSYNTHESIS", "MAMMOGRAFIE",
    ),
    "other": ("STERNUM", "WHOLE BODY", "WHOLEBODY", "BABYGRAM", "SKELETAL SURVEY", "PHANTOM", "TEST PATTERN"),
}
#: Combinations and regions that do not say whether this image is a frontal chest: neither
#: chest nor non-chest (the content check decides).
NEUTRAL_ANATOMY_TERMS = (
    "CHESTABDOMEN", "CHESTABDPELVIS", "NECKCHEST", "NECKCHESTABDOMEN", "NECKCHESTABDPELV", "RIB", "RIBS",
    "HEART", "CARDIAC",
)
#: Coded anatomy (AnatomicRegionSequence; DICOM CID 4, SNOMED CT and the older SNOMED RT codes):
#: code value -> meaning. Chest codes accept; non-chest codes refuse; combinations are neutral.
CHEST_CODES: dict[str, str] = {
    "51185008": "Thorax",  # SNOMED CT, CID 4 before 2019
    "816094009": "Thorax",  # SNOMED CT, CID 4 today
    "43799004": "Chest",  # "Intrathoracic" in CID 4 today; "Chest" in older editions
    "39607008": "Lung",
    "72410000": "Mediastinum",
    "T-D3000": "Chest",  # SNOMED RT
    "T-28000": "Lung",  # SNOMED RT
}
NEUTRAL_CODES: dict[str, str] = {
    "416550000": "Chest and Abdomen",
    "416775004": "Chest, Abdomen and Pelvis",
    "417437006": "Neck and Chest",
    "416152001": "Neck, Chest and Abdomen",
    "416319003": "Neck, Chest, Abdomen and Pelvis",
    "113197003": "Rib",
}
NON_CHEST_CODES: dict[str, str] = {
    "818981001": "Abdomen", "113345001": "Abdomen", "818982008": "Abdomen and Pelvis", "816092008": "Pelvis",
    "12921003": "Pelvis", "72696002": "Knee", "85562004": "Hand", "56459004": "Foot", "89546000": "Skull",
    "69536005": "Head", "774007": "Head and Neck", "45048000": "Neck", "122496007": "Lumbar spine",
    "122494005": "Cervical spine", "122495006": "Thoracic spine", "421060004": "Spine",
    "1217256009": "Thoraco-lumbar spine", "1217257000": "Cervico-thoracic spine",
    "1217253001": "Lumbo-sacral spine", "76752008": "Breast", "29836001": "Hip", "24136001": "Hip joint",
    "16982005": "Shoulder", "71341001": "Femur", "85050009": "Humerus", "91609006": "Mandible",
    "66019005": "Extremity", "53120007": "Upper limb", "61685007": "Lower limb", "40983000": "Upper arm",
    "14975008": "Forearm", "30021000": "Lower leg", "68367000": "Thigh", "7569003": "Finger", "29707007": "Toe",
    "76505004": "Thumb", "70258002": "Ankle joint", "16953009": "Elbow joint", "74670003": "Wrist joint",
    "87342007": "Fibula", "64234005": "Patella", "80144004": "Calcaneus", "51299004": "Clavicle",
    "79601000": "Scapula", "56873002": "Sternum", "89545001": "Face", "91397008": "Facial bones",
    "12738006": "Brain", "38266002": "Entire body", "706342009": "Phantom", "54735007": "Sacrum",
    "64688005": "Coccyx", "12611008": "Tibia", "T-D1100": "Head", "T-D4000": "Abdomen", "T-D6000": "Pelvis",
    "T-15750": "Knee joint", "T-D8700": "Hand", "T-D9700": "Foot", "T-11100": "Skull", "T-04000": "Breast",
}
#: The DICOM attributes the anatomy check reads, most authoritative first. The first four
#: describe this image or its series; StudyDescription describes the whole study, which may
#: hold other exams, so it is used only when none of the others names a region.
ANATOMY_FIELDS = ("AnatomicRegionSequence", "BodyPartExamined", "ProtocolName", "SeriesDescription")
STUDY_ANATOMY_FIELDS = ("StudyDescription",)

#: Every spelling of a lateral view position archives use (DICOM ViewPosition ``LL``/``RL``,
#: vendor and free-text forms). ``io.normalise_view`` maps each onto ``LAT``; the gate refuses
#: any of them as ``lateral_view``, whether or not the view was normalised first.
LATERAL_VIEWS = ("LAT", "LATERAL", "LL", "RL", "LLAT", "RLAT", "LEFT LATERAL", "RIGHT LATERAL",
                 "LATERAL-LEFT", "LATERAL-RIGHT")
