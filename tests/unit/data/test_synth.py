"""Synthetic BraTS-like cases: determinism, layouts, label conventions and MRI-like contrast."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.config import CHANNELS
from medseg.core.errors import InvalidInput
from medseg.data.synth import make_case, synthesize, write_dataset
from tests.conftest import SHAPE


def test_deterministic() -> None:
    a, b = make_case(3, SHAPE, seed=1), make_case(3, SHAPE, seed=1)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.enhancing, b.enhancing)
    assert not np.array_equal(a.image, make_case(3, SHAPE, seed=2).image)


@pytest.mark.parametrize("index", range(6))
def test_tumour_has_three_regions_inside_the_brain(index: int) -> None:
    case = make_case(index, SHAPE, seed=0)
    brain = case.image[0] > 0
    for region in (case.necrosis, case.oedema, case.enhancing):
        assert region.sum() > 0
        assert not (region & ~brain).any()
    assert not (case.necrosis & case.enhancing).any()


def test_contrast_differs_per_modality_like_mri() -> None:
    c = make_case(1, (64, 64, 48), seed=0)
    ch = {name: c.image[i] for i, name in enumerate(CHANNELS)}
    healthy = (c.image[0] > 0) & ~(c.necrosis | c.oedema | c.enhancing)

    def mean(channel: str, mask: np.ndarray) -> float:
        return float(ch[channel][mask].mean())

    assert mean("flair", c.oedema) > 1.5 * mean("flair", healthy)  # oedema bright on FLAIR
    assert mean("t2", c.oedema) > 1.3 * mean("t2", healthy)  # ... and on T2
    assert mean("t1gd", c.enhancing) > 1.4 * mean("t1gd", healthy)  # enhancing rim on T1Gd
    assert mean("t1gd", c.necrosis) < 0.6 * mean("t1gd", healthy)  # necrotic core dark on T1Gd


def test_sizes_and_positions_vary() -> None:
    cases = [make_case(i, SHAPE, seed=0) for i in range(8)]
    volumes = [int((c.necrosis | c.oedema | c.enhancing).sum()) for c in cases]
    centres = [np.argwhere(c.oedema | c.enhancing).mean(axis=0) for c in cases]
    assert max(volumes) > 2 * min(volumes)
    assert np.ptp(np.stack(centres), axis=0).max() > 5


def test_brats2021_layout(synth_root: Path) -> None:
    root = synth_root / "brats2021"
    folders = sorted(p.name for p in root.iterdir())
    assert folders == [f"BraTS2021_{i:05d}" for i in range(6)]
    names = sorted(p.name for p in (root / "BraTS2021_00000").iterdir())
    assert names == [f"BraTS2021_00000_{s}.nii.gz" for s in ("flair", "seg", "t1", "t1ce", "t2")]
    seg = np.asarray(nib.load(root / "BraTS2021_00000" / "BraTS2021_00000_seg.nii.gz").dataobj)
    assert set(np.unique(seg).tolist()) == {0, 1, 2, 4}


def test_brats2023_layout(synth_root: Path) -> None:
    case = synth_root / "brats2023" / "BraTS-GLI-00000-000"
    names = sorted(p.name for p in case.iterdir())
    assert names == [f"BraTS-GLI-00000-000-{s}.nii.gz" for s in ("seg", "t1c", "t1n", "t2f", "t2w")]
    seg = np.asarray(nib.load(case / "BraTS-GLI-00000-000-seg.nii.gz").dataobj)
    assert set(np.unique(seg).tolist()) == {0, 1, 2, 3}


def test_msd_layout(synth_root: Path) -> None:
    root = synth_root / "msd"
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["modality"] == {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
    assert len(meta["training"]) == 6
    img = nib.load(root / "imagesTr" / "BRATS_001.nii.gz")
    assert img.shape == (*SHAPE, 4)
    seg = np.asarray(nib.load(root / "labelsTr" / "BRATS_001.nii.gz").dataobj)
    assert set(np.unique(seg).tolist()) == {0, 1, 2, 3}


def test_orientation_and_spacing_variants(synth_root: Path) -> None:
    def t1(i: int) -> nib.Nifti1Image:
        return nib.load(
            synth_root / "brats2021" / f"BraTS2021_{i:05d}" / f"BraTS2021_{i:05d}_t1.nii.gz"
        )

    assert nib.aff2axcodes(t1(0).affine) == ("R", "A", "S")
    assert nib.aff2axcodes(t1(3).affine) == ("L", "P", "S")
    assert t1(4).header.get_zooms() == (1.0, 1.0, 1.5)
    assert t1(4).shape[2] == round(SHAPE[2] / 1.5)


def test_full_size_shape_on_request(tmp_path: Path) -> None:
    write_dataset(tmp_path, "brats2021", n_cases=1, shape=(240, 240, 155))
    assert nib.load(tmp_path / "BraTS2021_00000" / "BraTS2021_00000_flair.nii.gz").shape == (
        240,
        240,
        155,
    )


@pytest.mark.parametrize(
    ("layout", "fmt", "message"),
    [("brats2019", "nifti", "unknown layout 'brats2019'"), ("msd", "png", "unknown format 'png'")],
)
def test_synthesize_refuses_unknown_layouts_and_formats_before_writing(
    tmp_path: Path, layout: str, fmt: str, message: str
) -> None:
    with pytest.raises(InvalidInput, match=message):
        synthesize(tmp_path / "out", layout, 1, SHAPE, fmt=fmt)
    assert not (tmp_path / "out").exists()


def test_synthesize_writes_the_layout_asked_for(tmp_path: Path) -> None:
    ids = synthesize(tmp_path / "msd", "msd", 2, SHAPE)
    assert ids == write_dataset(tmp_path / "again", "msd", 2, SHAPE)
    assert sorted(p.name for p in (tmp_path / "msd" / "imagesTr").iterdir()) == sorted(
        f"{i}.nii.gz" for i in ids
    )
