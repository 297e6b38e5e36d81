"""Logs (agentrun.logs): JSON lines from structlog's loggers and the standard library's alike,
each with the request's id, tenant and run where known; no secret in any field, the message or
an exception's text; readable columns for a person with AGENTRUN_LOG_FORMAT=console."""

from __future__ import annotations

import io
import json
import logging
import logging.config

import pytest
from django.test import Client

from agentrun import logs
from tests.helpers import TENANT, make_key, make_run

SECRETS = (
    "hunter2-db-password",
    "sk-proj-abcdefghijklmnopqrstuvwxyz012345",
    "ghp_abcdefghijklmnopqrstuvwxyz0123456789",
    "ar_live_key_0123456789abcdef",
    "eyJhbGciOiJIUzI1NiJ9.payload.signature",
    "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC",
    "AKIAABCDEFGHIJKLMNOP",
)


@pytest.fixture
def captured():
    """The root logger and Django's, formatted as deployed, into a buffer."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    config = logs.formatter(logs.JSON)
    factory = config.pop("()")
    handler.setFormatter(factory(**config))
    watched = [logging.getLogger(), logging.getLogger("django")]  # Django's lines do not propagate to the root
    for logger in watched:
        logger.addHandler(handler)
    old_level = logging.getLogger().level
    logging.getLogger().setLevel(logging.INFO)
    logs.clear()
    yield buffer
    logs.clear()
    logging.getLogger().setLevel(old_level)
    for logger in watched:
        logger.removeHandler(handler)


def lines(buffer: io.StringIO) -> list[dict]:
    text = buffer.getvalue()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_no_secret_reaches_any_field_message_or_traceback(captured):
    stdlib = logging.getLogger("agentrun.test")
    stdlib.info("connecting to %s", "postgresql://agentrun:hunter2-db-password@db.internal:5432/agentrun")
    stdlib.info("libpq: host=db.internal port=5432 password=hunter2-db-password dbname=agentrun")
    stdlib.warning(
        "calling the provider",
        extra={
            "api_key": "ar_live_key_0123456789abcdef",
            "headers": {"Authorization": "Bearer eyJhbGciOiJIUzI1NiJ9.payload.signature", "Accept": "json"},
            "argv": ["agent", "--key", "sk-proj-abcdefghijklmnopqrstuvwxyz012345"],
        },
    )
    structured = logs.get_logger("agentrun.test")
    structured.info(
        "cloned",
        url="https://x-access-token:ghp_abcdefghijklmnopqrstuvwxyz0123456789@github.com/acme/web.git",
        aws="AKIAABCDEFGHIJKLMNOP",
        pem="-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----",
        client_secret="s3cr3t",
    )
    try:
        raise RuntimeError("the provider refused sk-proj-abcdefghijklmnopqrstuvwxyz012345")
    except RuntimeError:
        stdlib.exception("a turn failed")
    text = captured.getvalue()
    for secret in (*SECRETS, "s3cr3t"):
        assert secret not in text, secret
    found = lines(captured)
    assert len(found) == 5
    # What is not a secret stays readable: the user, the host, the non-secret header.
    assert found[0]["event"] == "connecting to postgresql://agentrun:[REDACTED]@db.internal:5432/agentrun"
    assert "host=db.internal" in found[1]["event"] and "password=[REDACTED]" in found[1]["event"]
    assert found[2]["api_key"] == "[REDACTED]" and found[2]["headers"]["Accept"] == "json"
    assert found[2]["headers"]["Authorization"] == "[REDACTED]"
    assert found[3]["url"] == "https://x-access-token:[REDACTED]@github.com/acme/web.git"
    assert found[3]["client_secret"] == "[REDACTED]"
    assert "RuntimeError" in found[4]["exception"] and found[4]["level"] == "error"
    assert all(line["timestamp"].endswith("Z") and line["logger"] == "agentrun.test" for line in found)


@pytest.mark.django_db
def test_a_request_s_lines_carry_its_id_tenant_and_run(captured):
    api = make_key("client")
    run = make_run()
    api.client.get(f"/api/v1/runs/{run.id}x", HTTP_X_REQUEST_ID="req-123", RAW_URI=f"/api/v1/runs/{run.id}x")
    [line] = [line for line in lines(captured) if line["logger"] == "django.request"]
    assert line["event"].startswith("Not Found")
    assert (line["request_id"], line["tenant_id"], line["run_id"]) == ("req-123", TENANT, f"{run.id}x")
    # The next request on this thread starts clean: without a key it has no tenant.
    captured.truncate(0)
    captured.seek(0)
    Client().get("/api/v1/runs/run_x", HTTP_X_REQUEST_ID="req-456")
    [line] = [line for line in lines(captured) if line["logger"] == "django.request"]
    assert (line["request_id"], line["run_id"]) == ("req-456", "run_x") and "tenant_id" not in line


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("sent", "kept"),
    [("4bf92f3577b34da6a3ce929d0e0e4736", True), ("a.b-c_d:e", True), ("x" * 129, False), ("bad id", False)],
)
def test_the_request_id_is_echoed_or_minted(sent, kept):
    response = Client().get("/api/v1/health", HTTP_X_REQUEST_ID=sent)
    echoed = response["X-Request-ID"]
    if kept:
        assert echoed == sent
    else:
        assert echoed != sent and len(echoed) == 32
    assert len(Client().get("/livez")["X-Request-ID"]) == 32


def test_console_lines_are_for_a_person():
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    config = logs.formatter(logs.CONSOLE)
    factory = config.pop("()")
    handler.setFormatter(factory(**config))
    logger = logging.getLogger("agentrun.console-test")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logs.bind(request_id="r-1")
        logger.warning("token=%s reaped", "sk-proj-abcdefghijklmnopqrstuvwxyz012345")
    finally:
        logs.clear()
        logger.removeHandler(handler)
    text = buffer.getvalue()
    assert not text.startswith("{") and "reaped" in text and "request_id=r-1" in text
    assert "sk-proj" not in text


def test_the_settings_use_the_formatter_for_every_logger():
    config = logs.logging_config(fmt=logs.JSON, access_file="/tmp/access.log")
    for name in ("django", "gunicorn.error", "uvicorn.error"):
        assert config["loggers"][name]["handlers"] == ["console"]
    assert config["loggers"]["uvicorn.access"]["handlers"] == ["access"]
    logging.config.dictConfig(
        {**config, "handlers": {**config["handlers"], "access": {"class": "logging.NullHandler"}}}
    )
    from django.conf import settings

    logging.config.dictConfig(settings.LOGGING)  # back as the suite runs


def test_objects_and_deep_values_are_redacted_as_text(captured):
    class Request:
        def __repr__(self):
            return "<Request GET /hook?token=ghp_abcdefghijklmnopqrstuvwxyz0123456789>"

    deep: dict = {"value": "Bearer eyJhbGciOiJIUzI1NiJ9.payload.signature"}
    for _ in range(12):
        deep = {"nested": deep}
    logging.getLogger("agentrun.test").warning("odd fields", extra={"request": Request(), "deep": deep})
    text = captured.getvalue()
    assert "ghp_abcdefghijklmnopqrstuvwxyz" not in text and "eyJhbGciOiJIUzI1NiJ9" not in text
    [line] = lines(captured)
    assert line["request"].startswith("<Request GET /hook?token=")
