"""Training progress as a Prometheus text-format file (no Pushgateway, no port in the trainer).

Rank 0 rewrites the file after every optimiser step and every epoch with
:func:`prometheus_client.write_to_textfile`, which writes a temporary file and renames it, so a
reader (node-exporter's textfile collector, or a sidecar serving the file) never sees half of it.
The file is named by ``MEDSEG_TRAIN_METRICS_TEXTFILE``
(:class:`medseg.core.settings.TrainTelemetry`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

__all__ = ["TrainTextfile"]


class TrainTextfile:
    """The gauges of one training run, written to ``path``; ``regions`` are the task's outputs."""

    def __init__(self, path: Path, run_id: str, regions: Sequence[str]):
        self.path = path
        self.regions = tuple(regions)
        self.registry = CollectorRegistry()

        def gauge(name: str, doc: str, *extra: str) -> Gauge:
            return Gauge(name, doc, ["run_id", *extra], registry=self.registry)

        self.step = gauge("medseg_train_step", "Optimiser steps done (counted on across resumes).")
        self.loss = gauge("medseg_train_loss", "Loss of the last optimiser step.")
        self.rate = gauge(
            "medseg_train_samples_per_second", "Samples per second, all ranks, last step."
        )
        self.epoch = gauge("medseg_train_epoch", "Epochs finished.")
        self.epoch_loss = gauge("medseg_train_epoch_loss", "Mean loss of the last epoch.")
        self.dice = gauge(
            "medseg_train_val_dice", "Validation Dice of the last validated epoch.", "region"
        )
        self.updated = gauge("medseg_train_last_update_timestamp_seconds", "When written.")
        self.run_id = run_id
        path.parent.mkdir(parents=True, exist_ok=True)

    def on_step(self, step: int, loss: float, samples_per_second: float) -> None:
        """After an optimiser step."""
        self.step.labels(self.run_id).set(step)
        self.loss.labels(self.run_id).set(loss)
        self.rate.labels(self.run_id).set(samples_per_second)
        self._write()

    def on_epoch(self, record: dict[str, Any]) -> None:
        """After an epoch (its ``metrics.jsonl`` record)."""
        self.epoch.labels(self.run_id).set(record["epoch"])
        self.epoch_loss.labels(self.run_id).set(record["loss"])
        for region in self.regions:
            value = record.get(f"dice_{region.lower()}")
            if value is not None:
                self.dice.labels(self.run_id, region).set(value)
        self._write()

    def _write(self) -> None:
        self.updated.labels(self.run_id).set_to_current_time()
        write_to_textfile(str(self.path), self.registry)
