"""Auth hardening: failed key lookups from one address are limited (429 in the envelope with
Retry-After, counted in the database across processes, per window); keys may expire; last use
is kept to the minute and shown in admin."""

from __future__ import annotations

import io
from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from agentrun import auth
from agentrun.models import ApiKey, AuthFailure
from tests.helpers import KeyClient, make_key

pytestmark = pytest.mark.django_db


@pytest.fixture
def limited(settings):
    settings.AGENTRUN_AUTH_FAILURE_LIMIT = 3
    settings.AGENTRUN_AUTH_FAILURE_WINDOW_SECONDS = 60
    auth.failure_limiter.clear()
    yield settings
    auth.failure_limiter.clear()


def bad(address="10.0.0.1", key="ar_wrong"):
    client = KeyClient(key)
    return client._send("get", "backends", REMOTE_ADDR=address)


def test_repeated_failures_from_one_address_get_429_with_retry_after(limited):
    for _ in range(3):
        status, body = bad()
        assert status == 401 and body["error"]["kind"] == "auth-required"
    client = KeyClient("ar_wrong")
    response = client.client.get("/api/v1/backends", REMOTE_ADDR="10.0.0.1", RAW_URI="/api/v1/backends")
    assert response.status_code == 429
    error = response.json()["error"]
    assert error["kind"] == "auth-required" and 1 <= error["details"]["retryAfterSeconds"] <= 60
    assert response["Retry-After"] == str(error["details"]["retryAfterSeconds"])
    # Refused now even with a good key, and without asking the database again.
    good = make_key("client")
    with CaptureQueriesContext(connection) as queries:
        status, _ = good._send("get", "backends", REMOTE_ADDR="10.0.0.1")
    assert status == 429 and len(queries) == 0
    # Another address is not affected.
    assert good._send("get", "backends", REMOTE_ADDR="10.0.0.2")[0] == 200
    assert AuthFailure.objects.get(pk="10.0.0.1").failures == 4


def test_the_count_is_shared_by_every_process(limited):
    """Two failures here, two in "another process" (the database row is all they share)."""
    bad(), bad()
    auth.failure_limiter.clear()  # what another process knows: nothing in memory
    assert bad()[0] == 401
    assert bad()[0] == 429


def test_a_new_window_starts_afresh(limited):
    for _ in range(4):
        bad()
    assert bad()[0] == 429
    AuthFailure.objects.filter(pk="10.0.0.1").update(window_started_at=timezone.now() - timedelta(seconds=61))
    auth.failure_limiter.clear()  # the process's memory of the refusal ran out with the window
    assert bad()[0] == 401
    assert AuthFailure.objects.get(pk="10.0.0.1").failures == 1


def test_malformed_headers_count_as_failures(limited):
    client = KeyClient(None)
    for _ in range(3):
        assert client._send("get", "backends", REMOTE_ADDR="10.0.0.9", HTTP_AUTHORIZATION="Basic eA==")[0] == 401
    assert client._send("get", "backends", REMOTE_ADDR="10.0.0.9", HTTP_AUTHORIZATION="Basic eA==")[0] == 429


def test_behind_proxies_the_forwarded_address_counts(limited):
    limited.AGENTRUN_TRUSTED_PROXIES = 1
    client = KeyClient("ar_wrong")
    for _ in range(4):
        client._send("get", "backends", REMOTE_ADDR="10.1.1.1", HTTP_X_FORWARDED_FOR="spoofed, 203.0.113.7")
    assert AuthFailure.objects.get(pk="203.0.113.7").failures == 4
    assert not AuthFailure.objects.filter(pk__in=["10.1.1.1", "spoofed"]).exists()
    # Another client behind the same ingress is not refused.
    good = make_key("client")
    assert good._send("get", "backends", REMOTE_ADDR="10.1.1.1", HTTP_X_FORWARDED_FOR="198.51.100.2")[0] == 200


@pytest.mark.django_db(transaction=True)
def test_concurrent_failures_are_all_counted(limited):
    """The upsert counts under races: no lost update."""
    from tests.helpers import in_threads

    limited.AGENTRUN_AUTH_FAILURE_LIMIT = 1000

    def fail(_index):
        try:
            return auth.failure_limiter.fail("192.0.2.50")
        finally:
            connection.close()

    in_threads(8, fail)
    assert AuthFailure.objects.get(pk="192.0.2.50").failures == 8


def test_an_expired_key_is_refused_cached_or_not(settings):
    settings.AGENTRUN_AUTH_CACHE_SECONDS = 60
    auth.key_cache.clear()
    api = make_key("client")
    assert api.get("backends")[0] == 200  # cached now
    ApiKey.objects.filter(pk=api.key.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    auth.key_cache.clear()
    status, body = api.get("backends")
    assert status == 401 and body["error"]["kind"] == "auth-required"
    # A cached key stops at its expiry too, not at the end of its cache entry.
    other = make_key("client")
    ApiKey.objects.filter(pk=other.key.pk).update(expires_at=timezone.now() + timedelta(seconds=30))
    assert other.get("backends")[0] == 200
    cached = auth.key_cache._entries[other.key.key_hash][1]
    cached.expires_at = timezone.now() - timedelta(seconds=1)
    assert other.get("backends")[0] == 401
    auth.key_cache.clear()


def test_create_api_key_with_an_expiry():
    out = io.StringIO()
    call_command("create_api_key", "--tenant", "acme", "--role", "client", "--expires-in", "30d", stdout=out)
    key = ApiKey.objects.get(key_hash=auth.hash_key(out.getvalue().strip()))
    assert timedelta(days=29, hours=23) < key.expires_at - timezone.now() <= timedelta(days=30)
    for junk in ("0", "-5d", "soon", "30x"):
        with pytest.raises(CommandError, match="expires-in"):
            call_command("create_api_key", "--tenant", "acme", "--role", "client", "--expires-in", junk)


def test_last_used_at_is_kept_to_the_minute():
    api = make_key("client")
    assert ApiKey.objects.get(pk=api.key.pk).last_used_at is None
    assert api.get("backends")[0] == 200
    first = ApiKey.objects.get(pk=api.key.pk).last_used_at
    assert first is not None
    with CaptureQueriesContext(connection) as queries:
        assert api.get("backends")[0] == 200
    assert not any(query["sql"].startswith("UPDATE") for query in queries.captured_queries)
    assert ApiKey.objects.get(pk=api.key.pk).last_used_at == first


def test_admin_shows_last_use_and_expiry(staff):
    api = make_key("client")
    api.get("backends")
    page = staff.get("/admin/agentrun/apikey/").content.decode()
    assert "Last used at" in page and "Expires at" in page
    response = staff.post(
        "/admin/agentrun/apikey/add/",
        {"name": "ci", "tenant_id": "acme", "role": "client", "expires_at_0": "2020-01-01", "expires_at_1": "00:00"},
        follow=True,
    )
    assert "No key was created" in response.content.decode()
    assert not ApiKey.objects.filter(name="ci").exists()
