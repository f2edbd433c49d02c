"""The chart's optional MLflow server, rendered by the real helm and validated like the rest."""

from __future__ import annotations

import kubernetes_validate
import yaml

from tests.unit.platform.test_chart import K8S_VERSIONS, _pod_specs, render


def test_mlflow_is_off_by_default_and_secure_when_on() -> None:
    objs = render()
    assert not [o for o in objs if "mlflow" in o["metadata"]["name"]]
    config = next(o for o in objs if o["kind"] == "ConfigMap")
    assert "MLFLOW_TRACKING_URI" not in config["data"]  # without tracking nothing changes

    objs = render("--set", "mlflow.enabled=true", "--set", "mlflow.existingSecret=mlflow-db")
    ours = [o for o in objs if o["metadata"]["name"] == "medseg-mlflow"]
    assert sorted(o["kind"] for o in ours) == ["Deployment", "Service"]
    for obj in ours:
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)
    deployment = next(o for o in ours if o["kind"] == "Deployment")
    (pod,) = _pod_specs(deployment)
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] and sc["capabilities"]["drop"] == ["ALL"]
    assert sc["allowPrivilegeEscalation"] is False
    env = {e["name"]: e for e in container["env"]}
    # the database URI and the S3 keys by reference only, never on the command line
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"] == {
        "name": "mlflow-db",
        "key": "uri",
    }
    assert "secretKeyRef" in env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]
    assert env["MLFLOW_S3_ENDPOINT_URL"]["value"] == "http://medseg-minio.medseg.svc:9000"
    argv = " ".join(container["command"] + container["args"])
    assert "$MLFLOW_BACKEND_STORE_URI" in argv and "--serve-artifacts" in argv
    service = next(o for o in ours if o["kind"] == "Service")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    # every pipeline step and training pod reads the s3 ConfigMap: the URI goes there
    config = next(o for o in objs if o["kind"] == "ConfigMap")
    assert config["data"]["MLFLOW_TRACKING_URI"] == "http://medseg-mlflow.medseg.svc:5000"

    objs = render("--set", "mlflow.trackingUri=http://mlflow.mlops:5000")
    config = next(o for o in objs if o["kind"] == "ConfigMap")
    assert config["data"]["MLFLOW_TRACKING_URI"] == "http://mlflow.mlops:5000"
    assert "medseg-mlflow" not in yaml.safe_dump_all(objs)
