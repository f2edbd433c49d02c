"""The server's DICOM route on a real server: a zip of a study in, a SEG (and report) out."""

from __future__ import annotations

import email
import io
import zipfile
from pathlib import Path

import highdicom as hd
import httpx
import numpy as np
import pytest
from pydicom.uid import Comprehensive3DSRStorage, SegmentationStorage

from medseg.data.synth import write_dicom_dataset
from medseg.dicom.series import read_study
from medseg.inference.infer import load_model
from medseg.inference.study import segment_study
from tests.conftest import SHAPE
from tests.unit.model_server.test_serving import _assert_good, case, model_dir, server  # noqa: F401 (fixtures)

ZIP = {"content-type": "application/zip"}


def _zip(folder: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, str(path.relative_to(folder)))
    return buf.getvalue()


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic studies: 0 (FLAIR on another grid) and 5 (no FLAIR series)."""
    root = tmp_path_factory.mktemp("dicom-serving")
    write_dicom_dataset(root, n_cases=6, shape=SHAPE, seed=11)
    return root


def _url(urls: dict[str, str]) -> str:
    return f"{urls['rest']}/v2/models/medseg/dicom"


def test_study_zip_answers_a_seg_that_references_the_sent_series(
    server: dict[str, str],  # noqa: F811
    model_dir: Path,  # noqa: F811
    studies: Path,
) -> None:
    folder = studies / "DICOM_00000"
    study = read_study(folder)
    answer = httpx.post(_url(server), content=_zip(folder), headers=ZIP, timeout=120)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/dicom"
    seg = hd.seg.segread(io.BytesIO(answer.content))
    assert seg.SOPClassUID == SegmentationStorage
    assert seg.StudyInstanceUID == study.study_uid
    (series,) = seg.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == study.series_uids["t1gd"]
    uids = [ds.SOPInstanceUID for ds in study.reference]
    assert {i.ReferencedSOPInstanceUID for i in series.ReferencedInstanceSequence} <= set(uids)
    # The regions of the in-process DICOM path, voxel for voxel.
    expected = segment_study(load_model(str(model_dir), device="cpu"), folder)
    frames = seg.get_pixels_by_source_instance(uids, ignore_spatial_locations=True)
    np.testing.assert_array_equal(np.asarray(frames).transpose(3, 2, 1, 0), expected.regions)

    # Asked for multipart/related: the SEG and the TID 1500 report.
    accept = {**ZIP, "accept": 'multipart/related; type="application/dicom"'}
    answer = httpx.post(_url(server), content=_zip(folder), headers=accept, timeout=120)
    assert answer.status_code == 200, answer.text
    head = f"Content-Type: {answer.headers['content-type']}\r\n\r\n".encode()
    message = email.message_from_bytes(head + answer.content)
    parts = [p for p in message.walk() if not p.is_multipart()]
    assert [p.get_content_type() for p in parts] == ["application/dicom"] * 2
    seg_part, sr_part = (p.get_payload(decode=True) for p in parts)
    assert isinstance(seg_part, bytes) and isinstance(sr_part, bytes)
    assert hd.seg.segread(io.BytesIO(seg_part)).SOPClassUID == SegmentationStorage
    report = hd.sr.srread(io.BytesIO(sr_part))
    assert report.SOPClassUID == Comprehensive3DSRStorage
    assert report.StudyInstanceUID == study.study_uid


def _bomb(mib: int, declared_small: bool) -> bytes:
    """A zip whose one member inflates to ``mib`` MiB of zeros (1/1000 of that compressed)."""
    buf = io.BytesIO()
    with (
        zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive,
        archive.open("IM0001.dcm", "w", force_zip64=False) as member,
    ):
        chunk = bytes(1 << 20)
        for _ in range(mib):
            member.write(chunk)
    raw = bytearray(buf.getvalue())
    if declared_small:  # the central directory lies: 1000 bytes declared
        entry = raw.rfind(b"PK\x01\x02")
        raw[entry + 24 : entry + 28] = (1000).to_bytes(4, "little")
    return bytes(raw)


@pytest.mark.parametrize(
    ("name", "headers", "reason"),
    [
        ("bomb", ZIP, "max_decoded_bytes"),
        ("lying bomb", ZIP, "cannot be unzipped"),
        ("not a zip", ZIP, "not a zip archive"),
        ("zip of a study without FLAIR", ZIP, "no series for channel 'flair'"),
        ("wrong content type", {"content-type": "application/octet-stream"}, "application/zip"),
    ],
)
def test_bad_studies_are_a_4xx_and_the_server_keeps_serving(
    server: dict[str, str],  # noqa: F811
    case: Path,  # noqa: F811
    studies: Path,
    name: str,
    headers: dict[str, str],
    reason: str,
) -> None:
    body = {
        "bomb": lambda: _bomb(400, False),  # above max_decoded_bytes (~324 MiB here)
        "lying bomb": lambda: _bomb(8, True),
        "not a zip": lambda: b"PK\x03\x04 but no archive" * 100,
        "zip of a study without FLAIR": lambda: _zip(studies / "DICOM_00005"),
        "wrong content type": lambda: _zip(studies / "DICOM_00000"),
    }[name]()
    answer = httpx.post(_url(server), content=body, headers=headers, timeout=120)
    assert answer.status_code == 400, answer.text
    assert reason in answer.json()["error"]
    _assert_good(server, case)


def test_a_study_that_cannot_be_placed_is_a_400(
    server: dict[str, str],  # noqa: F811
    studies: Path,
    tmp_path: Path,
) -> None:
    """Issue 22 item 5: a series placed where float32 cannot resolve its voxels (1e30 mm made the
    foreground crop empty: a 500) is a 400 naming ``max_position_mm``."""
    import pydicom

    folder = tmp_path / "far"
    for path in sorted((studies / "DICOM_00001").rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        row = np.asarray(ds.ImageOrientationPatient[:3], dtype=float)
        # 10 km along the rows (in the slice's plane: the slices keep their spacing); float32
        # resolves 1 mm there
        position = np.asarray(ds.ImagePositionPatient, dtype=float) + 1e7 * row
        ds.ImagePositionPatient = [f"{v:.10g}" for v in position]
        (folder / path.relative_to(studies / "DICOM_00001")).parent.mkdir(
            parents=True, exist_ok=True
        )
        ds.save_as(folder / path.relative_to(studies / "DICOM_00001"))
    answer = httpx.post(_url(server), content=_zip(folder), headers=ZIP, timeout=120)
    assert answer.status_code == 400, answer.text
    assert "max_position_mm=100000" in answer.json()["error"]
