"""One folder walker: screen's inputs and the cohort's image scan pick the same files of a tree."""

from __future__ import annotations

import os
from pathlib import Path

from _service_support import make_cxr_bytes

from bonescreen.cohort import scan_images
from bonescreen.io import iter_image_files
from bonescreen.screen.inputs import iter_inputs
from bonescreen.walk import walk_files


def _tree(root: Path) -> Path:
    dcm = make_cxr_bytes()
    (root / "a").mkdir(parents=True)
    (root / ".git").mkdir()
    for rel in ("a/x.dcm", "a-b.dcm", "b.dcm", "noext_dicom", ".hidden.dcm", ".git/y.dcm"):
        (root / rel).write_bytes(dcm)
    (root / "notes.txt").write_text("not an image")
    (root / "noext_junk").write_text("not DICOM either")
    (root / "DICOMDIR").write_bytes(dcm)
    os.symlink(root / "a" / "x.dcm", root / "link_file.dcm")  # the same image twice
    os.symlink(root / "a", root / "link_dir")  # a folder link: not followed
    os.symlink(root / "missing.dcm", root / "dangling.dcm")
    return root


def test_walk_files_rules(tmp_path: Path) -> None:
    root = _tree(tmp_path / "t")
    got = [p.relative_to(root).as_posix() for p in walk_files(root)]
    # hidden names, the folder link and the dangling link are left out; Path order (per level)
    assert got == ["DICOMDIR", "a/x.dcm", "a-b.dcm", "b.dcm", "link_file.dcm", "noext_dicom", "noext_junk",
                   "notes.txt"]
    assert [p.name for p in walk_files(root, recursive=False)] == [g for g in got if "/" not in g]
    assert "a/x.dcm" not in [p.relative_to(root).as_posix() for p in walk_files(root, exclude=[root / "link_dir"])]


def test_screen_and_cohort_pick_the_same_files(tmp_path: Path) -> None:
    root = _tree(tmp_path / "t")
    screen = [Path(i.path).relative_to(root).as_posix() for i in iter_inputs([root])]
    images = [p.relative_to(root).as_posix() for p in iter_image_files(root)]
    cohort = [Path(p).relative_to(root).as_posix() for p in scan_images([root], progress=False)["path"]]
    # the same images in the same order; the link to a/x.dcm is that image once, under its first name
    assert images == cohort == ["a/x.dcm", "a-b.dcm", "b.dcm", "noext_dicom"]
    assert [s for s in screen if s in images] == images
    # screen also gives the non-images a row (each becomes a recorded skip); nothing else differs
    assert set(screen) - set(images) == {"DICOMDIR", "noext_junk", "notes.txt"}
    assert images == sorted(images, key=Path)
