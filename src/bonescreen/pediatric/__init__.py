"""Pediatric variant: BMD Z-score and raw BMD from the CXR plus age, sex, height and weight.

Low BMD is a predicted Z-score <= -2.0. See the README, "Pediatric variant".
Heavy modules (torch, shap) are imported by the submodules; ``predict_pediatric``
is re-exported here for ``screen``.
"""

from __future__ import annotations

from typing import Any


def predict_pediatric(loaded: Any, images_uint8: Any, clinical: Any, *, device: str = "cpu") -> Any:
    """See :func:`bonescreen.pediatric.model.predict_pediatric`."""
    from bonescreen.pediatric.model import predict_pediatric as _predict

    return _predict(loaded, images_uint8, clinical, device=device)


__all__ = ["predict_pediatric"]
