"""An HTTP fake of the Kubernetes API server (pytest-httpserver) that checks each request.

Requests are checked the way the API server would: the bearer token from the kubeconfig, JSON
bodies, and bodies whose fields all belong to the Kubernetes type the route takes (the official
client's models carry the OpenAPI schema: `openapi_types` and `attribute_map`).
"""

from __future__ import annotations

import json
import threading
import time

import pytest
from kubernetes import client as k8s
from werkzeug import Request, Response

from agentrun import kube

TOKEN = "fake-cluster-token"


def schema_errors(body: dict, model) -> list[str]:
    """Field names and enum values not in `model`'s schema, recursively for nested models."""
    fields = {wire: name for name, wire in model.attribute_map.items()}
    errors = []
    for key, value in body.items():
        if key not in fields:
            errors.append(f"{model.__name__} has no field {key!r}")
            continue
        kind = model.openapi_types[fields[key]]
        nested = getattr(k8s, kind, None)
        if nested is not None and isinstance(value, dict):
            errors.extend(schema_errors(value, nested))
    return errors


class FakeKube:
    def __init__(self, server):
        self.server = server
        self.calls: list[tuple[str, str]] = []
        self.problems: list[str] = []
        self._lock = threading.Lock()

    def _check(self, request: Request, model) -> None:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            self.problems.append(f"{request.path}: no bearer token")
        if request.data:
            if not request.headers.get("Content-Type", "").startswith("application/json"):
                self.problems.append(f"{request.path}: body is not JSON ({request.headers.get('Content-Type')})")
            body = json.loads(request.data)
            self.problems.extend(schema_errors(body, model))
            policy = body.get("propagationPolicy")
            if policy is not None and policy not in ("Orphan", "Background", "Foreground"):
                self.problems.append(f"propagationPolicy {policy!r}")

    def pvc(self, namespace: str, name: str, *, status: int = 200, delay: float = 0.0):
        """Expect DELETEs of one PVC: answer `status` (200 deleted, 404 gone, 5xx failure)."""
        path = f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/{name}"

        def handler(request: Request) -> Response:
            self._check(request, k8s.V1DeleteOptions)
            with self._lock:
                self.calls.append(("DELETE", path))
            time.sleep(delay)
            if status == 200:
                body = {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                        "metadata": {"name": name, "namespace": namespace}, "status": {"phase": "Bound"}}
            else:
                body = {"apiVersion": "v1", "kind": "Status", "status": "Failure", "code": status,
                        "reason": "NotFound" if status == 404 else "InternalError", "message": "fake"}
            return Response(json.dumps(body), status=status, content_type="application/json")

        self.server.expect_request(path, method="DELETE").respond_with_handler(handler)
        return path


@pytest.fixture
def fake_kube(httpserver, tmp_path, monkeypatch):
    config = tmp_path / "kubeconfig"
    config.write_text(json.dumps({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "fake", "cluster": {"server": httpserver.url_for("").rstrip("/")}}],
        "users": [{"name": "agentrun", "user": {"token": TOKEN}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "agentrun"}}],
        "current-context": "fake",
    }))
    monkeypatch.setenv("KUBECONFIG", str(config))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    kube.reset()
    fake = FakeKube(httpserver)
    yield fake
    kube.reset()
    assert not fake.problems, fake.problems
    httpserver.check_assertions()  # a request no expectation matched fails the test
