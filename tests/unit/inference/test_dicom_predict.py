"""DICOM everywhere the NIfTI path goes: batch prediction over studies, and ingest of studies."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

from medseg.config import CHANNELS, REGIONS, MedsegConfig
from medseg.core.storage import Storage, join
from medseg.data.ingest import ingest
from medseg.data.synth import DICOM_DESCRIPTIONS, write_dicom_dataset
from medseg.dicom.deid import Deidentifier
from medseg.dicom.seg import encode, make_seg
from medseg.dicom.series import StudyInfo, find_studies, read_study, write_study
from medseg.inference.infer import Segmenter
from medseg.inference.predict import predict
from medseg.io.nifti import decode
from medseg.tasks.labels import get_convention
from tests.conftest import SHAPE

#: Hand-set thresholds on the z-scored channels (the synthetic contrasts): TC and ET where T1Gd
#: is bright (ET brighter), WT where FLAIR is bright (oedema).
THRESHOLDS = {"TC": ("t1gd", 1.2), "WT": ("flair", 2.0), "ET": ("t1gd", 2.5)}


def threshold_model() -> Segmenter:
    """A real network whose 1×1×1 convolution thresholds one channel per region."""
    cfg = MedsegConfig.model_validate({"infer": {"roi_size": [32, 32, 32]}})
    net = torch.nn.Conv3d(len(CHANNELS), len(REGIONS), kernel_size=1)
    with torch.no_grad():
        net.weight.zero_()
        for region, (channel, level) in THRESHOLDS.items():
            net.weight[REGIONS.index(region), CHANNELS.index(channel)] = 4.0
            net.bias[REGIONS.index(region)] = -4.0 * level
    return Segmenter(cfg, net.eval(), torch.device("cpu"))


def _nifti_case(case: Path) -> tuple[np.ndarray, np.ndarray]:
    imgs = [nib.load(next(case.glob(f"*_{m}.nii.gz"))) for m in ("t1", "t1ce", "t2", "flair")]
    image = np.stack([np.asarray(i.dataobj, dtype=np.float32) for i in imgs])  # type: ignore[attr-defined]
    return image, imgs[0].affine  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def studies(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A NIfTI case, and a batch folder: that case as a study (P0) and a study without FLAIR."""
    case = sorted(p for p in (synth_root / "brats2021").iterdir() if p.is_dir())[1]
    image, affine = _nifti_case(case)
    root = tmp_path_factory.mktemp("studies")
    descriptions = dict(DICOM_DESCRIPTIONS[1])
    write_study(image, affine, root / "P0", StudyInfo("P0"), descriptions)
    del descriptions["flair"]
    write_study(image, affine, root / "P1", StudyInfo("P1"), descriptions)
    return case, root


def test_study_batch_predicts_like_the_nifti_case(
    studies: tuple[Path, Path], tmp_path: Path
) -> None:
    """NIfTI case → DICOM study → predict: the NIfTI case's label map, plus SEG, SR, sidecar;
    the study without FLAIR fails by name and the batch goes on."""
    case, root = studies
    seg = threshold_model()
    nifti = predict("hand-built", str(tmp_path / "nifti"), paths=[str(case)], segmenter=seg)
    out = tmp_path / "dicom"
    result = predict("hand-built", str(out), paths=[str(root)], segmenter=seg)
    assert [c["case_id"] for c in result.cases] == ["P0"]
    (failure,) = result.failed
    assert failure.case_id == "P1" and failure.file == str(root / "P1")
    assert "no series for channel 'flair'" in failure.reason and "t2_tse_tra" in failure.reason
    assert not list(out.glob("**/P1*"))  # nothing of the bad study written
    want = nib.load(tmp_path / "nifti" / "labels" / f"{case.name}.nii.gz")
    got = nib.load(out / "labels" / "P0.nii.gz")
    labels = np.asarray(got.dataobj)  # type: ignore[attr-defined]
    np.testing.assert_allclose(got.affine, want.affine, atol=1e-4)  # type: ignore[attr-defined]
    # Within interpolation: DICOM stores the positions as decimal strings.
    assert (labels == np.asarray(want.dataobj)).mean() > 0.999  # type: ignore[attr-defined]
    assert {2, 4} <= set(np.unique(labels).tolist())  # WT, TC and ET present: a real comparison
    row = result.cases[0]
    assert row["volumes_ml"] == pytest.approx(nifti.cases[0]["volumes_ml"], rel=0.01)
    # The SEG references the study's T1Gd series and holds the label map's regions.
    study = read_study(root / "P0")
    dcm = hd.seg.segread(io.BytesIO((out / row["seg_key"]).read_bytes()))
    (series,) = dcm.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == study.series_uids["t1gd"]
    assert dcm.StudyInstanceUID == study.study_uid
    uids = [ds.SOPInstanceUID for ds in study.reference]
    frames = dcm.get_pixels_by_source_instance(uids, ignore_spatial_locations=True)
    regions = np.asarray(frames).transpose(3, 2, 1, 0)  # [segments, X, Y, Z]
    expected = np.stack([np.isin(labels, (1, 4)), labels > 0, labels == 4])
    np.testing.assert_array_equal(regions > 0, expected)
    sr = hd.sr.srread(io.BytesIO((out / row["sr_key"]).read_bytes()))
    assert sr.StudyInstanceUID == study.study_uid
    sidecar = json.loads((out / row["sidecar_key"]).read_text())
    assert sidecar["study_instance_uid"] == study.study_uid
    assert sidecar["volumes_ml"] == pytest.approx(row["volumes_ml"], abs=1e-3)


def test_studies_are_found_in_folders_zips_and_prefixes(
    studies: tuple[Path, Path], storage: Storage, bucket: str, tmp_path: Path
) -> None:
    _, root = studies
    assert find_studies(root) == [("P0", str(root / "P0")), ("P1", str(root / "P1"))]
    # A study's own folder (series sub-folders of one study) is one study.
    assert find_studies(root / "P0") == [("P0", str(root / "P0"))]
    prefix = join(bucket, "in")
    for path in root.rglob("*.dcm"):
        storage.put_file(join(prefix, str(path.relative_to(root))), path)
    assert find_studies(prefix, storage) == [("P0", join(prefix, "P0")), ("P1", join(prefix, "P1"))]
    assert find_studies(tmp_path) == []


def test_dicom_studies_ingest_like_the_nifti_cases(
    synth_root: Path,
    storage: Storage,
    bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Synthetic studies (ground truth as NIfTI, and as a DICOM SEG) become a dataset whose
    cases are those of the NIfTI ingest of the same cases; the study without FLAIR is
    quarantined; the stored studies are de-identified and the key is stored nowhere."""
    key = "test-deid-secret-0123456789"
    monkeypatch.setenv("MEDSEG_DEID_KEY", key)
    source = tmp_path / "studies"
    write_dicom_dataset(source, n_cases=6, shape=SHAPE, seed=7)  # synth_root's seed
    # Study 2's ground truth as a DICOM SEG of the regions instead of its NIfTI label map.
    gt = next((source / "DICOM_00002").glob("*_seg.nii.gz"))
    labels = np.asarray(nib.load(gt).dataobj)  # type: ignore[attr-defined]
    gt.unlink()
    study = read_study(source / "DICOM_00002")
    regions = get_convention("brats2021").to_regions(labels)
    seg = make_seg(study.reference, regions, {})
    (source / "DICOM_00002" / "gt-seg.dcm").write_bytes(encode(seg))

    dicom = ingest(str(source), "dcm", bucket, storage)
    nifti = ingest(str(synth_root / "brats2021"), "nii", bucket, storage)
    m = dicom.manifest
    assert m.layout == "dicom" and m.convention == "brats2021"
    (bad,) = m.quarantined
    assert bad.case_id == "DICOM_00005" and "no series for channel 'flair'" in bad.reason
    assert [c.case_id for c in m.cases] == [f"DICOM_0000{i}" for i in range(5)]
    for index, entry in enumerate(m.cases):
        other = nifti.manifest.cases[index]
        assert entry.label_counts == other.label_counts, entry.case_id
        assert entry.shape == other.shape
        for role in (*CHANNELS, "label"):
            got = decode(storage.get_bytes(join(dicom.ref.prefix, entry.file(role).key)), role)
            want = decode(storage.get_bytes(join(nifti.ref.prefix, other.file(role).key)), role)
            if index == 1:  # the oblique study: the same voxels, on a rotated grid
                assert not np.allclose(got.affine, want.affine, atol=1e-3)
            else:
                np.testing.assert_allclose(got.affine, want.affine, atol=1e-4)
            if index == 0 and role == "flair":  # written on every second slice: interpolated
                np.testing.assert_array_equal(got.data[:, :, ::2], want.data[:, :, ::2])
            else:
                np.testing.assert_array_equal(got.data, want.data, err_msg=f"{index} {role}")
    # The stored study is de-identified with the key, and reads back as the case.
    entry = m.cases[0]
    stored = storage.get_bytes(join(dicom.ref.prefix, entry.file("dicom").key))
    with zipfile.ZipFile(io.BytesIO(stored)) as archive:
        first = pydicom.dcmread(io.BytesIO(archive.read(archive.namelist()[0])))
    assert first.PatientID == Deidentifier(key.encode()).pseudonym("SYNTH-00000")
    assert first.PatientName == first.PatientID and first.PatientIdentityRemoved == "YES"
    assert read_study(stored).image.shape[1:] == entry.shape
    for obj in storage.list(bucket):  # the key is stored nowhere
        assert key.encode() not in storage.get_bytes(obj.uri)
