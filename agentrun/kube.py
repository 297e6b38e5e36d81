"""The Kubernetes adapter: the official client, configured in-cluster or from `KUBECONFIG`.

Every call goes through here, so the rest of agentrun sees two outcomes and one error type:
done, already gone, or `KubeError` (with a message that prints no credential).
"""

from __future__ import annotations

import os
import threading

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException
from urllib3.exceptions import HTTPError

REQUEST_TIMEOUT_SECONDS = 15

_lock = threading.Lock()
_api_client: client.ApiClient | None = None


class KubeError(Exception):
    """The Kubernetes API could not be reached, or refused the call."""


def _load() -> client.ApiClient:
    configuration = client.Configuration()
    try:
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=configuration)
        else:
            config.load_kube_config(
                config_file=os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config"),
                client_configuration=configuration,
            )
    except (ConfigException, OSError) as exc:
        raise KubeError(f"no usable Kubernetes configuration (in-cluster or KUBECONFIG): {exc}") from None
    return client.ApiClient(configuration)


def api_client() -> client.ApiClient:
    """One configured client per process, built on first use."""
    global _api_client
    with _lock:
        if _api_client is None:
            _api_client = _load()
        return _api_client


def reset() -> None:
    """Forget the client, so the next call reads the configuration again."""
    global _api_client
    with _lock:
        _api_client = None


def _failure(exc: Exception, what: str) -> KubeError:
    if isinstance(exc, ApiException):
        return KubeError(f"{what}: HTTP {exc.status} {exc.reason or ''}".rstrip())
    return KubeError(f"{what}: {type(exc).__name__}")


def delete_pvc(namespace: str, name: str) -> bool:
    """Delete a PersistentVolumeClaim. True when deleted, False when it was already gone."""
    api = client.CoreV1Api(api_client())
    try:
        api.delete_namespaced_persistent_volume_claim(
            name,
            namespace,
            body=client.V1DeleteOptions(propagation_policy="Background"),
            _headers={"Content-Type": "application/json"},
            _request_timeout=REQUEST_TIMEOUT_SECONDS,
        )
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise _failure(exc, f"deleting PVC {namespace}/{name}") from None
    except HTTPError as exc:
        raise _failure(exc, f"deleting PVC {namespace}/{name}") from None
    return True
