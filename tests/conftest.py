"""Fixtures shared by the tests. What they are built from (builders, clients, fakes, threads)
lives in tests.helpers; data is built by small helpers, not fixture files."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from agentrun import kube
from tests.helpers import FakeCluster, FakeKube, KeyClient, make_key, raw_key, write_kubeconfig


@pytest.fixture(scope="session", autouse=True)
def _stop_listener_before_teardown(django_db_setup):
    """The notification listener holds a connection to the test database: close it before
    pytest-django drops that database."""
    yield
    from agentrun import notify

    notify.hub.stop()


@pytest.fixture
def client_api(db):
    return make_key("client")


@pytest.fixture
def runner_api(db):
    return make_key("runner")


@pytest.fixture
def operator_api(db):
    return make_key("operator")


@pytest.fixture
def anonymous_api(db):
    return KeyClient(None)


@pytest.fixture
def keys(db):
    """The secrets of a new client key and a new runner key, for the runner's own client."""
    return raw_key("client"), raw_key("runner")


@pytest.fixture
def fake_kube(httpserver, tmp_path, monkeypatch):
    """The Kubernetes API as a fake that checks every request; the kubeconfig points at it."""
    config = tmp_path / "kubeconfig"
    write_kubeconfig(config, httpserver.url_for("").rstrip("/"))
    monkeypatch.setenv("KUBECONFIG", str(config))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    kube.reset()
    fake = FakeKube(httpserver)
    yield fake
    kube.reset()
    assert not fake.problems, fake.problems
    httpserver.check_assertions()  # a request no expectation matched fails the test


@pytest.fixture
def fake_cluster(fake_kube):
    return FakeCluster(fake_kube)


@pytest.fixture
def staff(db):
    """A Django test client logged in as a superuser: the admin as an operator sees it."""
    user = get_user_model().objects.create_superuser("ops", "ops@example.com", "pw")
    client = Client()
    client.force_login(user)
    return client
