# medseg: every entry point sets itself up first (scripts/setup.sh is idempotent and cached).
SHELL := /bin/bash
VENV := .venv/bin
export PATH := $(CURDIR)/.tools/bin:$(PATH)
export MYPY_CACHE_DIR ?= $(HOME)/.cache/medseg/mypy

.PHONY: setup run demo test lint unit bench minio clean

setup:
	@bash scripts/setup.sh

## The main job: the local end-to-end demo.
run: setup
	$(VENV)/medseg demo

demo: run

## Lint, type-check and the whole test suite (real MinIO on loopback).
test: setup lint unit

lint:
	$(VENV)/ruff check medseg tests benchmarks components pipelines model_server
	$(VENV)/ruff format --check medseg tests benchmarks components pipelines model_server
	$(VENV)/mypy

unit:
	$(VENV)/pytest -q

## Benchmarks: each prints a ratio against a baseline measured in the same run.
bench: setup
	$(VENV)/python benchmarks/bench_preprocess_cache.py

## A local MinIO for interactive use; credentials go to .medseg/minio.env.
minio: setup
	$(VENV)/medseg minio

clean:
	rm -rf .medseg .pytest_cache .ruff_cache
