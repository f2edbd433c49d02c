#!/usr/bin/env bash
# Builds (once) and links the binaries of the local control plane into .tools/bin:
# kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, and the real node's kubelet and
# kube-proxy (k8s.io/kubernetes), the KServe manager, the Training Operator, kwok, CoreDNS and
# metrics-server, all from the Go module proxy at pinned versions, plus the CRDs and configuration
# those modules ship. Each part is cached in ~/.cache/medseg/tools/<name>-<version>/
# like MinIO in scripts/setup.sh, so a second run only re-links.
#
# Go builds run under `nice -n 19` with GOFLAGS=-p=2 (the machines are shared); each cold build time is
# printed and appended to ~/.cache/medseg/tools/build-times.log.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=scripts/cluster/versions.sh
source scripts/cluster/versions.sh

CACHE=${MEDSEG_TOOLS_CACHE:-$HOME/.cache/medseg/tools}
export GOFLAGS="-buildvcs=false -p=${MEDSEG_GO_PARALLEL:-2}"
export GOTOOLCHAIN=local
NICE=(nice -n 19)
log() { printf '\033[1mcluster-build:\033[0m %s\n' "$*" >&2; }
die() { printf 'cluster-build: %s\n' "$*" >&2; exit 1; }
command -v go >/dev/null || die "Go (>= 1.26) is needed to build the control plane"

mkdir -p .tools/bin "$CACHE"
# One build at a time per cache (two worktrees running `make cluster` must not race).
exec 9>"$CACHE/.cluster-build.lock"
flock 9

# timed NAME CMD...: runs CMD, logs how long it took (cold builds only reach this).
timed() {
  local name=$1 start end
  shift
  start=$(date +%s)
  "$@"
  end=$(date +%s)
  log "$name built in $((end - start)) s"
  printf '%s %s %ss\n' "$(date -u +%FT%TZ)" "$name" "$((end - start))" >> "$CACHE/build-times.log"
}

# module_dir MODULE VERSION: downloads a module and prints its (read-only) directory.
module_dir() {
  go mod download -json "$1@$2" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p'
}

# writable_copy MODULE VERSION: a writable copy of the module (its own replace directives apply),
# at a fixed path so that Go's build cache serves a rebuild.
writable_copy() {
  local src dst=$CACHE/.src/${1//\//_}@$2
  src=$(module_dir "$1" "$2")
  [ -n "$src" ] || die "could not download $1@$2"
  rm -rf "$dst" && mkdir -p "$dst"
  cp -r "$src/." "$dst/"
  chmod -R u+w "$dst"
  echo "$dst"
}

# --- Kubernetes: kube-apiserver, kube-controller-manager, kube-scheduler, kubectl --------------
kube_ldflags() {
  local v=$KUBE_VERSION minor
  minor=${v#v1.}
  minor=${minor%%.*}
  local flags="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    flags+=" -X $pkg.gitVersion=$v -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    flags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  echo "$flags"
}

# The commands built from k8s.io/kubernetes (each needs its packages' dependencies in the module).
KUBE_CMDS=(kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy)

# k8s.io/kubernetes replaces its staging modules with local paths, which `go install` refuses: build
# in a throwaway module that requires it and replaces each staging module by the published release.
# `.ready` lists the commands already added with `go get` (an empty one, from before the list was
# kept, stands for the first four); a command missing from it is added, the rest stays warm.
kube_module() {
  local work=$CACHE/.kube-build-$KUBE_VERSION staging_version="v0${KUBE_VERSION#v1}"
  if [ ! -f "$work/.ready" ]; then
    mkdir -p "$work"
    local gomod
    gomod=$(go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | sed -n 's/^\t"GoMod": "\(.*\)",$/\1/p')
    [ -n "$gomod" ] || die "could not download k8s.io/kubernetes@$KUBE_VERSION"
    {
      echo "module medseg.local/kube-build"
      echo
      echo "go 1.22"
      echo
      echo "require k8s.io/kubernetes $KUBE_VERSION"
      echo
      grep -E '^\s*k8s\.io/[^ ]+ => \./staging/' "$gomod" \
        | awk -v v="$staging_version" '{print "replace " $1 " => " $1 " " v}'
    } > "$work/go.mod"
  elif [ ! -s "$work/.ready" ]; then
    printf '%s\n' "${KUBE_CMDS[@]:0:4}" > "$work/.ready"
  fi
  local missing=() cmd
  for cmd in "${KUBE_CMDS[@]}"; do
    grep -qx "$cmd" "$work/.ready" 2>/dev/null || missing+=("k8s.io/kubernetes/cmd/$cmd@$KUBE_VERSION")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    (cd "$work" && "${NICE[@]}" go get "${missing[@]}" >&2)
    printf '%s\n' "${KUBE_CMDS[@]}" > "$work/.ready"
  fi
  echo "$work"
}

build_kube() {
  local name=$1 pkg=$2 dir=$CACHE/$1-$KUBE_VERSION work
  if [ ! -x "$dir/$name" ]; then
    work=$(kube_module)
    log "building $name $KUBE_VERSION (once)"
    mkdir -p "$dir.tmp"
    (cd "$work" && timed "$name-$KUBE_VERSION" "${NICE[@]}" go build -mod=mod \
      -ldflags "$(kube_ldflags)" -o "$dir.tmp/$name" "$pkg")
    rm -rf "$dir" && mv "$dir.tmp" "$dir"
  fi
  ln -sfn "$dir/$name" ".tools/bin/$name"
}

# --- controllers and kwok, each from a writable copy of its module ----------------------------
# The controllers' admission webhook servers bind every address (controller-runtime's default, no
# flag to change it); one line in their main.go binds them to 127.0.0.1 instead.
loopback_webhooks() {
  local main=$1/main.go
  sed -i 's|webhook.NewServer(webhook.Options{|webhook.NewServer(webhook.Options{Host: "127.0.0.1", |' "$main"
  grep -q 'Options{Host: "127.0.0.1"' "$main" || die "could not bind the webhook server in $main to 127.0.0.1"
}

# build_module NAME MODULE VERSION PACKAGE PATCH [DATA-PATH...]: builds PACKAGE (relative to the
# module root, after running PATCH on its directory, or `:`) into the cache as NAME and copies
# the listed data paths (CRDs, configs) next to it. A patched build has its own cache key.
build_module() {
  local name=$1 module=$2 version=$3 pkg=$4 patch=$5 dir=$CACHE/$1-$3 src
  shift 5
  [ "$patch" = ":" ] || dir=$dir+$patch
  if [ ! -x "$dir/$name" ]; then
    log "building $name $version from $module (once)"
    src=$(writable_copy "$module" "$version")
    "$patch" "$src/${pkg#./}"
    rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
    (cd "$src" && timed "$name-$version" "${NICE[@]}" go build -mod=mod -ldflags "-s -w" \
      -o "$dir.tmp/$name" "$pkg")
    for data in "$@"; do
      mkdir -p "$dir.tmp/$(dirname "$data")"
      cp -r "$src/$data" "$dir.tmp/$data"
    done
    rm -rf "$src" "$dir" && mv "$dir.tmp" "$dir"
  fi
  ln -sfn "$dir/$name" ".tools/bin/$name"
  ln -sfn "$dir" ".tools/$name"
}

build_kube kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver
build_kube kube-controller-manager k8s.io/kubernetes/cmd/kube-controller-manager
build_kube kube-scheduler k8s.io/kubernetes/cmd/kube-scheduler
build_kube kubectl k8s.io/kubernetes/cmd/kubectl
build_kube kubelet k8s.io/kubernetes/cmd/kubelet
build_kube kube-proxy k8s.io/kubernetes/cmd/kube-proxy
build_module kwok sigs.k8s.io/kwok "$KWOK_VERSION" ./cmd/kwok : kustomize/stage
build_module training-operator github.com/kubeflow/training-operator "$TRAINING_OPERATOR_VERSION" \
  ./cmd/training-operator.v1 loopback_webhooks manifests/base
build_module kserve-manager github.com/kserve/kserve "$KSERVE_VERSION" ./cmd/manager \
  loopback_webhooks config
# The real node's DNS server and metrics API (host processes, see scripts/cluster.py).
build_module coredns github.com/coredns/coredns "$COREDNS_VERSION" . :
build_module metrics-server sigs.k8s.io/metrics-server "$METRICS_SERVER_VERSION" ./cmd/metrics-server :
log "ready: $(ls .tools/bin | tr '\n' ' ')"
