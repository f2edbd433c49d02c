"""A real Kubernetes control plane on 127.0.0.1 for tests and local use (``make cluster``).

``up`` starts, from the pinned versions in ``scripts/cluster/versions.sh`` (built once by
``scripts/cluster/build.sh`` into ``~/.cache/medseg/tools``): etcd (Debian ``etcd-server``),
kube-apiserver, kube-controller-manager, kube-scheduler, the KServe and Training Operator CRDs and
controllers (run outside the cluster, with a kubeconfig) with their admission webhooks live, and
kwok, which plays the kubelet of fake nodes. Every address any component dials is on 127.0.0.1:
webhooks are reached through ``clientConfig.url`` plus a ``caBundle`` (Endpoints refuse loopback
addresses), fake nodes carry the InternalIP 127.0.0.1 and their kubelet API is kwok's server on
loopback, and cluster IPs are allocated but never dialed (there is no kube-proxy).

State lives in ``.medseg/cluster/`` (or ``MEDSEG_CLUSTER_DIR``): certificates, kubeconfigs, logs,
pid files and etcd's data. ``up`` is idempotent (a running, healthy cluster is reused), ``down``
stops every process it started and removes the state. Ports are twelve in a row from
``MEDSEG_CLUSTER_PORT_BASE`` when it is set (busy ports are then an error); otherwise from 16440, or
from the next free range of twelve when another checkout's cluster holds those. ``up`` records the
base in the run dir (``ports.json``) so ``down``, ``status`` and the tests use the same ports.

Usage: ``python scripts/cluster.py up|down|status|env``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / ".tools"
BIN = TOOLS / "bin"
RUN = Path(os.environ.get("MEDSEG_CLUSTER_DIR", ROOT / ".medseg" / "cluster")).resolve()
PKI, LOGS, PIDS = RUN / "pki", RUN / "logs", RUN / "pids"
KUBECONFIG = RUN / "kubeconfig"
#: The API server's audit log (JSON lines): every request of a ServiceAccount outside kube-system.
AUDIT_LOG = LOGS / "audit.log"
SERVICE_CIDR = "10.96.0.0/16"
#: Namespaces of the controllers (their own flags and environment name them).
KSERVE_NAMESPACE, TRAINING_NAMESPACE = "kserve", "kubeflow"
#: The fake node every pod is scheduled onto (capacity large enough for every chart value file).
NODE_NAME = "kwok-node-0"
NODE_CAPACITY = {"cpu": "64", "memory": "512Gi", "pods": "110", "nvidia.com/gpu": "8"}
#: The default StorageClass (PersistentVolumes are made by hand: there is no provisioner).
STORAGE_CLASS = "local"
#: Training Operator's webhook objects: its cert rotator looks for these names.
TO_WEBHOOK_CONFIG = "validator.training-operator.kubeflow.org"
TO_WEBHOOK_SECRET = "training-operator-webhook-cert"
TO_WEBHOOK_SERVICE = "training-operator"
START_TIMEOUT = 120.0


def log(message: str) -> None:
    """Progress on stderr."""
    print(f"\033[1mcluster:\033[0m {message}", file=sys.stderr, flush=True)


class ClusterError(RuntimeError):
    """The cluster could not be brought up (the message names the part and its log)."""


#: Every port the cluster listens on, all on 127.0.0.1: MEDSEG_CLUSTER_PORT_BASE and the next ones.
PORT_NAMES = (
    "etcd",
    "etcd_peer",
    "apiserver",
    "controller_manager",
    "scheduler",
    "kwok",
    "kserve_webhook",
    "kserve_metrics",
    "kserve_probe",
    "training_webhook",
    "training_metrics",
    "training_probe",
)
DEFAULT_PORT_BASE = 16440
PORTS_FILE = RUN / "ports.json"


def _ports(base: int) -> dict[str, int]:
    return {name: base + i for i, name in enumerate(PORT_NAMES)}


def _recorded_base() -> int:
    """The base ``up`` recorded for this run dir, else the environment's, else the default."""
    if PORTS_FILE.is_file():
        return int(json.loads(PORTS_FILE.read_text())["base"])
    return int(os.environ.get("MEDSEG_CLUSTER_PORT_BASE", DEFAULT_PORT_BASE))


#: The ports in use (updated in place when ``up`` has to move to a free range).
PORTS = SimpleNamespace(**_ports(_recorded_base()))


def load_ports() -> None:
    """Read the ports again (after another process ran ``up`` on this run dir)."""
    vars(PORTS).update(_ports(_recorded_base()))


def versions() -> dict[str, str]:
    """The pinned versions (``scripts/cluster/versions.sh``, the single definition)."""
    pins = {}
    for line in (ROOT / "scripts" / "cluster" / "versions.sh").read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            pins[key.strip()] = value.strip()
    return pins


# --- processes -----------------------------------------------------------------------------


def _pid(name: str) -> int | None:
    path = PIDS / f"{name}.pid"
    if not path.is_file():
        return None
    pid = int(path.read_text())
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    # Only a process this script started (its binary path is recorded next to the pid).
    expected = (PIDS / f"{name}.cmd").read_text() if (PIDS / f"{name}.cmd").is_file() else ""
    return pid if expected and cmdline.split(b"\0")[0].decode() == expected else None


#: Processes started by this invocation (right after fork, /proc shows Python's command line).
_STARTED: dict[str, subprocess.Popen[bytes]] = {}


def _alive(name: str) -> bool:
    proc = _STARTED.get(name)
    return proc.poll() is None if proc else _pid(name) is not None


def _start(name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
    if _pid(name):
        return
    LOGS.mkdir(parents=True, exist_ok=True)
    PIDS.mkdir(parents=True, exist_ok=True)
    out = open(LOGS / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        argv,
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
        start_new_session=True,  # outlives `make cluster`; `down` stops it
        cwd=RUN,
    )
    out.close()
    _STARTED[name] = proc
    (PIDS / f"{name}.cmd").write_text(argv[0])
    (PIDS / f"{name}.pid").write_text(str(proc.pid))


def _stop(name: str) -> None:
    pid = _pid(name)
    if pid:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            if _pid(name) is None:
                break
            time.sleep(0.2)
        if _pid(name):
            os.kill(pid, signal.SIGKILL)
    for suffix in (".pid", ".cmd"):
        (PIDS / f"{name}{suffix}").unlink(missing_ok=True)


#: When this invocation started (start-up times are logged against it).
_T0 = time.monotonic()


def _wait(name: str, check: Any, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(name):
            raise ClusterError(
                f"{name} exited during start-up; see {LOGS / (name + '.log')}:\n" + _tail(name)
            )
        try:
            if check():
                log(f"{name} ready ({time.monotonic() - _T0:.0f} s)")
                return
        except (OSError, ssl.SSLError, subprocess.SubprocessError):
            pass
        time.sleep(0.5)
    raise ClusterError(
        f"{name} not ready after {timeout:.0f} s; see {LOGS / (name + '.log')}:\n" + _tail(name)
    )


def _tail(name: str, lines: int = 15) -> str:
    path = LOGS / f"{name}.log"
    text = path.read_text(errors="replace") if path.is_file() else ""
    return "\n".join(text.splitlines()[-lines:])


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# --- certificates and kubeconfigs ----------------------------------------------------------


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _ca(name: str, cn: str, dns: str = "", rsa: bool = False) -> None:
    if (PKI / f"{name}.crt").is_file():
        return
    key = (
        ["-newkey", "rsa:2048"]
        if rsa
        else ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
    )
    ext = [
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
    ]
    if dns:
        ext += ["-addext", f"subjectAltName=DNS:{dns}"]
    _openssl(
        "req",
        "-x509",
        *key,
        "-nodes",
        "-days",
        "3650",
        "-keyout",
        str(PKI / f"{name}.key"),
        "-out",
        str(PKI / f"{name}.crt"),
        "-subj",
        f"/CN={cn}",
        *ext,
    )
    if rsa:  # PKCS#1 ("BEGIN RSA PRIVATE KEY"), the only form cert-controller's rotator parses
        _openssl("rsa", "-in", str(PKI / f"{name}.key"), "-out", str(PKI / f"{name}.key"),
                 "-traditional")  # fmt: skip


def _cert(name: str, ca: str, subject: str, sans: str = "", server: bool = False) -> None:
    if (PKI / f"{name}.crt").is_file():
        return
    key, csr = PKI / f"{name}.key", PKI / f"{name}.csr"
    _openssl(
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(csr),
        "-subj",
        subject,
    )
    usage = "serverAuth" if server else "clientAuth"
    lines = [
        "basicConstraints=CA:FALSE",
        "keyUsage=critical,digitalSignature",
        f"extendedKeyUsage={usage}",
    ]
    if sans:
        lines.append(f"subjectAltName={sans}")
    with tempfile.NamedTemporaryFile("w", suffix=".ext") as ext:
        ext.write("\n".join(lines) + "\n")
        ext.flush()
        _openssl(
            "x509",
            "-req",
            "-in",
            str(csr),
            "-CA",
            str(PKI / f"{ca}.crt"),
            "-CAkey",
            str(PKI / f"{ca}.key"),
            "-CAcreateserial",
            "-days",
            "3650",
            "-out",
            str(PKI / f"{name}.crt"),
            "-extfile",
            ext.name,
        )
    csr.unlink()


#: Client identities: file name -> (CN, O). Controllers outside the cluster run as system:masters.
CLIENTS = {
    "admin": ("medseg-admin", "system:masters"),
    "controller-manager": ("system:kube-controller-manager", ""),
    "scheduler": ("system:kube-scheduler", ""),
    "apiserver-kubelet-client": ("kube-apiserver-kubelet-client", "system:masters"),
    "kserve": ("kserve-controller-manager", "system:masters"),
    "training-operator": ("training-operator", "system:masters"),
    "kwok": ("kwok-controller", "system:masters"),
}


def _pki() -> None:
    PKI.mkdir(parents=True, exist_ok=True)
    _ca("ca", "medseg-cluster-ca")
    # The Training Operator's cert rotator (open-policy-agent/cert-controller) keeps a Secret's CA
    # only if it verifies for its CA name, and reads its key only as PKCS#1 RSA.
    _ca("webhook-ca", "training-operator-ca", dns="training-operator-ca", rsa=True)
    _cert(
        "apiserver",
        "ca",
        "/CN=kube-apiserver",
        server=True,
        sans=(
            "IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,"
            "DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
        ),
    )
    for name, (cn, org) in CLIENTS.items():
        _cert(name, "ca", f"/CN={cn}" + (f"/O={org}" if org else ""))
    _cert("kwok-serving", "ca", "/CN=kwok", server=True, sans="IP:127.0.0.1,DNS:localhost")
    _cert(
        "kserve-webhook",
        "webhook-ca",
        "/CN=kserve-webhook",
        server=True,
        sans=f"IP:127.0.0.1,DNS:kserve-webhook-server-service.{KSERVE_NAMESPACE}.svc",
    )
    _cert(
        "training-webhook",
        "webhook-ca",
        "/CN=training-operator-webhook",
        server=True,
        sans=f"IP:127.0.0.1,DNS:{TO_WEBHOOK_SERVICE}.{TRAINING_NAMESPACE}.svc",
    )
    if not (PKI / "sa.key").is_file():
        _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(PKI / "sa.key"))
        _openssl("ec", "-in", str(PKI / "sa.key"), "-pubout", "-out", str(PKI / "sa.pub"))
    # The Training Operator's cert rotator waits for tls.crt in this fixed directory (where the
    # Secret is mounted in a pod) before it marks its webhooks ready; it only checks that the file
    # exists. Its webhook server reads the certificate from $TMPDIR, like KServe's, below.
    mounted = Path("/tmp/k8s-webhook-server/serving-certs")
    mounted.mkdir(parents=True, exist_ok=True)
    if not (mounted / "tls.crt").exists():
        shutil.copy(PKI / "training-webhook.crt", mounted / "tls.crt")
    for name in ("kserve", "training"):  # controller-runtime's default serving-cert location
        certs = RUN / f"tmp-{name}" / "k8s-webhook-server" / "serving-certs"
        certs.mkdir(parents=True, exist_ok=True)
        shutil.copy(PKI / f"{name}-webhook.crt", certs / "tls.crt")
        shutil.copy(PKI / f"{name}-webhook.key", certs / "tls.key")


def _kubeconfig(name: str) -> Path:
    path = KUBECONFIG if name == "admin" else RUN / f"{name}.kubeconfig"
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "medseg",
                "cluster": {
                    "server": f"https://127.0.0.1:{PORTS.apiserver}",
                    "certificate-authority": str(PKI / "ca.crt"),
                },
            }
        ],
        "users": [
            {
                "name": name,
                "user": {
                    "client-certificate": str(PKI / f"{name}.crt"),
                    "client-key": str(PKI / f"{name}.key"),
                },
            }
        ],
        "contexts": [{"name": "medseg", "context": {"cluster": "medseg", "user": name}}],
        "current-context": "medseg",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


# --- API access ----------------------------------------------------------------------------


def _api(path: str) -> tuple[int, bytes]:
    ctx = ssl.create_default_context(cafile=str(PKI / "ca.crt"))
    ctx.load_cert_chain(str(PKI / "admin.crt"), str(PKI / "admin.key"))
    url = f"https://127.0.0.1:{PORTS.apiserver}{path}"
    with urllib.request.urlopen(url, context=ctx, timeout=5) as resp:
        return int(resp.status), resp.read()


def _api_ok(path: str) -> bool:
    return _api(path)[0] == 200


def _api_json(path: str) -> dict[str, Any]:
    """A GET on the API server as the admin (no kubectl process: polls stay cheap)."""
    doc: dict[str, Any] = json.loads(_api(path)[1])
    return doc


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return bool(resp.status == 200)


def kubectl(*args: str, stdin: str | None = None, check: bool = True) -> str:
    """Run ``kubectl`` against this cluster; returns stdout."""
    done = subprocess.run(
        [str(BIN / "kubectl"), "--kubeconfig", str(KUBECONFIG), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check and done.returncode:
        raise ClusterError(f"kubectl {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def _apply(docs: list[dict[str, Any]], files: tuple[Path, ...] = ()) -> None:
    kubectl(
        "apply",
        "--server-side",
        "--force-conflicts",
        "--field-manager=medseg-cluster",
        *(arg for path in files for arg in ("-f", str(path))),
        "-f",
        "-",
        stdin=yaml.safe_dump_all(docs),
    )


def _kustomized(path: Path) -> Path:
    """``kubectl kustomize`` of a module's kustomization, rendered once per cached build.

    The file goes to kubectl as it is: parsing megabytes of CRD YAML in Python costs more than
    the apply.
    """
    rendered = path / ".medseg-kustomized.yaml"
    if not rendered.is_file():
        tmp = rendered.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(kubectl("kustomize", str(path)))
        tmp.replace(rendered)
    return rendered


# --- the parts -----------------------------------------------------------------------------


def _ensure_binaries() -> None:
    needed = [
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
        "kubectl",
        "kwok",
        "training-operator",
        "kserve-manager",
    ]
    if all((BIN / n).exists() for n in needed) and (TOOLS / "kserve-manager").exists():
        return
    log("building the control plane (cold: ~50 min niced on a busy 2-core machine; cached after)")
    subprocess.run(["bash", str(ROOT / "scripts" / "cluster" / "build.sh")], check=True)


def _ensure_etcd() -> str:
    etcd = shutil.which("etcd")
    if etcd:
        return etcd
    package = versions()["ETCD_PACKAGE"]
    log(f"installing the Debian package {package}")
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run([*sudo, "apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run([*sudo, "apt-get", "install", "-y", "-qq", package], check=True, env=env)
    etcd = shutil.which("etcd")
    if not etcd:
        raise ClusterError(f"{package} installed but no etcd on PATH")
    return etcd


def _audit_policy() -> Path:
    path = RUN / "audit-policy.yaml"
    policy = {
        "apiVersion": "audit.k8s.io/v1",
        "kind": "Policy",
        "omitStages": ["RequestReceived"],
        "rules": [
            {"level": "None", "userGroups": ["system:serviceaccounts:kube-system"]},
            {"level": "Metadata", "userGroups": ["system:serviceaccounts"]},
            {"level": "None"},
        ],
    }
    path.write_text(yaml.safe_dump(policy))
    return path


def _start_control_plane(etcd: str) -> None:
    _start(
        "etcd",
        [
            etcd,
            "--name=medseg",
            f"--data-dir={RUN / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{PORTS.etcd}",
            f"--advertise-client-urls=http://127.0.0.1:{PORTS.etcd}",
            f"--listen-peer-urls=http://127.0.0.1:{PORTS.etcd_peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{PORTS.etcd_peer}",
            f"--initial-cluster=medseg=http://127.0.0.1:{PORTS.etcd_peer}",
            "--unsafe-no-fsync",
            "--quota-backend-bytes=2147483648",
        ],
    )
    _wait("etcd", lambda: _http_ok(f"http://127.0.0.1:{PORTS.etcd}/health"))
    _start(
        "kube-apiserver",
        [
            str(BIN / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{PORTS.etcd}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={PORTS.apiserver}",
            f"--tls-cert-file={PKI / 'apiserver.crt'}",
            f"--tls-private-key-file={PKI / 'apiserver.key'}",
            f"--client-ca-file={PKI / 'ca.crt'}",
            f"--service-account-key-file={PKI / 'sa.pub'}",
            f"--service-account-signing-key-file={PKI / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            "--authorization-mode=Node,RBAC",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            # Endpoints refuse loopback addresses: nothing reconciles the `kubernetes` Service's.
            "--endpoint-reconciler-type=none",
            f"--kubelet-client-certificate={PKI / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={PKI / 'apiserver-kubelet-client.key'}",
            f"--kubelet-certificate-authority={PKI / 'ca.crt'}",
            "--kubelet-preferred-address-types=InternalIP",
            # ServiceAccounts' requests (not kube-system's): tests derive RBAC from them.
            f"--audit-policy-file={_audit_policy()}",
            f"--audit-log-path={AUDIT_LOG}",
            "--audit-log-maxsize=100",
            "--audit-log-maxbackup=1",
            "--profiling=false",
            "--v=1",
        ],
    )
    _wait("kube-apiserver", lambda: _api_ok("/readyz"))
    _start(
        "kube-controller-manager",
        [
            str(BIN / "kube-controller-manager"),
            f"--kubeconfig={_kubeconfig('controller-manager')}",
            f"--authentication-kubeconfig={RUN / 'controller-manager.kubeconfig'}",
            f"--authorization-kubeconfig={RUN / 'controller-manager.kubeconfig'}",
            "--bind-address=127.0.0.1",
            f"--secure-port={PORTS.controller_manager}",
            f"--service-account-private-key-file={PKI / 'sa.key'}",
            f"--root-ca-file={PKI / 'ca.crt'}",
            "--use-service-account-credentials=true",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--leader-elect=false",
            "--profiling=false",
            "--v=1",
        ],
    )
    _start(
        "kube-scheduler",
        [
            str(BIN / "kube-scheduler"),
            f"--kubeconfig={_kubeconfig('scheduler')}",
            f"--authentication-kubeconfig={RUN / 'scheduler.kubeconfig'}",
            f"--authorization-kubeconfig={RUN / 'scheduler.kubeconfig'}",
            "--bind-address=127.0.0.1",
            f"--secure-port={PORTS.scheduler}",
            "--leader-elect=false",
            "--profiling=false",
            "--v=1",
        ],
    )


def _webhooks(
    path: Path, port: int, keep: Any = None, name: str | None = None
) -> list[dict[str, Any]]:
    """The module's webhook configurations, rewired to ``https://127.0.0.1:PORT/PATH``."""
    ca = base64.b64encode((PKI / "webhook-ca.crt").read_bytes()).decode()
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    for doc in docs:
        doc["metadata"].pop("creationTimestamp", None)
        if name:
            doc["metadata"]["name"] = name
        hooks = [h for h in doc["webhooks"] if keep is None or keep(h)]
        for hook in hooks:
            service = hook["clientConfig"].pop("service")
            hook["clientConfig"] = {
                "url": f"https://127.0.0.1:{port}{service['path']}",
                "caBundle": ca,
            }
            hook["timeoutSeconds"] = 10
        doc["webhooks"] = hooks
    return [d for d in docs if d["webhooks"]]


def _inferenceservice_config(source: Path) -> dict[str, Any]:
    """KServe's ``inferenceservice-config``, for a cluster without Knative and Istio.

    The default deployment mode is ``Standard`` (no Knative Serving here); no Ingress objects
    are created (no ingress controller); the storage-initializer runs as the restricted Pod
    Security level requires.
    """
    doc = next(
        d for d in yaml.safe_load_all(source.read_text()) if d and d.get("kind") == "ConfigMap"
    )
    data = doc["data"]
    data.pop("_example", None)
    data["deploy"] = json.dumps({"defaultDeploymentMode": "Standard"})
    ingress = yaml.safe_load(data["ingress"])
    ingress["disableIngressCreation"] = True
    ingress["disableIstioVirtualHost"] = True
    data["ingress"] = json.dumps(ingress)
    doc["metadata"]["namespace"] = KSERVE_NAMESPACE
    return doc


def _storage_container(source: Path) -> dict[str, Any]:
    """KServe's ``default`` ClusterStorageContainer, its storage-initializer made "restricted".

    KServe merges this container into the storage-initializer it injects into predictor pods;
    upstream's has no securityContext, so Pod Security "restricted" rejects those pods. Version
    pinned to the KServe release instead of ``latest``.
    """
    doc = yaml.safe_load(source.read_text())
    container = doc["spec"]["container"]
    container["image"] = f"kserve/storage-initializer:{versions()['KSERVE_VERSION']}"
    container["securityContext"] = RESTRICTED_CONTAINER
    return doc


#: A container security context that Pod Security "restricted" admits.
RESTRICTED_CONTAINER = {
    "allowPrivilegeEscalation": False,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def _training_secret() -> dict[str, Any]:
    """The Secret the Training Operator's cert rotator reads: our CA and loopback serving cert."""

    def b64(name: str) -> str:
        return base64.b64encode((PKI / name).read_bytes()).decode()

    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": TO_WEBHOOK_SECRET, "namespace": TRAINING_NAMESPACE},
        "type": "Opaque",
        "data": {
            "ca.crt": b64("webhook-ca.crt"),
            "ca.key": b64("webhook-ca.key"),
            "tls.crt": b64("training-webhook.crt"),
            "tls.key": b64("training-webhook.key"),
        },
    }


def _restricted_init_container_template() -> Path:
    """The Training Operator's ``init-pytorch`` container, compliant with Pod Security "restricted".

    Same container as the operator's built-in template (it waits for the master's DNS name),
    plus the security context the restricted level requires.
    """
    path = RUN / "pytorch-init-container.yaml"
    container = [
        {
            "name": "init-pytorch",
            "image": "{{.InitContainerImage}}",
            "imagePullPolicy": "IfNotPresent",
            "resources": {
                "limits": {"cpu": "100m", "memory": "20Mi"},
                "requests": {"cpu": "50m", "memory": "10Mi"},
            },
            "securityContext": {**RESTRICTED_CONTAINER, "runAsUser": 65534},
            "command": [
                "sh",
                "-c",
                "err=1;for i in $(seq {{.MaxTries}}); do if nslookup "
                "{{.MasterAddr}}; then err=0 && break; fi;echo waiting for master; "
                "sleep 2; done; exit $err",
            ],
        }
    ]
    path.write_text(yaml.safe_dump(container, width=1000))
    return path


def _kwok_stages() -> list[Path]:
    """Kwok's stock stages plus one that completes pods owned by a PyTorchJob."""
    stages = TOOLS / "kwok" / "kustomize" / "stage"
    files = [
        stages / "node" / "fast" / "node-initialize.yaml",
        stages / "node" / "heartbeat" / "node-heartbeat.yaml",
        stages / "pod" / "fast" / "pod-ready.yaml",
        stages / "pod" / "fast" / "pod-complete.yaml",
        stages / "pod" / "fast" / "pod-delete.yaml",
    ]
    stage = yaml.safe_load(files[3].read_text())
    stage["metadata"]["name"] = "pod-complete-pytorchjob"
    for expr in stage["spec"]["selector"]["matchExpressions"]:
        if expr["key"] == ".metadata.ownerReferences.[].kind":
            expr["values"] = ["PyTorchJob"]
    custom = RUN / "kwok-stage-pytorchjob.yaml"
    custom.write_text(yaml.safe_dump(stage, width=1000))
    return [*files, custom, _kwok_logs()]


#: What kwok serves as the log of every ``pytorch`` container (there is no real container).
KWOK_LOG_LINE = "medseg: log served by kwok on 127.0.0.1 (fake node, no container ran)"


def _kwok_logs() -> Path:
    """A kwok ClusterLogs: ``kubectl logs`` of a ``pytorch`` container reads a fixed file."""
    log_file = RUN / "kwok-pytorch.log"
    log_file.write_text(f"2026-01-01T00:00:00.000000000Z stdout F {KWOK_LOG_LINE}\n")
    path = RUN / "kwok-logs.yaml"
    config = {
        "apiVersion": "kwok.x-k8s.io/v1alpha1",
        "kind": "ClusterLogs",
        "metadata": {"name": "pytorch"},
        "spec": {"logs": [{"containers": ["pytorch"], "logsFile": str(log_file), "follow": False}]},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def _node() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": NODE_NAME,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "kubernetes.io/hostname": NODE_NAME,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
            },
        },
    }


def _storage_class() -> dict[str, Any]:
    """The default StorageClass (no provisioner: whoever needs a volume creates the PV)."""
    return {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {
            "name": STORAGE_CLASS,
            "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
        },
        "provisioner": "kubernetes.io/no-provisioner",
        "volumeBindingMode": "Immediate",
    }


def _start_operators() -> None:
    kserve = TOOLS / "kserve-manager"
    training = TOOLS / "training-operator"
    # One apply for everything that needs no CRD to be established (each kubectl costs seconds
    # on a busy machine); the node's capacity is patched into its status afterwards.
    namespaces = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}
        for ns in (KSERVE_NAMESPACE, TRAINING_NAMESPACE)
    ]
    crds = (_kustomized(kserve / "config/crd/full"), _kustomized(training / "manifests/base/crds"))
    _apply(
        [
            *namespaces,
            _inferenceservice_config(kserve / "config/configmap/inferenceservice.yaml"),
            _training_secret(),
            *_webhooks(kserve / "config/webhook/manifests.yaml", PORTS.kserve_webhook),
            *_webhooks(
                training / "manifests/base/webhook/manifests.yaml",
                PORTS.training_webhook,
                keep=lambda h: "pytorchjob" in h["name"],
                name=TO_WEBHOOK_CONFIG,
            ),
            _node(),
            _storage_class(),
        ],
        files=crds,
    )
    kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd", "--all")
    _apply([_storage_container(kserve / "config/storagecontainers/default.yaml")])
    _start(
        "kserve-manager",
        [
            str(BIN / "kserve-manager"),
            f"--metrics-addr=127.0.0.1:{PORTS.kserve_metrics}",
            f"--health-probe-addr=127.0.0.1:{PORTS.kserve_probe}",
            f"--webhook-port={PORTS.kserve_webhook}",
            "--leader-elect=false",
        ],
        env={
            "KUBECONFIG": str(_kubeconfig("kserve")),
            "POD_NAMESPACE": KSERVE_NAMESPACE,
            "TMPDIR": str(RUN / "tmp-kserve"),
        },
    )
    _start(
        "training-operator",
        [
            str(BIN / "training-operator"),
            "--enable-scheme=pytorchjob",
            f"--metrics-bind-address=127.0.0.1:{PORTS.training_metrics}",
            f"--health-probe-bind-address=127.0.0.1:{PORTS.training_probe}",
            f"--webhook-server-port={PORTS.training_webhook}",
            f"--webhook-service-name={TO_WEBHOOK_SERVICE}",
            f"--webhook-secret-name={TO_WEBHOOK_SECRET}",
            f"--pytorch-init-container-template-file={_restricted_init_container_template()}",
        ],
        env={
            "KUBECONFIG": str(_kubeconfig("training-operator")),
            "MY_POD_NAMESPACE": TRAINING_NAMESPACE,
            "TMPDIR": str(RUN / "tmp-training"),
        },
    )
    # The node's capacity before kwok starts (kwok keeps a node's own capacity).
    status = {"status": {"capacity": NODE_CAPACITY, "allocatable": NODE_CAPACITY}}
    kubectl("patch", "node", NODE_NAME, "--subresource=status", "--type=merge",
            "-p", json.dumps(status))  # fmt: skip
    stages = [f"--config={p}" for p in _kwok_stages()]
    _start(
        "kwok",
        [
            str(BIN / "kwok"),
            f"--kubeconfig={_kubeconfig('kwok')}",
            "--manage-all-nodes=false",
            "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
            "--node-ip=127.0.0.1",
            f"--node-port={PORTS.kwok}",
            f"--server-address=127.0.0.1:{PORTS.kwok}",
            f"--tls-cert-file={PKI / 'kwok-serving.crt'}",
            f"--tls-private-key-file={PKI / 'kwok-serving.key'}",
            *stages,
        ],
    )
    _wait("kserve-manager", lambda: _http_ok(f"http://127.0.0.1:{PORTS.kserve_probe}/readyz"))
    _wait("training-operator", lambda: _http_ok(f"http://127.0.0.1:{PORTS.training_probe}/readyz"))
    _wait("kwok", _node_ready)


def _node_ready() -> bool:
    node = _api_json(f"/api/v1/nodes/{NODE_NAME}")
    conditions = (node.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


PARTS = (
    "kwok",
    "training-operator",
    "kserve-manager",
    "kube-scheduler",
    "kube-controller-manager",
    "kube-apiserver",
    "etcd",
)


def healthy() -> bool:
    """Whether every part is running and the API server answers."""
    if not all(_pid(p) for p in PARTS):
        return False
    try:
        return _api_ok("/readyz")
    except (OSError, ssl.SSLError):
        return False


def up() -> None:
    """Bring the cluster up, or reuse the one running from this run dir."""
    started = time.monotonic()
    if healthy():
        log(f"already running; KUBECONFIG={KUBECONFIG}")
        return
    down(quiet=True)  # a half-started cluster: start clean
    _ensure_binaries()
    etcd = _ensure_etcd()
    vars(PORTS).update(_ports(_free_base()))
    RUN.mkdir(parents=True, exist_ok=True)
    PORTS_FILE.write_text(json.dumps({"base": PORTS.etcd}))
    _pki()
    _kubeconfig("admin")
    try:
        _start_control_plane(etcd)
        _start_operators()
    except BaseException:
        down(quiet=True)
        raise
    log(f"up in {time.monotonic() - started:.0f} s; KUBECONFIG={KUBECONFIG}")


def _free_base() -> int:
    """The first range of free ports: the environment's (which must be free) or from the default."""
    count = len(PORT_NAMES)
    if "MEDSEG_CLUSTER_PORT_BASE" in os.environ:
        base = int(os.environ["MEDSEG_CLUSTER_PORT_BASE"])
        busy = [p for p in _ports(base).values() if not _port_free(p)]
        if busy:
            raise ClusterError(
                f"ports {busy} on 127.0.0.1 are in use; set MEDSEG_CLUSTER_PORT_BASE "
                f"to a free range of {count} ports"
            )
        return base
    for base in range(DEFAULT_PORT_BASE, DEFAULT_PORT_BASE + 40 * count, count):
        if all(_port_free(p) for p in _ports(base).values()):
            if base != DEFAULT_PORT_BASE:
                log(f"ports from {DEFAULT_PORT_BASE} are in use (another cluster?): using {base}")
            return base
    raise ClusterError(
        f"no free range of {count} ports on 127.0.0.1 from {DEFAULT_PORT_BASE}; "
        "set MEDSEG_CLUSTER_PORT_BASE"
    )


def down(quiet: bool = False) -> None:
    """Stop every part this script started and remove the run dir."""
    for part in PARTS:
        _stop(part)
    shutil.rmtree(RUN, ignore_errors=True)
    if not quiet:
        log("stopped")


def main(argv: list[str]) -> int:
    """Command-line entry: ``up``, ``down``, ``status`` or ``env``."""
    command = argv[1] if len(argv) > 1 else "status"
    try:
        if command == "up":
            up()
        elif command == "down":
            down()
        elif command == "status":
            for part in PARTS:
                print(f"{part:24} {'running' if _pid(part) else 'stopped'}")
            return 0 if healthy() else 1
        elif command == "env":
            print(f"export KUBECONFIG={KUBECONFIG}")
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except (ClusterError, subprocess.CalledProcessError) as exc:
        print(f"cluster: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
