"""Kubeflow pipeline definitions (wiring only; the steps live in :mod:`components`)."""
