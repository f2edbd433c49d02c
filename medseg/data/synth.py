"""Deterministic synthetic BraTS-like MRI cases, written in the public layouts.

Each case is a skull-stripped brain (zero outside, as BraTS releases are) with white and grey
matter, ventricles, and a glioma of three sub-regions whose contrast differs per modality the way
real MRI does:

=============  ====  =====  ====  =====
region         T1    T1Gd   T2    FLAIR
=============  ====  =====  ====  =====
oedema         dark  dark   bright bright
enhancing rim  ~     bright ~     ~
necrotic core  dark  dark   bright ~
=============  ====  =====  ====  =====

Tumour size, position, shape and contrast vary per case; Gaussian noise and a smooth
multiplicative bias field are applied. Volumes have real NIfTI affines at 1 mm; every fifth case
is stored in another orientation (LPS) and every fifth (offset) at 1.5 mm slice spacing, so that
reorientation and resampling in preprocessing are exercised. A case depends only on
``(seed, index, shape)``.

:func:`write_dicom_dataset` writes the same cases as DICOM studies (classic MR Image Storage,
one series per channel, named the way scanners name them) with the variants a DICOM reader
must handle: an oblique orientation, a series numbered against its slice order, a series on
another grid (thicker slices), stored values with a rescale slope and intercept, and a study
with a missing series.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from medseg.core.errors import InvalidInput
from medseg.data.layouts import SUFFIXES
from medseg.dicom.series import StudyInfo, write_study
from medseg.tasks.brats import CHANNELS
from medseg.tasks.labels import get_convention

__all__ = [
    "DicomVariant",
    "SynthCase",
    "dicom_variant",
    "make_case",
    "synthesize",
    "write_dataset",
    "write_dicom_dataset",
]

# Tissue intensities per channel (t1, t1gd, t2, flair), relative to white matter on T1.
_WM = np.array([0.80, 0.80, 0.45, 0.50])
_GM = np.array([0.55, 0.57, 0.62, 0.62])
_CSF = np.array([0.20, 0.22, 1.00, 0.12])
_OEDEMA = np.array([0.45, 0.47, 0.95, 1.05])
_ENHANCING = np.array([0.60, 1.35, 0.75, 0.85])
_NECROSIS = np.array([0.30, 0.20, 1.10, 0.55])
#: Identifying-looking header text, so that ingest's blanking has something to remove.
SYNTH_DESCRIP = "medseg synth subject {case_id} DOB 1970-01-01"


@dataclass
class SynthCase:
    """A case in canonical orientation before it is written.

    Attributes:
        case_id: Identifier used for file names.
        image: ``[4, X, Y, Z]`` float32 in :data:`medseg.config.CHANNELS` order.
        necrosis: Necrotic / non-enhancing core mask.
        oedema: Oedema mask (whole tumour outside the core).
        enhancing: Enhancing tumour mask.
        affine: Voxel-to-world (RAS, mm) affine.
    """

    case_id: str
    image: NDArray[np.float32]
    necrosis: NDArray[np.bool_]
    oedema: NDArray[np.bool_]
    enhancing: NDArray[np.bool_]
    affine: NDArray[np.float64]


def _smooth_noise(
    rng: np.random.Generator, shape: tuple[int, ...], cells: int
) -> NDArray[np.float64]:
    """Smooth random field in [-1, 1]: coarse noise upsampled to ``shape``."""
    coarse = rng.standard_normal(tuple(max(2, min(cells, s)) for s in shape))
    field = ndimage.zoom(coarse, [s / c for s, c in zip(shape, coarse.shape, strict=True)], order=1)
    field = field[tuple(slice(0, s) for s in shape)]
    return np.asarray(field / (np.abs(field).max() + 1e-8))


def _ellipsoid(
    grid: list[NDArray[np.float64]], center: NDArray[np.float64], radii: NDArray[np.float64]
) -> NDArray[np.float64]:
    """Normalised ellipsoid distance: < 1 inside."""
    return np.asarray(sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii, strict=True)))


def make_case(index: int, shape: tuple[int, int, int] = (96, 96, 64), seed: int = 0) -> SynthCase:
    """Generate one case deterministically from ``(seed, index, shape)``."""
    rng = np.random.default_rng([seed, index])
    size = np.array(shape, dtype=np.float64)
    grid = list(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"))

    # Brain: a jittered ellipsoid with a wobbly surface.
    centre = size / 2 + rng.uniform(-0.03, 0.03, 3) * size
    radii = size * rng.uniform(0.38, 0.44, 3)
    wobble = _smooth_noise(rng, shape, 6)
    brain = _ellipsoid(grid, centre, radii) < 1.0 + 0.08 * wobble
    # Grey matter near the surface, white inside, with a textured boundary.
    depth = _ellipsoid(grid, centre, radii)
    texture = _smooth_noise(rng, shape, 10)
    white = depth + 0.15 * texture < 0.55
    vent_off = np.array([0.08 * size[0], 0, 0])
    vent_r = size * np.array([0.05, 0.12, 0.06])
    ventricles = (_ellipsoid(grid, centre + vent_off, vent_r) < 1) | (
        _ellipsoid(grid, centre - vent_off, vent_r) < 1
    )

    # Tumour: whole tumour > core > necrosis, each a perturbed ellipsoid around one centre.
    direction = rng.standard_normal(3)
    direction /= np.linalg.norm(direction)
    t_centre = centre + direction * radii * rng.uniform(0.0, 0.45)
    r_wt = min(shape) * rng.uniform(0.12, 0.24) * rng.uniform(0.8, 1.2, 3)
    r_tc = r_wt * rng.uniform(0.45, 0.7)
    r_nc = r_tc * rng.uniform(0.45, 0.7)
    bumps = _smooth_noise(rng, shape, 8)
    whole = (_ellipsoid(grid, t_centre, r_wt) < 1.0 + 0.35 * bumps) & brain
    core = (_ellipsoid(grid, t_centre, r_tc) < 1.0 + 0.25 * bumps) & whole
    necrosis = (_ellipsoid(grid, t_centre, r_nc) < 1.0 + 0.2 * bumps) & core
    enhancing = core & ~necrosis
    oedema = whole & ~core

    tissue = np.where(white[None], _WM[:, None, None, None], _GM[:, None, None, None])
    tissue = np.where(ventricles[None], _CSF[:, None, None, None], tissue)
    contrast = rng.uniform(0.7, 1.2)
    image = tissue.copy()
    for mask, values in ((oedema, _OEDEMA), (enhancing, _ENHANCING), (necrosis, _NECROSIS)):
        target = values[:, None, None, None]
        image = np.where(mask[None], tissue + contrast * (target - tissue), image)

    bias = np.exp(0.25 * _smooth_noise(rng, shape, 3))
    noise_sd = rng.uniform(0.03, 0.06)
    image = image * bias[None] + rng.normal(0.0, noise_sd, image.shape)
    image = np.clip(image, 0.01, None) * brain[None]
    image *= rng.uniform(800, 1200)  # arbitrary scanner units, as real MRI has

    affine = np.eye(4)
    affine[:3, 3] = -size / 2  # origin near the centre, as scanners place it
    return SynthCase(
        case_id=f"{index:05d}",
        image=image.astype(np.float32),
        necrosis=necrosis,
        oedema=oedema,
        enhancing=enhancing,
        affine=affine,
    )


def _variant(
    case: SynthCase, index: int
) -> tuple[NDArray[np.float32], NDArray[np.uint8], NDArray[np.float64]]:
    """Apply the storage variant of case ``index``: another orientation or slice spacing.

    Returns the image, a per-voxel region code (0 none, 1 necrosis, 2 oedema, 3 enhancing) and
    the affine, all consistent with each other in world space.
    """
    code = np.zeros(case.necrosis.shape, dtype=np.uint8)
    code[case.oedema] = 2
    code[case.necrosis] = 1
    code[case.enhancing] = 3
    image, affine = case.image, case.affine.copy()
    if index % 5 == 3:  # stored LPS: flip the first two axes, adjust the affine to match
        image = image[:, ::-1, ::-1, :].copy()
        code = code[::-1, ::-1, :].copy()
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        nx, ny = case.necrosis.shape[:2]
        flip[0, 3] = nx - 1
        flip[1, 3] = ny - 1
        affine = affine @ flip
    elif index % 5 == 4:  # thick slices: 1.5 mm along the third axis
        factor = 1.0 / 1.5
        image = ndimage.zoom(image, (1, 1, 1, factor), order=1).astype(np.float32)
        code = ndimage.zoom(code, (1, 1, factor), order=0)
        affine = affine @ np.diag([1.0, 1.0, 1.5, 1.0])
    return image, code, affine


def _code_to_labels(code: NDArray[np.uint8], convention: str) -> NDArray[np.uint8]:
    necrosis, oedema, enhancing = code == 1, code == 2, code == 3
    regions = np.stack([necrosis | enhancing, necrosis | enhancing | oedema, enhancing])
    return get_convention(convention).from_regions(regions)


def _save(data: NDArray[np.generic], affine: NDArray[np.float64], path: Path, case_id: str) -> None:
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.header["descrip"] = SYNTH_DESCRIP.format(case_id=case_id).encode()[:79]
    img.header["aux_file"] = b"synthetic"
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)


def _write_brats_case(
    root: Path, layout: str, name: str, image: np.ndarray, code: np.ndarray, affine: np.ndarray
) -> str:
    """One case in a BraTS layout (a folder of one file per channel and the label); its id."""
    prefix = "BraTS2021_" if layout == "brats2021" else "BraTS-GLI-"
    case_id = f"{prefix}{name}" + ("" if layout == "brats2021" else "-000")
    suffixes = SUFFIXES[layout]
    image_i16 = np.round(image).astype(np.int16)  # MRI scanners store integers; keep that realism
    for c, channel in enumerate(CHANNELS):
        path = root / case_id / f"{case_id}{suffixes[channel]}.nii.gz"
        _save(image_i16[c], affine, path, case_id)
    path = root / case_id / f"{case_id}{suffixes['label']}.nii.gz"
    _save(_code_to_labels(code, layout), affine, path, case_id)
    return case_id


def _write_msd_case(
    root: Path, i: int, image: np.ndarray, code: np.ndarray, affine: np.ndarray
) -> str:
    """Case ``i`` in MSD Task01's layout (``imagesTr``, channels last; ``labelsTr``); its id."""
    case_id = f"BRATS_{i + 1:03d}"
    # MSD Task01 channel order: FLAIR, T1w, t1gd, T2w (channels last).
    order = [CHANNELS.index(c) for c in ("flair", "t1", "t1gd", "t2")]
    channels_last = np.moveaxis(image[order], 0, -1).astype(np.float32)
    _save(channels_last, affine, root / "imagesTr" / f"{case_id}.nii.gz", case_id)
    _save(_code_to_labels(code, "msd"), affine, root / "labelsTr" / f"{case_id}.nii.gz", case_id)
    return case_id


def write_dataset(
    out: str | Path,
    layout: str = "brats2021",
    n_cases: int = 8,
    shape: tuple[int, int, int] = (96, 96, 64),
    seed: int = 0,
) -> list[str]:
    """Write ``n_cases`` synthetic cases in a public layout.

    Args:
        out: Folder to write into (created).
        layout: ``brats2021``, ``brats2023`` or ``msd``.
        n_cases: Number of cases.
        shape: Volume shape at 1 mm (before a case's storage variant).
        seed: Dataset seed; the same seed gives byte-identical volumes.

    Returns:
        The case ids written.

    Raises:
        InvalidInput: If a size of ``shape`` is below 1.
    """
    if len(shape) != 3 or min(shape) < 1:
        raise InvalidInput(f"shape {tuple(shape)}: three sizes of at least 1 voxel are needed")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    if layout not in (*SUFFIXES, "msd"):
        raise ValueError(f"unknown layout {layout!r}; known: brats2021, brats2023, msd")
    ids = []
    for i in range(n_cases):
        case = make_case(i, shape, seed)
        image, code, affine = _variant(case, i)
        if layout in SUFFIXES:
            ids.append(_write_brats_case(root, layout, case.case_id, image, code, affine))
        else:
            ids.append(_write_msd_case(root, i, image, code, affine))
    if layout == "msd":
        meta = {
            "name": "BRATS",
            "description": "medseg synthetic cases in the MSD Task01 layout",
            "tensorImageSize": "4D",
            "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
            "labels": {
                "0": "background",
                "1": "edema",
                "2": "non-enhancing tumor",
                "3": "enhancing tumour",
            },
            "numTraining": n_cases,
            "numTest": 0,
            "training": [
                {"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in ids
            ],
            "test": [],
        }
        (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    return ids


#: SeriesDescriptions of the DICOM studies, varied per case as scanner protocols name them.
DICOM_DESCRIPTIONS: tuple[dict[str, str], ...] = (
    {"t1": "AX T1 SE", "t1gd": "AX T1 POST GAD", "t2": "AX T2 TSE", "flair": "AX T2 FLAIR"},
    {
        "t1": "T1_MPRAGE_SAG",
        "t1gd": "T1_MPRAGE_SAG+C",
        "t2": "t2_tse_tra",
        "flair": "t2_tirm_tra_dark-fluid",
    },
    {"t1": "t1n", "t1gd": "t1c", "t2": "t2w", "flair": "t2f"},
)
#: FLAIR is stored with this rescale (slope, intercept), so that readers must apply it.
DICOM_FLAIR_RESCALE = (0.5, -100.0)


@dataclass
class DicomVariant:
    """What :func:`write_dicom_dataset` writes for one case, in NIfTI terms.

    Attributes:
        case_id: The study's folder name.
        image: ``[4, X, Y, Z]`` int16 voxels of every series on the reference grid.
        code: Region code per voxel (see :func:`_variant`) on the same grid.
        affine: Voxel-to-world (RAS) of the reference grid.
        descriptions: SeriesDescription per channel written (a missing series is left out).
        reversed_channels: Channels whose InstanceNumbers run against the slice position.
        other_grid: Channel written on another grid (every second slice), if any.
    """

    case_id: str
    image: NDArray[np.int16]
    code: NDArray[np.uint8]
    affine: NDArray[np.float64]
    descriptions: dict[str, str]
    reversed_channels: tuple[str, ...] = ()
    other_grid: str | None = None


def _rotation(degrees_x: float, degrees_z: float) -> NDArray[np.float64]:
    ax, az = np.deg2rad(degrees_x), np.deg2rad(degrees_z)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    out = np.eye(4)
    out[:3, :3] = rz @ rx
    return out


def dicom_variant(case: SynthCase, index: int) -> DicomVariant:
    """The DICOM study of case ``index``: the NIfTI variant plus the DICOM-only ones.

    ``index % 5``: 0 FLAIR on another grid, 1 oblique (rotated 15° about x and 10° about z),
    2 T2 numbered against slice order, 3 LPS storage, 4 thick slices; ``index % 8 == 5`` has
    no FLAIR series.
    """
    image, code, affine = _variant(case, index)
    if index % 5 == 1:
        affine = _rotation(15.0, 10.0) @ affine
    descriptions = dict(DICOM_DESCRIPTIONS[index % len(DICOM_DESCRIPTIONS)])
    if index % 8 == 5:
        del descriptions["flair"]
    return DicomVariant(
        case_id=f"DICOM_{case.case_id}",
        image=np.round(image).astype(np.int16),
        code=code,
        affine=affine,
        descriptions=descriptions,
        reversed_channels=("t2",) if index % 5 == 2 else (),
        other_grid="flair" if index % 5 == 0 and "flair" in descriptions else None,
    )


def write_dicom_dataset(
    out: str | Path,
    n_cases: int = 8,
    shape: tuple[int, int, int] = (96, 96, 64),
    seed: int = 0,
    convention: str = "brats2021",
) -> list[str]:
    """Write ``n_cases`` synthetic cases as DICOM MR studies (see :func:`dicom_variant`).

    Each case is a folder ``DICOM_NNNNN/`` with one sub-folder per series and the ground
    truth label map ``DICOM_NNNNN_seg.nii.gz`` (in ``convention``) on the reference grid.

    Args:
        out: Folder to write into (created).
        n_cases: Number of studies.
        shape: Volume shape at 1 mm (before a case's variant).
        seed: Dataset seed (the same as :func:`write_dataset`'s for the same voxels).
        convention: Label convention of the ground truth.

    Returns:
        The case ids written.
    """
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    ids = []
    for i in range(n_cases):
        case = make_case(i, shape, seed)
        v = dicom_variant(case, i)
        study = StudyInfo(
            patient_id=f"SYNTH-{case.case_id}",
            patient_name=f"SYNTH^CASE{case.case_id}",
            birth_date=f"19{50 + i % 40:02d}0{1 + i % 9}15",
            study_date=f"2024{1 + i % 12:02d}10",
            accession=f"ACC{case.case_id}",
        )
        grids = {}
        if v.other_grid is not None:
            c = CHANNELS.index(v.other_grid)
            thick = v.image[c][:, :, ::2]
            grids[v.other_grid] = (thick, v.affine @ np.diag([1.0, 1.0, 2.0, 1.0]))
        write_study(
            v.image,
            v.affine,
            root / v.case_id,
            study,
            v.descriptions,
            rescale={"flair": DICOM_FLAIR_RESCALE},
            reverse_instances=v.reversed_channels,
            grids=grids,
        )
        _save(
            _code_to_labels(v.code, convention),
            v.affine,
            root / v.case_id / f"{v.case_id}_seg.nii.gz",
            v.case_id,
        )
        ids.append(v.case_id)
    return ids


#: The layouts (and label conventions) :func:`synthesize` writes.
LAYOUTS = ("brats2021", "brats2023", "msd")
#: The file formats :func:`synthesize` writes.
FORMATS = ("nifti", "dicom")


def synthesize(
    out: str | Path,
    layout: str = "brats2021",
    n_cases: int = 8,
    shape: tuple[int, int, int] = (96, 96, 64),
    seed: int = 0,
    fmt: str = "nifti",
) -> list[str]:
    """Write a synthetic dataset: NIfTI cases in ``layout``, or DICOM studies with its labels.

    Args:
        out: Folder to write into (created).
        layout: One of :data:`LAYOUTS` (for DICOM: the ground truth's label convention).
        n_cases: Number of cases.
        shape: Volume shape at 1 mm.
        seed: Dataset seed.
        fmt: One of :data:`FORMATS`.

    Returns:
        The case ids written.

    Raises:
        InvalidInput: If the layout or the format is unknown, or the shape is empty.
    """
    if layout not in LAYOUTS:
        raise InvalidInput(f"unknown layout {layout!r}: use {', '.join(LAYOUTS)}")
    if fmt not in FORMATS:
        raise InvalidInput(f"unknown format {fmt!r}: use {' or '.join(FORMATS)}")
    if fmt == "dicom":
        return write_dicom_dataset(out, n_cases, shape, seed, convention=layout)
    return write_dataset(out, layout, n_cases, shape, seed)
