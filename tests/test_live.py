"""The live path over real sockets, against the server as deployed (gunicorn, uvicorn workers):
SSE streams and long-polls wait on the event loop, resume exactly, survive the listener's
connection being killed, close a client that stops reading, and apply the API's roles."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import threading
import time
from pathlib import Path

import httpx
import psycopg
import pytest
from httpx_sse import EventSource, aconnect_sse

from agentrun.live import LISTENER_NAME
from runs import services
from runs.models import RunEvent
from tests.helpers import PROJECT, TENANT, claim, gunicorn, live_database_url, make_run, raw_key, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

HEARTBEAT = 0.5
STALL = 2.0


@pytest.fixture(scope="module")
def server(django_db_setup, django_db_blocker, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("live")
    env = {
        "AGENTRUN_STREAM_HEARTBEAT_SECONDS": str(HEARTBEAT),
        "AGENTRUN_STREAM_STALL_SECONDS": str(STALL),
        "AGENTRUN_STREAM_PAGE": "20",
        "AGENTRUN_ACCESS_LOG": "-",
    }
    # One worker with 4 threads: whatever waits must not hold one of them.
    with django_db_blocker.unblock(), gunicorn(tmp, workers=1, threads=4, **env) as url:
        yield Server(url, tmp / "gunicorn.log")


class Server:
    def __init__(self, url: str, log: Path):
        self.url, self.log = url, log
        self.api = f"{url}/api/v1"

    def client(self, key: str, **kwargs) -> httpx.Client:
        kwargs.setdefault("timeout", httpx.Timeout(20, connect=5))
        return httpx.Client(base_url=self.api, headers={"Authorization": f"Bearer {key}"}, **kwargs)

    def lines(self) -> list[dict]:
        """The server's log: one JSON object per line (agentrun.logs)."""
        return [json.loads(line) for line in self.log.read_text(errors="replace").splitlines() if line.startswith("{")]

    def requests_of(self, fragment: str) -> list[dict]:
        """The access log's request lines whose path holds `fragment`."""
        return [line for line in self.lines() if line.get("logger") == "uvicorn.access" and fragment in line["path"]]


def append(run, lease_epoch, count: int, *, text: str = "line", kind: str = "assistant_message"):
    events = [(kind, {"text": f"{text} {index}"}) for index in range(count)]
    return services.event_append(run_id=run.id, runner_id="runner-1", lease_epoch=lease_epoch, events=events)[0]


def finish(run, lease_epoch, status="completed"):
    return services.run_finish(run_id=run.id, runner_id="runner-1", lease_epoch=lease_epoch, terminal_status=status)


def read_stream(api: httpx.Client, path: str, *, headers=None, params=None, stop_after: int | None = None):
    """(id, event, data) of each event read, until the server ends the stream or `stop_after`."""
    got = []
    with api.stream("GET", path, headers=headers or {}, params=params) as response:
        assert response.status_code == 200, response.read()[:500]
        assert response.headers["content-type"].startswith("text/event-stream")
        for sse in EventSource(response).iter_sse():
            if not sse.data:
                continue
            got.append((sse.id, sse.event, json.loads(sse.data)))
            if stop_after is not None and len(got) >= stop_after:
                break
    return got


def test_a_run_stream_sends_every_event_in_order_then_ends_after_terminal_status(server):
    run = make_run()
    epoch = claim(run).lease_epoch
    append(run, epoch, 45)
    finish(run, epoch)
    with server.client(raw_key("client")) as api:
        got = read_stream(api, f"runs/{run.id}/events/stream")
    stored = list(RunEvent.objects.filter(run_id=run.id).order_by("seq"))
    assert [int(i) for i, _, _ in got] == [e.seq for e in stored]
    assert [kind for _, kind, _ in got] == [e.type for e in stored]
    assert got[-1][1] == "terminal_status"
    assert all(data["runId"] == run.id and str(data["seq"]) == i for i, _, data in got)
    with server.client(raw_key("client")) as api:
        # Resumed past its end, a finished run's stream is 204 No Content: SSE clients stop there.
        past = api.get(f"runs/{run.id}/events/stream", headers={"Last-Event-ID": str(stored[-1].seq)})
        assert (past.status_code, past.content) == (204, b"")
        output = read_stream(api, f"runs/{run.id}/events/stream", params={"view": "output"})
        control = read_stream(api, f"runs/{run.id}/events/stream", params={"view": "control"})
    assert [kind for _, kind, _ in output] == ["assistant_message"] * 45 + ["terminal_status"]
    assert [kind for _, kind, _ in control] == ["terminal_status"]


def test_a_stream_resumed_at_random_points_equals_one_uninterrupted_read(server):
    """A writer appends while a reader drops its stream at random points and resumes with
    Last-Event-ID (or afterSeq): what it read equals one uninterrupted read, no gap, no repeat."""
    run = make_run()
    epoch = claim(run).lease_epoch
    rng = random.Random(1202)
    done = threading.Event()

    def write():
        for _ in range(40):
            append(run, epoch, rng.randint(1, 9))
            time.sleep(rng.uniform(0, 0.03))
        finish(run, epoch)
        done.set()

    writer = threading.Thread(target=write)
    writer.start()
    resumed, reconnects, last = [], 0, None
    with server.client(raw_key("client")) as api:
        while not resumed or resumed[-1][1] != "terminal_status":
            headers, params = {}, {}
            if last is not None:
                if rng.random() < 0.5:
                    headers["Last-Event-ID"] = last
                else:
                    params["afterSeq"] = last
            part = read_stream(
                api, f"runs/{run.id}/events/stream", headers=headers, params=params, stop_after=rng.randint(1, 25)
            )
            resumed += part
            last = resumed[-1][0] if resumed else last
            reconnects += 1
        writer.join()
        whole = read_stream(api, f"runs/{run.id}/events/stream")
    assert reconnects > 5
    assert [(i, kind) for i, kind, _ in resumed] == [(i, kind) for i, kind, _ in whole]
    assert [int(i) for i, _, _ in whole] == list(range(1, len(whole) + 1))


def test_500_streams_woken_by_one_append_each_get_it_once(server):
    run = make_run()
    epoch = claim(run).lease_epoch
    after = RunEvent.objects.filter(run_id=run.id).count()
    key = raw_key("client")
    ready = threading.Event()
    parked = 0

    async def follow(client: httpx.AsyncClient) -> list[str]:
        nonlocal parked
        ids = []
        headers = {"Last-Event-ID": str(after)}
        async with aconnect_sse(client, "GET", f"runs/{run.id}/events/stream", headers=headers) as source:
            async for sse in source.aiter_sse():
                if sse.retry is not None:  # the stream's head: this stream is subscribed
                    parked += 1
                    if parked == 500:
                        ready.set()
                if sse.data:
                    ids.append(sse.id)
                    if sse.event == "terminal_status":
                        break
        return ids

    async def main() -> list[list[str]]:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
        timeout = httpx.Timeout(60, connect=30)
        async with httpx.AsyncClient(
            base_url=server.api, headers={"Authorization": f"Bearer {key}"}, limits=limits, timeout=timeout
        ) as client:
            return await asyncio.gather(*(follow(client) for _ in range(500)))

    results: list = []
    reader = threading.Thread(target=lambda: results.append(asyncio.run(main())))
    reader.start()
    assert ready.wait(60), f"only {parked} of 500 streams started"
    event = append(run, epoch, 1)[0]
    time.sleep(0.5)
    finish(run, epoch)
    reader.join(60)
    streams = results[0]
    assert len(streams) == 500
    terminal = RunEvent.objects.get(run_id=run.id, type="terminal_status").seq
    assert all(ids == [str(event.seq), str(terminal)] for ids in streams), {tuple(ids) for ids in streams}


def test_heartbeats_arrive_while_nothing_happens(server):
    run = make_run()
    lines = []
    with server.client(raw_key("client")) as api, api.stream("GET", f"runs/{run.id}/events/stream") as response:
        started = time.monotonic()
        for line in response.iter_lines():
            lines.append(line)
            if time.monotonic() - started > HEARTBEAT * 4.5:
                break
    assert lines[0].startswith("retry: ")
    assert sum(line == ": keepalive" for line in lines) >= 3, lines


def test_streams_apply_roles_tenancy_and_check_their_input_before_starting(server):
    run = make_run(session_id="live-roles")
    other_run = make_run()
    sse = {"Accept": "text/event-stream"}

    def status(key: str | None, path: str, headers=None, params=None) -> tuple[int, str | None]:
        api = server.client(key) if key else httpx.Client(base_url=server.api, timeout=10)
        with api:
            response = api.get(path, headers={**sse, **(headers or {})}, params=params)
            if response.status_code == 200:
                return 200, None
            assert response.headers["content-type"].startswith("application/json"), response.headers
            return response.status_code, response.json()["error"]["kind"]

    stream = f"runs/{run.id}/events/stream"
    session_stream = "sessions/live-roles/output/stream"
    elsewhere = raw_key("client", tenant="someone-else")
    scoped_runner = raw_key("runner", run=other_run.id)
    # A finished stream answers 200 at once; an open one is read only by its status here.
    services.run_cancel(run_id=run.id)
    assert status(None, stream) == (401, "auth-required")
    assert status(elsewhere, stream) == (404, "schema-invalid")
    assert status(elsewhere, session_stream) == (404, "schema-invalid")
    assert status(scoped_runner, stream) == (404, "schema-invalid")
    assert status(raw_key("runner", run=run.id), stream) == (200, None)
    assert status(raw_key("runner"), session_stream) == (403, "forbidden")
    assert status(raw_key("client"), stream, params={"view": "everything"}) == (400, "schema-invalid")
    assert status(raw_key("client"), stream, headers={"Last-Event-ID": "-1"}) == (400, "schema-invalid")
    assert status(raw_key("client"), stream, params={"afterSeq": "x"}) == (400, "schema-invalid")
    assert status(raw_key("client"), session_stream, headers={"Last-Event-ID": "7"}) == (400, "schema-invalid")
    assert status(raw_key("client"), session_stream, headers={"Last-Event-ID": f"{other_run.id}:1"}) == (
        404,
        "schema-invalid",
    )
    assert status(raw_key("client"), "runs/run_missing/events/stream") == (404, "schema-invalid")


def listener_pids(database_url: str) -> list[int]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s AND datname = current_database()",
            [LISTENER_NAME],
        ).fetchall()
    return [pid for (pid,) in rows]


def test_the_listener_connection_is_killed_and_restored_and_nothing_is_missed(server):
    run = make_run()
    epoch = claim(run).lease_epoch
    url = live_database_url()
    before = listener_pids(url)
    assert len(before) == 1, before  # one worker: one listening connection
    got: list[str] = []
    with server.client(raw_key("client")) as api:

        def read():
            with api.stream("GET", f"runs/{run.id}/events/stream") as response:
                got.extend(sse.id for sse in EventSource(response).iter_sse() if sse.data)

        reader = threading.Thread(target=read)
        reader.start()
        assert wait_for(lambda: len(got) >= 2, 10)  # run-created, run-claimed
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(%s)", [before[0]])
        # Committed while nobody listens: the waiters look again once the listener is back.
        append(run, epoch, 3)
        assert wait_for(lambda: len(got) >= 5, 10), got
        assert wait_for(lambda: listener_pids(url) and listener_pids(url) != before, 10)
        # And it listens again: a later append wakes the stream as before.
        append(run, epoch, 2)
        assert wait_for(lambda: len(got) >= 7, 5), got
        finish(run, epoch)
        reader.join(10)
    assert got == [str(seq) for seq in range(1, 9)]


def test_a_client_that_stops_reading_is_closed_and_resumes_from_its_last_id(server):
    run = make_run()
    epoch = claim(run).lease_epoch
    key = raw_key("client")
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    sock.sendall(
        f"GET /api/v1/runs/{run.id}/events/stream HTTP/1.1\r\nHost: {host}\r\n"
        f"Authorization: Bearer {key}\r\nAccept: text/event-stream\r\n\r\n".encode()
    )
    # Far more than the socket buffers hold, while the client reads nothing.
    for _ in range(10):
        append(run, epoch, 20, text="x" * 20_000)
    time.sleep(STALL + 2)
    sock.settimeout(10)
    received = b""
    while chunk := sock.recv(65536):
        received += chunk  # the server closed: what it had sent, then the end
    sock.close()
    ids = [int(line[4:]) for line in received.decode(errors="replace").split("\n") if line.startswith("id: ")]
    complete = [i for i in ids if f"id: {i}\n".encode() in received and received.count(b"\n\n")]
    assert complete, received[:300]
    total = RunEvent.objects.filter(run_id=run.id).count()
    assert max(ids) < total  # it did not get everything: it was closed
    # The client resumes from the last event it read whole.
    last_whole = _last_whole_event(received)
    finish(run, epoch)
    with server.client(key) as api:
        rest = read_stream(api, f"runs/{run.id}/events/stream", headers={"Last-Event-ID": str(last_whole)})
    assert [int(i) for i, _, _ in rest] == list(range(last_whole + 1, total + 2))


def _last_whole_event(raw: bytes) -> int:
    """The id of the last event a browser's EventSource would have dispatched (its blank line read)."""
    text = raw.decode(errors="replace")
    last = 0
    for block in text.split("\n\n")[:-1]:
        for line in block.split("\n"):
            if line.startswith("id: "):
                last = int(line[4:].strip())
    return last


def test_long_polls_wait_without_holding_a_thread(server):
    """60 long-polls wait on a server with 4 threads; a runner's append still answers at once,
    and the long-poll on its run wakes with it."""
    runs = [make_run() for _ in range(60)]
    key = raw_key("client")
    answers: dict[int, dict] = {}

    def poll(index: int) -> None:
        with server.client(key, timeout=30) as api:
            answers[index] = api.get(f"runs/{runs[index].id}/events", params={"afterSeq": 1, "wait": 6}).json()

    pollers = [threading.Thread(target=poll, args=(index,)) for index in range(60)]
    for poller in pollers:
        poller.start()
    time.sleep(1.5)
    claimed = claim(runs[0])
    with server.client(raw_key("runner")) as api:
        started = time.monotonic()
        body = {"runnerId": "runner-1", "leaseEpoch": claimed.lease_epoch, "type": "usage", "payload": {"n": 1}}
        assert api.post(f"runs/{runs[1].id}/events", json=body).status_code == 409  # not claimed: a quick answer
        assert time.monotonic() - started < 2
    pollers[0].join(5)
    assert answers[0]["items"][0]["payload"]["phase"] == "run-claimed"
    assert len(answers) == 1  # the others still wait
    for poller in pollers:
        poller.join(10)
    assert len(answers) == 60
    assert all(answers[index] == {"items": [], "count": 0, "cursor": "1"} for index in range(1, 60))


def test_a_session_stream_moves_on_to_the_next_run_of_the_session(server):
    first = make_run(session_id="live-session")
    epoch = claim(first).lease_epoch
    append(first, epoch, 2)
    got: list[tuple[str, str]] = []
    with server.client(raw_key("client")) as api:

        def read():
            with api.stream("GET", "sessions/live-session/output/stream") as response:
                for sse in EventSource(response).iter_sse():
                    if sse.data:
                        got.append((sse.id, sse.event))
                        if len(got) == 5:
                            return

        reader = threading.Thread(target=read)
        reader.start()
        assert wait_for(lambda: len(got) == 2, 10), got
        append(first, epoch, 1, kind="tool_call")  # not output: the stream stays quiet
        finish(first, epoch)
        second = make_run(session_id="live-session")
        epoch2 = claim(second).lease_epoch
        append(second, epoch2, 2)
        reader.join(15)
    assert got == [
        (f"{first.id}:3", "assistant_message"),
        (f"{first.id}:4", "assistant_message"),
        (f"{first.id}:6", "terminal_status"),
        (f"{second.id}:3", "assistant_message"),
        (f"{second.id}:4", "assistant_message"),
    ]


def test_a_stream_under_plain_wsgi_is_the_same_stream():
    """Without the event loop (Django's test client), a stream is served in its thread."""
    from tests.helpers import make_key

    run = make_run(tenant=TENANT, project=PROJECT)
    epoch = claim(run).lease_epoch
    append(run, epoch, 3)
    finish(run, epoch)
    response = make_key("client").client.get(f"/api/v1/runs/{run.id}/events/stream", HTTP_LAST_EVENT_ID="2")
    body = b"".join(response.streaming_content).decode()
    assert response["Content-Type"].startswith("text/event-stream")
    assert body.startswith("retry: ")
    head, *events = body.split("\n\n")
    assert head == "retry: 2000\nid: 2"  # where it starts, for a client that drops before an event
    assert [block.split("\n")[0] for block in events if block] == ["id: 3", "id: 4", "id: 5", "id: 6"]


def test_an_end_to_end_turn_where_the_runner_never_polls(server, tmp_path):
    """The reference runner against the server, with a turn of a few seconds: its requests in
    the server's access log are its claim, one control stream, one look at the commands at the
    start and one per command, the turn's ack and finish, its batches and heartbeats, and the
    run's finish. Nothing else: idle or in a turn, it does not poll."""
    from tests.helpers import start_runner

    run = make_run()
    _runner, thread = start_runner(server.url, raw_key("runner"), run.id, tmp_path, idle_seconds=3.0, lease_ms=3000)
    with server.client(raw_key("client")) as api:
        assert wait_for(lambda: api.get(f"runs/{run.id}").json()["status"] == "claimed", 10)
        time.sleep(2.5)  # idle: only heartbeats now
        body = {"type": "turn", "payload": {"prompt": "sleep: 3"}}
        command = api.post(f"runs/{run.id}/commands", json=body).json()
        assert thread.join(30) == [0]
        assert api.get(f"runs/{run.id}").json()["status"] == "completed"
    requests = [(line["method"], line["path"]) for line in server.requests_of(run.id)]
    requests += [(line["method"], line["path"]) for line in server.requests_of(command["id"])]
    counts: dict[str, int] = {}
    for method, path in requests:
        shape = path.split("?")[0].replace(run.id, "{run}").replace(command["id"], "{command}")
        counts[f"{method} {shape}"] = counts.get(f"{method} {shape}", 0) + 1
    heartbeats = counts.pop("POST /api/v1/runs/{run}/heartbeat", 0)
    batches = counts.pop("POST /api/v1/runs/{run}/events", 0)
    counts.pop("GET /api/v1/runs/{run}", None)  # the test's own checks
    assert counts.pop("POST /api/v1/runs/{run}/commands") == 1  # the test's turn
    assert heartbeats >= 5 and batches >= 1, (heartbeats, batches)
    assert counts == {
        "POST /api/v1/runs/{run}/claim": 1,
        "GET /api/v1/runs/{run}/events/stream": 1,
        "GET /api/v1/runs/{run}/commands": 2,  # at the start, and for the turn's command-created
        "POST /api/v1/commands/{command}/ack": 1,
        "POST /api/v1/commands/{command}/finish": 1,
        "POST /api/v1/runs/{run}/finish": 1,
    }


def test_while_the_listener_keeps_failing_streams_poll_and_miss_nothing(server):
    """The listener's connection is killed over and over: waiters look every 0.5 s meanwhile,
    and each event still arrives, once, in order."""
    run = make_run()
    epoch = claim(run).lease_epoch
    url = live_database_url()
    got: list[tuple[str, float]] = []
    stop = threading.Event()

    def kill() -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            while not stop.is_set():
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
                    [LISTENER_NAME],
                )
                time.sleep(0.05)

    with server.client(raw_key("client")) as api:

        def read():
            with api.stream("GET", f"runs/{run.id}/events/stream") as response:
                got.extend((sse.id, time.monotonic()) for sse in EventSource(response).iter_sse() if sse.data)

        reader = threading.Thread(target=read)
        reader.start()
        assert wait_for(lambda: len(got) >= 2, 10)
        killer = threading.Thread(target=kill)
        killer.start()
        try:
            time.sleep(0.5)
            lags = []
            for _ in range(4):
                appended = time.monotonic()
                seq = append(run, epoch, 1)[0].seq
                assert wait_for(lambda seq=seq: any(i == str(seq) for i, _ in got), 5), got
                lags.append(next(at for i, at in got if i == str(seq)) - appended)
                time.sleep(0.3)
        finally:
            stop.set()
            killer.join()
        finish(run, epoch)
        reader.join(10)
    assert [i for i, _ in got] == [str(seq) for seq in range(1, 8)]
    assert max(lags) < 3.0, lags


def test_head_of_a_stream_answers_at_once(server):
    run = make_run()
    with server.client(raw_key("client")) as api:
        started = time.monotonic()
        response = api.head(f"runs/{run.id}/events/stream")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert time.monotonic() - started < 2
        assert api.get(f"runs/{run.id}").status_code == 200  # the connection goes on


def test_a_session_stream_starts_with_its_cursor_so_a_drop_before_any_event_resumes_there(server):
    run = make_run(session_id="live-head")
    with server.client(raw_key("client")) as api, api.stream("GET", "sessions/live-head/output/stream") as response:
        head = next(response.iter_bytes())
    assert head.decode().startswith(f"retry: 2000\nid: {run.id}:0\n\n")


def test_every_log_line_is_json_and_access_lines_carry_the_request_id_tenant_and_run(server):
    """The access line of a request carries the X-Request-ID it was sent (echoed in the answer),
    its key's tenant and the run its path names; a request without one gets one minted, and a
    junk one is replaced, never echoed."""
    run = make_run()
    with server.client(raw_key("client")) as api:
        answer = api.get(f"runs/{run.id}", headers={"X-Request-ID": "trace-4b1d.7"})
        assert answer.status_code == 200 and answer.headers["X-Request-ID"] == "trace-4b1d.7"
        minted = api.get(f"runs/{run.id}/events").headers["X-Request-ID"]
        junk = api.get(f"runs/{run.id}", headers={"X-Request-ID": "x" * 500}).headers["X-Request-ID"]
    assert len(minted) == 32 and int(minted, 16) >= 0
    assert len(junk) == 32 and junk != "x" * 500

    def line_of(request_id):
        return next((line for line in server.requests_of(run.id) if line.get("request_id") == request_id), None)

    assert wait_for(lambda: line_of("trace-4b1d.7") and line_of(minted), 5)
    line = line_of("trace-4b1d.7")
    assert (line["tenant_id"], line["run_id"], line["method"], line["status"]) == (TENANT, run.id, "GET", 200)
    assert line["level"] == "info" and line["timestamp"].endswith("Z")
    assert line_of(minted)["run_id"] == run.id
    text = server.log.read_text(errors="replace")
    assert all(row.startswith("{") for row in text.splitlines() if row.strip()), "a log line that is not JSON"
    assert "color_message" not in text  # uvicorn's coloured copy of its message is dropped
