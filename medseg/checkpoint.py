"""Training checkpoints in the object store: atomic, verified, resumable from the last good one.

Layout under a run prefix::

    checkpoints/epoch-0007.pt     torch.save of the training state (written atomically)
    checkpoints/latest.json       {"epoch": 7, "key": "checkpoints/epoch-0007.pt", "sha256": …}

The pointer is written after the checkpoint, so it never names a partial object. Loading tries
the pointer's epoch first, then older ones; a missing or corrupt checkpoint is reported and the
next older good one is used. If checkpoints exist but none loads, loading fails loudly rather
than restarting from scratch.
"""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from medseg.errors import MedsegError, ObjectNotFound, StorageError
from medseg.storage import Storage, join

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
        key = f"checkpoints/epoch-{epoch:04d}.pt"
        info = self.storage.put_bytes(join(self.run_prefix, key), buf.getvalue())
        self.storage.put_json(self._pointer, {"epoch": epoch, "key": key, "sha256": info.sha256})
        for old in self.epochs()[self.keep :]:
            self.storage.delete(join(self.run_prefix, f"checkpoints/epoch-{old:04d}.pt"))
        return key

    def load_latest(
        self, map_location: str | torch.device = "cpu"
    ) -> tuple[int, dict[str, Any]] | None:
        """The newest loadable checkpoint as ``(epoch, state)``; ``None`` for a fresh run.

        Raises:
            CheckpointError: If checkpoints exist but none can be loaded.
        """
        self.skipped = []
        order = self.epochs()
        try:
            pointed = int(self.storage.get_json(self._pointer)["epoch"])
            order = [pointed] + [e for e in order if e != pointed]
        except (ObjectNotFound, KeyError, ValueError, StorageError):
            pass
        for epoch in order:
            key = f"checkpoints/epoch-{epoch:04d}.pt"
            try:
                blob = self.storage.get_bytes(join(self.run_prefix, key))
                state = torch.load(io.BytesIO(blob), map_location=map_location, weights_only=True)
            except (StorageError, RuntimeError, EOFError, ValueError, OSError) as exc:
                reason = f"{type(exc).__name__}: {exc}"
                log.warning("checkpoint %s unusable, trying an older one: %s", key, reason)
                self.skipped.append((key, reason))
                continue
            return epoch, state
        if order:
            detail = "; ".join(f"{k}: {r}" for k, r in self.skipped)
            raise CheckpointError(
                f"run {self.run_prefix}: none of {len(order)} checkpoints loads ({detail}); "
                "refusing to restart from scratch silently"
            )
        return None
