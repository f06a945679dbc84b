"""ONNX export: parity with PyTorch within 1e-4, dynamic batch, refusal of foreign files, int8 copy."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from _screen_helpers import make_artifact, radiograph

from bonescreen.errors import ModelArtifactError


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from bonescreen.artifact import load_artifact
    from bonescreen.onnx_export import export_onnx

    d = tmp_path_factory.mktemp("onnx")
    pt = make_artifact(d / "m.pt", "stage2", size=64, seed=3)
    return pt, export_onnx(load_artifact(pt), d / "m.onnx")


def test_parity_with_torch_on_a_test_batch(exported: tuple[Path, Path]) -> None:
    from bonescreen.artifact import load_artifact
    from bonescreen.onnx_export import load_onnx

    pt, onnx_path = exported
    torch_model, ort_model = load_artifact(pt), load_onnx(onnx_path, expected_task="stage2")
    assert ort_model.spec.task == "stage2" and ort_model.size == 64
    rng = np.random.default_rng(1)
    for n in (1, 5, 16):  # the batch axis is dynamic
        batch = rng.integers(0, 256, (n, 64, 64), dtype=np.uint8)
        p_ort, p_pt = ort_model.predict_proba(batch), torch_model.predict_proba(batch)
        assert p_ort.shape == (n, 2)
        assert np.abs(p_ort - p_pt).max() < 1e-4
    assert np.ptp(p_pt[:, 1]) > 1e-3  # the batch really exercises the model (scores differ)


def test_foreign_or_mismatched_onnx_is_refused(tmp_path: Path, exported: tuple[Path, Path]) -> None:
    import onnx

    from bonescreen.onnx_export import load_onnx

    _, onnx_path = exported
    with pytest.raises(ModelArtifactError, match="'stage1' model was expected"):
        load_onnx(onnx_path, expected_task="stage1")
    proto = onnx.load(str(onnx_path))
    del proto.metadata_props[:]
    foreign = tmp_path / "foreign.onnx"
    onnx.save(proto, str(foreign))
    with pytest.raises(ModelArtifactError, match="not one written by"):
        load_onnx(foreign)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(ModelArtifactError):
        load_onnx(junk)


def test_screen_onnx_backend_matches_torch(tmp_path: Path, exported: tuple[Path, Path], write_dicom) -> None:  # type: ignore[no-untyped-def]
    from bonescreen.cli import main
    from bonescreen.screen import ScreenOptions, screen

    pt, onnx_path = exported
    for i in range(5):
        write_dicom(radiograph(i), name=f"in/a{i}.dcm")
    screen([tmp_path / "in"], pt, tmp_path / "t", options=ScreenOptions(progress=False))
    screen([tmp_path / "in"], pt, tmp_path / "o", backend="onnx", options=ScreenOptions(progress=False))
    # a bare .onnx carries no OOD statistics: refused, unless the opt-out is explicit
    assert main(["screen", str(tmp_path / "in"), "--model", str(onnx_path), "--backend", "onnx", "--out",
                 str(tmp_path / "o3"), "--no-progress"]) == 1
    assert main(["screen", str(tmp_path / "in"), "--model", str(onnx_path), "--backend", "onnx", "--out",
                 str(tmp_path / "o2"), "--no-progress", "--ood", "off"]) == 0
    # an .onnx file without --backend onnx is a clear error
    with pytest.raises(ModelArtifactError, match="--backend onnx"):
        screen([tmp_path / "in"], onnx_path, tmp_path / "x", options=ScreenOptions(progress=False))

    def scores(out: str) -> dict[str, float]:
        return {r["path"]: float(r["score"]) for r in csv.DictReader(open(tmp_path / out / "results.csv"))}

    t, o, o2 = scores("t"), scores("o"), scores("o2")
    assert t.keys() == o.keys() == o2.keys() and len(t) == 5
    assert max(abs(t[k] - o[k]) for k in t) < 1e-4 and max(abs(t[k] - o2[k]) for k in t) < 1e-4
    # the .pt with --backend onnx keeps the OOD check: onnxruntime's features give torch's OOD scores
    ood = {out: {r["path"]: float(r["ood_score"]) for r in csv.DictReader(open(tmp_path / out / "results.csv"))}
           for out in ("t", "o")}
    assert max(abs(ood["t"][k] - ood["o"][k]) for k in t) < 1e-3
    backends = {r["backend"] for r in csv.DictReader(open(tmp_path / "o" / "results.csv"))}
    assert backends == {"onnx"}


def test_export_command_and_int8_copy(tmp_path: Path, exported: tuple[Path, Path]) -> None:
    from bonescreen.artifact import load_artifact
    from bonescreen.cli import main
    from bonescreen.onnx_export import load_onnx, quantize_onnx

    pt, onnx_path = exported
    out = tmp_path / "cli.onnx"
    assert main(["export", str(pt), "--out", str(out)]) == 0
    assert load_onnx(out).metadata["source_model"].startswith("m.pt@")
    rng = np.random.default_rng(2)
    calib = rng.integers(0, 256, (8, 64, 64), dtype=np.uint8)
    q = quantize_onnx(onnx_path, tmp_path / "m.int8.onnx", mode="static", calibration=calib)
    qm = load_onnx(q)
    batch = rng.integers(0, 256, (4, 64, 64), dtype=np.uint8)
    p_q, p_t = qm.predict_proba(batch), load_artifact(pt).predict_proba(batch)
    assert qm.metadata["quantization"] == "static" and p_q.shape == (4, 2)
    assert np.allclose(p_q.sum(axis=1), 1, atol=1e-5) and np.abs(p_q - p_t).max() < 0.2
    with pytest.raises(ValueError, match="calibration"):
        quantize_onnx(onnx_path, tmp_path / "x.onnx", mode="static")


def test_screen_bf16_backend_close_to_fp32(tmp_path: Path, exported: tuple[Path, Path], write_dicom) -> None:  # type: ignore[no-untyped-def]
    """--backend torch-bf16 runs the same model under bf16 autocast: same rows, scores within bf16 rounding."""
    from bonescreen.cli import main

    pt, _ = exported
    for i in range(5):
        write_dicom(radiograph(i), name=f"in/a{i}.dcm")
    for backend, out in (("torch", "t"), ("torch-bf16", "b")):
        assert main(["screen", str(tmp_path / "in"), "--model", str(pt), "--backend", backend, "--out",
                     str(tmp_path / out), "--no-progress"]) == 0

    def rows(out: str) -> dict[str, dict[str, str]]:
        return {r["path"]: r for r in csv.DictReader(open(tmp_path / out / "results.csv"))}

    t, b = rows("t"), rows("b")
    assert t.keys() == b.keys() and len(t) == 5
    diffs = [abs(float(t[k]["score"]) - float(b[k]["score"])) for k in t]
    assert max(diffs) < 0.02  # bf16 keeps 8 mantissa bits
    assert max(diffs) > 0.0  # and it really ran in bf16
    assert {r["backend"] for r in b.values()} == {"torch-bf16"}
