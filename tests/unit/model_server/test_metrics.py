"""Prometheus metrics of the model server, scraped by a real Prometheus on loopback."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from medseg.apps.minio_server import free_port
from medseg.serving.client import predict
from tests.unit.model_server.test_serving import case, model_dir, server  # noqa: F401  (this module's own instances)


def _samples(rest: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{rest}/metrics", timeout=30).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_server_metrics_count_requests_stages_and_errors(
    server: dict[str, str],  # noqa: F811
    case: Path,  # noqa: F811
) -> None:
    before = _samples(server["rest"])
    predict(server["rest"], [case])
    bad = httpx.post(f"{server['rest']}/v2/models/medseg/infer", content=b"{nope", timeout=30)
    assert bad.status_code == 400
    after = _samples(server["rest"])

    def grew(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    for stage in ("decode", "segment", "encode"):
        assert grew("medseg_stage_seconds_count", stage=stage) == 1
        assert grew("medseg_stage_seconds_sum", stage=stage) > 0
    for stage in ("preprocess", "predict", "postprocess"):  # kserve's own, per model
        assert grew(f"request_{stage}_seconds_count", model_name="medseg") == 1
    assert grew("medseg_request_bytes_count") == 2
    sent = sum(f.stat().st_size for f in case.iterdir() if not f.name.endswith("_seg.nii.gz"))
    assert grew("medseg_request_bytes_sum") > sent  # the four files and their framing
    assert grew("medseg_case_voxels_sum") == 4 * 48 * 48 * 32
    assert grew("medseg_request_errors_total", **{"class": "invalid_input"}) == 1
    assert after[("medseg_inflight_requests", ())] == 0


@pytest.fixture(scope="module")
def prometheus(
    server: dict[str, str],  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    """A real Prometheus on 127.0.0.1 scraping the server every second; its API URL."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip(
            "the prometheus binary is not installed (Debian package 'prometheus'; "
            "make setup installs it where apt-get can)"
        )
    tmp = tmp_path_factory.mktemp("prometheus")
    target = server["rest"].removeprefix("http://")
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [{"job_name": "medseg", "static_configs": [{"targets": [target]}]}],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    cmd = [
        binary,
        f"--config.file={tmp / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    log = (tmp / "prometheus.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def _query(api: str, expr: str) -> float | None:
    try:
        r = httpx.get(f"{api}/api/v1/query", params={"query": expr}, timeout=5)
    except httpx.HTTPError:
        return None  # not up yet
    result = r.json()["data"]["result"] if r.status_code == 200 else []
    return float(result[0]["value"][1]) if result else None


def test_prometheus_scrapes_a_request_into_the_histograms(
    server: dict[str, str],  # noqa: F811
    case: Path,  # noqa: F811
    prometheus: str,
) -> None:
    queries = {
        "kserve": 'sum(request_predict_seconds_count{job="medseg", model_name="medseg"})',
        "segment": 'sum(medseg_stage_seconds_count{job="medseg", stage="segment"})',
    }

    def scraped() -> dict[str, float | None]:
        return {k: _query(prometheus, q) for k, q in queries.items()}

    deadline = time.monotonic() + 60
    while None in (first := scraped()).values() and time.monotonic() < deadline:
        time.sleep(1)  # up, and one scrape of the server stored
    assert None not in first.values(), f"Prometheus never scraped the server: {first}"
    predict(server["rest"], [case])
    while time.monotonic() < deadline:
        now = scraped()
        if all((now[k] or 0) >= (first[k] or 0) + 1 for k in queries):
            break
        time.sleep(1)
    assert now == {k: (first[k] or 0) + 1 for k in queries}, (first, now)
    up = _query(prometheus, 'up{job="medseg"}')
    assert up == 1


def test_chart_monitors_and_dashboard_are_off_by_default_and_render_when_asked() -> None:
    from tests.unit.platform.test_chart import render

    kinds = {"PodMonitor", "ServiceMonitor"}
    assert not [o for o in render() if o["kind"] in kinds or "dashboard" in o["metadata"]["name"]]
    on = [
        "--set",
        "metrics.podMonitor.enabled=true",
        "--set",
        "metrics.serviceMonitor.enabled=true",
        "--set",
        "metrics.dashboard.enabled=true",
        "--set",
        "metrics.podMonitor.labels.release=kps",
    ]
    objs = {o["kind"]: o for o in render(*on)}
    isvc = objs["InferenceService"]["metadata"]["name"]
    for kind in kinds:
        monitor = objs[kind]
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        selector = monitor["spec"]["selector"]["matchLabels"]
        assert selector == {"serving.kserve.io/inferenceservice": isvc}
    assert objs["PodMonitor"]["metadata"]["labels"]["release"] == "kps"
    (endpoint,) = objs["PodMonitor"]["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics" and endpoint["targetPort"] == 8080
    configmaps = [o for o in render(*on) if o["kind"] == "ConfigMap"]
    (dashboard,) = [c for c in configmaps if c["metadata"]["name"].endswith("-dashboard")]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    doc = json.loads(dashboard["data"]["medseg-serving.json"])
    exprs = [t["expr"] for p in doc["panels"] for t in p["targets"]]
    used = {re.sub(r"_(bucket|count|sum|total)$", "", m) for e in exprs for m in _NAMES.findall(e)}
    assert used == _exposed_histograms_and_gauges(), used


_NAMES = re.compile(r"\b(medseg_[a-z_]+|request_[a-z]+_seconds[a-z_]*)")


def _exposed_histograms_and_gauges() -> set[str]:
    """The metric names the server exposes: ours, and kserve's three stage histograms."""
    from medseg.serving.kserve_import import clean_argv
    from model_server import metrics

    with clean_argv():
        from kserve.metrics import POST_HIST_TIME, PRE_HIST_TIME, PREDICT_HIST_TIME
    ours = [
        metrics.STAGE_SECONDS,
        metrics.REQUEST_BYTES,
        metrics.CASE_VOXELS,
        metrics.INFLIGHT,
        metrics.ERRORS,
    ]
    kserve = [PRE_HIST_TIME, PREDICT_HIST_TIME, POST_HIST_TIME]
    return {m._name for m in ours + kserve}  # type: ignore[attr-defined]
