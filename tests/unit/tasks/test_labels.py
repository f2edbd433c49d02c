"""Label conventions: regions from labels and back, for every convention."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.tasks.labels import CONVENTIONS, get_convention

# (label value -> expected (TC, WT, ET)) per convention, straight from the dataset papers.
EXPECTED = {
    "brats2021": {0: (0, 0, 0), 1: (1, 1, 0), 2: (0, 1, 0), 4: (1, 1, 1)},
    "brats2023": {0: (0, 0, 0), 1: (1, 1, 0), 2: (0, 1, 0), 3: (1, 1, 1), 4: (0, 0, 0)},
    "msd": {0: (0, 0, 0), 1: (0, 1, 0), 2: (1, 1, 0), 3: (1, 1, 1)},
}


@pytest.mark.parametrize("name", sorted(CONVENTIONS))
def test_to_regions(name: str) -> None:
    conv = get_convention(name)
    values = np.array(sorted(EXPECTED[name]))
    regions = conv.to_regions(values)
    for i, v in enumerate(values.tolist()):
        assert tuple(regions[:, i].tolist()) == EXPECTED[name][v], (name, v)


@pytest.mark.parametrize("name", sorted(CONVENTIONS))
def test_round_trip_of_tumour_labels(name: str) -> None:
    conv = get_convention(name)
    tumour = [v for v in EXPECTED[name] if any(EXPECTED[name][v])]
    labels = np.array([0, *tumour] * 3).reshape(1, 1, -1)
    assert np.array_equal(conv.from_regions(conv.to_regions(labels)), labels)


def test_overlapping_predictions_give_a_valid_map() -> None:
    conv = get_convention("brats2021")
    # ET predicted outside WT still becomes enhancing (ET wins), never an unknown value.
    regions = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]])
    assert conv.from_regions(regions).tolist() == [2, 1, 4]


def test_unknown_convention() -> None:
    with pytest.raises(ValueError, match="known: brats2021, brats2023, msd"):
        get_convention("brats2030")
