# medseg: every entry point sets itself up first (scripts/setup.sh is idempotent and cached).
SHELL := /bin/bash
VENV := .venv/bin
export PATH := $(CURDIR)/.tools/bin:$(PATH)
export MYPY_CACHE_DIR ?= $(HOME)/.cache/medseg/mypy

.PHONY: setup run run-skin demo test test-fast lint deps unit bench minio clean manifests images bundle cluster cluster-down test-cluster

setup:
	@bash scripts/setup.sh

## The main job: the local end-to-end demo.
run: setup
	$(VENV)/medseg demo

## The demo of the second task: skin-lesion classification.
run-skin: setup
	$(VENV)/medseg demo --task skin-lesion

demo: run

## Lint, type-check and the whole test suite (real MinIO on loopback).
test: setup lint unit

lint: deps
	$(VENV)/ruff check medseg tests benchmarks components pipelines model_server scripts
	$(VENV)/ruff format --check medseg tests benchmarks components pipelines model_server scripts
	$(VENV)/mypy
	$(VENV)/lint-imports  # the layers of docs/architecture.md ([tool.importlinter] contracts)
	$(VENV)/python scripts/function_length.py medseg model_server components pipelines

## Imports against declared dependencies (deptry, configured in pyproject.toml): the code
## against the dependencies and non-dev extras; the tests (which deptry skips by default)
## against every extra, dev included.
deps:
	$(VENV)/deptry .
	$(VENV)/deptry tests --exclude '\.venv' --ignore DEP002,DEP004

# The whole suite, tests/cluster/test_cluster.py included: its fixture brings up the control plane once
# (scripts/cluster.py; binaries cached in ~/.cache/medseg/tools, built on a cold machine) and stops it
# after that module.
unit:
	$(VENV)/pytest -q --durations=25

## The quick loop while developing: every test but the slow ones (marker `slow`: a whole
## pipeline or demo, multi-process training) and the cluster's. `make test` runs them all.
test-fast: setup
	$(VENV)/pytest -q -m "not slow" --ignore=tests/cluster/test_cluster.py --ignore=tests/cluster/test_node.py \
		--ignore=tests/cluster/test_cluster_containers.py

## Benchmarks: each prints a ratio against a baseline measured in the same run.
bench: setup
	$(VENV)/python benchmarks/bench_preprocess_cache.py
	$(VENV)/python benchmarks/bench_train_throughput.py
	$(VENV)/python benchmarks/bench_train_levers.py
	$(VENV)/python benchmarks/bench_batch_predict.py
	$(VENV)/python benchmarks/bench_classify.py
	$(VENV)/python benchmarks/bench_serving.py
	$(VENV)/python benchmarks/bench_engine.py --per-voxel
	$(VENV)/python benchmarks/bench_shards.py
	$(VENV)/python benchmarks/bench_scale.py

## Regenerate manifests/ (kustomize) from the Helm chart; tests fail when they drift.
## The chart's README parameters table comes from the `## @param` lines of values.yaml (pinned
## generator, run by npx; tests/unit/platform/test_chart.py fails on drift).
README_GENERATOR := @bitnami/readme-generator-for-helm@2.7.2
manifests: setup
	$(VENV)/python scripts/render_manifests.py
	npx --yes $(README_GENERATOR) --values charts/medseg/values.yaml --readme charts/medseg/README.md

## Container images without Docker (scripts/images.py): reproducible OCI archives in
## .medseg/images/ of medseg, medseg-server, the KServe storage initializer, MinIO and mc. Layers are
## cached in ~/.cache/medseg/images (a warm build takes seconds); needs root (chroot, overlayfs).
## VARIANT=cuda builds the medseg images with torch's CUDA wheels (tag suffix -cuda).
VARIANT ?= cpu
images: setup
	$(VENV)/python scripts/images.py build --variant $(VARIANT)

## The air-gapped bundle in .medseg/bundle/: one archive of every image, their SBOMs, the packaged chart,
## values-bundle.yaml and SHA256SUMS (docs/install.md, "Air-gapped install").
bundle: setup
	$(VENV)/python scripts/images.py bundle

## A local MinIO for interactive use; credentials go to .medseg/minio.env.
minio: setup
	$(VENV)/medseg minio

## A real Kubernetes control plane on 127.0.0.1 (scripts/cluster.py): etcd, kube-apiserver,
## controller-manager, scheduler, KServe and Training Operator controllers, a kwok fake node, and a
## real node (containerd, kubelet, kube-proxy, CoreDNS, metrics-server; pods on 10.244.99.0/24;
## needs root; `scripts/cluster.py up --no-node` leaves it out).
## The first run builds the binaries (cached in ~/.cache/medseg/tools; see docs/install.md).
cluster: setup
	$(VENV)/python scripts/cluster.py up
	@echo "export KUBECONFIG=$(CURDIR)/.medseg/cluster/kubeconfig"

cluster-down:
	@if [ -x $(VENV)/python ]; then $(VENV)/python scripts/cluster.py down; fi

## Only the tests against the real control plane and node (tests/cluster/test_cluster.py, the platform in
## its own containers tests/cluster/test_cluster_containers.py, tests/cluster/test_node.py).
test-cluster: setup
	$(VENV)/pytest -q tests/cluster/test_cluster.py tests/cluster/test_cluster_containers.py tests/cluster/test_node.py

clean: cluster-down
	rm -rf .medseg .pytest_cache .ruff_cache
