"""The real node of ``scripts/cluster.py``: containers run, talk, resolve names, and leave no trace.

The fixture starts the cluster with its real node (containerd + runc, a kubelet, kube-proxy,
CoreDNS and metrics-server beside kwok's fake node), or reuses a running one; pods here tolerate
the real node's taint and select it. Every pod is "restricted" and runs the busybox image of
scripts/images.py (Debian's busybox-static), which ``up`` builds and imports (no registry). The
last test stops the cluster it started and compares the machine with what it was before ``up``.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.cluster_kit import CL, ROOT, SCRIPT, eventually, kubectl, kubectl_json

NS = "node-test"


pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not CL.node_wanted(), reason="the real node needs root"
)

#: Kernel settings the node's parts could change (the kubelet's kernel defaults, forwarding,
#: kube-proxy's conntrack and localhost settings, bridge netfilter).
SYSCTLS = (
    "vm.overcommit_memory",
    "vm.panic_on_oom",
    "kernel.panic",
    "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
    "net.ipv4.ip_forward",
    "net.ipv4.conf.all.forwarding",
    "net.ipv4.conf.default.forwarding",
    "net.ipv4.conf.all.route_localnet",
    "net.ipv6.conf.all.forwarding",
    "net.netfilter.nf_conntrack_max",
    "net.netfilter.nf_conntrack_tcp_timeout_established",
    "net.netfilter.nf_conntrack_tcp_timeout_close_wait",
    "net.bridge.bridge-nf-call-iptables",
)


def machine_state() -> dict[str, Any]:
    """What the node could leave behind: mounts, links, routes, network namespaces, iptables
    rules and chains, cgroups, kernel settings, host paths and processes of this checkout."""

    def read(path: str) -> str:
        p = Path("/proc/sys", path.replace(".", "/"))
        return p.read_text().strip() if p.exists() else "-"

    def iptables(tool: str) -> list[str]:
        out = subprocess.run([f"{tool}-save"], capture_output=True, text=True).stdout
        # Chain lines carry packet counters; comments carry the time.
        return sorted(re.sub(r" \[\d+:\d+\]$", "", ln) for ln in out.splitlines() if ln[:1] != "#")

    # Mounts where the node's parts mount (others' mounts elsewhere, such as an image build's
    # overlays, may come and go meanwhile): network namespaces anywhere.
    places = (str(ROOT), str(CL.CONTAINERD_ROOT), "/run", "/var", "/sys/fs/cgroup")
    mounts = sorted(
        f"{fields[4]} {fields[fields.index('-') + 1]}"
        for fields in map(str.split, Path("/proc/self/mountinfo").read_text().splitlines())
        if fields[4].startswith(places) or fields[fields.index("-") + 1] == "nsfs"
    )
    cgroups = sorted(
        str(d) for h in Path("/sys/fs/cgroup").iterdir() if h.is_dir() for d in h.iterdir()
        if d.is_dir()
    )  # fmt: skip
    # The cluster's daemons; not MinIO, kubectl or helm from the same folder, which tests run
    # by themselves (a MinIO of another test may be running beside this module).
    tools = ("minio", "kubectl", "helm")
    daemons = [str(p).encode() for p in CL.BIN.iterdir() if p.name not in tools]
    ours = (str(CL.RUN).encode(), str(CL.CONTAINERD_SOCKET).encode(), *daemons)
    procs = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if any(mark in cmdline for mark in ours):
                procs.append(cmdline.replace(b"\0", b" ").decode(errors="replace"))
    return {
        "mounts": mounts,
        "links": sorted(Path("/sys/class/net").iterdir()),
        "routes": subprocess.run(["ip", "route"], capture_output=True, text=True).stdout,
        "netns": sorted(os.listdir("/run/netns")) if Path("/run/netns").is_dir() else [],
        "iptables": iptables("iptables"),
        "ip6tables": iptables("ip6tables"),
        "cgroups": cgroups,
        "sysctls": {name: read(name) for name in SYSCTLS},
        "paths": {str(p): p.exists() for p in CL.HOST_PATHS},
        "processes": sorted(procs),
    }


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, Any] | None]:
    """The cluster with its real node; yields the machine's state before ``up`` (None if reused)."""
    reuse = CL.healthy(node=True)
    before = None
    if not reuse:
        before = machine_state()
        done = subprocess.run([sys.executable, str(SCRIPT), "up"], timeout=3 * 3600)
        assert done.returncode == 0, f"the cluster did not come up; logs in {CL.LOGS}"
        CL.load_ports()
    kubectl("delete", "namespace", NS, "--ignore-not-found", "--wait=true", "--timeout=120s")
    labels = {f"pod-security.kubernetes.io/{m}": "restricted" for m in ("enforce", "warn")}
    ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS, "labels": labels}}
    assert kubectl("apply", "-f", "-", stdin=json.dumps(ns)).returncode == 0
    yield before
    if not reuse:
        subprocess.run([sys.executable, str(SCRIPT), "down"], timeout=300, check=False)


def pod(name: str, command: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    """A "restricted" busybox pod on the real node (read-only root, uid from the image)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": labels or {}},
        "spec": {
            "nodeSelector": CL.REAL_NODE_SELECTOR,
            "tolerations": [CL.REAL_NODE_TOLERATION],
            "terminationGracePeriodSeconds": 1,
            "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [
                {
                    "name": "main",
                    "image": CL.busybox_image(),
                    "imagePullPolicy": "Never",
                    "command": ["sh", "-c", command],
                    "securityContext": {**CL.RESTRICTED_CONTAINER, "readOnlyRootFilesystem": True},
                    "resources": {"limits": {"cpu": "200m", "memory": "32Mi"}},
                    "volumeMounts": [{"name": "www", "mountPath": "/www"}],
                }
            ],
            "volumes": [{"name": "www", "emptyDir": {}}],
        },
    }


def running(name: str) -> dict[str, Any] | None:
    doc = kubectl_json("get", "pod", name, "-n", NS)
    return doc if doc["status"].get("phase") == "Running" and doc["status"].get("podIP") else None


def exec_(name: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return kubectl("exec", "-n", NS, name, "--", *argv)


def fetch(name: str, url: str) -> subprocess.CompletedProcess[str]:
    """An HTTP GET from inside a pod (busybox's ``wget -T`` crashes: ``timeout`` bounds it)."""
    return exec_(name, "timeout", "10", "wget", "-qO-", url)


WEB = "echo pong > /www/index.html; echo web started; exec httpd -f -p 8080 -h /www"
BUSY = "i=0; while true; do i=$((i+1)); done"  # CPU for metrics-server to see


@pytest.fixture(scope="module")
def pods(cluster: Any) -> dict[str, str]:
    """A web server behind a Service and a client pod, both running; name -> pod IP."""
    svc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": NS},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]},
    }
    docs = [pod("web", WEB, {"app": "web"}), pod("client", BUSY), svc]
    items = {"apiVersion": "v1", "kind": "List", "items": docs}
    done = kubectl("apply", "-f", "-", stdin=json.dumps(items))
    assert done.returncode == 0, done.stderr
    ips = {}
    for name in ("web", "client"):
        doc = eventually(functools.partial(running, name), 120, f"{name} running")
        ips[name] = doc["status"]["podIP"]
    return ips


def test_restricted_pod_runs_on_the_real_node(pods: dict[str, str]) -> None:
    doc = kubectl_json("get", "pod", "web", "-n", NS)
    assert doc["spec"]["nodeName"] == CL.REAL_NODE_NAME
    assert pods["web"].startswith("10.244.99.")
    assert exec_("web", "id", "-u").stdout.strip() == "1000"  # the images' user
    denied = exec_("web", "touch", "/written")
    assert denied.returncode != 0 and "Read-only file system" in denied.stderr + denied.stdout
    logs = eventually(lambda: "web started" in kubectl("logs", "-n", NS, "web").stdout, 30)
    assert logs
    # Nothing else scheduled onto the real node: pods without the toleration stay on kwok.
    on_node = kubectl_json("get", "pods", "-A", "--field-selector",
                           f"spec.nodeName={CL.REAL_NODE_NAME}")["items"]  # fmt: skip
    assert {p["metadata"]["namespace"] for p in on_node} == {NS}


def test_pods_reach_each_other_services_and_dns(pods: dict[str, str]) -> None:
    by_ip = fetch("client", f"http://{pods['web']}:8080/")
    assert by_ip.stdout.strip() == "pong", by_ip.stderr
    name = f"web.{NS}.svc.{CL.CLUSTER_DOMAIN}"
    lookup = exec_("client", "nslookup", name)
    cluster_ip = kubectl_json("get", "service", "web", "-n", NS)["spec"]["clusterIP"]
    assert lookup.returncode == 0 and cluster_ip in lookup.stdout, lookup.stdout + lookup.stderr
    # kube-proxy's rules may lag the Service by a sync.
    eventually(
        lambda: fetch("client", f"http://{name}/").stdout.strip() == "pong",
        60,
        "the Service by its DNS name",
    )
    # Names outside the cluster are refused, not forwarded off the machine.
    outside = exec_("client", "nslookup", "example.com")
    assert outside.returncode != 0


def test_pods_have_no_route_off_the_machine(pods: dict[str, str]) -> None:
    """The bridge has no gateway: a pod's only routes are its bridge's subnet (and the Service
    range through it); a connection to any other address fails at once, before a packet leaves.
    192.0.2.1 is TEST-NET-1 (RFC 5737), never routed anywhere."""
    routes = exec_("client", "ip", "route")
    assert routes.returncode == 0, routes.stderr
    assert "default" not in routes.stdout, routes.stdout
    off = fetch("client", "http://192.0.2.1/")
    assert off.returncode != 0
    assert "unreachable" in (off.stderr + off.stdout).lower(), off.stderr + off.stdout
    # And the host forwards nothing from the bridge to another interface, whatever the route.
    confined = subprocess.run(["iptables", "-C", *CL.CONFINE_PODS], capture_output=True, text=True)
    assert confined.returncode == 0, confined.stderr


def test_host_reaches_pods(pods: dict[str, str]) -> None:
    with urllib.request.urlopen(f"http://{pods['web']}:8080/", timeout=5) as resp:
        assert resp.read().strip() == b"pong"
    # And through the API server and the kubelet on 127.0.0.1 (kubectl port-forward).
    cmd = [str(CL.BIN / "kubectl"), "--kubeconfig", str(CL.KUBECONFIG), "port-forward",
           "-n", NS, "pod/web", ":8080", "--address=127.0.0.1"]  # fmt: skip
    forward = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert forward.stdout
        line = forward.stdout.readline()  # "Forwarding from 127.0.0.1:PORT -> 8080"
        port = re.search(r"127\.0\.0\.1:(\d+)", line)
        assert port, line
        with urllib.request.urlopen(f"http://127.0.0.1:{port[1]}/", timeout=10) as resp:
            assert resp.read().strip() == b"pong"
    finally:
        forward.terminate()
        forward.wait(timeout=10)


def test_images_import_once(pods: dict[str, str]) -> None:
    """The archive ``up`` imported is skipped the second time (same name, same digest)."""
    assert CL.busybox_image() in CL.images()
    (archive,) = CL.IMAGES_DIR.glob("busybox-*.oci.tar")
    assert CL.import_images([archive]) == []


def test_top_pod_reports_cpu(pods: dict[str, str]) -> None:
    def cpu() -> str | None:
        done = kubectl("top", "pod", "client", "-n", NS, "--no-headers")
        return done.stdout.split()[1] if done.returncode == 0 and done.stdout.split() else None

    value = eventually(cpu, 120, "kubectl top pod")
    assert value.endswith("m") and int(value[:-1]) > 0


def test_hpa_reads_pod_cpu(pods: dict[str, str]) -> None:
    """The HPA controller reads the busy pods' CPU through metrics-server and scales up."""
    template = pod("burn", BUSY, {"app": "burn"})
    template["spec"]["containers"][0]["resources"]["requests"] = {"cpu": "20m"}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "burn", "namespace": NS},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "burn"}},
            "template": {"metadata": {"labels": {"app": "burn"}}, "spec": template["spec"]},
        },
    }
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "burn", "namespace": NS},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "burn"},
            "minReplicas": 1,
            "maxReplicas": 2,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {"type": "Utilization", "averageUtilization": 50},
                    },
                }
            ],
        },
    }
    items = {"apiVersion": "v1", "kind": "List", "items": [deployment, hpa]}
    done = kubectl("apply", "-f", "-", stdin=json.dumps(items))
    assert done.returncode == 0, done.stderr

    def scaled() -> dict[str, Any] | None:
        status = kubectl_json("get", "hpa", "burn", "-n", NS).get("status", {})
        return status if status.get("desiredReplicas") == 2 else None

    status = eventually(scaled, 150, "the HPA scaled the busy Deployment to 2")
    assert status["currentMetrics"][0]["resource"]["current"]["averageUtilization"] > 50
    kubectl("delete", "deployment,hpa", "burn", "-n", NS, "--wait=false")


def test_pytorchjob_runs_on_the_real_node(pods: dict[str, str]) -> None:
    """The Training Operator's init container (the busybox image) finds the master by name."""

    def replica(command: str) -> dict[str, Any]:
        full = pod("pytorch", command)
        template = {"metadata": {"labels": {}}, "spec": full["spec"]}
        template["spec"]["containers"][0]["name"] = "pytorch"
        return {"replicas": 1, "restartPolicy": "Never", "template": template}

    job = {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": "smoke", "namespace": NS},
        "spec": {
            "runPolicy": {"cleanPodPolicy": "None"},
            "pytorchReplicaSpecs": {
                # The master waits for the worker's message (however late its init finds it).
                "Master": replica("timeout 120 nc -l -p $MASTER_PORT"),
                "Worker": replica("echo worker of $MASTER_ADDR | nc $MASTER_ADDR $MASTER_PORT"),
            },
        },
    }
    done = kubectl("apply", "-f", "-", stdin=json.dumps(job))
    assert done.returncode == 0, done.stderr

    def succeeded() -> bool:
        status = kubectl_json("get", "pytorchjob", "smoke", "-n", NS).get("status", {})
        conditions = {c["type"]: c["status"] for c in status.get("conditions", [])}
        assert conditions.get("Failed") != "True", status
        return conditions.get("Succeeded") == "True"

    eventually(succeeded, 150, "the PyTorchJob succeeded")
    worker = kubectl_json("get", "pod", "smoke-worker-0", "-n", NS)
    init = worker["status"]["initContainerStatuses"][0]
    assert init["image"].endswith(CL.busybox_image().split("/", 1)[1])
    assert init["state"]["terminated"]["exitCode"] == 0
    assert worker["spec"]["nodeName"] == CL.REAL_NODE_NAME
    (main,) = worker["status"]["containerStatuses"]
    assert main["state"]["terminated"]["exitCode"] == 0  # its nc reached the master
    eventually(
        lambda: (
            "worker of smoke-master-0"
            in kubectl("logs", "-n", NS, "smoke-master-0", "-c", "pytorch").stdout
        ),
        30,
        "the worker's message in the master's log",
    )


def test_a_second_node_is_refused(pods: dict[str, str], tmp_path: Path) -> None:
    """Another checkout's ``up`` (its own run dir) refuses while this node runs."""
    env = {**os.environ, "MEDSEG_CLUSTER_DIR": str(tmp_path / "other")}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "up"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1
    assert f"the real node of {CL.RUN} runs on this machine" in done.stderr
    assert "--no-node" in done.stderr


def test_down_leaves_nothing_behind(cluster: dict[str, Any] | None) -> None:
    if cluster is None:
        pytest.skip("the cluster was running before this module: no state from before `up`")
    during = machine_state()
    # The snapshot sees the node: its bridge, mounts, chains, cgroups, kernel settings.
    changed = {key for key, value in cluster.items() if during[key] != value}
    assert {"links", "mounts", "iptables", "cgroups", "sysctls", "processes"} <= changed
    done = subprocess.run([sys.executable, str(SCRIPT), "down"], timeout=300)
    assert done.returncode == 0
    after = machine_state()
    for key, value in cluster.items():
        assert after[key] == value, key
