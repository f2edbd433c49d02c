"""The public on-disk layouts of brain-tumour MRI datasets, and how to find their cases.

* ``brats2021``: one folder per case, ``CASE/CASE_{t1,t1ce,t2,flair,seg}.nii.gz``.
* ``brats2023``: one folder per case, ``CASE/CASE-{t1n,t1c,t2w,t2f,seg}.nii.gz``.
* ``msd``: Medical Segmentation Decathlon Task01, ``dataset.json``, 4D ``imagesTr/CASE.nii.gz``
  (channels last, in the order ``dataset.json`` names) and ``labelsTr/CASE.nii.gz``.

Each layout implies its label convention (see :mod:`medseg.tasks.labels`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from medseg.core.errors import DatasetError

__all__ = ["LAYOUTS", "RawCase", "detect_layout", "discover_cases"]

#: Per-case-folder layouts: file suffix of each canonical channel, and of the label map.
SUFFIXES: dict[str, dict[str, str]] = {
    "brats2021": {"t1": "_t1", "t1gd": "_t1ce", "t2": "_t2", "flair": "_flair", "label": "_seg"},
    "brats2023": {"t1": "-t1n", "t1gd": "-t1c", "t2": "-t2w", "flair": "-t2f", "label": "-seg"},
}
#: MSD ``dataset.json`` modality names, mapped to canonical channels.
MSD_MODALITIES = {"flair": "flair", "t1w": "t1", "t1gd": "t1gd", "t2w": "t2"}
#: The label convention each layout uses.
LAYOUTS: dict[str, str] = {"brats2021": "brats2021", "brats2023": "brats2023", "msd": "msd"}
_EXTS = (".nii.gz", ".nii")


@dataclass
class RawCase:
    """One case as found on disk.

    Attributes:
        case_id: The case's identifier (its folder or file stem).
        channels: Canonical channel name to file, for one-file-per-modality layouts.
        image4d: The 4D image for the MSD layout.
        channel_index: Canonical channel name to its index in ``image4d``.
        label: The label map, when present.
        missing: Expected files that are absent, by role.
    """

    case_id: str
    channels: dict[str, Path] = field(default_factory=dict)
    image4d: Path | None = None
    channel_index: dict[str, int] = field(default_factory=dict)
    label: Path | None = None
    missing: dict[str, str] = field(default_factory=dict)

    def files(self) -> dict[str, Path]:
        """Every present file by role (channel name, ``image`` or ``label``)."""
        out = dict(self.channels)
        if self.image4d is not None:
            out["image"] = self.image4d
        if self.label is not None:
            out["label"] = self.label
        return out


def _find(folder: Path, stem: str) -> Path | None:
    for ext in _EXTS:
        p = folder / f"{stem}{ext}"
        if p.is_file():
            return p
    return None


def detect_layout(root: Path) -> str:
    """Tell which public layout ``root`` holds.

    Raises:
        DatasetError: If the folder is missing or matches no known layout.
    """
    if not root.is_dir():
        raise DatasetError(f"dataset source {root} is not a folder")
    if (root / "dataset.json").is_file() and (root / "imagesTr").is_dir():
        return "msd"
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        names = [p.name for p in sub.iterdir()]
        for layout in ("brats2021", "brats2023"):
            tail = SUFFIXES[layout]["t1gd"]
            if any(n.startswith(sub.name) and n.split(".")[0].endswith(tail) for n in names):
                return layout
    raise DatasetError(
        f"{root}: no known layout (expected BraTS 2021 case folders with *_t1ce.nii.gz, "
        "BraTS 2023 case folders with *-t1c.nii.gz, or MSD Task01 dataset.json + imagesTr/)"
    )


def discover_cases(root: Path, layout: str) -> list[RawCase]:
    """List the cases of a dataset folder, noting any expected file that is absent."""
    if layout == "msd":
        return _discover_msd(root)
    suffixes = SUFFIXES[layout]
    cases = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        case = RawCase(case_id=folder.name)
        for role, suffix in suffixes.items():
            found = _find(folder, f"{folder.name}{suffix}")
            if found is None:
                case.missing[role] = f"{folder.name}{suffix}.nii.gz"
            elif role == "label":
                case.label = found
            else:
                case.channels[role] = found
        cases.append(case)
    return cases


def _discover_msd(root: Path) -> list[RawCase]:
    try:
        meta = json.loads((root / "dataset.json").read_text())
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{root / 'dataset.json'}: unreadable ({exc})") from None
    modality = meta.get("modality", {})
    index: dict[str, int] = {}
    for key, name in modality.items():
        channel = MSD_MODALITIES.get(str(name).lower())
        if channel is None:
            raise DatasetError(f"{root / 'dataset.json'}: unknown modality {name!r}")
        index[channel] = int(key)
    if sorted(index) != sorted(MSD_MODALITIES.values()):
        raise DatasetError(
            f"{root / 'dataset.json'}: modalities {sorted(index)} are not the four BraTS ones"
        )
    cases = []
    for img in sorted((root / "imagesTr").iterdir()):
        if img.name.startswith(".") or not img.name.endswith(_EXTS):
            continue
        stem = img.name.split(".")[0]
        case = RawCase(case_id=stem, image4d=img, channel_index=dict(index))
        label = _find(root / "labelsTr", stem)
        if label is None:
            case.missing["label"] = f"labelsTr/{stem}.nii.gz"
        else:
            case.label = label
        cases.append(case)
    return cases
