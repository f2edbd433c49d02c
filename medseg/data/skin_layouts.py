"""The public on-disk layouts of dermoscopy datasets, and how to find their images and labels.

* ``ham10000``: ``HAM10000_metadata.csv`` (``lesion_id, image_id, dx, dx_type, age, sex,
  localization``) beside ``HAM10000_images_part_1/`` and ``HAM10000_images_part_2/`` (or any
  ``HAM10000_images*`` folder, in any case) of ``IMAGE_ID.jpg``;
* ``isic2018``: ISIC 2018 Task 3, a ground-truth CSV ``image, MEL, NV, BCC, AKIEC, BKL, DF,
  VASC`` (one-hot rows) anywhere in the first two levels, the images anywhere below the root
  (``ISIC2018_Task3_Training_Input/IMAGE.jpg``), and, when present, the lesion groupings CSV
  (``image, lesion_id, …``) that ISIC published with it;
* ``folders``: a plain tree, one folder per class named by its code (``nv/``, ``MEL/``, …).

Every image is an :class:`RawImage`: its id, file, class and lesion. The lesion is what the
train/validation split keeps together (HAM10000 holds several images of one lesion, and an
image-level split would put the same lesion on both sides). Where a layout does not say which
lesion an image shows (ISIC 2018 without its groupings CSV, the folder tree), each image is its
own lesion. Problems seen while listing (a row without its file, a file without its row, an
unknown class, a row that is not one-hot) travel with the image as its ``problem``, so that
ingest quarantines it with that reason.
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from medseg.core.errors import DatasetError
from medseg.tasks.skin_classes import CLASSES, ISIC2018_COLUMNS

__all__ = ["IMAGE_EXTS", "LAYOUTS", "RawImage", "detect_layout", "discover_images"]

#: The dermoscopy layouts, in the order :func:`detect_layout` tries them.
LAYOUTS = ("ham10000", "isic2018", "folders")
#: File extensions of images.
IMAGE_EXTS = (".jpg", ".jpeg", ".png")
HAM10000_CSV = "HAM10000_metadata.csv"
_ISIC_HEADER = ("image", *ISIC2018_COLUMNS)


@dataclass
class RawImage:
    """One image as found on disk.

    Attributes:
        image_id: Its identifier (``ISIC_0024306``; the file's stem).
        path: Its file, when there is one.
        label: Its class code (one of :data:`~medseg.tasks.skin_classes.CLASSES`), when known.
        group: Its lesion; the split keeps a lesion's images on one side.
        problem: ``(file, reason)`` when listing already shows the image is unusable.
    """

    image_id: str
    path: Path | None
    label: str | None
    group: str
    problem: tuple[str | None, str] | None = None


def _images_under(folder: Path) -> dict[str, list[Path]]:
    """Image files below ``folder`` (not following links out of folders), by stem."""
    found: dict[str, list[Path]] = {}
    for path in sorted(folder.rglob("*")):
        if path.name.startswith(".") or path.suffix.lower() not in IMAGE_EXTS:
            continue
        if path.is_file() or path.is_symlink():
            found.setdefault(path.stem, []).append(path)
    return found


def _read_csv(path: Path) -> list[list[str]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            return [row for row in csv.reader(f) if any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{path}: unreadable CSV ({exc})") from None


def _header(path: Path) -> tuple[str, ...]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            return tuple(c.strip() for c in next(csv.reader(f), []))
    except (OSError, UnicodeDecodeError, csv.Error):
        return ()


def _isic_csvs(root: Path) -> list[Path]:
    return sorted(p for p in [*root.glob("*.csv"), *root.glob("*/*.csv")] if p.is_file())


def _class_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def detect_layout(root: Path) -> str | None:
    """Which dermoscopy layout ``root`` holds, or None when it holds none of them."""
    if not root.is_dir():
        return None
    if (root / HAM10000_CSV).is_file():
        return "ham10000"
    if any(_header(p)[: len(_ISIC_HEADER)] == _ISIC_HEADER for p in _isic_csvs(root)):
        return "isic2018"
    if any(p.name.lower() in CLASSES for p in _class_folders(root)):
        return "folders"
    return None


def discover_images(root: Path, layout: str) -> list[RawImage]:
    """Every image of the dataset, with its class, lesion and any problem found while listing.

    Raises:
        DatasetError: If the layout's CSV is unreadable or lacks its columns.
    """
    if layout == "ham10000":
        return _discover_ham(root)
    if layout == "isic2018":
        return _discover_isic(root)
    if layout == "folders":
        return _discover_folders(root)
    raise DatasetError(f"unknown image layout {layout!r}; known: {', '.join(LAYOUTS)}")


def _unlisted(files: dict[str, list[Path]], listed: set[str], csv_name: str) -> list[RawImage]:
    out = []
    for stem, paths in files.items():
        if stem not in listed:
            problem = (paths[0].name, f"{paths[0].name} has no row in {csv_name}")
            out.append(RawImage(stem, paths[0], None, stem, problem))
    return out


def _locate(raw: RawImage, files: dict[str, list[Path]], where: str) -> RawImage:
    """Attach the row's file, or the problem that it has none or several."""
    paths = files.get(raw.image_id, [])
    if len(paths) > 1:
        names = ", ".join(str(p) for p in paths)
        raw.problem = raw.problem or (paths[0].name, f"{raw.image_id} has several files: {names}")
    elif not paths:
        expected = f"{raw.image_id}.jpg"
        raw.problem = raw.problem or (expected, f"missing image: expected file {expected} {where}")
    raw.path = paths[0] if paths else None
    return raw


def _discover_ham(root: Path) -> list[RawImage]:
    meta = root / HAM10000_CSV
    rows = _read_csv(meta)
    header = tuple(c.strip() for c in rows[0]) if rows else ()
    need = ("lesion_id", "image_id", "dx")
    if any(c not in header for c in need):
        raise DatasetError(f"{meta}: expected the columns {', '.join(need)}; found {header}")
    col = {name: header.index(name) for name in need}
    files: dict[str, list[Path]] = {}
    for folder in _class_folders(root):
        if folder.name.lower().startswith("ham10000_images"):
            for stem, paths in _images_under(folder).items():
                files.setdefault(stem, []).extend(paths)
    out: list[RawImage] = []
    table = [[c.strip() for c in row] + [""] * len(header) for row in rows[1:]]
    counts = Counter(cells[col["image_id"]] for cells in table)
    for cells in table:
        image_id, lesion, dx = (cells[col[n]] for n in ("image_id", "lesion_id", "dx"))
        raw = RawImage(image_id, None, dx.lower(), lesion or image_id)
        if counts[image_id] > 1:
            raw.problem = (HAM10000_CSV, f"{image_id} is listed twice in {HAM10000_CSV}")
        elif raw.label not in CLASSES:
            raw.problem = (
                HAM10000_CSV,
                f"unknown diagnosis {dx!r} for {image_id} in {HAM10000_CSV} "
                f"(known: {', '.join(CLASSES)})",
            )
        elif not lesion:
            raw.problem = (HAM10000_CSV, f"{image_id} has no lesion_id in {HAM10000_CSV}")
        out.append(_locate(raw, files, "in HAM10000_images_part_1/ or HAM10000_images_part_2/"))
    return out + _unlisted(files, set(counts), HAM10000_CSV)


def _groupings(root: Path) -> dict[str, str]:
    """ISIC 2018's lesion groupings (``image, lesion_id``), when the CSV is present."""
    for path in _isic_csvs(root):
        header = _header(path)
        if header[:2] == ("image", "lesion_id"):
            return {r[0].strip(): r[1].strip() for r in _read_csv(path)[1:] if len(r) > 1}
    return {}


def _discover_isic(root: Path) -> list[RawImage]:
    truth = next(p for p in _isic_csvs(root) if _header(p)[: len(_ISIC_HEADER)] == _ISIC_HEADER)
    rows = _read_csv(truth)
    lesions = _groupings(root)
    files = _images_under(root)
    out: list[RawImage] = []
    counts = Counter(row[0].strip() for row in rows[1:])
    for row in rows[1:]:
        image_id = row[0].strip()
        raw = RawImage(image_id, None, None, lesions.get(image_id) or image_id)
        try:
            values = [float(v) for v in row[1 : len(_ISIC_HEADER)]]
        except ValueError:
            values = []
        hot = [ISIC2018_COLUMNS[i] for i, v in enumerate(values) if v == 1.0]
        one_hot = len(values) == len(ISIC2018_COLUMNS) and all(v in (0.0, 1.0) for v in values)
        if counts[image_id] > 1:
            raw.problem = (truth.name, f"{image_id} is listed twice in {truth.name}")
        elif not one_hot or len(hot) != 1:
            shown = ", ".join(row[1:])
            raw.problem = (truth.name, f"ground truth of {image_id} is not one-hot: {shown}")
        else:
            raw.label = hot[0].lower()
        out.append(_locate(raw, files, f"below {root.name}/"))
    return out + _unlisted(files, set(counts), truth.name)


def _discover_folders(root: Path) -> list[RawImage]:
    out: list[RawImage] = []
    owners: dict[str, list[str]] = {}
    for folder in _class_folders(root):
        label = folder.name.lower()
        for stem, paths in _images_under(folder).items():
            for path in paths:
                raw = RawImage(stem, path, label if label in CLASSES else None, stem)
                if raw.label is None:
                    raw.problem = (
                        path.name,
                        f"{path.name} is in folder {folder.name}/, which names no class "
                        f"(known: {', '.join(CLASSES)})",
                    )
                owners.setdefault(stem, []).append(folder.name)
                out.append(raw)
    for raw in out:
        if len(owners[raw.image_id]) > 1 and raw.problem is None:
            where = ", ".join(f"{f}/" for f in owners[raw.image_id])
            raw.problem = (raw.path.name if raw.path else None, f"{raw.image_id} is in {where}")
    return out
