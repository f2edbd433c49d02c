"""De-identification of DICOM on ingest: PS3.15 Annex E, Basic Application Confidentiality Profile.

The profile's action table (Table E.1-1, DICOM 2026c, as maintained in the
``dicom-anonymizer`` package) is applied by that package: attributes are removed (X), emptied
(Z) or replaced with dummies (D), private attributes removed. medseg changes three kinds of
action, each as the standard's options allow:

* UIDs (U) are remapped by a keyed hash: the same UID gives the same new UID within a study
  (and across the studies of one key), so references between series and the SEG stay whole,
  yet nothing can map them back without the key;
* dates (DA, DT) are shifted by a whole number of days derived from the key and the PatientID
  (*Retain Longitudinal Temporal Information with Modified Dates Option*): intervals within a
  patient survive, the calendar does not;
* SeriesDescription may be replaced by a clean value such as the matched channel name
  (*Clean Descriptors Option*), so that the de-identified series are still recognisable.

:func:`deidentify_study` applies it to a whole study on its way into a dataset.
PatientID and PatientName become a keyed pseudonym. The key is a secret
(``MEDSEG_DEID_KEY``, see :class:`medseg.core.settings.DeidSettings`); no mapping table exists, so
none can be stored in the dataset bucket or anywhere else.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicomanonymizer import anonymize_dataset, initialize_actions
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.uid import UID

from medseg.core.errors import MedsegError
from medseg.core.storage import Storage, join
from medseg.dicom.series import SeriesRules, load_series

__all__ = [
    "PROFILE_TABLE",
    "DeidentificationError",
    "Deidentifier",
    "deidentify_files",
    "deidentify_study",
    "profile_actions",
]

#: The Annex E table edition ``dicom-anonymizer`` applies.
PROFILE_TABLE = "dicomfields_2026c"
#: Days by which dates move back: at least one year, at most eleven.
_MIN_SHIFT_DAYS, _SPAN_DAYS = 365, 3650
#: DeidentificationMethod (LO: at most 64 characters; the code sequence says it in full).
_METHOD = "PS3.15 E.1 Basic Profile; Modified Dates; Clean Descriptors"

Action = Callable[[Dataset, tuple[int, int]], None]


class DeidentificationError(MedsegError):
    """A dataset cannot be de-identified (an attribute the profile cannot handle)."""


def profile_actions() -> dict[tuple[int, ...], Action]:
    """The profile's action per tag, as ``dicom-anonymizer`` defines it (a fresh copy)."""
    return dict(initialize_actions(PROFILE_TABLE))


def _vr(tag: tuple[int, ...]) -> str | None:
    if len(tag) != 2:
        return None  # a repeating group (curves, overlays): the profile removes them
    try:
        return str(dictionary_VR((tag[0] << 16) | tag[1]))
    except KeyError:
        return None


@dataclass(frozen=True)
class Deidentifier:
    """Applies the profile with keyed UID remapping and per-patient date shifts.

    Attributes:
        key: The secret the remapping and the shifts derive from.
    """

    key: bytes

    def _digest(self, purpose: str, value: str) -> bytes:
        return hmac.new(self.key, f"{purpose}\0{value}".encode(), hashlib.sha256).digest()

    def uid(self, uid: str) -> str:
        """The new UID of ``uid``: ``2.25.`` and a 128-bit keyed hash (a UUID-form UID)."""
        return UID(f"2.25.{int.from_bytes(self._digest('uid', str(uid))[:16], 'big')}")

    def pseudonym(self, patient_id: str) -> str:
        """The PatientID (and PatientName) that replaces ``patient_id``."""
        return f"ANON{self._digest('patient', patient_id).hex()[:16].upper()}"

    def shift_days(self, patient_id: str) -> int:
        """How many days this patient's dates move back."""
        raw = int.from_bytes(self._digest("date", patient_id)[:8], "big")
        return _MIN_SHIFT_DAYS + raw % _SPAN_DAYS

    def _shift(self, value: str, days: int) -> str:
        text = str(value)
        if len(text) < 8:
            return ""  # a partial date (year only) cannot be shifted by days: drop it
        try:
            day = dt.datetime.strptime(text[:8], "%Y%m%d").date()
        except ValueError:
            return ""  # not a date: drop rather than keep something identifying
        return (day - dt.timedelta(days=days)).strftime("%Y%m%d") + text[8:]

    def _actions(self, days: int) -> dict[tuple[int, ...], Action]:
        def remap(ds: Dataset, tag: tuple[int, int]) -> None:
            elem = ds.get(tag)
            if elem is None or not elem.value:
                return
            if isinstance(elem.value, MultiValue | list):
                elem.value = [self.uid(v) for v in elem.value]
            else:
                elem.value = self.uid(elem.value)

        def shift(ds: Dataset, tag: tuple[int, int]) -> None:
            elem = ds.get(tag)
            if elem is None or not elem.value:
                return
            if isinstance(elem.value, MultiValue | list):
                elem.value = [self._shift(v, days) for v in elem.value]
            else:
                elem.value = self._shift(elem.value, days)

        actions = profile_actions()
        for tag in actions:
            vr = _vr(tag)
            if vr == "UI":
                actions[tag] = remap
            elif vr in ("DA", "DT"):
                actions[tag] = shift
        return actions

    def apply(self, ds: Dataset, description: str | None = None) -> None:
        """De-identify ``ds`` in place.

        Args:
            ds: One instance (its file meta too).
            description: A clean SeriesDescription to set (for example the channel name).

        Raises:
            DeidentificationError: If the profile cannot handle an attribute of ``ds``.
        """
        patient = str(ds.get("PatientID", ""))
        actions = self._actions(self.shift_days(patient))
        try:
            anonymize_dataset(ds, delete_private_tags=True, base_rules_gen=lambda: actions)
        except (NotImplementedError, ValueError, TypeError) as exc:
            sop = ds.get("SOPInstanceUID", "?")
            raise DeidentificationError(f"instance {sop} cannot be de-identified: {exc}") from None
        pseudonym = self.pseudonym(patient)
        ds.PatientID = pseudonym
        ds.PatientName = pseudonym
        if description is not None:
            ds.SeriesDescription = description
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = _METHOD
        ds.DeidentificationMethodCodeSequence = [
            _code_item(c)
            for c in (
                codes.DCM.BasicApplicationConfidentialityProfile,
                codes.DCM.RetainLongitudinalTemporalInformationModifiedDatesOption,
                codes.DCM.CleanDescriptorsOption,
            )
        ]


def _code_item(code: Any) -> Dataset:
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item


def deidentify_files(
    source: str | Path | bytes,
    key: bytes,
    rules: SeriesRules | None = None,
    storage: Storage | None = None,
) -> tuple[str, dict[str, bytes]]:
    """The de-identified instances of the four channel series of a study, in memory.

    Each instance becomes ``CHANNEL/NNNN.dcm`` (numbered in the order read) with
    SeriesDescription set to the channel name (Clean Descriptors Option), so that the default
    :class:`medseg.dicom.series.SeriesRules` read it back. Series that are no channel (localisers,
    reports, segmentations) are left out.

    Args:
        source: The study (folder, zip, ``s3://`` prefix, or the bytes of a zip).
        key: The de-identification secret.
        rules: Series-to-channel rules.
        storage: Object store for ``s3://`` sources.

    Returns:
        The de-identified StudyInstanceUID, and the file bytes by relative path.

    Raises:
        medseg.dicom.series.DicomStudyError: If the study lacks a channel or a file is unreadable.
        DeidentificationError: If an instance cannot be de-identified.
    """
    deid = Deidentifier(key)
    encoded: dict[str, bytes] = {}
    study_uid = ""
    for channel, series in load_series(source, rules, storage).items():
        for number, ds in enumerate(series.datasets, start=1):
            deid.apply(ds, description=channel)
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            encoded[f"{channel}/{number:04d}.dcm"] = buf.getvalue()
            study_uid = str(ds.StudyInstanceUID)
    return study_uid, encoded


def deidentify_study(
    source: str | Path,
    dest: str,
    key: bytes,
    rules: SeriesRules | None = None,
    storage: Storage | None = None,
) -> str:
    """De-identify the four channel series of a study and store them under ``dest``.

    The files are those of :func:`deidentify_files`, as ``dest/CHANNEL/NNNN.dcm``. Every
    instance is de-identified in memory first (a study is tens of MB), so a study that cannot
    be read or de-identified stores nothing; a storage failure midway can leave part of it, so
    ``dest`` should be a staging prefix that the caller promotes.

    Args:
        source: The study (folder, zip or ``s3://`` prefix).
        dest: Folder or ``s3://`` prefix to store the de-identified study under.
        key: The de-identification secret.
        rules: Series-to-channel rules.
        storage: Object store for ``s3://`` sources and destinations.

    Returns:
        The de-identified StudyInstanceUID.

    Raises:
        medseg.dicom.series.DicomStudyError: If the study lacks a channel or a file is unreadable.
        DeidentificationError: If an instance cannot be de-identified.
    """
    store = storage or Storage()
    study_uid, encoded = deidentify_files(source, key, rules, store)
    for rel, data in encoded.items():
        store.put_bytes(join(dest, rel), data)
    return study_uid
