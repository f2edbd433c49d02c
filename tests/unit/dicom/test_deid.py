"""De-identification: every attribute of the PS3.15 Annex E table, UIDs, dates, pseudonyms."""

from __future__ import annotations

import copy
import datetime as dt
import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset

from medseg.core.settings import DeidSettings
from medseg.core.storage import Storage, join
from medseg.data.synth import dicom_variant, make_case, write_dicom_dataset
from medseg.dicom.deid import Deidentifier, deidentify_study, profile_actions
from medseg.dicom.series import DicomStudyError, read_study

KEY = b"test-key-not-a-secret"
SHAPE = (16, 16, 6)
#: A value that looks like PHI for each VR the profile's attributes have.
_PHI: dict[str, object] = {
    "PN": "PHI^NAME",
    "LO": "PHI-lo",
    "SH": "PHI-sh",
    "LT": "PHI-lt",
    "ST": "PHI-st",
    "UT": "PHI-ut",
    "UC": "PHI-uc",
    "CS": "PHICS",
    "AE": "PHIAE",
    "UR": "http://phi.example",
    "DA": "20240105",
    "DT": "20240105101010",
    "TM": "101010",
    "UI": "1.2.3.999",
    "AS": "045Y",
    "DS": "1.5",
    "IS": "7",
    "US": 3,
    "UL": 3,
    "SS": 3,
    "SL": 3,
    "FL": 1.5,
    "FD": 1.5,
    "OB": b"PHI-ob",
    "OW": b"PHI-ow",
    "UN": b"PHI-un",
}


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("deid")
    write_dicom_dataset(root, n_cases=2, shape=SHAPE, seed=1)
    return root


def _first(studies: Path, case: str = "DICOM_00000") -> Dataset:
    return pydicom.dcmread(sorted((studies / case / "series01").iterdir())[0])


def _filled(ds: Dataset) -> tuple[Dataset, list[int]]:
    """``ds`` with every attribute of the profile's table set to a PHI-looking value."""
    filled = []
    for tag in profile_actions():
        if len(tag) != 2 or tag[0] in (0x0000, 0x0002):  # command set, file meta: not in a file
            continue
        number = (tag[0] << 16) | tag[1]
        try:
            vr = str(dictionary_VR(number))
        except KeyError:
            continue  # retired from pydicom's dictionary: it cannot be written
        if number in ds:
            filled.append(number)
        elif vr == "SQ":
            item = Dataset()
            item.PatientName = "PHI^IN^SEQUENCE"
            ds.add_new(number, vr, [item])
            filled.append(number)
        elif vr in _PHI:
            ds.add_new(number, vr, _PHI[vr])
            filled.append(number)
    ds.add_new(0x00091010, "LO", "PHI-private")
    return ds, filled


def test_every_attribute_of_the_profile_is_removed_emptied_or_replaced(studies: Path) -> None:
    ds, filled = _filled(_first(studies))
    assert len(filled) > 500  # the table has ~650 entries; this is nearly all of them
    original = copy.deepcopy(ds)
    Deidentifier(KEY).apply(ds)
    buf = io.BytesIO()
    ds.save_as(buf)
    assert b"PHI" not in buf.getvalue()  # no PHI-looking value left anywhere, nested or private
    assert b"SYNTH" not in buf.getvalue()  # nor the synthetic patient's name and ID
    kept = []
    for number in filled:
        before = original[number].value
        if number not in ds or not ds[number].value:
            continue  # removed (X) or emptied (Z)
        after = ds[number].value
        if after == before:
            kept.append(keyword_for_tag(number))
    assert kept == []
    assert ds.PatientIdentityRemoved == "YES"
    assert [c.CodeValue for c in ds.DeidentificationMethodCodeSequence] == [
        "113100",  # Basic Application Confidentiality Profile
        "113107",  # Retain Longitudinal Temporal Information Modified Dates Option
        "113105",  # Clean Descriptors Option
    ]


def test_uids_are_remapped_consistently_and_the_study_still_reads(
    studies: Path, tmp_path: Path
) -> None:
    out = tmp_path / "deid"
    before = read_study(studies / "DICOM_00000")
    channel_of = {uid: c for c, uid in before.series_uids.items()}
    deid = Deidentifier(KEY)
    for f in sorted((studies / "DICOM_00000").rglob("*.dcm")):
        ds = pydicom.dcmread(f)
        deid.apply(ds, description=channel_of[ds.SeriesInstanceUID])  # clean descriptors
        target = out / f.relative_to(studies / "DICOM_00000")
        target.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(target)
    after = read_study(out)
    np.testing.assert_array_equal(after.image, before.image)
    np.testing.assert_allclose(after.affine, before.affine)
    # Same old UID, same new UID: series, study, frame of reference and file meta agree.
    assert after.series_uids == {c: deid.uid(u) for c, u in before.series_uids.items()}
    assert after.study_uid == deid.uid(before.study_uid)
    for old, new in zip(before.reference, after.reference, strict=True):
        assert new.SOPInstanceUID == deid.uid(old.SOPInstanceUID) != old.SOPInstanceUID
        assert new.file_meta.MediaStorageSOPInstanceUID == new.SOPInstanceUID
        assert new.FrameOfReferenceUID == deid.uid(old.FrameOfReferenceUID)
        assert new.PatientID == new.PatientName == deid.pseudonym(str(old.PatientID))
    # Another key, other UIDs: nothing maps back without the key.
    assert Deidentifier(b"other").uid(before.study_uid) != after.study_uid


def test_dates_shift_by_whole_days_per_patient(studies: Path) -> None:
    deid = Deidentifier(KEY)
    shifts = []
    for case in ("DICOM_00000", "DICOM_00001"):
        ds = _first(studies, case)
        original = copy.deepcopy(ds)
        deid.apply(ds)
        days = deid.shift_days(str(original.PatientID))
        assert 365 <= days < 365 + 3650
        for keyword in ("StudyDate", "SeriesDate", "ContentDate", "PatientBirthDate"):
            old = dt.datetime.strptime(original.get(keyword), "%Y%m%d").date()
            new = dt.datetime.strptime(ds.get(keyword), "%Y%m%d").date()
            assert (old - new).days == days, keyword  # intervals within a patient survive
        shifts.append(days)
    assert shifts[0] != shifts[1]  # per patient, not one global offset


def test_key_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDSEG_DEID_KEY", "s3cret")
    settings = DeidSettings()
    assert settings.key is not None and settings.key.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings)


def test_variant_study_is_what_synth_wrote(studies: Path) -> None:
    """The fixture's studies are the synthetic variants (guards the other tests' inputs)."""
    v = dicom_variant(make_case(0, SHAPE, 1), 0)
    assert _first(studies).SeriesDescription == v.descriptions["t1"]


def test_deidentify_study_into_the_bucket(tmp_path: Path, storage: Storage, bucket: str) -> None:
    root = tmp_path / "studies"
    write_dicom_dataset(root, n_cases=6, shape=SHAPE, seed=1)  # case 5 lacks its FLAIR series
    before = read_study(root / "DICOM_00001")
    dest = join(bucket, "staging", "DICOM_00001")
    study_uid = deidentify_study(root / "DICOM_00001", dest, KEY, storage=storage)
    assert study_uid == Deidentifier(KEY).uid(before.study_uid)
    objects = list(storage.list(dest))
    assert len(objects) == len(list((root / "DICOM_00001").rglob("*.dcm")))
    for obj in objects:
        data = storage.get_bytes(obj.uri)
        assert b"SYNTH" not in data and before.study_uid.encode() not in data
    after = read_study(dest, storage=storage)  # cleaned descriptions: the default rules read it
    np.testing.assert_array_equal(after.image, before.image)
    # A study that cannot be read stores nothing.
    empty = join(bucket, "staging", "DICOM_00005")
    with pytest.raises(DicomStudyError, match="no series for channel 'flair'"):
        deidentify_study(root / "DICOM_00005", empty, KEY, storage=storage)
    assert list(storage.list(empty)) == []
