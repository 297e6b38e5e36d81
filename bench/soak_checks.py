"""The soak's invariants, checked on the tables after the soak drained.

Every check takes a DB-API cursor (psycopg's, or Django's `connection.cursor()` in the tests)
on an agentrun database and returns the violations it found; `lost_writes` and `epoch_holders`
also compare the tables with what the soak saw acknowledged. Plain SQL and the standard library
only: the soak runs these against its scratch database, the tests against the test database.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

RUN_TERMINAL = ("completed", "failed", "blocked", "cancelled")
COMMAND_TERMINAL = ("completed", "failed", "cancelled")
TASK_TERMINAL = ("completed", "failed", "blocked", "cancelled")
# The reaper and the launcher end runs with run_expire, which bumps the epoch once more.
EXPIRE_KINDS = ("runner-lost", "timeout", "infra-failed")

SEQ_GAPLESS = "seq gapless per run"
ONE_TERMINAL = "one terminal per run"
ONE_COMMAND_TERMINAL = "one command-terminal per command"
ONE_HOLDER = "one holder per epoch"
ONE_START = "one start per task attempt"
LOST_WRITE = "acknowledged write lost"
LAPSED_LEASE = "no run claimed past lease + grace"
ENDED = "everything ended after the drain"


@dataclass(frozen=True)
class Violation:
    invariant: str
    detail: str


@dataclass(frozen=True)
class AckedEvent:
    """An event the server acknowledged with a 2xx to a batch the soak appended as a runner."""

    run_id: str
    event_id: str
    seq: int
    type: str
    runner_id: str
    lease_epoch: int


@dataclass(frozen=True)
class Claim:
    """A claim the server acknowledged with 200: this runner holds this epoch of the run."""

    run_id: str
    runner_id: str
    lease_epoch: int


@dataclass
class Acknowledged:
    """Everything the soak was told was written."""

    events: list[AckedEvent] = field(default_factory=list)
    records: list[tuple[str, str]] = field(default_factory=list)  # ("run" | "command" | "task", id)
    claims: list[Claim] = field(default_factory=list)


def seq_gaps(cursor) -> list[Violation]:
    """Each run's events carry seq 1..N, each once, with N = runs_run.last_event_seq."""
    cursor.execute(
        "SELECT r.id, r.last_event_seq, count(e.id), count(DISTINCT e.seq), coalesce(min(e.seq), 1), "
        "coalesce(max(e.seq), 0) FROM runs_run r LEFT JOIN runs_runevent e ON e.run_id = r.id "
        "GROUP BY r.id, r.last_event_seq "
        "HAVING count(e.id) <> r.last_event_seq OR count(DISTINCT e.seq) <> count(e.id) "
        "OR coalesce(min(e.seq), 1) <> 1 OR coalesce(max(e.seq), 0) <> r.last_event_seq ORDER BY r.id"
    )
    return [
        Violation(
            SEQ_GAPLESS,
            f"run {run_id}: last_event_seq {last}, {count} events ({distinct} distinct seqs, {low}..{high})",
        )
        for run_id, last, count, distinct, low, high in cursor.fetchall()
    ]


def terminals(cursor) -> list[Violation]:
    """An ended run has exactly one terminal_status event, saying how it ended; an active run none."""
    cursor.execute(
        "SELECT r.id, r.status, r.terminal_status, count(e.id), "
        "coalesce(array_agg(e.payload->>'terminalStatus') FILTER (WHERE e.id IS NOT NULL), '{}') "
        "FROM runs_run r LEFT JOIN runs_runevent e ON e.run_id = r.id AND e.type = 'terminal_status' "
        "GROUP BY r.id, r.status, r.terminal_status ORDER BY r.id"
    )
    found = []
    for run_id, status, terminal_status, count, said in cursor.fetchall():
        wanted = 1 if status in RUN_TERMINAL else 0
        if count != wanted:
            found.append(Violation(ONE_TERMINAL, f"run {run_id} ({status}): {count} terminal_status events"))
        elif count == 1 and said[0] != terminal_status:
            found.append(
                Violation(
                    ONE_TERMINAL, f"run {run_id}: terminal_status event says {said[0]}, the run {terminal_status}"
                )
            )
    return found


def command_terminals(cursor) -> list[Violation]:
    """A finished command has exactly one command-terminal event, with its state; an open one
    none, and no command stays open once its run ended."""
    cursor.execute(
        "SELECT c.id, c.run_id, c.state, r.status, count(e.id), "
        "coalesce(array_agg(e.payload->>'state') FILTER (WHERE e.id IS NOT NULL), '{}') "
        "FROM runs_command c JOIN runs_run r ON r.id = c.run_id "
        "LEFT JOIN runs_runevent e ON e.run_id = c.run_id AND e.type = 'backend_status' "
        "AND e.payload->>'phase' = 'command-terminal' AND e.payload->>'commandId' = c.id "
        "GROUP BY c.id, c.run_id, c.state, r.status ORDER BY c.id"
    )
    found = []
    for command_id, run_id, state, run_status, count, said in cursor.fetchall():
        terminal = state in COMMAND_TERMINAL
        if count != (1 if terminal else 0):
            found.append(
                Violation(
                    ONE_COMMAND_TERMINAL,
                    f"command {command_id} ({state}) of run {run_id}: {count} command-terminal events",
                )
            )
        elif terminal and said[0] != state:
            found.append(
                Violation(
                    ONE_COMMAND_TERMINAL, f"command {command_id}: command-terminal says {said[0]}, the command {state}"
                )
            )
        if not terminal and run_status in RUN_TERMINAL:
            found.append(
                Violation(
                    ONE_COMMAND_TERMINAL,
                    f"command {command_id} still {state} after its run {run_id} ended {run_status}",
                )
            )
    return found


def _claim_events(cursor) -> dict[str, list[tuple[int, str | None]]]:
    """(seq, runnerId) of each run's run-claimed events in seq order: the i-th is epoch i."""
    cursor.execute(
        "SELECT run_id, seq, payload->>'runnerId' FROM runs_runevent "
        "WHERE type = 'backend_status' AND payload->>'phase' = 'run-claimed' ORDER BY run_id, seq"
    )
    claims: dict[str, list[tuple[int, str | None]]] = defaultdict(list)
    for run_id, seq, runner_id in cursor.fetchall():
        claims[run_id].append((seq, runner_id))
    return claims


def epoch_holders(cursor, acknowledged: Acknowledged) -> list[Violation]:
    """Every claim bumps the epoch and writes one run-claimed event in the same transaction, and
    run_expire bumps it once more, so the i-th run-claimed event is epoch i and the run's epoch
    is the number of claims (+1 when it was expired). Against what the soak was acknowledged:
    the holder the server confirmed for an epoch is the one its claim event names, and an event
    appended under epoch e lies between the e-th and the (e+1)-th claim (no stale holder wrote)."""
    claims = _claim_events(cursor)
    cursor.execute(
        "SELECT r.id, r.lease_epoch, r.status, t.payload->>'failureKind' FROM runs_run r "
        "LEFT JOIN runs_runevent t ON t.run_id = r.id AND t.type = 'terminal_status' ORDER BY r.id"
    )
    found = []
    for run_id, lease_epoch, status, failure_kind in cursor.fetchall():
        count = len(claims.get(run_id, ()))
        expired = status in RUN_TERMINAL and failure_kind in EXPIRE_KINDS
        if lease_epoch != count and not (expired and lease_epoch == count + 1):
            found.append(
                Violation(
                    ONE_HOLDER,
                    f"run {run_id} ({status}, {failure_kind}): epoch {lease_epoch} after {count} run-claimed events",
                )
            )
    holders: dict[tuple[str, int], set[str]] = defaultdict(set)
    for claim in acknowledged.claims:
        holders[(claim.run_id, claim.lease_epoch)].add(claim.runner_id)
        recorded = claims.get(claim.run_id, [])
        if not 1 <= claim.lease_epoch <= len(recorded):
            found.append(
                Violation(
                    ONE_HOLDER,
                    f"run {claim.run_id}: claim by {claim.runner_id} acknowledged at epoch "
                    f"{claim.lease_epoch}, but {len(recorded)} run-claimed events",
                )
            )
        elif recorded[claim.lease_epoch - 1][1] != claim.runner_id:
            found.append(
                Violation(
                    ONE_HOLDER,
                    f"run {claim.run_id} epoch {claim.lease_epoch}: acknowledged to "
                    f"{claim.runner_id}, claim event names "
                    f"{recorded[claim.lease_epoch - 1][1]}",
                )
            )
    for (run_id, epoch), runners in sorted(holders.items()):
        if len(runners) > 1:
            found.append(Violation(ONE_HOLDER, f"run {run_id} epoch {epoch} acknowledged to {sorted(runners)}"))
    for event in acknowledged.events:
        recorded = claims.get(event.run_id, [])
        if not 1 <= event.lease_epoch <= len(recorded):
            continue  # reported above, or the event itself is lost (lost_writes)
        start = recorded[event.lease_epoch - 1][0]
        end = recorded[event.lease_epoch][0] if event.lease_epoch < len(recorded) else None
        if event.seq <= start or (end is not None and event.seq >= end):
            found.append(
                Violation(
                    ONE_HOLDER,
                    f"run {event.run_id}: event seq {event.seq} appended by "
                    f"{event.runner_id} at epoch {event.lease_epoch}, outside that "
                    f"epoch's seqs ({start}, {end or 'end'})",
                )
            )
    return found


def task_attempts(cursor) -> list[Violation]:
    """A task's attempts are numbered 1..attempt_count, at most one runs at a time and none once
    the task ended; each attempt started exactly one run (the run's extra names the task and the
    attempt), and no run names an attempt that does not exist."""
    cursor.execute("SELECT id, state, attempt_count FROM queues_queuetask ORDER BY id")
    tasks = {task_id: (state, count) for task_id, state, count in cursor.fetchall()}
    cursor.execute("SELECT task_id, number, run_id, state FROM queues_queueattempt ORDER BY task_id, number")
    attempts: dict[str, list[tuple[int, str | None, str]]] = defaultdict(list)
    for task_id, number, run_id, state in cursor.fetchall():
        attempts[task_id].append((number, run_id, state))
    cursor.execute(
        "SELECT id, extra->>'queueTaskId', extra->>'queueAttempt', status FROM runs_run "
        "WHERE extra ? 'queueTaskId' ORDER BY id"
    )
    runs_of: dict[tuple[str, int], list[str]] = defaultdict(list)
    for run_id, task_id, number, _status in cursor.fetchall():
        runs_of[(task_id, int(number) if number and number.isdigit() else -1)].append(run_id)
    found = []
    for task_id, (state, count) in tasks.items():
        mine = attempts.get(task_id, [])
        numbers = [number for number, _, _ in mine]
        if numbers != list(range(1, count + 1)):
            found.append(Violation(ONE_START, f"task {task_id}: attempt_count {count}, attempts {numbers}"))
        running = [number for number, _, attempt_state in mine if attempt_state == "running"]
        if len(running) > 1 or (running and state in TASK_TERMINAL):
            found.append(Violation(ONE_START, f"task {task_id} ({state}): attempts {running} running"))
        if state == "completed" and (not mine or mine[-1][2] != "completed"):
            found.append(
                Violation(ONE_START, f"task {task_id} completed, its last attempt {mine[-1][2] if mine else 'missing'}")
            )
        for number, run_id, attempt_state in mine:
            started = runs_of.get((task_id, number), [])
            if run_id is None:
                if started or attempt_state != "failed":
                    found.append(
                        Violation(
                            ONE_START,
                            f"task {task_id} attempt {number} ({attempt_state}) has no run, runs naming it: {started}",
                        )
                    )
            elif started != [run_id]:
                found.append(
                    Violation(ONE_START, f"task {task_id} attempt {number}: run {run_id}, runs naming it: {started}")
                )
    for (task_id, number), run_ids in sorted(runs_of.items()):
        if task_id not in tasks or number not in [n for n, _, _ in attempts.get(task_id, [])]:
            found.append(
                Violation(ONE_START, f"runs {run_ids} name task {task_id} attempt {number}, which does not exist")
            )
    return found


_RECORD_TABLES = {"run": ("runs_run", "id"), "command": ("runs_command", "id"), "task": ("queues_queuetask", "id")}


def lost_writes(cursor, acknowledged: Acknowledged) -> list[Violation]:
    """Every event, run, command and queue task a 2xx acknowledged is in its table (events with
    the seq and type they were acknowledged with)."""
    found = []
    by_id = {event.event_id: event for event in acknowledged.events}
    ids = list(by_id)
    stored = {}
    for start in range(0, len(ids), 5000):
        cursor.execute(
            "SELECT id, run_id, seq, type FROM runs_runevent WHERE id = ANY(%s)", [ids[start : start + 5000]]
        )
        stored.update({row[0]: row[1:] for row in cursor.fetchall()})
    for event_id, event in by_id.items():
        row = stored.get(event_id)
        if row != (event.run_id, event.seq, event.type):
            found.append(
                Violation(
                    LOST_WRITE,
                    f"event {event_id} (run {event.run_id} seq {event.seq} {event.type}): "
                    f"{'missing' if row is None else f'stored as {row}'}",
                )
            )
    for kind, (table, column) in _RECORD_TABLES.items():
        wanted = sorted({record_id for record_kind, record_id in acknowledged.records if record_kind == kind})
        if not wanted:
            continue
        cursor.execute(f"SELECT {column} FROM {table} WHERE {column} = ANY(%s)", [wanted])  # noqa: S608 - fixed names
        present = {row[0] for row in cursor.fetchall()}
        found += [
            Violation(LOST_WRITE, f"{kind} {record_id} missing") for record_id in wanted if record_id not in present
        ]
    return found


def lapsed_leases(cursor, *, grace_seconds: float) -> list[Violation]:
    """No run is still claimed when its lease lapsed more than the reaper's grace ago."""
    cursor.execute(
        "SELECT id, claimed_by, lease_expires_at, now() - lease_expires_at FROM runs_run "
        "WHERE status = 'claimed' "
        "AND (lease_expires_at IS NULL OR lease_expires_at < now() - make_interval(secs => %s)) "
        "ORDER BY id",
        [grace_seconds],
    )
    return [
        Violation(
            LAPSED_LEASE,
            f"run {run_id} claimed by {holder}, lease {'missing' if expires is None else 'lapsed'} "
            f"{'' if late is None else f'{late.total_seconds():.1f} s ago'}".rstrip(),
        )
        for run_id, holder, expires, late in cursor.fetchall()
    ]


def unfinished(cursor) -> list[Violation]:
    """After the drain every run and every queue task has ended."""
    cursor.execute("SELECT id, status FROM runs_run WHERE status IN ('pending', 'claimed') ORDER BY id")
    found = [Violation(ENDED, f"run {run_id} still {status}") for run_id, status in cursor.fetchall()]
    cursor.execute("SELECT id, state FROM queues_queuetask WHERE state IN ('pending', 'running') ORDER BY id")
    found += [Violation(ENDED, f"queue task {task_id} still {state}") for task_id, state in cursor.fetchall()]
    return found


def check_tables(cursor, acknowledged: Acknowledged, *, grace_seconds: float) -> list[Violation]:
    """All of the above, in the order the soak's table prints them."""
    return [
        *seq_gaps(cursor),
        *terminals(cursor),
        *command_terminals(cursor),
        *epoch_holders(cursor, acknowledged),
        *task_attempts(cursor),
        *lost_writes(cursor, acknowledged),
        *lapsed_leases(cursor, grace_seconds=grace_seconds),
        *unfinished(cursor),
    ]
