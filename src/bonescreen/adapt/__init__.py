"""Trust at a new site (README, "Adapting to a new site"): site profiles stored in the artifact.

- :mod:`~bonescreen.adapt.calibrate`: local DXA-paired results -> recalibration, operating point,
  before/after metrics, learning curve (``bonescreen calibrate``);
- :mod:`~bonescreen.adapt.labelfree`: unlabelled images -> normalisation re-estimation, EM prevalence,
  moved cut-off (``bonescreen adapt``);
- :mod:`~bonescreen.adapt.abstain`: the "indeterminate: consider DXA" band;
- :mod:`~bonescreen.adapt.profile`: the profile, its storage in the artifact, and its use at screening.
"""

from bonescreen.adapt.abstain import (
    INDETERMINATE_MESSAGE,
    AbstainBand,
    apply_band,
    band_from_probability,
    band_from_rates,
    band_summary,
    classify,
)
from bonescreen.adapt.prevalence import PrevalenceEstimate, adjust_posteriors, em_prevalence, estimate_prevalence
from bonescreen.adapt.profile import (
    ProfileError,
    SiteProfile,
    get_profile,
    list_profiles,
    profiled_model,
    remove_profile,
    site_rows,
    write_profile,
)
from bonescreen.adapt.recalibrate import (
    CalibrationError,
    Recalibration,
    choose_recalibration,
    fit_isotonic,
    fit_platt,
    prior_shift,
)
from bonescreen.schema import INDETERMINATE

__all__ = [
    "INDETERMINATE",
    "INDETERMINATE_MESSAGE",
    "AbstainBand",
    "CalibrationError",
    "PrevalenceEstimate",
    "ProfileError",
    "Recalibration",
    "SiteProfile",
    "adjust_posteriors",
    "apply_band",
    "band_from_probability",
    "band_from_rates",
    "band_summary",
    "choose_recalibration",
    "classify",
    "em_prevalence",
    "estimate_prevalence",
    "fit_isotonic",
    "fit_platt",
    "get_profile",
    "list_profiles",
    "prior_shift",
    "profiled_model",
    "remove_profile",
    "site_rows",
    "write_profile",
]
