"""Grad-CAM for any convolutional timm backbone (pytorch-grad-cam), and PNG overlays.

The target layer is found automatically: the last module that runs inside
``model.forward_features`` and produces the final feature map (``N, C, h, w``),
i.e. the last stage before global pooling. This is the layer the paper's
Figure 3 style maps use, and it works for ConvNeXt, EfficientNet, ResNet, ...
without a per-family table. Transformers whose features are tokens
(``N, L, C``) are refused with a clear error.

The model-level half of explaining: ``screen`` (overlays while screening) and
``pediatric.explain`` use it; the batch command ``bonescreen.explain`` sits above
``screen``. Pediatric models: ``bonescreen.pediatric.explain.PediatricExplainer``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import numpy as np

from bonescreen.errors import BonescreenError
from bonescreen.fsio import atomic_open

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

__all__ = ["ExplainError", "ExplainableModel", "Explainer", "find_target_layer", "overlay", "save_png"]


class ExplainableModel(Protocol):
    """What Grad-CAM needs of a loaded model (``bonescreen.artifact.LoadedModel`` fits this).

    Structural, so this module sits below the artifact and the tasks that pick an explainer.
    """

    model: nn.Module
    spec: Any

    @property
    def size(self) -> int: ...

    def to_tensor(self, images: np.ndarray) -> Any: ...


class ExplainError(BonescreenError):
    reason = "explain_failed"


def find_target_layer(model: nn.Module, in_chans: int = 1, size: int = 96) -> nn.Module:
    """The module whose output is the backbone's final spatial feature map.

    Runs ``forward_features`` once on a small dummy input with forward hooks
    on every submodule; the last module (in completion order, identities
    skipped) whose output has the same 4-D shape as the features wins.
    """
    import torch
    from torch import nn

    if not hasattr(model, "forward_features"):
        raise ExplainError(f"{type(model).__name__} has no forward_features(); not a timm backbone")
    seen: list[tuple[nn.Module, tuple[int, ...]]] = []
    handles = []

    def hook(mod: nn.Module, _inp: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            seen.append((mod, tuple(out.shape)))

    for _name, mod in model.named_modules():
        if mod is not model:
            handles.append(mod.register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            # checked above (hasattr); nn.Module.__getattr__ types it as Tensor | Module
            forward_features = cast(Callable[..., Any], model.forward_features)
            feats = forward_features(torch.zeros(1, in_chans, size, size))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not isinstance(feats, torch.Tensor) or feats.ndim != 4:
        shape = tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__
        raise ExplainError(
            f"{type(model).__name__} features have shape {shape}; Grad-CAM here needs a "
            "convolutional feature map (N, C, H, W)"
        )
    target = tuple(feats.shape)
    for mod, shape in reversed(seen):
        if shape == target and not isinstance(mod, nn.Identity):
            return mod
    raise ExplainError(f"no module of {type(model).__name__} produces its feature map {target}")


class Explainer:
    """Grad-CAM maps for a loaded model; the target layer is found once and kept."""

    def __init__(self, loaded: ExplainableModel, target_layer: nn.Module | None = None) -> None:
        if getattr(loaded, "model", None) is None:
            raise ExplainError("Grad-CAM needs the PyTorch model (.pt artifact), not an ONNX file")
        self.loaded = loaded
        self.target_layer = target_layer or find_target_layer(
            loaded.model, int(loaded.spec.in_chans), min(int(loaded.size), 128)
        )

    def cams(self, images: np.ndarray, classes: Sequence[int] | int | None = None) -> np.ndarray:
        """Maps in [0, 1] at the input size, ``(N, H, W)``; ``classes`` defaults to the positive class."""
        import torch
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        arr = np.asarray(images)
        if arr.ndim == 2:
            arr = arr[None]
        n = len(arr)
        if classes is None:
            classes = [int(self.loaded.spec.positive_class)] * n
        elif isinstance(classes, int):
            classes = [classes] * n
        x = self.loaded.to_tensor(arr)
        model = self.loaded.model
        device = next(model.parameters()).device
        with torch.inference_mode(False), torch.enable_grad():
            with GradCAM(model=model, target_layers=[self.target_layer]) as cam:
                maps = cam(input_tensor=x.to(device).clone(),
                           targets=[ClassifierOutputTarget(int(c)) for c in classes])
        maps = np.nan_to_num(np.asarray(maps, dtype=np.float32))
        clipped: np.ndarray = np.clip(maps, 0.0, 1.0)
        return clipped


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """Jet heat map blended on the grey image: uint8 RGB ``(H, W, 3)``; red = most attention."""
    import cv2
    from pytorch_grad_cam.utils.image import show_cam_on_image

    img = np.asarray(image, dtype=np.float32)
    if img.max() > 1.0:
        img = img / 255.0
    rgb = np.repeat(img[..., None], 3, axis=2)
    cam = np.asarray(cam, dtype=np.float32)
    if cam.shape != img.shape:
        cam = cv2.resize(cam, (img.shape[1], img.shape[0]), interpolation=cv2.INTER_LINEAR)
    blended: np.ndarray = show_cam_on_image(rgb, np.clip(cam, 0, 1), use_rgb=True, image_weight=1.0 - alpha)
    return blended


def save_png(path: str | os.PathLike[str], rgb: np.ndarray) -> Path:
    """Atomic PNG write (temp file + rename) so a killed run never leaves half an image."""
    from PIL import Image

    dest = Path(path)
    with atomic_open(dest, "wb") as fh:
        Image.fromarray(np.asarray(rgb, dtype=np.uint8)).save(fh, format="PNG")
    return dest
