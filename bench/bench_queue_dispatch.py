"""The queue end to end: create -> dispatch -> a runner claims and finishes -> task completed,
in tasks per second, beside a raw-SQL baseline of the dispatcher's claim in the same run.

What is measured (`make bench`, or `.venv/bin/python bench/bench_queue_dispatch.py --help`):

a. end to end: P producer processes create N tasks (`queues.services.task_create`); D
   dispatcher processes (`queues.dispatcher.Dispatcher.serve`, woken by NOTIFY) turn each into a
   run and its first turn; R no-op runner processes (claim the pending run, finish it
   `completed`) end the runs; the dispatchers settle the tasks. From the first create to the
   last task completed.
b. dispatch alone: N tasks already pending, D dispatcher processes, until every task runs.
a'. the baseline: N pending rows, D psycopg connections each claiming in a loop what the
   dispatcher claims: SELECT ... ORDER BY priority DESC, created_at, id LIMIT 1 FOR UPDATE SKIP
   LOCKED, UPDATE ... SET state = 'running', COMMIT. No run, no command, no Django.

Setup: DATABASE_URL's server, else the embedded PostgreSQL under var/; a fresh database
`agentrun_bench_queue`, migrated and dropped at the end.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import psycopg
from benchlib import BenchmarkError, run_on_fresh_database

BENCH_DB = "agentrun_bench_queue"
TENANT = PROJECT = "bench"
TIMEOUT_SECONDS = 600

RAW_CLAIM = """
SELECT id FROM queues_queuetask WHERE state = 'pending' AND queue = %s
ORDER BY priority DESC, created_at, id LIMIT 1 FOR UPDATE SKIP LOCKED
"""


def raw_seed(db_url: str, queue: str, count: int) -> None:
    with psycopg.connect(db_url) as conn:
        conn.execute(
            "INSERT INTO queues_queuetask (id, tenant_id, project_id, queue, lane, title, priority, backend_profile, "
            "state, version, payload_hash, created_at, updated_at, attempt_count, payload) "
            "SELECT 'raw_' || i, %s, %s, %s, 'l', 't', i %% 7, 'echo', 'pending', -i, 'x', now(), now(), 0, "
            "'{}'::jsonb "
            "FROM generate_series(1, %s) i",
            [TENANT, PROJECT, queue, count],
        )


def raw_claims(db_url: str, queue: str, count: int, workers: int) -> float:
    """Claims per second with `workers` connections until `count` rows are running."""
    raw_seed(db_url, queue, count)

    def claim_loop(_):
        claimed = 0
        with psycopg.connect(db_url) as conn:
            while True:
                with conn.transaction():
                    row = conn.execute(RAW_CLAIM, [queue]).fetchone()
                    if row is None:
                        return claimed
                    conn.execute(
                        "UPDATE queues_queuetask SET state = 'running', attempt_count = attempt_count + 1, "
                        "updated_at = now() WHERE id = %s",
                        [row[0]],
                    )
                claimed += 1

    began = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        total = sum(pool.map(claim_loop, range(workers)))
    elapsed = time.perf_counter() - began
    if total != count:
        raise BenchmarkError(f"the raw claim loop claimed {total} of {count}")
    return count / elapsed


def _setup():
    import django

    django.setup()


def _produce(ready, queue: str, indices: list[int]) -> None:
    _setup()
    from queues import services

    ready.wait()
    for index in indices:
        services.task_create(
            tenant_id=TENANT,
            project_id=PROJECT,
            queue=queue,
            lane="l",
            title=f"task {index}",
            priority=index % 7,
            backend_profile="echo",
            payload={"prompt": f"task {index}"},
        )


def _drain(ready) -> None:
    _setup()
    from queues import services

    ready.wait()
    while services.dispatch_one() is not None:
        pass


def _serve(stop) -> None:
    _setup()
    from queues.dispatcher import Dispatcher

    Dispatcher().serve(stop)


def _run_noop(index: int, stop) -> None:
    """A no-op runner: claim each pending run and finish it `completed` (what the local
    launcher's runner does with a turn that takes no time, minus starting a process)."""
    _setup()
    from agentrun.errors import AgentRunError
    from runs import services as run_services
    from runs.models import Run

    runner_id = f"noop-{index}"
    while not stop.is_set():
        pending = list(Run.objects.filter(status="pending").values_list("id", flat=True)[:20])
        if not pending:
            time.sleep(0.02)
            continue
        for run_id in pending:
            try:
                run = run_services.run_claim(run_id=run_id, runner_id=runner_id, lease_ms=60_000)
            except AgentRunError:  # another runner won it
                continue
            run_services.run_finish(
                run_id=run_id, runner_id=runner_id, lease_epoch=run.lease_epoch, terminal_status="completed"
            )


def agentrun_figures(count: int, producers: int, dispatchers: int, runners: int) -> tuple[float, float, float]:
    """Each producer, dispatcher and runner is a process of its own, as deployed (API clients,
    worker replicas, runner pods), so no one interpreter lock bounds the figures."""
    import multiprocessing

    _setup()
    from django.db import connection

    from queues.models import QueueTask
    from runs.models import Run

    spawn = multiprocessing.get_context("spawn")

    def run_all(targets) -> tuple[float, float]:
        """Start the processes, let them set up, then time them from a common start:
        (that start, on perf_counter, and the seconds until the last one ended)."""
        ready = spawn.Barrier(len(targets) + 1)
        processes = [spawn.Process(target=target, args=(ready, *args)) for target, args in targets]
        for process in processes:
            process.start()
        ready.wait(timeout=120)
        began = time.perf_counter()
        for process in processes:
            process.join(TIMEOUT_SECONDS)
            if process.exitcode != 0:
                raise BenchmarkError(f"a bench process failed (exit {process.exitcode})")
        return began, time.perf_counter() - began

    def split(queue: str):
        return [(_produce, (queue, list(range(p, count, producers)))) for p in range(producers)]

    # b. dispatch alone
    run_all(split("dispatch"))
    dispatch_rate = count / run_all([(_drain, ()) for _ in range(dispatchers)])[1]
    if QueueTask.objects.filter(queue="dispatch", state="running").count() != count:
        raise BenchmarkError("not every task was dispatched once")
    Run.objects.filter(status="pending").update(status="cancelled")  # out of the runners' way
    connection.close()

    # a. end to end
    stop = spawn.Event()
    background = [spawn.Process(target=_serve, args=(stop,)) for _ in range(dispatchers)]
    background += [spawn.Process(target=_run_noop, args=(i, stop)) for i in range(runners)]
    for process in background:
        process.start()
    try:
        time.sleep(5.0)  # started and listening
        began, creating = run_all(split("e2e"))
        create_rate = count / creating
        deadline = time.monotonic() + TIMEOUT_SECONDS
        while QueueTask.objects.filter(queue="e2e", state="completed").count() < count:
            if time.monotonic() > deadline:
                raise BenchmarkError("timed out waiting for the queue to drain")
            time.sleep(0.02)
        end_to_end = count / (time.perf_counter() - began)
    finally:
        stop.set()
        for process in background:
            process.join(45)
            if process.is_alive():
                process.kill()
        connection.close()
    return end_to_end, dispatch_rate, create_rate


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--producers", type=int, default=4)
    parser.add_argument("--dispatchers", type=int, default=2)
    parser.add_argument("--runners", type=int, default=4)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def measure(db_url: str, server: str, source: str) -> None:
        os.environ.update(
            DATABASE_URL=db_url,
            DJANGO_SETTINGS_MODULE="settings.prod",
            DJANGO_SECRET_KEY=uuid.uuid4().hex,
            DJANGO_ALLOWED_HOSTS="*",
            AGENTRUN_DB_POOL_SIZE=str(args.producers + args.dispatchers + args.runners + 4),
        )
        raw = raw_claims(db_url, "raw", args.tasks, args.dispatchers)
        end_to_end, dispatch_rate, create_rate = agentrun_figures(
            args.tasks, args.producers, args.dispatchers, args.runners
        )
        print(
            f"\n{args.tasks:,} tasks; {args.producers} producers, {args.dispatchers} dispatchers, "
            f"{args.runners} no-op runners; {os.cpu_count()} CPUs shared by all"
        )
        print(
            f"{'a. end to end (create -> completed)':<44} {end_to_end:9,.0f} tasks/s   "
            f"ratio to baseline {end_to_end / raw:.3f}"
        )
        print(
            f"{'b. dispatch alone (task -> run + turn)':<44} {dispatch_rate:9,.0f} tasks/s   "
            f"ratio to baseline {dispatch_rate / raw:.3f}"
        )
        print(f"{'   creates (during a.)':<44} {create_rate:9,.0f} tasks/s")
        print(f"{chr(97)}'. raw SQL claim (SKIP LOCKED + UPDATE)      {raw:9,.0f} claims/s")

    def close_connections() -> None:
        if "django" in sys.modules:
            from django.db import connections

            connections.close_all()

    return run_on_fresh_database(BENCH_DB, measure, cleanup=close_connections)


if __name__ == "__main__":
    sys.exit(main())
