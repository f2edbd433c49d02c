"""The Helm chart and kustomize manifests, checked with the real helm and kubectl binaries."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import kubernetes_validate
import pytest
import yaml

from medseg.core.settings import PlacementSettings
from medseg.platform.kube import PIPELINE_RULES, role_rules
from tests.cluster.k8s import kserve_api_client

ROOT = Path(__file__).resolve().parents[3]
CHART = ROOT / "charts" / "medseg"
HELM = shutil.which("helm", path=str(ROOT / ".tools" / "bin")) or "helm"
VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
K8S_VERSIONS = ("1.30", "1.33")
#: Custom resources: checked against their SDK models instead of Kubernetes' own schemas.
CUSTOM = {("serving.kserve.io/v1beta1", "InferenceService")}


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([HELM, *args], capture_output=True, text=True, timeout=120)


def render(*args: str) -> list[dict[str, Any]]:
    done = helm("template", "medseg", str(CHART), "--namespace", "medseg", *args)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


@pytest.mark.parametrize("values", VALUES, ids=lambda p: p.stem)
def test_lint_strict(values: Path) -> None:
    done = helm("lint", "--strict", str(CHART), "-f", str(values))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 chart(s) failed" in done.stdout


def _pod_specs(obj: dict[str, Any]) -> list[dict[str, Any]]:
    kind = obj["kind"]
    if kind in ("StatefulSet", "Deployment", "Job"):
        return [obj["spec"]["template"]["spec"]]
    if kind == "InferenceService":
        return [obj["spec"]["predictor"]]
    return []


@pytest.mark.parametrize("values", VALUES, ids=lambda p: p.stem)
def test_rendered_objects_are_valid_and_secure(values: Path) -> None:
    objs = render("-f", str(values))
    assert objs
    pods = 0
    for obj in objs:
        if (obj["apiVersion"], obj["kind"]) not in CUSTOM:
            for version in K8S_VERSIONS:
                kubernetes_validate.validate(obj, version, strict=True)
        for pod in _pod_specs(obj):
            pods += 1
            where = f"{obj['kind']}/{obj['metadata']['name']}"
            psc = pod["securityContext"]
            assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0, where
            assert psc["seccompProfile"]["type"] == "RuntimeDefault", where
            for c in pod["containers"]:
                sc = c["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False, where
                assert sc["capabilities"]["drop"] == ["ALL"], where
                assert sc["readOnlyRootFilesystem"] is True, where
                assert c["resources"]["requests"] and c["resources"]["limits"], where
                assert ":" in c["image"] and not c["image"].endswith(":latest"), where
    assert pods >= 1


@pytest.mark.parametrize("values", VALUES, ids=lambda p: p.stem)
def test_inference_service_roundtrips_through_the_kserve_sdk(values: Path) -> None:
    client = kserve_api_client()
    isvcs = [o for o in render("-f", str(values)) if o["kind"] == "InferenceService"]
    assert len(isvcs) == 1
    (isvc,) = isvcs
    model = client.deserialize(SimpleNamespace(data=json.dumps(isvc)), "V1beta1InferenceService")
    assert client.sanitize_for_serialization(model) == isvc  # nothing lost or renamed
    predictor = model.spec.predictor
    assert predictor.min_replicas <= predictor.max_replicas
    mode = isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"]
    allowed = {"Knative": {"concurrency", "rps"}, "Standard": {"cpu", "memory"}}[mode]
    assert predictor.scale_metric in allowed


def test_modes_and_gpu_render_as_asked() -> None:
    (standard,) = [
        o
        for o in render("-f", str(CHART / "ci/standard-values.yaml"))
        if o["kind"] == "InferenceService"
    ]
    assert standard["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"] == "hpa"
    assert standard["spec"]["predictor"]["containers"][0]["ports"][0]["name"] == "h2c"
    (knative,) = [
        o
        for o in render("-f", str(CHART / "ci/knative-values.yaml"))
        if o["kind"] == "InferenceService"
    ]
    assert knative["spec"]["predictor"]["minReplicas"] == 0  # scale to zero
    (gpu,) = [
        o
        for o in render("-f", str(CHART / "ci/gpu-values.yaml"))
        if o["kind"] == "InferenceService"
    ]
    assert gpu["spec"]["predictor"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_external_s3_and_existing_secret_render_no_secret_value() -> None:
    objs = render("-f", str(CHART / "ci/external-s3-values.yaml"))
    kinds = {o["kind"] for o in objs}
    assert "Secret" not in kinds and "StatefulSet" not in kinds and "NetworkPolicy" not in kinds
    text = yaml.safe_dump_all(objs)
    assert "hospital-s3-credentials" in text  # referenced by name only
    config = next(o for o in objs if o["kind"] == "ConfigMap")
    assert config["data"]["S3_ENDPOINT"] == "https://s3.eu-west-1.amazonaws.com"
    assert config["data"]["S3_USE_HTTPS"] == "1"
    sa = next(
        o for o in objs if o["kind"] == "ServiceAccount" and "predictor" in o["metadata"]["name"]
    )
    assert sa["secrets"] == [{"name": "hospital-s3-credentials"}]
    # with the bundled MinIO and given credentials, they appear only inside the Secret
    objs = render("--set", "s3.accessKey=AKIAEXAMPLE", "--set", "s3.secretKey=s3cr3t-value")
    for obj in objs:
        dumped = yaml.safe_dump(obj)
        if obj["kind"] != "Secret":
            assert "s3cr3t-value" not in dumped and "czNjcjN0LXZhbHVl" not in dumped
    secret = next(o for o in objs if o["kind"] == "Secret")
    annotations = secret["metadata"]["annotations"]
    assert annotations["serving.kserve.io/s3-endpoint"] == "medseg-minio.medseg.svc:9000"
    assert annotations["serving.kserve.io/s3-usehttps"] == "0"


def test_rbac_and_network_policy() -> None:
    objs = render("-f", str(CHART / "ci/knative-values.yaml"))
    role = next(o for o in objs if o["kind"] == "Role")
    # The one table of the calls the code makes (tests/cluster/test_cluster.py checks it against the
    # API server's audit log), rendered as the Role's rules.
    assert role["rules"] == role_rules(PIPELINE_RULES)
    granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"]
               for r in rule["resources"] for v in rule["verbs"]}  # fmt: skip
    assert ("create", "pods") not in {(v, r) for _, r, v in granted}
    assert not any(r == "secrets" for _, r, _ in granted)
    policy = next(o for o in objs if o["kind"] == "NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    sources = policy["spec"]["ingress"][0]["from"]
    assert all(
        s["podSelector"]["matchLabels"] == {"app.kubernetes.io/part-of": "medseg"} for s in sources
    )
    assert sources[1]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "kubeflow"
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "inferenceService.minReplicas=-1"], "minimum: got -1, want 0"),
        (["--set", "inferenceService.maxReplicas=0"], "minimum: got 0, want 1"),
        (["--set", "inferenceService.minReplicas=5"], "must not exceed maxReplicas"),
        (["--set", "inferenceService.deploymentMode=Serverless"], "deploymentMode"),
        (["--set-string", "inferenceService.maxReplicas=three"], "maxReplicas"),
        (["--set", "inferenceService.scaleMetric=cpu"], "needs deploymentMode Standard"),
        (
            [
                "--set",
                "inferenceService.deploymentMode=Standard",
                "--set",
                "inferenceService.minReplicas=0",
                "--set",
                "inferenceService.scaleMetric=cpu",
            ],
            "at least 1 in Standard mode",
        ),
        (["--set", "minio.enabled=false"], "s3.endpoint is required"),
        (["--set", "inferenceService.nope=1"], "additional properties 'nope' not allowed"),
        (
            ["--set", "inferenceService.terminationGracePeriodSeconds=5"],
            "minimum: got 5, want 10",
        ),
        (
            [
                "--set",
                "pipeline.steps.priorityClassName=high",
                "--set",
                "pipeline.steps.affinity.podAntiAffinity.x=y",
            ],
            "pipeline.steps.priorityClassName: KFP cannot set it on a pipeline step",
        ),
        (
            ["--set", "pipeline.steps.affinity.podAffinity.x=y"],
            "pipeline.steps.affinity.podAffinity: KFP sets only affinity.nodeAffinity",
        ),
        (["--set", "training.tolerations[0].operator=Sometimes"], "'Equal', 'Exists'"),
        (["--set", "minio.affinity.nodeAfinity.x=y"], "additional properties 'nodeAfinity'"),
        (["--set", "nameOverride=Bad_Name"], "nameOverride"),
        (["--set", "imagePullSecrets[0].name=reg"], "imagePullSecrets"),
        (
            [
                "--set",
                "inferenceService.gpus=1",
                "--set-string",
                "inferenceService.resources.limits.nvidia\\.com/gpu=1",
            ],
            "set inferenceService.gpus instead",
        ),
    ],
    ids=[
        "negative-min",
        "zero-max",
        "min-above-max",
        "unknown-mode",
        "wrong-type",
        "metric-for-mode",
        "standard-min-zero",
        "no-endpoint",
        "unknown-key",
        "grace-below-margin",
        "steps-placement-kfp-cannot-set",
        "steps-pod-affinity",
        "toleration-operator",
        "affinity-typo",
        "name-override",
        "pull-secret-not-a-name",
        "predictor-gpus-twice",
    ],
)
def test_bad_values_are_rejected_by_helm(args: list[str], message: str) -> None:
    done = helm("template", "medseg", str(CHART), *args)
    assert done.returncode != 0
    assert message in done.stderr, done.stderr


def test_manifests_are_in_sync_with_the_chart(tmp_path: Path) -> None:
    """``manifests/`` is exactly what scripts/render_manifests.py makes from the chart."""
    out = tmp_path / "manifests"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts/render_manifests.py"),
            "--out",
            str(out),
            "--helm",
            HELM,
            "--rules",
            str(tmp_path / "pipeline-rules.yaml"),
        ],
        check=True,
        capture_output=True,
    )
    rules = CHART / "files" / "pipeline-rules.yaml"
    assert rules.read_text() == (tmp_path / "pipeline-rules.yaml").read_text(), "make manifests"
    committed = {
        p.relative_to(ROOT / "manifests"): p.read_text()
        for p in (ROOT / "manifests").rglob("*.yaml")
    }
    fresh = {p.relative_to(out): p.read_text() for p in out.rglob("*.yaml")}
    assert committed == fresh, "run `make manifests` and commit the result"


@pytest.mark.parametrize(("overlay", "values"), [("cpu", []), ("gpu", ["gpu-values.yaml"])])
def test_kustomize_build_equals_the_chart_render(overlay: str, values: list[str]) -> None:
    done = subprocess.run(
        ["kubectl", "kustomize", str(ROOT / "manifests" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    built = [d for d in yaml.safe_load_all(done.stdout) if d]
    args = ["--set", "s3.existingSecret=medseg-s3"]
    for v in values:
        args += ["-f", str(CHART / "ci" / v)]
    rendered = render(*args)

    def by_key(objs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
        return {(o["kind"], o["metadata"]["name"]): o for o in objs}

    assert by_key(built) == by_key(rendered)
    assert not any(o["kind"] == "Secret" for o in built)


@pytest.mark.parametrize(
    ("release", "name_override", "fullname_override"),
    [
        ("medseg", "", ""),
        ("prod", "", ""),
        ("my-medseg-2", "", ""),
        ("x" * 40, "", ""),
        ("prod", "seg", ""),
        ("segments", "seg", ""),
        ("prod", "", "imaging"),
        ("prod", "seg", "imaging-" + "y" * 40),
    ],
)
def test_release_names_match_the_chart(
    release: str, name_override: str, fullname_override: str
) -> None:
    """medseg.platform.kube.Release derives the names the chart gives its objects, for any release
    name and nameOverride / fullnameOverride."""
    from medseg.platform.kube import Release

    names = Release(release, "ns", name_override, fullname_override)
    done = helm("template", release, str(CHART), "--namespace", "ns",
                "--set", f"nameOverride={name_override}",
                "--set", f"fullnameOverride={fullname_override}")  # fmt: skip
    assert done.returncode == 0, done.stderr
    objs = {(o["kind"], o["metadata"]["name"]) for o in yaml.safe_load_all(done.stdout) if o}
    assert ("Secret", names.s3_secret) in objs
    assert ("ConfigMap", names.s3_config) in objs
    assert ("ServiceAccount", names.pipeline_service_account) in objs
    assert ("ServiceAccount", names.predictor_service_account) in objs
    assert ("Role", f"{names.fullname}-pipeline") in objs


def test_minimum_operator_versions_are_stated_once() -> None:
    """Chart.yaml states the minimum KServe and Training Operator medseg.platform.kube checks."""
    from medseg.platform.kube import MIN_OPERATORS

    annotations = yaml.safe_load((CHART / "Chart.yaml").read_text())["annotations"]
    assert annotations["medseg.io/min-kserve"] == MIN_OPERATORS["KServe"][0]
    assert annotations["medseg.io/min-training-operator"] == MIN_OPERATORS["Training Operator"][0]


# --- one definition of each cluster object: what the chart renders is what medseg applies ----


def _merged_values(values: Path) -> dict[str, Any]:
    """The chart's values.yaml overlaid with a ``ci/`` file, as helm merges them."""

    def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
        out = dict(base)
        for key, value in over.items():
            is_map = isinstance(value, dict) and isinstance(out.get(key), dict)
            out[key] = merge(out[key], value) if is_map else value
        return out

    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    return merge(defaults, yaml.safe_load(values.read_text()) or {})


def _spec_of_values(values: dict[str, Any]) -> Any:
    """The InferenceServiceSpec that `medseg deploy` builds for the same settings."""
    from medseg.platform.deploy import InferenceServiceSpec
    from medseg.platform.kube import Release

    isvc, image = values["inferenceService"], values["serverImage"]
    res = isvc["resources"]
    return InferenceServiceSpec(
        name=isvc["name"],
        storage_uri=f"s3://{values['s3']['bucket']}/models/{isvc['name']}/v1",
        image=f"{image['repository']}:{image['tag']}",
        image_pull_policy=image["pullPolicy"],
        service_account=Release("medseg", "medseg").predictor_service_account,
        deployment_mode=isvc["deploymentMode"],
        min_replicas=isvc["minReplicas"],
        max_replicas=isvc["maxReplicas"],
        scale_metric=isvc["scaleMetric"],
        scale_target=isvc["scaleTarget"],
        container_concurrency=isvc["containerConcurrency"],
        protocol=isvc["protocol"],
        cpu=res["requests"]["cpu"],
        memory=res["requests"]["memory"],
        cpu_limit=res["limits"]["cpu"],
        memory_limit=res["limits"]["memory"],
        gpus=isvc["gpus"],
        max_request_mb=isvc["maxRequestMb"],
        grace_period_s=isvc["terminationGracePeriodSeconds"],
    )


def placement_env(objs: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Set the ``MEDSEG_PLACEMENT__*`` variables of the rendered ConfigMap, as a step gets them."""
    (config,) = [
        o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-s3")
    ]
    env = {k: v for k, v in config["data"].items() if k.startswith("MEDSEG_PLACEMENT__")}
    assert set(env) == {f"MEDSEG_PLACEMENT__{k.upper()}" for k in PlacementSettings.model_fields}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def _applied(isvc: Any) -> dict[str, Any]:
    """An InferenceService as medseg sends it to the API server (camelCase JSON)."""
    data: dict[str, Any] = kserve_api_client().sanitize_for_serialization(isvc)
    return data


def _compare(rendered: dict[str, Any], applied: dict[str, Any]) -> None:
    """Equal but for helm's own labels (a superset) and the namespace (helm's -n)."""
    rendered, applied = json.loads(json.dumps(rendered)), json.loads(json.dumps(applied))
    assert applied["metadata"].pop("namespace") == "medseg"
    labels, own = rendered["metadata"].pop("labels"), applied["metadata"].pop("labels")
    assert own.items() <= labels.items()
    assert applied == rendered


@pytest.mark.parametrize(
    "values", [v for v in VALUES if "external" not in v.name], ids=lambda p: p.stem
)
def test_chart_and_deploy_build_the_same_inference_service(
    values: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`medseg deploy` and the pipeline's deploy step apply the object the chart renders.

    The predictor's placement reaches them as in a pipeline step: from the release's ConfigMap.
    """
    from medseg.platform.deploy import build_inference_service

    objs = render("-f", str(values))
    placement_env(objs, monkeypatch)
    (rendered,) = [o for o in objs if o["kind"] == "InferenceService"]
    _compare(rendered, _applied(build_inference_service(_spec_of_values(_merged_values(values)))))


@pytest.mark.parametrize(
    "values", [v for v in VALUES if "external" not in v.name], ids=lambda p: p.stem
)
@pytest.mark.parametrize("min_replicas", [None, 1, 2, 3])
def test_chart_and_deploy_build_the_same_pod_disruption_budget(
    values: Path, min_replicas: int | None
) -> None:
    """One PodDisruptionBudget, the chart's and `medseg deploy`'s, over more than one replica."""
    from kubernetes.client import ApiClient

    from medseg.platform.deploy import build_pod_disruption_budget

    args = ["-f", str(values)]
    merged = _merged_values(values)
    if min_replicas is not None:
        args += ["--set", f"inferenceService.minReplicas={min_replicas}"]
        merged["inferenceService"]["minReplicas"] = min_replicas
        merged["inferenceService"]["maxReplicas"] = max(
            min_replicas, merged["inferenceService"]["maxReplicas"]
        )
        args += [
            "--set",
            f"inferenceService.maxReplicas={merged['inferenceService']['maxReplicas']}",
        ]
    spec = _spec_of_values(merged)
    rendered = [o for o in render(*args) if o["kind"] == "PodDisruptionBudget"]
    built = build_pod_disruption_budget(spec)
    if spec.min_replicas <= 1:
        assert rendered == [] and built is None
        return
    (pdb,) = rendered
    _compare(pdb, ApiClient().sanitize_for_serialization(built))
    (isvc,) = [o for o in render(*args) if o["kind"] == "InferenceService"]
    pods = isvc["spec"]["predictor"]
    for constraint in pods.get("topologySpreadConstraints", []):  # the same pods, spread
        assert constraint["labelSelector"] == pdb["spec"]["selector"]


def test_standard_predictors_spread_and_drain_within_their_grace_period() -> None:
    """Standard mode: the pod's grace period is the server's, and replicas prefer other nodes."""
    from medseg.core.settings import ServerLimits

    (isvc,) = [
        o
        for o in render("-f", str(CHART / "ci/standard-values.yaml"))
        if o["kind"] == "InferenceService"
    ]
    pod = isvc["spec"]["predictor"]
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    grace = pod["terminationGracePeriodSeconds"]
    assert env["MEDSEG_SERVER_GRACE_PERIOD_S"] == str(grace)
    assert ServerLimits(grace_period_s=grace).drain_s < grace
    ((spread),) = pod["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert spread["whenUnsatisfiable"] == "ScheduleAnyway"


def test_deploy_defaults_are_the_chart_defaults() -> None:
    """With nothing but a name and a model, medseg deploys what the chart's defaults render."""
    from medseg.core.settings import ServerLimits
    from medseg.platform.deploy import InferenceServiceSpec, build_inference_service
    from medseg.platform.kube import SERVER_IMAGE

    (rendered,) = [o for o in render() if o["kind"] == "InferenceService"]
    spec = InferenceServiceSpec(
        name="brats-segresnet", storage_uri="s3://medseg/models/brats-segresnet/v1"
    )
    assert spec.image == SERVER_IMAGE and spec.max_request_mb == ServerLimits().max_request_mb
    _compare(rendered, _applied(build_inference_service(spec)))


def test_pytorchjob_pods_carry_the_chart_security_contexts() -> None:
    """The one PyTorchJob builder uses the chart's pod and container security settings."""
    from kubernetes.client import ApiClient

    from medseg.platform.launchers import PyTorchJobSpec, build_pytorchjob

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    job = build_pytorchjob(
        PyTorchJobSpec(
            name="j", image="i", dataset="d@v", store="s3://b", run_id="r", config_uri="s3://b/c"
        )
    )
    data = ApiClient().sanitize_for_serialization(job)
    for replica in data["spec"]["pytorchReplicaSpecs"].values():
        pod = replica["template"]["spec"]
        assert pod["securityContext"] == values["podSecurityContext"]
        (container,) = pod["containers"]
        assert container["securityContext"] == values["securityContext"]
        assert {"name": "HOME", "value": "/tmp"} in container["env"]
        assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
        assert {"name": "tmp", "emptyDir": {}} in pod["volumes"]


# --- placement: one block per workload, the chart's pods and medseg's alike --------------------

#: The placement keys of a pod spec (medseg.core.settings.Placement's fields, by Kubernetes' names).
PLACEMENT_KEYS = (
    "nodeSelector",
    "tolerations",
    "affinity",
    "priorityClassName",
    "topologySpreadConstraints",
    "imagePullSecrets",
)


def _block(n: int) -> dict[str, Any]:
    """A placement block that no other block equals (``n`` tells them apart)."""
    return {
        "nodeSelector": {"medseg.io/pool": f"pool-{n}"},
        "tolerations": [{"key": f"taint-{n}", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {
            "nodeAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {"weight": n, "preference": {"matchExpressions": [
                        {"key": "zone", "operator": "In", "values": [f"z{n}"]}]}}
                ]
            }
        },
        "priorityClassName": f"class-{n}",
        "topologySpreadConstraints": [
            {"maxSkew": n, "topologyKey": "topology.kubernetes.io/zone",
             "whenUnsatisfiable": "DoNotSchedule"}
        ],
    }  # fmt: skip


#: A values file placing every workload differently, with pull secrets global and per image.
PLACED = {
    "imagePullSecrets": ["global-reg"],
    "image": {"pullSecrets": ["project-reg"]},
    "serverImage": {"pullSecrets": ["server-reg"]},
    "minio": {
        **_block(1),
        "image": {"pullSecrets": ["minio-reg"]},
        "mcImage": {"pullSecrets": ["mc-reg"]},
        "bucketJob": _block(2),
    },
    "pipeline": {
        "upload": {"enabled": True, "host": "http://kfp:8888", **_block(3)},
        "steps": {k: v for k, v in _block(4).items()
                  if k not in ("priorityClassName", "topologySpreadConstraints")},
    },
    "training": _block(5),
    "inferenceService": {"deploymentMode": "Standard", "scaleMetric": "cpu", "scaleTarget": 70,
                         **_block(6)},
    "commonLabels": {"team": "imaging"},
    "commonAnnotations": {"medseg.io/owner": "radiology"},
}  # fmt: skip


def _placed(tmp_path: Path) -> tuple[Path, list[dict[str, Any]]]:
    path = tmp_path / "placed-values.yaml"
    path.write_text(yaml.safe_dump(PLACED))
    return path, render("-f", str(path))


def _placement_of(pod: dict[str, Any]) -> dict[str, Any]:
    return {k: pod[k] for k in PLACEMENT_KEYS if k in pod}


def _expected(block: dict[str, Any], secrets: list[str]) -> dict[str, Any]:
    return {**block, "imagePullSecrets": [{"name": s} for s in secrets]}


def test_every_workload_is_placed_by_its_own_block(tmp_path: Path) -> None:
    """MinIO, its bucket Job, the upload Job and the predictor each get exactly their block."""
    _, objs = _placed(tmp_path)
    for obj in objs:
        if (obj["apiVersion"], obj["kind"]) not in CUSTOM:
            kubernetes_validate.validate(obj, K8S_VERSIONS[-1], strict=True)
    pods = {
        obj["metadata"]["labels"].get("app.kubernetes.io/component", obj["kind"]): pod
        for obj in objs
        for pod in _pod_specs(obj)
    }
    assert set(pods) == {"minio", "bucket", "pipeline-upload", "InferenceService"}
    assert _placement_of(pods["minio"]) == _expected(_block(1), ["global-reg", "minio-reg"])
    assert _placement_of(pods["bucket"]) == _expected(_block(2), ["global-reg", "mc-reg"])
    assert _placement_of(pods["pipeline-upload"]) == _expected(
        _block(3), ["global-reg", "project-reg"]
    )
    predictor = _placement_of(pods["InferenceService"])
    own_spread = predictor["topologySpreadConstraints"].pop(0)  # Standard mode's, first
    assert own_spread["topologyKey"] == "kubernetes.io/hostname"
    assert predictor == _expected(_block(6), ["global-reg", "server-reg"])
    # The upload Job compiles the pipeline with the ConfigMap's placement in its environment.
    (upload,) = [o for o in objs if o["kind"] == "Job" and "upload" in o["metadata"]["name"]]
    (container,) = upload["spec"]["template"]["spec"]["containers"]
    assert container["envFrom"] == [{"configMapRef": {"name": "medseg-s3"}}]
    # commonLabels and commonAnnotations on every object; selectors keep the chart's own.
    for obj in objs:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        assert obj["metadata"]["labels"]["team"] == "imaging", where
        assert obj["metadata"]["annotations"]["medseg.io/owner"] == "radiology", where
    (sts,) = [o for o in objs if o["kind"] == "StatefulSet"]
    assert "team" not in sts["spec"]["selector"]["matchLabels"]


def test_configmap_hands_each_block_to_the_python_builders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The PyTorchJob pods, the predictor and the pipeline steps read the chart's blocks."""
    from kubernetes.client import ApiClient

    from medseg.platform.deploy import build_inference_service
    from medseg.platform.launchers import PyTorchJobSpec, build_pytorchjob

    path, objs = _placed(tmp_path)
    placement_env(objs, monkeypatch)
    settings = PlacementSettings()
    assert settings.steps.api_fields() == {
        **PLACED["pipeline"]["steps"], "imagePullSecrets": ["global-reg", "project-reg"]
    }  # fmt: skip
    job = build_pytorchjob(
        PyTorchJobSpec(
            name="j", image="i", dataset="d@v", store="s3://b", run_id="r", config_uri="s3://b/c"
        )
    )
    data = ApiClient().sanitize_for_serialization(job)
    want = _expected(_block(5), ["global-reg", "project-reg"])
    for role in ("Master", "Worker"):
        assert _placement_of(data["spec"]["pytorchReplicaSpecs"][role]["template"]["spec"]) == want
    (rendered,) = [o for o in objs if o["kind"] == "InferenceService"]
    del rendered["metadata"]["annotations"]["medseg.io/owner"]  # commonAnnotations: the chart's
    spec = _spec_of_values(_merged_values(path))
    _compare(rendered, _applied(build_inference_service(spec)))


def test_gpu_pool_places_gpu_work_on_the_pool_and_nothing_else(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ci/gpu-pool-values.yaml: training and the predictor select and tolerate the GPU pool,
    with nvidia.com/gpu limits; MinIO, its Job and the pipeline's steps carry neither."""
    from kubernetes.client import ApiClient

    from medseg.platform.launchers import PyTorchJobSpec, build_pytorchjob

    values = CHART / "ci" / "gpu-pool-values.yaml"
    pool = yaml.safe_load(values.read_text())["training"]
    objs = render("-f", str(values))
    (isvc,) = [o for o in objs if o["kind"] == "InferenceService"]
    predictor = isvc["spec"]["predictor"]
    assert predictor["nodeSelector"] == pool["nodeSelector"]
    assert predictor["tolerations"] == pool["tolerations"]
    assert predictor["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for obj in objs:
        for pod in _pod_specs(obj):
            assert pod["imagePullSecrets"] == [{"name": "medseg-registry"}]
            if obj["kind"] != "InferenceService":
                assert "nodeSelector" not in pod and "tolerations" not in pod, obj["kind"]
    placement_env(objs, monkeypatch)
    assert PlacementSettings().steps.api_fields() == {"imagePullSecrets": ["medseg-registry"]}
    job = build_pytorchjob(
        PyTorchJobSpec(name="j", image="i", dataset="d@v", store="s3://b", run_id="r",
                       config_uri="s3://b/c", workers=2, gpus_per_worker=2)
    )  # fmt: skip
    data = ApiClient().sanitize_for_serialization(job)
    for replica in data["spec"]["pytorchReplicaSpecs"].values():
        pod = replica["template"]["spec"]
        assert pod["nodeSelector"] == pool["nodeSelector"]
        assert pod["tolerations"] == pool["tolerations"]
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"


# --- the README's parameters table: generated from values.yaml's `## @param` lines -------------


def _leaves(values: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Every value, by its dotted path (an empty map or list is a value; a full map is not)."""
    out: list[tuple[str, Any]] = []
    for key, value in values.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and value:
            out += _leaves(value, path)
        else:
            out.append((path, value))
    return out


def _shown(value: Any) -> str:
    """A default as readme-generator-for-helm writes it in the table."""
    if value == "":
        return '""'
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def test_every_value_is_documented_and_the_readme_table_is_generated_from_them() -> None:
    """Each value has its `## @param` line, in order, and a schema entry; README.md's table is
    the generator's output for them (`make manifests`): names, descriptions and defaults."""
    import re

    text = (CHART / "values.yaml").read_text()
    params = re.findall(r"^ *## @param (\S+) (?:\[\w+\] )?(.+)$", text, re.MULTILINE)
    leaves = _leaves(yaml.safe_load(text))
    assert [name for name, _ in params] == [path for path, _ in leaves]
    schema = json.loads((CHART / "values.schema.json").read_text())
    for path, _ in leaves:  # a schema entry for each (or for a map that takes any key)
        node = schema
        for part in path.split("."):
            while "$ref" in node:
                node = _resolve(schema, node["$ref"])
            if "properties" not in node:
                assert node.get("additionalProperties", True) is not False, path
                break
            assert part in node["properties"], path
            node = node["properties"][part]
    readme = (CHART / "README.md").read_text()
    rows = re.findall(r"^\| `([^`]+)` +\| (.*?) +\| `(.*)` +\|$", readme, re.MULTILINE)
    want = [
        (name, desc, _shown(value)) for (name, desc), (_, value) in zip(params, leaves, strict=True)
    ]
    assert rows == want, "run `make manifests` and commit charts/medseg/README.md"
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"readme-generator-for-helm@\d+\.\d+\.\d+\n", makefile)  # pinned


def _resolve(schema: dict[str, Any], ref: str) -> dict[str, Any]:
    node: dict[str, Any] = schema
    for step in ref.removeprefix("#/").split("/"):
        node = node[step]
    return node
