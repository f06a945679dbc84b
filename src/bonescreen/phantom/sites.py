"""The phantom's default adult sites and unlabelled pool, as data.

Declarative: each site is one frozen :class:`SiteSpec` (population, DXA
practice, radiography systems). Sites are generated independently (every
random draw is keyed by the site's name), so adding or removing one leaves
the others' files unchanged.
"""

from __future__ import annotations

from bonescreen.phantom.common import PoolSpec, SiteSpec
from bonescreen.phantom.vendors import VendorProfile

__all__ = ["DEV_VENDOR", "FAR_VENDOR", "FAR_SITE", "DEFAULT_SITES", "DEFAULT_POOL",
           "default_sites", "far_site", "far_vendor", "default_pool"]

# DEV's radiography system: a log-response DR unit with a VOI window.
DEV_VENDOR = VendorProfile(
    name="dev_dr",
    manufacturer="Phantom Imaging",
    model="PX-DR 1",
    modality="DX",
    bits_stored=12,
    photometric="MONOCHROME2",
    response="log",
    voi_window=True,
    rescale=(1.0, 0.0),
    marker="R",
)

# The radiography system that differs most from DEV's on every axis (see far_vendor).
FAR_VENDOR = VendorProfile(
    name="far_cr",
    manufacturer="Farland Medical",
    model="FL-CR 8 Bedside",
    modality="CR",
    bits_stored=10,
    photometric="MONOCHROME1",
    response="linear",
    linear_k=1.2,
    exposure=0.35,
    electronic_noise=0.006,
    scatter=0.15,
    blur_mm=1.2,
    detail_gain=2.8,
    range_compression=0.45,
    fov_mm=480.0,
    range_percentiles=(0.5, 85.0),
    collimation=0.11,
    collimation_fill="black",
    marker="both",
    marker_prob=1.0,
    annotation="FARLAND GENERAL CR",
    lateral_label="LATERAL",
)

# FAR: the external site farthest from DEV (see far_site).
FAR_SITE = SiteSpec(
    name="FAR",
    age_mean=76.0,
    age_sd=8.0,
    age_min=55.0,
    age_max=99.0,
    female_frac=0.8,
    prevalence=0.48,
    vendors=(FAR_VENDOR,),
    ap_frac=0.30,
    lateral_frac=0.20,
    device_frac=0.08,
    window_probs=(0.2, 0.4, 0.3, 0.1),
    date_start="2016-01-01",
    date_end="2024-06-30",
    dxa_device="Hologic Discovery",
    dxa_offset=0.15,
    dxa_noise=0.15,
)

# DEV: health-screening population (50-65), same-day CXR and DXA, messy export.
# EXT_A: similar ages, another vendor (CR, 10-bit, MONOCHROME1, linear, RLE).
# EXT_B: older veterans-like population, two systems, laterals and AP views.
# EXT_C: older, category labels only (no T-scores), JPEG 2000, 180-day pairing.
# FAR: the vendor look farthest from DEV's, an old inpatient population.
DEFAULT_SITES: tuple[SiteSpec, ...] = (
    SiteSpec(
        name="DEV",
        role="development",
        age_mean=56.0,
        age_sd=5.5,
        age_min=45.0,
        age_max=80.0,
        female_frac=0.55,
        prevalence=0.42,
        vendors=(DEV_VENDOR,),
        ap_frac=0.02,
        lateral_frac=0.10,
        device_frac=0.01,
        window_probs=(0.65, 0.2, 0.1, 0.05),
        date_start="2012-01-01",
        date_end="2019-02-28",
        messy=True,
    ),
    SiteSpec(
        name="EXT_A",
        age_mean=58.0,
        age_sd=8.0,
        age_min=40.0,
        age_max=87.0,
        female_frac=0.6,
        prevalence=0.33,
        vendors=(
            VendorProfile(
                name="exta_cr",
                manufacturer="Acme Medical",
                model="CR-30",
                modality="CR",
                bits_stored=10,
                photometric="MONOCHROME1",
                response="linear",
                exposure=0.7,
                scatter=0.08,
                detail_gain=1.3,
                range_compression=0.85,
                collimation=0.06,
                collimation_fill="black",
                marker="L",
                rescale=(2.0, -1024.0),
                transfer_syntax="rle",
                fov_mm=420.0,
            ),
        ),
        ap_frac=0.05,
        lateral_frac=0.10,
        window_probs=(0.4, 0.4, 0.15, 0.05),
        date_start="2022-08-01",
        date_end="2023-07-31",
        dxa_device="Osteosys Primus",
        dxa_offset=-0.10,
        dxa_noise=0.15,
    ),
    SiteSpec(
        name="EXT_B",
        age_mean=71.0,
        age_sd=7.5,
        age_min=50.0,
        age_max=98.0,
        female_frac=0.25,
        prevalence=0.45,
        vendors=(
            VendorProfile(
                name="extb_dr",
                manufacturer="Northwind Radiography",
                model="NW Digital 9",
                modality="DX",
                bits_stored=16,
                photometric="MONOCHROME2",
                response="log",
                detail_gain=2.0,
                range_compression=0.6,
                voi_window=True,
                marker="both",
                fov_mm=400.0,
            ),
            VendorProfile(
                name="extb_cr",
                manufacturer="Northwind Radiography",
                model="NW CR 2",
                modality="CR",
                bits_stored=14,
                photometric="MONOCHROME1",
                response="log",
                exposure=0.8,
                detail_gain=1.4,
                collimation=0.05,
                lateral_label="LAT",
                fov_mm=380.0,
            ),
        ),
        vendor_weights=(0.6, 0.4),
        ap_frac=0.15,
        lateral_frac=0.30,
        device_frac=0.05,
        window_probs=(0.15, 0.45, 0.3, 0.1),
        date_start="2012-10-01",
        date_end="2022-10-31",
    ),
    SiteSpec(
        name="EXT_C",
        label_type="category",
        age_mean=68.0,
        age_sd=8.5,
        age_min=50.0,
        age_max=95.0,
        female_frac=0.7,
        prevalence=0.45,
        vendors=(
            VendorProfile(
                name="extc_dr",
                manufacturer="Globex Imaging",
                model="GX-Flat 43",
                modality="DX",
                bits_stored=15,
                photometric="MONOCHROME2",
                response="log",
                exposure=1.2,
                detail_gain=1.8,
                range_compression=0.65,
                rescale=(0.5, 0.0),
                transfer_syntax="j2k",
                marker=None,
                fov_mm=430.0,
            ),
        ),
        ap_frac=0.08,
        lateral_frac=0.10,
        window_probs=(0.3, 0.35, 0.3, 0.05),
        date_start="2015-01-01",
        date_end="2023-12-31",
        dxa_device="unknown",
        dxa_noise=0.15,
    ),
    FAR_SITE,
)

# A mixed-vendor public-like pool: J2K, signed pixels, a view only named in the description.
DEFAULT_POOL = PoolSpec(
    vendors=(
        VendorProfile(
            name="pool_cr12",
            manufacturer="Public Archive A",
            model="CR",
            modality="CR",
            bits_stored=12,
            photometric="MONOCHROME2",
            transfer_syntax="j2k",
            detail_gain=1.5,
            fov_mm=410.0,
        ),
        VendorProfile(
            name="pool_dx_signed",
            manufacturer="Public Archive B",
            model="DX",
            modality="DX",
            bits_stored=12,
            pixel_representation=1,
            photometric="MONOCHROME2",
            response="linear",
            view_in_description_only=True,
            fov_mm=390.0,
        ),
        VendorProfile(
            name="pool_mono1",
            manufacturer="Public Archive C",
            model="CR",
            modality="CR",
            bits_stored=14,
            photometric="MONOCHROME1",
            detail_gain=2.2,
            range_compression=0.55,
            voi_window=True,
            marker="L",
            fov_mm=430.0,
        ),
    ),
    vendor_weights=(0.4, 0.3, 0.3),
)


def default_sites() -> list[SiteSpec]:
    """Development site plus four external sites: the paper's three and a far one.

    DEV: health-screening population (50-65), same-day CXR and DXA, messy export.
    EXT_A: similar ages, another vendor (CR, 10-bit, MONOCHROME1, linear, RLE).
    EXT_B: older veterans-like population, two systems, laterals and AP views.
    EXT_C: older, category labels only (no T-scores), JPEG 2000, 180-day pairing.
    FAR: the vendor look farthest from DEV's, an old inpatient population
    (:func:`far_site`). Sites are generated independently (every draw is keyed
    by the site's name), so adding FAR left the other sites' files unchanged.
    """
    return list(DEFAULT_SITES)


def far_vendor() -> VendorProfile:
    """The radiography system that differs most from DEV's (``DEV_VENDOR``) on every axis.

    A bedside CR reader without a grid: MONOCHROME1 at 10 bits, a strongly
    curved linear (dose) response instead of DEV's log one, heavy multi-scale
    processing (detail gain 2.8 and range compression 0.45 against DEV's 1.6
    and 0.7), a third of the fluence and three times the electronic noise,
    more scatter, a blurrier plate over a larger field (the chest fills less
    of the image; coarser pixels), wide black collimation, both lead markers
    always and a burned-in text line, no VOI window and no rescale.
    """
    return FAR_VENDOR


def far_site() -> SiteSpec:
    """FAR: the external site farthest from DEV (vendor look, population, DXA device).

    Inpatient-heavy, old and mostly female (76 +- 8, 80 % women), higher
    prevalence (0.48), many AP and lateral views and devices, pairing up to
    180 days and more, another DXA device with a calibration offset.
    """
    return FAR_SITE


def default_pool() -> PoolSpec:
    """A mixed-vendor public-like pool: J2K, signed pixels, a view only named in the description."""
    return DEFAULT_POOL
