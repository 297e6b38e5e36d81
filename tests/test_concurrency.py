"""Races with real threads against the real database: the invariants hold whoever wins."""

from __future__ import annotations

from collections import Counter

import pytest

from agentrun.errors import AgentRunError
from runs import services
from runs.models import Command, Run, RunEvent, RunnerJob
from sessions.models import Session
from tests.helpers import PROJECT, TENANT, in_threads, make_run

pytestmark = pytest.mark.django_db(transaction=True)


def test_sixteen_racing_claims_make_exactly_one_holder():
    run = make_run()
    results = in_threads(
        16, lambda i: services.run_claim(run_id=run.id, runner_id=f"runner-{i}", lease_ms=60_000), catch=AgentRunError
    )
    winners = [r for r in results if isinstance(r, Run)]
    losers = [r for r in results if isinstance(r, AgentRunError)]
    assert len(winners) == 1 and len(losers) == 15
    assert {e.kind for e in losers} == {"runner-lease-conflict"}
    stored = Run.objects.get(pk=run.id)
    assert stored.claimed_by == winners[0].claimed_by and stored.lease_epoch == 1
    assert RunEvent.objects.filter(run_id=run.id, payload__phase="run-claimed").count() == 1


def test_fifty_racing_identical_command_creates_make_one_command():
    run = make_run(session_id="race-cmd")
    results = in_threads(
        50,
        lambda i: services.command_create(
            run_id=run.id, command_type="turn", payload={"prompt": "same"}, idempotency_key="once"
        ),
        catch=AgentRunError,
    )
    assert not [r for r in results if isinstance(r, AgentRunError)]
    assert {command.id for command, _ in results} == {Command.objects.get(run_id=run.id).id}
    assert sum(created for _, created in results) == 1
    assert RunEvent.objects.filter(run_id=run.id, payload__phase="command-created").count() == 1


def test_eight_runners_appending_batches_get_gapless_seqs():
    runs = [make_run(session_id=f"race-seq-{i}") for i in range(8)]
    for run in runs:
        services.run_claim(run_id=run.id, runner_id=f"r-{run.id}", lease_ms=60_000)
    batches, batch_size = 12, 25

    def append(index):
        run = runs[index % 8]
        for batch in range(batches // 2):
            services.event_append(
                run_id=run.id,
                runner_id=f"r-{run.id}",
                lease_epoch=1,
                events=[("assistant_message", {"n": n, "w": index}) for n in range(batch_size)],
                batch_key=f"w{index}-b{batch}",
            )

    # Two writers per run, so appends to one run really interleave.
    results = in_threads(16, append, catch=AgentRunError)
    assert not [r for r in results if isinstance(r, AgentRunError)]
    for run in runs:
        seqs = list(RunEvent.objects.filter(run_id=run.id).order_by("seq").values_list("seq", flat=True))
        expected = 2 + batches * batch_size  # run-created, run-claimed, then the batches
        assert seqs == list(range(1, expected + 1))
        assert Run.objects.get(pk=run.id).last_event_seq == expected
        assert Session.objects.get(pk=run.session_id).last_event_seq == expected


def test_stale_epoch_writes_nothing_while_a_takeover_races():
    run = make_run()
    services.run_claim(run_id=run.id, runner_id="old", lease_ms=1)  # a lease that lapses at once
    before = RunEvent.objects.filter(run_id=run.id).count()

    def work(index):
        if index == 0:
            return services.run_claim(run_id=run.id, runner_id="new", lease_ms=60_000)
        return services.event_append(run_id=run.id, runner_id="old", lease_epoch=1, events=[("error", {"i": index})])

    results = in_threads(8, work, catch=AgentRunError)
    stored = Run.objects.get(pk=run.id)
    assert stored.claimed_by == "new" and stored.lease_epoch == 2
    old_writes = [r for r in results[1:] if not isinstance(r, AgentRunError)]
    refused = [r for r in results[1:] if isinstance(r, AgentRunError)]
    assert all(e.kind == "runner-lease-conflict" for e in refused)
    # Every append by the old holder either landed before the takeover or wrote nothing.
    errors_after = RunEvent.objects.filter(run_id=run.id, type="error").count()
    assert errors_after == len(old_writes)
    takeover_seq = RunEvent.objects.get(run_id=run.id, payload__runnerId="new").seq
    assert not RunEvent.objects.filter(run_id=run.id, type="error", seq__gt=takeover_seq).exists()
    assert RunEvent.objects.filter(run_id=run.id).count() == before + len(old_writes) + 1


def test_racing_run_creates_with_one_key_make_one_run():
    results = in_threads(
        12,
        lambda i: services.run_create(
            tenant_id=TENANT, project_id=PROJECT, backend_profile="echo", idempotency_key="k", metadata={"m": 1}
        ),
        catch=AgentRunError,
    )
    assert not [r for r in results if isinstance(r, AgentRunError)]
    assert len({run.id for run, _ in results}) == 1 and Run.objects.count() == 1
    assert sum(created for _, created in results) == 1


def test_racing_runs_on_a_new_session_make_one_session():
    results = in_threads(
        10,
        lambda i: services.run_create(
            tenant_id=TENANT, project_id=PROJECT, backend_profile="echo", session_ref={"sessionId": "shared"}
        ),
        catch=AgentRunError,
    )
    assert not [r for r in results if isinstance(r, AgentRunError)]
    assert Session.objects.filter(pk="shared").count() == 1 and Run.objects.count() == 10


def test_racing_new_session_across_tenants_has_one_owner():
    def work(index):
        return services.run_create(
            tenant_id=f"t{index % 2}",
            project_id=PROJECT,
            backend_profile="echo",
            session_ref={"sessionId": "contested"},
        )

    results = in_threads(8, work, catch=AgentRunError)
    owner = Session.objects.get(pk="contested").tenant_id
    for index, result in enumerate(results):
        if f"t{index % 2}" == owner:
            assert isinstance(result[0], Run)
        else:
            assert isinstance(result, AgentRunError) and result.kind == "tenant-policy-denied"


def test_racing_runner_job_saves_with_one_key_make_one_job():
    run = make_run()
    fields = {
        "command_id": "cmd_1",
        "payload_hash": "h",
        "attempt_id": "a",
        "runner_id": "r",
        "namespace": "ns",
        "job_name": "j",
        "manager_url": "http://m",
        "image": "i",
        "source_commit": "c",
        "service_account_name": None,
        "result": {},
    }
    results = in_threads(
        10, lambda i: services.runner_job_save(run_id=run.id, fields=fields, idempotency_key="job"), catch=AgentRunError
    )
    assert not [r for r in results if isinstance(r, AgentRunError)]
    assert RunnerJob.objects.count() == 1 and Counter(created for _, created in results)[True] == 1


def test_racing_finish_and_cancel_end_the_run_once():
    run = make_run()
    services.run_claim(run_id=run.id, runner_id="r", lease_ms=60_000)

    def work(index):
        if index % 2:
            return services.run_cancel(run_id=run.id, reason="stop")
        return services.run_finish(run_id=run.id, runner_id="r", lease_epoch=1, terminal_status="completed")

    in_threads(6, work, catch=AgentRunError)
    assert RunEvent.objects.filter(run_id=run.id, type="terminal_status").count() == 1
