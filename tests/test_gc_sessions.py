"""gc_sessions: expired PVC sessions are collected through the Kubernetes API (an HTTP fake)."""

from __future__ import annotations

import io
import os
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from agentrun import kube
from agentrun.clock import db_now
from sessions import services
from sessions.models import Session
from tests.helpers import PROJECT, TENANT, in_threads

NS = "agents"


def make_session(name, *, expires_in, kind="pvc", pvc="auto", namespace=NS, updated_ago=timedelta(hours=1)):
    services.session_upsert(session_id=name, tenant_id=TENANT, project_id=PROJECT, backend_profile="echo")
    now = db_now()
    Session.objects.filter(pk=name).update(
        storage_kind=kind,
        storage_pvc_name=f"pvc-{name}" if pvc == "auto" else pvc,
        storage_namespace=namespace,
        expires_at=None if expires_in is None else now + expires_in,
        updated_at=now - updated_ago,
    )


def make_mixed():
    make_session("old", expires_in=-timedelta(days=2), updated_ago=timedelta(hours=5))
    make_session("expired", expires_in=-timedelta(minutes=1), updated_ago=timedelta(hours=4))
    make_session("default-ns", expires_in=-timedelta(minutes=1), namespace=None, updated_ago=timedelta(hours=3))
    make_session("live", expires_in=timedelta(days=1))
    make_session("forever", expires_in=None)
    make_session("gone-already", expires_in=-timedelta(days=1), kind="evicted")
    make_session("no-pvc", expires_in=-timedelta(days=1), kind="none", pvc=None)
    make_session("blank-pvc", expires_in=-timedelta(days=1), pvc="")


def gc(*args):
    out, err = io.StringIO(), io.StringIO()
    try:
        call_command("gc_sessions", *args, stdout=out, stderr=err)
        code = 0
    except CommandError as error:
        err.write(str(error))
        code = 1
    return code, out.getvalue(), err.getvalue()


@pytest.mark.django_db
def test_dry_run_prints_exactly_the_expired_pvc_sessions_and_changes_nothing(fake_kube):
    make_mixed()
    before = dict(Session.objects.values_list("session_id", "version"))
    code, out, _ = gc("--dry-run")
    assert code == 0
    lines = out.splitlines()
    assert lines == [
        f"would delete {NS}/pvc-old session=old expiresAt={lines[0].split('expiresAt=')[1]}",
        f"would delete {NS}/pvc-expired session=expired expiresAt={lines[1].split('expiresAt=')[1]}",
        f"would delete agentrun/pvc-default-ns session=default-ns expiresAt={lines[2].split('expiresAt=')[1]}",
        "dry run: 3 expired session(s), nothing changed",
    ]
    assert dict(Session.objects.values_list("session_id", "version")) == before
    assert fake_kube.calls == []


@pytest.mark.django_db
def test_gc_deletes_expired_pvcs_and_marks_sessions_evicted(fake_kube):
    make_mixed()
    fake_kube.pvc(NS, "pvc-old")
    fake_kube.pvc(NS, "pvc-expired", status=404)  # already gone: counts as deleted
    fake_kube.pvc("agentrun", "pvc-default-ns")
    versions = dict(Session.objects.values_list("session_id", "version"))
    code, out, err = gc()
    assert code == 0, err
    assert out.splitlines()[-1] == "deleted 2, already gone 1, failed 0, skipped 0"
    assert [path for _, path in fake_kube.calls] == [
        f"/api/v1/namespaces/{NS}/persistentvolumeclaims/pvc-old",
        f"/api/v1/namespaces/{NS}/persistentvolumeclaims/pvc-expired",
        "/api/v1/namespaces/agentrun/persistentvolumeclaims/pvc-default-ns",
    ]
    for name in ("old", "expired", "default-ns"):
        session = Session.objects.get(pk=name)
        assert session.storage_kind == "evicted" and session.storage_evicted_at is not None
        assert session.version > versions[name]
    for name in ("live", "forever", "gone-already", "no-pvc", "blank-pvc"):
        assert Session.objects.get(pk=name).version == versions[name]
    assert gc() == (0, "deleted 0, already gone 0, failed 0, skipped 0\n", "")


@pytest.mark.django_db
def test_an_api_error_leaves_the_session_unchanged_and_fails_the_command(fake_kube):
    make_session("ok", expires_in=-timedelta(days=1), updated_ago=timedelta(hours=2))
    make_session("broken", expires_in=-timedelta(days=1), updated_ago=timedelta(hours=1))
    fake_kube.pvc(NS, "pvc-ok")
    fake_kube.pvc(NS, "pvc-broken", status=500)
    before = Session.objects.get(pk="broken")
    code, out, err = gc()
    assert code == 1
    assert "failed agents/pvc-broken" in err and "HTTP 500" in err
    assert out.splitlines()[-1] == "deleted 1, already gone 0, failed 1, skipped 0"
    after = Session.objects.get(pk="broken")
    assert (after.storage_kind, after.version, after.storage_evicted_at) == ("pvc", before.version, None)
    assert Session.objects.get(pk="ok").storage_kind == "evicted"


@pytest.mark.django_db
def test_limit_takes_the_oldest_first(fake_kube):
    make_mixed()
    fake_kube.pvc(NS, "pvc-old")
    code, out, _ = gc("--limit", "1")
    assert code == 0 and out.splitlines()[-1] == "deleted 1, already gone 0, failed 0, skipped 0"
    assert Session.objects.get(pk="old").storage_kind == "evicted"
    assert Session.objects.get(pk="expired").storage_kind == "pvc"
    assert gc("--limit", "0")[0] == 1


@pytest.mark.django_db
def test_without_a_cluster_configuration_the_command_says_so(monkeypatch, tmp_path):
    make_session("old", expires_in=-timedelta(days=1))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    kube.reset()
    code, _, err = gc()
    kube.reset()
    assert code == 1 and "Kubernetes configuration" in err
    assert Session.objects.get(pk="old").storage_kind == "pvc"


@pytest.mark.django_db(transaction=True)
def test_two_collectors_at_once_delete_each_pvc_once(fake_kube):
    names = [f"s{i}" for i in range(6)]
    for index, name in enumerate(names):
        make_session(name, expires_in=-timedelta(days=1), updated_ago=timedelta(minutes=60 - index))
        fake_kube.pvc(NS, f"pvc-{name}", delay=0.05)
    results = in_threads(2, lambda _: gc())
    assert [code for code, _, _ in results] == [0, 0]
    assert sorted(path for _, path in fake_kube.calls) == sorted(
        f"/api/v1/namespaces/{NS}/persistentvolumeclaims/pvc-{name}" for name in names
    )  # each PVC deleted exactly once
    assert set(Session.objects.values_list("storage_kind", flat=True)) == {"evicted"}
    deleted = sum(int(out.splitlines()[-1].split()[1].rstrip(",")) for _, out, _ in results)
    assert deleted == len(names)


@pytest.mark.k8s
@pytest.mark.django_db
def test_gc_against_a_real_cluster():
    """Creates a PVC in AGENTRUN_TEST_NAMESPACE (default "default"), then collects it."""
    if not os.environ.get("KUBECONFIG"):
        pytest.skip("needs a real cluster: set KUBECONFIG to run it")
    from kubernetes import client

    kube.reset()
    namespace = os.environ.get("AGENTRUN_TEST_NAMESPACE", "default")
    api = client.CoreV1Api(kube.api_client())
    name = f"agentrun-gc-test-{os.getpid()}"
    api.create_namespaced_persistent_volume_claim(
        namespace,
        client.V1PersistentVolumeClaim(
            metadata=client.V1ObjectMeta(name=name),
            spec=client.V1PersistentVolumeClaimSpec(
                access_modes=["ReadWriteOnce"],
                resources=client.V1VolumeResourceRequirements(requests={"storage": "1Mi"}),
            ),
        ),
    )
    make_session("real", expires_in=-timedelta(minutes=1), pvc=name, namespace=namespace)
    code, _out, err = gc()
    assert code == 0, err
    assert Session.objects.get(pk="real").storage_kind == "evicted"
    try:
        claim = api.read_namespaced_persistent_volume_claim(name, namespace)
        assert claim.metadata.deletion_timestamp is not None  # terminating, held by a finalizer
    except client.exceptions.ApiException as error:
        assert error.status == 404
