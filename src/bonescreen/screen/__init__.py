"""Screening: images in, one results row per image (and one per study) out.

The package (docs/ARCHITECTURE.md "Screening engine"):

- :mod:`~bonescreen.screen.inputs` — file walk, manifests, file lists, the clinical table, labels;
- :mod:`~bonescreen.screen.models` — ModelSet and the backend registry (members: ``backends``, ``auto``);
- :mod:`~bonescreen.screen.loading` — load_models / load_engine / calibration_images (above the engine);
- :mod:`~bonescreen.screen.gate` — eligibility: header (modality, anatomy, view, age, size) and pixels;
- :mod:`~bonescreen.screen.decide` — pure decisions: scores, category, flag, OOD verdict, study roll-up;
- :mod:`~bonescreen.screen.journal` — the resumable results journal;
- :mod:`~bonescreen.screen.outputs` — predictions.csv, studies.csv, per-study SR, overlays / SC;
- :mod:`~bonescreen.screen.engine` — ScreeningEngine: prepare -> gate -> predict -> decide, used by
  ``screen``, ``explain``, ``export`` and the service worker;
- :mod:`~bonescreen.screen.run` — the resumable ``screen()`` loop.
"""

from bonescreen.schema import (
    PEDIATRIC_PREDICTION_COLUMNS,
    PEDIATRIC_RESULT_COLUMNS,
    RESULT_COLUMNS,
    STUDY_COLUMNS,
)
from bonescreen.schema import SCREEN_PREDICTION_COLUMNS as PREDICTION_COLUMNS
from bonescreen.screen.decide import (
    PEDIATRIC_CATEGORIES,
    DecisionPolicy,
    ModelOutputs,
    apply_ood,
    decide,
    decide_outputs,
    decide_pediatric,
    rollup_study,
)
from bonescreen.screen.engine import PrepContext, Prepared, ScreeningEngine, predict_batch, prepare
from bonescreen.screen.gate import GateDecision, GatePolicy, check_header, check_pixels, classify_anatomy
from bonescreen.screen.inputs import (
    ClinicalTable,
    InputItem,
    header_body_size,
    clinical_raw,
    count_inputs,
    iter_inputs,
)
from bonescreen.screen.journal import ResultStore
from bonescreen.screen.loading import calibration_images, load_engine, load_models
from bonescreen.screen.models import BACKENDS, ModelSet, ScreenError, model_id, register_backend
from bonescreen.screen.outputs import prediction_columns, safe_name, write_predictions
from bonescreen.screen.run import ScreenOptions, ScreenSummary, result_columns, screen

__all__ = [
    "BACKENDS",
    "PEDIATRIC_CATEGORIES",
    "PEDIATRIC_PREDICTION_COLUMNS",
    "PEDIATRIC_RESULT_COLUMNS",
    "PREDICTION_COLUMNS",
    "RESULT_COLUMNS",
    "STUDY_COLUMNS",
    "ClinicalTable",
    "DecisionPolicy",
    "GateDecision",
    "GatePolicy",
    "InputItem",
    "ModelOutputs",
    "ModelSet",
    "PrepContext",
    "Prepared",
    "ResultStore",
    "ScreenError",
    "ScreenOptions",
    "ScreenSummary",
    "ScreeningEngine",
    "header_body_size",
    "apply_ood",
    "check_header",
    "check_pixels",
    "classify_anatomy",
    "clinical_raw",
    "count_inputs",
    "decide",
    "decide_outputs",
    "decide_pediatric",
    "iter_inputs",
    "calibration_images",
    "load_engine",
    "load_models",
    "model_id",
    "predict_batch",
    "prediction_columns",
    "prepare",
    "register_backend",
    "result_columns",
    "rollup_study",
    "safe_name",
    "screen",
    "write_predictions",
]
