"""Synthetic CXR-DXA cohort with a known truth (see the README, "The phantom cohort").

Each patient has a latent bone density; the radiograph's bones carry it
(attenuation, cortical thickness, trabecular texture) and the DXA T-scores
are the latent plus skeletal-site offsets plus measurement noise, so the best
achievable AUC (the oracle) is known.
"""

from __future__ import annotations

from bonescreen.phantom.adult import MESSY_DEFECTS
from bonescreen.phantom.anatomy import (
    Acquisition,
    Anatomy,
    anatomy_from_patient,
    render_attenuation,
)
from bonescreen.phantom.common import (
    DXA_SITES,
    IMAGE_COLUMNS,
    TRUTH_COLUMNS,
    PatientRecord,
    PhantomError,
    PoolSpec,
    SitePlan,
    SiteSpec,
)
from bonescreen.phantom.generate import PhantomResult, generate_phantom
from bonescreen.phantom.render import RenderedImage, render_patient_image
from bonescreen.phantom.sites import default_pool, default_sites, far_site, far_vendor
from bonescreen.phantom.vendors import VendorProfile

__all__ = [
    "DXA_SITES",
    "IMAGE_COLUMNS",
    "MESSY_DEFECTS",
    "TRUTH_COLUMNS",
    "Acquisition",
    "Anatomy",
    "PatientRecord",
    "PhantomError",
    "PhantomResult",
    "PoolSpec",
    "RenderedImage",
    "SitePlan",
    "SiteSpec",
    "VendorProfile",
    "anatomy_from_patient",
    "default_pool",
    "default_sites",
    "far_site",
    "far_vendor",
    "generate_phantom",
    "render_attenuation",
    "render_patient_image",
]
