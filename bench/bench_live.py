"""The live path as deployed (gunicorn.conf.py: uvicorn workers), each figure beside its baseline
measured in the same run.

What is measured (`make bench`, or `.venv/bin/python bench/bench_live.py --help`):

a. SSE wake-up latency at W = 100 and W = 1,000 streams, on the server as deployed (2 workers
   unless AGENTRUN_WEB_WORKERS or --web-workers says otherwise): W streams follow ONE run (the
   widest fan-out: one NOTIFY wakes them all); per round one event is appended through the API. Latency
   per stream = the frame arriving minus the first sign that the append committed (the append's
   response, or a raw LISTEN probe in this script hearing the run's NOTIFY, whichever is first).
   Baseline: raw LISTEN/NOTIFY, L connections LISTENing (L = W, capped by the server's free
   connection slots; measured with agentrun's server stopped, so L is as large as it can be),
   one committed pg_notify per round; latency = receipt minus the COMMIT.
b. 10,000 idle SSE streams on one server process (one worker): 10 streams on each of 1,000
   runs. The worker's RSS, thread count and the database's connections before and after they
   are open (after a warm-up, so the pool is at its working size before), and a runner's
   single-event append latency (p50/p99 over a fixed time) with the streams open against none
   (measured before they open and again after they close, pooled).
c. A reference runner (`python -m runner`, echo backend) on its own run: the requests it sends,
   from the server's access log, over a window while it is idle and over one while it is in a
   turn (a `sleep:` prompt), beyond its heartbeats and its event batches.
d. Appends, batched and one event per request, over the deployed server, over gthread workers
   serving the WSGI application (how agentrun was served before it waited on an event loop),
   and over raw psycopg (bench_runner_protocol's baseline), all in this run.

The client side is one asyncio process (this one) with raw HTTP/1.1 streams; it shares the
machine's cores with the server and PostgreSQL. Open-file limits: this process and the server
raise their soft limit to the hard one (`ulimit -Hn`; 10,000 streams need 10,000 descriptors on
each side). Exit 0 whether targets are met or missed; 1 only when the benchmark failed.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

import httpx
import psycopg
import uvloop
from bench_runner_protocol import (
    Config as ProtocolConfig,
)
from bench_runner_protocol import (
    RunLease,
    WebServer,
    api_client,
    create_claimed_run,
    create_key,
    expect,
    http_throughput,
    raw_listener_count,
    raw_notify_latencies,
    raw_throughput,
)
from benchlib import ROOT, BenchmarkError, describe_server, percentile, run_on_fresh_database, server_facts

BENCH_DB = "agentrun_bench_live"
WAKE_TIMEOUT = 15.0
TARGET_SLACK_MS = {100: 15.0, 1000: 50.0}
TARGET_RSS_MB = 200.0
TARGET_CONNECTIONS = 1
TARGET_APPEND_RATIO = 1.2
# Today's figures (bench_runner_protocol, gthread workers) that the deployed server must not fall below.
TARGET_BATCH_RATIO, TARGET_SINGLE_RATIO = 0.50, 0.26
GTHREAD_MARGIN = 0.90


@dataclass
class Config:
    waiters: tuple[int, ...]
    rounds: int
    idle_streams: int
    idle_runs: int
    append_seconds: float
    runner_window: float
    duration: float
    runners: int
    batch_size: int
    only: frozenset[str]
    web_workers: int


PARTS = ("wake", "idle", "runner", "appends")


def raise_open_files() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


# --- a raw SSE client ------------------------------------------------------------------------


class Stream(asyncio.Protocol):
    """One SSE stream over a raw HTTP/1.1 connection (a protocol: no task per stream, so the
    client's own cost per event stays small); records when each event id arrives."""

    def __init__(self, arrivals: dict[str, list[float]] | None, request: bytes) -> None:
        self.arrivals, self.request = arrivals, request
        self.opened = asyncio.get_running_loop().create_future()
        self.closed = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.ids: list[str] = []
        self.head = b""
        self.body = b""  # the chunked body, not yet split into chunks
        self.frames = b""  # the SSE text, not yet split into frames
        self.in_head = True

    def connection_made(self, transport) -> None:  # type: ignore[override]  # asyncio's signature
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        if self.in_head:
            self.head += data
            if b"\r\n\r\n" not in self.head:
                return
            head, data = self.head.split(b"\r\n\r\n", 1)
            self.in_head = False
            if not head.startswith(b"HTTP/1.1 200"):
                self._fail(BenchmarkError(f"a stream answered {head[:200]!r}"))
                return
        self.body += data
        while True:  # chunks: size in hex, CRLF, data, CRLF
            end = self.body.find(b"\r\n")
            if end < 0:
                break
            size = int(self.body[:end], 16)
            if len(self.body) < end + 2 + size + 2:
                break
            self.frames += self.body[end + 2 : end + 2 + size]
            self.body = self.body[end + 2 + size + 2 :]
        while b"\n\n" in self.frames:
            frame, self.frames = self.frames.split(b"\n\n", 1)
            if frame.startswith(b"retry:"):
                if not self.opened.done():
                    self.opened.set_result(None)
            elif frame.startswith(b"id: "):
                event_id = frame[4 : frame.index(b"\n")].decode()
                self.ids.append(event_id)
                if self.arrivals is not None:
                    self.arrivals.setdefault(event_id, []).append(now)

    def _fail(self, error: Exception) -> None:
        if not self.opened.done():
            self.opened.set_exception(error)
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc or BenchmarkError("a stream closed before it started"))
        if not self.closed.done():
            self.closed.set_result(None)

    @property
    def open(self) -> bool:
        return not self.closed.done()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def open_streams(
    base_url: str, key: str, paths: list[str], last_ids: list[str | None], arrivals=None, concurrency: int = 400
) -> list[Stream]:
    host, port = base_url.removeprefix("http://").split(":")
    loop = asyncio.get_running_loop()
    streams: list[Stream] = []
    for start in range(0, len(paths), concurrency):
        batch = []
        for path, last_id in zip(
            paths[start : start + concurrency], last_ids[start : start + concurrency], strict=True
        ):
            resume = f"Last-Event-ID: {last_id}\r\n" if last_id is not None else ""
            request = (
                f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
                f"Accept: text/event-stream\r\n{resume}\r\n"
            ).encode()
            stream = Stream(arrivals, request)
            batch.append(stream)
        await asyncio.gather(*(loop.create_connection(lambda s=s: s, host, int(port)) for s in batch))
        await asyncio.wait_for(asyncio.gather(*(s.opened for s in batch)), 120)
        streams += batch
    return streams


# --- server facts ----------------------------------------------------------------------------


def worker_pids(master: int) -> list[int]:
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as stat:
                    if int(stat.read().rsplit(")", 1)[1].split()[1]) == master:
                        pids.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    return pids


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise BenchmarkError(f"no VmRSS for {pid}")


def threads_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def connections(db_url: str) -> int:
    with psycopg.connect(db_url, autocommit=True) as conn:
        return int(
            conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchone()[0]
        )


# --- a. wake-ups -----------------------------------------------------------------------------


@dataclass
class Wake:
    waiters: int
    samples: list[float] = field(default_factory=list)  # seconds
    raw: list[float] = field(default_factory=list)
    listeners: int = 0
    missing: int = 0

    def p(self, q: float, raw: bool = False) -> float:
        return percentile(self.raw if raw else self.samples, q) * 1000.0


async def sse_wakeups(base_url: str, keys: dict, lease: RunLease, waiters: int, rounds: int, db_url: str) -> Wake:
    wake = Wake(waiters)
    arrivals: dict[str, list[float]] = {}
    async with httpx.AsyncClient(
        base_url=f"{base_url}/api/v1", headers={"Authorization": f"Bearer {keys['runner']}"}, timeout=30
    ) as runner:
        last = int(
            expect(await runner.get(f"/runs/{lease.run_id}/events", params={"limit": 500}), 200).json()["cursor"]
        )
        path = f"/api/v1/runs/{lease.run_id}/events/stream"
        streams = await open_streams(base_url, keys["client"], [path] * waiters, [str(last)] * waiters, arrivals)
        probe = await psycopg.AsyncConnection.connect(db_url, autocommit=True)
        await probe.execute("LISTEN agentrun")
        heard: list[float] = []

        async def listen() -> None:
            async for note in probe.notifies():
                if note.payload == f"run:{lease.run_id}":
                    heard.append(time.perf_counter())

        listener = asyncio.get_running_loop().create_task(listen())
        try:
            for _ in range(rounds):
                await asyncio.sleep(0.3)
                body = {
                    "runnerId": lease.runner_id,
                    "leaseEpoch": lease.lease_epoch,
                    "type": "assistant_message",
                    "payload": {"text": "wake up"},
                }
                count = len(heard)
                response = await runner.post(f"/runs/{lease.run_id}/events", json=body)
                returned = time.perf_counter()
                seq = str(expect(response, 201).json()["seq"])
                deadline = time.monotonic() + WAKE_TIMEOUT
                while len(arrivals.get(seq, ())) < waiters and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                reference = min(heard[count], returned) if len(heard) > count else returned
                got = arrivals.get(seq, [])
                wake.missing += waiters - len(got)
                wake.samples += [arrived - reference for arrived in got]
            duplicates = sum(len(s.ids) - len(set(s.ids)) for s in streams)
            if duplicates:
                raise BenchmarkError(f"{duplicates} events arrived twice on a stream")
        finally:
            listener.cancel()
            await probe.close()
            for stream in streams:
                stream.close()
    return wake


def raw_wakeups(db_url: str, wake: Wake, rounds: int, web_workers: int) -> None:
    config = protocol_config(listeners=wake.waiters, rounds=rounds, web_workers=web_workers)
    wake.listeners = raw_listener_count(db_url, config)
    wake.raw = raw_notify_latencies(db_url, wake.listeners, config).samples


def protocol_config(**overrides) -> ProtocolConfig:
    values = {
        "duration": 8.0,
        "warmup": 1.0,
        "runners": 8,
        "batch_size": 50,
        "waiters": 1,
        "rounds": 5,
        "park": 0.3,
        "listeners": 50,
        "web_workers": 1,
        "web_threads": 64,
        "pool_size": 16,
    }
    values.update(overrides)
    return ProtocolConfig(**values)


# --- b. idle streams -------------------------------------------------------------------------


@dataclass
class Idle:
    streams: int
    rss_before: float
    rss_after: float
    threads_before: int
    threads_after: int
    connections_before: int
    connections_after: int
    append_before: list[float]
    append_after: list[float]
    # The same two figures with heartbeats every 600 s (before, after), when measured.
    quiet_append: tuple[list[float], list[float]] | None = None


async def append_latencies(base_url: str, key: str, lease: RunLease, seconds: float) -> list[float]:
    samples = []
    async with httpx.AsyncClient(
        base_url=f"{base_url}/api/v1", headers={"Authorization": f"Bearer {key}"}, timeout=30
    ) as runner:
        deadline = time.monotonic() + seconds
        index = 0
        while time.monotonic() < deadline:
            body = {
                "runnerId": lease.runner_id,
                "leaseEpoch": lease.lease_epoch,
                "type": "assistant_message",
                "payload": {"text": "a line", "index": index},
            }
            started = time.perf_counter()
            expect(await runner.post(f"/runs/{lease.run_id}/events", json=body), 201)
            samples.append(time.perf_counter() - started)
            index += 1
    return samples


def hold_streams(base_url: str, key: str, paths: list[str], pipe) -> None:
    """The child process: open the streams, say so, hold them until told, say how many stayed open."""

    async def hold() -> None:
        try:
            streams = await open_streams(base_url, key, paths, ["1"] * len(paths))
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the benchmark
            pipe.send(f"{type(exc).__name__}: {exc}")
            return
        pipe.send("open")
        await asyncio.get_running_loop().run_in_executor(None, pipe.recv)
        pipe.send(sum(1 for stream in streams if stream.open))
        for stream in streams:
            stream.close()

    uvloop.run(hold())


async def idle_streams(web: WebServer, keys: dict, config: Config, db_url: str, appender: RunLease) -> Idle:
    async with httpx.AsyncClient(
        base_url=f"{web.base_url}/api/v1",
        headers={"Authorization": f"Bearer {keys['client']}"},
        timeout=30,
        limits=httpx.Limits(max_connections=16),
    ) as client:
        semaphore = asyncio.Semaphore(16)

        async def create(index: int) -> str:
            async with semaphore:
                response = await client.post(
                    "/runs", json={"backendProfile": "echo", "idempotencyKey": f"idle-{index}"}
                )
                return expect(response, 201, 200).json()["id"]

        run_ids = await asyncio.gather(*(create(i) for i in range(config.idle_runs)))
    (worker,) = worker_pids(web.process.pid)
    # Warm: the append path and the pool at their working size before "before".
    await append_latencies(web.base_url, keys["runner"], appender, 2.0)
    before_append = await append_latencies(web.base_url, keys["runner"], appender, config.append_seconds)
    await asyncio.sleep(1.0)
    rss_before, threads_before, conns_before = rss_mb(worker), threads_of(worker), connections(db_url)
    per_run = max(1, config.idle_streams // config.idle_runs)
    paths = [f"/api/v1/runs/{run_id}/events/stream" for run_id in run_ids for _ in range(per_run)]
    print(f"  opening {len(paths):,} streams (in a child process, so the appender here shares no loop) ...")
    holder, ours = multiprocessing.Pipe()
    child = multiprocessing.get_context("fork").Process(
        target=hold_streams, args=(web.base_url, keys["client"], paths, holder), daemon=True
    )
    child.start()
    try:
        ready = await asyncio.get_running_loop().run_in_executor(None, ours.recv)
        if ready != "open":
            raise BenchmarkError(f"the stream holder failed: {ready}")
        await asyncio.sleep(3.0)
        rss_after, threads_after, conns_after = rss_mb(worker), threads_of(worker), connections(db_url)
        after_append = await append_latencies(web.base_url, keys["runner"], appender, config.append_seconds)
        ours.send("close")
        alive = await asyncio.get_running_loop().run_in_executor(None, ours.recv)
        if alive != len(paths):
            raise BenchmarkError(f"only {alive} of {len(paths)} idle streams stayed open")
    finally:
        child.join(30)
        if child.is_alive():
            child.kill()
    # "With none" once more, after they closed: the baseline is both, before and after.
    await asyncio.sleep(2.0)
    before_append += await append_latencies(web.base_url, keys["runner"], appender, config.append_seconds)
    return Idle(
        streams=len(paths),
        rss_before=rss_before,
        rss_after=rss_after,
        threads_before=threads_before,
        threads_after=threads_after,
        connections_before=conns_before,
        connections_after=conns_after,
        append_before=before_append,
        append_after=after_append,
    )


# --- c. a runner's requests ------------------------------------------------------------------


@dataclass
class RunnerRequests:
    window: float
    idle: dict[str, int]
    turn: dict[str, int]

    @staticmethod
    def beyond(counts: dict[str, int]) -> int:
        return sum(n for request, n in counts.items() if not request.endswith(("/heartbeat", "/events")))


REQUEST = re.compile(r'^(\S+)Z .*"(GET|POST|PUT) (\S+?)(?:\?\S*)? HTTP/1\.1" (\d+)')
IDS = re.compile(r"(run|cmd|evt|job)_[0-9a-f]+")


def access_lines(log_path: str) -> list[tuple[float, str]]:
    """(time, "METHOD path" with ids as {id}) of each request in the server's access log."""
    lines = []
    with open(log_path, errors="replace") as log:
        for line in log:
            if match := REQUEST.search(line):
                at = datetime.strptime(match.group(1), "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=UTC).timestamp()
                lines.append((at, f"{match.group(2)} {IDS.sub('{id}', match.group(3))}"))
    return lines


def runner_requests(web: WebServer, keys: dict, config: Config, log_path: str) -> RunnerRequests:
    with api_client(web.base_url, keys["client"]) as client:
        run = expect(client.post("/runs", json={"backendProfile": "echo"}), 201).json()
        env = {
            **os.environ,
            "AGENTRUN_RUNNER_KEY": keys["runner"],
            "AGENTRUN_LOG_LEVEL": "WARNING",
        }
        runner = subprocess.Popen(
            [sys.executable, "-m", "runner", "--manager", web.base_url, "--run", run["id"], "--lease-ms", "30000"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(3.0)  # claimed, following its stream
            idle_from = time.time()
            time.sleep(config.runner_window)
            idle_to = time.time()
            turn = {"type": "turn", "payload": {"prompt": f"sleep: {config.runner_window + 6:.0f}"}}
            expect(client.post(f"/runs/{run['id']}/commands", json=turn), 201)
            time.sleep(3.0)  # acknowledged and started
            turn_from = time.time()
            time.sleep(config.runner_window)
            turn_to = time.time()
        finally:
            client.post(f"/runs/{run['id']}/cancel", json={})
            try:
                runner.wait(timeout=20)
            except subprocess.TimeoutExpired:
                runner.kill()
    time.sleep(0.5)
    lines = access_lines(log_path)  # nothing else calls the server meanwhile

    def window(start: float, end: float) -> dict[str, int]:
        counts: dict[str, int] = {}
        for at, request in lines:
            if start <= at <= end:
                counts[request] = counts.get(request, 0) + 1
        return counts

    return RunnerRequests(config.runner_window, window(idle_from, idle_to), window(turn_from, turn_to))


# --- d. appends ------------------------------------------------------------------------------


class GthreadServer(WebServer):
    """gunicorn with gthread workers serving the WSGI application: the earlier deployment."""

    def __init__(self, db_url: str, config: ProtocolConfig):
        super().__init__(db_url, config)
        self.argv = [
            sys.executable,
            "-m",
            "gunicorn",
            "-c",
            "gunicorn.conf.py",
            "-k",
            "gthread",
            "--threads",
            str(config.web_threads),
            "agentrun.wsgi:application",
        ]


def cpu_ms(throughput, events_per_request: int) -> float:
    if not throughput.server_cpu or not throughput.events:
        return float("nan")
    return throughput.server_cpu * 1000.0 / (throughput.events / events_per_request)


@dataclass
class Appends:
    cpu: dict[str, float]
    batch: float
    batch_gthread: float
    batch_raw: float
    single: float
    single_gthread: float
    single_raw: float


def appends(db_url: str, keys: dict, config: Config) -> Appends:
    protocol = protocol_config(
        duration=config.duration, runners=config.runners, batch_size=config.batch_size, web_workers=2
    )
    figures = {}
    for name, server_class in (("deployed", WebServer), ("gthread", GthreadServer)):
        with server_class(db_url, protocol) as web:
            with api_client(web.base_url, keys["client"]) as c, api_client(web.base_url, keys["runner"]) as r:
                leases = [create_claimed_run(c, r, f"{name}-{i}-{uuid.uuid4().hex[:6]}") for i in range(config.runners)]
            clients = [api_client(web.base_url, keys["runner"]) for _ in leases]
            try:
                batch = http_throughput(clients, leases, config.batch_size, protocol, db_url, web)
                single = http_throughput(clients, leases, 0, protocol, db_url, web)
                figures[f"batch_{name}"], figures[f"single_{name}"] = batch.per_second, single.per_second
                # The server's CPU per request: steadier than a rate on a shared machine.
                figures[f"batch_cpu_{name}"] = cpu_ms(batch, config.batch_size)
                figures[f"single_cpu_{name}"] = cpu_ms(single, 1)
            finally:
                for client in clients:
                    client.close()
            if name == "deployed":
                with api_client(web.base_url, keys["client"]) as c, api_client(web.base_url, keys["runner"]) as r:
                    raw_leases = [
                        create_claimed_run(c, r, f"raw-{i}-{uuid.uuid4().hex[:6]}") for i in range(config.runners)
                    ]
                figures["batch_raw"] = raw_throughput(db_url, raw_leases, config.batch_size, protocol).per_second
                figures["single_raw"] = raw_throughput(db_url, raw_leases, 0, protocol).per_second
    return Appends(
        cpu={key: value for key, value in figures.items() if "_cpu_" in key},
        batch=figures["batch_deployed"],
        batch_gthread=figures["batch_gthread"],
        batch_raw=figures["batch_raw"],
        single=figures["single_deployed"],
        single_gthread=figures["single_gthread"],
        single_raw=figures["single_raw"],
    )


# --- report ----------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


def print_report(wakes: list[Wake], idle: Idle | None, requests: RunnerRequests | None, added: Appends | None) -> None:
    rows: list[tuple[str, ...]] = []
    for wake in wakes:
        slack = TARGET_SLACK_MS.get(wake.waiters, 50.0)
        p99, raw99 = wake.p(99), wake.p(99, raw=True)
        rows.append(
            (
                f"wake-up p50/p99 at {wake.waiters:,} SSE waiters (ms)",
                f"{wake.p(50):.1f} / {p99:.1f}" + (f" ({wake.missing} missed)" if wake.missing else ""),
                f"{wake.p(50, raw=True):.1f} / {raw99:.1f} (L={wake.listeners})",
                f"p99 <= raw + {slack:.0f}",
                verdict(p99 <= raw99 + slack and not wake.missing),
            )
        )
    if idle is not None:
        rows += idle_rows(idle)
    if requests is not None:
        rows += request_rows(requests)
    if added is not None:
        rows += append_rows(added)
    print_table(rows)


def idle_rows(idle: Idle) -> list[tuple[str, ...]]:
    rows = []
    added_rss = idle.rss_after - idle.rss_before
    rows.append(
        (
            f"{idle.streams:,} idle streams, one process: added RSS (MB)",
            f"{added_rss:.1f}",
            f"{idle.rss_before:.0f} MB before",
            f"<= {TARGET_RSS_MB:.0f}",
            verdict(added_rss <= TARGET_RSS_MB),
        )
    )
    added_connections = idle.connections_after - idle.connections_before
    rows.append(
        (
            f"{idle.streams:,} idle streams: added database connections",
            f"{added_connections:+d}",
            f"{idle.connections_before} before",
            f"<= {TARGET_CONNECTIONS}",
            verdict(added_connections <= TARGET_CONNECTIONS),
        )
    )
    rows.append(
        (
            f"{idle.streams:,} idle streams: added worker threads",
            f"{idle.threads_after - idle.threads_before:+d}",
            f"{idle.threads_before} before",
            "-",
            "info",
        )
    )
    p99_after, p99_before = percentile(idle.append_after, 99), percentile(idle.append_before, 99)
    ratio = p99_after / p99_before
    rows.append(
        (
            "a runner's append p99 with those streams open (ms)",
            f"{p99_after * 1000:.1f} (p50 {percentile(idle.append_after, 50) * 1000:.1f})",
            f"{p99_before * 1000:.1f} (p50 {percentile(idle.append_before, 50) * 1000:.1f}) with none",
            f"ratio {ratio:.2f} <= {TARGET_APPEND_RATIO}",
            verdict(ratio <= TARGET_APPEND_RATIO),
        )
    )
    if idle.quiet_append is not None:
        before, after = idle.quiet_append
        quiet_ratio = percentile(after, 99) / percentile(before, 99)
        rows.append(
            (
                "  the same, heartbeats every 600 s instead of 15 s (ms)",
                f"{percentile(after, 99) * 1000:.1f} (p50 {percentile(after, 50) * 1000:.1f})",
                f"{percentile(before, 99) * 1000:.1f} (p50 {percentile(before, 50) * 1000:.1f}) with none",
                f"ratio {quiet_ratio:.2f}",
                "info",
            )
        )
    return rows


def request_rows(requests: RunnerRequests) -> list[tuple[str, ...]]:
    rows = []
    per_minute = 60.0 / requests.window
    for name, counts in (("idle", requests.idle), ("in a turn", requests.turn)):
        beyond = RunnerRequests.beyond(counts)
        shown = ", ".join(f"{request} x{n}" for request, n in sorted(counts.items())) or "none"
        rows.append(
            (
                f"requests/min from a runner {name}, beyond heartbeats and batches",
                f"{beyond * per_minute:.1f}",
                f"all: {shown}",
                "0",
                verdict(beyond == 0),
            )
        )
    return rows


def append_rows(added: Appends) -> list[tuple[str, ...]]:
    rows = []
    for label, value, gthread, raw, target in (
        (
            "batched appends (events/s), ratio to raw",
            added.batch,
            added.batch_gthread,
            added.batch_raw,
            TARGET_BATCH_RATIO,
        ),
        (
            "single appends (events/s), ratio to raw",
            added.single,
            added.single_gthread,
            added.single_raw,
            TARGET_SINGLE_RATIO,
        ),
    ):
        ratio, before = value / raw, gthread / raw
        rows.append(
            (
                label,
                f"{value:,.0f} ({ratio:.2f})",
                f"raw {raw:,.0f}; gthread {gthread:,.0f} ({before:.2f})",
                f">= {target} and >= gthread's",
                verdict(ratio >= target and value >= gthread * GTHREAD_MARGIN),
            )
        )
    for kind in ("batch", "single"):
        rows.append(
            (
                f"  server CPU per {kind} request (ms)",
                f"{added.cpu[f'{kind}_cpu_deployed']:.2f}",
                f"gthread {added.cpu[f'{kind}_cpu_gthread']:.2f}",
                "-",
                "info",
            )
        )
    return rows


def print_table(rows: list[tuple[str, ...]]) -> None:
    header = ("figure", "agentrun", "baseline (same run)", "target", "")
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    print()
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("| " + " | ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)) + " |")
    print(
        "\nwake-up: from the first sign of the commit (the append's response or a raw LISTEN probe hearing its "
        "NOTIFY) to each stream's frame; raw: receipt minus the notifier's COMMIT, L listening connections."
    )
    print(
        f"appends within {100 - GTHREAD_MARGIN * 100:.0f}% of gthread's count as no lower: on this shared machine "
        "the same server's rate moves by more than that from run to run."
    )


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--waiters", default="100,1000", help="stream counts for the wake-up figure")
    parser.add_argument("--rounds", type=int, default=8, help="wake-up rounds per count (default 8)")
    parser.add_argument("--idle-streams", type=int, default=10_000)
    parser.add_argument("--idle-runs", type=int, default=1_000)
    parser.add_argument("--append-seconds", type=float, default=8.0)
    parser.add_argument("--runner-window", type=float, default=20.0, help="seconds per runner window (default 20)")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per append figure (default 6)")
    parser.add_argument("--runners", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument(
        "--web-workers",
        type=int,
        default=int(os.environ.get("AGENTRUN_WEB_WORKERS", "2")),
        help="workers of the deployed server for the wake-up and runner figures (default AGENTRUN_WEB_WORKERS or 2)",
    )
    parser.add_argument("--only", default=",".join(PARTS), help=f"the parts to measure, of {','.join(PARTS)}")
    args = parser.parse_args(argv)
    only = frozenset(args.only.split(","))
    if not only <= set(PARTS):
        parser.error(f"--only takes {','.join(PARTS)}")
    return Config(
        waiters=tuple(int(w) for w in args.waiters.split(",")),
        rounds=args.rounds,
        idle_streams=args.idle_streams,
        idle_runs=args.idle_runs,
        append_seconds=args.append_seconds,
        runner_window=args.runner_window,
        duration=args.duration,
        runners=args.runners,
        batch_size=args.batch_size,
        only=only,
        web_workers=args.web_workers,
    )


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    files = raise_open_files()
    if files < config.idle_streams + 1000:
        print(f"open-file limit {files} is below {config.idle_streams + 1000}; raise `ulimit -n`", file=sys.stderr)
        return 1

    def measure_all(db_url: str, server: str, source: str) -> None:
        facts = server_facts(db_url)
        print(
            f"machine: {os.cpu_count()} cores shared by this client, the server and PostgreSQL; open files {files:,}\n"
            f"database: {source}, {describe_server(server)}, PostgreSQL {facts['server_version']}, "
            f"max_connections={facts['max_connections']}",
            flush=True,
        )
        keys = {role: create_key(db_url, role) for role in ("client", "runner")}
        log = tempfile.NamedTemporaryFile(prefix="agentrun-access-", suffix=".log", delete=False)  # noqa: SIM115 - read after the server stops
        log.close()
        wakes, idle, requests = [], None, None
        if config.only & {"wake", "runner"}:
            # As deployed (AGENTRUN_WEB_WORKERS, default 2): the streams spread over the workers.
            deployed = WebServer(db_url, protocol_config(web_workers=config.web_workers))
            deployed.env["AGENTRUN_ACCESS_LOG"] = log.name
            with deployed:
                print(f"web: gunicorn -c gunicorn.conf.py, {config.web_workers} workers, settings.prod", flush=True)
                with (
                    api_client(deployed.base_url, keys["client"]) as c,
                    api_client(deployed.base_url, keys["runner"]) as r,
                ):
                    wake_lease = create_claimed_run(c, r, "wake")
                for waiters in config.waiters if "wake" in config.only else ():
                    print(f"measuring: wake-ups at {waiters:,} SSE streams ...", flush=True)
                    wakes.append(
                        uvloop.run(sse_wakeups(deployed.base_url, keys, wake_lease, waiters, config.rounds, db_url))
                    )
                if "runner" in config.only:
                    print("measuring: a runner's requests, idle and in a turn ...", flush=True)
                    requests = runner_requests(deployed, keys, config, log.name)
        for wake in wakes:  # with no server running: as many listening connections as the server allows
            print(f"measuring: raw LISTEN/NOTIFY for {wake.waiters:,} ...", flush=True)
            raw_wakeups(db_url, wake, config.rounds, 0)
        if "idle" in config.only:
            with WebServer(db_url, protocol_config(web_workers=1)) as one:
                print("web: gunicorn -c gunicorn.conf.py, 1 worker: one server process", flush=True)
                with api_client(one.base_url, keys["client"]) as c, api_client(one.base_url, keys["runner"]) as r:
                    append_lease = create_claimed_run(c, r, "append")
                print(f"measuring: {config.idle_streams:,} idle streams ...", flush=True)
                idle = uvloop.run(idle_streams(one, keys, config, db_url, append_lease))
            # The same with heartbeats all but off: how much of the append figure the 15 s
            # keepalives of 10,000 streams (server writes, load-generator reads) account for.
            quiet_server = WebServer(db_url, protocol_config(web_workers=1))
            quiet_server.env["AGENTRUN_STREAM_HEARTBEAT_SECONDS"] = "600"
            with quiet_server:
                with (
                    api_client(quiet_server.base_url, keys["client"]) as c,
                    api_client(quiet_server.base_url, keys["runner"]) as r,
                ):
                    quiet_lease = create_claimed_run(c, r, "append-quiet")
                print(f"measuring: {config.idle_streams:,} idle streams, heartbeats every 600 s ...", flush=True)
                quiet = uvloop.run(idle_streams(quiet_server, keys, config, db_url, quiet_lease))
            idle.quiet_append = (quiet.append_before, quiet.append_after)
        added = None
        if "appends" in config.only:
            print("measuring: appends (deployed, gthread, raw) ...", flush=True)
            added = appends(db_url, keys, config)
        os.unlink(log.name)
        print_report(wakes, idle, requests, added)

    return run_on_fresh_database(BENCH_DB, measure_all)


if __name__ == "__main__":
    sys.exit(main())
