"""Ingest against a real MinIO: validation and quarantine, versions, idempotence, sanitising."""

from __future__ import annotations

import gzip
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from medseg.config import SplitConfig
from medseg.core.errors import DatasetError
from medseg.core.storage import ObjectInfo, Storage, join
from medseg.data.ingest import ingest
from medseg.data.manifest import DatasetRef
from medseg.data.synth import write_dataset
from tests.conftest import SHAPE


def _path(root: Path, i: int, suffix: str) -> Path:
    case = f"BraTS2021_{i:05d}"
    return root / case / f"{case}_{suffix}.nii.gz"


def _rewrite(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> None:
    img = nib.load(path)
    nib.save(nib.Nifti1Image(data, img.affine if affine is None else affine), path)


@pytest.fixture(scope="module")
def broken_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Ten BraTS 2021 cases; cases 1-7 each broken in one way, 0, 8 and 9 good."""
    root = tmp_path_factory.mktemp("broken")
    write_dataset(root, "brats2021", n_cases=10, shape=SHAPE, seed=3)
    _path(root, 1, "t1ce").unlink()
    t2 = _path(root, 2, "t2")
    _rewrite(t2, np.asarray(nib.load(t2).dataobj)[:-2])
    flair = _path(root, 3, "flair")
    shifted = nib.load(flair).affine.copy()
    shifted[0, 3] += 5.0
    _rewrite(flair, np.asarray(nib.load(flair).dataobj), shifted)
    t1 = _path(root, 4, "t1")
    t1.write_bytes(t1.read_bytes()[: t1.stat().st_size // 2])
    t1 = _path(root, 5, "t1")
    data = np.asarray(nib.load(t1).dataobj).astype(np.float32)
    data[10, 10, 10:13] = np.nan
    data[11, 11, 11] = np.inf
    _rewrite(t1, data)
    seg = _path(root, 6, "seg")
    labels = np.asarray(nib.load(seg).dataobj).copy()
    labels[0, 0, 0], labels[0, 0, 1] = 3, 7
    _rewrite(seg, labels)
    t1ce = _path(root, 7, "t1ce")
    _rewrite(t1ce, np.zeros(nib.load(t1ce).shape, dtype=np.int16))
    return root


def test_broken_cases_are_quarantined_with_exact_reasons(
    broken_root: Path, storage: Storage, bucket: str
) -> None:
    result = ingest(str(broken_root), "mixed", bucket, storage=storage)
    m = result.manifest
    assert sorted(c.case_id for c in m.cases) == [f"BraTS2021_{i:05d}" for i in (0, 8, 9)]
    reasons = {q.case_id: (q.file, q.reason) for q in m.quarantined}
    c = "BraTS2021_{:05d}".format
    assert reasons[c(1)] == (
        f"{c(1)}_t1ce.nii.gz",
        f"missing modality t1gd: expected file {c(1)}_t1ce.nii.gz",
    )
    assert reasons[c(2)] == (
        f"{c(2)}_t2.nii.gz",
        f"shape mismatch: {c(2)}_t2.nii.gz is (46, 48, 32), {c(2)}_t1.nii.gz is (48, 48, 32)",
    )
    assert reasons[c(3)] == (
        f"{c(3)}_flair.nii.gz",
        f"affine mismatch: {c(3)}_flair.nii.gz differs from {c(3)}_t1.nii.gz by 5 mm",
    )
    file4, reason4 = reasons[c(4)]
    assert file4 == f"{c(4)}_t1.nii.gz"
    assert reason4.startswith(f"corrupt gzip in {c(4)}_t1.nii.gz: ")
    assert reasons[c(5)] == (
        f"{c(5)}_t1.nii.gz",
        f"non-finite values in {c(5)}_t1.nii.gz: 3 NaN, 1 Inf",
    )
    assert reasons[c(6)] == (
        f"{c(6)}_seg.nii.gz",
        f"unknown label values [3, 7] in {c(6)}_seg.nii.gz "
        "(convention brats2021 allows 0, 1, 2, 4)",
    )
    assert reasons[c(7)] == (
        f"{c(7)}_t1ce.nii.gz",
        f"empty volume: {c(7)}_t1ce.nii.gz has no non-zero voxel",
    )
    # Only the good cases were stored; the manifest commits the version.
    stored = {
        o.uri.split("/raw/")[1].split("/")[0] for o in storage.list(join(result.ref.prefix, "raw"))
    }
    assert stored == {c(0), c(8), c(9)}
    assert storage.get_json(join(bucket, "datasets", "mixed", "latest.json")) == {
        "version": result.ref.version
    }


def test_strict_fails_and_writes_nothing(broken_root: Path, storage: Storage, bucket: str) -> None:
    with pytest.raises(DatasetError, match="7 invalid cases with --strict"):
        ingest(str(broken_root), "strict", bucket, storage=storage, strict=True)
    assert list(storage.list(join(bucket, "datasets"))) == []


def test_reingest_is_a_noop(synth_root: Path, storage: Storage, bucket: str) -> None:
    first = ingest(str(synth_root / "brats2021"), "b21", bucket, storage=storage)
    assert first.created and first.uploaded == 6 * 5
    objects = [(o.uri, o.size) for o in storage.list(bucket)]
    second = ingest(str(synth_root / "brats2021"), "b21", bucket, storage=storage)
    assert not second.created and second.uploaded == 0
    assert second.ref.version == first.ref.version
    assert second.manifest.created_at == first.manifest.created_at
    assert [(o.uri, o.size) for o in storage.list(bucket)] == objects


def test_list_manifests_finds_every_stored_version(
    synth_root: Path, storage: Storage, bucket: str
) -> None:
    from medseg.data.manifest import list_manifests

    assert list_manifests(storage, bucket) == []
    a = ingest(str(synth_root / "brats2021"), "a", bucket, storage=storage).manifest
    b = ingest(str(synth_root / "msd"), "b", bucket, storage=storage).manifest
    found = sorted(list_manifests(storage, bucket), key=lambda m: m.name)
    assert [(m.name, m.version, m.layout) for m in found] == [
        ("a", a.version, "brats2021"),
        ("b", b.version, "msd"),
    ]


def test_manifest_records_facts_and_a_seeded_split(
    synth_root: Path, storage: Storage, bucket: str
) -> None:
    result = ingest(str(synth_root / "brats2021"), "facts", bucket, storage=storage)
    m = result.ref.load(storage)
    assert m.version == result.ref.version == m.content_hash()
    assert (m.layout, m.convention) == ("brats2021", "brats2021")
    assert len(m.split_ids("validation")) == 1 and len(m.split_ids("train")) == 5
    case3 = m.case("BraTS2021_00003")
    assert case3.orientation == "LPS" and case3.shape == SHAPE
    case4 = m.case("BraTS2021_00004")
    assert case4.spacing == (1.0, 1.0, 1.5)
    seg = np.asarray(
        nib.load(
            synth_root / "brats2021" / "BraTS2021_00000" / "BraTS2021_00000_seg.nii.gz"
        ).dataobj
    )
    counts = m.case("BraTS2021_00000").label_counts
    assert counts == {str(v): int((seg == v).sum()) for v in (1, 2, 4)}
    for f in m.case("BraTS2021_00000").files:
        assert storage.stat(join(result.ref.prefix, f.key)).sha256 == f.sha256
    # Another seed, another split; the same data otherwise, so another version.
    other = ingest(
        str(synth_root / "brats2021"), "facts", bucket, storage=storage, split=SplitConfig(seed=5)
    )
    assert other.ref.version != result.ref.version


def test_identifying_header_text_is_blanked(
    synth_root: Path, storage: Storage, bucket: str
) -> None:
    src = synth_root / "brats2021" / "BraTS2021_00000" / "BraTS2021_00000_t1.nii.gz"
    assert b"DOB" in nib.load(src).header["descrip"].tobytes()
    result = ingest(str(synth_root / "brats2021"), "anon", bucket, storage=storage)
    stored = storage.get_bytes(
        join(result.ref.prefix, "raw/BraTS2021_00000/BraTS2021_00000_t1.nii.gz")
    )
    img = nib.Nifti1Image.from_bytes(gzip.decompress(stored))
    for field in ("descrip", "aux_file", "db_name", "intent_name"):
        assert img.header[field].tobytes().strip(b"\0 ") == b""
    original = nib.load(src)
    assert np.array_equal(np.asarray(img.dataobj), np.asarray(original.dataobj))
    assert np.allclose(img.affine, original.affine)


@pytest.mark.parametrize(("layout", "convention"), [("brats2023", "brats2023"), ("msd", "msd")])
def test_other_layouts_detected(
    synth_root: Path, storage: Storage, bucket: str, layout: str, convention: str
) -> None:
    result = ingest(str(synth_root / layout), layout, bucket, storage=storage)
    m = result.manifest
    assert (m.layout, m.convention, len(m.cases), m.quarantined) == (layout, convention, 6, [])
    if layout == "msd":
        assert m.cases[0].channel_index == {"flair": 0, "t1": 1, "t1gd": 2, "t2": 3}
        assert [(f.role, f.key) for f in m.cases[0].files] == [
            ("image", "raw/BRATS_001/imagesTr/BRATS_001.nii.gz"),
            ("label", "raw/BRATS_001/labelsTr/BRATS_001.nii.gz"),
        ]


def test_labels_override_applies_the_named_convention(
    synth_root: Path, storage: Storage, bucket: str
) -> None:
    # BraTS 2023 data read as BraTS 2021: label 3 is unknown there, so no case is valid.
    with pytest.raises(DatasetError, match=r"no valid case among 6 .*unknown label values \[3\]"):
        ingest(str(synth_root / "brats2023"), "x", bucket, storage=storage, labels="brats2021")


def test_ingest_from_s3_source_gives_the_same_version(
    synth_root: Path, storage: Storage, bucket: str
) -> None:
    src = synth_root / "msd"
    for p in sorted(src.rglob("*")):
        if p.is_file():
            storage.put_file(join(bucket, "incoming", str(p.relative_to(src))), p)
    from_s3 = ingest(join(bucket, "incoming"), "msd", bucket, storage=storage)
    from_disk = ingest(str(src), "msd", bucket, storage=storage)
    assert from_s3.ref.version == from_disk.ref.version and not from_disk.created


def _upload_tree(storage: Storage, folder: Path, prefix: str) -> None:
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            storage.put_file(join(prefix, str(p.relative_to(folder))), p)


def test_an_s3_source_is_read_case_by_case(
    synth_root: Path, storage: Storage, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ``s3://`` BraTS source is not copied whole: a case's files are on local disk only
    while that case is read (once per pass), and the version is the local folder's."""
    import contextlib

    from medseg.data import ingest as ingest_module

    src = synth_root / "brats2021"
    _upload_tree(storage, src, join(bucket, "drop"))
    real = ingest_module._Mirror.present
    on_disk: list[list[str]] = []

    @contextlib.contextmanager
    def present(self: Any, paths: Any) -> Any:
        with real(self, paths):
            files = [p for p in self.root.rglob("*") if p.is_file() and p.stat().st_size]
            on_disk.append(sorted({p.relative_to(self.root).parts[0] for p in files}))
            yield

    monkeypatch.setattr(ingest_module._Mirror, "present", present)
    from_s3 = ingest(join(bucket, "drop"), "stream", bucket, storage=storage)
    cases = sorted(c.case_id for c in from_s3.manifest.cases)
    assert len(cases) == 6 and not from_s3.manifest.quarantined
    assert on_disk == [[c] for c in cases] * 2  # validated, then made again to upload
    from_disk = ingest(str(src), "stream", bucket, storage=storage)
    assert from_disk.ref.version == from_s3.ref.version and not from_disk.created


def test_an_s3_object_removed_after_listing_quarantines_its_case(
    synth_root: Path, storage: Storage, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from medseg.data import ingest as ingest_module

    _upload_tree(storage, synth_root / "brats2021", join(bucket, "gone"))
    gone = join(bucket, "gone", "BraTS2021_00003", "BraTS2021_00003_t2.nii.gz")
    make = ingest_module._Mirror.make.__func__  # type: ignore[attr-defined]

    def listed_then_removed(cls: Any, source: str, storage: Storage, root: Path) -> Any:
        mirror = make(cls, source, storage, root)
        storage.delete(gone)
        return mirror

    monkeypatch.setattr(ingest_module._Mirror, "make", classmethod(listed_then_removed))
    result = ingest(join(bucket, "gone"), "gone", bucket, storage=storage, workers=2)
    assert len(result.manifest.cases) == 5
    [q] = result.manifest.quarantined
    assert q.case_id == "BraTS2021_00003" and q.file == "BraTS2021_00003_t2.nii.gz"
    assert q.reason == f"{gone} was removed after it was listed"


def test_bad_sources(tmp_path: Path, storage: Storage, bucket: str) -> None:
    with pytest.raises(DatasetError, match="is not a folder"):
        ingest(str(tmp_path / "nope"), "x", bucket, storage=storage)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "readme.txt").write_text("hi")
    with pytest.raises(DatasetError, match="no known layout"):
        ingest(str(tmp_path / "junk"), "x", bucket, storage=storage)


def test_resolve_versions(synth_root: Path, storage: Storage, bucket: str) -> None:
    result = ingest(str(synth_root / "brats2021"), "res", bucket, storage=storage)
    for spec in ("res", "res@latest", f"res@{result.ref.version}"):
        assert DatasetRef.resolve(storage, bucket, spec).version == result.ref.version
    with pytest.raises(DatasetError, match="does not exist"):
        DatasetRef.resolve(storage, bucket, "res@0000000000000000")
    with pytest.raises(DatasetError, match="has no versions"):
        DatasetRef.resolve(storage, bucket, "never-ingested")


def test_parallel_validation_matches_serial(
    broken_root: Path, storage: Storage, bucket: str, tmp_path: Path
) -> None:
    serial = ingest(str(broken_root), "p", bucket, storage=storage)
    local_store = str(tmp_path / "store")
    parallel = ingest(str(broken_root), "p", local_store, storage=storage, workers=2)
    assert parallel.ref.version == serial.ref.version
    assert parallel.manifest.quarantined == serial.manifest.quarantined
    assert (Path(local_store) / "datasets" / "p" / parallel.ref.version / "manifest.json").is_file()


def test_ingest_survives_a_minio_restart(synth_root: Path, own_minio, tmp_path: Path) -> None:
    import threading
    import time

    storage = Storage(own_minio.settings(retry_seconds=60))
    storage.ensure_bucket("s3://restart")
    own_minio.kill()  # down when ingest starts uploading; back 2 s later
    thread = threading.Thread(target=lambda: (time.sleep(2), own_minio.start()))
    thread.start()
    result = ingest(str(synth_root / "brats2021"), "r", "s3://restart", storage=storage)
    thread.join()
    assert result.created and result.uploaded == 30
    assert DatasetRef.resolve(storage, "s3://restart", "r").version == result.ref.version


# -- the cache is keyed on content, not on the source's path ----------------------------------


def _copy_case(root: Path, src_id: str, new_id: str) -> None:
    src = root / src_id
    (root / new_id).mkdir()
    for f in src.iterdir():
        (root / new_id / f.name.replace(src_id, new_id)).write_bytes(f.read_bytes())


def test_new_data_under_the_same_folder_is_a_new_version(
    synth_root: Path, storage: Storage, bucket: str, tmp_path: Path
) -> None:
    import shutil

    root = tmp_path / "incoming"
    shutil.copytree(synth_root / "brats2021", root)
    first = ingest(str(root), "grow", bucket, storage=storage)
    again = ingest(str(root), "grow", bucket, storage=storage)
    assert again.cached and again.ref.version == first.ref.version and again.uploaded == 0

    # A case modified in place: a new version, holding the new bytes.
    t1 = _path(root, 0, "t1")
    data = np.asarray(nib.load(t1).dataobj)
    _rewrite(t1, (data + 1).astype(data.dtype))
    modified = ingest(str(root), "grow", bucket, storage=storage)
    assert modified.created and not modified.cached
    assert modified.ref.version != first.ref.version
    new_sha = modified.manifest.case("BraTS2021_00000").file("t1").sha256
    assert new_sha != first.manifest.case("BraTS2021_00000").file("t1").sha256

    # A case added under the same folder: a new version containing it.
    _copy_case(root, "BraTS2021_00001", "BraTS2021_00042")
    added = ingest(str(root), "grow", bucket, storage=storage)
    assert added.ref.version not in (first.ref.version, modified.ref.version)
    assert "BraTS2021_00042" in {c.case_id for c in added.manifest.cases}
    assert DatasetRef.resolve(storage, bucket, "grow").version == added.ref.version


def test_new_objects_under_the_same_prefix_are_a_new_version(
    synth_root: Path, storage: Storage, bucket: str
) -> None:
    src = synth_root / "brats2021"
    for case in ("BraTS2021_00000", "BraTS2021_00001"):
        for p in sorted((src / case).iterdir()):
            storage.put_file(join(bucket, "drop", case, p.name), p)
    first = ingest(join(bucket, "drop"), "s3grow", bucket, storage=storage)
    assert ingest(join(bucket, "drop"), "s3grow", bucket, storage=storage).cached
    for p in sorted((src / "BraTS2021_00002").iterdir()):
        storage.put_file(join(bucket, "drop", "BraTS2021_00002", p.name), p)
    second = ingest(join(bucket, "drop"), "s3grow", bucket, storage=storage)
    assert second.created and second.ref.version != first.ref.version
    assert len(second.manifest.cases) == 3


# -- what is read back, and what is left behind --------------------------------------------------


def test_leftover_objects_without_checksum_are_replaced(
    synth_root: Path, storage: Storage, bucket: str
) -> None:
    import io

    from medseg.core.storage import split_s3

    first = ingest(str(synth_root / "msd"), "left", bucket, storage=storage)
    # As after an interrupted run: no manifest yet, and an object some other writer replaced.
    for obj in storage.list(join(bucket, "datasets", "left")):
        if not obj.uri.endswith(".nii.gz"):
            storage.delete(obj.uri)
    entry = first.manifest.cases[0].files[0]
    b, key = split_s3(join(first.ref.prefix, entry.key))
    storage._s3().put_object(b, key, io.BytesIO(b"not the case"), 12)
    again = ingest(str(synth_root / "msd"), "left", bucket, storage=storage)
    assert again.ref.version == first.ref.version and again.uploaded == 1
    assert storage.get_bytes(join(first.ref.prefix, entry.key), sha256=entry.sha256)


def test_a_changed_manifest_is_refused(synth_root: Path, storage: Storage, bucket: str) -> None:
    result = ingest(str(synth_root / "msd"), "man", bucket, storage=storage)
    doc = storage.get_json(result.ref.manifest_uri)
    doc["cases"] = doc["cases"][1:]  # a case dropped by hand after ingest
    storage.put_json(result.ref.manifest_uri, doc)
    with pytest.raises(DatasetError, match="changed after ingest"):
        result.ref.load(storage)


def test_symlinks_out_of_the_source_are_not_followed(
    synth_root: Path, storage: Storage, bucket: str, tmp_path: Path
) -> None:
    import shutil

    root = tmp_path / "src"
    shutil.copytree(synth_root / "brats2021", root)
    outside = tmp_path / "elsewhere.nii.gz"
    shutil.copy(_path(root, 1, "t1"), outside)  # a valid NIfTI, so only the link is wrong
    _path(root, 1, "t1").unlink()
    _path(root, 1, "t1").symlink_to(outside)
    inside = _path(root, 2, "t2")  # a link that stays inside the source is fine
    kept = inside.with_name(".original-t2.nii.gz")
    inside.rename(kept)
    inside.symlink_to(kept)
    result = ingest(str(root), "links", bucket, storage=storage)
    q = {c.case_id: c for c in result.manifest.quarantined}
    assert list(q) == ["BraTS2021_00001"]
    assert q["BraTS2021_00001"].file == "BraTS2021_00001_t1.nii.gz"
    assert "outside the source folder" in q["BraTS2021_00001"].reason
    assert str(outside) in q["BraTS2021_00001"].reason
    assert "BraTS2021_00002" in {c.case_id for c in result.manifest.cases}


def test_case_ids_follow_the_naming_rule(
    synth_root: Path, storage: Storage, bucket: str, tmp_path: Path
) -> None:
    import shutil

    root = tmp_path / "src"
    shutil.copytree(synth_root / "brats2021", root)
    _copy_case(root, "BraTS2021_00000", "bad@case")
    result = ingest(str(root), "ids", bucket, storage=storage)
    q = {c.case_id: c.reason for c in result.manifest.quarantined}
    assert "case id 'bad@case' is not allowed" in q["bad@case"]


# -- scratch: no copy of a case is kept between validation and upload ---------------------------


def _local_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _on_upload(monkeypatch: pytest.MonkeyPatch, hook: Callable[[str], None]) -> None:
    """Call ``hook(uri)`` before the real Storage writes each object (both of its writes)."""
    put_bytes, put_file = Storage.put_bytes, Storage.put_file

    def spy_bytes(self: Storage, uri: str, data: bytes) -> ObjectInfo:
        hook(uri)
        return put_bytes(self, uri, data)

    def spy_file(self: Storage, uri: str, path: str | Path, progress: Any = None) -> ObjectInfo:
        hook(uri)
        return put_file(self, uri, path, progress)

    monkeypatch.setattr(Storage, "put_bytes", spy_bytes)
    monkeypatch.setattr(Storage, "put_file", spy_file)


@pytest.mark.parametrize("layout", ["brats2021", "msd"])
def test_scratch_holds_at_most_one_case_while_uploading(
    synth_root: Path,
    storage: Storage,
    bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    layout: str,
) -> None:
    """The scratch folder, measured as each object is uploaded (every file's header text is
    blanked, so each is a de-identified copy), never holds more than one case's files."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    held: dict[str, int] = {}

    def measure(uri: str) -> None:
        if "/raw/" in uri:
            held[uri] = _local_bytes(scratch)

    _on_upload(monkeypatch, measure)
    result = ingest(str(synth_root / layout), "scratch", bucket, storage=storage)
    files = [f for c in result.manifest.cases for f in c.files]
    assert len(held) == len(files) == result.uploaded == 6 * (5 if layout == "brats2021" else 2)
    one_case = max(sum(f.size for f in c.files) for c in result.manifest.cases)
    assert max(held.values()) <= one_case
    assert _local_bytes(scratch) == 0


@pytest.mark.parametrize("change", ["rewritten", "deleted"])
def test_a_source_changed_during_ingest_is_refused_and_nothing_is_committed(
    synth_root: Path,
    storage: Storage,
    bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    change: str,
) -> None:
    """Case 3's T1 changes after validation, as the first case is uploaded: the run fails
    naming the case and the file, and the 5 files of cases 0-2 it had uploaded are removed."""
    import shutil

    root = tmp_path / "src"
    shutil.copytree(synth_root / "brats2021", root)
    t1 = _path(root, 3, "t1")
    uploads: list[str] = []

    def change_case_3(uri: str) -> None:
        if not uploads:
            if change == "deleted":
                t1.unlink()
            else:
                data = np.asarray(nib.load(t1).dataobj)
                _rewrite(t1, (data + 1).astype(data.dtype))
        uploads.append(uri)

    _on_upload(monkeypatch, change_case_3)
    reason = (
        r"changed since it was validated \(sha256 [0-9a-f]{12}…, now [0-9a-f]{12}…\)"
        if change == "rewritten"
        else r"no longer valid: BraTS2021_00003_t1\.nii\.gz is unreadable"
    )
    with pytest.raises(DatasetError) as failed:
        ingest(str(root), "moving", bucket, storage=storage)
    message = str(failed.value)
    assert re.search(rf"case BraTS2021_00003, BraTS2021_00003_t1\.nii\.gz: {reason}", message)
    assert "the 15 files this run had uploaded were removed" in message
    assert len(uploads) == 15  # cases 0-2; nothing of case 3 or after
    assert list(storage.list(join(bucket, "datasets"))) == []  # no manifest, no object
    if change == "rewritten":  # the source, stable again, ingests
        again = ingest(str(root), "moving", bucket, storage=storage)
        assert again.created and len(again.manifest.cases) == 6


def test_what_was_stored_before_survives_a_refused_run(
    synth_root: Path, storage: Storage, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Objects an interrupted earlier run left for the same version are kept when this run
    fails; only what this run uploaded goes."""
    import shutil

    root = tmp_path / "src"
    shutil.copytree(synth_root / "brats2021", root)
    first = ingest(str(root), "keep", bucket, storage=storage)
    # As after an interrupted run: no manifest or records, and case 0 not uploaded yet.
    for obj in storage.list(join(bucket, "datasets", "keep")):
        if "/raw/" not in obj.uri or "/raw/BraTS2021_00000/" in obj.uri:
            storage.delete(obj.uri)
    left = [(o.uri, o.size) for o in storage.list(bucket)]
    assert len(left) == 5 * 5
    t1 = _path(root, 3, "t1")

    def change_case_3(uri: str) -> None:
        data = np.asarray(nib.load(t1).dataobj)
        _rewrite(t1, (data + 1).astype(data.dtype))

    _on_upload(monkeypatch, change_case_3)
    with pytest.raises(DatasetError, match="the 5 files this run had uploaded were removed"):
        ingest(str(root), "keep", bucket, storage=storage)
    assert [(o.uri, o.size) for o in storage.list(bucket)] == left
    assert not storage.exists(first.ref.manifest_uri)
