"""``bonescreen screen``: score every eligible chest radiograph; a row (or a reason) per image."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_gate_arguments(p: argparse.ArgumentParser) -> None:
    """Eligibility overrides shared by ``screen`` and ``explain``."""
    g = p.add_argument_group("eligibility (defaults come from the model artifact)")
    g.add_argument("--min-age", type=float, help="youngest eligible age in years")
    g.add_argument("--max-age", type=float, help="oldest eligible age in years")
    g.add_argument("--modalities", help="comma-separated eligible modalities (default CR,DX)")
    g.add_argument("--views", help="comma-separated eligible views (default PA,AP)")
    g.add_argument(
        "--allow-unknown", default="", metavar="FACTS",
        help="comma-separated facts whose absence does not refuse an image: age, view, modality "
        "(default: refuse images whose age/view/modality is not recorded)",
    )
    g.add_argument("--min-size", type=int, help="smallest eligible image side in pixels (default 256)")
    g.add_argument("--require-body-part", action="store_true",
                   help="refuse images whose header names no imaged region (body_part_unknown); by default "
                        "they go on to the content checks. Headers naming a non-chest region are always refused "
                        "(wrong_body_part)")
    g.add_argument("--no-lung-check", action="store_true",
                   help="skip the model-free lung-field check (no_lung_fields), e.g. for an archive of "
                        "cropped or unusual but known chest images")
    g.add_argument("--ood", choices=["refuse", "flag", "off"], default="refuse",
                   help="out-of-distribution check on the model's features: refuse images above the model's "
                        "threshold (default), flag them but still score, or off (explicit opt-out, recorded in "
                        "run.json and every row; needed for models without an OOD part)")


def gate_overrides(args: argparse.Namespace) -> dict[str, Any]:
    def split(v: str | None) -> list[str] | None:
        return [x.strip() for x in v.split(",") if x.strip()] if v else None

    return {
        "min_age": args.min_age,
        "max_age": args.max_age,
        "modalities": split(args.modalities),
        "views": split(args.views),
        "allow_unknown": split(args.allow_unknown),
        "min_size": args.min_size,
        "require_body_part": True if args.require_body_part else None,
        "lung_fields": False if args.no_lung_check else None,
    }


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from bonescreen.screen.models import BACKENDS

    p = sub.add_parser(
        "screen",
        help="screen chest radiographs: score, category and flag per image (resumable)",
        description=(
            "Screen DICOM/PNG/JPEG chest radiographs. INPUT is a file, a folder (searched "
            "recursively; every file gets a row) or a manifest CSV with a 'path' column (and "
            "optional image_id, site, sex, age, view, modality, patient_id). Writes "
            "OUT/results.csv and OUT/results.jsonl (one row per image: score(s), category, flag, "
            "or the reason it was skipped), OUT/studies.csv (one row per study: the highest-risk eligible "
            "image decides), OUT/predictions.csv (for `bonescreen evaluate`) and "
            "OUT/summary.json. Re-running with the same OUT skips images that already have a row. "
            "A pediatric model (BMD Z-score from the image + age, sex, height, weight) gives "
            "category low_bmd (predicted Z <= -2.0) or normal_bmd, score = P(Z <= -2.0) and "
            "pred_z/pred_bmd columns. "
            "Exit status 0 when at least one image was screened."
        ),
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or manifest CSVs")
    p.add_argument("--model", required=True, metavar="PT|ONNX",
                   help="stage-2 (normal vs low bone mass), three-class, stage-1 or pediatric model artifact")
    p.add_argument("--clinical", metavar="CSV",
                   help="pediatric models: height_cm/weight_kg (optional age, sex, study_date) keyed by image_id "
                        "or patient_id, for images whose DICOM header lacks PatientSize/PatientWeight")
    p.add_argument("--stage1", metavar="PT|ONNX", help="stage-1 osteoporosis model: runs first (cascade)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--backend", choices=["auto", *sorted(BACKENDS)], default="auto",
                   help="inference engine (README 'Backends per instruction set'): auto (default) picks by the "
                        "CPU's instruction set and a short timing probe, cached per model and machine; torch "
                        "(eager fp32), torch-channels-last, torch-bf16 (fast only on AVX512_BF16/AMX CPUs and "
                        "GPUs), onnx (onnxruntime), openvino (throughput hint) / openvino-latency, openvino-bf16, "
                        "onnx-int8 / openvino-int8 (need --calibration)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto (default): cuda when torch sees a GPU; cuda runs torch backends there (torch-bf16 "
                        "is AMP) and onnxruntime with its TensorRT/CUDA provider")
    p.add_argument("--compile", action="store_true",
                   help="torch backends: torch.compile the graph first (opt-in: minutes of compilation)")
    p.add_argument("--calibration", nargs="+", metavar="INPUT",
                   help="int8 backends and auto: eligible training images (files/folders/manifest; up to 64): "
                        "half calibrate the int8 copy, half check that it keeps the ranking")
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: one process (default); ray: a Ray Data pipeline (CPU tasks decode, an actor pool "
                        "predicts), a local Ray unless --ray-address")
    p.add_argument("--ray-address", metavar="auto|HOST:PORT",
                   help="--engine ray: join this Ray cluster (auto: the one `ray start` set up on this host)")
    p.add_argument("--ray-workers", type=int, metavar="N",
                   help="--engine ray: model replicas (actors); default 1 on CPUs, one per GPU on a GPU cluster")
    p.add_argument("--parquet", action="store_true",
                   help="also write OUT/parquet/part-*.parquet (the Ray engine always does)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=2,
                   help="threads (--engine ray: concurrent CPU tasks) decoding and preprocessing images")
    p.add_argument("--threads", type=int, help="inference threads (default: all cores)")
    p.add_argument("--threshold", type=float, help="stage-2 (or main model) cut-off; default the artifact's")
    p.add_argument("--site-profile", metavar="NAME",
                   help="decide with this site profile from the model artifact (`bonescreen calibrate` / "
                        "`bonescreen adapt`; list them with `bonescreen profiles MODEL`): its adaptation, cut-off, "
                        "site probability and abstain band (category indeterminate: consider DXA). Refused when "
                        "the profile was made for other weights; not combined with --threshold")
    p.add_argument("--stage1-threshold", type=float, help="stage-1 cut-off; default the artifact's")
    p.add_argument("--always-stage2", action="store_true",
                   help="run the stage-2 model also on images stage 1 flags (gives every row a score)")
    p.add_argument("--explain", action="store_true", help="write Grad-CAM overlays to OUT/overlays/")
    p.add_argument("--dicom-sr", action="store_true",
                   help="write one TID 1500 SR per screened study (referencing every image it used) to OUT/dicom/")
    p.add_argument("--dicom-sc", action="store_true",
                   help="write a secondary-capture DICOM of the Grad-CAM overlay to OUT/dicom/")
    p.add_argument("--site", help="site name recorded in every row (a manifest's site column wins)")
    p.add_argument("--include-patient-id", action="store_true",
                   help="write the raw PatientID (PHI); by default a keyed pseudonym (HMAC-SHA256) is written")
    p.add_argument("--pseudonym-key-file", metavar="FILE",
                   help="secret key for patient pseudonyms (default $BONESCREEN_PSEUDONYM_KEY_FILE, else "
                        "~/.config/bonescreen/pseudonym.key); generated (mode 0600) when missing")
    p.add_argument("--labels", metavar="CSV",
                   help="cohort manifest whose label columns are joined into OUT/predictions.csv")
    p.add_argument("--overwrite", action="store_true", help="discard earlier results in OUT")
    p.add_argument("--no-progress", action="store_true")
    add_gate_arguments(p)
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    from bonescreen.screen import ScreenOptions, screen

    opts = ScreenOptions(
        batch_size=args.batch_size, workers=args.workers, threshold=args.threshold,
        threshold_stage1=args.stage1_threshold, always_stage2=args.always_stage2,
        explain=args.explain, dicom_sr=args.dicom_sr, dicom_sc=args.dicom_sc, site=args.site,
        include_patient_id=args.include_patient_id, pseudonym_key_file=args.pseudonym_key_file, labels=args.labels,
        progress=not args.no_progress, overwrite=args.overwrite, gate=gate_overrides(args),
        clinical=args.clinical, ood=args.ood, device=args.device, compile=args.compile,
        calibration=args.calibration, write_parquet=args.parquet, site_profile=args.site_profile,
    )
    if args.engine == "ray":
        from bonescreen.screen.ray_run import ray_screen

        summary = ray_screen(args.inputs, args.model, args.out, stage1=args.stage1, backend=args.backend,
                             threads=args.threads, options=opts, ray_address=args.ray_address,
                             ray_workers=args.ray_workers)
    else:
        if args.ray_address or args.ray_workers:
            print("bonescreen screen: --ray-address/--ray-workers need --engine ray", file=sys.stderr)
            return 2
        summary = screen(args.inputs, args.model, args.out, stage1=args.stage1, backend=args.backend,
                         threads=args.threads, options=opts)
    print(summary.text())
    if summary.n_screened == 0:
        reasons = json.dumps(summary.reasons)
        print(f"bonescreen screen: nothing could be screened (reasons: {reasons})", file=sys.stderr)
        return 1
    return 0
