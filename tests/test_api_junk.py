"""Junk bodies on every write route answer 4xx in the envelope, never 500, and write nothing."""

from __future__ import annotations

import pytest

from queues.models import QueueTask
from runs.models import Command, RunEvent
from sessions.models import Session
from tests.helpers import claim, make_key, make_run

pytestmark = pytest.mark.django_db
JUNK = ["[]", '"text"', "123", "null", '{"unexpected": 1}', '{"a": ' * 50 + "1" + "}" * 50, "{not json", ""]


@pytest.fixture
def targets():
    run = make_run(session_id="junk-s")
    claim(run)
    from runs import services

    command, _ = services.command_create(run_id=run.id, command_type="turn", payload={"prompt": "x"})
    task = make_key("client").post("queue-tasks", {"queue": "q", "backendProfile": "echo"})[1]
    return [
        ("client", "post", "runs"),
        ("client", "post", f"runs/{run.id}/commands"),
        ("client", "put", "sessions/junk-s"),
        ("client", "post", "sessions/junk-s/read"),
        ("client", "post", "queue-tasks"),
        ("client", "post", f"queue-tasks/{task['id']}/read"),
        ("operator", "post", f"queue-tasks/{task['id']}/attempt"),
        ("runner", "post", f"runs/{run.id}/claim"),
        ("runner", "post", f"runs/{run.id}/heartbeat"),
        ("runner", "post", f"runs/{run.id}/events"),
        ("runner", "post", f"runs/{run.id}/finish"),
        ("runner", "post", f"runs/{run.id}/runner-jobs"),
        ("runner", "post", f"commands/{command.id}/ack"),
        ("runner", "post", f"commands/{command.id}/finish"),
        ("runner", "post", "sessions/junk-s/storage"),
        ("runner", "post", "sessions/junk-s/storage/evict"),
        ("runner", "post", "runners"),
    ]


def test_junk_bodies_are_4xx_in_the_envelope(targets):
    keys = {role: make_key(role) for role in ("client", "runner", "operator")}
    before = (RunEvent.objects.count(), Command.objects.count(), Session.objects.count(), QueueTask.objects.count())
    versions = dict(Session.objects.values_list("session_id", "version"))
    for role, method, path in targets:
        for body in JUNK:
            status, answer = keys[role].raw(method, path, body.encode())
            # Registering a runner takes any object (its fields are kept): 2xx there is right.
            if status < 300:
                assert path == "runners" and (body == "" or body.startswith("{")), (path, body, status)
                continue
            assert 400 <= status < 500, (role, method, path, body, status, answer)
            assert set(answer) == {"error"} and answer["error"]["kind"], (path, body, answer)
    assert (
        RunEvent.objects.count(),
        Command.objects.count(),
        Session.objects.count(),
        QueueTask.objects.count(),
    ) == before
    assert dict(Session.objects.values_list("session_id", "version")) == versions
