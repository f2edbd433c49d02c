"""Experiment tracking on an MLflow server: training runs, evaluations, registered versions.

Everything medseg says to MLflow goes through this module. Nothing is tracked unless
``MLFLOW_TRACKING_URI`` is set (:class:`medseg.core.settings.TrackingSettings`).

Training (:class:`RunTracker`, rank 0 only) never waits for the server and never fails because
of it. What it logs goes into a bounded buffer that a background thread sends in batches,
retrying with backoff while the server does not answer; when the buffer is full the oldest
metric values are dropped. When the run ends, whatever could not be delivered within
``MEDSEG_TRACKING_FLUSH_S`` is reported in one warning (how many values, which artifacts).

One medseg run is one MLflow run. Its MLflow id is kept next to the checkpoints
(``STORE/runs/RUN_ID/mlflow.json``) and as the tag ``medseg.run_id``, so a resumed or restarted
run (a new process) logs into the same MLflow run: one run per training, its step axis
continued where the checkpoint left it.

Registration (:func:`register_version`) and evaluation (:func:`log_evaluation`) write to the
server directly: registration refuses to finish when the server cannot be written (see
:mod:`medseg.registry.register`), evaluation warns.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medseg.artifact.files import CARD_FILE
from medseg.core.errors import MedsegError, ObjectNotFound
from medseg.core.settings import Images, TrackingSettings
from medseg.core.storage import Storage, join

if TYPE_CHECKING:
    from mlflow import MlflowClient

__all__ = [
    "CHAMPION",
    "MLFLOW_FILE",
    "RUN_TAG",
    "RegistryMismatch",
    "RunTracker",
    "TrackingError",
    "client",
    "flatten",
    "git_revision",
    "log_evaluation",
    "mlflow_run_of",
    "register_version",
    "run_tags",
    "set_champion",
    "unregister_version",
    "verify_version",
]

#: The tag that names the medseg run of an MLflow run.
RUN_TAG = "medseg.run_id"
#: ``STORE/runs/RUN_ID/mlflow.json``: the MLflow run (tracking URI, experiment, run id).
MLFLOW_FILE = "mlflow.json"
#: The alias of the registered version that passed the quality gate last.
CHAMPION = "champion"
#: Prefix of the registered version's tags holding each file's sha256.
SHA_TAG = "medseg.sha256."
_WARN = "[medseg.tracking]"


class TrackingError(MedsegError):
    """The MLflow server could not be reached or refused a write."""


class RegistryMismatch(MedsegError):
    """MLflow's registered version disagrees with medseg's registry (the source of truth)."""


def git_revision() -> str:
    """The code's git revision: ``MEDSEG_GIT_REVISION``, else ``git rev-parse``, else unknown."""
    if os.environ.get("MEDSEG_GIT_REVISION"):
        return os.environ["MEDSEG_GIT_REVISION"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def client(settings: TrackingSettings) -> MlflowClient:
    """An MLflow client of ``settings.uri`` that fails fast (the callers retry or warn).

    MLflow's own HTTP retries (minutes of backoff by default) are turned off unless the
    environment sets them: a training step must never wait for them.
    """
    if not settings.uri:
        raise TrackingError("no tracking server: set MLFLOW_TRACKING_URI")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(settings.timeout_s)))
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=settings.uri, registry_uri=settings.uri)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested dict as MLflow params: dotted keys, values as strings (lists as JSON)."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = json.dumps(value) if isinstance(value, list | tuple) else str(value)
    return out


def _launcher() -> str:
    """How this process was started: ``MEDSEG_LAUNCHER``, else from the environment."""
    if os.environ.get("MEDSEG_LAUNCHER"):
        return os.environ["MEDSEG_LAUNCHER"]
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        return "pytorchjob"
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        return "torchrun"
    return "process"


def run_tags(run_id: str, dataset: str, preprocessing: str) -> dict[str, str]:
    """The tags of a training run: dataset, preprocessing, run, launcher, image, code.

    ``medseg.kfp_run_id`` joins them when ``KFP_RUN_ID`` is set.
    """
    return {
        RUN_TAG: run_id,
        "mlflow.runName": run_id,
        "medseg.dataset": dataset,
        "medseg.preprocessing": preprocessing,
        "medseg.launcher": _launcher(),
        "medseg.image": os.environ.get("MEDSEG_IMAGE") or Images().project,
        "medseg.git_revision": git_revision(),
        "mlflow.source.git.commit": git_revision(),
    } | ({"medseg.kfp_run_id": os.environ["KFP_RUN_ID"]} if os.environ.get("KFP_RUN_ID") else {})


def mlflow_run_of(storage: Storage, run_prefix: str) -> dict[str, str] | None:
    """The MLflow run recorded for a medseg run (``RUN/mlflow.json``), or None."""
    try:
        doc = storage.get_json(join(run_prefix, MLFLOW_FILE))
    except ObjectNotFound:
        return None
    return doc if isinstance(doc, dict) else None


@dataclass
class _Pending:
    """What the tracker still has to send, in order."""

    #: (sequence number, key, value, timestamp in ms, step)
    metrics: collections.deque[tuple[int, str, float, int, int]] = field(
        default_factory=collections.deque
    )
    artifacts: list[tuple[str, bytes]] = field(default_factory=list)
    dropped: int = 0
    queued: int = 0


class RunTracker:
    """Rank 0's MLflow logging of one training run: buffered, retried, never in the way.

    Args:
        settings: Where to track (``settings.uri`` must be set).
        storage: The store of the run (``mlflow.json`` is read and written there).
        run_prefix: ``STORE/runs/RUN_ID``.
        run_id: The medseg run id (tag :data:`RUN_TAG`).
        params: The run's parameters (the whole config, flattened).
        tags: The run's tags (:func:`run_tags`).
    """

    def __init__(
        self,
        settings: TrackingSettings,
        storage: Storage,
        run_prefix: str,
        run_id: str,
        params: dict[str, str],
        tags: dict[str, str],
    ):
        self.settings = settings
        self.storage = storage
        self.run_prefix = run_prefix
        self.run_id = run_id
        self.params = params
        self.tags = tags
        self.mlflow_run_id: str | None = None
        recorded = mlflow_run_of(storage, run_prefix)
        if recorded is not None and recorded.get("tracking_uri") == settings.uri:
            self._recorded: str | None = recorded.get("run_id")
        else:
            self._recorded = None
        self._pending = _Pending()
        self._cond = threading.Condition()
        self._closing = False
        self._abandoned = False
        self._status = "FINISHED"
        self._error: str | None = None
        self._warned = False
        self._thread = threading.Thread(target=self._work, name="medseg-tracking", daemon=True)
        self._thread.start()

    # --- what training calls (never blocks on the server) -------------------------------------

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue metric values at ``step`` (the oldest are dropped beyond the buffer)."""
        now = int(time.time() * 1000)
        with self._cond:
            queue = self._pending.metrics
            for key, value in metrics.items():
                self._pending.queued += 1
                queue.append((self._pending.queued, key, float(value), now, step))
            while len(queue) > self.settings.buffer:
                queue.popleft()
                self._pending.dropped += 1
            self._cond.notify()

    def log_artifact(self, name: str, data: bytes) -> None:
        """Queue a file for the run's artifacts."""
        with self._cond:
            self._pending.artifacts.append((name, data))
            self._cond.notify()

    def close(self, status: str = "FINISHED") -> dict[str, Any]:
        """End the run: send what is buffered for up to ``flush_s`` seconds, then give up.

        Returns:
            What was lost: ``metrics`` (values), ``dropped`` (of those, dropped from a full
            buffer), ``artifacts`` (names), ``error`` (the server's last error).
        """
        with self._cond:
            self._closing = True
            self._status = status
            self._cond.notify()
        self._thread.join(self.settings.flush_s)
        with self._cond:
            self._abandoned = True
            metrics = len(self._pending.metrics) + self._pending.dropped
            dropped = self._pending.dropped
            artifacts = [name for name, _ in self._pending.artifacts]
            self._cond.notify()
        lost = {
            "metrics": metrics,
            "dropped": dropped,
            "artifacts": artifacts,
            "error": self._error,
        }
        if metrics or artifacts:
            _warn(
                f"MLflow at {self.settings.uri} did not get everything of run "
                f"{self.run_id}: {metrics} metric values lost ({dropped} dropped "
                f"from the full buffer of {self.settings.buffer}), artifacts lost: "
                f"{', '.join(artifacts) or 'none'}; last error: {self._error}. "
                "metrics.jsonl and TensorBoard in the store have the whole run."
            )
        return lost

    # --- the background thread ----------------------------------------------------------------

    def _work(self) -> None:
        backoff = 0.5
        mlflow: MlflowClient | None = None
        while True:
            with self._cond:
                while not (self._pending.metrics or self._pending.artifacts or self._closing):
                    self._cond.wait()
                if self._abandoned:
                    return
                queue = self._pending.metrics
                metrics = [queue[i] for i in range(min(1000, len(queue)))]
                artifacts = list(self._pending.artifacts[:1])
            try:
                mlflow = mlflow or client(self.settings)
                if self.mlflow_run_id is None:
                    self.mlflow_run_id = self._open_run(mlflow)
                if not metrics and not artifacts:  # closing, and everything was delivered
                    mlflow.set_terminated(self.mlflow_run_id, self._status)
                    return
                if metrics:
                    from mlflow.entities import Metric

                    mlflow.log_batch(
                        self.mlflow_run_id,
                        metrics=[Metric(k, v, ts, step) for _, k, v, ts, step in metrics],
                        synchronous=True,
                    )
                for name, data in artifacts:
                    self._upload(mlflow, name, data)
            except Exception as exc:  # MLflow's, requests', boto's: all mean "not now"
                self._failed(exc)
                with self._cond:
                    if self._abandoned:
                        return
                    self._cond.wait(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            backoff = 0.5
            with self._cond:
                if self._abandoned:
                    return
                # what was sent (some may have been dropped meanwhile by a full buffer)
                sent = metrics[-1][0] if metrics else 0
                while self._pending.metrics and self._pending.metrics[0][0] <= sent:
                    self._pending.metrics.popleft()
                del self._pending.artifacts[: len(artifacts)]

    def _failed(self, exc: Exception) -> None:
        self._error = f"{type(exc).__name__}: {str(exc)[:300]}"
        if not self._warned:
            self._warned = True
            _warn(
                f"MLflow at {self.settings.uri} unreachable ({self._error}); "
                "training goes on, logging is buffered and retried"
            )

    def _open_run(self, mlflow: MlflowClient) -> str:
        """The MLflow run of this medseg run: the recorded one, one tagged with it, or a new one."""
        from mlflow.entities import Param, RunTag
        from mlflow.exceptions import MlflowException

        run = None
        if self._recorded is not None:
            try:
                run = mlflow.get_run(self._recorded)
            except MlflowException:
                run = None
        experiment = mlflow.get_experiment_by_name(self.settings.experiment)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else mlflow.create_experiment(self.settings.experiment)
        )
        if run is None:
            found = mlflow.search_runs(
                [experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{self.run_id}'", max_results=1
            )
            run = found[0] if found else None
        if run is None:
            run = mlflow.create_run(experiment_id, tags=self.tags, run_name=self.run_id)
        else:
            mlflow.update_run(run.info.run_id, status="RUNNING")
        run_id, experiment_id = run.info.run_id, run.info.experiment_id
        have = dict(run.data.params)
        new = [Param(k, v[:6000]) for k, v in self.params.items() if k not in have]
        changed = {
            f"medseg.resumed_with.{k}": v[:5000]
            for k, v in self.params.items()
            if k in have and have[k] != v[:6000]
        }
        tags = [RunTag(k, v) for k, v in {**self.tags, **changed}.items()]
        for i in range(0, max(len(new), len(tags)), 100):
            mlflow.log_batch(
                run_id, params=new[i : i + 100], tags=tags[i : i + 100], synchronous=True
            )
        self.storage.put_json(
            join(self.run_prefix, MLFLOW_FILE),
            {"tracking_uri": self.settings.uri, "experiment_id": experiment_id, "run_id": run_id},
        )
        return run_id

    def _upload(self, mlflow: MlflowClient, name: str, data: bytes) -> None:
        import tempfile

        assert self.mlflow_run_id is not None
        with tempfile.TemporaryDirectory(prefix="medseg-mlflow-") as tmp:
            path = Path(tmp) / name
            path.write_bytes(data)
            mlflow.log_artifact(self.mlflow_run_id, str(path))


def _warn(text: str) -> None:
    print(f"{_WARN} warning: {text}", file=sys.stderr, flush=True)


def log_evaluation(
    storage: Storage,
    store: str,
    run_id: str,
    split: str,
    metrics: dict[str, float],
    table: dict[str, list[Any]],
    artifacts: dict[str, bytes],
) -> str | None:
    """Log an evaluation to its training run's MLflow run (a warning when it cannot).

    Args:
        storage: The store.
        store: Root URI of the store (the run is ``STORE/runs/RUN_ID``).
        run_id: The medseg training run.
        split: The evaluated split; metrics and files are named ``eval/SPLIT/…``.
        metrics: Mean scores (``dice_tc``, ``hd95_tc``, …, ``dice_mean``).
        table: The per-case table, by column (MLflow's ``log_table``).
        artifacts: Files to attach (``report.html``, ``metrics.json``).

    Returns:
        The MLflow run id, or None when nothing was logged (no tracking, no recorded run, or
        the server failed: the warning says which).
    """
    settings = TrackingSettings()
    if not settings.uri:
        return None
    recorded = mlflow_run_of(storage, join(store, "runs", run_id))
    if recorded is None:
        _warn(f"run {run_id} has no MLflow run ({MLFLOW_FILE}); its evaluation is not tracked")
        return None
    mlflow_run = recorded["run_id"]
    try:
        import tempfile

        from mlflow.entities import Metric

        mlflow = client(settings)
        now = int(time.time() * 1000)
        mlflow.log_batch(
            mlflow_run,
            metrics=[Metric(f"eval/{split}/{k}", float(v), now, 0) for k, v in metrics.items()],
            synchronous=True,
        )
        mlflow.log_table(mlflow_run, data=table, artifact_file=f"eval/{split}/cases.json")
        with tempfile.TemporaryDirectory(prefix="medseg-mlflow-") as tmp:
            for name, data in artifacts.items():
                (Path(tmp) / name).write_bytes(data)
                mlflow.log_artifact(mlflow_run, str(Path(tmp) / name), f"eval/{split}")
    except Exception as exc:  # the evaluation stands on its own; tracking it is a courtesy
        _warn(f"evaluation of run {run_id} not logged to MLflow at {settings.uri}: {exc}")
        return None
    return mlflow_run


def _version_tags(card: dict[str, Any], card_uri: str) -> dict[str, str]:
    """The tags that tie an MLflow model version to medseg's version (its card and files)."""
    tags = {
        "medseg.version": card["version"],
        "medseg.run_id": card["run_id"],
        "medseg.model_card": card_uri,
        "medseg.dataset": f"{card['dataset']['name']}@{card['dataset']['version']}",
    }
    tags.update({f"{SHA_TAG}{f}": sha for f, sha in card["files"].items()})
    return tags


def register_version(
    storage: Storage, store: str, card: dict[str, Any], prefix: str
) -> dict[str, str] | None:
    """Create the MLflow registered-model version of medseg's version ``card`` (at ``prefix``).

    Called by :func:`medseg.registry.register.register` only, after the files are stored and before
    the card is: the card then records the MLflow version (see :mod:`medseg.registry.register`).

    Returns:
        ``tracking_uri``, ``name``, ``version`` and ``run_id`` (the MLflow run, or "" when the
        training run was not tracked); None without ``MLFLOW_TRACKING_URI``.

    Raises:
        TrackingError: If the server cannot be written.
        RegistryMismatch: If MLflow already holds a version claiming this medseg version.
    """
    settings = TrackingSettings()
    if not settings.uri:
        return None
    from mlflow.exceptions import MlflowException

    name, version = card["name"], card["version"]
    recorded = mlflow_run_of(storage, join(store, "runs", card["run_id"]))
    mlflow_run = recorded["run_id"] if recorded else None
    card_uri = join(prefix, CARD_FILE)
    try:
        mlflow = client(settings)
        try:
            mlflow.create_registered_model(name, tags={"medseg.registry": join(store, "models")})
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        clash = mlflow.search_model_versions(
            f"name = '{name}' and tags.`medseg.version` = '{version}'"
        )
        for other in clash:
            if other.tags.get("medseg.model_card") != card_uri or other.source != prefix:
                raise RegistryMismatch(
                    f"MLflow model {name} version {other.version} already claims medseg "
                    f"{version} of {other.tags.get('medseg.model_card')}; refusing to register "
                    f"{card_uri} beside it"
                )
        created = mlflow.create_model_version(
            name,
            source=prefix,
            run_id=mlflow_run,
            tags=_version_tags(card, card_uri),
            description=f"medseg {name}@{version}: model card {card_uri}",
        )
    except RegistryMismatch:
        raise
    except Exception as exc:
        raise TrackingError(
            f"MLflow at {settings.uri} refused the version of {name}@{version}: {exc}"
        ) from exc
    return {
        "tracking_uri": settings.uri,
        "name": name,
        "version": str(created.version),
        "run_id": mlflow_run or "",
    }


def unregister_version(tracked: dict[str, str]) -> None:
    """Delete an MLflow version whose medseg version could not be completed (best effort)."""
    try:
        client(TrackingSettings(uri=tracked["tracking_uri"])).delete_model_version(
            tracked["name"], tracked["version"]
        )
    except Exception as exc:
        _warn(f"could not delete MLflow version {tracked['name']}/{tracked['version']}: {exc}")


def verify_version(storage: Storage, card_uri: str) -> dict[str, str]:
    """Check that MLflow's version agrees with medseg's card and that the files match it.

    medseg's registry is the source of truth: the card names every file's sha256; the files
    are re-read against those hashes, and the MLflow version must carry the same hashes,
    medseg version, source and card URI.

    Returns:
        The card's ``mlflow`` record.

    Raises:
        RegistryMismatch: On any disagreement (each is named), or a card without an MLflow
            version.
        ChecksumMismatch: If a stored file no longer matches the card.
    """
    card = storage.get_json(card_uri)
    tracked = card.get("mlflow")
    if not tracked:
        raise RegistryMismatch(f"{card_uri} records no MLflow version")
    prefix = card_uri.rsplit("/", 1)[0]
    for f, sha in card["files"].items():
        storage.get_bytes(join(prefix, f), sha256=sha)
    try:
        version = client(TrackingSettings(uri=tracked["tracking_uri"])).get_model_version(
            tracked["name"], tracked["version"]
        )
    except Exception as exc:
        raise TrackingError(
            f"MLflow version {tracked['name']}/{tracked['version']} unreadable: {exc}"
        ) from exc
    want = _version_tags(card, card_uri)
    wrong = [
        f"{k}: MLflow {version.tags.get(k)!r}, medseg {v!r}"
        for k, v in want.items()
        if version.tags.get(k) != v
    ]
    if version.source != prefix:
        wrong.append(f"source: MLflow {version.source!r}, medseg {prefix!r}")
    if wrong:
        raise RegistryMismatch(
            f"MLflow {tracked['name']} version {tracked['version']} disagrees with {card_uri}: "
            + "; ".join(wrong)
        )
    return dict(tracked)


def set_champion(storage: Storage, card_uri: str) -> str:
    """Point the alias :data:`CHAMPION` at the card's MLflow version, once verified.

    Returns:
        The MLflow version now champion.

    Raises:
        RegistryMismatch: If the registries disagree (the alias does not move).
    """
    tracked = verify_version(storage, card_uri)
    mlflow = client(TrackingSettings(uri=tracked["tracking_uri"]))
    mlflow.set_registered_model_alias(tracked["name"], CHAMPION, tracked["version"])
    return tracked["version"]
