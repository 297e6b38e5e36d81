"""The soak: gunicorn, the worker and the runners it launches, under load and faults, for
SOAK_SECONDS; then the tables are checked for the invariants the service promises.

`make soak` (or `.venv/bin/python bench/soak.py`). Settings, from the environment:

  SOAK_SECONDS        how long the load and the faults last (default 600)
  SOAK_FAULTS         `all` (default), `none`, or a comma list of web-kill, runner-kill,
                      worker-kill, pg-restart
  SOAK_CLIENTS        client threads playing flows (default 6)
  SOAK_DRAIN_SECONDS  how long everything may take to end afterwards (default 120)
  SOAK_KEEP_DB=1      keep the scratch database and the logs (also `--keep-db`)
  SOAK_SEED           the random seed (default: the pid)
  SOAK_DATABASE       `auto` (default, as below) or `embedded`: a server of the soak's own,
                      whose restarts disturb nobody else on the machine

The scratch database `agentrun_soak_<pid>` is made on DATABASE_URL's server if set, else on the
machine's PostgreSQL at 127.0.0.1:5432 if it is up, else on an embedded server of the soak's own;
pg-restart restarts that server only when it is the machine's or the soak's own (the output says
which). All traffic goes to 127.0.0.1. Exit code 0 when no invariant was violated and no
acknowledged write was lost, 1 otherwise, 2 when the soak could not run.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from soak_checks import LOST_WRITE, Violation, check_tables
from soak_load import FLOWS, NO_500, Context, Recorder, client_loop
from soak_stack import (
    Faults,
    Stack,
    become_subreaper,
    create_database,
    drop_database,
    pick_server,
    snapshot_code,
)

TENANT = PROJECT = "soak"
FAULT_KINDS = ["web-kill", "runner-kill", "worker-kill", "pg-restart"]
LEASE_MS = 5000
REAP_GRACE_SECONDS = 5.0
PROGRESS_SECONDS = 15.0
RUNNER_KEPT = "a live runner keeps its run"
TABLE_INVARIANTS = [
    "seq gapless per run",
    "one terminal per run",
    "one command-terminal per command",
    "one holder per epoch",
    "one start per task attempt",
    LOST_WRITE,
    "no run claimed past lease + grace",
    "everything ended after the drain",
    NO_500,
    RUNNER_KEPT,
]


def settings_from(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=float(os.environ.get("SOAK_SECONDS", "600")))
    parser.add_argument("--faults", default=os.environ.get("SOAK_FAULTS", "all"))
    parser.add_argument("--clients", type=int, default=int(os.environ.get("SOAK_CLIENTS", "6")))
    parser.add_argument("--drain-seconds", type=float, default=float(os.environ.get("SOAK_DRAIN_SECONDS", "120")))
    parser.add_argument("--keep-db", action="store_true", default=os.environ.get("SOAK_KEEP_DB", "") not in ("", "0"))
    parser.add_argument("--seed", type=int, default=int(os.environ.get("SOAK_SEED") or os.getpid()))
    parser.add_argument("--database", choices=["auto", "embedded"], default=os.environ.get("SOAK_DATABASE", "auto"))
    args = parser.parse_args(argv)
    wanted = args.faults.strip().lower()
    args.fault_kinds = (
        FAULT_KINDS
        if wanted == "all"
        else []
        if wanted in ("", "none")
        else [kind.strip() for kind in wanted.split(",") if kind.strip()]
    )
    unknown = set(args.fault_kinds) - set(FAULT_KINDS)
    if unknown:
        parser.error(f"unknown faults {sorted(unknown)}; known: {', '.join(FAULT_KINDS)}")
    return args


def print_table(title: str, headers: list[str], rows: list[list]) -> None:
    cells = [[str(cell) for cell in row] for row in [headers, *rows]]
    widths = [max(len(row[index]) for row in cells) for index in range(len(headers))]
    print(f"\n{title}")
    for number, row in enumerate(cells):
        print("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
        if number == 0:
            print("  " + "  ".join("-" * width for width in widths))


def statuses(counter: Counter) -> str:
    return " ".join(f"{status} x{count}" for status, count in sorted(counter.items(), key=lambda item: str(item[0])))


def classify_server_errors(recorder: Recorder) -> tuple[Counter, list[str]]:
    """5xx by class: 503 while PostgreSQL restarted (expected), 500 (a violation), any other;
    and examples of the unexpected ones."""
    classes: Counter = Counter()
    examples = []
    for at, request, status, body in recorder.server_errors:
        in_restart = any(kind == "pg-restart" and start <= at <= end for kind, start, end in recorder.windows)
        if status == 500:
            classes["500 (violation)"] += 1
            recorder.violation(NO_500, f"{request}: {body[:200]}")
        elif status == 503 and in_restart:
            classes["503 during a PostgreSQL restart"] += 1
            continue
        else:
            classes[f"{status} {'during' if in_restart else 'outside'} a PostgreSQL restart"] += 1
        examples.append(f"{status} {request}: {' '.join(body.split())[:200]}")
    return classes, examples


def runners_lost_alive(cursor, recorder: Recorder) -> list[Violation]:
    """A run the reaper failed `runner-lost` had a worker-launched runner the soak killed: a
    runner left alive renews its lease (through web kills and PostgreSQL restarts)."""
    cursor.execute(
        "SELECT id, claimed_by, failure_message FROM runs_run WHERE failure_kind = 'runner-lost' "
        "AND claimed_by LIKE %s ORDER BY id",
        ["local-%"],
    )
    return [
        Violation(RUNNER_KEPT, f"run {run_id} ({holder}): {message}")
        for run_id, holder, message in cursor.fetchall()
        if run_id not in recorder.killed_runs
    ]


def active_work(db_url: str) -> int | None:
    try:
        with psycopg.connect(db_url, autocommit=True, connect_timeout=3) as conn:
            runs = conn.execute("SELECT count(*) FROM runs_run WHERE status IN ('pending', 'claimed')").fetchone()[0]
            tasks = conn.execute("SELECT count(*) FROM queues_queuetask WHERE state IN ('pending', 'running')")
            return runs + tasks.fetchone()[0]
    except psycopg.Error:
        return None


def soak(args: argparse.Namespace, tmp: Path) -> int:
    server = pick_server(tmp / "pg", args.database)
    name = f"agentrun_soak_{os.getpid()}"
    code = tmp / "code"
    code.mkdir()
    print(f"soak: {args.seconds:.0f} s, {args.clients} client threads, seed {args.seed}, {os.cpu_count()} cores")
    print(f"code: {snapshot_code(code)}, copied to {code}")
    print(f"database: {name} on {server.source}")
    if "pg-restart" in args.fault_kinds:
        if server.restart:
            print(f"pg-restart: restarts {server.source} with `{' '.join(server.restart)}`")
        else:
            print(f"pg-restart: skipped ({server.why_not})")
    print(
        f"faults: {', '.join(args.fault_kinds) or 'none'}; runner lease {LEASE_MS} ms, "
        f"reap grace {REAP_GRACE_SECONDS:g} s"
    )
    db_url = create_database(server, name)
    stack = Stack(db_url, tmp, code, lease_ms=LEASE_MS, reap_grace=REAP_GRACE_SECONDS)
    recorder = Recorder()
    try:
        stack.manage("migrate", "--no-input", "-v", "0")
        keys = {
            role: stack.manage("create_api_key", "--tenant", TENANT, "--project", PROJECT, "--role", role)
            for role in ("client", "runner")
        }
        stack.start()
        print(f"serving on {stack.url}; logs in {tmp}", flush=True)
        return run_load(args, stack, server, db_url, keys, recorder)
    finally:
        stack.stop()
        if args.keep_db:
            print(f"\nkept: database {name} ({db_url}), logs in {tmp}")
        else:
            drop_database(server, name)
        if server.stop:
            subprocess.run(
                server.stop, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60
            )


def run_load(args, stack: Stack, server, db_url: str, keys: dict, recorder: Recorder) -> int:
    began = time.monotonic()
    until = began + args.seconds
    stop = threading.Event()
    flows_done: Counter = Counter()
    lock = threading.Lock()
    sessions = [f"soak-{index}" for index in range(30)] + [f"soak/repo#{index}" for index in range(10)]
    threads = []
    for index in range(args.clients):
        ctx = Context(
            stack.url, keys["client"], keys["runner"], recorder, stop, random.Random(args.seed + index), sessions
        )
        threads.append(threading.Thread(target=client_loop, args=(ctx, until, flows_done, lock), daemon=True))
    kinds = [kind for kind in args.fault_kinds if kind != "pg-restart" or server.restart]
    faults = Faults(stack, server, db_url, recorder, kinds, random.Random(args.seed - 1))
    faults.client_key = keys["client"]
    fault_thread = threading.Thread(target=faults.serve, args=(began, until, stop), daemon=True)
    for thread in [*threads, fault_thread]:
        thread.start()
    next_progress = began + PROGRESS_SECONDS
    while time.monotonic() < until:
        time.sleep(0.5)
        if time.monotonic() >= next_progress:
            next_progress += PROGRESS_SECONDS
            with recorder.lock:
                ops = sum(sum(counter.values()) for counter in recorder.finals.values())
                fault_count = sum(recorder.faults.values())
                errors = len(recorder.server_errors)
            print(
                f"  t={time.monotonic() - began:4.0f} s  flows {sum(flows_done.values()):4d}  requests {ops:6d}  "
                f"faults {fault_count:3d}  5xx {errors}",
                flush=True,
            )
    fault_thread.join(timeout=180)
    stack.reap_orphans()
    drain_until = time.monotonic() + args.drain_seconds
    print(f"load over; draining (at most {args.drain_seconds:.0f} s) ...", flush=True)
    while time.monotonic() < drain_until:
        if not any(thread.is_alive() for thread in threads) and active_work(db_url) == 0:
            break
        stack.reap_orphans()
        time.sleep(1.0)
    drained = time.monotonic() - (drain_until - args.drain_seconds)
    stop.set()
    for thread in threads:
        thread.join(timeout=60)
    with psycopg.connect(db_url, autocommit=True) as conn, conn.cursor() as cursor:
        violations = check_tables(cursor, recorder.acknowledged, grace_seconds=REAP_GRACE_SECONDS + 3.0)
        violations += runners_lost_alive(cursor, recorder)
        cursor.execute(
            "SELECT (SELECT count(*) FROM runs_run), (SELECT count(*) FROM runs_runevent), "
            "(SELECT count(*) FROM runs_command), (SELECT count(*) FROM queues_queuetask)"
        )
        totals = cursor.fetchone()
    classes, examples = classify_server_errors(recorder)
    return report(args, recorder, violations, (classes, examples), flows_done, totals, drained, stack)


def report(
    args,
    recorder: Recorder,
    violations,
    server_errors: tuple[Counter, list[str]],
    flows_done: Counter,
    totals,
    drained: float,
    stack: Stack,
) -> int:
    classes, examples = server_errors
    violations = [*violations, *recorder.violations]
    print(
        f"\ndrained in {drained:.0f} s; tables: {totals[0]} runs, {totals[1]} events, {totals[2]} commands, "
        f"{totals[3]} queue tasks; worker started {stack.worker_starts} times"
    )
    print_table("flows", ["flow", "played"], [[name, flows_done[name]] for name, _, _ in FLOWS])
    rows = []
    for kind in sorted(recorder.finals):
        finals = recorder.finals[kind]
        ok = sum(count for status, count in finals.items() if isinstance(status, int) and 200 <= status < 300)
        errors = Counter(
            {status: count for status, count in finals.items() if not (isinstance(status, int) and 200 <= status < 300)}
        )
        retried = recorder.transient[kind] - finals
        rows.append([kind, sum(finals.values()), ok, statuses(errors) or "-", statuses(retried) or "-"])
    print_table(
        "operations (final answer per operation; retried: answers that were retried)",
        ["kind", "count", "2xx", "errors by status", "retried"],
        rows,
    )
    fault_rows = [
        [kind, recorder.faults[kind]]
        for kind in [*FAULT_KINDS, "worker-died-by-itself"]
        if kind in args.fault_kinds or recorder.faults[kind]
    ]
    print_table("faults", ["kind", "count"], fault_rows)
    for note in sorted(Counter(recorder.fault_notes).items()):
        print(f"  {note[0]}{f'  (x{note[1]})' if note[1] > 1 else ''}")
    print_table(
        "5xx answers", ["class", "count"], [[name, count] for name, count in sorted(classes.items())] or [["none", 0]]
    )
    for example in examples[:8]:
        print(f"  {example}")
    by_invariant: dict[str, list] = {}
    for violation in violations:
        by_invariant.setdefault(violation.invariant, []).append(violation.detail)
    names = TABLE_INVARIANTS + sorted(set(by_invariant) - set(TABLE_INVARIANTS))
    print_table(
        "invariants",
        ["invariant", "violations", "first"],
        [[name, len(by_invariant.get(name, [])), (by_invariant.get(name) or ["-"])[0][:150]] for name in names],
    )
    lost = len(by_invariant.get(LOST_WRITE, []))
    acked = recorder.acknowledged
    print(
        f"\nAcknowledged writes checked: {len(acked.events)} events, {len(acked.records)} records, "
        f"{len(acked.claims)} claims"
    )
    print(f"Acknowledged writes lost: {lost}")
    for name in names:
        for detail in by_invariant.get(name, [])[1:6]:
            print(f"  {name}: {detail[:200]}")
    print(f"\n{'FAIL' if violations else 'PASS'}: {len(violations)} violation(s)")
    return 1 if violations or lost else 0


def main(argv: list[str] | None = None) -> int:
    args = settings_from(argv)
    tmp = Path(tempfile.mkdtemp(prefix="agentrun-soak-"))
    become_subreaper()
    try:
        return soak(args, tmp)
    except (RuntimeError, psycopg.Error, OSError) as error:
        print(f"soak could not run: {error}", file=sys.stderr)
        return 2
    finally:
        if not args.keep_db:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
