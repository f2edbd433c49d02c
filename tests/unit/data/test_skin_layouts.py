"""Dermoscopy layouts: detection, and the problems found while listing (no store needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from medseg.core.errors import DatasetError
from medseg.data.skin_layouts import detect_layout, discover_images


def _jpg(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.effect_noise((40, 40), 30).convert("RGB").save(path, "JPEG")


def _ham(root: Path, rows: list[str], files: list[str]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    lines = ["lesion_id,image_id,dx,dx_type,age,sex,localization", *rows]
    (root / "HAM10000_metadata.csv").write_text("\n".join(lines) + "\n")
    for name in files:
        _jpg(root / "HAM10000_images_part_1" / name)


def test_detection(tmp_path: Path) -> None:
    assert detect_layout(tmp_path / "none") is None
    _ham(tmp_path / "ham", [], [])
    assert detect_layout(tmp_path / "ham") == "ham10000"
    truth = tmp_path / "isic" / "ISIC2018_Task3_Training_GroundTruth"
    truth.mkdir(parents=True)
    (truth / "gt.csv").write_text("image,MEL,NV,BCC,AKIEC,BKL,DF,VASC\n")
    assert detect_layout(tmp_path / "isic") == "isic2018"
    _jpg(tmp_path / "tree" / "BCC" / "a.jpg")
    assert detect_layout(tmp_path / "tree") == "folders"
    _jpg(tmp_path / "brats" / "BraTS2021_00000" / "x.jpg")
    assert detect_layout(tmp_path / "brats") is None


def test_ham10000_listing_problems(tmp_path: Path) -> None:
    _ham(
        tmp_path,
        [
            "HAM_1,ISIC_1,nv,histo,40.0,male,back",
            "HAM_1,ISIC_2,NV,histo,40.0,male,back",  # dx in upper case: still nv
            "HAM_2,ISIC_3,mel,histo,50.0,female,face",
            "HAM_3,ISIC_3,mel,histo,50.0,female,face",
            "HAM_4,ISIC_4,mel,histo,50.0,female,face",
        ],
        ["ISIC_1.jpg", "ISIC_2.jpg", "ISIC_3.jpg"],
    )
    _jpg(tmp_path / "HAM10000_images_part_2" / "ISIC_2.jpg")
    found = {(r.image_id, r.group): r for r in discover_images(tmp_path, "ham10000")}
    assert found["ISIC_1", "HAM_1"].problem is None and found["ISIC_1", "HAM_1"].label == "nv"
    problem = found["ISIC_2", "HAM_1"].problem
    assert problem is not None and problem[1].startswith("ISIC_2 has several files: ")
    for lesion in ("HAM_2", "HAM_3"):
        assert found["ISIC_3", lesion].problem == (
            "HAM10000_metadata.csv",
            "ISIC_3 is listed twice in HAM10000_metadata.csv",
        )
    assert found["ISIC_4", "HAM_4"].problem == (
        "ISIC_4.jpg",
        "missing image: expected file ISIC_4.jpg in HAM10000_images_part_1/ or "
        "HAM10000_images_part_2/",
    )


def test_ham10000_without_its_columns_is_refused(tmp_path: Path) -> None:
    tmp_path.joinpath("HAM10000_metadata.csv").write_text("image,diagnosis\nISIC_1,nv\n")
    with pytest.raises(DatasetError, match="expected the columns lesion_id, image_id, dx"):
        discover_images(tmp_path, "ham10000")


def test_an_image_in_two_class_folders_is_refused(tmp_path: Path) -> None:
    _jpg(tmp_path / "nv" / "ISIC_1.jpg")
    _jpg(tmp_path / "mel" / "ISIC_1.jpg")
    _jpg(tmp_path / "mel" / "ISIC_2.jpg")
    found = discover_images(tmp_path, "folders")
    reasons = sorted((r.image_id, r.problem[1] if r.problem else None) for r in found)
    assert reasons == [
        ("ISIC_1", "ISIC_1 is in mel/, nv/"),
        ("ISIC_1", "ISIC_1 is in mel/, nv/"),
        ("ISIC_2", None),
    ]
