"""Dermoscopy ingest against a real MinIO: layouts, quarantine, de-identification, lesion split."""

from __future__ import annotations

import csv
import io
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from medseg.cli import app
from medseg.config import SplitConfig
from medseg.core.errors import DatasetError
from medseg.core.settings import ServerLimits
from medseg.core.storage import Storage, join
from medseg.data.ingest import _assign_split, ingest
from medseg.data.manifest import Manifest
from medseg.data.skin_synth import write_ham10000
from medseg.io.images import decode_image
from medseg.tasks.skin_classes import CHANNELS, CLASSES, ISIC2018_COLUMNS
from tests.unit.data.test_ingest import _local_bytes, _on_upload
from tests.unit.io.test_skin_images import jpeg_claiming

N = 56
SPLIT = SplitConfig(val_fraction=0.3, seed=1)


@pytest.fixture(scope="module")
def ham(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic HAM10000 set of 56 images (read-only: copy to modify)."""
    root = tmp_path_factory.mktemp("ham")
    write_ham10000(root, N, seed=3)
    return root


def _rows(root: Path) -> list[dict[str, str]]:
    with (root / "HAM10000_metadata.csv").open() as f:
        return list(csv.DictReader(f))


def _image(root: Path, image_id: str) -> Path:
    return next(root.glob(f"HAM10000_images_part_*/{image_id}.jpg"))


def _sides(m: Manifest) -> dict[str, set[str]]:
    sides = defaultdict(set)
    for c in m.cases:
        assert c.group is not None
        sides[c.group].add(c.split)
    return sides


def test_ham10000_is_ingested_and_split_by_lesion(ham: Path, storage: Storage, bucket: str) -> None:
    result = ingest(str(ham), "skin", bucket, storage=storage, split=SPLIT)
    m = result.manifest
    assert (m.layout, m.convention, m.channels) == ("ham10000", "ham10000", CHANNELS)
    assert not m.quarantined and len(m.cases) == N and result.uploaded == N
    rows = {r["image_id"]: r for r in _rows(ham)}
    for c in m.cases:
        assert (c.label, c.group) == (rows[c.case_id]["dx"], rows[c.case_id]["lesion_id"])
        assert c.shape == (450, 600) and c.file("image").key == f"raw/{c.case_id}/{c.case_id}.png"
    # No lesion has images on both sides, and lesions of several images are on each side.
    sides = _sides(m)
    assert all(len(s) == 1 for s in sides.values())
    images_per_lesion = defaultdict(int)
    for c in m.cases:
        images_per_lesion[c.group] += 1
    for side in ("train", "validation"):
        assert any(sides[g] == {side} and n > 1 for g, n in images_per_lesion.items())
    assert round(len(sides) * 0.3) == sum(s == {"validation"} for s in sides.values())
    # The same seed over images instead of lesions would leak: the test above has teeth.
    by_image = _assign_split([c.case_id for c in m.cases], SPLIT)
    leaked = defaultdict(set)
    for c in m.cases:
        leaked[c.group].add(by_image[c.case_id])
    assert any(len(s) == 2 for s in leaked.values())
    # Re-ingesting the same content is a no-op, found by the source's fingerprint.
    again = ingest(str(ham), "skin", bucket, storage=storage, split=SPLIT)
    assert again.cached and again.ref == result.ref
    # The same files under an s3:// prefix make the same version.
    for p in sorted(ham.rglob("*")):
        if p.is_file():
            storage.put_file(join(bucket, "incoming", str(p.relative_to(ham))), p)
    from_s3 = ingest(join(bucket, "incoming"), "skin", bucket, storage=storage, split=SPLIT)
    assert from_s3.ref == result.ref and not from_s3.created


def test_stored_images_hold_pixels_only(ham: Path, storage: Storage, bucket: str) -> None:
    result = ingest(str(ham), "deid", bucket, storage=storage, split=SPLIT)
    case = result.manifest.cases[0]
    source = _image(ham, case.case_id).read_bytes()
    assert b"DOB 1970-01-01" in source and b"Dr Example" in source  # what there was to remove
    stored = storage.get_bytes(join(result.ref.prefix, case.file("image").key))
    for text in (b"DOB", b"Example", b"ExampleScope", b"2019:05:04", case.group.encode()):
        assert text not in stored
    with Image.open(io.BytesIO(stored)) as img:
        assert img.format == "PNG" and img.mode == "RGB"
        assert not img.getexif() and not getattr(img, "text", {})
        assert set(img.info) <= {"dpi", "gamma"}  # no exif, comment, icc_profile, text chunks
    limits = ServerLimits()
    assert np.array_equal(decode_image(stored, "s", limits), decode_image(source, "j", limits))


def test_broken_images_are_quarantined_with_reasons(
    ham: Path, tmp_path: Path, storage: Storage, bucket: str
) -> None:
    root = tmp_path / "broken"
    shutil.copytree(ham, root)
    rows = _rows(root)
    ids = [r["image_id"] for r in rows]
    _image(root, ids[0]).unlink()
    truncated = _image(root, ids[1])
    truncated.write_bytes(truncated.read_bytes()[:2000])
    blank = io.BytesIO()
    Image.new("RGB", (600, 450), (180, 140, 120)).save(blank, "PNG")
    _image(root, ids[2]).write_bytes(blank.getvalue())  # a PNG under a .jpg name: read by magic
    _image(root, ids[3]).write_bytes(jpeg_claiming(60000, 60000))
    tiny = io.BytesIO()
    Image.effect_noise((20, 12), 40).convert("RGB").save(tiny, "JPEG")
    _image(root, ids[4]).write_bytes(tiny.getvalue())
    rows[5]["dx"] = "scc"
    rows[6]["lesion_id"] = ""
    (root / "HAM10000_images_part_2" / "ISIC_9999999.jpg").write_bytes(tiny.getvalue())
    outside = tmp_path / "outside.jpg"
    shutil.copy(_image(root, ids[7]), outside)
    _image(root, ids[7]).unlink()
    (root / "HAM10000_images_part_1" / f"{ids[7]}.jpg").symlink_to(outside)
    with (root / "HAM10000_metadata.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    m = ingest(str(root), "broken", bucket, storage=storage, split=SPLIT).manifest
    reasons = {q.case_id: (q.file, q.reason) for q in m.quarantined}
    expected = {
        ids[0]: (
            f"{ids[0]}.jpg",
            f"missing image: expected file {ids[0]}.jpg in HAM10000_images_part_1/ or "
            "HAM10000_images_part_2/",
        ),
        ids[2]: (
            f"{ids[2]}.jpg",
            f"blank image: every pixel of {ids[2]}.jpg is RGB (180, 140, 120)",
        ),
        ids[4]: (f"{ids[4]}.jpg", f"{ids[4]}.jpg is 20×12 pixels, less than 32 on a side"),
        ids[5]: (
            "HAM10000_metadata.csv",
            f"unknown diagnosis 'scc' for {ids[5]} in HAM10000_metadata.csv "
            f"(known: {', '.join(CLASSES)})",
        ),
        ids[6]: ("HAM10000_metadata.csv", f"{ids[6]} has no lesion_id in HAM10000_metadata.csv"),
        "ISIC_9999999": (
            "ISIC_9999999.jpg",
            "ISIC_9999999.jpg has no row in HAM10000_metadata.csv",
        ),
        ids[7]: (
            f"{ids[7]}.jpg",
            f"{ids[7]}.jpg is a symbolic link to {outside}, outside the source folder {root}; "
            "links out of the source are not followed",
        ),
    }
    for case_id, (file, reason) in expected.items():
        assert reasons.pop(case_id) == (file, reason)
    file, reason = reasons.pop(ids[1])
    assert file == f"{ids[1]}.jpg"
    assert reason.startswith(f"{ids[1]}.jpg is not a readable JPEG image: image file is truncated")
    file, reason = reasons.pop(ids[3])
    assert reason.startswith(f"{ids[3]}.jpg: its JPEG header announces more pixels than may be")
    assert not reasons
    assert len(m.cases) == N - 8
    stored = {
        o.uri.split("/raw/")[1].split("/")[0]
        for o in storage.list(join(bucket, "datasets"))
        if "/raw/" in o.uri
    }
    assert stored == {c.case_id for c in m.cases}
    with pytest.raises(DatasetError, match="9 invalid cases with --strict"):
        ingest(str(root), "strict", bucket, storage=storage, strict=True)


def _isic(ham: Path, root: Path, groupings: bool) -> dict[str, str]:
    """The HAM set in the ISIC 2018 Task 3 layout; returns the label of each image."""
    images = root / "ISIC2018_Task3_Training_Input"
    images.mkdir(parents=True)
    truth = root / "ISIC2018_Task3_Training_GroundTruth"
    truth.mkdir()
    rows = _rows(ham)
    with (truth / "ISIC2018_Task3_Training_GroundTruth.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", *ISIC2018_COLUMNS])
        for r in rows:
            shutil.copy(_image(ham, r["image_id"]), images)
            writer.writerow(
                [r["image_id"], *(f"{float(c.lower() == r['dx']):.1f}" for c in ISIC2018_COLUMNS)]
            )
        writer.writerow(["ISIC_0000001", "1.0", "1.0", "0.0", "0.0", "0.0", "0.0", "0.0"])
    shutil.copy(_image(ham, rows[0]["image_id"]), images / "ISIC_0000001.jpg")
    if groupings:
        with (root / "ISIC2018_Task3_Training_LesionGroupings.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image", "lesion_id", "diagnosis_confirm_type"])
            writer.writerows([r["image_id"], r["lesion_id"], r["dx_type"]] for r in rows)
    return {r["image_id"]: r["dx"] for r in rows}


def test_isic2018_layout_gives_the_same_images(
    ham: Path, tmp_path: Path, storage: Storage, bucket: str
) -> None:
    reference = ingest(str(ham), "ref", bucket, storage=storage, split=SPLIT).manifest
    sha = {c.case_id: c.file("image").sha256 for c in reference.cases}
    labels = _isic(ham, tmp_path / "isic", groupings=True)
    m = ingest(str(tmp_path / "isic"), "isic", bucket, storage=storage, split=SPLIT).manifest
    assert m.layout == "isic2018" and len(m.cases) == N
    assert [(q.case_id, q.reason) for q in m.quarantined] == [
        (
            "ISIC_0000001",
            "ground truth of ISIC_0000001 is not one-hot: 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0",
        )
    ]
    assert {c.case_id: c.label for c in m.cases} == labels
    # The same pixels make the same stored bytes, whatever the layout and its file metadata.
    assert {c.case_id: c.file("image").sha256 for c in m.cases} == sha
    assert {c.case_id: c.group for c in m.cases} == {c.case_id: c.group for c in reference.cases}
    assert all(len(s) == 1 for s in _sides(m).values())
    # Without ISIC's lesion groupings, each image is its own lesion.
    _isic(ham, tmp_path / "plain", groupings=False)
    m = ingest(str(tmp_path / "plain"), "plain", bucket, storage=storage, split=SPLIT).manifest
    assert all(c.group == c.case_id for c in m.cases)


def test_folder_per_class_layout(ham: Path, tmp_path: Path, storage: Storage, bucket: str) -> None:
    root = tmp_path / "folders"
    rows = _rows(ham)
    for r in rows:
        folder = root / (r["dx"].upper() if r["dx"] == "mel" else r["dx"])
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(_image(ham, r["image_id"]), folder)
    (root / "misc").mkdir()
    shutil.copy(_image(ham, rows[0]["image_id"]), root / "misc" / "ISIC_0000002.jpg")
    m = ingest(str(root), "folders", bucket, storage=storage, split=SPLIT).manifest
    assert m.layout == "folders" and len(m.cases) == N
    assert {c.case_id: c.label for c in m.cases} == {r["image_id"]: r["dx"] for r in rows}
    assert [(q.case_id, q.reason) for q in m.quarantined] == [
        (
            "ISIC_0000002",
            "ISIC_0000002.jpg is in folder misc/, which names no class "
            f"(known: {', '.join(CLASSES)})",
        )
    ]
    with pytest.raises(
        DatasetError, match="has the ham10000 classes, not the label convention 'brats2021'"
    ):
        ingest(str(root), "folders", bucket, storage=storage, labels="brats2021")


def test_cli_synth_and_ingest(tmp_path: Path, s3_env: None, bucket: str) -> None:
    runner = CliRunner()
    raw = tmp_path / "raw"
    done = runner.invoke(app, ["synth", str(raw), "--task", "skin-lesion", "--cases", "42"])
    assert done.exit_code == 0, done.output
    (raw / "HAM10000_images_part_1").rename(raw / "ham10000_images_part_1")  # Kaggle's spelling
    done = runner.invoke(app, ["ingest", str(raw), "--dataset", "cli-skin", "--store", bucket])
    assert done.exit_code == 0, done.output
    assert "layout ham10000, labels ham10000, 42 valid cases (" in done.output


def test_scratch_holds_at_most_one_image_while_uploading(
    ham: Path, storage: Storage, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each image's de-identified PNG is made in scratch and removed at once, in both passes."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    held: list[int] = []

    def measure(uri: str) -> None:
        if "/raw/" in uri:
            held.append(_local_bytes(scratch))

    _on_upload(monkeypatch, measure)
    result = ingest(str(ham), "skin", bucket, storage=storage, split=SPLIT)
    assert len(held) == result.uploaded == len(result.manifest.cases) > 0
    assert max(held) <= max(c.files[0].size for c in result.manifest.cases)
    assert _local_bytes(scratch) == 0
