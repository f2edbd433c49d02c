"""Synthetic dermoscopy-like images: class counts, lesions, layout, determinism, learnability."""

from __future__ import annotations

import csv
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from medseg.cli import app
from medseg.core.errors import InvalidInput
from medseg.data.skin_synth import (
    HAM10000_COLUMNS,
    MIN_PER_CLASS,
    class_counts,
    make_image,
    plan_lesions,
    write_ham10000,
)
from medseg.tasks.skin_classes import CLASSES, HAM10000_COUNTS
from medseg.tasks.skin_metrics import roc_auc

N = 56  # the smallest sets keep the suite fast: 6 of each rare class


@pytest.fixture(scope="module")
def ham(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ham")
    write_ham10000(root, N, seed=3)
    return root


def test_class_counts_follow_ham10000() -> None:
    assert class_counts(10015) == HAM10000_COUNTS
    counts = class_counts(1000)
    assert sum(counts.values()) == 1000
    assert counts == {
        "nv": 670,
        "mel": 111,
        "bkl": 110,
        "bcc": 51,
        "akiec": 33,
        "vasc": 14,
        "df": 11,
    }
    small = class_counts(N)
    assert sum(small.values()) == N and min(small.values()) == MIN_PER_CLASS
    with pytest.raises(InvalidInput, match="at least 42"):
        class_counts(41)


def test_lesions_hold_several_images_of_one_class() -> None:
    images = plan_lesions(500, seed=1)
    assert len({i.image_id for i in images}) == 500
    by_lesion = defaultdict(list)
    for i in images:
        by_lesion[i.lesion_id].append(i)
    for group in by_lesion.values():
        assert len({(i.dx, i.age, i.sex, i.localization, i.dx_type) for i in group}) == 1
        assert sorted(i.shot for i in group) == list(range(len(group)))
    sizes = Counter(len(g) for g in by_lesion.values())
    assert sizes[1] and sizes[2] and sizes[3] and max(sizes) == 3
    # Ids are in a shuffled order: the first images are not all of one class.
    assert len({i.dx for i in images[:40]}) > 2


def test_layout_metadata_and_images(ham: Path) -> None:
    part1 = sorted(p.name for p in (ham / "HAM10000_images_part_1").iterdir())
    part2 = sorted(p.name for p in (ham / "HAM10000_images_part_2").iterdir())
    assert len(part1) == len(part2) == N // 2 and part1[-1] < part2[0]
    with (ham / "HAM10000_metadata.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == HAM10000_COLUMNS
    assert [f"{r['image_id']}.jpg" for r in rows] == part1 + part2
    assert Counter(r["dx"] for r in rows) == Counter(class_counts(N))
    with Image.open(ham / "HAM10000_images_part_1" / part1[0]) as img:
        assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (600, 450))
        exif = img.getexif()
        assert "DOB 1970-01-01" in exif[0x010E] and "DOB" in img.info["comment"].decode()


def test_deterministic(ham: Path, tmp_path: Path) -> None:
    write_ham10000(tmp_path / "again", N, seed=3)
    for path in sorted(ham.rglob("*.*")):
        assert (tmp_path / "again" / path.relative_to(ham)).read_bytes() == path.read_bytes()
    other = plan_lesions(N, seed=4)
    assert [i.dx for i in other] != [i.dx for i in plan_lesions(N, seed=3)]


def test_images_of_one_lesion_are_different_shots() -> None:
    images = plan_lesions(200, seed=0)
    a, b = next(
        (a, b) for a in images for b in images if a.lesion_id == b.lesion_id and a.shot < b.shot
    )
    x, y = make_image(a), make_image(b)
    assert x.shape == y.shape == (450, 600, 3) and x.dtype == np.uint8
    assert not np.array_equal(x, y)


def _features(pixels: np.ndarray) -> np.ndarray:
    """Colour statistics of the centre (where the lesion is) against the border (skin)."""
    img = pixels.astype(np.float64) / 255
    centre = img[150:300, 200:400].reshape(-1, 3)
    border = np.concatenate([img[:60].reshape(-1, 3), img[-60:].reshape(-1, 3)])
    return np.concatenate(
        [
            centre.mean(0) - border.mean(0),
            centre.std(0),
            np.percentile(centre, [5, 50], axis=0).ravel(),
        ]
    )


def test_classes_are_learnable_but_not_trivial() -> None:
    # A nearest-centroid classifier on colour statistics, fitted on some lesions and scored on
    # others, separates the classes well above chance, yet far from perfectly.
    images = plan_lesions(105, seed=5)
    lesions = sorted({i.lesion_id for i in images})
    held = set(lesions[::3])
    feats = np.stack([_features(make_image(i, seed=5)) for i in images])
    labels = np.array([CLASSES.index(i.dx) for i in images])
    test = np.array([i.lesion_id in held for i in images])
    mu, sd = feats[~test].mean(0), feats[~test].std(0) + 1e-9
    z = (feats - mu) / sd
    centroids = np.stack([z[~test & (labels == c)].mean(0) for c in range(len(CLASSES))])
    dist = ((z[test, None, :] - centroids[None]) ** 2).sum(-1)
    scores = np.exp(-dist / 2)
    scores /= scores.sum(1, keepdims=True)
    _, macro = roc_auc(scores, labels[test])
    assert 0.7 < macro < 0.999, macro


def test_cli_writes_the_skin_lesion_set(tmp_path: Path) -> None:
    runner = CliRunner()
    done = runner.invoke(
        app, ["synth", str(tmp_path / "s"), "--task", "skin-lesion", "--cases", "42"]
    )
    assert done.exit_code == 0, done.output
    assert "wrote 42 HAM10000-like images of" in done.output
    assert len(list((tmp_path / "s").rglob("*.jpg"))) == 42
    bad = runner.invoke(
        app, ["synth", str(tmp_path / "t"), "--task", "skin-lesion", "--cases", "9"]
    )
    assert bad.exit_code == 1 and "at least 42" in bad.output
    bad = runner.invoke(
        app, ["synth", str(tmp_path / "t"), "--task", "skin-lesion", "--layout", "msd"]
    )
    assert bad.exit_code == 1 and "writes the ham10000 layout" in bad.output
    bad = runner.invoke(app, ["synth", str(tmp_path / "t"), "--task", "lungs"])
    assert bad.exit_code == 1 and "unknown task 'lungs'" in bad.output
