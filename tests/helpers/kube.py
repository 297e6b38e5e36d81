"""HTTP fakes of the Kubernetes API server (pytest-httpserver) that check each request; the
fixtures that start them (`fake_kube`, `fake_cluster`) are in conftest.

Requests are checked the way the API server would: the bearer token from the kubeconfig, JSON
bodies, and bodies whose fields all belong to the Kubernetes type the route takes (the official
client's models carry the OpenAPI schema: `openapi_types` and `attribute_map`).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from kubernetes import client as k8s
from werkzeug import Request, Response

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
            time.sleep(delay)  # a slow API server: the delay is the behaviour under test
            if status == 200:
                body = {
                    "apiVersion": "v1",
                    "kind": "PersistentVolumeClaim",
                    "metadata": {"name": name, "namespace": namespace},
                    "status": {"phase": "Bound"},
                }
            else:
                body = {
                    "apiVersion": "v1",
                    "kind": "Status",
                    "status": "Failure",
                    "code": status,
                    "reason": "NotFound" if status == 404 else "InternalError",
                    "message": "fake",
                }
            return Response(json.dumps(body), status=status, content_type="application/json")

        self.server.expect_request(path, method="DELETE").respond_with_handler(handler)
        return path


def write_kubeconfig(path: Path, server_url: str) -> None:
    """A kubeconfig for the fake at `server_url`, with its bearer token."""
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": server_url}}],
                "users": [{"name": "agentrun", "user": {"token": TOKEN}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "agentrun"}}],
                "current-context": "fake",
            }
        )
    )


class FakeCluster:
    """A stateful fake of the API server for Jobs, Secrets, PVCs, NetworkPolicies and pods in
    any namespace: creates and replaces are validated against the Kubernetes schema
    (kubernetes-validate, strict: unknown fields are errors), stored, and answered as the server
    would (201, 409 AlreadyExists, 404 NotFound). Pods are made by the test, as the Job
    controller would (`start_pod`), and validated the same way."""

    KUBERNETES_VERSION = "1.33"
    ROUTES = {
        "jobs": ("/apis/batch/v1/namespaces/{ns}/jobs", "Job", "batch/v1"),
        "secrets": ("/api/v1/namespaces/{ns}/secrets", "Secret", "v1"),
        "persistentvolumeclaims": ("/api/v1/namespaces/{ns}/persistentvolumeclaims", "PersistentVolumeClaim", "v1"),
        "networkpolicies": (
            "/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies",
            "NetworkPolicy",
            "networking.k8s.io/v1",
        ),
        "pods": ("/api/v1/namespaces/{ns}/pods", "Pod", "v1"),
    }

    def __init__(self, fake: FakeKube):
        import re

        self.fake, self.objects, self.requests = fake, {}, []
        for plural, (path, kind, api_version) in self.ROUTES.items():
            collection = re.compile("^" + path.replace("{ns}", "(?P<ns>[a-z0-9-]+)") + "$")
            item = re.compile("^" + path.replace("{ns}", "(?P<ns>[a-z0-9-]+)") + "/(?P<name>[a-z0-9.-]+)$")
            fake.server.expect_request(collection, method="POST").respond_with_handler(
                lambda request, p=plural, k=kind, a=api_version, c=collection: self._create(request, p, k, a, c)
            )
            fake.server.expect_request(collection, method="GET").respond_with_handler(
                lambda request, p=plural, k=kind, a=api_version, c=collection: self._list(request, p, k, a, c)
            )
            fake.server.expect_request(item, method="GET").respond_with_handler(
                lambda request, p=plural, i=item: self._read(request, p, i)
            )
            fake.server.expect_request(item, method="DELETE").respond_with_handler(
                lambda request, p=plural, i=item: self._delete(request, p, i)
            )
            fake.server.expect_request(item, method="PUT").respond_with_handler(
                lambda request, p=plural, k=kind, a=api_version, i=item: self._replace(request, p, k, a, i)
            )

    @staticmethod
    def _json(body, status=200):
        return Response(json.dumps(body), status=status, content_type="application/json")

    @staticmethod
    def _status(code, reason, message):
        return FakeCluster._json(
            {
                "apiVersion": "v1",
                "kind": "Status",
                "status": "Failure",
                "code": code,
                "reason": reason,
                "message": message,
            },
            code,
        )

    def _valid(self, request, verb, plural, kind, api_version) -> tuple[dict, str | None]:
        """The request's body, and why the API server would refuse it (None: it would not)."""
        import kubernetes_validate

        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            self.fake.problems.append(f"{request.path}: no bearer token")
        body = json.loads(request.data)
        self.requests.append((verb, plural, body))
        if body.get("kind") != kind or body.get("apiVersion") != api_version:
            self.fake.problems.append(f"{request.path}: a {body.get('kind')} {body.get('apiVersion')} body")
        try:
            kubernetes_validate.validate(body, self.KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            self.fake.problems.append(f"{kind} fails the schema: {error.message} at {list(error.path)}")
            return body, error.message
        return body, None

    def _create(self, request, plural, kind, api_version, pattern):
        import uuid

        namespace = pattern.match(request.path).group("ns")
        body, invalid = self._valid(request, "POST", plural, kind, api_version)
        if invalid is not None:
            return self._status(422, "Invalid", invalid)
        name = body["metadata"]["name"]
        if (plural, namespace, name) in self.objects:
            return self._status(409, "AlreadyExists", f'{plural} "{name}" already exists')
        stored = {
            **body,
            "metadata": {**body["metadata"], "namespace": namespace, "uid": str(uuid.uuid4())},
            "status": {},
        }
        self.objects[(plural, namespace, name)] = stored
        return self._json(stored, 201)

    def _list(self, request, plural, kind, api_version, pattern):
        namespace = pattern.match(request.path).group("ns")
        # Equality (`key=value`) and existence (`key`) requirements, as the API server takes them.
        parts = [part for part in request.args.get("labelSelector", "").split(",") if part]
        equal = dict(part.split("=", 1) for part in parts if "=" in part)
        present = [part for part in parts if "=" not in part]

        def matches(labels):
            return all(labels.get(k) == v for k, v in equal.items()) and all(k in labels for k in present)

        items = [
            obj
            for (p, ns, _), obj in self.objects.items()
            if p == plural and ns == namespace and matches(obj["metadata"].get("labels") or {})
        ]
        return self._json({"apiVersion": api_version, "kind": f"{kind}List", "metadata": {}, "items": items})

    def _replace(self, request, plural, kind, api_version, pattern):
        match = pattern.match(request.path)
        key = (plural, match.group("ns"), match.group("name"))
        body, invalid = self._valid(request, "PUT", plural, kind, api_version)
        if invalid is not None:
            return self._status(422, "Invalid", invalid)
        if body["metadata"].get("name") != key[2]:
            return self._status(400, "BadRequest", "the name in the body does not match the URL")
        found = self.objects.get(key)
        if found is None:
            return self._status(404, "NotFound", "not found")
        stored = {
            **body,
            "metadata": {**body["metadata"], "namespace": key[1], "uid": found["metadata"]["uid"]},
            "status": found.get("status", {}),
        }
        self.objects[key] = stored
        return self._json(stored)

    def _read(self, request, plural, pattern):
        match = pattern.match(request.path)
        found = self.objects.get((plural, match.group("ns"), match.group("name")))
        return self._json(found) if found else self._status(404, "NotFound", "not found")

    def _delete(self, request, plural, pattern):
        match = pattern.match(request.path)
        self.requests.append(("DELETE", plural, match.group("name")))
        found = self.objects.pop((plural, match.group("ns"), match.group("name")), None)
        if found is None:
            return self._status(404, "NotFound", "not found")
        if plural == "jobs":  # the owner goes: what it owns goes too (the garbage collector)
            uid = found["metadata"]["uid"]
            for key, obj in list(self.objects.items()):
                if any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences") or []):
                    del self.objects[key]
        return self._json({"apiVersion": "v1", "kind": "Status", "status": "Success"})

    def set_job_status(self, namespace, name, status):
        self.objects[("jobs", namespace, name)]["status"] = status

    def start_pod(self, namespace, job_name, status, *, created="2025-01-01T00:00:00Z", suffix="x1"):
        """What the Job controller makes: a pod from the Job's template, with the Job's
        `job-name` labels and an owner reference, in `status` (a PodStatus as the kubelet and the
        scheduler report it). Validated against the schema like every body; returns its name."""
        import uuid

        import kubernetes_validate

        job = self.objects[("jobs", namespace, job_name)]
        template = job["spec"]["template"]
        name = f"{job_name}-{suffix}"
        labels = {
            **template["metadata"]["labels"],
            "job-name": job_name,
            "batch.kubernetes.io/job-name": job_name,
            "controller-uid": job["metadata"]["uid"],
        }
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "uid": str(uuid.uuid4()),
                "creationTimestamp": created,
                "labels": labels,
                "ownerReferences": [
                    {"apiVersion": "batch/v1", "kind": "Job", "name": job_name, "uid": job["metadata"]["uid"]}
                ],
            },
            "spec": template["spec"],
            "status": status,
        }
        kubernetes_validate.validate(pod, self.KUBERNETES_VERSION, strict=True)
        self.objects[("pods", namespace, name)] = pod
        return name

    def of(self, plural):
        return {name: obj for (p, _, name), obj in self.objects.items() if p == plural}
