"""Typed errors, so batch code can record a specific reason and carry on.

Every error has a short machine-readable ``reason`` (used in skip lists and
screening tables) and a human message.
"""

from __future__ import annotations


class BonescreenError(Exception):
    """Base class for every error bonescreen raises on purpose."""

    reason: str = "error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class ImageReadError(BonescreenError):
    """An input image could not be turned into pixels."""

    reason = "unreadable"


class NotDicomError(ImageReadError):
    reason = "not_dicom"


class NoPixelDataError(ImageReadError):
    reason = "no_pixel_data"


class WrongModalityError(ImageReadError):
    reason = "wrong_modality"


class MultiFrameError(ImageReadError):
    reason = "multi_frame"


class MissingDecoderError(ImageReadError):
    """Compressed transfer syntax with no installed decoder; message names the package."""

    reason = "no_decoder"


class MissingTagError(ImageReadError):
    reason = "missing_tag"


class TableError(BonescreenError):
    """A DXA export, manifest or predictions table is malformed."""

    reason = "bad_table"


class ModelArtifactError(BonescreenError):
    """A model artifact is corrupt, from an incompatible version, or for another task."""

    reason = "bad_model"
