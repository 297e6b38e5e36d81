"""The runner protocol as deployed, beside a raw-psycopg baseline measured in the same run.

What is measured (`make bench`, or `.venv/bin/python bench/bench_runner_protocol.py --help`):

a. events/s with batches: R runners (threads, one keep-alive httpx client each, one run each)
   POST /runs/{id}/events with 50-event batches (a fresh batchKey each) for a fixed time.
b. events/s with one event per request: the same, one event per POST.
c. long-poll wake-up latency: W waiters (threads, one client each) all GET
   /runs/{id}/events?afterSeq=<last>&wait=30 on ONE run (the worst fan-out: one NOTIFY wakes
   them all); once they have had time to park, one event is appended. Latency per waiter =
   its response arriving minus the first sign that the append committed: the append's
   response returning, or a raw LISTEN probe in this script hearing the run's NOTIFY,
   whichever comes first. (The response alone is a late reference: the worker that serves it
   is busy waking its share of the waiters.) Also printed: the same from just before the
   append was sent, and how late the append's response came.

Baselines, on the same PostgreSQL server and database, no HTTP and no Django:

a'/b'. R threads, each with its own psycopg connection and its own run, doing per batch the
   SQL an append needs: lock the run row (FOR NO KEY UPDATE), a multi-row INSERT into
   runs_runevent, UPDATE runs_run.last_event_seq, the session touch, pg_notify, COMMIT.
c'. raw LISTEN/NOTIFY: L threads, each LISTENing on its own connection (L is capped by the
   server's free connection slots, so usually fewer than W); one connection commits a
   pg_notify; latency = receipt minus the notifier's COMMIT returning (it can be slightly
   negative: the server delivers the notification before the COMMIT's answer arrives).

Setup: DATABASE_URL's server, else the embedded PostgreSQL under var/. A fresh database
`agentrun_bench` is created and migrated, keys are minted with `manage.py create_api_key`, and
gunicorn is started with gunicorn.conf.py and settings.prod (DEBUG off) on a free loopback
port, with enough threads per worker to park every waiter (gunicorn's default is 64); its CPU
time per append request is read from /proc. Everything is torn down at the end, also on
errors. The exit code is 0 whether targets are met or missed; 1 only when the benchmark failed.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace

import httpx
import psycopg
from benchlib import (
    ROOT,
    BenchmarkError,
    describe_server,
    manage,
    percentile,
    run_on_fresh_database,
    server_facts,
)
from psycopg.types.json import Jsonb

BENCH_DB = "agentrun_bench"
TENANT = PROJECT = "bench"
EVENT_TYPE = "assistant_message"
EVENT_TEXT = ("The runner streamed another line of assistant output while it worked on the turn; nothing secret here.")[
    :100
]
LEASE_MS = 600_000
LONG_POLL_WAIT = 30
# A waiter not woken by then counts as a failure; keeps a broken wake-up from stalling the run.
WAKE_TIMEOUT_SECONDS = 10.0
MAX_REQUESTS_PER_THREAD = 1_000_000
STARTUP_TIMEOUT_SECONDS = 60.0
RAW_NOTIFY_CHANNEL = "agentrun_bench"

TARGET_BATCH_RATIO = 0.5
TARGET_SINGLE_RATIO = 0.25
TARGET_P99_SLACK_MS = 15.0


@dataclass(frozen=True)
class Config:
    duration: float
    warmup: float
    runners: int
    batch_size: int
    waiters: int
    rounds: int
    park: float
    listeners: int
    web_workers: int
    web_threads: int
    pool_size: int


@dataclass(frozen=True)
class RunLease:
    run_id: str
    session_id: str
    runner_id: str
    lease_epoch: int


@dataclass(frozen=True)
class Throughput:
    events: int
    seconds: float
    server_cpu: float | None = None  # gunicorn's CPU seconds over `seconds`, when known

    @property
    def per_second(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class Latencies:
    """Seconds from each round's reference (the commit, as seen by the bench) to each receiver;
    `from_send` counts from just before the write was sent (adding the write's round trip);
    `writer_lag` is, per round, how long after the reference the write itself returned."""

    samples: list[float]
    from_send: list[float]
    writer_lag: list[float]

    def p(self, q: float, *, from_send: bool = False) -> float:
        """The q-th percentile, in milliseconds."""
        return percentile(self.from_send if from_send else self.samples, q) * 1000.0


# --- threads -------------------------------------------------------------------------------


def run_threads(targets: list[Callable[[], object]], *, timeout: float) -> list:
    """Run each target in its own thread; return their results in order. Any error, or a
    thread still running after `timeout`, fails the benchmark."""
    results: list = [None] * len(targets)
    errors: list[BaseException] = []

    def body(index: int, target: Callable[[], object]) -> None:
        try:
            results[index] = target()
        except BaseException as exc:  # noqa: BLE001 - reported below, in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i, t), daemon=True) for i, t in enumerate(targets)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    if any(thread.is_alive() for thread in threads):
        raise BenchmarkError(f"threads still running after {timeout:.0f} s")
    if errors:
        raise BenchmarkError(f"{len(errors)} of {len(threads)} threads failed; first: {errors[0]!r}") from errors[0]
    return results


def timed_parallel(loops: list[Callable[[float], int]], duration: float) -> Throughput:
    """Start every loop together with one deadline; each returns the events it wrote. Wall time
    runs from the start to the last loop's return (its last request included)."""
    start = time.perf_counter()
    deadline = start + duration
    counts = run_threads([lambda loop=loop: loop(deadline) for loop in loops], timeout=duration + 60)
    return Throughput(events=sum(counts), seconds=time.perf_counter() - start)


# --- database ------------------------------------------------------------------------------


def create_key(db_url: str, role: str) -> str:
    return manage(
        db_url, "create_api_key", "--tenant", TENANT, "--project", PROJECT, "--role", role, "--name", "bench"
    ).splitlines()[-1]


def event_seq_total(db_url: str, run_ids: list[str]) -> int:
    with psycopg.connect(db_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT coalesce(sum(last_event_seq), 0) FROM runs_run WHERE id = ANY(%s)", (run_ids,)
        ).fetchone()
    return int(row[0])


# --- the web server ------------------------------------------------------------------------


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class WebServer:
    """gunicorn with gunicorn.conf.py, as deployed, on a free loopback port."""

    def __init__(self, db_url: str, config: Config):
        self.port = free_loopback_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "DATABASE_URL": db_url,
            "DJANGO_SETTINGS_MODULE": "settings.prod",
            "DJANGO_SECRET_KEY": uuid.uuid4().hex,
            "DJANGO_ALLOWED_HOSTS": "*",
            "AGENTRUN_BIND": f"127.0.0.1:{self.port}",
            "AGENTRUN_WEB_WORKERS": str(config.web_workers),
            "AGENTRUN_WEB_THREADS": str(config.web_threads),
            "AGENTRUN_DB_POOL_SIZE": str(config.pool_size),
            "AGENTRUN_LOG_LEVEL": "WARNING",
        }
        self.env.pop("AGENTRUN_ACCESS_LOG", None)
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - the server writes it until __exit__ closes it
        self.process: subprocess.Popen | None = None
        self.argv = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"]

    def __enter__(self) -> WebServer:
        self.process = subprocess.Popen(
            self.argv,
            cwd=ROOT,
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        try:
            self._wait_ready()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        with httpx.Client(base_url=self.base_url, timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise BenchmarkError(f"gunicorn exited with {self.process.returncode}:\n{self.log_tail()}")
                try:
                    if client.get("/livez").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
            else:
                raise BenchmarkError(f"gunicorn did not answer /livez in {STARTUP_TIMEOUT_SECONDS:.0f} s")
            ready = client.get("/readyz")
            if ready.status_code != 200:
                raise BenchmarkError(f"/readyz answered {ready.status_code}: {ready.text}")

    def cpu_seconds(self) -> float | None:
        """User + system CPU of gunicorn's master and workers so far (Linux /proc), else None."""
        master = self.process.pid
        ticks = 0
        try:
            for entry in os.scandir("/proc"):
                if not entry.name.isdigit():
                    continue
                try:
                    with open(f"/proc/{entry.name}/stat") as stat:
                        fields = stat.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue  # the process is gone
                if int(entry.name) == master or int(fields[1]) == master:
                    ticks += int(fields[11]) + int(fields[12])
        except OSError:
            return None
        return ticks / os.sysconf("SC_CLK_TCK")

    def log_tail(self, chars: int = 3000) -> str:
        self.log.seek(0)
        return self.log.read()[-chars:]

    def __exit__(self, *exc_info) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.log.close()


# --- the API -------------------------------------------------------------------------------


def api_client(base_url: str, key: str, *, read_timeout: float = 30.0) -> httpx.Client:
    return httpx.Client(
        base_url=f"{base_url}/api/v1",
        headers={"Authorization": f"Bearer {key}"},
        timeout=httpx.Timeout(read_timeout, connect=5.0),
    )


def expect(response: httpx.Response, *statuses: int) -> httpx.Response:
    if response.status_code not in statuses:
        raise BenchmarkError(
            f"{response.request.method} {response.request.url.path} answered {response.status_code}: "
            f"{response.text[:500]}"
        )
    return response


def create_claimed_run(client_api: httpx.Client, runner_api: httpx.Client, name: str) -> RunLease:
    session_id = f"bench-{name}"
    run = expect(
        client_api.post("/runs", json={"backendProfile": "echo", "sessionRef": {"sessionId": session_id}}), 201
    ).json()
    runner_id = f"runner-{name}"
    claimed = expect(
        runner_api.post(f"/runs/{run['id']}/claim", json={"runnerId": runner_id, "leaseMs": LEASE_MS}), 200
    ).json()
    return RunLease(run_id=run["id"], session_id=session_id, runner_id=runner_id, lease_epoch=claimed["leaseEpoch"])


def event_payload(index: int) -> dict:
    return {"text": EVENT_TEXT, "index": index}


def http_append_loop(client: httpx.Client, lease: RunLease, batch_size: int, deadline: float) -> int:
    """POST batches (or, with batch_size 0, single events) until the deadline; events written."""
    path = f"/runs/{lease.run_id}/events"
    written = 0
    for _ in range(MAX_REQUESTS_PER_THREAD):
        if time.perf_counter() >= deadline:
            break
        body = {"runnerId": lease.runner_id, "leaseEpoch": lease.lease_epoch}
        if batch_size:
            body["batchKey"] = f"b-{uuid.uuid4().hex}"
            body["events"] = [{"type": EVENT_TYPE, "payload": event_payload(written + i)} for i in range(batch_size)]
        else:
            body.update(type=EVENT_TYPE, payload=event_payload(written))
        expect(client.post(path, json=body), 201)
        written += batch_size or 1
    return written


# --- the raw-psycopg baseline --------------------------------------------------------------

LOCK_RUN = "SELECT last_event_seq, created_at FROM runs_run WHERE id = %s FOR NO KEY UPDATE"
UPDATE_RUN = "UPDATE runs_run SET last_event_seq = %s WHERE id = %s"
TOUCH_SESSION = (
    "UPDATE agent_sessions_session SET last_event_seq = %s, last_activity_at = now(), updated_at = now() "
    "WHERE session_id = %s"
)
NOTIFY = "SELECT pg_notify('agentrun', %s)"


def insert_events_sql(count: int) -> str:
    rows = ", ".join(["(%s, %s, %s, %s, %s, now(), %s)"] * count)
    return f"INSERT INTO runs_runevent (id, run_id, seq, type, payload, created_at, run_created_at) VALUES {rows}"  # noqa: S608 - placeholders only; values travel as parameters


def raw_append_loop(conn: psycopg.Connection, lease: RunLease, batch_size: int, deadline: float) -> int:
    """The SQL of an append, one transaction per batch (batch_size 0 = one event), until the deadline."""
    per_transaction = batch_size or 1
    insert = insert_events_sql(per_transaction)
    topic = f"run:{lease.run_id}"
    written = 0
    for _ in range(MAX_REQUESTS_PER_THREAD):
        if time.perf_counter() >= deadline:
            break
        with conn.transaction():
            seq, run_created_at = conn.execute(LOCK_RUN, (lease.run_id,)).fetchone()
            params: list = []
            for i in range(per_transaction):
                params += [
                    f"evt_{uuid.uuid4().hex}",
                    lease.run_id,
                    seq + i + 1,
                    EVENT_TYPE,
                    Jsonb(event_payload(written + i)),
                    run_created_at,
                ]
            conn.execute(insert, params)
            seq += per_transaction
            conn.execute(UPDATE_RUN, (seq, lease.run_id))
            conn.execute(TOUCH_SESSION, (seq, lease.session_id))
            conn.execute(NOTIFY, (topic,))
        written += per_transaction
    return written


# --- throughput phases ---------------------------------------------------------------------


def measure_throughput(
    loops: list[Callable[[float], int]],
    config: Config,
    check: Callable[[int], None],
    cpu: Callable[[], float | None] = lambda: None,
) -> Throughput:
    """Warm up, then measure; `check` is given every event the loops reported (warm-up
    included) and compares it with the database. `cpu` reads the server's CPU clock."""
    warm = timed_parallel(loops, config.warmup)
    cpu_before = cpu()
    measured = timed_parallel(loops, config.duration)
    cpu_after = cpu()
    check(warm.events + measured.events)
    if cpu_before is None or cpu_after is None:
        return measured
    return replace(measured, server_cpu=cpu_after - cpu_before)


def seq_check(db_url: str, leases: list[RunLease]) -> Callable[[int], None]:
    """A check that the runs' seq counters grew by exactly the events the loops reported."""
    run_ids = [lease.run_id for lease in leases]
    before = event_seq_total(db_url, run_ids)

    def check(reported: int) -> None:
        grown = event_seq_total(db_url, run_ids) - before
        if grown != reported:
            raise BenchmarkError(f"the loops reported {reported} events but the runs' seqs grew by {grown}")

    return check


def http_throughput(
    clients: list[httpx.Client], leases: list[RunLease], batch_size: int, config: Config, db_url: str, web: WebServer
) -> Throughput:
    loops = [
        lambda deadline, c=client, lease=lease: http_append_loop(c, lease, batch_size, deadline)
        for client, lease in zip(clients, leases, strict=True)
    ]
    return measure_throughput(loops, config, seq_check(db_url, leases), cpu=web.cpu_seconds)


def raw_throughput(db_url: str, leases: list[RunLease], batch_size: int, config: Config) -> Throughput:
    connections = [psycopg.connect(db_url, autocommit=True) for _ in leases]
    try:
        loops = [
            lambda deadline, conn=conn, lease=lease: raw_append_loop(conn, lease, batch_size, deadline)
            for conn, lease in zip(connections, leases, strict=True)
        ]
        return measure_throughput(loops, config, seq_check(db_url, leases))
    finally:
        for conn in connections:
            conn.close()


# --- wake-up latency -----------------------------------------------------------------------


@dataclass(frozen=True)
class Round:
    arrivals: list[float]  # perf_counter() at each receiver's receipt
    sent: float  # just before the write was sent
    committed: float  # the write returned: commit done (and, over HTTP, its response read)


def wake_round(receivers: list[Callable[[], float]], write: Callable[[], tuple[float, float]], park: float) -> Round:
    """Release every receiver together, give them `park` seconds to start waiting, write once."""
    start = threading.Barrier(len(receivers) + 1)

    def receive(receiver: Callable[[], float]) -> float:
        start.wait(timeout=30)
        return receiver()

    def writer() -> tuple[float, float]:
        start.wait(timeout=30)
        time.sleep(park)
        return write()

    *arrivals, (sent, committed) = run_threads(
        [lambda r=r: receive(r) for r in receivers] + [writer], timeout=park + WAKE_TIMEOUT_SECONDS + 30
    )
    return Round(arrivals=arrivals, sent=sent, committed=committed)


def latencies_of(rounds: list[tuple[Round, float]]) -> Latencies:
    """Per (round, reference time): every arrival against the reference and against the send."""
    return Latencies(
        samples=[a - reference for r, reference in rounds for a in r.arrivals],
        from_send=[a - r.sent for r, _ in rounds for a in r.arrivals],
        writer_lag=[r.committed - reference for r, reference in rounds],
    )


class CommitProbe:
    """A raw LISTEN on the app's channel. It hears the run's NOTIFY when the append commits,
    however long the append's own response then takes: a worker busy waking its waiters can
    delay that response by far more than the wake-up itself takes."""

    def __init__(self, db_url: str, topic: str):
        self.topic = topic
        self.conn = psycopg.connect(db_url, autocommit=True)
        self.conn.execute("LISTEN agentrun")

    def receive(self) -> float:
        for note in self.conn.notifies(timeout=WAKE_TIMEOUT_SECONDS):
            if note.payload == self.topic:
                return time.perf_counter()
        raise BenchmarkError(f"the commit probe heard no {self.topic!r} in {WAKE_TIMEOUT_SECONDS:.0f} s")

    def close(self) -> None:
        self.conn.close()


def longpoll_latencies(
    base_url: str, client_key: str, runner_api: httpx.Client, lease: RunLease, config: Config, db_url: str
) -> Latencies:
    """W long-polls on one run, woken by one appended event per round. The reference is the
    first sign of the commit: the append's response, or the probe hearing its NOTIFY."""
    waiters = [api_client(base_url, client_key, read_timeout=WAKE_TIMEOUT_SECONDS) for _ in range(config.waiters)]
    probe = CommitProbe(db_url, f"run:{lease.run_id}")
    events_path = f"/runs/{lease.run_id}/events"
    try:
        last_seq = int(expect(runner_api.get(events_path, params={"afterSeq": 0, "limit": 500}), 200).json()["cursor"])
        # Warm up: every waiter opens its keep-alive connection and runs the GET once.
        run_threads(
            [lambda w=w: expect(w.get(events_path, params={"afterSeq": last_seq}), 200) for w in waiters], timeout=60
        )

        def poll(waiter: httpx.Client, after_seq: int) -> float:
            response = waiter.get(events_path, params={"afterSeq": after_seq, "wait": LONG_POLL_WAIT})
            arrived = time.perf_counter()
            items = expect(response, 200).json()["items"]
            if not items or items[0]["seq"] != after_seq + 1:
                raise BenchmarkError(f"a waiter after seq {after_seq} got {[i['seq'] for i in items]}")
            return arrived

        def append() -> tuple[float, float]:
            body = {
                "runnerId": lease.runner_id,
                "leaseEpoch": lease.lease_epoch,
                "type": EVENT_TYPE,
                "payload": event_payload(0),
            }
            sent = time.perf_counter()
            response = runner_api.post(events_path, json=body)
            returned = time.perf_counter()
            expect(response, 201)
            return sent, returned

        rounds = []
        for _ in range(config.rounds):
            after_seq = last_seq
            receivers = [lambda w=w, after=after_seq: poll(w, after) for w in waiters] + [probe.receive]
            result = wake_round(receivers, append, config.park)
            *arrivals, heard = result.arrivals
            rounds.append(
                (Round(arrivals=arrivals, sent=result.sent, committed=result.committed), min(heard, result.committed))
            )
            last_seq += 1
        return latencies_of(rounds)
    finally:
        probe.close()
        for waiter in waiters:
            waiter.close()


def raw_notify_latencies(db_url: str, listeners: int, config: Config) -> Latencies:
    """L connections LISTENing, woken by one committed pg_notify per round; the reference is
    the notifier's COMMIT returning."""
    receivers = [psycopg.connect(db_url, autocommit=True) for _ in range(listeners)]
    notifier = psycopg.connect(db_url, autocommit=True)
    try:
        for conn in receivers:
            conn.execute(f"LISTEN {RAW_NOTIFY_CHANNEL}")

        def listen(conn: psycopg.Connection, tag: str) -> float:
            notes = list(conn.notifies(timeout=WAKE_TIMEOUT_SECONDS, stop_after=1))
            arrived = time.perf_counter()
            if not notes or notes[0].payload != tag:
                raise BenchmarkError(f"a listener waiting for {tag!r} got {[n.payload for n in notes]}")
            return arrived

        def notify(tag: str) -> tuple[float, float]:
            sent = time.perf_counter()
            with notifier.transaction():
                notifier.execute("SELECT pg_notify(%s, %s)", (RAW_NOTIFY_CHANNEL, tag))
            return sent, time.perf_counter()

        rounds = []
        for index in range(config.rounds):
            tag = f"round-{index}"
            result = wake_round(
                [lambda c=c, t=tag: listen(c, t) for c in receivers], lambda t=tag: notify(t), config.park
            )
            rounds.append((result, result.committed))
        return latencies_of(rounds)
    finally:
        for conn in [*receivers, notifier]:
            conn.close()


def raw_listener_count(db_url: str, config: Config) -> int:
    """As many listeners as asked, within the server's free connection slots: keep room for
    the web server's pools and listeners, the baseline appenders and other users of the server."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        max_connections = int(conn.execute("SHOW max_connections").fetchone()[0])
        reserved = int(conn.execute("SHOW superuser_reserved_connections").fetchone()[0])
        in_use = int(conn.execute("SELECT count(*) FROM pg_stat_activity").fetchone()[0])
    web = config.web_workers * (config.pool_size + 1)
    margin = 10
    free = max_connections - reserved - in_use - web - config.runners - margin
    return max(1, min(config.listeners, free))


# --- report --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Results:
    batch: Throughput
    batch_raw: Throughput
    single: Throughput
    single_raw: Throughput
    wake: Latencies
    wake_raw: Latencies
    listeners: int


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def print_report(results: Results, config: Config) -> None:
    r = results
    batch_ratio = r.batch.per_second / r.batch_raw.per_second
    single_ratio = r.single.per_second / r.single_raw.per_second
    p50, p50_raw = r.wake.p(50), r.wake_raw.p(50)
    p99, p99_raw = r.wake.p(99), r.wake_raw.p(99)
    rows = [
        (
            f"events/s, {config.batch_size}-event batches",
            f"{r.batch.per_second:,.0f}",
            f"{r.batch_raw.per_second:,.0f}",
            f"{batch_ratio:.2f}",
            f"ratio >= {TARGET_BATCH_RATIO}",
            verdict(batch_ratio >= TARGET_BATCH_RATIO),
        ),
        (
            "events/s, 1 event per request",
            f"{r.single.per_second:,.0f}",
            f"{r.single_raw.per_second:,.0f}",
            f"{single_ratio:.2f}",
            f"ratio >= {TARGET_SINGLE_RATIO}",
            verdict(single_ratio >= TARGET_SINGLE_RATIO),
        ),
        ("long-poll wake-up p50 (ms)", f"{p50:.1f}", f"{p50_raw:.1f}", f"{p50 - p50_raw:+.1f} ms", "-", "info"),
        (
            "long-poll wake-up p99 (ms)",
            f"{p99:.1f}",
            f"{p99_raw:.1f}",
            f"{p99 - p99_raw:+.1f} ms",
            f"<= raw + {TARGET_P99_SLACK_MS:.0f} ms",
            verdict(p99 <= p99_raw + TARGET_P99_SLACK_MS),
        ),
        (
            "  p99 from write sent (ms)",
            f"{r.wake.p(99, from_send=True):.1f}",
            f"{r.wake_raw.p(99, from_send=True):.1f}",
            "",
            "-",
            "info",
        ),
        ("  max (ms)", f"{r.wake.p(100):.1f}", f"{r.wake_raw.p(100):.1f}", "", "-", "info"),
    ]
    header = ("figure", "agentrun", "baseline", "ratio/diff", "target", "result")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells) -> str:
        return " | ".join(
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        )

    print()
    print(line(header))
    print("-+-".join("-" * width for width in widths))
    for row in rows:
        print(line(row))
    print()
    print(
        f"agentrun: {config.runners} runner threads over HTTP, {r.batch.events:,} batched events in "
        f"{r.batch.seconds:.1f} s, {r.single.events:,} single events in {r.single.seconds:.1f} s; "
        f"{config.waiters} long-polls on one run x {config.rounds} rounds ({len(r.wake.samples)} samples)."
    )
    print(
        f"baseline: the same SQL over raw psycopg, {config.runners} connections; raw LISTEN/NOTIFY with "
        f"{r.listeners} listening connections x {config.rounds} rounds ({len(r.wake_raw.samples)} samples)."
    )
    print(
        "wake-up: from the first sign of the commit (agentrun: the append's response or a raw LISTEN probe "
        "hearing its NOTIFY, whichever came first; baseline: the notifier's COMMIT returning, which the "
        "notification can beat) to each receiver."
    )
    lag = max(r.wake.writer_lag) * 1000.0
    print(f"  the append's own response returned up to {lag:.1f} ms after its commit was heard.")
    cpu = [_cpu_per_request(r.batch, config.batch_size), _cpu_per_request(r.single, 1)]
    if None not in cpu:
        print(
            f"gunicorn CPU per append request: {cpu[0]:.1f} ms ({config.batch_size} events), {cpu[1]:.1f} ms (1 event)."
        )
    print("Targets are informational.")


def _cpu_per_request(throughput: Throughput, events_per_request: int) -> float | None:
    if throughput.server_cpu is None or not throughput.events:
        return None
    return throughput.server_cpu * 1000.0 / (throughput.events / events_per_request)


def print_setup(config: Config, server: str, source: str, facts: dict[str, str]) -> None:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"machine: {os.cpu_count()} cores ({affinity} usable); load generator, gunicorn and PostgreSQL share them")
    print(
        f"database: {source}, {describe_server(server)}, PostgreSQL {facts['server_version']}, "
        f"max_connections={facts['max_connections']} ({facts['connections_in_use']} in use), "
        f"synchronous_commit={facts['synchronous_commit']}, shared_buffers={facts['shared_buffers']}"
    )
    print(
        f"web: gunicorn -c gunicorn.conf.py, settings.prod (DEBUG off), {config.web_workers} workers x "
        f"{config.web_threads} threads, DB pool {config.pool_size} per worker"
    )
    print(
        f"load: {config.runners} runners, {config.batch_size}-event batches, {config.warmup:g} s warm-up + "
        f"{config.duration:g} s per throughput figure; {config.waiters} waiters, {config.rounds} rounds, "
        f"{config.park:g} s to park"
    )


# --- main ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per throughput figure (default 8)")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds before each (default 1)")
    parser.add_argument("--runners", type=int, default=8, help="appending threads, one run each (default 8)")
    parser.add_argument("--batch-size", type=int, default=50, help="events per batch (default 50)")
    parser.add_argument("--waiters", type=int, default=100, help="long-polls per round (default 100)")
    parser.add_argument("--rounds", type=int, default=5, help="wake-up rounds (default 5)")
    parser.add_argument("--park", type=float, default=1.0, help="seconds the waiters get to park (default 1)")
    parser.add_argument(
        "--listeners",
        type=int,
        default=50,
        help="raw LISTEN connections at most; capped by free connection slots (default 50)",
    )
    parser.add_argument(
        "--web-workers",
        type=int,
        default=int(os.environ.get("AGENTRUN_WEB_WORKERS", "2")),
        help="gunicorn workers (default AGENTRUN_WEB_WORKERS or 2)",
    )
    parser.add_argument(
        "--pool-size",
        type=int,
        default=int(os.environ.get("AGENTRUN_DB_POOL_SIZE", "16")),
        help="database pool per worker (default AGENTRUN_DB_POOL_SIZE or 16)",
    )
    args = parser.parse_args(argv)
    # Every loop is bounded by count and time; so are the knobs that size them.
    bounds = {
        "batch_size": (1, 500),
        "runners": (1, 64),
        "waiters": (1, 500),
        "rounds": (1, 50),
        "listeners": (1, 500),
        "web_workers": (1, 16),
        "pool_size": (1, 64),
        "duration": (0.5, 60),
        "warmup": (0, 10),
        "park": (0, 5),
    }
    for name, (low, high) in bounds.items():
        if not low <= getattr(args, name) <= high:
            parser.error(f"--{name.replace('_', '-')} must be within {low}..{high}")
    return Config(
        duration=args.duration,
        warmup=args.warmup,
        runners=args.runners,
        batch_size=args.batch_size,
        waiters=args.waiters,
        rounds=args.rounds,
        park=args.park,
        listeners=args.listeners,
        web_workers=args.web_workers,
        # Enough threads that one worker can park every waiter even if it accepted them all.
        web_threads=max(64, args.waiters + args.runners + 8),
        pool_size=args.pool_size,
    )


def measure(config: Config, db_url: str, web: WebServer, client_key: str, runner_key: str) -> Results:
    base_url = web.base_url
    with api_client(base_url, client_key) as client_api, api_client(base_url, runner_key) as runner_api:
        app_leases = [create_claimed_run(client_api, runner_api, f"app-{i}") for i in range(config.runners)]
        raw_leases = [create_claimed_run(client_api, runner_api, f"raw-{i}") for i in range(config.runners)]
        poll_lease = create_claimed_run(client_api, runner_api, "poll")
        runners = [api_client(base_url, runner_key) for _ in app_leases]
        try:
            print("measuring: batched appends (raw, then HTTP) ...", flush=True)
            batch_raw = raw_throughput(db_url, raw_leases, config.batch_size, config)
            batch = http_throughput(runners, app_leases, config.batch_size, config, db_url, web)
            print("measuring: single-event appends (raw, then HTTP) ...", flush=True)
            single_raw = raw_throughput(db_url, raw_leases, 0, config)
            single = http_throughput(runners, app_leases, 0, config, db_url, web)
        finally:
            for runner in runners:
                runner.close()
        listeners = raw_listener_count(db_url, config)
        print(
            f"measuring: wake-up latency (raw LISTEN x {listeners}, then {config.waiters} long-polls) ...", flush=True
        )
        wake_raw = raw_notify_latencies(db_url, listeners, config)
        wake = longpoll_latencies(base_url, client_key, runner_api, poll_lease, config, db_url)
    return Results(
        batch=batch,
        batch_raw=batch_raw,
        single=single,
        single_raw=single_raw,
        wake=wake,
        wake_raw=wake_raw,
        listeners=listeners,
    )


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)

    def measure_all(db_url: str, server: str, source: str) -> None:
        print("setup: keys, gunicorn ...", flush=True)
        client_key = create_key(db_url, "client")
        runner_key = create_key(db_url, "runner")
        with WebServer(db_url, config) as web:
            print_setup(config, server, source, server_facts(db_url))
            try:
                results = measure(config, db_url, web, client_key, runner_key)
            except BenchmarkError:
                print(f"gunicorn log (tail):\n{web.log_tail()}", file=sys.stderr)
                raise
        print_report(results, config)

    return run_on_fresh_database(BENCH_DB, measure_all)


if __name__ == "__main__":
    sys.exit(main())
