"""The seven diagnoses of HAM10000 / ISIC 2018 Task 3, and their frequencies in HAM10000.

The class order is HAM10000's ``dx`` order by frequency; it is the order of every probability
vector, confusion matrix and metric of the skin-lesion task. ISIC 2018's ground-truth CSV names
the same classes in upper case and another order (:data:`ISIC2018_COLUMNS`).
"""

from __future__ import annotations

__all__ = [
    "CHANNELS",
    "CLASSES",
    "CLASS_NAMES",
    "CONVENTION",
    "HAM10000_COUNTS",
    "ISIC2018_COLUMNS",
]

#: HAM10000 ``dx`` codes, in the order of every class axis.
CLASSES: tuple[str, ...] = ("nv", "mel", "bkl", "bcc", "akiec", "vasc", "df")
#: What each code means (the answer a clinician reads).
CLASS_NAMES: dict[str, str] = {
    "nv": "melanocytic nevus",
    "mel": "melanoma",
    "bkl": "benign keratosis",
    "bcc": "basal cell carcinoma",
    "akiec": "actinic keratosis / intraepithelial carcinoma",
    "vasc": "vascular lesion",
    "df": "dermatofibroma",
}
#: Images per class in HAM10000 (10015 in all).
HAM10000_COUNTS: dict[str, int] = {
    "nv": 6705,
    "mel": 1113,
    "bkl": 1099,
    "bcc": 514,
    "akiec": 327,
    "vasc": 142,
    "df": 115,
}
#: The one-hot columns of ISIC 2018 Task 3's ground-truth CSV, after ``image``.
ISIC2018_COLUMNS: tuple[str, ...] = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
#: The manifest's label convention of a skin-lesion dataset: these classes, in this order.
CONVENTION = "ham10000"
#: The channels of a skin-lesion image, in the order of its ``[3, H, W]`` array.
CHANNELS: tuple[str, ...] = ("red", "green", "blue")
