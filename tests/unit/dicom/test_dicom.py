"""DICOM MR studies read into the canonical case: geometry, channels, variants, bad studies."""

from __future__ import annotations

import re
import shutil
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydantic
import pydicom
import pytest
from typer.testing import CliRunner

from medseg.cli import app
from medseg.config import CHANNELS
from medseg.core.storage import Storage, join
from medseg.data.layouts import SUFFIXES
from medseg.data.synth import DICOM_DESCRIPTIONS, dicom_variant, make_case, write_dicom_dataset
from medseg.dicom.series import (
    ChannelRule,
    DicomStudyError,
    SeriesRules,
    StudyInfo,
    read_study,
    write_series,
)
from tests.conftest import SHAPE

SEED = 7


@pytest.fixture(scope="session")
def dicom_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six synthetic DICOM studies (read-only: copy to modify)."""
    root = tmp_path_factory.mktemp("dicom")
    write_dicom_dataset(root, n_cases=6, shape=SHAPE, seed=SEED)
    return root


def _copy(dicom_root: Path, case: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(dicom_root / case, tmp_path / case))


@pytest.mark.parametrize(
    ("index", "what"),
    [(1, "oblique"), (2, "T2 numbered against slice order"), (3, "LPS"), (4, "thick slices")],
)
def test_round_trip_gives_the_written_case(dicom_root: Path, index: int, what: str) -> None:
    v = dicom_variant(make_case(index, SHAPE, SEED), index)
    study = read_study(dicom_root / v.case_id)
    assert study.image.dtype == np.float32 and study.image.shape == (4, *v.image.shape[1:])
    # Every channel exactly (FLAIR is stored with slope 0.5 / intercept -100: applied).
    np.testing.assert_array_equal(study.image, v.image.astype(np.float32))
    np.testing.assert_allclose(study.affine, v.affine, atol=1e-5)
    assert study.resampled == []
    if index == 1:
        assert not np.allclose(np.abs(v.affine[:3, :3]), np.eye(3), atol=0.1)  # really oblique


def test_same_case_as_the_nifti_path(dicom_root: Path, synth_root: Path) -> None:
    """NIfTI (brats2021, LPS variant) and DICOM of the same case give the same array and affine."""
    case_id = "BraTS2021_00003"
    files = [
        synth_root / "brats2021" / case_id / f"{case_id}{SUFFIXES['brats2021'][c]}.nii.gz"
        for c in CHANNELS
    ]
    imgs = [nib.load(f) for f in files]
    nifti = np.stack([np.asarray(i.dataobj, dtype=np.float32) for i in imgs])
    study = read_study(dicom_root / "DICOM_00003")
    np.testing.assert_array_equal(study.image, nifti)
    np.testing.assert_allclose(study.affine, imgs[0].affine, atol=1e-5)


def test_reversed_instance_numbers_and_file_names_do_not_order_slices(
    dicom_root: Path, tmp_path: Path
) -> None:
    folder = _copy(dicom_root, "DICOM_00002", tmp_path)
    t2 = next(p for p in folder.iterdir() if p.name == "series03")
    files = sorted(t2.iterdir())
    first = pydicom.dcmread(files[0])
    assert first.SeriesDescription == DICOM_DESCRIPTIONS[2]["t2"]
    numbers = {int(pydicom.dcmread(f).InstanceNumber): f for f in files}
    positions = {n: float(pydicom.dcmread(f).ImagePositionPatient[2]) for n, f in numbers.items()}
    assert positions[1] > positions[len(files)]  # instance 1 is the top slice
    # Rename the files in instance order as well: still ordered by position.
    for n, f in numbers.items():
        f.rename(t2 / f"IM{n:04d}")
    v = dicom_variant(make_case(2, SHAPE, SEED), 2)
    np.testing.assert_array_equal(read_study(folder).image, v.image.astype(np.float32))


def test_series_on_another_grid_is_resampled_onto_the_reference(dicom_root: Path) -> None:
    v = dicom_variant(make_case(0, SHAPE, SEED), 0)
    assert v.other_grid == "flair"
    study = read_study(dicom_root / v.case_id)
    assert study.resampled == ["flair"]
    flair = study.image[CHANNELS.index("flair")]
    truth = v.image[CHANNELS.index("flair")].astype(np.float32)
    # Written every second slice at 2 mm: those slices come back exactly, the ones between as
    # the linear interpolation of their neighbours.
    np.testing.assert_allclose(flair[:, :, ::2], truth[:, :, ::2], atol=1e-2)
    between = (truth[:, :, 0:-2:2] + truth[:, :, 2::2]) / 2
    np.testing.assert_allclose(flair[:, :, 1:-1:2], between, atol=1e-2)
    others = [c for c in CHANNELS if c != "flair"]
    for c in others:
        np.testing.assert_array_equal(study.image[CHANNELS.index(c)], v.image[CHANNELS.index(c)])


def test_missing_series_is_a_clear_error(dicom_root: Path) -> None:
    with pytest.raises(DicomStudyError) as err:
        read_study(dicom_root / "DICOM_00005")
    msg = str(err.value)
    assert "DICOM_00005" in msg and "no series for channel 'flair'" in msg
    for description in ("t1n", "t1c", "t2w"):  # what was found is listed
        assert f"SeriesDescription {description!r}" in msg


def test_ambiguous_series_is_a_clear_error(dicom_root: Path, tmp_path: Path) -> None:
    folder = _copy(dicom_root, "DICOM_00000", tmp_path)
    v = dicom_variant(make_case(0, SHAPE, SEED), 0)
    study_uid = pydicom.dcmread(next((folder / "series01").iterdir())).StudyInstanceUID
    study = StudyInfo("SYNTH-00000", study_uid=study_uid)
    write_series(v.image[0], v.affine, folder / "repeat", study, "AX T1 SE repeat", 9)
    with pytest.raises(
        DicomStudyError, match="channel 't1' is ambiguous: 'AX T1 SE', 'AX T1 SE repeat'"
    ):
        read_study(folder)


def test_configured_rules_map_other_names(dicom_root: Path, tmp_path: Path) -> None:
    folder = _copy(dicom_root, "DICOM_00002", tmp_path)  # t1n, t1c, t2w, t2f
    names = {"t1n": "SEQ A", "t1c": "SEQ B", "t2w": "SEQ C", "t2f": "SEQ D"}
    for f in folder.rglob("*.dcm"):
        ds = pydicom.dcmread(f)
        ds.SeriesDescription = ds.ProtocolName = names[ds.SeriesDescription]
        ds.save_as(f)
    with pytest.raises(DicomStudyError, match="no series for channel 't1'"):
        read_study(folder)
    rules = SeriesRules(
        channels={
            c: ChannelRule(include=(rf"^seq {letter}$",))
            for c, letter in zip(CHANNELS, "abcd", strict=True)
        },
        reference="t2",
    )
    v = dicom_variant(make_case(2, SHAPE, SEED), 2)
    np.testing.assert_array_equal(read_study(folder, rules).image, v.image.astype(np.float32))


def test_rules_are_validated() -> None:
    with pytest.raises(pydantic.ValidationError, match="each channel"):
        SeriesRules(channels={"t1": ChannelRule(include=("t1",))})
    with pytest.raises(pydantic.ValidationError, match="not a regular expression"):
        ChannelRule(include=("t1(",))
    with pytest.raises(pydantic.ValidationError, match="reference"):
        SeriesRules(reference="pd")


@pytest.mark.parametrize(
    ("description", "channel"),
    [
        ("AX T1 SE", "t1"),
        ("T1_MPRAGE_SAG", "t1"),
        ("t1n", "t1"),
        ("T1W_3D_TFE", "t1"),
        ("AX T1 POST GAD", "t1gd"),
        ("T1_MPRAGE_SAG+C", "t1gd"),
        ("t1c", "t1gd"),
        ("T1CE", "t1gd"),
        ("AX T1 +C", "t1gd"),
        ("t2_tse_tra", "t2"),
        ("T2W_TSE", "t2"),
        ("t2w", "t2"),
        ("AX T2 FLAIR", "flair"),
        ("t2_tirm_tra_dark-fluid", "flair"),
        ("t2f", "flair"),
    ],
)
def test_default_rules_name_each_scanner_description_once(description: str, channel: str) -> None:
    rules = SeriesRules()
    assert [c for c in CHANNELS if rules.channels[c].matches(description)] == [channel]


def test_zip_and_bucket_prefix_read_like_the_folder(
    dicom_root: Path, storage: Storage, bucket: str, tmp_path: Path
) -> None:
    folder = dicom_root / "DICOM_00001"
    expected = read_study(folder)
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                zf.write(f, f.relative_to(folder).as_posix())
    for source in (archive, join(bucket, "upload", "study.zip")):
        if str(source).startswith("s3://"):
            storage.put_file(str(source), archive)
        got = read_study(source, storage=storage)
        np.testing.assert_array_equal(got.image, expected.image)
        np.testing.assert_array_equal(got.affine, expected.affine)
    prefix = join(bucket, "studies", "one")
    for f in folder.rglob("*"):
        if f.is_file():
            storage.put_file(join(prefix, f.relative_to(folder).as_posix()), f)
    got = read_study(prefix, storage=storage)
    np.testing.assert_array_equal(got.image, expected.image)
    assert got.series_uids == expected.series_uids


@pytest.mark.parametrize("keep", [400, -100])
def test_truncated_file_is_named(dicom_root: Path, tmp_path: Path, keep: int) -> None:
    folder = _copy(dicom_root, "DICOM_00001", tmp_path)
    victim = sorted((folder / "series02").iterdir())[3]
    victim.write_bytes(victim.read_bytes()[:keep])
    with pytest.raises(DicomStudyError, match=re.escape(victim.name)):
        read_study(folder)


def test_missing_slice_is_a_clear_error(dicom_root: Path, tmp_path: Path) -> None:
    folder = _copy(dicom_root, "DICOM_00001", tmp_path)
    files = sorted((folder / "series04").iterdir(), key=lambda f: pydicom.dcmread(f).InstanceNumber)
    files[10].unlink()
    with pytest.raises(DicomStudyError, match="t2_tirm_tra_dark-fluid") as err:
        read_study(folder)
    assert "not regularly spaced" in str(err.value)


def test_multi_frame_images_are_refused_by_name(dicom_root: Path, tmp_path: Path) -> None:
    folder = _copy(dicom_root, "DICOM_00001", tmp_path)
    victim = sorted((folder / "series01").iterdir())[0]
    ds = pydicom.dcmread(victim)
    ds.NumberOfFrames = 2
    ds.save_as(victim)
    with pytest.raises(DicomStudyError, match=rf"{re.escape(victim.name)} is a multi-frame"):
        read_study(folder)


def test_not_a_study(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(DicomStudyError, match="no DICOM image series"):
        read_study(tmp_path)
    with pytest.raises(DicomStudyError, match="no such folder"):
        read_study(tmp_path / "absent")
    (tmp_path / "bad.zip").write_bytes(b"PK not really")
    with pytest.raises(DicomStudyError, match="not a zip archive"):
        read_study(tmp_path / "bad.zip")


def test_write_series_refuses_a_sheared_plane(tmp_path: Path) -> None:
    affine = np.eye(4)
    affine[0, 1] = 0.5
    with pytest.raises(ValueError, match="not orthogonal"):
        write_series(np.zeros((4, 4, 2)), affine, tmp_path, StudyInfo("P"), "T1", 1)


def test_synth_cli_writes_dicom_studies(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["synth", str(tmp_path), "--format", "dicom", "--cases", "2", "--shape", "16", "16", "8"],
    )
    assert result.exit_code == 0, result.output
    assert "wrote 2 DICOM studies (brats2021 labels)" in result.output
    first = next((tmp_path / "DICOM_00000" / "series01").iterdir())
    ds = pydicom.dcmread(first)
    assert ds.SOPClassUID == pydicom.uid.MRImageStorage and ds.Modality == "MR"
    assert read_study(tmp_path / "DICOM_00001").image.shape == (4, 16, 16, 8)
    label = nib.load(tmp_path / "DICOM_00001" / "DICOM_00001_seg.nii.gz")
    assert label.shape == (16, 16, 8)
    bad = CliRunner().invoke(app, ["synth", str(tmp_path / "x"), "--format", "png"])
    assert bad.exit_code != 0 and "unknown format 'png'" in bad.output


def test_a_member_that_lies_about_its_size_is_refused_at_bounded_memory() -> None:
    """A member declaring 1000 bytes stops inflating just past them, not at its real 64 MiB."""
    import tracemalloc

    from medseg.core.settings import ServerLimits
    from tests.unit.model_server.test_dicom_serving import _bomb

    bomb = _bomb(64, declared_small=True)
    tracemalloc.start()
    try:
        with pytest.raises(DicomStudyError, match=r"IM0001\.dcm cannot be unzipped"):
            read_study(bomb, limits=ServerLimits())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, f"{peak / 2**20:.0f} MiB traced while refusing the member"
