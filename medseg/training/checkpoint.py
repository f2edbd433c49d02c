"""Training checkpoints in the object store: atomic, verified, resumable from the last good one.

Layout under a run prefix::

    checkpoints/epoch-0007.pt     torch.save of the training state (written atomically)
    checkpoints/latest.json       {"epoch": 7, "key": "checkpoints/epoch-0007.pt", "sha256": …,
                                   "sha256s": {"checkpoints/epoch-0007.pt": …, …}}

The pointer is written after the checkpoint, so it never names a partial object, and it is the
index of every kept checkpoint's sha256: each one is verified against it when read, whether or
not the object still carries its own checksum metadata (a plain S3 client, or a local store,
can replace it without any). Loading tries the pointer's epoch first, then older ones; a
missing, corrupt or unreadable checkpoint is reported and the next older good one is used. If
checkpoints exist but none loads, loading fails loudly rather than restarting from scratch.
"""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from medseg.core.errors import MedsegError, StorageError
from medseg.core.storage import Storage, join

__all__ = ["CheckpointError", "CheckpointStore"]

log = logging.getLogger(__name__)
_NAME = re.compile(r"epoch-(\d+)\.pt$")


class CheckpointError(MedsegError):
    """Checkpoints exist for a run but none of them can be loaded."""


@dataclass
class CheckpointStore:
    """Save and load the checkpoints of one training run.

    Attributes:
        storage: The object store.
        run_prefix: ``STORE/runs/RUN_ID``.
        keep: How many of the newest checkpoints to keep.
        skipped: ``(key, reason)`` of checkpoints the last load could not use.
    """

    storage: Storage
    run_prefix: str
    keep: int = 3
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def _pointer(self) -> str:
        return join(self.run_prefix, "checkpoints", "latest.json")

    def epochs(self) -> list[int]:
        """Epochs with a stored checkpoint, newest first."""
        found = []
        for obj in self.storage.list(join(self.run_prefix, "checkpoints")):
            m = _NAME.search(obj.uri)
            if m:
                found.append(int(m.group(1)))
        return sorted(found, reverse=True)

    def save(self, epoch: int, state: dict[str, Any]) -> str:
        """Store ``state`` as the checkpoint of ``epoch``, move the pointer, prune old ones.

        Returns:
            The checkpoint's key relative to the run prefix.
        """
        buf = io.BytesIO()
        torch.save(state, buf)
        key = _key(epoch)
        info = self.storage.put_bytes(join(self.run_prefix, key), buf.getvalue())
        kept = self.epochs()[: self.keep]
        known = self._index()
        sha256s = {_key(e): known[_key(e)] for e in kept if _key(e) in known}
        sha256s[key] = str(info.sha256)
        pointer = {"epoch": epoch, "key": key, "sha256": info.sha256, "sha256s": sha256s}
        self.storage.put_json(self._pointer, pointer)
        for old in self.epochs()[self.keep :]:
            self.storage.delete(join(self.run_prefix, _key(old)))
        return key

    def _pointer_doc(self) -> dict[str, Any]:
        """The pointer document, or ``{}`` when it is missing or unreadable."""
        try:
            doc = self.storage.get_json(self._pointer)
        except (StorageError, ValueError):
            return {}
        return doc if isinstance(doc, dict) else {}

    def _index(self, doc: dict[str, Any] | None = None) -> dict[str, str]:
        """Checkpoint key to its sha256, from the pointer (older pointers name only one)."""
        doc = self._pointer_doc() if doc is None else doc
        index = dict(doc.get("sha256s") or {})
        if isinstance(doc.get("key"), str) and isinstance(doc.get("sha256"), str):
            index.setdefault(doc["key"], doc["sha256"])
        return {str(k): str(v) for k, v in index.items()}

    def load_latest(
        self, map_location: str | torch.device = "cpu"
    ) -> tuple[int, dict[str, Any]] | None:
        """The newest loadable checkpoint as ``(epoch, state)``; ``None`` for a fresh run.

        Raises:
            CheckpointError: If checkpoints exist but none can be loaded.
        """
        self.skipped = []
        order = self.epochs()
        doc = self._pointer_doc()
        index = self._index(doc)
        try:
            pointed = int(doc["epoch"])
            order = [pointed] + [e for e in order if e != pointed]
        except (KeyError, TypeError, ValueError):
            pass
        for epoch in order:
            key = _key(epoch)
            try:
                blob = self.storage.get_bytes(join(self.run_prefix, key), sha256=index.get(key))
                state = torch.load(io.BytesIO(blob), map_location=map_location, weights_only=True)
            except StorageError as exc:
                self._skip(key, f"{type(exc).__name__}: {exc}")
                continue
            except Exception as exc:  # whatever torch.load raises on bytes that are no checkpoint
                self._skip(key, f"not a loadable checkpoint ({type(exc).__name__}: {exc})")
                continue
            return epoch, state
        if order:
            detail = "; ".join(f"{k}: {r}" for k, r in self.skipped)
            raise CheckpointError(
                f"run {self.run_prefix}: none of {len(order)} checkpoints loads ({detail}); "
                "refusing to restart from scratch silently"
            )
        return None

    def _skip(self, key: str, reason: str) -> None:
        log.warning("checkpoint %s unusable, trying an older one: %s", key, reason)
        self.skipped.append((key, reason))


def _key(epoch: int) -> str:
    """The key of an epoch's checkpoint, relative to the run prefix."""
    return f"checkpoints/epoch-{epoch:04d}.pt"
