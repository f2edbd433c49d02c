"""Helpers for tests of Kubernetes objects."""

from __future__ import annotations

from typing import Any


def kserve_api_client() -> Any:
    """kserve's ApiClient, resolving the Kubernetes core models (V1ObjectMeta, V1Container …)
    that kserve's generated models refer to but ``kserve.models`` does not re-export."""
    import kserve
    import kubernetes.client

    class _ApiClient(kserve.ApiClient):  # type: ignore[misc]
        def _ApiClient__deserialize(self, data: Any, klass: Any) -> Any:
            if isinstance(klass, str) and not hasattr(kserve.models, klass):
                klass = getattr(kubernetes.client.models, klass, klass)
            return super()._ApiClient__deserialize(data, klass)

    return _ApiClient()
