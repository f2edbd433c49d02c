"""DICOM SEG and TID 1500 report of a case: read back by highdicom with references and geometry."""

from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom.sr.codedict import codes

from medseg.config import REGIONS
from medseg.data.synth import dicom_variant, make_case, write_dicom_dataset
from medseg.dicom.seg import REGION_CODES, encode, make_seg, make_volume_report
from medseg.dicom.series import DicomStudy, read_study
from medseg.inference.infer import load_model, segment_case
from medseg.inference.study import segment_study
from tests.conftest import SHAPE, write_tiny_model

INDEX = 1  # the oblique study: geometry errors cannot hide behind an identity affine


@pytest.fixture(scope="module")
def oblique(tmp_path_factory: pytest.TempPathFactory) -> tuple[DicomStudy, np.ndarray]:
    root = tmp_path_factory.mktemp("seg")
    write_dicom_dataset(root, n_cases=INDEX + 1, shape=SHAPE, seed=3)
    v = dicom_variant(make_case(INDEX, SHAPE, 3), INDEX)
    regions = np.stack([np.isin(v.code, (1, 3)), v.code > 0, v.code == 3]).astype(np.uint8)
    return read_study(root / v.case_id), regions


def _volumes(regions: np.ndarray, study: DicomStudy) -> dict[str, float]:
    voxel_ml = abs(np.linalg.det(study.affine[:3, :3])) / 1000
    return {r: float(regions[i].sum() * voxel_ml) for i, r in enumerate(REGIONS)}


def test_seg_reads_back_with_references_and_geometry(
    oblique: tuple[DicomStudy, np.ndarray],
) -> None:
    study, regions = oblique
    volumes = _volumes(regions, study)
    seg = hd.seg.segread(io.BytesIO(encode(make_seg(study.reference, regions, volumes))))
    ref = study.reference[0]
    # Filed with its study: patient and study identifiers copied from the source.
    for attr in ("PatientID", "PatientName", "PatientBirthDate", "StudyInstanceUID", "StudyDate"):
        assert seg.get(attr) == ref.get(attr)
    assert seg.FrameOfReferenceUID == ref.FrameOfReferenceUID
    assert seg.SegmentationType == "BINARY"
    (series,) = seg.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == ref.SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in series.ReferencedInstanceSequence} == {
        ds.SOPInstanceUID for ds in study.reference
    }
    # Frames only where a region is present.
    per_slice = regions.any(axis=(1, 2))  # [3, Z]
    assert seg.NumberOfFrames == int(per_slice.sum())
    # Each segment, coded in SNOMED CT, back on the reference grid voxel for voxel.
    for number, region in enumerate(REGIONS, start=1):
        desc = seg.get_segment_description(number)
        assert desc.SegmentLabel == REGION_CODES[region].label
        assert desc.segmented_property_category == codes.SCT.MorphologicallyAbnormalStructure
        assert desc.segmented_property_type.scheme_designator == "SCT"
        assert f"{volumes[region]:.2f} mL" in desc.SegmentDescription
        vol = seg.get_volume(segment_numbers=[number], combine_segments=True)
        # highdicom's volume is (slice, row, column) over the slices that hold frames, its
        # slices stacked against the normal: turn it to medseg's axes.
        if np.dot(vol.get_affine("RAS")[:3, 0], study.affine[:3, 2]) < 0:
            vol = vol.flip_spatial(0)
        mask = np.asarray(vol.array).transpose(2, 1, 0)
        affine = vol.get_affine("RAS")[:, [2, 1, 0, 3]]
        first = int(np.flatnonzero(regions.any(axis=(0, 1, 2)))[0])
        np.testing.assert_allclose(affine[:3, :3], study.affine[:3, :3], atol=1e-4)
        np.testing.assert_allclose(affine[:3, 3], (study.affine @ [0, 0, first, 1])[:3], atol=1e-3)
        z = slice(first, first + mask.shape[2])
        np.testing.assert_array_equal(mask > 0, regions[number - 1][:, :, z] > 0)
        assert not regions[number - 1][:, :, : z.start].any()
        assert not regions[number - 1][:, :, z.stop :].any()


def test_seg_refuses_masks_of_another_grid(oblique: tuple[DicomStudy, np.ndarray]) -> None:
    study, regions = oblique
    with pytest.raises(ValueError, match="do not fit the series"):
        make_seg(study.reference, regions[:, :-1], {})


def test_volume_report_is_tid1500_referencing_the_segments(
    oblique: tuple[DicomStudy, np.ndarray],
) -> None:
    study, regions = oblique
    volumes = _volumes(regions, study)
    seg = make_seg(study.reference, regions, volumes)
    report = make_volume_report(seg, study.reference, volumes)
    sr = hd.sr.srread(io.BytesIO(encode(report)))
    assert sr.PatientID == study.reference[0].PatientID
    assert sr.StudyInstanceUID == study.study_uid
    assert sr.ConceptNameCodeSequence[0].CodeValue == "126000"  # Imaging Measurement Report
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    content = sr.content
    groups = content.get_volumetric_roi_measurement_groups()
    assert len(groups) == len(REGIONS)
    found = {}
    for group in groups:
        segment = group.referenced_segment
        assert segment.referenced_sop_instance_uid == seg.SOPInstanceUID
        (measurement,) = group.get_measurements(name=codes.SCT.Volume)
        assert measurement.unit.value == "mL"
        (number,) = segment.referenced_segment_numbers or []
        found[REGIONS[number - 1]] = measurement.value
    assert found == pytest.approx(volumes)


def test_seg_is_a_file_a_pacs_accepts(
    oblique: tuple[DicomStudy, np.ndarray], tmp_path: Path
) -> None:
    study, regions = oblique
    path = tmp_path / "seg.dcm"
    path.write_bytes(encode(make_seg(study.reference, regions, _volumes(regions, study))))
    assert path.read_bytes()[128:132] == b"DICM"  # Part 10 file: preamble and prefix


def test_segment_study_end_to_end(oblique: tuple[DicomStudy, np.ndarray], tmp_path: Path) -> None:
    """Study folder in, SEG and report out, through the same segment_case as the NIfTI path."""
    study, _ = oblique
    segmenter = load_model(str(write_tiny_model(tmp_path / "model")), device="cpu")
    folder = Path(study.reference[0].filename).parent.parent
    out = segment_study(segmenter, folder)
    expected = segment_case(segmenter, study.image, study.affine)
    np.testing.assert_array_equal(out.regions, expected.regions)
    assert out.volumes_ml == pytest.approx(expected.volumes_ml)
    seg = hd.seg.segread(io.BytesIO(out.seg))
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == study.reference[0].SeriesInstanceUID
    frames = np.asarray(seg.get_volume(combine_segments=False).array)
    assert int(frames.sum()) == int(out.regions.sum())  # every voxel of the mask, no more
    sr = hd.sr.srread(io.BytesIO(out.report))
    volumes = {
        REGIONS[g.referenced_segment.referenced_segment_numbers[0] - 1]: g.get_measurements(
            name=codes.SCT.Volume
        )[0].value
        for g in sr.content.get_volumetric_roi_measurement_groups()
    }
    assert volumes == pytest.approx(out.volumes_ml)
    assert out.sidecar()["volumes_ml"] == out.volumes_ml
