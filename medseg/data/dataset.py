"""Read preprocessed cases for training and evaluation, through a local disk cache.

Objects are content-addressed: a case is fetched once, its bytes verified against the sha256
that ``index.json`` records for it (whatever metadata the object carries) before the file
appears in the cache, and kept as ``CACHE/ab/abcdef….npz``. Later epochs (and later runs on
the same machine) read the local file. The cache folder is ``MEDSEG_CACHE_DIR`` or
``~/.cache/medseg/data``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import Randomizable
from torch.utils.data import Dataset

from medseg.core.errors import ChecksumMismatch, DatasetError, DiskFull, ObjectNotFound
from medseg.core.settings import StorageSettings
from medseg.core.storage import Storage, join

__all__ = ["PreprocessedDataset", "default_cache_dir", "draw_seed", "load_case"]


def default_cache_dir() -> Path:
    """``MEDSEG_CACHE_DIR`` or ``~/.cache/medseg/data``."""
    return Path(os.environ.get("MEDSEG_CACHE_DIR", Path.home() / ".cache" / "medseg" / "data"))


def draw_seed(seed: int, epoch: int, draw: int) -> int:
    """The random chain's seed for the ``draw``-th draw of ``epoch`` of a run seeded ``seed``."""
    return int(np.random.SeedSequence([seed, epoch, draw]).generate_state(1)[0])


def load_case(path: str | Path) -> dict[str, np.ndarray]:
    """Load one preprocessed ``.npz`` into memory (``image``, ``label``, ``affine``)."""
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files}


class PreprocessedDataset(Dataset[dict[str, Any]]):
    """Map-style dataset over a preprocessed prefix.

    Args:
        prefix: The ``…/preprocessed/FINGERPRINT`` prefix (holds ``index.json``).
        split: ``train``, ``validation``, or ``None`` for every case.
        cache_dir: Local cache folder (see :func:`default_cache_dir`).
        transform: Applied to each item (the random training chain, for instance).
        settings: Storage settings; from the environment when omitted.
        seed: With it, an item asked for as ``(epoch, draw, i)`` (case ``i`` as the epoch's
            ``draw``-th draw, see :class:`medseg.training.train.EpochKeys`) gets ``transform``
            seeded by :func:`draw_seed`: a draw's crop and flips are the same whichever rank,
            worker or resumed process makes it.

    Items are dictionaries with ``image`` (float16 tensor ``[4, X, Y, Z]``, as stored), ``label``
    (uint8 tensor ``[3, X, Y, Z]``), ``affine`` and ``case_id``, before ``transform``. The image
    stays float16 here on purpose: casting a whole case to float32 costs more than loading it
    (~50 ms at full BraTS size), so the training chain casts after its random crop, on a
    fraction of the voxels.
    """

    def __init__(
        self,
        prefix: str,
        split: str | None = "train",
        cache_dir: str | Path | None = None,
        transform: Callable[[dict[str, Any]], Any] | None = None,
        settings: StorageSettings | None = None,
        seed: int | None = None,
    ):
        self.prefix = prefix
        self.seed = seed
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.transform = transform
        self._settings = settings or StorageSettings.from_env()
        self._storage: Storage | None = None
        self._storage_pid = os.getpid()
        try:
            index = self.storage.get_json(join(prefix, "index.json"))
        except ObjectNotFound:
            raise DatasetError(
                f"{prefix} is not a preprocessed dataset (no index.json): run `medseg preprocess`"
            ) from None
        self.index = index
        self.cases = [c for c in index["cases"] if split is None or c["split"] == split]

    @property
    def storage(self) -> Storage:
        """A storage client of this process, created lazily.

        A DataLoader worker forked after the index was read inherits the parent's client with
        its open connections; sharing those sockets between processes garbles responses, so a
        process that did not create the client makes its own.
        """
        if self._storage is None or self._storage_pid != os.getpid():
            self._storage = Storage(self._settings)
            self._storage_pid = os.getpid()
        return self._storage

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_storage"] = None  # clients are per process
        return state

    def __len__(self) -> int:
        return len(self.cases)

    def local_path(self, i: int) -> Path:
        """Fetch case ``i`` into the cache if needed; return its local path.

        Raises:
            ChecksumMismatch: If the stored case is not the one the index recorded (the case
                is named); nothing enters the cache then.
            DiskFull: If the cache folder has no room for the case.
        """
        case = self.cases[i]
        sha = case["sha256"]
        path = self.cache_dir / sha[:2] / f"{sha}.npz"
        if not path.is_file():
            uri = join(self.prefix, case["key"])
            try:
                self.storage.get_file(uri, path, sha256=sha)
            except ChecksumMismatch as exc:
                raise ChecksumMismatch(
                    f"case {case['case_id']}: the stored object is not the one the index "
                    f"recorded ({exc}); re-run `medseg preprocess` after deleting it"
                ) from None
            except DiskFull as exc:
                raise DiskFull(f"{exc} (the cache folder is set by MEDSEG_CACHE_DIR)") from None
        return path

    def __getitem__(self, key: int | tuple[int, int, int]) -> Any:
        """Case ``key``, or for ``(epoch, draw, i)`` case ``i`` through that draw's chain."""
        epoch, draw, i = key if isinstance(key, tuple) else (None, 0, key)
        arrays = load_case(self.local_path(i))
        item: dict[str, Any] = {
            "image": torch.from_numpy(arrays["image"]),
            "label": torch.from_numpy(arrays["label"]),
            "affine": torch.from_numpy(arrays["affine"]),
            "case_id": self.cases[i]["case_id"],
        }
        if self.transform is None:
            return item
        if epoch is not None and self.seed is not None and isinstance(self.transform, Randomizable):
            self.transform.set_random_state(seed=draw_seed(self.seed, epoch, draw))
        return self.transform(item)
