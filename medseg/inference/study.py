"""A DICOM study through a loaded model: read, segment as the NIfTI path does, encode SEG and SR.

The one DICOM path for ``medseg predict``, the model server's DICOM route and batch jobs: the
study is read by :func:`medseg.dicom.series.read_study`, segmented by the same
:func:`medseg.inference.infer.segment_case` as a NIfTI case, and written as a DICOM SEG and a
volumes report by :func:`medseg.dicom.seg.encode_study`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from medseg.core.storage import Storage
from medseg.dicom.seg import StudySegmentation, check_dicom_task, encode_study
from medseg.dicom.series import DicomStudy, SeriesRules, read_study
from medseg.inference.infer import Segmenter, segment_case
from medseg.tasks.brats import CHANNELS

__all__ = ["segment_read_study", "segment_study"]


def segment_read_study(
    segmenter: Segmenter, study: DicomStudy, check: Callable[[], None] | None = None
) -> StudySegmentation:
    """Segment a study already read, as the NIfTI path does, and encode SEG and report.

    Args:
        segmenter: The loaded model.
        study: The study (see :func:`medseg.dicom.series.read_study`).
        check: Called between the stages; it raises to abandon the work (the server's ticket).

    Returns:
        Masks, volumes, SEG and report of the study.

    Raises:
        MedsegError: If the model's task writes no DICOM (see :func:`check_dicom_task`).
    """
    check_dicom_task(segmenter.task)
    order = [CHANNELS.index(c) for c in segmenter.cfg.data.channels]
    image = study.image if order == list(range(len(CHANNELS))) else study.image[order]
    return encode_study(study, segment_case(segmenter, image, study.affine, check))


def segment_study(
    segmenter: Segmenter,
    source: str | Path,
    rules: SeriesRules | None = None,
    storage: Storage | None = None,
) -> StudySegmentation:
    """Read a study, segment it as the NIfTI path does, and encode SEG and report.

    Args:
        segmenter: The loaded model.
        source: A study folder, zip or ``s3://`` prefix (see
            :func:`medseg.dicom.series.read_study`).
        rules: Series-to-channel rules.
        storage: Object store for ``s3://`` sources.

    Returns:
        Masks, volumes, SEG and report of the study.

    Raises:
        medseg.dicom.series.DicomStudyError: If the study cannot be read (nothing is written).
    """
    return segment_read_study(segmenter, read_study(source, rules, storage))
