"""Label conventions of the public brain-tumour datasets and their TC/WT/ET regions.

Everything downstream of ingest works on three overlapping region channels, in this order:
tumour core (TC), whole tumour (WT), enhancing tumour (ET). The conventions:

============  =====================================================  ===========  ============
convention    labels                                                 TC           WT
============  =====================================================  ===========  ============
brats2021     1 necrotic core (NCR), 2 oedema (ED), 4 enhancing (ET)  1+4          1+2+4
brats2023     1 NETC, 2 SNFH (oedema), 3 ET, 4 resection cavity (RC)  1+3          1+2+3
msd           1 oedema, 2 non-enhancing tumour, 3 enhancing tumour     2+3          1+2+3
============  =====================================================  ===========  ============

ET is label 4 in brats2021 and label 3 in the others. The BraTS 2023+ resection cavity (4) is
not tumour: it belongs to no region.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from medseg.core.errors import InvalidInput

__all__ = ["CONVENTIONS", "LabelConvention", "get_convention"]


@dataclass(frozen=True)
class LabelConvention:
    """One dataset family's label values and how they map to TC/WT/ET.

    Attributes:
        name: Key in :data:`CONVENTIONS`.
        labels: Allowed non-zero values and their names.
        tc: Values in the tumour core.
        wt: Values in the whole tumour.
        et: Values in the enhancing tumour.
        core_label: Value written for TC minus ET when regions become a label map.
        oedema_label: Value written for WT minus TC.
        enhancing_label: Value written for ET.
    """

    name: str
    labels: dict[int, str]
    tc: tuple[int, ...]
    wt: tuple[int, ...]
    et: tuple[int, ...]
    core_label: int
    oedema_label: int
    enhancing_label: int

    @property
    def allowed(self) -> frozenset[int]:
        """Every value a label map may hold, background included."""
        return frozenset({0, *self.labels})

    def to_regions(self, label: NDArray[np.integer]) -> NDArray[np.uint8]:
        """Turn a label map ``[...spatial]`` into regions ``[3, ...spatial]`` (TC, WT, ET)."""
        return np.stack([np.isin(label, v) for v in (self.tc, self.wt, self.et)]).astype(np.uint8)

    def from_regions(self, regions: NDArray[np.generic]) -> NDArray[np.uint8]:
        """Turn regions ``[3, ...spatial]`` (TC, WT, ET) back into a label map.

        ET wins over TC, TC over WT, so overlapping predictions give a valid map.
        """
        tc, wt, et = (np.asarray(regions[i]) > 0 for i in range(3))
        out = np.zeros(tc.shape, dtype=np.uint8)
        out[wt] = self.oedema_label
        out[tc] = self.core_label
        out[et] = self.enhancing_label
        return out


CONVENTIONS: dict[str, LabelConvention] = {
    "brats2021": LabelConvention(
        name="brats2021",
        labels={1: "necrotic core", 2: "oedema", 4: "enhancing tumour"},
        tc=(1, 4),
        wt=(1, 2, 4),
        et=(4,),
        core_label=1,
        oedema_label=2,
        enhancing_label=4,
    ),
    "brats2023": LabelConvention(
        name="brats2023",
        labels={1: "NETC", 2: "SNFH", 3: "enhancing tumour", 4: "resection cavity"},
        tc=(1, 3),
        wt=(1, 2, 3),
        et=(3,),
        core_label=1,
        oedema_label=2,
        enhancing_label=3,
    ),
    "msd": LabelConvention(
        name="msd",
        labels={1: "oedema", 2: "non-enhancing tumour", 3: "enhancing tumour"},
        tc=(2, 3),
        wt=(1, 2, 3),
        et=(3,),
        core_label=2,
        oedema_label=1,
        enhancing_label=3,
    ),
}


def get_convention(name: str) -> LabelConvention:
    """Look up a convention by name.

    Raises:
        InvalidInput: For an unknown name, listing the known ones (also a ``ValueError``).
    """
    try:
        return CONVENTIONS[name]
    except KeyError:
        raise InvalidInput(
            f"unknown label convention {name!r}; known: {', '.join(CONVENTIONS)}"
        ) from None
