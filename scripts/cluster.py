"""A real Kubernetes cluster on this machine for tests and local use (``make cluster``).

``up`` starts, from the pinned versions in ``scripts/cluster/versions.sh`` (built once by
``scripts/cluster/build.sh`` into ``~/.cache/medseg/tools``): etcd (Debian ``etcd-server``),
kube-apiserver, kube-controller-manager, kube-scheduler, the KServe and Training Operator CRDs and
controllers (run outside the cluster, with a kubeconfig) with their admission webhooks live, and
kwok, which plays the kubelet of the fake node ``kwok-node-0``. Every address the control plane
dials is on 127.0.0.1: webhooks are reached through ``clientConfig.url`` plus a ``caBundle``
(Endpoints refuse loopback addresses), the nodes carry the InternalIP 127.0.0.1.

Beside it, a real node, ``medseg-node-0`` (``up --no-node`` or ``MEDSEG_CLUSTER_NODE=0`` leaves
it out): containerd + runc (Debian packages; root in ``~/.cache/medseg/containerd`` so imported
images survive ``down``), a kubelet on 127.0.0.1, a Linux bridge ``medseg0`` at 10.244.99.1 for
the pod subnet 10.244.99.0/24 (no gateway, NAT or default route in pods: nothing leaves the
machine), kube-proxy (iptables; Services in 10.96.0.0/16), CoreDNS on 10.244.99.1:53 (cluster
zones only) and metrics-server (the ``metrics.k8s.io`` API). The real node is tainted: pods land
there only with ``REAL_NODE_TOLERATION`` (plus ``REAL_NODE_SELECTOR``) or after
``use_real_node()``; everything else stays on kwok's node. Images come from OCI archives
(``import_images``; ``up`` imports ``.medseg/images/*.tar``); ``busybox_image()`` is the pause
image and the PyTorch init container's. One real node per machine (``/run/medseg-node.json``).
While it runs, the machine has: the bridge and its pods' veths and network namespaces,
KUBE-* iptables chains, ``/kubepods`` cgroups, mounts under the run dir, ``vm.overcommit_memory=1``,
``kernel.panic=10`` and ``kernel.panic_on_oops=1`` (what the kubelet insists on); ``down`` undoes
all of it and restores the old values.

State lives in ``.medseg/cluster/`` (or ``MEDSEG_CLUSTER_DIR``): certificates, kubeconfigs, logs,
pid files, etcd's data, the kubelet's root dir, containerd's state. ``up`` is idempotent (a
running, healthy cluster is reused), ``down`` stops every process it started and removes the
state. Ports are eighteen in a row from ``MEDSEG_CLUSTER_PORT_BASE`` when it is set (busy ports
are then an error); otherwise from 16440, or from the next free range when another checkout's
cluster holds those. ``up`` records the base in the run dir (``ports.json``) so ``down``,
``status`` and the tests use the same ports.

Usage: ``python scripts/cluster.py up [--no-node]|down|status|env``.
"""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path
from types import ModuleType, SimpleNamespace
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


#: Every port the cluster listens on, all on 127.0.0.1 (metrics-server's on the bridge address):
#: MEDSEG_CLUSTER_PORT_BASE and the next ones. CoreDNS listens on the bridge address, port 53.
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
    "kubelet",
    "kubelet_healthz",
    "kube_proxy_healthz",
    "kube_proxy_metrics",
    "coredns_ready",
    "metrics_server",
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
    # The aggregator's client identity towards extension API servers (metrics-server).
    _ca("front-proxy-ca", "medseg-front-proxy-ca")
    _cert("front-proxy-client", "front-proxy-ca", "/CN=front-proxy-client")
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
        "kubelet",
        "kube-proxy",
        "coredns",
        "metrics-server",
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
            # The aggregator (metrics.k8s.io): it authenticates as front-proxy-client and dials
            # the APIService's endpoint, not its cluster IP.
            f"--requestheader-client-ca-file={PKI / 'front-proxy-ca.crt'}",
            "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={PKI / 'front-proxy-client.crt'}",
            f"--proxy-client-key-file={PKI / 'front-proxy-client.key'}",
            "--enable-aggregator-routing=true",
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
            # Tests see an autoscaler react within seconds (default 15 s).
            "--horizontal-pod-autoscaler-sync-period=5s",
            # Scale down 30 s after the load ends, not the default 5 min (tests wait for it).
            "--horizontal-pod-autoscaler-downscale-stabilization=30s",
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
    upstream's has no securityContext, so Pod Security "restricted" rejects those pods. The
    image is the one ``make images`` builds from KServe's ``kserve-storage`` release of the
    controller's version (scripts/images.py; no registry is reachable from the node).
    """
    doc = yaml.safe_load(source.read_text())
    container = doc["spec"]["container"]
    container["image"] = image_definitions().images()["kserve-storage-initializer"].ref
    container["imagePullPolicy"] = "IfNotPresent"
    container["securityContext"] = RESTRICTED_CONTAINER
    return doc


def image_definitions() -> ModuleType:
    """``scripts/images.py``, where every image the platform runs is defined."""
    spec = importlib.util.spec_from_file_location("medseg_images", ROOT / "scripts" / "images.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


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
    plus the security context the restricted level requires. The name counts as found when
    ``nslookup`` prints an answer: busybox 1.35's (the real node's image) exits 1 whenever one of
    the search domains it tries gives NXDOMAIN, even after another one answered.
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
                "{{.MasterAddr}} 2>/dev/null | grep -q '^Name:'; then err=0 && break; fi;"
                "echo waiting for master; "
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


def _start_operators(init_image: str | None) -> None:
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
            # The busybox image on the real node (its nslookup waits for the master's name).
            *([f"--pytorch-init-container-image={init_image}"] if init_image else []),
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


# --- the real node -------------------------------------------------------------------------
#
# A kubelet with containerd and runc (Debian packages) beside kwok's fake node, a Linux bridge for
# its pods, kube-proxy (iptables), CoreDNS and metrics-server as host processes. Only one per
# machine: kube-proxy's iptables chains, the kubelet's /kubepods cgroups and the bridge are global.

#: The real node's name (its kubelet serves on 127.0.0.1, the InternalIP the fixture gives it).
REAL_NODE_NAME = "medseg-node-0"
#: The real node is tainted so that pods which do not tolerate it stay on kwok's node (the chart
#: renders no tolerations: existing workloads land on the fake node, where no image is needed).
REAL_NODE_TAINT = {"key": "medseg.dev/real-node", "value": "true", "effect": "NoSchedule"}
#: What a pod spec adds to run on the real node (or call ``use_real_node()`` first).
REAL_NODE_TOLERATION = {**REAL_NODE_TAINT, "operator": "Equal"}
REAL_NODE_SELECTOR = {"kubernetes.io/hostname": REAL_NODE_NAME}
#: The pods' network: a bridge the fixture creates, its address is the host's side (and DNS).
BRIDGE, BRIDGE_IP, POD_SUBNET = "medseg0", "10.244.99.1", "10.244.99.0/24"
#: CoreDNS listens here (port 53); the kubelet hands it to pods as their only name server.
DNS_IP = BRIDGE_IP
CLUSTER_DOMAIN = "cluster.local"
#: Debian's containernetworking-plugins.
CNI_BIN = Path("/usr/lib/cni")
#: containerd's root (content store, snapshots): persistent, so imported images survive ``down``.
CONTAINERD_ROOT = Path(
    os.environ.get("MEDSEG_CONTAINERD_ROOT", Path.home() / ".cache" / "medseg" / "containerd")
)
CONTAINERD_SOCKET = RUN / "containerd" / "containerd.sock"
#: OCI archives ``up`` imports (each ``*.tar`` an OCI image layout naming its image with the
#: ``io.containerd.image.name`` annotation).
IMAGES_DIR = Path(os.environ.get("MEDSEG_IMAGES_DIR", ROOT / ".medseg" / "images"))
#: Debian packages the node needs (installed by ``up`` when missing).
NODE_PACKAGES = (
    "containerd",
    "runc",
    "containernetworking-plugins",
    "iptables",
    "conntrack",
)
#: Which checkout's node runs on this machine (one per machine).
NODE_LOCK = Path("/run/medseg-node.json")
#: Kernel settings the kubelet insists on (``protectKernelDefaults``): set by ``up``, the old
#: values restored by ``down``.
KERNEL_SYSCTLS = {"vm.overcommit_memory": "1", "kernel.panic": "10", "kernel.panic_on_oops": "1"}
#: Host paths the parts create whatever their configuration says (removed by ``down`` when they
#: were absent before ``up``): the kubelet's device-plugin dir, libcni's result cache,
#: containerd's shim sockets, the network namespaces' dir.
HOST_PATHS = (
    Path("/var/lib/kubelet"),
    Path("/var/lib/cni"),
    Path("/run/containerd"),
    Path("/run/netns"),
)
NODE_STATE = RUN / "node-before.json"
NODE_PARTS = ("metrics-server", "coredns", "kube-proxy", "kubelet", "containerd")
#: The node's identities: file name -> (CN, O).
NODE_CLIENTS = {
    "kubelet": (f"system:node:{REAL_NODE_NAME}", "system:nodes"),
    "kube-proxy": ("system:kube-proxy", ""),
    "coredns": ("medseg:coredns", ""),
    "metrics-server": ("medseg:metrics-server", ""),
}


def _sh(*argv: str, check: bool = True) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if check and done.returncode:
        raise ClusterError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
    return done.stdout


def busybox_image() -> str:
    """The pause and utility image (``busybox`` of scripts/images.py)."""
    return str(image_definitions().images()["busybox"].ref)


def _busybox_archive() -> Path:
    """The busybox image's archive in :data:`IMAGES_DIR` (built, or found built, by images.py)."""
    (built,) = image_definitions().build(["busybox"], out_dir=IMAGES_DIR)
    return Path(built.archive)


def _ensure_node_packages() -> None:
    missing = [
        p
        for p in NODE_PACKAGES
        if "install ok installed" not in _sh("dpkg-query", "-W", "-f=${Status}", p, check=False)
    ]
    if missing:
        log(f"installing the Debian packages {' '.join(missing)}")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env)


def node_holder() -> str | None:
    """The run dir of another checkout whose node parts are running, if any."""
    if not NODE_LOCK.is_file():
        return None
    other = Path(json.loads(NODE_LOCK.read_text())["run"])
    if other == RUN:
        return None
    for part in NODE_PARTS:
        pid_file, cmd_file = other / "pids" / f"{part}.pid", other / "pids" / f"{part}.cmd"
        with contextlib.suppress(OSError, ValueError):
            cmdline = Path(f"/proc/{int(pid_file.read_text())}/cmdline").read_bytes()
            if cmdline.split(b"\0")[0].decode() == cmd_file.read_text():
                return str(other)
    return None


def _ctr(*args: str, check: bool = True) -> str:
    return _sh("ctr", f"--address={CONTAINERD_SOCKET}", "--namespace=k8s.io", *args, check=check)


def _archive_refs(archive: Path) -> dict[str, str]:
    """The image names an OCI archive declares, with their manifest digests."""
    with tarfile.open(archive) as tar:
        for member in tar:
            if member.name.lstrip("./") == "index.json":
                handle = tar.extractfile(member)
                index = json.loads(handle.read()) if handle else {}
                break
        else:
            raise ClusterError(f"{archive} is no OCI image layout (no index.json)")
    return {
        m["annotations"]["io.containerd.image.name"]: m["digest"]
        for m in index.get("manifests", [])
        if "io.containerd.image.name" in m.get("annotations", {})
    }


def images() -> dict[str, str]:
    """The images in the real node's containerd (the CRI's namespace): ref -> digest."""
    rows = [line.split() for line in _ctr("images", "ls").splitlines()[1:]]
    return {row[0]: row[2] for row in rows if len(row) > 2}


def import_images(archives: list[Path]) -> list[str]:
    """Import OCI archives into the real node's containerd; returns the refs imported.

    Idempotent: an archive whose every ``io.containerd.image.name`` is present with the same
    digest is skipped (containerd's root is persistent, so this holds across ``down``/``up``).
    Pods then use these refs with ``imagePullPolicy: IfNotPresent`` or ``Never`` (no registry).
    """
    present = images()
    imported: list[str] = []
    for archive in archives:
        wanted = _archive_refs(archive)
        if wanted and all(present.get(ref) == digest for ref, digest in wanted.items()):
            continue
        started = time.monotonic()
        _ctr("images", "import", str(archive))
        log(f"imported {archive.name} ({', '.join(wanted)}) in {time.monotonic() - started:.0f} s")
        imported += list(wanted)
    return imported


def _sysctl(name: str) -> str:
    return Path("/proc/sys", name.replace(".", "/")).read_text().strip()


def _set_sysctl(name: str, value: str) -> None:
    Path("/proc/sys", name.replace(".", "/")).write_text(value)


def _iptables_chains(tool: str) -> dict[str, list[str]]:
    """Per table, the chains named KUBE-* or CNI-* (the kubelet's, kube-proxy's and CNI's)."""
    chains: dict[str, list[str]] = {}
    table = ""
    for line in _sh(f"{tool}-save", check=False).splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith(":") and line[1:].startswith(("KUBE-", "CNI-")):
            chains.setdefault(table, []).append(line[1:].split()[0])
    return chains


def _remove_iptables_chains() -> None:
    """Delete every KUBE-*/CNI-* chain and the rules that jump to them (IPv4 and IPv6)."""
    for tool in ("iptables", "ip6tables"):
        for table, chains in _iptables_chains(tool).items():
            rules = _sh(f"{tool}-save", "-t", table, check=False).splitlines()
            for rule in rules:
                parts = rule.split()
                if (
                    rule.startswith("-A ")
                    and not parts[1].startswith(("KUBE-", "CNI-"))
                    and any(p.startswith(("KUBE-", "CNI-")) for p in parts[2:])
                ):
                    _sh(tool, "-t", table, "-D", *parts[1:], check=False)
            for chain in chains:
                _sh(tool, "-t", table, "-F", chain, check=False)
            for chain in chains:
                _sh(tool, "-t", table, "-X", chain, check=False)


def _mounts_under(*roots: Path) -> list[str]:
    """Mount points at or below the roots, deepest first (from /proc/self/mountinfo)."""
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if any(point == str(r) or point.startswith(f"{r}/") for r in roots):
            points.append(point)
    return sorted(points, key=len, reverse=True)


def _netns() -> set[str]:
    return {p.name for p in Path("/run/netns").iterdir()} if Path("/run/netns").is_dir() else set()


def _cgroup_dirs() -> list[Path]:
    """The kubelet's /kubepods cgroups in every hierarchy (runc puts containers below them)."""
    return [d / "kubepods" for d in Path("/sys/fs/cgroup").iterdir() if (d / "kubepods").is_dir()]


def _node_pki() -> None:
    for name, (cn, org) in NODE_CLIENTS.items():
        _cert(name, "ca", f"/CN={cn}" + (f"/O={org}" if org else ""))
    _cert(
        "kubelet-serving",
        "ca",
        f"/CN=system:node:{REAL_NODE_NAME}/O=system:nodes",
        server=True,
        sans=f"IP:127.0.0.1,DNS:{REAL_NODE_NAME}",
    )
    _cert(
        "metrics-server-serving",
        "ca",
        "/CN=metrics-server",
        server=True,
        sans=f"IP:{BRIDGE_IP},DNS:metrics-server.kube-system.svc",
    )


def _containerd_config(pause: str) -> Path:
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    state = RUN / "containerd" / "state"
    lines = [
        "version = 2",
        f'root = "{CONTAINERD_ROOT}"',
        f'state = "{state}"',
        "[grpc]",
        f'  address = "{CONTAINERD_SOCKET}"',
        "[ttrpc]",
        f'  address = "{CONTAINERD_SOCKET}.ttrpc"',
        '[plugins."io.containerd.internal.v1.opt"]',
        f'  path = "{CONTAINERD_ROOT / "opt"}"',
        f"[{cri}]",
        f'  sandbox_image = "{pause}"',
        # Root here lacks CAP_SYS_RESOURCE: the sandbox's oom_score_adj -998 would fail (EACCES).
        "  restrict_oom_score_adj = true",
        '  stream_server_address = "127.0.0.1"',
        '  stream_server_port = "0"',
        "  enable_selinux = false",
        f"[{cri}.containerd]",
        '  snapshotter = "overlayfs"',
        '  default_runtime_name = "runc"',
        f"[{cri}.containerd.runtimes.runc]",
        '  runtime_type = "io.containerd.runc.v2"',
        f"[{cri}.containerd.runtimes.runc.options]",
        "  SystemdCgroup = false",
        f"[{cri}.cni]",
        f'  bin_dir = "{CNI_BIN}"',
        f'  conf_dir = "{RUN / "cni" / "net.d"}"',
    ]
    path = RUN / "containerd" / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def _cni_config() -> None:
    """The pods' CNI network: bridge + host-local on POD_SUBNET.

    No gateway, NAT or default route: pods reach the host side of the bridge and the Service
    range (kube-proxy's DNAT on the host), nothing else; :data:`CONFINE_PODS` drops anything
    forwarded from the bridge elsewhere.
    """
    conf = {
        "cniVersion": "0.4.0",
        "name": "medseg",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                # Off on purpose: isGateway would set net.ipv4.ip_forward (every interface) and
                # ipMasq would NAT pod traffic out; pods get no default route (routes below), so
                # nothing they send can leave the bridge except to the Service range, which
                # kube-proxy rewrites to pod addresses on this same bridge.
                "isGateway": False,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_SUBNET, "gateway": BRIDGE_IP}]],
                    "routes": [{"dst": SERVICE_CIDR, "gw": BRIDGE_IP}],
                    "dataDir": str(RUN / "cni" / "networks"),
                },
            }
        ],
    }
    path = RUN / "cni" / "net.d" / "10-medseg.conflist"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(conf, indent=2))


#: The FORWARD rule that keeps pod traffic on the bridge: a packet that came in from the bridge
#: is dropped unless it goes back out onto the bridge. Pods have no route off the machine anyway
#: (``_cni_config``); this holds even for a route a pod managed to add.
CONFINE_PODS = ("FORWARD", "-i", BRIDGE, "!", "-o", BRIDGE, "-m", "comment", "--comment",
                "medseg: pod traffic stays on the bridge", "-j", "DROP")  # fmt: skip


def _bridge() -> None:
    if not Path(f"/sys/class/net/{BRIDGE}").exists():
        _sh("ip", "link", "add", BRIDGE, "type", "bridge")
        _sh("ip", "addr", "add", f"{BRIDGE_IP}/24", "dev", BRIDGE)
    _sh("ip", "link", "set", BRIDGE, "up")
    # The host's packets to cluster IPs go to the bridge, never to the default route (kube-proxy
    # DNATs them to a pod; an address without a Service goes nowhere); gone with the bridge.
    _sh("ip", "route", "replace", SERVICE_CIDR, "dev", BRIDGE, "src", BRIDGE_IP)
    # Forwarding on the bridge alone: a pod's packet to a cluster IP comes back out the bridge.
    _set_sysctl(f"net.ipv4.conf.{BRIDGE}.forwarding", "1")
    if subprocess.run(["iptables", "-C", *CONFINE_PODS], capture_output=True).returncode:
        _sh("iptables", "-I", *CONFINE_PODS)


def _kubelet_config() -> Path:
    root = RUN / "kubelet"
    relaxed = {"memory.available": "1Mi", "nodefs.available": "1%", "imagefs.available": "1%",
               "nodefs.inodesFree": "1%", "imagefs.inodesFree": "1%"}  # fmt: skip
    config = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": "127.0.0.1",
        "port": PORTS.kubelet,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": PORTS.kubelet_healthz,
        "tlsCertFile": str(PKI / "kubelet-serving.crt"),
        "tlsPrivateKeyFile": str(PKI / "kubelet-serving.key"),
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(PKI / "ca.crt")},
        },
        "authorization": {"mode": "Webhook"},
        "cgroupDriver": "cgroupfs",
        "failSwapOn": False,
        "containerRuntimeEndpoint": f"unix://{CONTAINERD_SOCKET}",
        "staticPodPath": "",
        "podLogsDir": str(RUN / "pod-logs"),
        "clusterDNS": [DNS_IP],
        "clusterDomain": CLUSTER_DOMAIN,
        # Pods get CoreDNS only: no search domain or name server of the host's.
        "resolvConf": "",
        "protectKernelDefaults": True,
        "maxPods": 16,
        # A shared machine's disk is well filled: no image GC, eviction only when nearly full.
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": relaxed,
        "registerWithTaints": [REAL_NODE_TAINT],
        "serializeImagePulls": False,
    }
    path = root.parent / "kubelet-config.yaml"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def _kube_proxy_config() -> Path:
    config = {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(_kubeconfig("kube-proxy"))},
        "hostnameOverride": REAL_NODE_NAME,
        "mode": "iptables",
        "bindAddress": "127.0.0.1",
        "healthzBindAddress": f"127.0.0.1:{PORTS.kube_proxy_healthz}",
        "metricsBindAddress": f"127.0.0.1:{PORTS.kube_proxy_metrics}",
        "nodePortAddresses": [f"{BRIDGE_IP}/32"],
        "clusterCIDR": POD_SUBNET,
        # Zeros: kube-proxy leaves the conntrack sysctls as they are.
        "conntrack": {
            "maxPerCore": 0,
            "min": 0,
            "tcpEstablishedTimeout": "0s",
            "tcpCloseWaitTimeout": "0s",
        },
        # No NodePort on loopback (that would set net.ipv4.conf.all.route_localnet).
        "iptables": {"localhostNodePorts": False},
    }
    path = RUN / "kube-proxy-config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _corefile() -> Path:
    """Only the cluster's zones: any other name is REFUSED (nothing forwarded off the machine)."""
    path = RUN / "Corefile"
    path.write_text(
        f"{CLUSTER_DOMAIN}:53 in-addr.arpa:53 ip6.arpa:53 {{\n"
        f"    bind {DNS_IP}\n"
        "    errors\n"
        f"    ready 127.0.0.1:{PORTS.coredns_ready}\n"
        f"    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{\n"
        f"        kubeconfig {_kubeconfig('coredns')} medseg\n"
        "        pods insecure\n"
        "        fallthrough in-addr.arpa ip6.arpa\n"
        "    }\n"
        "    cache 5\n"
        "}\n"
    )
    return path


def _node_rbac() -> list[dict[str, Any]]:
    """The RBAC of the node's host processes, each with its own identity.

    CoreDNS reads Services, EndpointSlices, Pods and Namespaces; metrics-server reads nodes' and
    pods' metrics and authenticates the aggregator's requests (front-proxy headers).
    """

    def role(name: str, rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
        user = [{"kind": "User", "name": name, "apiGroup": "rbac.authorization.k8s.io"}]
        ref = {"kind": "ClusterRole", "name": name, "apiGroup": "rbac.authorization.k8s.io"}
        meta = {"name": name}
        return [
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
             "metadata": meta, "rules": rules},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
             "metadata": meta, "roleRef": ref, "subjects": user},
        ]  # fmt: skip

    read = ["get", "list", "watch"]
    ms = "medseg:metrics-server"
    return [
        *role(
            "medseg:coredns",
            [
                {
                    "apiGroups": [""],
                    "resources": ["endpoints", "services", "pods", "namespaces"],
                    "verbs": ["list", "watch"],
                },
                {
                    "apiGroups": ["discovery.k8s.io"],
                    "resources": ["endpointslices"],
                    "verbs": ["list", "watch"],
                },
            ],
        ),
        *role(
            ms,
            [
                {"apiGroups": [""], "resources": ["nodes/metrics"], "verbs": ["get"]},
                {
                    "apiGroups": [""],
                    "resources": ["pods", "nodes", "namespaces", "configmaps"],
                    "verbs": read,
                },
                {
                    "apiGroups": ["authentication.k8s.io"],
                    "resources": ["tokenreviews"],
                    "verbs": ["create"],
                },
                {
                    "apiGroups": ["authorization.k8s.io"],
                    "resources": ["subjectaccessreviews"],
                    "verbs": ["create"],
                },
            ],
        ),
    ]


def _metrics_api() -> list[dict[str, Any]]:
    """The ``v1beta1.metrics.k8s.io`` APIService and where it is served.

    A Service without selector whose Endpoints is the bridge address (Endpoints refuse loopback),
    where metrics-server listens; the aggregator dials that endpoint directly
    (``--enable-aggregator-routing``), so it needs no kube-proxy.
    """
    meta = {"name": "metrics-server", "namespace": "kube-system"}
    ca = base64.b64encode((PKI / "ca.crt").read_bytes()).decode()
    return [
        {"apiVersion": "v1", "kind": "Service", "metadata": meta,
         "spec": {"ports": [{"name": "https", "port": 443, "targetPort": PORTS.metrics_server}]}},
        {"apiVersion": "v1", "kind": "Endpoints", "metadata": meta,
         "subsets": [{"addresses": [{"ip": BRIDGE_IP}],
                      "ports": [{"name": "https", "port": PORTS.metrics_server}]}]},
        {"apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService",
         "metadata": {"name": "v1beta1.metrics.k8s.io"},
         "spec": {"service": {"name": "metrics-server", "namespace": "kube-system", "port": 443},
                  "group": "metrics.k8s.io", "version": "v1beta1", "caBundle": ca,
                  "groupPriorityMinimum": 100, "versionPriority": 100}},
    ]  # fmt: skip


def _real_node_ready() -> bool:
    node = _api_json(f"/api/v1/nodes/{REAL_NODE_NAME}")
    conditions = (node.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def _start_node() -> None:
    """containerd, the bridge, the kubelet, kube-proxy, CoreDNS and metrics-server."""
    if os.geteuid() != 0:
        raise ClusterError("the real node needs root (`cluster.py up --no-node` does not)")
    NODE_LOCK.write_text(json.dumps({"run": str(RUN)}))
    if not NODE_STATE.is_file():  # what down restores (a restart keeps the first snapshot)
        NODE_STATE.write_text(json.dumps({
            "sysctls": {name: _sysctl(name) for name in KERNEL_SYSCTLS},
            "absent": [str(p) for p in HOST_PATHS if not p.exists()],
            "netns": sorted(_netns()),
        }))  # fmt: skip
    for name, value in KERNEL_SYSCTLS.items():
        _set_sysctl(name, value)
    _node_pki()
    _apply(_node_rbac())
    pause = busybox_image()
    CONTAINERD_ROOT.mkdir(parents=True, exist_ok=True)
    _start("containerd", [shutil.which("containerd") or "containerd",
                          f"--config={_containerd_config(pause)}"])  # fmt: skip
    _wait("containerd", lambda: "Server:" in _ctr("version", check=False))
    _busybox_archive()
    import_images(sorted(IMAGES_DIR.glob("*.tar")))
    _bridge()
    _cni_config()
    _start(
        "kubelet",
        [
            str(BIN / "kubelet"),
            f"--config={_kubelet_config()}",
            f"--kubeconfig={_kubeconfig('kubelet')}",
            f"--root-dir={RUN / 'kubelet'}",
            f"--hostname-override={REAL_NODE_NAME}",
            # Refused as loopback ("nodeIP can't be loopback", logged every ~10 s), which keeps
            # the kubelet from setting the machine's own address over the one patched below.
            "--node-ip=127.0.0.1",
            "--v=1",
        ],
    )
    _wait("kubelet", lambda: _api_ok(f"/api/v1/nodes/{REAL_NODE_NAME}"))
    # The kubelet refuses a loopback --node-ip; the API server dials the InternalIP (logs, exec).
    addresses = [{"type": "InternalIP", "address": "127.0.0.1"},
                 {"type": "Hostname", "address": REAL_NODE_NAME}]  # fmt: skip
    kubectl("patch", "node", REAL_NODE_NAME, "--subresource=status", "--type=merge",
            "-p", json.dumps({"status": {"addresses": addresses}}))  # fmt: skip
    _wait("kubelet", _real_node_ready)
    _start(
        "kube-proxy",
        [str(BIN / "kube-proxy"), f"--config={_kube_proxy_config()}", "--v=1"],
    )
    _start("coredns", [str(BIN / "coredns"), "-conf", str(_corefile())])
    _apply(_metrics_api())
    _start(
        "metrics-server",
        [
            str(BIN / "metrics-server"),
            f"--kubeconfig={_kubeconfig('metrics-server')}",
            f"--authentication-kubeconfig={RUN / 'metrics-server.kubeconfig'}",
            f"--authorization-kubeconfig={RUN / 'metrics-server.kubeconfig'}",
            f"--bind-address={BRIDGE_IP}",
            f"--secure-port={PORTS.metrics_server}",
            f"--tls-cert-file={PKI / 'metrics-server-serving.crt'}",
            f"--tls-private-key-file={PKI / 'metrics-server-serving.key'}",
            f"--kubelet-certificate-authority={PKI / 'ca.crt'}",
            f"--kubelet-client-certificate={PKI / 'metrics-server.crt'}",
            f"--kubelet-client-key={PKI / 'metrics-server.key'}",
            "--kubelet-preferred-address-types=InternalIP",
            "--kubelet-use-node-status-port",
            # kwok's node serves no resource metrics.
            f"--node-selector=kubernetes.io/hostname={REAL_NODE_NAME}",
            "--metric-resolution=10s",
            "--kubelet-request-timeout=5s",
            "--profiling=false",
        ],
    )
    _wait("kube-proxy", lambda: _http_ok(f"http://127.0.0.1:{PORTS.kube_proxy_healthz}/healthz"))
    _wait("coredns", lambda: _http_ok(f"http://127.0.0.1:{PORTS.coredns_ready}/ready"))
    _wait("metrics-server", lambda: _api_ok("/apis/metrics.k8s.io/v1beta1/nodes"))


def use_real_node() -> None:
    """New pods go to the real node whatever their spec.

    Kwok's node is cordoned and the real node's taint removed: for workloads, such as the
    chart's, that carry no toleration. ``use_fake_node()`` undoes it.
    """
    kubectl("cordon", NODE_NAME)
    kubectl("taint", "node", REAL_NODE_NAME, f"{REAL_NODE_TAINT['key']}-", check=False)


def use_fake_node() -> None:
    """The default: new pods go to kwok's node unless they tolerate REAL_NODE_TAINT."""
    taint = f"{REAL_NODE_TAINT['key']}={REAL_NODE_TAINT['value']}:{REAL_NODE_TAINT['effect']}"
    kubectl("taint", "node", REAL_NODE_NAME, taint, "--overwrite")
    kubectl("uncordon", NODE_NAME)


def _stop_node() -> None:
    """Stop the node's parts and undo every change they made to the machine."""
    if not NODE_STATE.is_file():
        return
    before = json.loads(NODE_STATE.read_text())
    for part in NODE_PARTS[:-1]:
        _stop(part)
    if _pid("containerd"):
        # Every container and sandbox of the node (the kubelet is gone: no CNI teardown; the
        # network namespaces are removed below, their veths with them).
        for task in _ctr("tasks", "ls", "-q", check=False).split():
            _ctr("tasks", "kill", "-s", "SIGKILL", task, check=False)
        deadline = time.monotonic() + 20
        for container in _ctr("containers", "ls", "-q", check=False).split():
            while _ctr("tasks", "rm", "-f", container, check=False) and time.monotonic() < deadline:
                time.sleep(0.2)
            _ctr("containers", "rm", container, check=False)
    if (BIN / "kube-proxy").exists():
        _sh(str(BIN / "kube-proxy"), "--cleanup", check=False)
    _stop("containerd")
    _kill_shims()
    _remove_iptables_chains()
    for name in sorted(_netns() - set(before["netns"])):
        _sh("ip", "netns", "delete", name, check=False)
    for point in _mounts_under(RUN, CONTAINERD_ROOT):
        if subprocess.run(["umount", point], capture_output=True).returncode:
            subprocess.run(["umount", "-l", point], capture_output=True)
    _sh("iptables", "-D", *CONFINE_PODS, check=False)
    if Path(f"/sys/class/net/{BRIDGE}").exists():
        _sh("ip", "link", "delete", BRIDGE, check=False)
    for cgroup in _cgroup_dirs():
        for _ in range(50):  # processes of killed containers take a moment to leave
            for d in sorted(cgroup.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                if d.is_dir():
                    with contextlib.suppress(OSError):
                        d.rmdir()
            with contextlib.suppress(OSError):
                cgroup.rmdir()
            if not cgroup.exists():
                break
            time.sleep(0.2)
    for name, value in before["sysctls"].items():
        _set_sysctl(name, value)
    for path in before["absent"]:
        if not _mounts_under(Path(path)):
            shutil.rmtree(path, ignore_errors=True)
    NODE_STATE.unlink()
    if NODE_LOCK.is_file() and json.loads(NODE_LOCK.read_text())["run"] == str(RUN):
        NODE_LOCK.unlink()


def _kill_shims() -> None:
    """Containerd's shims outlive it: end those serving this run dir's containerd, by pid."""
    marker = str(CONTAINERD_SOCKET).encode()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if marker in (proc / "cmdline").read_bytes():
                    os.kill(int(proc.name), signal.SIGKILL)


PARTS = (
    "kwok",
    "training-operator",
    "kserve-manager",
    "kube-scheduler",
    "kube-controller-manager",
    "kube-apiserver",
    "etcd",
)


def healthy(node: bool | None = None) -> bool:
    """Whether every part is running and the API server answers.

    The node's parts count when it was started (or when ``node`` says so).
    """
    parts = PARTS + (NODE_PARTS if (NODE_STATE.is_file() if node is None else node) else ())
    if not all(_pid(p) for p in parts):
        return False
    try:
        return _api_ok("/readyz")
    except (OSError, ssl.SSLError):
        return False


def node_wanted() -> bool:
    """Whether ``up`` starts the real node (``MEDSEG_CLUSTER_NODE=0``: the control plane alone)."""
    return os.environ.get("MEDSEG_CLUSTER_NODE", "1") != "0"


def up(node: bool = True) -> None:
    """Bring the cluster up, or reuse the one running from this run dir.

    With the real node unless ``node`` is false (the control plane and kwok alone).
    """
    started = time.monotonic()
    if healthy() and NODE_STATE.is_file() == node:
        log(f"already running; KUBECONFIG={KUBECONFIG}")
        return
    down(quiet=True)  # a half-started cluster, or one with(out) the node: start clean
    if node and node_holder():  # before anything starts: say so at once
        raise ClusterError(
            f"the real node of {node_holder()} runs on this machine (one per machine: "
            "kube-proxy's iptables chains are global); stop it there, or start the control "
            "plane alone with `cluster.py up --no-node` (or MEDSEG_CLUSTER_NODE=0)"
        )
    _ensure_binaries()
    etcd = _ensure_etcd()
    if node:
        _ensure_node_packages()
    vars(PORTS).update(_ports(_free_base()))
    RUN.mkdir(parents=True, exist_ok=True)
    PORTS_FILE.write_text(json.dumps({"base": PORTS.etcd}))
    _pki()
    _kubeconfig("admin")
    try:
        _start_control_plane(etcd)
        if node:
            _start_node()
        _start_operators(busybox_image() if node else None)
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
    """Stop every part this script started and remove the run dir.

    The node's changes to the machine are undone first (``_stop_node``).
    """
    _stop_node()
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
            up(node=node_wanted() and "--no-node" not in argv)
        elif command == "down":
            down()
        elif command == "status":
            for part in PARTS + NODE_PARTS:
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
