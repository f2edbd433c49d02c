"""The container images built without Docker (scripts/images.py): archives, contents, digests.

The module fixture builds every CPU image through the layer cache (``~/.cache/medseg/images``):
seconds when warm; cold, about 7 minutes on two cores (mmdebstrap, the wheels from uv's cache,
gzip of ~5 GB), plus about 10 the first time Go builds the static MinIO and mc.
The images are then checked as a runtime sees them: the archive's layout and digests, skopeo,
the config (user, labels, environment), the files of the layers (chroot as uid 1000, no container
runtime here), the SBOM, a rebuild's digest and the bundle's chart values.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from medseg.apps.minio_server import MinioServer
from medseg.core.settings import DEFAULT_IMAGES
from medseg.core.storage import Storage
from tests.cluster.cluster_kit import load_script

ROOT = Path(__file__).resolve().parents[2]
HELM = ROOT / ".tools" / "bin" / "helm"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("chroot"),
    reason="building the images needs root (chroot, overlay mounts)",
)


images = load_script("images")


@pytest.fixture(scope="module")
def built() -> dict[str, Any]:
    """Every CPU image, by name (the archives in .medseg/images; layers from the cache)."""
    return {b.name: b for b in images.build()}


def _members(archive: Path) -> dict[str, bytes]:
    """The small members of an archive (index, manifests, configs), by name."""
    with tarfile.open(archive) as tar:
        return {
            m.name: tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.isfile() and m.size < 1 << 20
        }


def _blob(members: dict[str, bytes], digest: str) -> Any:
    return json.loads(members[f"blobs/sha256/{digest.removeprefix('sha256:')}"])


def _layer_names(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


# --------------------------------------------------------------------------------------------
# Declarations (no build)
# --------------------------------------------------------------------------------------------


def test_the_declarations_name_the_settings_and_chart_refs() -> None:
    defs = images.images()
    assert defs["medseg"].ref == DEFAULT_IMAGES.project
    assert defs["medseg-server"].ref == DEFAULT_IMAGES.server
    values = yaml.safe_load((ROOT / "charts/medseg/values.yaml").read_text())
    assert f"{values['image']['repository']}:{values['image']['tag']}" == DEFAULT_IMAGES.project
    server = values["serverImage"]
    assert f"{server['repository']}:{server['tag']}" == DEFAULT_IMAGES.server
    # the project and server images are the same layers, two configurations
    assert defs["medseg"].layers == defs["medseg-server"].layers
    assert images.images("cuda")["medseg"].ref == DEFAULT_IMAGES.project + "-cuda"
    for d in defs.values():
        assert d.ref.startswith(("ghcr.io/medseg/", "localhost/medseg/")), d.ref
        assert not any(re.search(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY", k) for k, _ in d.env)


def test_the_requirements_are_the_lock_without_dev_tools_and_cuda() -> None:
    lock = images._pins((ROOT / "requirements.lock").read_text(), "lock")
    cpu = images._pins(images.requirements("cpu"), "cpu")
    cuda = images._pins(images.requirements("cuda"), "cuda")
    assert cpu["torch"] == lock["torch"] and cpu["kserve"] == lock["kserve"]
    assert all(lock[name] == version for name, version in cuda.items())
    # torch's wheel links its CUDA runtime at import: the CPU set keeps those, drops the rest
    assert {"triton", "nvidia-cusolver", "nvidia-nvjitlink", "cuda-toolkit"} <= set(cuda)
    assert set(cuda) - set(cpu) == {n for n in cuda if images.CPU_EXCLUDED.match(n)}
    assert {"triton", "nvidia-cusolver", "cuda-toolkit", "cuda-bindings"}.isdisjoint(cpu)
    assert {"nvidia-cuda-runtime", "nvidia-cudnn-cu13"} <= set(cpu)
    for dev in ("pytest", "ruff", "mypy", "hypothesis", "tritonclient"):
        assert dev in lock and dev not in cuda


def test_a_broken_lock_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(images.ImageError, match=r"bad\.lock: not a pinned requirement"):
        images._pins("torch>=2\n", str(tmp_path / "bad.lock"))
    proc = subprocess.run(
        [sys.executable, "scripts/images.py", "build", "no-such-image"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 1
    assert "unknown image no-such-image" in proc.stderr and "Traceback" not in proc.stderr


def test_the_layer_writer_is_deterministic(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "b").mkdir(parents=True)
    (tree / "b" / "z.txt").write_text("z")
    (tree / "a.txt").write_text("a")
    os.link(tree / "a.txt", tree / "b" / "hard")
    (tree / "b" / "link").symlink_to("../a.txt")
    first = images.write_layer(tree, tmp_path / "1.tar.gz", epoch=1_000_000)
    os.utime(tree / "a.txt", (2_000_000_000, 2_000_000_000))  # later than the epoch: clamped
    second = images.write_layer(tree, tmp_path / "2.tar.gz", epoch=1_000_000)
    assert first == second
    assert first[0] == "sha256:" + hashlib.sha256((tmp_path / "1.tar.gz").read_bytes()).hexdigest()
    raw = gzip.decompress((tmp_path / "1.tar.gz").read_bytes())
    assert first[1] == "sha256:" + hashlib.sha256(raw).hexdigest()
    with tarfile.open(tmp_path / "1.tar.gz") as tar:
        entries = {m.name: m for m in tar.getmembers()}
    assert list(entries) == ["a.txt", "b", "b/hard", "b/link", "b/z.txt"]
    assert entries["b/hard"].islnk() and entries["b/hard"].linkname == "a.txt"
    assert all(m.mtime <= 1_000_000 and m.uname == "" for m in entries.values())


# --------------------------------------------------------------------------------------------
# The built images
# --------------------------------------------------------------------------------------------

NAMES = ("medseg", "medseg-server", "kserve-storage-initializer", "minio", "mc", "busybox")


@pytest.mark.parametrize("name", NAMES)
def test_archive_is_an_oci_layout_and_a_docker_archive(built: dict[str, Any], name: str) -> None:
    image = built[name]
    members = _members(image.archive)
    assert json.loads(members["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    (entry,) = json.loads(members["index.json"])["manifests"]
    assert entry["digest"] == image.digest
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == image.ref
    assert entry["annotations"]["io.containerd.image.name"] == image.ref
    manifest_bytes = members[f"blobs/sha256/{image.digest[7:]}"]
    assert "sha256:" + hashlib.sha256(manifest_bytes).hexdigest() == image.digest
    manifest = json.loads(manifest_bytes)
    assert [layer["digest"] for layer in manifest["layers"]] == list(image.layers)
    (docker,) = json.loads(members["manifest.json"])
    assert docker["RepoTags"] == [image.ref]
    assert docker["Layers"] == [f"blobs/sha256/{d[7:]}" for d in image.layers]
    with tarfile.open(image.archive) as tar:
        sizes = {m.name: m.size for m in tar.getmembers()}
    for layer in manifest["layers"]:
        assert sizes[f"blobs/sha256/{layer['digest'][7:]}"] == layer["size"]


@pytest.mark.parametrize("name", NAMES)
def test_config_non_root_labelled_and_without_credentials(built: dict[str, Any], name: str) -> None:
    image = built[name]
    members = _members(image.archive)
    manifest = _blob(members, image.digest)
    config = _blob(members, manifest["config"]["digest"])
    assert config["config"]["User"] == "1000:1000"
    env = dict(e.split("=", 1) for e in config["config"]["Env"])
    assert env["HOME"] == "/tmp"
    assert not [k for k in env if re.search(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL", k)]
    labels = config["config"]["Labels"]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    assert labels["org.opencontainers.image.revision"].startswith(commit.stdout.strip())
    assert labels["org.opencontainers.image.source"].startswith("https://")
    assert labels["org.opencontainers.image.title"] == name
    assert labels["org.opencontainers.image.version"]
    epoch = subprocess.run(
        ["git", "log", "-1", "--format=%ct"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    assert labels["org.opencontainers.image.created"] == images._iso(int(epoch))
    assert {h["created"] for h in config["history"]} == {config["created"]}  # no build times
    assert len(config["rootfs"]["diff_ids"]) == len(image.layers)


def test_medseg_images_share_every_layer(built: dict[str, Any]) -> None:
    project, server = built["medseg"], built["medseg-server"]
    assert project.layers == server.layers and project.digest != server.digest
    # the storage initializer stands on the same Debian base
    assert built["kserve-storage-initializer"].layers[0] == project.layers[0]
    members = _members(server.archive)
    config = _blob(members, _blob(members, server.digest)["config"]["digest"])["config"]
    assert config["Entrypoint"] == ["python", "-m", "model_server"]
    assert config["Cmd"] == [
        "--model_dir",
        "/mnt/models",
        "--http_port",
        "8080",
        "--grpc_port",
        "8081",
    ]
    assert "MEDSEG_SERVER_HOST=0.0.0.0" in config["Env"]
    assert set(config["ExposedPorts"]) == {"8080/tcp", "8081/tcp"}


def test_sbom_lists_the_locked_packages(built: dict[str, Any]) -> None:
    lock = images._pins((ROOT / "requirements.lock").read_text(), "lock")
    image = built["medseg"]
    doc = json.loads(image.sbom.read_text())
    inside = image.trees[-1] / images.SBOM_PATH
    assert inside.read_bytes() == image.sbom.read_bytes()  # the file in the image, and beside it
    assert doc["bomFormat"] == "CycloneDX"
    versions = {c["name"]: c["version"] for c in doc["components"]}
    assert versions["torch"] == lock["torch"]
    assert versions["medseg"] == "0.1.0"
    assert versions["python3.11"].startswith("3.11")
    purls = [c["purl"] for c in doc["components"]]
    assert f"pkg:pypi/torch@{lock['torch']}" in purls
    assert not [p for p in purls if re.search(r"pkg:pypi/(triton|nvidia-cusolver|cuda-)", p)]
    storage = json.loads(built["kserve-storage-initializer"].sbom.read_text())
    assert ("kserve-storage", "0.20.0") in {
        (c["name"], c["version"]) for c in storage["components"]
    }
    mc = json.loads(built["mc"].sbom.read_text())
    assert any(c["purl"].startswith("pkg:golang/github.com/minio/mc@") for c in mc["components"])


def test_cpu_image_leaves_out_the_cuda_wheels_torch_does_not_load(built: dict[str, Any]) -> None:
    site = built["medseg"].trees[1] / "opt/venv/lib/python3.11/site-packages"
    assert (site / "torch").is_dir()
    assert not list(site.glob("triton*")) and not list(site.glob("cuda*"))
    assert not list(site.glob("nvidia/cu13/lib/libcusolver*"))
    assert not list(site.glob("nvidia/cu13/include/cccl"))  # the CUDA C++ headers


def test_no_credentials_in_the_layers(built: dict[str, Any]) -> None:
    names = set()
    for image in built.values():
        for tree in image.trees:
            names.update(str(p.relative_to(tree)) for p in tree.rglob("*") if p.is_file())
    for suspicious in (r"(^|/)\.aws/", r"(^|/)\.mc/", r"minio\.env$", r"(^|/)\.netrc$", r"\.env$"):
        assert not [n for n in names if re.search(suspicious, n)], suspicious
    pattern = re.compile(
        rb"AWS_SECRET_ACCESS_KEY=\S|MINIO_ROOT_PASSWORD=\S|BEGIN [A-Z ]*PRIVATE KEY"
    )
    small = [built[n].trees[-1] for n in ("medseg", "kserve-storage-initializer", "mc")]
    small.append(built["minio"].trees[0] / "etc")
    for tree in small:
        for path in tree.rglob("*"):
            if path.is_file() and not path.is_symlink():
                assert not pattern.search(path.read_bytes()), path


def test_users_and_runtime_files(built: dict[str, Any]) -> None:
    for name in NAMES:
        passwd = built[name].trees[0] / "etc/passwd"
        assert "medseg:x:1000:1000:" in passwd.read_text(), name
    mc = built["mc"].trees[0]
    assert os.readlink(mc / "bin/sh") == "busybox"  # the bucket Job's /bin/sh -ec
    assert (mc / "tmp").stat().st_mode & 0o1777 == 0o1777


def test_processes_run_as_uid_1000_in_the_images(built: dict[str, Any]) -> None:
    proc = images.run(
        built["medseg-server"],
        [
            "python",
            "-c",
            "import os, torch, model_server, medseg; "
            "print(os.getuid(), float(torch.ones(3).sum()), torch.cuda.is_available())",
        ],
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1000", "3.0", "False"]
    proc = images.run(built["medseg"], ["medseg", "--help"])
    assert proc.returncode == 0 and "Usage" in proc.stdout, proc.stderr
    proc = images.run(built["mc"], ["/bin/sh", "-ec", "mc --version && id -u"])
    assert proc.returncode == 0 and proc.stdout.split()[-1] == "1000", proc.stderr
    proc = images.run(built["minio"], ["/usr/bin/minio", "--version"])
    assert proc.returncode == 0 and "minio" in proc.stdout.lower(), proc.stderr
    proc = images.run(built["busybox"], ["/bin/sh", "-c", "id -u && command -v nslookup"])
    assert proc.returncode == 0 and proc.stdout.split()[0] == "1000", proc.stderr


def test_storage_initializer_downloads_a_model_from_minio(
    built: dict[str, Any], own_minio: MinioServer, tmp_path: Path
) -> None:
    minio = own_minio
    storage = Storage(minio.settings(retry_seconds=10))
    storage.ensure_bucket("s3://models")
    storage.put_bytes("s3://models/tiny/v1/model.yaml", b"name: tiny\n")
    storage.put_bytes("s3://models/tiny/v1/model.pt", b"\x00weights")
    out = tmp_path / "out"
    out.mkdir()
    os.chmod(out, 0o777)  # the initializer runs as uid 1000, like KServe's emptyDir
    env = minio.env()
    s3_env = {
        "AWS_ACCESS_KEY_ID": env["AWS_ACCESS_KEY_ID"],
        "AWS_SECRET_ACCESS_KEY": env["AWS_SECRET_ACCESS_KEY"],
        "AWS_ENDPOINT_URL": env["S3_ENDPOINT"],
        "AWS_DEFAULT_REGION": "us-east-1",
        "S3_USE_HTTPS": "0",
        "S3_VERIFY_SSL": "0",
    }
    image = built["kserve-storage-initializer"]
    # What the runtime starts: the image's own entrypoint, with KServe's two arguments.
    entrypoint = list(images.images()["kserve-storage-initializer"].entrypoint)
    argv = [*entrypoint, "s3://models/tiny/v1", "/mnt/models"]
    proc = images.run(image, argv, env=s3_env, binds={"/mnt/models": out})
    assert proc.returncode == 0, proc.stderr
    assert (out / "model.yaml").read_bytes() == b"name: tiny\n"
    assert (out / "model.pt").read_bytes() == b"\x00weights"
    assert env["AWS_SECRET_ACCESS_KEY"] not in proc.stdout + proc.stderr
    bad = images.run(image, [*entrypoint, "s3://models/tiny/v1"])
    assert bad.returncode == 2 and "usage" in bad.stderr


def test_skopeo_reads_every_archive(built: dict[str, Any]) -> None:
    images._ensure_debian_packages(("skopeo", "skopeo"))
    for image in built.values():
        proc = subprocess.run(
            ["skopeo", "inspect", f"oci-archive:{image.archive}"], capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr
        info = json.loads(proc.stdout)
        assert info["Digest"] == image.digest
        assert info["Labels"]["org.opencontainers.image.title"] == image.name
        assert info["Layers"] == list(image.layers)


def test_a_rebuild_from_the_same_inputs_has_the_same_digests(built: dict[str, Any]) -> None:
    """The code layers, the static ones and the configs are rebuilt (the rest comes cached)."""
    again = images.build(["medseg", "medseg-server", "mc"], force=["code-cpu", "mc"], write=False)
    for image in again:
        assert image.digest == built[image.name].digest, image.name
        assert image.layers == built[image.name].layers


def test_bundle_values_render_exactly_the_bundled_refs(
    built: dict[str, Any], tmp_path: Path
) -> None:
    values = tmp_path / "values-bundle.yaml"
    values.write_text(yaml.safe_dump(images.bundle_values(list(built.values()))))
    proc = subprocess.run(
        [str(HELM), "template", "medseg", str(ROOT / "charts/medseg"), "-f", str(values)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    rendered = set(re.findall(r"^\s+image: \"?([^\"\s]+)\"?$", proc.stdout, re.M))
    bundled = {b.ref for b in built.values()}
    assert rendered <= bundled, rendered - bundled
    for name in ("medseg-server", "minio", "mc"):
        assert built[name].ref in rendered
    for doc in yaml.safe_load_all(proc.stdout):
        for pod in _pod_specs(doc):
            for container in pod.get("containers", []) + pod.get("initContainers", []):
                if container["image"].startswith("localhost/"):
                    assert container.get("imagePullPolicy", "IfNotPresent") == "IfNotPresent"


def _pod_specs(doc: Any) -> Iterator[dict[str, Any]]:
    if isinstance(doc, dict):
        if "containers" in doc:
            yield doc
        for value in doc.values():
            yield from _pod_specs(value)
    elif isinstance(doc, list):
        for value in doc:
            yield from _pod_specs(value)


@pytest.mark.slow  # writes and hashes ~3 GB (about a minute)
def test_bundle_is_complete_and_checksummed(built: dict[str, Any], tmp_path: Path) -> None:
    out = images.bundle(out=tmp_path / "bundle")
    names = {p.name for p in out.iterdir()}
    for image in built.values():
        assert image.sbom.name in names
    archive = out / "medseg-images-0.1.0.oci.tar"
    assert {archive.name, "medseg-0.1.0.tgz", "values-bundle.yaml", "SHA256SUMS"} <= names
    members = _members(archive)
    refs = {
        m["annotations"]["io.containerd.image.name"]: m["digest"]
        for m in json.loads(members["index.json"])["manifests"]
    }
    assert refs == {b.ref: b.digest for b in built.values()}
    assert {t for m in json.loads(members["manifest.json"]) for t in m["RepoTags"]} == set(refs)
    with tarfile.open(archive) as tar:
        blobs = [n for n in tar.getnames() if n.startswith("blobs/sha256/")]
    assert len(blobs) == len(set(blobs))  # the shared layers once
    # smaller than the per-image archives together: the medseg layers are not repeated
    assert archive.stat().st_size < sum(b.archive.stat().st_size for b in built.values()) * 0.7
    proc = subprocess.run(
        ["skopeo", "inspect", f"oci-archive:{archive}:{built['medseg-server'].ref}"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["Digest"] == built["medseg-server"].digest
    check = subprocess.run(
        ["sha256sum", "-c", "SHA256SUMS"], cwd=out, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    listed = {line.split("  ", 1)[1] for line in (out / "SHA256SUMS").read_text().splitlines()}
    assert listed == names - {"SHA256SUMS"}
    values = yaml.safe_load((out / "values-bundle.yaml").read_text())
    assert values["image"]["repository"] + ":" + values["image"]["tag"] == built["medseg"].ref
    assert values["minio"]["image"]["repository"] == "localhost/medseg/minio"
