"""write_transaction retries what a race aborted: a real deadlock between two services, and the
unique violation of a service that looks before it inserts; inside a caller's transaction it
leaves the retry to the caller. What still fails is mapped to an answer, never a 500."""

from __future__ import annotations

import threading

import pytest
from django.db import IntegrityError, OperationalError, connection, transaction

from agentrun.errors import to_agentrun_error
from agentrun.models import Counter
from agentrun.transactions import ATTEMPTS, sqlstate, write_transaction
from tests.helpers import in_threads

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_real_deadlock_is_retried_and_both_writers_succeed():
    Counter.objects.bulk_create([Counter(name="a", value=0), Counter(name="b", value=0)])
    barrier = threading.Barrier(2)
    calls = {0: 0, 1: 0}

    def lock_both(index: int):
        @write_transaction
        def work():
            calls[index] += 1
            first, second = ("a", "b") if index == 0 else ("b", "a")
            Counter.objects.select_for_update().get(name=first)
            if calls[index] == 1:
                barrier.wait(timeout=10)  # both hold their first row: each now waits for the other's
            Counter.objects.filter(name=second).update(value=index + 1)
            return index

        return work()

    assert sorted(in_threads(2, lock_both)) == [0, 1]
    # PostgreSQL aborted one of the two; it ran again and succeeded.
    assert sum(calls.values()) == 3


def test_inside_a_callers_transaction_the_error_goes_to_the_caller():
    attempts = []

    @write_transaction(retry_unique=True)
    def insert_twice():
        attempts.append(1)
        Counter.objects.create(name="same", value=1)

    Counter.objects.create(name="same", value=0)
    with pytest.raises(IntegrityError), transaction.atomic():
        insert_twice()
    assert attempts == [1]


def test_a_unique_violation_is_retried_only_when_asked_and_gives_up_after_the_attempts():
    Counter.objects.create(name="taken", value=0)
    attempts = []

    @write_transaction
    def plain():
        attempts.append("plain")
        Counter.objects.create(name="taken", value=1)

    @write_transaction(retry_unique=True)
    def retried():
        attempts.append("retried")
        Counter.objects.create(name="taken", value=1)

    with pytest.raises(IntegrityError):
        plain()
    with pytest.raises(IntegrityError) as failure:
        retried()
    assert attempts.count("plain") == 1 and attempts.count("retried") == ATTEMPTS
    assert sqlstate(failure.value) == "23505"


def test_a_race_lost_every_time_is_a_409_and_a_dead_connection_is_503():
    with connection.cursor() as cursor:
        try:
            cursor.execute("DO $$ BEGIN RAISE EXCEPTION 'x' USING ERRCODE = '40P01'; END $$")
        except OperationalError as exc:
            deadlock = exc
    error = to_agentrun_error(deadlock)
    assert (error.status, error.kind, error.details) == (409, "schema-invalid", {"retryable": True})
    error = to_agentrun_error(OperationalError("server closed the connection unexpectedly"))
    assert (error.status, error.kind) == (503, "infra-failed")


def test_a_service_needed_both_ways_is_a_durable_service_and_a_step():
    from runs import services

    assert services.run_cancel.__name__ == "run_cancel"
    with transaction.atomic(), pytest.raises(RuntimeError, match="durable"):
        services.run_cancel(run_id="run_missing")  # a durable service refuses to nest
    with pytest.raises(RuntimeError, match="must run inside its caller's transaction"):
        services.run_cancel_in_transaction(run_id="run_missing")
