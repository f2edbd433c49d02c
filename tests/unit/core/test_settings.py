"""The operational settings tree: one definition of each default, the chart's values agreeing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from medseg.core.settings import (
    DEFAULT_BUCKET,
    DEFAULT_IMAGES,
    DEFAULT_MODEL_NAME,
    DEFAULT_PORTS,
    DEFAULT_STORE,
    Placement,
    PlacementSettings,
    PlatformSettings,
    ServerArgs,
    ServerLimits,
)
from tests.unit.platform.test_chart import CHART, render


@pytest.fixture(scope="module")
def values() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


@pytest.fixture(scope="module")
def rendered() -> dict[str, dict[str, Any]]:
    return {f"{o['kind']}/{o['metadata']['name']}": o for o in render()}


def _image(section: dict[str, Any]) -> str:
    return f"{section['repository']}:{section['tag']}"


def test_chart_values_are_the_python_defaults(values: dict[str, Any]) -> None:
    assert values["s3"]["bucket"] == DEFAULT_BUCKET and f"s3://{DEFAULT_BUCKET}" == DEFAULT_STORE
    assert _image(values["image"]) == DEFAULT_IMAGES.project
    assert _image(values["serverImage"]) == DEFAULT_IMAGES.server
    isvc = values["inferenceService"]
    assert isvc["name"] == DEFAULT_MODEL_NAME
    assert isvc["maxRequestMb"] == ServerLimits.model_fields["max_request_mb"].default
    grace = isvc["terminationGracePeriodSeconds"]
    assert grace == ServerLimits.model_fields["grace_period_s"].default
    schema = json.loads((CHART / "values.schema.json").read_text())
    isvc_schema = schema["properties"]["inferenceService"]["properties"]
    least = isvc_schema["terminationGracePeriodSeconds"]["minimum"]  # the server's own bound
    assert ServerLimits(grace_period_s=least).drain_s > 0
    with pytest.raises(ValueError, match="grace_period_s"):
        ServerLimits(grace_period_s=least - 1)


def test_rendered_server_and_store_use_the_python_ports_and_argv(
    rendered: dict[str, dict[str, Any]],
) -> None:
    (isvc,) = [o for k, o in rendered.items() if k.startswith("InferenceService/")]
    (container,) = isvc["spec"]["predictor"]["containers"]
    assert container["image"] == DEFAULT_IMAGES.server
    assert container["command"][-2:] == ["-m", "model_server"]
    flags = dict(zip(container["args"][::2], container["args"][1::2], strict=True))
    expected = ServerArgs("/mnt/models", DEFAULT_MODEL_NAME, max_request_mb=256).argv()
    assert flags == dict(zip(expected[::2], expected[1::2], strict=True))
    assert [p["containerPort"] for p in container["ports"]] == [DEFAULT_PORTS.http]
    (minio,) = [o for k, o in rendered.items() if k.startswith("StatefulSet/")]
    ports = [
        p["containerPort"]
        for c in minio["spec"]["template"]["spec"]["containers"]
        for p in c.get("ports", [])
    ]
    assert DEFAULT_PORTS.minio in ports
    configs = [o for k, o in rendered.items() if k.startswith("ConfigMap/")]
    assert any(c["data"].get("MEDSEG_STORE") == DEFAULT_STORE for c in configs)


def test_tree_reads_nested_names_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MEDSEG_ENV_FILE", str(tmp_path / "none.env"))
    monkeypatch.setenv("MEDSEG_STORE", "s3://other/prefix")
    monkeypatch.setenv("MEDSEG_PORTS__HTTP", "9080")
    monkeypatch.setenv("MEDSEG_IMAGES__SERVER", "registry.local/server:1")
    monkeypatch.setenv("MEDSEG_SERVER_MAX_REQUEST_MB", "64")
    monkeypatch.setenv("S3_ENDPOINT", "http://127.0.0.1:9")
    settings = PlatformSettings()
    assert (settings.store, settings.bucket) == ("s3://other/prefix", "other")
    assert (settings.ports.http, settings.ports.grpc) == (9080, DEFAULT_PORTS.grpc)
    assert settings.images.server == "registry.local/server:1"
    assert settings.images.project == DEFAULT_IMAGES.project
    assert settings.server.max_request_mb == 64
    assert settings.storage.display_endpoint() == "http://127.0.0.1:9"
    monkeypatch.setenv("MEDSEG_PORTS__GRPC", "not-a-port")
    with pytest.raises(ValueError, match=r"ports\.grpc"):
        PlatformSettings()


def test_server_args_leave_unset_limits_to_the_servers_environment() -> None:
    argv = ServerArgs("s3://b/models/m/v1", "m", 1, 2).argv()
    assert argv == [
        "--model_dir",
        "s3://b/models/m/v1",
        "--model_name",
        "m",
        "--http_port",
        "1",
        "--grpc_port",
        "2",
    ]
    full = ServerArgs("d", host="0.0.0.0", max_request_mb=8, max_concurrency=2).command()
    assert full[1:3] == ["-m", "model_server"]
    assert full[-6:] == ["--host", "0.0.0.0", "--max_request_mb", "8", "--max_concurrency", "2"]


#: Every workload's section in values.yaml, by its path: each carries one placement block.
WORKLOADS = (
    ("minio",),
    ("minio", "bucketJob"),
    ("pipeline", "upload"),
    ("pipeline", "steps"),
    ("training",),
    ("inferenceService",),
)


def test_placement_is_one_definition_in_the_schema_and_every_workload(
    values: dict[str, Any],
) -> None:
    """values.schema.json's ``placement`` has Placement's fields (pull secrets merged by the
    chart, resources per pod), every workload's section has each key, and each validates."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    keys = set(schema["definitions"]["placement"]["properties"])
    aliases = {f.alias for f in Placement.model_fields.values()}
    assert keys == aliases - {"imagePullSecrets"} | {"resources"}
    for path in WORKLOADS:
        section, props = values, schema
        for part in path:
            section, props = section[part], props["properties"][part]
        # Workloads whose pods medseg's code builds take their resources elsewhere (the
        # pipeline's RESOURCES table, the training group); the others have them in the block.
        own = keys - ({"resources"} if path in (("pipeline", "steps"), ("training",)) else set())
        assert own <= set(section), path
        for key in own:
            ref = props["properties"][key]["$ref"]
            assert ref == f"#/definitions/placement/properties/{key}", (path, key)
        Placement.model_validate({k: section[k] for k in own - {"resources"}})
    fields = {f"MEDSEG_PLACEMENT__{name.upper()}" for name in PlacementSettings.model_fields}
    assert fields == {  # the ConfigMap's keys
        k
        for o in render()
        if o["kind"] == "ConfigMap"
        for k in o["data"]
        if k.startswith("MEDSEG_PLACEMENT__")
    }


def test_placement_reads_json_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    monkeypatch.setenv(
        "MEDSEG_PLACEMENT__TRAINING",
        json.dumps({"nodeSelector": {"pool": "gpu"}, "tolerations": [toleration]}),
    )
    training = PlatformSettings().placement.training
    assert training.node_selector == {"pool": "gpu"} and training.tolerations == [toleration]
    assert PlatformSettings().placement.predictor == Placement()
    monkeypatch.setenv("MEDSEG_PLACEMENT__PREDICTOR", '{"nodeSelectr": {}}')
    with pytest.raises(ValueError, match="nodeSelectr"):
        PlacementSettings()
    monkeypatch.delenv("MEDSEG_PLACEMENT__PREDICTOR")
    monkeypatch.setenv("MEDSEG_PLACEMENT__STEPS", '{"affinity": {"podAffinity": {}}}')
    with pytest.raises(ValueError, match=r"KFP cannot set affinity\.podAffinity"):
        PlacementSettings()
