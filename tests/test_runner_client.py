"""The client SDK's retries and encoding, on a scripted transport (no server needed)."""

from __future__ import annotations

import json

import httpx
import pytest

from runner.client import AgentRunClient, ApiError


def scripted(*answers):
    """A transport answering each request with the next of `answers` (a status, or an exception
    class to raise), recording the bodies it was sent."""
    answers, bodies = list(answers), []

    def handle(request):
        bodies.append(request.content)
        answer = answers.pop(0) if answers else 200
        if isinstance(answer, type):
            raise answer("scripted failure", request=request)
        return httpx.Response(
            answer,
            json={"ok": True}
            if answer < 400
            else {"error": {"kind": "infra-failed", "message": "down", "details": {}}},
        )

    return httpx.MockTransport(handle), bodies


def test_transient_failures_are_retried_past_the_count_while_retry_while_holds(monkeypatch):
    monkeypatch.setattr("runner.client.time.sleep", lambda seconds: None)
    transport, bodies = scripted(503, httpx.ConnectError, 502, httpx.ReadTimeout, 504, 503)
    client = AgentRunClient("http://manager", "key", retries=1, transport=transport)
    client.retry_while = lambda: True
    assert client.request("GET", "/runs/r") == {"ok": True}
    assert len(bodies) == 7


def test_without_retry_while_the_count_bounds_the_retries(monkeypatch):
    monkeypatch.setattr("runner.client.time.sleep", lambda seconds: None)
    transport, bodies = scripted(503, 503, 503)
    client = AgentRunClient("http://manager", "key", retries=2, transport=transport)
    client.retry_while = lambda: False  # e.g. the lease was lost meanwhile
    with pytest.raises(ApiError) as failed:
        client.request("GET", "/runs/r")
    assert failed.value.status == 503 and len(bodies) == 3


def test_one_attempt_when_asked(monkeypatch):
    transport, bodies = scripted(httpx.ConnectError)
    client = AgentRunClient("http://manager", "key", transport=transport)
    client.retry_while = lambda: True
    with pytest.raises(httpx.ConnectError):
        client.request("POST", "/runs/r/events", content=b"{}", retry=False)
    assert bodies == [b"{}"]


def test_a_body_with_a_lone_surrogate_is_sent_escaped_not_refused():
    """httpx itself would fail encoding it as UTF-8; an agent can print one ("\\udc80")."""
    transport, bodies = scripted(200)
    client = AgentRunClient("http://manager", "key", transport=transport)
    client.finish_run("r", "runner-1", 1, terminalStatus="failed", failureMessage="bad \udc80 byte")
    assert b'"failureMessage":"bad \\udc80 byte"' in bodies[0]
    assert json.loads(bodies[0])["failureMessage"] == "bad \udc80 byte"
