"""The reference runner against a live server: claim, turns through the echo backend, steer,
cancel, lease loss, retries. (The end-to-end tests with gunicorn and the worker are apart.)"""

from __future__ import annotations

import json
import os
import time

import httpx
import pytest

from runner.client import AgentRunClient
from runner.runner import Runner
from runs import services
from runs.models import Command, Run, RunEvent
from tests.helpers import make_run, start_runner, usurp, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def types(run_id):
    return [(e.type, e.payload.get("phase")) for e in RunEvent.objects.filter(run_id=run_id).order_by("seq")]


def test_a_turn_runs_through_the_echo_backend_and_the_run_finishes(live_server, keys, tmp_path):
    run = make_run(session_id="runner-s1")
    command, _ = services.command_create(
        run_id=run.id, command_type="turn", payload={"prompt": "hello there\nrun: echo from-shell\nedit: notes.txt"}
    )
    _runner, runner_thread = start_runner(live_server.url, keys[1], run.id, tmp_path)
    assert runner_thread.join(30) == [0]
    stored = Run.objects.get(pk=run.id)
    assert stored.status == "completed" and stored.lease_expires_at is None
    assert Command.objects.get(pk=command.id).state == "completed"
    events = list(RunEvent.objects.filter(run_id=run.id).order_by("seq"))
    message = next(e for e in events if e.type == "assistant_message")
    assert message.payload["text"].startswith("hello there")
    output = next(e for e in events if e.type == "command_output")
    assert output.payload["output"] == "from-shell\n" and output.payload["exitCode"] == 0
    diff = next(e for e in events if e.type == "diff")
    assert "+++ b/notes.txt" in diff.payload["patch"] and (tmp_path / "notes.txt").exists()
    assert events[-1].type == "terminal_status" and events[-1].payload["terminalStatus"] == "completed"
    assert stored.session_ref.get("threadId")  # the echo thread, recorded on the session


def test_a_failing_turn_fails_the_run(live_server, keys, tmp_path):
    run = make_run()
    services.command_create(run_id=run.id, command_type="turn", payload={"prompt": "fail"})
    _, runner_thread = start_runner(live_server.url, keys[1], run.id, tmp_path)
    assert runner_thread.join(30) == [0]
    stored = Run.objects.get(pk=run.id)
    assert stored.status == "failed" and stored.failure_kind == "agent-failed"


def test_two_turns_run_in_order_on_one_thread(live_server, keys, tmp_path):
    run = make_run(session_id="runner-s2")
    services.command_create(run_id=run.id, command_type="turn", payload={"prompt": "one"})
    _runner, runner_thread = start_runner(live_server.url, keys[1], run.id, tmp_path, idle_seconds=3)
    assert wait_for(lambda: Command.objects.filter(run_id=run.id, state="completed").count() == 1)
    services.command_create(run_id=run.id, command_type="turn", payload={"prompt": "two"})
    runner_thread.join(30)
    texts = [
        e.payload["text"] for e in RunEvent.objects.filter(run_id=run.id, type="assistant_message").order_by("seq")
    ]
    assert texts == ["one", "two"]
    commands = list(Command.objects.filter(run_id=run.id).order_by("seq"))
    assert [c.state for c in commands] == ["completed", "completed"]
    assert commands[0].thread_id == commands[1].thread_id  # the second turn resumed the thread


def test_steer_reaches_the_turn_in_progress(live_server, keys, tmp_path):
    run = make_run()
    services.command_create(run_id=run.id, command_type="turn", payload={"prompt": "sleep: 3"})
    runner, runner_thread = start_runner(live_server.url, keys[1], run.id, tmp_path)
    assert wait_for(lambda: runner.turn is not None)
    steer, _ = services.command_create(run_id=run.id, command_type="steer", payload={"text": "left please"})
    runner_thread.join(30)
    assert Command.objects.get(pk=steer.id).state == "completed"
    texts = [e.payload["text"] for e in RunEvent.objects.filter(run_id=run.id, type="assistant_message")]
    assert "steered: left please" in texts


def test_cancelling_the_run_kills_the_agent_process_group(live_server, keys, tmp_path):
    run = make_run()
    services.command_create(run_id=run.id, command_type="turn", payload={"prompt": "sleep: 60"})
    runner, runner_thread = start_runner(live_server.url, keys[1], run.id, tmp_path, grace_seconds=1)
    assert wait_for(lambda: runner.turn is not None)
    pid = runner.turn.process.pid
    started = time.monotonic()
    services.run_cancel(run_id=run.id, reason="enough")
    assert runner_thread.join(20) == [0] and time.monotonic() - started < 10
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert Run.objects.get(pk=run.id).status == "cancelled"


def test_a_runner_whose_lease_is_taken_over_stops_and_writes_nothing_more(live_server, keys, tmp_path):
    run = make_run()
    services.command_create(run_id=run.id, command_type="turn", payload={"prompt": "sleep: 60"})
    runner, runner_thread = start_runner(live_server.url, keys[1], run.id, tmp_path, lease_ms=1000, grace_seconds=1)
    assert wait_for(lambda: runner.turn is not None)
    pid = runner.turn.process.pid
    assert usurp(run.id)
    assert runner_thread.join(20) == [3]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    stored = Run.objects.get(pk=run.id)
    assert stored.claimed_by == "usurper" and stored.status == "claimed"


class LosesResponses(httpx.HTTPTransport):
    """Delivers every request, but loses the first answer to each event batch: the runner must
    retry without appending anything twice."""

    def __init__(self):
        super().__init__()
        self.seen = set()
        self.lost = 0

    def handle_request(self, request):
        response = super().handle_request(request)
        if request.method == "POST" and request.url.path.endswith("/events"):
            key = json.loads(request.content).get("batchKey")
            if key not in self.seen:
                self.seen.add(key)
                response.read()
                self.lost += 1
                raise httpx.ReadError("connection reset after the server answered", request=request)
        return response


def test_lost_answers_are_retried_and_no_event_is_appended_twice(live_server, keys, tmp_path):
    run = make_run()
    prompt = "\n".join(f"run: echo line-{i}" for i in range(8))
    services.command_create(run_id=run.id, command_type="turn", payload={"prompt": prompt})
    transport = LosesResponses()
    client = AgentRunClient(live_server.url, keys[1], transport=transport)
    try:
        code = Runner(client, run.id, workdir=str(tmp_path), idle_seconds=0.3, lease_ms=3000).run()
    finally:
        client.close()
    assert code == 0 and transport.lost >= 1
    outputs = [
        e.payload["output"] for e in RunEvent.objects.filter(run_id=run.id, type="command_output").order_by("seq")
    ]
    assert outputs == [f"line-{i}\n" for i in range(8)]  # each once, in order
    seqs = list(RunEvent.objects.filter(run_id=run.id).order_by("seq").values_list("seq", flat=True))
    assert seqs == list(range(1, len(seqs) + 1))
    assert Run.objects.get(pk=run.id).status == "completed"


def test_a_run_whose_only_turn_was_cancelled_before_the_claim_ends_after_idle_seconds(live_server, keys, tmp_path):
    run = make_run()
    command, _ = services.command_create(run_id=run.id, command_type="turn", payload={"prompt": "never"})
    services.command_cancel(command_id=command.id, reason="changed my mind")
    started = time.monotonic()
    _runner, runner_thread = start_runner(live_server.url, keys[1], run.id, tmp_path, first_command_seconds=60)
    assert runner_thread.join(30) == [0] and time.monotonic() - started < 20
    stored = Run.objects.get(pk=run.id)
    assert (stored.status, stored.failure_kind) == ("cancelled", "cancelled")
    assert stored.failure_message == "every turn was cancelled before it started"
