"""Container images without a Docker engine: reproducible OCI archives (``make images``).

Every image is declared once, in :data:`IMAGES` (references, entrypoint, environment, user, ports,
labels and the layers it stacks); nothing else describes them (the Dockerfiles this replaces
needed Docker Hub and a Docker engine, neither of which the development machines have).

Layers are built from pinned inputs and cached under ``~/.cache/medseg/images/<layer>-<key>``
(``MEDSEG_IMAGES_CACHE``), the key a hash of everything that goes into the layer:

* ``base``: Debian bookworm from ``mmdebstrap`` (variant ``essential``) with Python 3.11 and the
  few libraries the wheels link against, plus the ``medseg`` user (uid/gid 1000). Its key includes
  the hashes of the mirror's package indexes, so a Debian point release or security update makes a
  new base; offline, the newest base built for the same recipe is reused.
* ``deps-cpu`` / ``deps-cuda``: ``/opt/venv`` with the runtime subset of ``requirements.lock``
  (``uv pip compile`` of the non-dev extras, constrained to the lock: the same versions), installed
  by uv inside the base (chroot, overlayfs). The CPU variant leaves out the CUDA wheels (torch runs
  on the CPU without them).
* ``code``: medseg itself (a wheel of the working tree, ``--no-deps``) and the SBOM. A change to the
  code rebuilds only this layer; the project and server images are the same layers with two
  configurations.
* ``storage-venv`` / ``storage-code``: KServe's storage initializer
  (``images/storage-initializer.lock``) and its entrypoint.
* ``minio`` / ``mc``: a static Go binary each (``go install``, pinned in scripts/setup.sh), mc's
  with busybox for the bucket Job's ``/bin/sh -ec``.
* ``busybox``: Debian's static busybox and its applets: the pause image of the real node's pods and
  the Training Operator's init container (scripts/cluster.py imports it; no registry).

Reproducible: entries sorted, numeric owners, mtimes clamped to a fixed epoch (the commit time of
the layer's inputs), gzip without a name or time, ``.pyc`` files hash-checked (``SOURCE_DATE_EPOCH``
set while compiling), no timestamps in the history. The same inputs give the same digests.

An archive (``.medseg/images/<name>-<tag>.oci.tar``) is an OCI image layout (``index.json`` naming
the full reference in ``org.opencontainers.image.ref.name`` and ``io.containerd.image.name``) plus
Docker's ``manifest.json``: ``ctr -n k8s.io images import``, ``docker load``, ``podman load`` and
``skopeo copy oci-archive:…`` read it.

Usage: ``python scripts/images.py build [--variant cpu|cuda] [NAME ...]``, ``bundle``, ``list``.
Building needs root (chroot, overlay mounts) and the Debian packages mmdebstrap and
busybox-static, which it installs when missing.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("MEDSEG_IMAGES_CACHE", Path.home() / ".cache/medseg/images"))
TOOLS_CACHE = Path(os.environ.get("MEDSEG_TOOLS_CACHE", Path.home() / ".cache/medseg/tools"))
OUT = ROOT / ".medseg" / "images"
BUNDLE = ROOT / ".medseg" / "bundle"
#: Bumped when the way layers are made changes (every key includes it).
BUILDER_VERSION = "1"
#: This file's hash: the cheap layers (code, entrypoints, static binaries) are rebuilt when it
#: changes; the expensive ones (base, venvs) when BUILDER_VERSION is bumped.
BUILDER = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
#: The mtime of every file of the base, venv, entrypoint and static-binary layers (2024-01-01).
#: Their keys name their inputs exactly (package indexes, pinned wheels, binaries), so a fixed time
#: keeps a rebuild on another machine, at another commit, byte-identical to a cached one (and the
#: layer shared across releases); medseg's code layer uses the commit time.
STABLE_EPOCH = 1704067200
UID = GID = 1000
#: The Debian release, its mirrors and the packages of the base (what the wheels link against:
#: libstdc++/libgcc for every C++ extension, libgomp for OpenMP; netbase for /etc/services).
SUITE = "bookworm"
MIRRORS = (
    ("http://deb.debian.org/debian", "bookworm"),
    ("http://deb.debian.org/debian", "bookworm-updates"),
    ("http://deb.debian.org/debian-security", "bookworm-security"),
)
#: Debian's static busybox: the busybox image and mc's ``sh``.
BUSYBOX_PACKAGE = "busybox-static"
BASE_PACKAGES = ("python3.11", "ca-certificates", "libstdc++6", "libgcc-s1", "libgomp1", "netbase")
#: Documentation, manuals and translations are not installed (copyright files are).
DPKG_OPTIONS = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/info/*",
)
#: Wheels the CPU images leave out. PyPI's torch 2.15.0 (+cu132) links its CUDA runtime at load
#: time (libtorch_cuda.so and libtorch_python.so DT_NEEDED cudart, cublas/cublasLt, cudnn, cufft,
#: cufile, cupti, cusparse, cusparseLt, nccl, nvrtc, nvshmem), so those wheels stay even on the CPU;
#: what nothing loads at import goes: triton (a GPU compiler, ~1 GB), cuSOLVER (only the lazily
#: dlopen'ed libtorch_cuda_linalg needs it), nvJitLink, NVTX, the CUDA headers (cccl) and the
#: cuda-python packages. The deps layer's build imports torch to prove it.
CPU_EXCLUDED = re.compile(
    r"^(triton|cuda-bindings|cuda-pathfinder|cuda-toolkit"
    r"|nvidia-cuda-cccl|nvidia-cusolver|nvidia-nvjitlink|nvidia-nvtx)$"
)
#: How .pyc files are written (part of the venv layers' keys).
PYC_MODE = "unchecked-hash, forced, no start-up writes"
#: What the deps layer's build runs: torch loads (its CUDA libraries resolve) and computes.
TORCH_SMOKE = "import torch, monai, kserve; assert float(torch.ones(3).sum()) == 3.0"
#: Every CUDA wheel (what the CUDA variant adds to the lock's CPU-only packages).
CUDA_PACKAGES = re.compile(
    r"^(nvidia-[a-z0-9-]+|triton|cuda-bindings|cuda-pathfinder|cuda-toolkit)$"
)
#: The medseg sources that go into the code layer (and into its key).
SOURCES = ("medseg", "model_server", "components", "pipelines", "pyproject.toml", "README.md")
#: The import packages of medseg (byte-compiled in the code layer).
PACKAGES = ("medseg", "model_server", "components", "pipelines")
VENV = "/opt/venv"
STORAGE_VENV = "/opt/kserve-storage"
STORAGE_LOCK = ROOT / "images" / "storage-initializer.lock"
STORAGE_ENTRYPOINT = ROOT / "images" / "storage-initializer-entrypoint"
SBOM_PATH = "usr/share/medseg/sbom.json"
SOURCE_URL = "https://github.com/medseg/medseg"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"


def log(message: str) -> None:
    """Progress on stderr."""
    print(f"\033[1mimages:\033[0m {message}", file=sys.stderr, flush=True)


class ImageError(RuntimeError):
    """An image could not be built or bundled (the message names the input and the reason)."""


# --------------------------------------------------------------------------------------------
# The declarations
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ImageDef:
    """One image: its reference, the layers it stacks and its runtime configuration.

    Attributes:
        name: Short name (``build NAME``, the archive's file name).
        ref: The full reference, ``registry/repository:tag``.
        layers: Layer names, bottom first (see :func:`layer_builders`).
        entrypoint, cmd: The process (``Entrypoint`` and ``Cmd``).
        env: Environment of the process (never a credential).
        title, description: OCI labels.
        ports: Exposed TCP ports.
        workdir: Working directory.
    """

    name: str
    ref: str
    layers: tuple[str, ...]
    entrypoint: tuple[str, ...]
    cmd: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    title: str
    description: str
    ports: tuple[int, ...] = ()
    workdir: str = "/tmp"

    @property
    def tag(self) -> str:
        """The reference's tag."""
        return self.ref.rsplit(":", 1)[1]

    @property
    def archive(self) -> str:
        """The archive's file name."""
        return f"{self.name}-{self.tag}.oci.tar"


def _setup_versions() -> dict[str, str]:
    """``NAME=value`` lines of scripts/setup.sh (the pinned tool versions)."""
    text = (ROOT / "scripts" / "setup.sh").read_text()
    return dict(re.findall(r"^([A-Z_]+_VERSION)=(\S+)$", text, re.MULTILINE))


def images(variant: str = "cpu") -> dict[str, ImageDef]:
    """Every image, by name (the CUDA variant tags the medseg images ``-cuda``).

    Args:
        variant: ``cpu`` or ``cuda`` (the medseg images' dependency layer).

    Returns:
        The declarations, in build order.
    """
    from medseg.core.settings import DEFAULT_IMAGES, DEFAULT_PORTS, KSERVE_MODEL_DIR

    if variant not in ("cpu", "cuda"):
        raise ImageError(f"unknown variant {variant!r} (cpu or cuda)")
    suffix = "" if variant == "cpu" else "-cuda"
    versions = _setup_versions()
    python_env = (
        ("PATH", f"{VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
        ("PYTHONUNBUFFERED", "1"),
        ("HOME", "/tmp"),
        ("MPLCONFIGDIR", "/tmp/matplotlib"),
    )
    medseg_layers = ("base", f"deps-{variant}", f"code-{variant}")
    http, grpc = DEFAULT_PORTS.http, DEFAULT_PORTS.grpc
    defs = [
        ImageDef(
            name="medseg",
            ref=DEFAULT_IMAGES.project + suffix,
            layers=medseg_layers,
            entrypoint=(),
            cmd=("medseg", "--help"),
            env=python_env,
            title="medseg",
            description="medseg pipeline steps, training (torchrun, PyTorchJob) and the CLI",
        ),
        ImageDef(
            name="medseg-server",
            ref=DEFAULT_IMAGES.server + suffix,
            layers=medseg_layers,
            entrypoint=("python", "-m", "model_server"),
            cmd=(
                "--model_dir",
                KSERVE_MODEL_DIR,
                "--http_port",
                str(http),
                "--grpc_port",
                str(grpc),
            ),
            # In a pod the server listens on every interface (it binds loopback by default).
            env=(*python_env, ("MEDSEG_SERVER_HOST", "0.0.0.0")),
            title="medseg-server",
            description="medseg model server (KServe ModelServer with the medseg predictor)",
            ports=(http, grpc),
        ),
    ]
    if variant == "cpu":
        defs += [
            ImageDef(
                name="kserve-storage-initializer",
                ref=f"localhost/medseg/kserve-storage-initializer:{KSERVE_STORAGE_VERSION}",
                layers=("base", "storage-venv", "storage-code"),
                entrypoint=(f"{STORAGE_VENV}/bin/python", f"/{ENTRYPOINT_PATH}"),
                cmd=(),
                env=(
                    ("PATH", f"{STORAGE_VENV}/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
                    ("PYTHONUNBUFFERED", "1"),
                    ("HOME", "/tmp"),
                ),
                title="kserve-storage-initializer",
                description="KServe storage initializer (kserve-storage): SRC_URI DEST_PATH",
            ),
            ImageDef(
                name="minio",
                ref=f"localhost/medseg/minio:{versions['MINIO_VERSION']}",
                layers=("minio",),
                entrypoint=("/usr/bin/minio",),
                cmd=(),
                env=(("PATH", "/usr/bin:/bin"), ("HOME", "/tmp")),
                title="minio",
                description="MinIO server built from source (static, CGO off)",
                ports=(9000,),
            ),
            ImageDef(
                name="mc",
                ref=f"localhost/medseg/mc:{versions['MC_VERSION']}",
                layers=("mc",),
                entrypoint=(),
                cmd=("mc", "--help"),
                env=(("PATH", "/usr/bin:/bin"), ("HOME", "/tmp")),
                title="mc",
                description="MinIO client built from source (static), with busybox sh",
            ),
        ]
    defs.append(
        ImageDef(
            name="busybox",
            ref=f"localhost/medseg/busybox:{re.sub(r'[^A-Za-z0-9_.-]', '-', busybox_version())}",
            layers=("busybox",),
            # Sleeps: also containerd's pause (sandbox) image.
            entrypoint=("/bin/sleep",),
            cmd=("2147483647",),
            env=(("PATH", "/bin"), ("HOME", "/tmp")),
            title="busybox",
            description="Debian's static busybox: the pause image and the init containers",
            workdir="/",
        )
    )
    return {d.name: d for d in defs}


def busybox_version() -> str:
    """The version of Debian's static busybox here (installed when missing), epoch dropped."""
    _ensure_debian_packages(("busybox", BUSYBOX_PACKAGE))
    query = ["dpkg-query", "-W", "-f", "${Version}", BUSYBOX_PACKAGE]
    return _run(query, "dpkg-query").stdout.split(":", 1)[-1]


#: KServe's storage initializer: the version of the KServe controller the test cluster runs
#: (``KSERVE_VERSION`` of scripts/cluster/versions.sh, the one pin).
KSERVE_STORAGE_VERSION = dict(
    re.findall(r"^([A-Z_]+)=(\S+)$", (ROOT / "scripts/cluster/versions.sh").read_text(), re.M)
)["KSERVE_VERSION"]


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _key(*parts: Any) -> str:
    """A short hash of JSON-able parts (a cache key)."""
    text = json.dumps([BUILDER_VERSION, *parts], sort_keys=True, separators=(",", ":"))
    return _sha256(text.encode())[:20]


def _run(cmd: Sequence[str], what: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run ``cmd``; on failure an :class:`ImageError` naming ``what`` with the output's tail."""
    try:
        proc = subprocess.run(list(cmd), text=True, capture_output=True, **kwargs)
    except FileNotFoundError as exc:
        raise ImageError(f"{what}: {cmd[0]} not found ({exc.strerror})") from None
    if proc.returncode:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        raise ImageError(f"{what} failed (exit {proc.returncode}):\n  " + "\n  ".join(tail))
    return proc


def _git_epoch() -> int:
    """``SOURCE_DATE_EPOCH`` if set, else the commit time of HEAD (``created``, code layers)."""
    if env_epoch := os.environ.get("SOURCE_DATE_EPOCH"):
        return int(env_epoch)
    out = _run(["git", "log", "-1", "--format=%ct"], "git log", cwd=ROOT).stdout
    return int(out.strip() or 0)


def _git_revision() -> str:
    out = _run(["git", "rev-parse", "HEAD"], "git rev-parse", cwd=ROOT).stdout.strip()
    dirty = _run(["git", "status", "--porcelain", "--", *SOURCES], "git status", cwd=ROOT).stdout
    return out + ("-dirty" if dirty.strip() else "")


def _iso(epoch: int) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _ensure_debian_packages(*commands: tuple[str, str]) -> None:
    """Install the Debian package of each missing (command, package) pair (apt-get)."""
    missing = [pkg for cmd, pkg in commands if not shutil.which(cmd)]
    if not missing:
        return
    log(f"installing the Debian packages {' '.join(missing)}")
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _run([*sudo, "apt-get", "update", "-qq"], "apt-get update", env=env)
    _run(
        [*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
        f"apt-get install {' '.join(missing)}",
        env=env,
    )


def _require_root() -> None:
    if os.geteuid() != 0:
        raise ImageError("building the images needs root (chroot and overlay mounts)")


# --------------------------------------------------------------------------------------------
# The deterministic layer writer
# --------------------------------------------------------------------------------------------


class _HashingWriter(io.RawIOBase):
    """A write-only stream that hashes and counts what passes through to ``target``."""

    def __init__(self, target: Any) -> None:
        self.target, self.hash, self.size = target, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.hash.update(view)
        self.size += len(view)
        if self.target is not None:
            self.target.write(view)
        return len(view)


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """A built layer: its blob (gzip) and what the image needs to know about it."""

    name: str
    key: str
    path: Path
    digest: str
    diff_id: str
    size: int
    uncompressed: int
    created_by: str

    @classmethod
    def load(cls, folder: Path) -> LayerInfo:
        meta = json.loads((folder / "layer.json").read_text())
        return cls(path=folder / "layer.tar.gz", **meta)

    @property
    def tree(self) -> Path:
        """The files of the layer, kept next to its blob (to run the image, see :func:`run`)."""
        for rel in ("rootfs", "upper", "ovl/upper", "tree"):
            if (self.path.parent / rel).is_dir():
                return self.path.parent / rel
        raise ImageError(f"{self.path.parent}: the layer's files are missing (rebuild it)")

    def save(self) -> None:
        meta = dataclasses.asdict(self)
        del meta["path"]
        (self.path.parent / "layer.json").write_text(json.dumps(meta, indent=1))


def _walk(root: Path) -> Iterator[str]:
    """Relative paths under ``root`` in sorted pre-order (a directory before its entries)."""
    stack = [""]
    while stack:
        rel = stack.pop()
        if rel:
            yield rel
        full = root / rel if rel else root
        if full.is_dir() and not full.is_symlink():
            names = sorted(os.listdir(full), reverse=True)
            stack.extend(f"{rel}/{n}" if rel else n for n in names)


def _selected(rel: str, include: Sequence[str] | None, exclude: Sequence[str]) -> bool:
    if any(rel == e or rel.startswith(e + "/") for e in exclude):
        return False
    if include is None:
        return True
    # a path under an included prefix, or a parent directory of one
    return any(rel == i or rel.startswith(i + "/") or i.startswith(rel + "/") for i in include)


def write_layer(
    root: Path,
    out: Path,
    epoch: int,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    extra: dict[str, tuple[bytes, int]] | None = None,
) -> tuple[str, str, int, int]:
    """Write the tree under ``root`` as a reproducible gzip-compressed tar layer.

    Args:
        root: The tree (an overlay upper directory or a whole root file system).
        out: The ``.tar.gz`` to write.
        epoch: mtimes later than this are clamped to it.
        include: Path prefixes (relative) to keep, with their parent directories; None: all.
        exclude: Path prefixes to leave out (device nodes of ``dev/`` and the like).
        extra: Files to add (relative path to (content, mode)), e.g. the SBOM; their parent
            directories must be in the tree.

    Returns:
        (digest of the gzip blob, diff_id of the tar, compressed size, uncompressed size).

    Raises:
        ImageError: An overlay whiteout (a deletion) in the tree: layers here only add files.
    """
    extra = dict(extra or {})
    out.parent.mkdir(parents=True, exist_ok=True)
    seen: dict[tuple[int, int], str] = {}
    with out.open("wb") as raw:
        compressed = _HashingWriter(raw)
        with gzip.GzipFile(
            filename="", mode="wb", fileobj=compressed, mtime=0, compresslevel=6
        ) as gz:
            plain = _HashingWriter(gz)
            with tarfile.open(fileobj=plain, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                paths = sorted(set(_walk(root)) | set(extra), key=lambda p: p.split("/"))
                for rel in paths:
                    if not _selected(rel, include, exclude) and rel not in extra:
                        continue
                    info = tarfile.TarInfo(rel)
                    info.uname = info.gname = ""
                    if rel in extra:
                        content, mode = extra[rel]
                        info.size, info.mode, info.mtime = len(content), mode, epoch
                        tar.addfile(info, io.BytesIO(content))
                        continue
                    full = root / rel
                    st = full.lstat()
                    info.mode = st.st_mode & 0o7777
                    info.uid, info.gid = st.st_uid, st.st_gid
                    info.mtime = min(int(st.st_mtime), epoch)
                    if full.is_symlink():
                        info.type, info.linkname = tarfile.SYMTYPE, os.readlink(full)
                        tar.addfile(info)
                    elif full.is_dir():
                        info.type = tarfile.DIRTYPE
                        tar.addfile(info)
                    elif full.is_file():
                        ident = (st.st_dev, st.st_ino)
                        if st.st_nlink > 1 and ident in seen:
                            info.type, info.linkname = tarfile.LNKTYPE, seen[ident]
                            tar.addfile(info)
                            continue
                        seen[ident] = rel
                        info.size = st.st_size
                        with full.open("rb") as f:
                            tar.addfile(info, f)
                    elif os.major(st.st_rdev) == 0 and os.minor(st.st_rdev) == 0:
                        raise ImageError(f"{full}: a deletion (overlay whiteout) in a layer")
                    # other device nodes and FIFOs: the runtime provides /dev
    return (
        "sha256:" + compressed.hash.hexdigest(),
        "sha256:" + plain.hash.hexdigest(),
        compressed.size,
        plain.size,
    )


# --------------------------------------------------------------------------------------------
# Mounts and chroots (overlayfs: a layer is the upper directory of a build)
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _overlay(lowers: Sequence[Path], work: Path) -> Iterator[tuple[Path, Path]]:
    """Mount ``lowers`` (top first) with a fresh upper directory; yields (merged, upper).

    ``/proc``, ``/dev`` (bind) and a tmpfs ``/tmp`` are mounted inside for the tools that run in
    the chroot; the upper directory holds only what the build wrote.
    """
    upper, workdir, merged = work / "upper", work / "work", work / "merged"
    for d in (upper, workdir, merged):
        d.mkdir(parents=True)
    os.chmod(upper, 0o755)
    lower = ":".join(str(p) for p in lowers)
    mounts: list[Path] = []
    try:
        _run(
            [
                "mount",
                "-t",
                "overlay",
                "overlay",
                "-o",
                f"lowerdir={lower},upperdir={upper},workdir={workdir}",
                str(merged),
            ],
            "mount overlay",
        )
        mounts.append(merged)
        for target, args in (
            ("proc", ["-t", "proc", "proc"]),
            ("dev", ["--rbind", "/dev"]),
            ("tmp", ["-t", "tmpfs", "tmpfs"]),
        ):
            (merged / target).mkdir(exist_ok=True)  # a static image has no /proc (upper only)
            _run(["mount", *args, str(merged / target)], f"mount {target}")
            mounts.append(merged / target)
        yield merged, upper
    finally:
        for m in reversed(mounts):
            subprocess.run(["umount", "-R", "-l", str(m)], check=False)


def _chroot(merged: Path, argv: Sequence[str], what: str, env: dict[str, str]) -> str:
    base_env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8"}
    return _run(["chroot", str(merged), *argv], what, env={**base_env, **env}).stdout


# --------------------------------------------------------------------------------------------
# Layer builders
# --------------------------------------------------------------------------------------------


def _index_hashes() -> list[str] | None:
    """The SHA256 of each suite's ``main/binary-amd64/Packages`` (None offline)."""
    hashes = []
    for mirror, suite in MIRRORS:
        url = f"{mirror}/dists/{suite}/InRelease"
        try:
            with urllib.request.urlopen(url, timeout=15) as resp:
                text = resp.read().decode()
        except OSError:
            return None
        match = re.search(r"^ ([0-9a-f]{64})\s+\d+\s+main/binary-amd64/Packages$", text, re.M)
        if not match:
            raise ImageError(f"{url}: no main/binary-amd64/Packages checksum")
        hashes.append(match.group(1))
    return hashes


@dataclasses.dataclass
class Context:
    """What a build needs: the cache, the variant's requirement sets, the epochs."""

    cache: Path
    force: frozenset[str] = frozenset()
    built: dict[str, LayerInfo] = dataclasses.field(default_factory=dict)
    trees: dict[str, Path] = dataclasses.field(default_factory=dict)

    def folder(self, name: str, key: str) -> Path:
        return self.cache / f"{name}-{key}"


def _cached(ctx: Context, name: str, key: str) -> LayerInfo | None:
    folder = ctx.folder(name, key)
    if name in ctx.force or not (folder / "layer.json").exists():
        return None
    return LayerInfo.load(folder)


def _finish(
    ctx: Context,
    name: str,
    key: str,
    tmp: Path,
    created_by: str,
    write: Callable[[Path], tuple[str, str, int, int]],
) -> LayerInfo:
    """Write the layer of a build in ``tmp`` and move the folder into the cache."""
    digest, diff_id, size, uncompressed = write(tmp / "layer.tar.gz")
    folder = ctx.folder(name, key)
    info = LayerInfo(
        name, key, tmp / "layer.tar.gz", digest, diff_id, size, uncompressed, created_by
    )
    info.save()
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    _prune(ctx, name, keep=folder)
    log(
        f"layer {name}: {digest[:19]} ({uncompressed / 2**20:.0f} MiB, gzip {size / 2**20:.0f} MiB)"
    )
    return LayerInfo.load(folder)


def _prune(ctx: Context, name: str, keep: Path) -> None:
    """Remove the cache's older builds of layer ``name``.

    A dependency layer is ~7 GB, and each change of its inputs would otherwise leave the
    previous one behind.
    """
    for old in ctx.cache.glob(f"{name}-*"):
        if old != keep and re.fullmatch(rf"{re.escape(name)}-[0-9a-f]{{20}}", old.name):
            shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _new_tmp(ctx: Context, name: str) -> Iterator[Path]:
    """A build folder in the cache (renamed into place by :func:`_finish`; removed on failure)."""
    ctx.cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=ctx.cache))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_base(ctx: Context) -> LayerInfo:
    """Debian bookworm with Python 3.11 and the ``medseg`` user (mmdebstrap)."""
    recipe = {"suite": SUITE, "mirrors": MIRRORS, "packages": BASE_PACKAGES, "dpkg": DPKG_OPTIONS}
    recipe_key = _key("base-recipe", recipe)
    pointer = ctx.cache / f"base-latest-{recipe_key}"
    indexes = _index_hashes()
    if indexes is None:
        if not pointer.exists():
            raise ImageError("the Debian mirror is unreachable and no base image is cached")
        key = pointer.read_text().strip()
        log(f"Debian mirror unreachable: reusing the cached base {key}")
    else:
        key = _key("base", recipe, indexes)
    ctx.trees["base"] = ctx.folder("base", key) / "rootfs"
    if found := _cached(ctx, "base", key):
        return found
    _require_root()
    _ensure_debian_packages(("mmdebstrap", "mmdebstrap"))
    epoch = STABLE_EPOCH
    with _new_tmp(ctx, "base") as tmp:
        rootfs = tmp / "rootfs"
        log(f"base: mmdebstrap {SUITE} {' '.join(BASE_PACKAGES)} (a minute)")
        sources = [f"deb {mirror} {suite} main" for mirror, suite in MIRRORS]
        _run(
            [
                "mmdebstrap",
                "--mode=root",
                "--variant=essential",
                "--quiet",
                "--include=" + ",".join(BASE_PACKAGES),
                *(f"--dpkgopt={o}" for o in DPKG_OPTIONS),
                SUITE,
                str(rootfs),
                *sources,
            ],
            "mmdebstrap",
            env={**os.environ, "SOURCE_DATE_EPOCH": str(epoch)},
        )
        # What the runtime provides, or what differs from one run to the next.
        for rel in ("etc/resolv.conf", "etc/hostname", "var/cache/ldconfig/aux-cache"):
            (rootfs / rel).unlink(missing_ok=True)
        for rel in ("var/log", "var/cache/apt", "var/lib/apt/lists", "dev"):
            folder = rootfs / rel
            if folder.is_dir():
                for child in folder.iterdir():
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child)
                    else:
                        child.unlink()
        for rel in ("var/lib/dpkg/status-old", "var/lib/dpkg/diversions-old"):
            (rootfs / rel).unlink(missing_ok=True)
        with (rootfs / "etc/passwd").open("a") as f:
            f.write(f"medseg:x:{UID}:{GID}:medseg:/tmp:/usr/sbin/nologin\n")
        with (rootfs / "etc/group").open("a") as f:
            f.write(f"medseg:x:{GID}:\n")
        packages = _dpkg_list(rootfs)
        (tmp / "packages.json").write_text(json.dumps(packages, indent=1))
        info = _finish(
            ctx,
            "base",
            key,
            tmp,
            f"mmdebstrap {SUITE} {' '.join(BASE_PACKAGES)}",
            lambda out: write_layer(rootfs, out, epoch),
        )
        pointer.write_text(key)
        return info


def _dpkg_list(rootfs: Path) -> list[dict[str, str]]:
    out = _run(
        [
            "dpkg-query",
            f"--admindir={rootfs}/var/lib/dpkg",
            "-W",
            "-f",
            "${Package}\t${Version}\t${Architecture}\n",
        ],
        "dpkg-query",
    ).stdout
    rows = [line.split("\t") for line in out.splitlines() if line]
    return [{"name": n, "version": v, "arch": a} for n, v, a in sorted(rows)]


def _base_packages(ctx: Context) -> list[dict[str, str]]:
    return json.loads((ctx.trees["base"].parent / "packages.json").read_text())


def requirements(variant: str) -> str:
    """The pinned runtime set of the medseg images: the lock's versions, no dev tools.

    ``uv pip compile`` of the non-dev extras constrained to ``requirements.lock``; the CPU variant
    then drops the CUDA wheels.
    """
    lock = ROOT / "requirements.lock"
    if not lock.exists():
        raise ImageError(f"{lock}: missing (the pinned dependencies)")
    uv = ROOT / ".venv" / "bin" / "uv"
    proc = _run(
        [
            str(uv),
            "pip",
            "compile",
            "--quiet",
            "--python-version",
            "3.11",
            "--python-platform",
            "x86_64-manylinux_2_36",
            "pyproject.toml",
            "--extra",
            "serve",
            "--extra",
            "pipelines",
            "--extra",
            "train",
            "-c",
            str(lock),
            "--no-header",
            "--no-annotate",
        ],
        "uv pip compile (the image's subset of requirements.lock)",
        cwd=ROOT,
    )
    pins = _pins(proc.stdout, "uv pip compile")
    if "torch" not in pins:
        raise ImageError(f"{lock}: uv pip compile resolved no torch:\n{proc.stdout[-500:]}")
    locked = _pins(lock.read_text(), str(lock))
    for name, version in pins.items():
        if locked.get(name) != version:
            raise ImageError(
                f"{lock}: {name}=={version} resolved but the lock has {locked.get(name)}"
            )
    if variant == "cpu":
        pins = {n: v for n, v in pins.items() if not CPU_EXCLUDED.match(n)}
    return "".join(f"{n}=={v}\n" for n, v in sorted(pins.items()))


def _pins(text: str, where: str) -> dict[str, str]:
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)(\[[^\]]*\])?==([^\s;]+)(\s*;.*)?", line)
        if not match:
            raise ImageError(f"{where}: not a pinned requirement: {line!r}")
        pins[re.sub(r"[-_.]+", "-", match.group(1)).lower()] = match.group(3)
    return pins


def _compile(merged: Path, python: str, folders: Sequence[str]) -> None:
    """Byte-compile ``folders`` inside the chroot: unchecked-hash ``.pyc`` files.

    Hash-based (not timestamp) ``.pyc`` files do not depend on mtimes, so they are reproducible
    and stay valid after the layer clamps the mtimes; unchecked, as nothing in an image changes.
    """
    # compile_dir's result is ignored: wheels ship files for other Python versions (torch's
    # py312 test helpers) that do not compile on 3.11 and are never imported there. force: a
    # module imported at start-up (a .pth's _distutils_hack) already has a timestamp .pyc, which
    # compileall would otherwise keep (it embeds the extraction time).
    code = (
        "import compileall, py_compile, sys\n"
        "for d in sys.argv[1:]:\n"
        "    compileall.compile_dir(d, quiet=2, workers=0, force=True,\n"
        "        invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)\n"
    )
    _chroot(merged, [python, "-c", code, *folders], "compileall", {"PYTHONDONTWRITEBYTECODE": "1"})


def _uv_install(merged: Path, python: str, args: Sequence[str], what: str) -> None:
    """``uv pip install`` inside the chroot, with the host's uv and its (warm) cache."""
    uv = ROOT / ".venv" / "bin" / "uv"
    shutil.copy2(uv, merged / "tmp" / "uv")
    cache = Path(os.environ.get("UV_CACHE_DIR", Path.home() / ".cache" / "uv"))
    cache.mkdir(parents=True, exist_ok=True)
    (merged / "tmp" / "uv-cache").mkdir()
    _run(["mount", "--bind", str(cache), str(merged / "tmp" / "uv-cache")], "mount uv cache")
    resolv = merged / "tmp" / "resolv.conf"
    # The host's trust store (it may hold a proxy's CA) reaches uv through the tmpfs only: it
    # never lands in a layer, which keeps Debian's ca-certificates.
    host_ca = Path(os.environ.get("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt"))
    if host_ca.is_file():
        shutil.copyfile(host_ca, merged / "tmp" / "host-ca.crt")
    proxies = {k: v for k, v in os.environ.items() if k.lower().endswith("_proxy")}
    try:
        shutil.copy2("/etc/resolv.conf", resolv)
        (merged / "etc" / "resolv.conf").touch()
        _run(
            ["mount", "--bind", str(resolv), str(merged / "etc" / "resolv.conf")],
            "mount resolv.conf",
        )
        try:
            _chroot(
                merged,
                [
                    "/tmp/uv",
                    "pip",
                    "install",
                    "--quiet",
                    "--python",
                    python,
                    "--no-deps",
                    "--link-mode=copy",
                    *args,
                ],
                what,
                {
                    "UV_CACHE_DIR": "/tmp/uv-cache",
                    "SOURCE_DATE_EPOCH": "0",
                    "UV_NO_PROGRESS": "1",
                    "PYTHONDONTWRITEBYTECODE": "1",  # only _compile writes .pyc files
                    "SSL_CERT_FILE": "/tmp/host-ca.crt",
                    **proxies,
                },
            )
        finally:
            subprocess.run(["umount", str(merged / "etc" / "resolv.conf")], check=False)
            (merged / "etc" / "resolv.conf").unlink(missing_ok=True)
    finally:
        subprocess.run(["umount", str(merged / "tmp" / "uv-cache")], check=False)


def _venv_layer(
    ctx: Context, name: str, venv: str, reqs: str, lowers: Sequence[str], smoke: str
) -> LayerInfo:
    """A virtual environment at ``venv`` with exactly the pinned ``reqs`` (``--no-deps``).

    ``smoke`` (Python code) runs in the result as uid 1000: a wheel set that cannot import its
    main package fails the build, not the pod.
    """
    key = _key(name, venv, reqs, smoke, PYC_MODE, [ctx.built[n].key for n in lowers])
    ctx.trees[name] = ctx.folder(name, key) / "upper"
    if found := _cached(ctx, name, key):
        return found
    _require_root()
    epoch = STABLE_EPOCH
    with _new_tmp(ctx, name) as tmp:
        count = len(re.findall(r"^[A-Za-z0-9._-]+==", reqs, re.M))
        log(f"{name}: installing {count} pinned wheels into {venv} (minutes, once)")
        with _overlay([ctx.trees[n] for n in reversed(lowers)], tmp) as (merged, upper):
            _chroot(
                merged,
                ["/usr/bin/python3.11", "-m", "venv", "--without-pip", venv],
                "venv",
                {"PYTHONDONTWRITEBYTECODE": "1"},
            )
            (merged / "tmp" / "req.txt").write_text(reqs)
            _uv_install(
                merged, f"{venv}/bin/python", ["-r", "/tmp/req.txt"], f"{name}: uv pip install"
            )
            _compile(merged, f"{venv}/bin/python", [f"{venv}/lib"])
            _run(
                [
                    "chroot",
                    f"--userspec={UID}:{GID}",
                    str(merged),
                    f"{venv}/bin/python",
                    "-c",
                    smoke,
                ],
                f"{name}: the smoke test ({smoke})",
                env={"PATH": os.environ["PATH"], "HOME": "/tmp", "PYTHONDONTWRITEBYTECODE": "1"},
            )
        for leftover in ("merged", "work"):
            shutil.rmtree(tmp / leftover)
        (upper / venv.lstrip("/") / ".lock").unlink(missing_ok=True)
        return _finish(
            ctx,
            name,
            key,
            tmp,
            f"uv pip install --no-deps ({reqs.count(chr(10))} pins) into {venv}",
            lambda out: write_layer(upper, out, epoch, include=[venv.lstrip("/")]),
        )


def _source_files() -> list[str]:
    out = _run(
        ["git", "ls-files", "-co", "--exclude-standard", "--", *SOURCES], "git ls-files", cwd=ROOT
    ).stdout
    return sorted(p for p in out.splitlines() if (ROOT / p).is_file())


def _source_hash(files: Sequence[str]) -> str:
    h = hashlib.sha256()
    for rel in files:
        h.update(rel.encode() + b"\0" + (ROOT / rel).read_bytes() + b"\0")
    return h.hexdigest()


def _python_packages(*sites: Path) -> list[dict[str, str]]:
    """Name and version of every distribution installed in the ``site-packages`` folders."""
    found = {}
    for site in sites:
        for meta in site.glob("*.dist-info/METADATA"):
            fields = dict(
                re.findall(r"^(Name|Version): (.+)$", meta.read_text(errors="replace"), re.M)
            )
            found[fields["Name"].lower()] = fields["Version"]
    return [{"name": n, "version": v} for n, v in sorted(found.items())]


def sbom(
    name: str,
    debs: Sequence[dict[str, str]],
    pythons: Sequence[dict[str, str]],
    others: Sequence[dict[str, str]] = (),
    epoch: int = 0,
) -> bytes:
    """A CycloneDX 1.5 JSON SBOM of the Debian, Python and other (Go) components of an image."""
    components = (
        [
            {
                "type": "library",
                "name": d["name"],
                "version": d["version"],
                "purl": f"pkg:deb/debian/{d['name']}@{d['version']}"
                f"?arch={d['arch']}&distro=debian-12",
            }
            for d in debs
        ]
        + [
            {
                "type": "library",
                "name": p["name"],
                "version": p["version"],
                "purl": f"pkg:pypi/{p['name']}@{p['version']}",
            }
            for p in pythons
        ]
        + [dict(o) for o in others]
    )
    body = {
        "bomFormat": "CycloneDX",
        "specVersion": "1.5",
        "version": 1,
        "metadata": {"timestamp": _iso(epoch), "component": {"type": "container", "name": name}},
        "components": components,
    }
    serial = uuid.UUID(_sha256(json.dumps(body, sort_keys=True).encode())[:32])
    return json.dumps({**body, "serialNumber": f"urn:uuid:{serial}"}, indent=1).encode() + b"\n"


def _build_wheel(files: Sequence[str], dest: Path) -> Path:
    """A wheel of medseg from exactly the source files (a clean copy: no stale build state)."""
    src = dest / "src"
    for rel in files:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, src / rel)
    _run(
        [
            str(ROOT / ".venv" / "bin" / "python"),
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(dest / "dist"),
            str(src),
        ],
        "building the medseg wheel",
        env={**os.environ, "SOURCE_DATE_EPOCH": "315532800"},
    )
    (wheel,) = (dest / "dist").glob("medseg-*.whl")
    return wheel


def _drop_uv_cache_info(upper: Path) -> None:
    """Remove uv's ``uv_cache.json`` (a build timestamp) from the installed dist-info folders.

    uv writes it for a local wheel to know when to reinstall; it has no use in an image and it
    would make every build different. Its line in ``RECORD`` goes too.
    """
    for info in upper.glob("opt/*/lib/python3.11/site-packages/*.dist-info/uv_cache.json"):
        info.unlink()
        record = info.parent / "RECORD"
        lines = record.read_text().splitlines(keepends=True)
        record.write_text(
            "".join(x for x in lines if not x.startswith(f"{info.parent.name}/uv_cache.json,"))
        )


def _code_layer(ctx: Context, name: str, lowers: Sequence[str]) -> LayerInfo:
    """The code layer: medseg (``--no-deps``) into the venv, and the image's SBOM."""
    files = _source_files()
    epoch = _git_epoch()
    key = _key(name, _source_hash(files), epoch, BUILDER, [ctx.built[n].key for n in lowers])
    if found := _cached(ctx, name, key):
        return found
    _require_root()
    with _new_tmp(ctx, name) as tmp:
        wheel = _build_wheel(files, tmp / "wheel")
        with _overlay([ctx.trees[n] for n in reversed(lowers)], tmp / "ovl") as (merged, upper):
            shutil.copy2(wheel, merged / "tmp" / wheel.name)
            _uv_install(
                merged,
                f"{VENV}/bin/python",
                ["--offline", f"/tmp/{wheel.name}"],
                f"{name}: uv pip install medseg",
            )
            site = f"{VENV}/lib/python3.11/site-packages"
            _compile(merged, f"{VENV}/bin/python", [f"{site}/{p}" for p in PACKAGES])
            pythons = _python_packages(merged / site.lstrip("/"))
        doc = sbom("medseg", _base_packages(ctx), pythons, epoch=epoch)
        _drop_uv_cache_info(upper)
        for leftover in ("merged", "work"):
            shutil.rmtree(tmp / "ovl" / leftover)
        return _finish(
            ctx,
            name,
            key,
            tmp,
            "uv pip install --no-deps medseg; SBOM",
            lambda out: _write_code(upper, out, epoch, [VENV.lstrip("/")], doc),
        )


def _write_code(
    upper: Path, out: Path, epoch: int, include: list[str], doc: bytes
) -> tuple[str, str, int, int]:
    for rel in ("usr", "usr/share", "usr/share/medseg"):
        (upper / rel).mkdir(exist_ok=True)
        os.chmod(upper / rel, 0o755)
    (upper / SBOM_PATH).write_bytes(doc)
    os.chmod(upper / SBOM_PATH, 0o644)
    return write_layer(upper, out, epoch, include=[*include, "usr/share/medseg"])


def _storage_layers(ctx: Context) -> None:
    """The storage initializer's venv (its own hashed lock) and its entrypoint with the SBOM."""
    if not STORAGE_LOCK.exists():
        raise ImageError(f"{STORAGE_LOCK}: missing (uv pip compile images/storage-initializer.in)")
    lock = STORAGE_LOCK.read_text()
    if not re.search(rf"^kserve-storage=={KSERVE_STORAGE_VERSION.lstrip('v')} ", lock, re.M):
        raise ImageError(f"{STORAGE_LOCK}: does not pin kserve-storage {KSERVE_STORAGE_VERSION}")
    ctx.built["storage-venv"] = _venv_layer(
        ctx, "storage-venv", STORAGE_VENV, lock, ["base"], "import kserve_storage, boto3"
    )
    script = STORAGE_ENTRYPOINT.read_bytes()
    epoch = STABLE_EPOCH  # keyed on the script and the venv: no need for the commit time
    site = ctx.trees["storage-venv"] / STORAGE_VENV.lstrip("/") / "lib/python3.11/site-packages"
    key = _key("storage-code", _sha256(script), epoch, BUILDER, ctx.built["storage-venv"].key)
    if found := _cached(ctx, "storage-code", key):
        ctx.built["storage-code"] = found
        return
    doc = sbom(
        "kserve-storage-initializer", _base_packages(ctx), _python_packages(site), epoch=epoch
    )
    with _new_tmp(ctx, "storage-code") as tmp:
        tree = _files_tree(
            tmp / "tree", {ENTRYPOINT_PATH: (script, 0o755), SBOM_PATH: (doc, 0o644)}
        )
        ctx.built["storage-code"] = _finish(
            ctx,
            "storage-code",
            key,
            tmp,
            "initializer-entrypoint; SBOM",
            lambda out: write_layer(tree, out, epoch),
        )


#: Where the storage initializer's entrypoint lives (upstream's path).
ENTRYPOINT_PATH = "storage-initializer/scripts/initializer-entrypoint"


def _files_tree(
    root: Path, files: dict[str, tuple[bytes, int]], links: dict[str, str] | None = None
) -> Path:
    """A tree of ``files`` (relative path to (content, mode)) and symlinks, directories 0755."""
    for rel, (content, mode) in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        os.chmod(path, mode)
    for rel, target in (links or {}).items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, root / rel)
    for folder in [root, *(p for p in root.rglob("*") if p.is_dir() and not p.is_symlink())]:
        os.chmod(folder, 0o755)
    return root


def go_tool(name: str, module: str, version: str) -> Path:
    """A static build (CGO off) of a Go command, cached in ``~/.cache/medseg/tools``.

    Built once with ``go install`` at low priority (two packages at a time on small machines).
    """
    folder = TOOLS_CACHE / f"{name}-{version}-static"
    binary = folder / name
    if not binary.exists():
        if not shutil.which("go"):
            raise ImageError(f"Go is needed to build {module}@{version} (none on PATH)")
        log(f"building {module}@{version} (static; go install, minutes, once)")
        tmp = Path(f"{folder}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        env = {
            **os.environ,
            "GOBIN": str(tmp),
            "CGO_ENABLED": "0",
            "GOFLAGS": "-p=2 -buildvcs=false -trimpath",
        }
        _run(
            ["nice", "-n", "19", "go", "install", f"{module}@{version}"],
            f"go install {module}",
            env=env,
        )
        tmp.rename(folder)
    with binary.open("rb") as f:
        if b"/ld-linux" in f.read(4096):  # the ELF interpreter: dynamically linked
            raise ImageError(f"{binary}: not a static binary")
    return binary


def _users() -> dict[str, tuple[bytes, int]]:
    """``/etc/passwd`` and ``/etc/group`` of the small images: root and the ``medseg`` user."""
    return {
        "etc/passwd": (
            f"root:x:0:0:root:/root:/sbin/nologin\nmedseg:x:{UID}:{GID}:medseg:/tmp:/sbin/nologin\n".encode(),
            0o644,
        ),
        "etc/group": (f"root:x:0:\nmedseg:x:{GID}:\n".encode(), 0o644),
    }


def _busybox() -> tuple[dict[str, tuple[bytes, int]], dict[str, str], dict[str, str]]:
    """Debian's static busybox: its file, a link per applet (``sh``, ``sleep`` …), SBOM entry."""
    version = busybox_version()
    binary = Path(shutil.which("busybox") or "/bin/busybox")
    applets = set(_run([str(binary), "--list"], "busybox --list").stdout.split()) - {"busybox"}
    component = {
        "type": "application",
        "name": BUSYBOX_PACKAGE,
        "version": version,
        "purl": f"pkg:deb/debian/{BUSYBOX_PACKAGE}@{version}?arch=amd64&distro=debian-12",
    }
    links = {f"bin/{applet}": "busybox" for applet in sorted(applets)}
    return {"bin/busybox": (binary.read_bytes(), 0o755)}, links, component


def _static_layer(ctx: Context, name: str, module: str, version: str, shell: bool) -> None:
    """One layer: a static Go binary, the ``medseg`` user, CA certificates (and busybox)."""
    binary = go_tool(name, module, version)
    files = {
        f"usr/bin/{name}": (binary.read_bytes(), 0o755),
        **_users(),
        "etc/ssl/certs/ca-certificates.crt": (
            (ctx.trees["base"] / "etc/ssl/certs/ca-certificates.crt").read_bytes(),
            0o644,
        ),
    }
    links: dict[str, str] = {}
    others = [
        {
            "type": "application",
            "name": module,
            "version": version,
            "purl": f"pkg:golang/{module}@{version}",
        }
    ]
    if shell:
        busybox, links, component = _busybox()
        files |= busybox
        others.append(component)
    _files_layer(ctx, name, files, links, others, f"go install {module}@{version} (CGO off)")


def _busybox_layer(ctx: Context) -> None:
    """The busybox image's one layer: busybox, its applets and the ``medseg`` user."""
    files, links, component = _busybox()
    _files_layer(ctx, "busybox", files | _users(), links, [component], f"{BUSYBOX_PACKAGE}")


def _files_layer(
    ctx: Context,
    name: str,
    files: dict[str, tuple[bytes, int]],
    links: dict[str, str],
    others: list[dict[str, str]],
    created_by: str,
) -> None:
    """A layer of given files and links, plus ``/tmp`` (1777), ``/data`` (the user's), an SBOM."""
    _require_root()
    epoch = STABLE_EPOCH  # keyed on the files: no need for the commit time
    content = _sha256(
        json.dumps({k: _sha256(v[0]) for k, v in files.items()}, sort_keys=True).encode()
    )
    key = _key(name, content, links, epoch, BUILDER)
    if found := _cached(ctx, name, key):
        ctx.built[name] = found
        return
    files = {**files, SBOM_PATH: (sbom(name, [], [], others, epoch), 0o644)}
    with _new_tmp(ctx, name) as tmp:
        tree = _files_tree(tmp / "tree", files, links)
        (tree / "tmp").mkdir()
        os.chmod(tree / "tmp", 0o1777)  # usable whatever the uid (the chart mounts an emptyDir)
        (tree / "data").mkdir()
        os.chown(tree / "data", UID, GID)
        ctx.built[name] = _finish(
            ctx, name, key, tmp, created_by, lambda out: write_layer(tree, out, epoch)
        )


# --------------------------------------------------------------------------------------------
# Images and archives
# --------------------------------------------------------------------------------------------


def _config(image: ImageDef, layers: Sequence[LayerInfo], epoch: int, revision: str) -> bytes:
    from medseg import __version__

    version = __version__ if image.name.startswith("medseg") else image.tag
    labels = {
        "org.opencontainers.image.title": image.title,
        "org.opencontainers.image.description": image.description,
        "org.opencontainers.image.source": SOURCE_URL,
        "org.opencontainers.image.revision": revision,
        "org.opencontainers.image.version": version,
        "org.opencontainers.image.created": _iso(epoch),
        "org.opencontainers.image.licenses": "Apache-2.0",
    }
    config: dict[str, Any] = {
        "User": f"{UID}:{GID}",
        "Env": [f"{k}={v}" for k, v in image.env],
        "Entrypoint": list(image.entrypoint) or None,
        "Cmd": list(image.cmd) or None,
        "WorkingDir": image.workdir,
        "Labels": labels,
    }
    if image.ports:
        config["ExposedPorts"] = {f"{p}/tcp": {} for p in image.ports}
    body = {
        "created": _iso(epoch),
        "architecture": "amd64",
        "os": "linux",
        "config": {k: v for k, v in config.items() if v is not None},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        # No build times in the history: the image's fixed time (umoci 0.4 stat dereferences it).
        "history": [
            {"created": _iso(epoch), "created_by": f"medseg images: {layer.created_by}"}
            for layer in layers
        ],
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


@dataclasses.dataclass(frozen=True)
class Built:
    """An image written to an archive."""

    name: str
    ref: str
    archive: Path
    sbom: Path
    digest: str
    config_digest: str
    layers: tuple[str, ...]
    size: int
    compressed: int
    trees: tuple[Path, ...]
    config: bytes
    manifest: bytes
    layer_paths: tuple[Path, ...]

    def as_json(self) -> dict[str, Any]:
        fields = {**dataclasses.asdict(self), "archive": self.archive.name, "sbom": self.sbom.name}
        for local in ("trees", "config", "manifest", "layer_paths"):  # the cache's, not shipped
            del fields[local]
        return fields


def _tar_member(
    tar: tarfile.TarFile, name: str, epoch: int, data: bytes | None = None, path: Path | None = None
) -> None:
    info = tarfile.TarInfo(name)
    info.mtime, info.uname, info.gname = epoch, "", ""
    if data is None and path is None:
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(info)
        return
    info.mode = 0o644
    if path is not None:
        info.size = path.stat().st_size
        with path.open("rb") as f:
            tar.addfile(info, f)
    else:
        assert data is not None
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def write_archive(
    image: ImageDef,
    layers: Sequence[LayerInfo],
    out_dir: Path,
    epoch: int,
    revision: str,
    write: bool = True,
) -> Built:
    """The OCI layout + ``manifest.json`` archive of ``image`` (skipped when already written).

    Args:
        image: The declaration.
        layers: Its built layers, bottom first.
        out_dir: Where the archive goes.
        epoch: ``created`` (the commit time).
        revision: The git commit (the revision label).
        write: False: only compute the digests (nothing is written).

    Returns:
        What was written (the manifest's digest is the image's digest).
    """
    config = _config(image, layers, epoch, revision)
    config_digest = "sha256:" + _sha256(config)
    annotations = {
        "org.opencontainers.image.created": _iso(epoch),
        "org.opencontainers.image.revision": revision,
        "org.opencontainers.image.source": SOURCE_URL,
        "org.opencontainers.image.title": image.title,
    }
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_MANIFEST,
            "config": {"mediaType": MEDIA_CONFIG, "digest": config_digest, "size": len(config)},
            "layers": [
                {"mediaType": MEDIA_LAYER, "digest": layer.digest, "size": layer.size}
                for layer in layers
            ],
            "annotations": annotations,
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    digest = "sha256:" + _sha256(manifest)
    archive = out_dir / image.archive
    meta_path = archive.with_suffix(".json")
    sbom_path = out_dir / f"{image.name}-{image.tag}.sbom.json"
    built = Built(
        image.name,
        image.ref,
        archive,
        sbom_path,
        digest,
        config_digest,
        tuple(layer.digest for layer in layers),
        sum(layer.uncompressed for layer in layers),
        sum(layer.size for layer in layers) + len(config) + len(manifest),
        tuple(layer.tree for layer in layers),
        config,
        manifest,
        tuple(layer.path for layer in layers),
    )
    if not write:
        return built
    written = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if archive.exists() and sbom_path.exists() and written.get("digest") == digest:
        return built
    out_dir.mkdir(parents=True, exist_ok=True)
    write_layout(archive, [built], epoch)
    shutil.copyfile(layers[-1].tree / SBOM_PATH, sbom_path)
    meta_path.write_text(json.dumps(built.as_json(), indent=1))
    return built


def write_layout(archive: Path, built: Sequence[Built], epoch: int) -> None:
    """One OCI image layout tar holding ``built`` (blobs shared), plus Docker's ``manifest.json``.

    ``index.json`` names each image's full reference in ``org.opencontainers.image.ref.name``
    and ``io.containerd.image.name``; ``manifest.json`` lists the same images with ``RepoTags``.
    """
    index = {
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [
            {
                "mediaType": MEDIA_MANIFEST,
                "digest": b.digest,
                "size": len(b.manifest),
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {
                    "org.opencontainers.image.ref.name": b.ref,
                    "io.containerd.image.name": b.ref,
                },
            }
            for b in built
        ],
    }
    docker = [
        {
            "Config": f"blobs/sha256/{b.config_digest[7:]}",
            "RepoTags": [b.ref],
            "Layers": [f"blobs/sha256/{d[7:]}" for d in b.layers],
        }
        for b in built
    ]
    blobs: dict[str, tuple[bytes | None, Path | None]] = {}
    for b in built:
        blobs[b.config_digest] = (b.config, None)
        blobs[b.digest] = (b.manifest, None)
        blobs.update({d: (None, path) for d, path in zip(b.layers, b.layer_paths, strict=True)})
    tmp = archive.with_name(f".{archive.name}.tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        _tar_member(tar, "blobs", epoch)
        _tar_member(tar, "blobs/sha256", epoch)
        for blob in sorted(blobs):
            data, path = blobs[blob]
            _tar_member(tar, f"blobs/sha256/{blob[7:]}", epoch, data, path)
        _tar_member(tar, "index.json", epoch, json.dumps(index, sort_keys=True).encode())
        _tar_member(tar, "manifest.json", epoch, json.dumps(docker).encode())
        _tar_member(tar, "oci-layout", epoch, b'{"imageLayoutVersion":"1.0.0"}')
    tmp.rename(archive)


def build(
    names: Sequence[str] = (),
    variant: str = "cpu",
    cache: Path = CACHE,
    out_dir: Path = OUT,
    force: Sequence[str] = (),
    write: bool = True,
) -> list[Built]:
    """Build the layers (cached) and write the archives of ``names`` (all when empty).

    Args:
        names: Image names (see ``list``); empty: every image of the variant.
        variant: ``cpu`` or ``cuda`` (the medseg images).
        cache: The layer cache.
        out_dir: Where the archives go.
        force: Layer names to rebuild even when cached (the reproducibility test).
        write: False: the layers only, no archive.

    Returns:
        The images written.
    """
    defs = images(variant)
    unknown = [n for n in names if n not in defs]
    if unknown:
        raise ImageError(f"unknown image {', '.join(unknown)} (one of {', '.join(defs)})")
    chosen = [defs[n] for n in (names or defs)]
    ctx = Context(cache=cache, force=frozenset(force))
    needed = {layer for d in chosen for layer in d.layers}
    versions = _setup_versions()
    if needed - {"busybox"}:
        ctx.built["base"] = build_base(ctx)
    for v in ("cpu", "cuda"):
        if f"deps-{v}" in needed:
            ctx.built[f"deps-{v}"] = _venv_layer(
                ctx, f"deps-{v}", VENV, requirements(v), ["base"], TORCH_SMOKE
            )
        if f"code-{v}" in needed:
            ctx.built[f"code-{v}"] = _code_layer(ctx, f"code-{v}", ["base", f"deps-{v}"])
    if needed & {"storage-venv", "storage-code"}:
        _storage_layers(ctx)
    if "minio" in needed:
        _static_layer(
            ctx, "minio", "github.com/minio/minio", versions["MINIO_VERSION"], shell=False
        )
    if "mc" in needed:
        _static_layer(ctx, "mc", "github.com/minio/mc", versions["MC_VERSION"], shell=True)
    if "busybox" in needed:
        _busybox_layer(ctx)
    epoch, revision = _git_epoch(), _git_revision()
    return [
        write_archive(d, [ctx.built[n] for n in d.layers], out_dir, epoch, revision, write)
        for d in chosen
    ]


def run(
    built: Built,
    argv: Sequence[str],
    env: dict[str, str] | None = None,
    binds: dict[str, Path] | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in an image's file system as its user (chroot into an overlay of its layers).

    No container runtime: the same files, user and environment, not the isolation. For tests.

    Args:
        built: The image (its layers' files in the cache).
        argv: The command (the image's entrypoint is not prepended).
        env: Extra environment (over the image's).
        binds: Host folders to bind into the image (path in the image to host path).
        timeout: Seconds.

    Returns:
        The finished process (output as text).
    """
    _require_root()
    image_env = dict(next(d for d in images(_variant(built)).values() if d.ref == built.ref).env)
    chroot = shutil.which("chroot") or "/usr/sbin/chroot"
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="medseg-run-")))
        merged, _upper = stack.enter_context(_overlay(list(reversed(built.trees)), work))
        if True:
            mounted = []
            try:
                for inside, host in (binds or {}).items():
                    target = merged / inside.lstrip("/")
                    target.mkdir(parents=True, exist_ok=True)
                    _run(["mount", "--bind", str(host), str(target)], f"mount {inside}")
                    mounted.append(target)
                return subprocess.run(
                    [chroot, f"--userspec={UID}:{GID}", str(merged), *argv],
                    env={**image_env, **(env or {})},  # the image's PATH: chroot by its path
                    text=True,
                    capture_output=True,
                    timeout=timeout,
                    cwd="/",
                )
            finally:
                for target in reversed(mounted):
                    subprocess.run(["umount", "-l", str(target)], check=False)


def _variant(built: Built) -> str:
    return "cuda" if built.ref.endswith("-cuda") else "cpu"


# --------------------------------------------------------------------------------------------
# The air-gapped bundle
# --------------------------------------------------------------------------------------------


def bundle_values(built: Sequence[Built]) -> dict[str, Any]:
    """Chart values that point every image of the chart at the bundled references."""
    refs = {b.name: b.ref.rsplit(":", 1) for b in built}

    def image(name: str) -> dict[str, str]:
        repository, tag = refs[name]
        return {"repository": repository, "tag": tag, "pullPolicy": "IfNotPresent"}

    mc = image("mc")
    del mc["pullPolicy"]  # the chart's mcImage has no pull policy
    return {
        "image": image("medseg"),
        "serverImage": image("medseg-server"),
        "minio": {"image": image("minio"), "mcImage": mc},
    }


def bundle(out: Path = BUNDLE, cache: Path = CACHE) -> Path:
    """The air-gapped bundle: one archive of every image, SBOMs, the chart, values, SHA256SUMS."""
    built = build(cache=cache)
    helm = shutil.which("helm") or str(ROOT / ".tools" / "bin" / "helm")
    if not Path(helm).exists():
        raise ImageError("helm is needed to package the chart (make setup puts it in .tools/bin)")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    _run([helm, "package", str(ROOT / "charts" / "medseg"), "-d", str(out)], "helm package")
    # One layout for every image: the medseg images' shared layers are stored once.
    from medseg import __version__

    write_layout(out / f"medseg-images-{__version__}.oci.tar", built, _git_epoch())
    for b in built:
        shutil.copyfile(b.sbom, out / b.sbom.name)
    (out / "values-bundle.yaml").write_text(
        "# The chart's images as loaded from this bundle (docs/install.md, Air-gapped install).\n"
        + yaml.safe_dump(bundle_values(built), sort_keys=False)
    )
    (out / "images.json").write_text(json.dumps([b.as_json() for b in built], indent=1))
    sums = []
    for path in sorted(out.iterdir()):
        if path.name != "SHA256SUMS":
            h = hashlib.sha256()
            with path.open("rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            sums.append(f"{h.hexdigest()}  {path.name}\n")
    (out / "SHA256SUMS").write_text("".join(sums))
    log(f"bundle: {out}")
    return out


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _table(built: Sequence[Built]) -> str:
    rows = [f"{'image':<62} {'digest':<19} {'size':>9} {'gzip':>9}"]
    for b in built:
        rows.append(
            f"{b.ref:<62} {b.digest[:19]} {b.size / 2**20:>6.0f} MiB"
            f" {b.compressed / 2**20:>5.0f} MiB"
        )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    """``build``, ``bundle`` or ``list``; exit 1 with one line on an error."""
    parser = argparse.ArgumentParser(prog="scripts/images.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_build = sub.add_parser("build", help="build the images' archives into .medseg/images")
    p_build.add_argument("names", nargs="*", help="images to build (default: all)")
    p_build.add_argument(
        "--variant", choices=("cpu", "cuda"), default=os.environ.get("VARIANT", "cpu")
    )
    sub.add_parser("bundle", help="the air-gapped bundle in .medseg/bundle")
    p_list = sub.add_parser("list", help="the declared images")
    p_list.add_argument("--variant", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        if args.command == "list":
            for d in images(args.variant).values():
                print(f"{d.name:<28} {d.ref}  layers: {' '.join(d.layers)}")
            return 0
        if args.command == "build":
            built = build(args.names, args.variant)
            print(_table(built))
        else:
            print(bundle())
    except ImageError as exc:
        print(f"images: error: {exc}", file=sys.stderr)
        return 1
    log(f"done in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
