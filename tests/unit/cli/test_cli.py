"""The medseg CLI through typer's CliRunner, and `medseg minio` as a real process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from medseg.apps.minio_server import free_port
from medseg.cli import app
from medseg.core.settings import StorageSettings
from medseg.core.storage import Storage

runner = CliRunner()


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tables wrap to the terminal; give the captured one room so assertions see whole words.
    from medseg import cli

    monkeypatch.setattr(cli.console, "width", 200)


def test_cli_client_and_config_start_without_torch() -> None:
    """``medseg --help``, the REST/gRPC client and the config load no torch or MONAI.

    Their import cost several seconds before (``medseg.config`` pulled torch in for one type
    name); commands import the heavy libraries when they run.
    """
    modules = "medseg.cli, medseg.serving.client, medseg.config, medseg.platform.pipeline_params"
    code = f"import sys, {modules}; print(sorted({{'torch', 'monai'}} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_synth_ingest_preprocess_list(tmp_path: Path, s3_env: None, bucket: str) -> None:
    raw = tmp_path / "raw"
    r = runner.invoke(
        app, ["synth", str(raw), "--layout", "msd", "--cases", "3", "--shape", "40", "40", "24"]
    )
    assert r.exit_code == 0, r.output
    assert "wrote 3 msd cases" in r.output

    r = runner.invoke(app, ["ingest", str(raw), "--dataset", "cli", "--store", bucket])
    assert r.exit_code == 0, r.output
    assert "3 valid cases (2 train, 1 validation)" in r.output and "stored" in r.output
    r = runner.invoke(app, ["ingest", str(raw), "--dataset", "cli", "--store", bucket])
    assert "already stored (no-op)" in r.output and "0 files uploaded" in r.output

    r = runner.invoke(
        app, ["preprocess", "--dataset", "cli@latest", "--store", bucket, "--workers", "1"]
    )
    assert r.exit_code == 0, r.output
    assert "preprocessed 3 of 3 cases" in r.output
    r = runner.invoke(app, ["preprocess", "--dataset", "cli", "--store", bucket, "--workers", "1"])
    assert "already preprocessed (no-op)" in r.output

    r = runner.invoke(app, ["datasets", "list", "--store", bucket])
    assert r.exit_code == 0 and "cli" in r.output and "msd" in r.output


def test_quarantine_is_listed(tmp_path: Path, s3_env: None, bucket: str, synth_root: Path) -> None:
    import shutil

    raw = tmp_path / "raw"
    shutil.copytree(synth_root / "brats2021", raw)
    (raw / "BraTS2021_00002" / "BraTS2021_00002_flair.nii.gz").unlink()
    r = runner.invoke(app, ["ingest", str(raw), "-d", "q", "--store", bucket])
    assert r.exit_code == 0, r.output
    assert "1 quarantined cases" in r.output and "BraTS2021_00002" in r.output
    assert "missing modality flair" in r.output


def test_errors_are_one_clear_line(
    tmp_path: Path, s3_env: None, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = runner.invoke(app, ["ingest", str(tmp_path / "absent"), "-d", "x", "--store", bucket])
    assert r.exit_code == 1 and "is not a folder" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["preprocess", "-d", "nope", "--store", bucket])
    assert r.exit_code == 1 and "has no versions" in r.output
    monkeypatch.setenv("S3_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("MEDSEG_S3_RETRY_SECONDS", "1")
    r = runner.invoke(app, ["datasets", "list", "--store", bucket])
    assert r.exit_code == 1 and "unreachable" in r.output and "Traceback" not in r.output
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in r.output


def test_minio_command_serves_and_writes_env_file(tmp_path: Path) -> None:
    env_file = tmp_path / "minio.env"
    env = {**os.environ, "MEDSEG_ENV_FILE": str(env_file)}
    for var in ("S3_ENDPOINT", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        env.pop(var, None)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "medseg",
            "minio",
            "--data-dir",
            str(tmp_path / "d"),
            "--port",
            "0",
            "--bucket",
            "local",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while not env_file.exists() and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            time.sleep(0.2)
        assert env_file.stat().st_mode & 0o777 == 0o600
        settings = StorageSettings(_env_file=env_file)  # type: ignore[call-arg]
        assert settings.endpoint and settings.endpoint.startswith("http://127.0.0.1:")
        storage = Storage(settings)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the bucket is created right after the env file
            try:
                storage.put_bytes("s3://local/hello", b"hi")
                break
            except Exception:
                time.sleep(0.2)
        assert storage.get_bytes("s3://local/hello") == b"hi"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0


def _closed_port() -> int:
    return free_port()  # nothing listens there


# Every case: (arguments, what the one line says). "{bucket}" and "{tmp}" are filled in.
BAD_INPUT = [
    (["ingest", "{raw}", "-d", "x", "--labels", "brats2020"], "known: brats2021, brats2023"),
    (["ingest", "{raw}", "-d", "x", "--store", "s3://"], "S3 URI has no bucket"),
    (["ingest", "{raw}", "-d", "x", "--store", "s3://Bad_Bucket"], "invalid bucket name"),
    (["ingest", "s3://", "-d", "x"], "S3 URI has no bucket"),
    (["ingest", "{raw}", "-d", "a/b"], "dataset name 'a/b' is not allowed"),
    (["ingest", "{raw}", "-d", ""], "dataset name '' is not allowed: it is empty"),
    (["ingest", "{tmp}/absent", "-d", "x"], "is not a folder"),
    (["ingest", "{raw}", "-d", "x", "-c", "{tmp}/none.yaml"], "none.yaml: No such file"),
    (["ingest", "{raw}", "-d", "x", "-c", "{tmp}/bad.yaml"], "not valid YAML at line 2"),
    (["ingest", "{raw}", "-d", "x", "-c", "{tmp}/wrong.yaml"], "train.epochs: Input should"),
    (["preprocess", "-d", "nope"], "has no versions"),
    (["preprocess", "-d", "nope@v1"], "dataset nope@v1 does not exist"),
    (["train", "-d", "nope", "--run-id", "../up"], "run id '../up' is not allowed"),
    (["train", "-d", "nope", "--run-id", "r1"], "has no versions"),
    (["register", "--run-id", "nope", "--name", "m"], "run nope has no finished model"),
    (["register", "--run-id", "r", "--name", "m/x"], "model name 'm/x' is not allowed"),
    (["evaluate", "--model", "m@v9"], "no model 'm' registered"),
    (["serve", "--model", "m@v9"], "no model 'm' registered"),
    (["models", "list", "--store", "s3://"], "S3 URI has no bucket"),
    (["datasets", "list", "--store", "s3://nobucket"], "bucket 'nobucket' does not exist"),
    (["synth", "{tmp}/afile/sub", "--cases", "1"], "afile/sub: Not a directory"),
    (["synth", "{tmp}/s", "--shape", "0", "8", "8"], "at least 1 voxel"),
    (["synth", "{tmp}/s", "--layout", "brats2019"], "unknown layout 'brats2019'"),
    (["predict", "{tmp}/none.nii.gz", "--url", "http://127.0.0.1:{closed}"], "no such file"),
    (["predict", "{raw}/BraTS2021_00000"], "give --model"),
    (
        ["predict", "{raw}/BraTS2021_00000", "--url", "http://127.0.0.1:{closed}"],
        "Connection refused",
    ),
    (["pipeline", "compile", "--out", "{tmp}/afile/x.yaml"], "afile"),
    (["pipeline", "run", "--source", "x"], "only --local runs here"),
    (["pipeline", "run", "--local", "--source", "x", "--param", "oops"], "--param takes KEY=VALUE"),
    (["pipeline", "run", "--local", "--source", "x", "-c", "{tmp}/bad.yaml"], "not valid YAML"),
    (
        ["pipeline", "run", "--local", "--source", "x", "--param", "training.workers=0"],
        "bad pipeline parameter training.workers: Input should be greater than or equal to 1",
    ),
    (
        ["pipeline", "run", "--local", "--source", "x", "--param", "train.epochs=2"],
        "no group 'train' (groups: training, cluster, deployment)",
    ),
    (
        ["pipeline", "submit", "--source", "x", "--host", "h", "--param", "cluster.relase=p"],
        "bad pipeline parameter cluster.relase: Extra inputs are not permitted",
    ),
    (
        ["pipeline", "run", "--local", "--source", "x", "--param", "deployment.min_replicas=4"],
        "deployment: need 0 <= min_replicas",
    ),
    (["pipeline", "submit", "--source", "x", "--host", "http://127.0.0.1:{closed}"], "unreachable"),
    (["pipeline", "upload", "--host", "http://127.0.0.1:{closed}"], "unreachable"),
    (["minio", "--port", "{busy}", "--data-dir", "{tmp}/m"], "{busy}"),
    (["demo", "--source", "{tmp}/absent", "--workdir", "{tmp}/w"], "is not a folder"),
    (["demo", "--config", "{tmp}/wrong.yaml", "--workdir", "{tmp}/w"], "train.epochs"),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUT, ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_ends_in_one_clear_line(
    args: list[str],
    message: str,
    tmp_path: Path,
    s3_env: None,
    bucket: str,
    synth_root: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import socket

    monkeypatch.setenv("MEDSEG_STORE", bucket)
    monkeypatch.chdir(tmp_path)  # `pipeline submit` compiles into ./.medseg
    (tmp_path / "afile").write_text("a file, not a folder")
    (tmp_path / "bad.yaml").write_text("train: {epochs: [\n")
    (tmp_path / "wrong.yaml").write_text("train: {epochs: -3}\n")
    with socket.socket() as busy:  # a port in use
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        fill = {
            "tmp": str(tmp_path),
            "raw": str(synth_root / "brats2021"),
            "bucket": bucket,
            "closed": str(_closed_port()),
            "busy": str(busy.getsockname()[1]),
        }
        r = runner.invoke(app, [a.format(**fill) for a in args])
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert isinstance(r.exception, SystemExit), repr(r.exception)  # no uncaught exception
    assert r.exit_code != 0
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert message.format(**fill) in lines[0], r.output
    assert "Traceback" not in r.output


def test_failed_pipeline_step_ends_in_one_line(tmp_path: Path, s3_env: None, bucket: str) -> None:
    args = ["pipeline", "run", "--local", "--source", str(tmp_path / "absent")]
    args += ["--store", bucket, "--root", str(tmp_path / "root")]
    r = runner.invoke(app, args)
    assert isinstance(r.exception, SystemExit) and r.exit_code == 1, repr(r.exception)
    last = r.output.strip().splitlines()[-1]
    assert last.startswith("error: pipeline step ingest failed: ")
    assert "DatasetError" in last and "is not a folder" in last
    assert "Traceback (most recent call last)" in r.output  # the step's own log, shown above


class _KfpApiRecorder:
    """A loopback HTTP endpoint that answers the KFP v2beta1 calls a run submission makes, and
    keeps each request as the real ``kfp.Client`` sent it (no KFP backend can run here)."""

    def __init__(self) -> None:
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.requests: list[tuple[str, str, Any]] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                recorder.requests.append(("GET", self.path, None))
                if self.path.startswith("/apis/v2beta1/healthz"):
                    self._answer({"multi_user": True})
                else:  # list experiments: none yet
                    self._answer({})

            def do_POST(self) -> None:
                size = int(self.headers.get("content-length", 0))
                body = json.loads(self.rfile.read(size) or b"{}")
                recorder.requests.append(("POST", self.path, body))
                if self.path == "/apis/v2beta1/experiments":
                    self._answer({**body, "experiment_id": "exp-1"})
                else:
                    self._answer({"run_id": "run-1", "display_name": body.get("display_name")})

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def posted(self, path: str) -> Any:
        (body,) = [b for m, p, b in self.requests if m == "POST" and p == path]
        return body


def test_submit_runs_as_the_charts_service_account_in_its_namespace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.unit.platform.test_chart import render

    objects = render()  # the chart as `helm template --namespace medseg` renders it
    bindings = [o for o in objects if o["kind"] == "RoleBinding"]
    (binding,) = [b for b in bindings if b["metadata"]["name"].endswith("-pipeline")]
    (subject,) = binding["subjects"]
    roles = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Role"}
    role = roles[binding["roleRef"]["name"]]
    assert any("pytorchjobs" in rule["resources"] for rule in role["rules"])

    monkeypatch.chdir(tmp_path)
    kfp_api = _KfpApiRecorder()
    try:
        args = ["pipeline", "submit", "--host", kfp_api.url, "--source", "s3://medseg/raw"]
        r = runner.invoke(app, args)  # the defaults: the chart's default release and namespace
    finally:
        kfp_api.server.shutdown()
    assert r.exit_code == 0, r.output
    assert "submitted run run-1" in r.output

    run = kfp_api.posted("/apis/v2beta1/runs")
    assert run["service_account"] == subject["name"] == "medseg-pipeline"
    assert run["experiment_id"] == "exp-1"
    params = run["runtime_config"]["parameters"]
    # where PyTorchJob and ISVC are created
    assert params["cluster"]["namespace"] == subject["namespace"]
    assert params["training"]["launcher"] == "pytorchjob"
    assert params["deployment"]["target"] == "kserve"
    spec, platform = run["pipeline_spec"]["pipeline_spec"], run["pipeline_spec"]["platform_spec"]
    assert spec["pipelineInfo"]["name"] == "medseg-brats"
    assert "kubernetes" in platform["platforms"]  # the steps' Secret and ConfigMap env
    experiment = kfp_api.posted("/apis/v2beta1/experiments")
    assert experiment["namespace"] == subject["namespace"]
    assert experiment["display_name"] == "medseg"


def test_submit_takes_every_name_from_the_release(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another release in another namespace: account, Secret and ConfigMap follow its fullname."""
    monkeypatch.chdir(tmp_path)
    kfp_api = _KfpApiRecorder()
    try:
        args = ["pipeline", "submit", "--host", kfp_api.url, "--source", "s3://medseg/raw"]
        r = runner.invoke(app, [*args, "--release", "prod", "--namespace", "ml"])
    finally:
        kfp_api.server.shutdown()
    assert r.exit_code == 0, r.output
    run = kfp_api.posted("/apis/v2beta1/runs")
    assert run["service_account"] == "prod-medseg-pipeline"
    params = run["runtime_config"]["parameters"]
    cluster = params["cluster"]
    assert (cluster["namespace"], cluster["release"]) == ("ml", "prod")
    # the run's first step names the release's Secret and ConfigMap for every later step
    from components import params_op

    names = params_op.python_func(
        config_yaml="", task="", training={}, cluster=cluster, deployment={}
    )
    assert names.s3_secret == names.s3_config == "prod-medseg-s3"
    assert kfp_api.posted("/apis/v2beta1/experiments")["namespace"] == "ml"
