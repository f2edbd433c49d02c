"""The dataset manifest: what a dataset version holds, and where it lives.

A dataset version lives at ``STORE/datasets/NAME/VERSION/``::

    raw/CASE/FILE.nii.gz              the ingested (header-sanitised) files
    manifest.json                     this manifest; written last, so it commits the version
    preprocessed/FINGERPRINT/...      static preprocessing outputs (see medseg.data.preprocess)

``VERSION`` is the content hash of the manifest, so the same data ingested twice is the same
version, and a manifest read back is checked against it. Every file entry records the sha256
of the stored bytes, which every reader verifies. ``STORE/datasets/NAME/latest.json`` points at
the newest version. Names and versions follow :mod:`medseg.core.names`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, Field, field_validator

from medseg.core.errors import DatasetError, ObjectNotFound
from medseg.core.names import check_name
from medseg.core.storage import Storage, join

__all__ = ["CaseEntry", "DatasetRef", "FileEntry", "Manifest", "QuarantinedCase"]


class FileEntry(BaseModel):
    """One stored file of a case.

    Attributes:
        role: A channel name (``t1``, ``t1gd``, ``t2``, ``flair``), ``image`` (4D, or a 2D
            image of a classification task) or ``label``.
        key: Path relative to the version prefix, e.g. ``raw/CASE/CASE_t1.nii.gz``.
        sha256: Hash of the stored bytes.
        size: Size of the stored bytes.
    """

    role: str
    key: str
    sha256: str
    size: int


def _unset(value: object) -> bool:
    return value is None


class CaseEntry(BaseModel):
    """A valid case and the facts checked at ingest.

    A volume (BraTS) has a 3D ``shape`` (voxels), ``spacing`` (mm), ``orientation`` and the
    voxel count of each label. A 2D image of a classification task (a dermoscopy image) has a
    2D ``shape`` (height, width), its class as ``label`` and, as ``group``, the lesion it shows:
    the split keeps a group's cases on one side. ``label`` and ``group`` are left out of the
    stored manifest when unset, so a volume dataset's manifest, and its content hash, are what
    they were before images existed.
    """

    case_id: str
    split: Literal["train", "validation"]
    files: list[FileEntry]
    channel_index: dict[str, int] = Field(default_factory=dict)
    shape: tuple[int, ...]
    spacing: tuple[float, ...] = ()
    orientation: str = ""
    label_counts: dict[str, int] = Field(default_factory=dict)
    label: str | None = Field(default=None, exclude_if=_unset)
    group: str | None = Field(default=None, exclude_if=_unset)

    def file(self, role: str) -> FileEntry:
        """The file with ``role``.

        Raises:
            KeyError: If the case has no such file.
        """
        for f in self.files:
            if f.role == role:
                return f
        raise KeyError(f"case {self.case_id} has no {role} file")


class QuarantinedCase(BaseModel):
    """A case that failed validation, and why."""

    case_id: str
    file: str | None
    reason: str


class Manifest(BaseModel):
    """Everything a dataset version holds.

    ``version`` and ``created_at`` are not part of the content hash.
    """

    name: str
    layout: str
    convention: str
    channels: tuple[str, ...]
    split_seed: int
    val_fraction: float
    cases: list[CaseEntry]
    quarantined: list[QuarantinedCase]
    version: str = ""
    created_at: str = ""

    def content_hash(self) -> str:
        """sha256 (first 16 hex digits) of the manifest without version and date."""
        body = self.model_dump(mode="json", exclude={"version", "created_at"})
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]

    def split_ids(self, split: str) -> list[str]:
        """Case ids of one split."""
        return [c.case_id for c in self.cases if c.split == split]

    def case(self, case_id: str) -> CaseEntry:
        """The entry of ``case_id``."""
        for c in self.cases:
            if c.case_id == case_id:
                return c
        raise KeyError(f"no case {case_id} in dataset {self.name}@{self.version}")


class DatasetRef(BaseModel):
    """A dataset version's location in a store.

    Attributes:
        store: Root URI, e.g. ``s3://medseg`` or a local folder.
        name: Dataset name.
        version: Content-hash version.
    """

    store: str
    name: str
    version: str

    @field_validator("name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        return check_name(name, "dataset name")

    @field_validator("version")
    @classmethod
    def _valid_version(cls, version: str) -> str:
        return check_name(version, "dataset version")

    @property
    def prefix(self) -> str:
        """``STORE/datasets/NAME/VERSION``."""
        return join(self.store, "datasets", self.name, self.version)

    @property
    def manifest_uri(self) -> str:
        """Where the manifest is."""
        return join(self.prefix, "manifest.json")

    def __str__(self) -> str:
        return f"{self.name}@{self.version}"

    @classmethod
    def resolve(cls, storage: Storage, store: str, spec: str) -> DatasetRef:
        """Resolve ``NAME``, ``NAME@latest`` or ``NAME@VERSION`` to a stored version.

        Raises:
            DatasetError: If the dataset or version does not exist.
        """
        name, _, version = spec.partition("@")
        if not name:
            raise DatasetError(f"dataset spec {spec!r} has no name (expected NAME[@VERSION])")
        check_name(name, "dataset name")
        if version in ("", "latest"):
            pointer = join(store, "datasets", name, "latest.json")
            try:
                version = storage.get_json(pointer)["version"]
            except ObjectNotFound:
                raise DatasetError(
                    f"dataset {name!r} has no versions in {store} (no {pointer}); ingest it first"
                ) from None
        ref = cls(store=store, name=name, version=version)
        if not storage.exists(ref.manifest_uri):
            raise DatasetError(f"dataset {ref} does not exist: no {ref.manifest_uri}")
        return ref

    def load(self, storage: Storage) -> Manifest:
        """Read the manifest, checked against the version (its content hash).

        Raises:
            DatasetError: If the manifest was changed after ingest (its hash is not the version).
        """
        manifest = Manifest.model_validate(storage.get_json(self.manifest_uri))
        actual = manifest.content_hash()
        if actual != self.version:
            raise DatasetError(
                f"dataset {self}: {self.manifest_uri} hashes to {actual}, not to its version "
                "(changed after ingest); re-ingest the source"
            )
        return manifest


def list_manifests(storage: Storage, store: str) -> list[Manifest]:
    """Every stored dataset version's manifest, in the store's listing order."""
    return [
        Manifest.model_validate(storage.get_json(obj.uri))
        for obj in storage.list(join(store, "datasets"))
        if obj.uri.endswith("/manifest.json")
    ]
