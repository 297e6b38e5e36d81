"""Appends while a prune runs: the rate a runner appends at with no prune, beside the rate while
`manage.py prune` deletes 1,000,000 old events in batches.

What is measured (`make bench`, or `.venv/bin/python bench/bench_retention.py --help`):

a. alone: W writer threads, each appending batches of B events to its own claimed run through
   `runs.services.event_append` (Django, one connection each), for S seconds: events per second
   and the p99 of an append.
b. during a prune: the same writers while `manage.py prune --older-than 30d` runs in another
   process over R ended runs of 40 days ago with E events each (1,000,000 by default). Their
   events sit in the partition older than every week's partition, with runs still going beside
   them (the writers'), so nothing can be dropped whole: this is the batched path, the slow one.
   It deletes 500 runs a batch, in transactions of at most 10,000 events 0.05 s apart (a run with
   more has its events deleted in seq ranges first). Reported: the writers' rate and p99 while the prune ran,
   the ratio to (a), how long the prune took and the events it deleted per second. Dropping a
   whole week's partition instead costs a moment whatever it holds.

Setup: DATABASE_URL's server, else the embedded PostgreSQL under var/; a fresh database
`agentrun_bench_retention`, migrated, seeded with SQL, dropped at the end.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from datetime import timedelta

from benchlib import ROOT, BenchmarkError, percentile, run_on_fresh_database

BENCH_DB = "agentrun_bench_retention"


def setup_django(db_url: str) -> None:
    os.environ["DATABASE_URL"] = db_url
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "settings.dev")
    import django

    django.setup()


def seed_old(runs: int, events: int) -> None:
    """`runs` cancelled runs of 40 days ago with `events` events each, in SQL."""
    from django.db import connection

    from runs import services
    from runs.models import Run

    template = services.run_create(tenant_id="bench", project_id="bench", backend_profile="echo")[0]
    old = template.created_at - timedelta(days=40)  # one time for a run and its events (the partition key)
    services.run_cancel(run_id=template.id)
    columns = [field.column for field in Run._meta.concrete_fields]
    chosen = {
        "id": "'old_' || i",
        "created_at": "%(old)s",
        "updated_at": "%(old)s",
        "idempotency_key": "NULL",
        "last_event_seq": str(events),
    }
    select = ", ".join(chosen.get(name, f't."{name}"') for name in columns)
    names = ", ".join(f'"{name}"' for name in columns)
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO runs_run ({names}) SELECT {select} FROM runs_run t, generate_series(1, %(runs)s) i "  # noqa: S608 - column names from the model
            "WHERE t.id = %(template)s",
            {"old": old, "runs": runs, "template": template.id},
        )
        cursor.execute(
            "INSERT INTO runs_runevent (id, run_id, seq, type, payload, created_at, run_created_at) "
            "SELECT 'evt_old_' || r || '_' || s, 'old_' || r, s, 'assistant_message', "
            "jsonb_build_object('text', repeat('x', 80), 'n', s), %s, %s "
            "FROM generate_series(1, %s) r, generate_series(1, %s) s",
            [old, old, runs, events],
        )
        cursor.execute("ANALYZE runs_run")
        cursor.execute("ANALYZE runs_runevent")
    connection.close()


def claimed_runs(count: int) -> list:
    from runs import services

    leases = []
    for index in range(count):
        run = services.run_create(tenant_id="bench", project_id="bench", backend_profile="echo")[0]
        leases.append(services.run_claim(run_id=run.id, runner_id=f"writer-{index}", lease_ms=3_600_000))
    return leases


def writers(leases: list, batch: int, stop: threading.Event) -> tuple[list[int], list[float]]:
    """Append until `stop`; (events per writer, append latencies)."""
    from django.db import connection

    from runs import services

    counts = [0] * len(leases)
    latencies: list[float] = []
    lock = threading.Lock()

    def write(index: int) -> None:
        lease = leases[index]
        mine = []
        try:
            while not stop.is_set():
                began = time.perf_counter()
                services.event_append(
                    run_id=lease.id,
                    runner_id=f"writer-{index}",
                    lease_epoch=lease.lease_epoch,
                    events=[("assistant_message", {"text": f"line {counts[index] + i}"}) for i in range(batch)],
                )
                mine.append(time.perf_counter() - began)
                counts[index] += batch
        finally:
            connection.close()
            with lock:
                latencies.extend(mine)

    threads = [threading.Thread(target=write, args=(index,)) for index in range(len(leases))]
    for thread in threads:
        thread.start()
    return counts, latencies, threads  # type: ignore[return-value]


def measure_window(leases, batch: int, until) -> tuple[float, float, float]:
    """(events/s, p99 ms, seconds) of the writers while `until()` has not returned."""
    stop = threading.Event()
    counts, latencies, threads = writers(leases, batch, stop)
    began = time.perf_counter()
    until()
    elapsed = time.perf_counter() - began
    stop.set()
    for thread in threads:
        thread.join(60)
    return sum(counts) / elapsed, percentile(latencies, 99) * 1000, elapsed


def measure(db_url: str, _server: str, source: str, args: argparse.Namespace) -> None:
    setup_django(db_url)
    from runs.models import RunEvent

    total = args.runs * args.events
    print(f"setup: {args.runs} ended runs of 40 days ago with {args.events} events each ({total:,} events) ...")
    began = time.monotonic()
    seed_old(args.runs, args.events)
    print(f"setup: seeded in {time.monotonic() - began:.0f} s")
    leases = claimed_runs(args.writers)

    rate_alone, p99_alone, _ = measure_window(leases, args.batch, lambda: time.sleep(args.seconds))
    print(
        f"\na. alone: {rate_alone:,.0f} events/s, append p99 {p99_alone:.1f} ms ({args.writers} writers x {args.batch})"
    )

    env = {**os.environ, "DATABASE_URL": db_url, "DJANGO_SETTINGS_MODULE": "settings.dev"}
    pruned: dict = {}

    def prune() -> None:
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "manage.py", "prune", "--older-than", "30d", "--batch", str(args.prune_batch)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        pruned.update(seconds=time.perf_counter() - started, out=done.stdout.strip(), err=done.stderr[-2000:])
        if done.returncode != 0:
            raise BenchmarkError(f"prune failed: {pruned['err']}")

    rate_during, p99_during, _ = measure_window(leases, args.batch, prune)
    left = RunEvent.objects.filter(run__id__startswith="old_").count()
    if left:
        raise BenchmarkError(f"the prune left {left} old events: {pruned}")
    print(f"b. during a prune: {rate_during:,.0f} events/s, append p99 {p99_during:.1f} ms")
    print(f"   the prune: {pruned['out']}")
    print(
        f"   took {pruned['seconds']:.1f} s: {total / pruned['seconds']:,.0f} events deleted/s "
        f"(batches of {args.prune_batch} runs)"
    )
    print(f"\nratio during/alone: {rate_during / rate_alone:.2f} (events/s), append p99 {p99_during / p99_alone:.1f}x")
    print(f"database: {source}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1000, help="old ended runs (default 1000)")
    parser.add_argument("--events", type=int, default=1000, help="events per old run (default 1000)")
    parser.add_argument("--writers", type=int, default=2, help="appending threads (default 2)")
    parser.add_argument("--batch", type=int, default=10, help="events per append (default 10)")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the window alone (default 10)")
    parser.add_argument("--prune-batch", type=int, default=500, help="runs per prune transaction (default 500)")
    args = parser.parse_args()
    return run_on_fresh_database(BENCH_DB, lambda url, server, source: measure(url, server, source, args))


if __name__ == "__main__":
    sys.exit(main())
