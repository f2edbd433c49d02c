"""Segmentations out as DICOM: a SEG over the reference series and a TID 1500 volumes report.

:func:`make_seg` encodes the three tumour regions (TC, WT, ET; see :mod:`medseg.tasks.labels`) of a
case read by :func:`medseg.dicom.series.read_study` as a binary DICOM Segmentation (highdicom) that
references the reference series image by image, one segment per region coded in SNOMED CT,
with frames only where a region is present. Patient and study attributes come from the source
images, so a PACS files the SEG with its study. :func:`make_volume_report` writes the region
volumes in mL as a TID 1500 Measurement Report (Comprehensive 3D SR) referencing the SEG's
segments; each segment's description carries its volume too. The whole DICOM path for one
study (read, segment, write SEG and report) is :mod:`medseg.inference.study`.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import SegmentationStorage, generate_uid

import medseg
from medseg.core.errors import MedsegError
from medseg.dicom.series import DicomStudy
from medseg.tasks import Task
from medseg.tasks.brats import REGIONS
from medseg.tasks.labels import LabelConvention

if TYPE_CHECKING:  # what inference made; this module only encodes it
    from medseg.inference.infer import CaseSegmentation

__all__ = [
    "REGION_CODES",
    "RegionCode",
    "StudySegmentation",
    "check_dicom_task",
    "encode",
    "encode_study",
    "make_seg",
    "make_volume_report",
    "read_seg_labels",
]

_MANUFACTURER = "medseg"
_MODEL_NAME = "medseg SegResNet BraTS"


@dataclass(frozen=True)
class RegionCode:
    """How a region is named and coded in a SEG.

    Attributes:
        label: SegmentLabel.
        property_type: SNOMED CT segmented property type.
        color: Display colour (RGB, 0-255).
    """

    label: str
    property_type: hd.sr.CodedConcept
    color: tuple[int, int, int]


def _code(code: object) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept.from_code(code)  # type: ignore[arg-type]


#: Segmented property category of every region: SCT 49755003 Morphologically abnormal structure.
REGION_CATEGORY = _code(codes.SCT.MorphologicallyAbnormalStructure)
#: SNOMED CT has no concept for the BraTS sub-regions; these are the nearest ones (the label
#: says which region is meant): TC and ET a neoplasm (108369006), WT a lesion of brain
#: (301766008), since it includes the oedema around the tumour.
REGION_CODES: dict[str, RegionCode] = {
    "TC": RegionCode("Tumour core (TC)", _code(codes.SCT.Neoplasm), (255, 200, 0)),
    "WT": RegionCode("Whole tumour (WT)", _code(codes.SCT.LesionOfBrain), (0, 200, 0)),
    "ET": RegionCode("Enhancing tumour (ET)", _code(codes.SCT.Neoplasm), (230, 30, 30)),
}


#: UCUM millilitre (pydicom's code dictionary has no plain mL).
MILLILITRE = hd.sr.CodedConcept(value="mL", scheme_designator="UCUM", meaning="milliliter")


def _algorithm() -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(
        name=_MODEL_NAME,
        family=_code(codes.DCM.ArtificialIntelligence),
        version=medseg.__version__,
    )


def make_seg(
    reference: Sequence[Dataset],
    regions: NDArray[np.generic],
    volumes_ml: Mapping[str, float],
    series_number: int = 900,
) -> hd.seg.Segmentation:
    """A binary DICOM SEG of ``regions`` over the reference series.

    Args:
        reference: The reference series' images in ``Z`` order (``DicomStudy.reference``).
        regions: ``[3, X, Y, Z]`` masks (TC, WT, ET) on the reference grid (see
            :mod:`medseg.dicom.series` for the axes).
        volumes_ml: Volume of each region, written into its SegmentDescription.
        series_number: SeriesNumber of the new series.

    Returns:
        The Segmentation; frames where a region is empty are omitted.

    Raises:
        ValueError: If ``regions`` does not fit the reference series.
    """
    first = reference[0]
    expected = (len(REGIONS), int(first.Columns), int(first.Rows), len(reference))
    if tuple(regions.shape) != expected:
        raise ValueError(
            f"regions of shape {tuple(regions.shape)} do not fit the series {expected}"
        )
    descriptions = []
    for number, region in enumerate(REGIONS, start=1):
        code = REGION_CODES[region]
        desc = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=code.label,
            segmented_property_category=REGION_CATEGORY,
            segmented_property_type=code.property_type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=_algorithm(),
            tracking_uid=generate_uid(),
            tracking_id=f"{region} {first.SeriesInstanceUID}",
            display_color=hd.color.CIELabColor.from_rgb(*code.color),
        )
        desc.SegmentDescription = f"{region} volume {volumes_ml.get(region, 0.0):.2f} mL"
        descriptions.append(desc)
    # highdicom wants (frames, rows, columns, segments), frames in ``reference`` order.
    pixels = np.ascontiguousarray(np.asarray(regions, dtype=bool).transpose(3, 2, 1, 0))
    return hd.seg.Segmentation(
        source_images=list(reference),
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        **_new_instance(series_number),
        manufacturer_model_name=_MODEL_NAME,
        software_versions=medseg.__version__,
        device_serial_number="0",
        series_description="medseg tumour segmentation",
        omit_empty_frames=True,
    )


def make_volume_report(
    seg: hd.seg.Segmentation,
    reference: Sequence[Dataset],
    volumes_ml: Mapping[str, float],
    series_number: int = 901,
) -> hd.sr.Comprehensive3DSR:
    """The region volumes as a TID 1500 Measurement Report referencing ``seg``'s segments.

    Args:
        seg: The SEG made by :func:`make_seg` for the same case.
        reference: The reference series' images (the report's evidence with the SEG).
        volumes_ml: Volume of each region in mL.
        series_number: SeriesNumber of the new series.

    Returns:
        A Comprehensive 3D SR document.
    """
    groups = []
    for number, region in enumerate(REGIONS, start=1):
        tracking = hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=f"{region} volume")
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking,
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=seg.SOPClassUID,
                    sop_instance_uid=seg.SOPInstanceUID,
                    segment_number=number,
                    source_series=hd.sr.SourceSeriesForSegmentation(reference[0].SeriesInstanceUID),
                ),
                finding_type=REGION_CODES[region].property_type,
                measurements=[
                    hd.sr.Measurement(
                        name=_code(codes.SCT.Volume),
                        value=float(volumes_ml.get(region, 0.0)),
                        unit=MILLILITRE,
                        algorithm_id=_algorithm_id(),
                    )
                ],
            )
        )
    observer = hd.sr.ObserverContext(
        observer_type=_code(codes.DCM.Device),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(), name=_MODEL_NAME, manufacturer_name=_MANUFACTURER
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=_code(codes.LN.BrainMRI),
        imaging_measurements=groups,
        title=_code(codes.DCM.ImagingMeasurementReport),
    )
    return hd.sr.Comprehensive3DSR(
        evidence=[*reference, seg],
        content=report,
        **_new_instance(series_number),
        series_description="medseg tumour volumes",
    )


def _new_instance(series_number: int) -> dict[str, Any]:
    """The identity of a new single-instance series that medseg writes (fresh UIDs)."""
    return {
        "series_instance_uid": generate_uid(),
        "series_number": series_number,
        "sop_instance_uid": generate_uid(),
        "instance_number": 1,
        "manufacturer": _MANUFACTURER,
    }


def _algorithm_id() -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(name=_MODEL_NAME, version=medseg.__version__)


def encode(ds: Dataset) -> bytes:
    """A dataset as DICOM file bytes (preamble, file meta, dataset)."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@dataclass
class StudySegmentation:
    """The DICOM answer for one study.

    Attributes:
        study: The study as read (image, affine, reference series).
        regions: Binary masks ``[3, X, Y, Z]`` (TC, WT, ET) on the reference grid.
        volumes_ml: Volume of each region in mL.
        seg: The DICOM SEG, as file bytes.
        report: The TID 1500 volumes report, as file bytes.
    """

    study: DicomStudy
    regions: NDArray[np.uint8]
    volumes_ml: dict[str, float]
    seg: bytes
    report: bytes

    def sidecar(self) -> dict[str, object]:
        """The volumes and the identifiers a JSON sidecar carries."""
        return {
            "study_instance_uid": self.study.study_uid,
            "reference_series_instance_uid": str(self.study.reference[0].SeriesInstanceUID),
            "volumes_ml": self.volumes_ml,
        }


def check_dicom_task(task: Task) -> None:
    """DICOM in and out are BraTS's: its four MR series and its TC/WT/ET segments.

    Raises:
        MedsegError: For a model of another task (its :attr:`~medseg.tasks.Task.dicom_outputs`
            are not these segments).
    """
    if task.dicom_outputs != REGIONS:
        raise MedsegError(
            f"task {task.name} writes no DICOM: a DICOM study is segmented by a BraTS model "
            f"(segments {', '.join(REGIONS)})"
        )


def encode_study(study: DicomStudy, result: CaseSegmentation) -> StudySegmentation:
    """The SEG and volumes report of a study's segmentation (as :func:`segment_case` made it).

    Args:
        study: The study as read.
        result: Its segmentation, on the reference grid.

    Returns:
        Masks, volumes, SEG and report of the study.
    """
    seg = make_seg(study.reference, result.regions, result.volumes_ml)
    report = make_volume_report(seg, study.reference, result.volumes_ml)
    return StudySegmentation(
        study=study,
        regions=result.regions,
        volumes_ml=result.volumes_ml,
        seg=encode(seg),
        report=encode(report),
    )


def read_seg_labels(
    source: str | Path, study: DicomStudy, convention: LabelConvention
) -> NDArray[np.uint8] | None:
    """The label map of a DICOM SEG stored with a study, on the study's reference grid.

    The SEG must reference the study's reference series (as :func:`make_seg` writes it). Its
    segments are regions when their labels are those of :data:`REGION_CODES` (TC, WT, ET,
    turned into the convention's labels), else labels: segment number N is label value N.

    Args:
        source: The study folder.
        study: The study as read (gives the reference series).
        convention: The dataset's label convention.

    Returns:
        The label map ``[X, Y, Z]``, or ``None`` when the study holds no SEG.

    Raises:
        ValueError: If the SEG does not reference the reference series, or a segment number
            is no label of the convention.
    """
    found = []
    for path in sorted(p for p in Path(source).rglob("*") if p.is_file()):
        try:
            head = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
        except Exception:
            continue
        if head.get("SOPClassUID") == SegmentationStorage:
            found.append(path)
    if not found:
        return None
    if len(found) > 1:
        raise ValueError(
            f"{len(found)} SEG objects in the study: {', '.join(p.name for p in found)}"
        )
    seg = hd.seg.segread(found[0])
    uids = [str(ds.SOPInstanceUID) for ds in study.reference]
    referenced = {
        str(i.ReferencedSOPInstanceUID)
        for s in seg.ReferencedSeriesSequence
        for i in s.ReferencedInstanceSequence
    }
    if not referenced <= set(uids):
        raise ValueError(f"{found[0].name} does not reference the study's reference series")
    numbers = [int(d.SegmentNumber) for d in seg.SegmentSequence]
    pixels = seg.get_pixels_by_source_instance(
        uids, segment_numbers=numbers, combine_segments=False, ignore_spatial_locations=True
    )
    masks = np.asarray(pixels).transpose(3, 2, 1, 0) > 0  # [segments, X, Y, Z]
    labels = [str(d.SegmentLabel) for d in seg.SegmentSequence]
    if labels == [REGION_CODES[r].label for r in REGIONS]:
        return convention.from_regions(masks.astype(np.uint8)).astype(np.uint8)
    out = np.zeros(masks.shape[1:], dtype=np.uint8)
    for number, mask in zip(numbers, masks, strict=True):
        if number not in convention.labels:
            raise ValueError(
                f"{found[0].name}: segment {number} is no label of {convention.name} "
                f"({sorted(convention.labels)})"
            )
        out[mask] = number
    return out
