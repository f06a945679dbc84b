"""``bonescreen export``: a model artifact to ONNX (optionally int8) for fast CPU screening."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "export",
        help="export a model artifact to ONNX for `screen --backend onnx`",
        description=(
            "Write MODEL as ONNX (dynamic batch; normalisation and softmax inside the graph; the "
            "model description embedded), check that onnxruntime matches PyTorch on a random "
            "batch, and optionally write an int8-quantized copy."
        ),
    )
    p.add_argument("model", metavar="PT", help="model artifact (.pt)")
    p.add_argument("--out", metavar="ONNX", help="output file (default: MODEL with .onnx)")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest allowed |p_onnx - p_torch| on the check batch (default 1e-4)")
    p.add_argument("--quantize", choices=["static", "dynamic"],
                   help="also write an int8 copy (OUT with .int8.onnx); static needs --calibration")
    p.add_argument("--calibration", nargs="+", metavar="INPUT",
                   help="images/folders/manifest for static int8 calibration (eligible images, up to 64)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    import numpy as np

    from bonescreen.artifact import load_artifact
    from bonescreen.errors import BonescreenError
    from bonescreen.onnx_export import export_onnx, load_onnx, quantize_onnx
    from bonescreen.screen import model_id

    src = Path(args.model)
    loaded = load_artifact(src)
    out = Path(args.out) if args.out else src.with_suffix(".onnx")
    export_onnx(loaded, out, opset=args.opset, source_id=model_id(src))
    onnx_model = load_onnx(out)
    rng = np.random.default_rng(args.seed)
    batch = rng.integers(0, 256, size=(4, loaded.size, loaded.size), dtype=np.uint8)
    diff = float(np.abs(onnx_model.predict_proba(batch) - loaded.predict_proba(batch)).max())
    print(f"wrote {out}; max |onnxruntime - torch| on a random batch of 4 = {diff:.2e}")
    if diff > args.tolerance:
        raise BonescreenError(f"ONNX output differs from PyTorch by {diff:.2e} > {args.tolerance:g}",
                              reason="onnx_mismatch")
    if args.quantize:
        calib = None
        if args.quantize == "static":
            if not args.calibration:
                raise BonescreenError("--quantize static needs --calibration images", reason="bad_option")
            from bonescreen.screen.loading import calibration_images

            calib = calibration_images(args.calibration, loaded)
        q = quantize_onnx(out, out.with_suffix(".int8.onnx"), mode=args.quantize, calibration=calib)
        qd = float(np.abs(load_onnx(q).predict_proba(batch) - loaded.predict_proba(batch)).max())
        print(f"wrote {q} (int8 {args.quantize}); max |int8 - torch| on the random batch = {qd:.3f} "
              "(check AUC on labelled data before using it)")
    return 0
