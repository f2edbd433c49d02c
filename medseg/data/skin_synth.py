"""Deterministic synthetic dermoscopy-like images, written in the HAM10000 layout.

Each image is skin (a tone, a smooth texture, uneven lighting, a dark dermoscope vignette in
some, hairs in some) with one lesion whose shape, colour and texture depend on its class, the
way dermoscopy atlases describe them:

======  =================================================  ===================================
class   shape                                              colour and texture
======  =================================================  ===================================
nv      round or oval, regular border                      even brown, faint pigment network
mel     large, asymmetric, irregular border                several colours: brown, black,
                                                           blue-grey blotches
bkl     oval, sharp "stuck-on" border                      light brown, cracked (cerebriform)
bcc     irregular, pearly                                  pink, branching red vessels,
                                                           blue-grey ovoid nests
akiec   flat, ill-defined border                           red-pink, white scale
vasc    lobules (several round lumps)                      red to purple, sharp
df      small, round                                       brown ring around a white centre
======  =================================================  ===================================

Every parameter is drawn from a range that overlaps the neighbouring classes' (size, colour,
border, texture strength), and the skin, lighting and noise vary per image, so a classifier has
something to learn but cannot read the class off one pixel.

The class counts are HAM10000's (:data:`~medseg.tasks.skin_classes.HAM10000_COUNTS`) scaled to the
number of images asked for, each class at least :data:`MIN_PER_CLASS`. Images come in lesions of
one to three images (as in HAM10000, several images of one lesion): one lesion's images share
its shape, colours and patient metadata, and differ by rotation, position, zoom, lighting and
noise. The JPEGs carry EXIF text and a comment that look identifying, so that ingest's
de-identification has something to remove. Everything depends only on ``(seed, n_images)``.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from scipy import ndimage
from scipy.spatial import cKDTree

from medseg.core.errors import InvalidInput
from medseg.tasks.skin_classes import CLASSES, HAM10000_COUNTS

__all__ = [
    "HAM10000_COLUMNS",
    "IMAGE_SIZE",
    "MIN_PER_CLASS",
    "SynthImage",
    "class_counts",
    "encode_jpeg",
    "make_image",
    "plan_lesions",
    "write_ham10000",
]

#: HAM10000's image size (width, height).
IMAGE_SIZE = (600, 450)
#: The fewest images of any class.
MIN_PER_CLASS = 6
#: ``HAM10000_metadata.csv``'s columns.
HAM10000_COLUMNS = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization")
#: Identifying-looking text in each JPEG's EXIF ImageDescription and comment.
SYNTH_EXIF_TEXT = "medseg synth patient {lesion_id} DOB 1970-01-01 clinic Example"
_FIRST_IMAGE = 24306  # HAM10000's first image is ISIC_0024306
_SITES = (
    "back",
    "lower extremity",
    "trunk",
    "upper extremity",
    "abdomen",
    "face",
    "chest",
    "foot",
    "scalp",
    "neck",
    "hand",
)
_DX_TYPE = {
    "nv": ("follow_up", "histo", "consensus"),
    "mel": ("histo",),
    "bkl": ("histo", "consensus", "confocal"),
    "bcc": ("histo",),
    "akiec": ("histo",),
    "vasc": ("consensus", "histo"),
    "df": ("consensus", "histo"),
}
# RGB in [0, 1]: class colour means (lesion body, accent); per-image jitter overlaps them.
_BODY = {
    "nv": (0.45, 0.30, 0.20),
    "mel": (0.33, 0.22, 0.17),
    "bkl": (0.58, 0.44, 0.32),
    "bcc": (0.72, 0.50, 0.48),
    "akiec": (0.74, 0.44, 0.40),
    "vasc": (0.62, 0.20, 0.28),
    "df": (0.55, 0.40, 0.30),
}


@dataclass(frozen=True)
class SynthImage:
    """One planned image: its ids, class and lesion metadata.

    Attributes:
        image_id: ``ISIC_NNNNNNN``.
        lesion_id: ``HAM_NNNNNNN``; shared by the images of one lesion.
        dx: The class (a :data:`~medseg.tasks.skin_classes.CLASSES` code).
        shot: Which image of its lesion this is (0, 1, …).
        dx_type: How the diagnosis was confirmed.
        age: Patient age (multiple of 5).
        sex: ``male`` or ``female``.
        localization: Body site.
    """

    image_id: str
    lesion_id: str
    dx: str
    shot: int
    dx_type: str
    age: int
    sex: str
    localization: str


def class_counts(n_images: int) -> dict[str, int]:
    """HAM10000's class counts scaled to ``n_images``, each at least :data:`MIN_PER_CLASS`.

    Raises:
        InvalidInput: If ``n_images`` cannot give every class its minimum.
    """
    least = MIN_PER_CLASS * len(CLASSES)
    if n_images < least:
        raise InvalidInput(
            f"{n_images} images: the skin-lesion set needs at least {least} "
            f"({MIN_PER_CLASS} per class, {len(CLASSES)} classes)"
        )
    total = sum(HAM10000_COUNTS.values())
    counts = {c: max(MIN_PER_CLASS, round(n_images * HAM10000_COUNTS[c] / total)) for c in CLASSES}
    counts["nv"] += n_images - sum(counts.values())  # the largest class absorbs the rounding
    return counts


def plan_lesions(n_images: int, seed: int = 0) -> list[SynthImage]:
    """Which images there are: classes, lesions (1–3 images each) and metadata, image-id order.

    Image ids are assigned in a seeded random order, so that neither the id nor the file order
    tells the class.
    """
    rng = np.random.default_rng([seed, 0])
    planned: list[tuple[str, int, int, tuple[str, int, str, str]]] = []
    lesion = 0
    for dx, count in class_counts(n_images).items():
        left = count
        while left:
            size = min(left, int(rng.choice((1, 1, 1, 1, 2, 2, 3))), max(1, count // 3))
            meta = (
                str(rng.choice(_DX_TYPE[dx])),
                int(rng.integers(3, 18)) * 5,
                str(rng.choice(("male", "female"))),
                str(rng.choice(_SITES)),
            )
            planned += [(dx, lesion, shot, meta) for shot in range(size)]
            left -= size
            lesion += 1
    order = rng.permutation(len(planned))
    lesion_numbers = rng.permutation(lesion)
    out = []
    for number, k in enumerate(order):
        dx, les, shot, (dx_type, age, sex, site) = planned[k]
        out.append(
            SynthImage(
                image_id=f"ISIC_{_FIRST_IMAGE + number:07d}",
                lesion_id=f"HAM_{int(lesion_numbers[les]):07d}",
                dx=dx,
                shot=shot,
                dx_type=dx_type,
                age=age,
                sex=sex,
                localization=site,
            )
        )
    return out


def _smooth(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> NDArray[np.float64]:
    """A smooth random field in [-1, 1]."""
    coarse = rng.standard_normal((cells, max(2, round(cells * shape[1] / shape[0]))))
    field = ndimage.zoom(coarse, (shape[0] / coarse.shape[0], shape[1] / coarse.shape[1]), order=1)
    field = field[: shape[0], : shape[1]]
    return np.asarray(field / (np.abs(field).max() + 1e-8))


def _jitter(rng: np.random.Generator, rgb: tuple[float, ...], sd: float) -> NDArray[np.float64]:
    """``rgb`` made brighter or darker by about ``sd``, and each channel by a third of it."""
    shade = np.asarray(rgb) * math.exp(rng.normal(0.0, sd)) + rng.normal(0.0, sd / 3, 3)
    return np.clip(shade, 0.02, 0.98)


def _paint(img: NDArray[np.float64], alpha: NDArray[np.float64], rgb: NDArray[np.float64]) -> None:
    """Blend ``rgb`` into ``img`` with per-pixel weight ``alpha`` (in place)."""
    img += alpha[..., None] * (rgb - img)


@dataclass(frozen=True)
class _Lesion:
    """The class-dependent parameters of one lesion, shared by its images."""

    dx: str
    size: float
    aspect: float
    harmonics: NDArray[np.float64]
    phases: NDArray[np.float64]
    softness: float
    body: NDArray[np.float64]
    skin: NDArray[np.float64]
    seed: int

    def alpha(self, d: NDArray[np.float64], theta: NDArray[np.float64]) -> NDArray[np.float64]:
        """Soft mask: 1 inside the border r(θ), a ramp of ``softness`` across it."""
        radius = np.ones_like(theta)
        for k, (a, p) in enumerate(zip(self.harmonics, self.phases, strict=True), start=2):
            radius += a * np.cos(k * theta + p)
        return np.asarray(np.clip((radius - d) / self.softness + 0.5, 0.0, 1.0))


def _lesion(dx: str, rng: np.random.Generator) -> _Lesion:
    """The class-dependent parameters of one lesion (shared by its images)."""
    irregular = {
        "nv": 0.05,
        "mel": 0.22,
        "bkl": 0.10,
        "bcc": 0.16,
        "akiec": 0.12,
        "vasc": 0.06,
        "df": 0.04,
    }[dx]
    size = {
        "nv": 0.30,
        "mel": 0.40,
        "bkl": 0.32,
        "bcc": 0.28,
        "akiec": 0.30,
        "vasc": 0.22,
        "df": 0.18,
    }[dx]
    harmonics = (
        irregular * rng.uniform(0.3, 1.5) * rng.uniform(0.2, 1.0, 6) / np.arange(1, 7) ** 0.5
    )
    return _Lesion(
        dx=dx,
        size=size * rng.uniform(0.7, 1.35),
        aspect=rng.uniform(0.65, 1.0) if dx != "vasc" else rng.uniform(0.8, 1.0),
        harmonics=harmonics,
        phases=rng.uniform(0, 2 * math.pi, 6),
        softness={"akiec": 0.35, "mel": 0.12, "nv": 0.10}.get(dx, 0.06) * rng.uniform(0.6, 1.6),
        body=_jitter(rng, _BODY[dx], 0.15),
        skin=_jitter(rng, (0.85, 0.66, 0.56), 0.1),
        seed=int(rng.integers(2**31)),
    )


def _features(
    img: NDArray[np.float64],
    alpha: NDArray[np.float64],
    xy: tuple[NDArray[np.float64], NDArray[np.float64]],
    lesion: _Lesion,
    rng: np.random.Generator,
) -> None:
    """The class's colours and textures inside the lesion (in place)."""
    dx = lesion.dx
    x, y = xy
    shape = (img.shape[0], img.shape[1])
    # Structures are the lesion's own (its seed), so its images show the same pattern.
    own = np.random.default_rng(lesion.seed)
    if dx in ("nv", "mel"):  # pigment network: a mesh of darker lines
        period = own.uniform(0.05, 0.09)
        mesh = np.abs(np.sin(x / period * math.pi) * np.sin(y / period * math.pi)) ** 0.3
        strength = own.uniform(0.05, 0.2) if dx == "nv" else own.uniform(0.0, 0.15)
        _paint(img, alpha * strength * (1 - mesh), np.array([0.2, 0.12, 0.08]))
    if dx == "mel":  # blotches of black and blue-grey, off centre
        for colour in ((0.12, 0.08, 0.08), (0.38, 0.42, 0.52), (0.25, 0.15, 0.12)):
            if own.uniform() < 0.75:
                cx, cy = own.uniform(-0.5, 0.5, 2) * lesion.size
                r = own.uniform(0.12, 0.35) * lesion.size
                blob = np.clip(1.2 - np.hypot(x - cx, y - cy) / r, 0, 1) * alpha
                _paint(img, blob * own.uniform(0.5, 0.9), _jitter(own, colour, 0.05))
    if dx == "bkl":  # cracked, cerebriform surface
        cracks = np.abs(_smooth(own, shape, 40)) < 0.08
        _paint(img, alpha * cracks * own.uniform(0.3, 0.6), np.array([0.35, 0.25, 0.18]))
    if dx == "bcc":  # arborising vessels and blue-grey ovoid nests
        points = []
        for _ in range(int(own.integers(3, 8))):
            px, py = own.uniform(-0.25, 0.25, 2)
            angle = own.uniform(0, 2 * math.pi)
            for _step in range(40):
                angle += own.normal(0, 0.35)
                px += 0.006 * math.cos(angle)
                py += 0.006 * math.sin(angle)
                points.append((px, py))
        dist, _ = cKDTree(points).query(
            np.stack([x.ravel(), y.ravel()], axis=1), distance_upper_bound=0.012
        )
        line = np.clip(1.5 - dist.reshape(shape) / 0.006, 0, 1) * alpha
        _paint(img, line * 0.8, np.array([0.70, 0.12, 0.15]))
        for _ in range(int(own.integers(0, 4))):
            cx, cy = own.uniform(-0.2, 0.2, 2)
            nest = np.clip(1.3 - np.hypot((x - cx) / 1.8, y - cy) / 0.03, 0, 1) * alpha
            _paint(img, nest * 0.7, np.array([0.40, 0.45, 0.55]))
    if dx == "akiec":  # white scale
        scale = (rng.uniform(size=shape) < own.uniform(0.01, 0.04)).astype(np.float64)
        scale = ndimage.uniform_filter(scale, 3) * 6
        _paint(img, np.clip(scale, 0, 1) * alpha * 0.8, np.array([0.93, 0.90, 0.86]))
    if dx == "vasc":  # lobules of red to purple
        for _ in range(int(own.integers(3, 8))):
            cx, cy = own.uniform(-0.6, 0.6, 2) * lesion.size
            r = own.uniform(0.2, 0.45) * lesion.size
            lobule = np.clip((r - np.hypot(x - cx, y - cy)) / 0.01, 0, 1) * alpha
            _paint(img, lobule * 0.8, _jitter(own, (0.45, 0.08, 0.22), 0.06))
    if dx == "df":  # white centre, brown ring
        r = lesion.size * own.uniform(0.3, 0.55)
        centre = np.clip(1.0 - np.hypot(x, y) / r, 0, 1) ** 0.7
        _paint(img, centre * alpha * 0.85, np.array([0.90, 0.85, 0.80]))


def make_image(planned: SynthImage, seed: int = 0) -> NDArray[np.uint8]:
    """Render one image ``[450, 600, 3]`` (uint8 RGB), from its lesion and its shot.

    The lesion's parameters come from ``(seed, lesion_id)``; the shot's pose, lighting and
    noise from ``(seed, image_id)``.
    """
    lesion_rng = np.random.default_rng([seed, 1, int(planned.lesion_id[4:])])
    lesion = _lesion(planned.dx, lesion_rng)
    rng = np.random.default_rng([seed, 2, int(planned.image_id[5:])])
    width, height = IMAGE_SIZE
    shape = (height, width)
    # Coordinates in lesion units (the short side spans [-0.75, 0.75]), posed per shot.
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
    scale = 1.5 / height * rng.uniform(0.85, 1.15)
    u = (cols - width / 2 - rng.normal(0, 25)) * scale
    v = (rows - height / 2 - rng.normal(0, 20)) * scale
    turn = rng.uniform(0, 2 * math.pi)
    x = u * math.cos(turn) - v * math.sin(turn)
    y = u * math.sin(turn) + v * math.cos(turn)
    size = lesion.size
    d = np.hypot(x / size, y / (size * lesion.aspect))
    theta = np.arctan2(y, x)

    skin = lesion.skin * rng.uniform(0.92, 1.08)
    img = np.broadcast_to(skin, (*shape, 3)) * (1 + 0.04 * _smooth(rng, shape, 12))[..., None]
    img = np.array(img)
    alpha = lesion.alpha(d, theta)
    body = lesion.body * (1 + 0.12 * _smooth(rng, shape, 8))[..., None]
    img += alpha[..., None] * (body - img)
    _features(img, alpha, (x, y), lesion, rng)

    if rng.uniform() < 0.3:  # hairs: dark thin curves across the field
        for _ in range(int(rng.integers(1, 6))):
            a, b, c = rng.uniform(-1, 1, 3)
            hair = np.abs(y - (a * x + b * x**2 + c)) < 0.004
            _paint(img, hair.astype(np.float64) * 0.7, np.array([0.12, 0.09, 0.07]))
    light = 1 + 0.18 * _smooth(rng, shape, 3)
    img *= light[..., None] * rng.uniform(0.85, 1.1)
    if rng.uniform() < 0.35:  # the dermoscope's round field of view
        r = np.hypot((cols - width / 2) / (width / 2), (rows - height / 2) / (height / 2))
        img *= np.clip((1.25 - r) / 0.08, 0, 1)[..., None]
    img += rng.normal(0, 0.015, img.shape)
    return np.asarray(np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8))


def _exif(planned: SynthImage) -> bytes:
    exif = Image.Exif()
    exif[0x010E] = SYNTH_EXIF_TEXT.format(lesion_id=planned.lesion_id)  # ImageDescription
    exif[0x010F] = "ExampleScope"  # Make
    exif[0x0132] = "2019:05:04 10:20:30"  # DateTime
    exif[0x013B] = "Dr Example"  # Artist
    return exif.tobytes()


def encode_jpeg(pixels: NDArray[np.uint8], planned: SynthImage) -> bytes:
    """JPEG bytes of ``pixels``, with identifying-looking EXIF and comment text."""
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(
        buf,
        "JPEG",
        quality=90,
        exif=_exif(planned),
        comment=SYNTH_EXIF_TEXT.format(lesion_id=planned.lesion_id).encode(),
    )
    return buf.getvalue()


def write_ham10000(out: str | Path, n_images: int = 210, seed: int = 0) -> list[SynthImage]:
    """Write ``n_images`` synthetic images in the HAM10000 layout.

    ``HAM10000_images_part_1/`` holds the first half (by image id), ``HAM10000_images_part_2/``
    the rest, and ``HAM10000_metadata.csv`` has one row per image in image-id order.

    Args:
        out: Folder to write into (created).
        n_images: Number of images (at least :data:`MIN_PER_CLASS` per class).
        seed: Dataset seed; the same seed gives byte-identical files.

    Returns:
        The images written.

    Raises:
        InvalidInput: If ``n_images`` is too small for every class.
    """
    images = plan_lesions(n_images, seed)
    root = Path(out)
    half = (len(images) + 1) // 2
    for part in (1, 2):
        (root / f"HAM10000_images_part_{part}").mkdir(parents=True, exist_ok=True)
    for k, planned in enumerate(images):
        folder = root / f"HAM10000_images_part_{1 if k < half else 2}"
        data = encode_jpeg(make_image(planned, seed), planned)
        (folder / f"{planned.image_id}.jpg").write_bytes(data)
    with (root / "HAM10000_metadata.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(HAM10000_COLUMNS)
        for p in images:
            writer.writerow(
                [p.lesion_id, p.image_id, p.dx, p.dx_type, f"{p.age:.1f}", p.sex, p.localization]
            )
    return images
