"""What the soak runs on: a scratch database on a PostgreSQL server it picks, gunicorn and the
worker as processes of its own, and the faults it injects into them on a schedule."""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from soak_load import Recorder

ROOT = Path(__file__).resolve().parent.parent
# What gunicorn, the worker and the runners import: copied at the start, so that a worker that
# gunicorn respawns, a restarted worker or a new runner run the code the soak began with, even
# while someone edits the working tree.
CODE = ["manage.py", "gunicorn.conf.py", "agentrun", "runs", "sessions", "queues", "settings", "runner"]
MACHINE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
PG_RESTART_SETTLE_SECONDS = 15.0  # after the server is back, pools reconnect: 503s are still expected


@dataclass
class Server:
    """The PostgreSQL server the scratch database lives on, and whether the soak may restart it."""

    url: str  # libpq URL of the server (any database)
    source: str  # what it is, for the output
    restart: list[str] | None  # the command that restarts it, when the soak may
    why_not: str = ""  # why it may not
    stop: list[str] | None = None  # the command that stops it at the end (a server of the soak's own)


def with_dbname(url: str, dbname: str) -> str:
    params = conninfo_to_dict(url)
    params["dbname"] = dbname
    return make_conninfo(**params)


def _is_machine_server(url: str) -> bool:
    params = conninfo_to_dict(url)
    return params.get("host") in ("127.0.0.1", "localhost") and str(params.get("port") or 5432) == "5432"


def _machine_restart() -> list[str] | None:
    versions = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
    if len(versions) != 1:
        return None
    return ["pg_ctlcluster", "--skip-systemctl-redirect", versions[0], "main", "restart"]


def _reachable(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=2):
            return True
    except psycopg.Error:
        return False


def pick_server(var_dir: Path, choice: str = "auto") -> Server:
    """DATABASE_URL's server, else the machine's at 127.0.0.1:5432 if it is up, else an embedded
    one of the soak's own under `var_dir` (never the project's var/). `choice` "embedded" skips
    straight to the last (a server whose restarts disturb nobody)."""
    url = (os.environ.get("DATABASE_URL") or "").strip()
    if choice == "embedded":
        return _embedded(var_dir)
    if url:
        if _is_machine_server(url) and _machine_restart():
            return Server(url, "DATABASE_URL (the machine's PostgreSQL)", _machine_restart())
        return Server(url, "DATABASE_URL", None, "DATABASE_URL names a server the soak does not manage")
    if _reachable(MACHINE_URL):
        restart = _machine_restart()
        return Server(
            MACHINE_URL,
            "the machine's PostgreSQL at 127.0.0.1:5432",
            restart,
            "" if restart else "no single cluster under /etc/postgresql",
        )
    return _embedded(var_dir)


def _embedded(var_dir: Path) -> Server:
    sys.path.insert(0, str(ROOT))
    from agentrun.database import start_embedded

    embedded = start_embedded(var_dir)
    import pgserver
    from pgserver._commands import POSTGRES_BIN_PATH

    server = pgserver.get_server(var_dir / "pgdata", cleanup_mode="stop")
    # -l: the server's output to its log, not to our pipes (a pipe it holds would hang the call).
    ctl = [
        str(POSTGRES_BIN_PATH / "pg_ctl"),
        "-D",
        str(var_dir / "pgdata"),
        "-w",
        "-m",
        "fast",
        "-l",
        str(var_dir / "pgdata" / "log"),
    ]
    if server.system_user:
        ctl = ["runuser", "-u", server.system_user, "--", *ctl]
    return Server(
        embedded,
        f"an embedded PostgreSQL of the soak's own ({var_dir / 'pgdata'})",
        [*ctl, "restart"],
        stop=[*ctl, "stop"],
    )


def create_database(server: Server, name: str) -> str:
    with psycopg.connect(with_dbname(server.url, "postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return with_dbname(server.url, name)


def drop_database(server: Server, name: str) -> None:
    for _ in range(30):  # the server may be coming back from a restart
        try:
            with psycopg.connect(with_dbname(server.url, "postgres"), autocommit=True, connect_timeout=5) as conn:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            return
        except psycopg.OperationalError:
            time.sleep(1)
    raise RuntimeError(f"could not drop database {name}")


def snapshot_code(into: Path) -> str:
    """Copy the project's code to `into`; what it is (the commit, and whether edits were copied)."""
    for name in CODE:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, into / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, into / name)
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", *CODE], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"{ROOT} (not a git checkout)"
    return f"{ROOT} at {commit}{' with uncommitted changes' if dirty else ''}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def become_subreaper() -> None:
    """Runners orphaned by a killed worker (and agents by a killed runner) come to us, so we can
    reap them; otherwise they would stay zombies under an init that reaps nothing."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) from /proc/<pid>/stat."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[1])


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


class Stack:
    """gunicorn and the worker on the scratch database, as processes of ours, logs in `tmp`."""

    def __init__(self, db_url: str, tmp: Path, code: Path, *, lease_ms: int, reap_grace: float):
        self.code = code
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.tmp = tmp
        self.lease_ms, self.reap_grace = lease_ms, reap_grace
        self.env = {
            **os.environ,
            "DATABASE_URL": db_url,
            "DJANGO_SETTINGS_MODULE": "settings.prod",
            "DJANGO_SECRET_KEY": "soak-only-secret",
            "AGENTRUN_BIND": f"127.0.0.1:{self.port}",
            "AGENTRUN_WEB_WORKERS": "2",
            "AGENTRUN_WEB_THREADS": "32",
            "AGENTRUN_DB_POOL_SIZE": "8",
            "AGENTRUN_URL": self.url,
            "AGENTRUN_LAUNCHER": "local",
            "AGENTRUN_VAR_DIR": str(tmp / "var"),
            "AGENTRUN_RUNNER_ARGS": f"--idle-seconds 0.5 --lease-ms {lease_ms} --grace-seconds 1",
            "AGENTRUN_REAP_GRACE_SECONDS": str(reap_grace),
            "AGENTRUN_REAP_INTERVAL_SECONDS": "1",
            "AGENTRUN_LOG_LEVEL": "WARNING",
        }
        self.web: subprocess.Popen | None = None
        self.worker: subprocess.Popen | None = None
        self.worker_starts = 0

    def _start(self, name: str, argv: list[str]) -> subprocess.Popen:
        with open(self.tmp / f"{name}.log", "ab") as log:
            return subprocess.Popen(argv, cwd=self.code, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def manage(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=self.code,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if done.returncode != 0:
            raise RuntimeError(f"manage.py {' '.join(args)} failed:\n{done.stderr[-3000:]}")
        return done.stdout.strip()

    def start(self) -> None:
        self.web = self._start("web", [sys.executable, "-m", "gunicorn", "-c", str(self.code / "gunicorn.conf.py")])
        self.start_worker()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/api/v1/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.web.poll() is not None:
                break
            time.sleep(0.3)
        raise RuntimeError(f"gunicorn did not come up:\n{self.log_tail('web')}")

    def start_worker(self) -> None:
        self.worker_starts += 1
        self.worker = self._start("worker", [sys.executable, "manage.py", "worker", "--gc-interval", "0"])

    def log_tail(self, name: str, size: int = 3000) -> str:
        try:
            return (self.tmp / f"{name}.log").read_text(errors="replace")[-size:]
        except OSError:
            return ""

    def web_workers(self) -> list[int]:
        if self.web is None:
            return []
        return [pid for pid in _pids() if (_proc_stat(pid) or ("", 0))[1] == self.web.pid]

    def runner_pids(self) -> dict[str, int]:
        """run id -> pid of the reference runners started for this stack (`python -m runner`
        with our manager URL), wherever they were reparented."""
        found = {}
        for pid in _pids():
            argv = _cmdline(pid)
            if (
                "runner" in argv
                and "-m" in argv
                and "--manager" in argv
                and "--run" in argv
                and argv[argv.index("--manager") + 1] == self.url
            ):
                found[argv[argv.index("--run") + 1]] = pid
        return found

    def reap_orphans(self) -> None:
        """Collect zombies that came to us as subreaper (not our own Popen children)."""
        own = {process.pid for process in (self.web, self.worker) if process is not None}
        me = os.getpid()
        for pid in _pids():
            stat = _proc_stat(pid)
            if stat and stat[1] == me and stat[0] == "Z" and pid not in own:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)

    def stop(self) -> None:
        """The worker first (it stops its runners), then gunicorn; then any runner left over."""
        for process in (self.worker, self.web):
            if process is None or process.poll() is not None:
                continue
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        leftovers = self.runner_pids()
        for pid in leftovers.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while self.runner_pids() and time.monotonic() < deadline:
            self.reap_orphans()
            time.sleep(0.2)
        for pid in self.runner_pids().values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        self.reap_orphans()


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for other in _pids():
        stat = _proc_stat(other)
        if stat:
            children.setdefault(stat[1], []).append(other)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class Faults:
    """Injects the chosen faults on a schedule (first at `start`, then every `every` seconds,
    jittered) until `until`; records each in the recorder, with the time window it covered."""

    SCHEDULE = {
        "web-kill": (6.0, 12.0),
        "runner-kill": (9.0, 15.0),
        "worker-kill": (14.0, 35.0),
        "pg-restart": (30.0, 150.0),
    }

    def __init__(
        self, stack: Stack, server: Server, db_url: str, recorder: Recorder, kinds: list[str], rng: random.Random
    ):
        self.stack, self.server, self.db_url, self.recorder, self.rng = stack, server, db_url, recorder, rng
        self.kinds = kinds
        self.conn: psycopg.Connection | None = None

    def db(self) -> psycopg.Connection:
        if self.conn is None or self.conn.closed or self.conn.broken:
            self.conn = psycopg.connect(self.db_url, autocommit=True, connect_timeout=3)
        return self.conn

    def query(self, statement: str, params=()) -> list[tuple]:
        try:
            return self.db().execute(statement, params).fetchall()
        except psycopg.Error:
            if self.conn is not None:
                self.conn.close()
            self.conn = None
            return []

    def serve(self, began: float, until: float, stop: threading.Event) -> None:
        due = {kind: began + self.SCHEDULE[kind][0] for kind in self.kinds}
        if "pg-restart" in due:
            due["pg-restart"] = began + min(self.SCHEDULE["pg-restart"][0], max(5.0, (until - began) / 2))
        try:
            while not stop.is_set() and time.monotonic() < until:
                self.stack.reap_orphans()
                self._keep_worker()
                now = time.monotonic()
                for kind, at in sorted(due.items(), key=lambda item: item[1]):
                    if at <= now < until:
                        done = getattr(self, kind.replace("-", "_"))()
                        every = self.SCHEDULE[kind][1]
                        due[kind] = time.monotonic() + (every * (0.75 + self.rng.random() / 2) if done else 2.0)
                stop.wait(0.2)
        finally:
            if self.conn is not None:
                self.conn.close()

    def _keep_worker(self) -> None:
        """A worker that died by itself is a finding, and is started again so the soak goes on."""
        worker = self.stack.worker
        if worker is not None and worker.poll() is not None:
            self.recorder.fault("worker-died-by-itself", f"exit {worker.returncode}; restarted")
            self.stack.start_worker()

    # --- the faults -------------------------------------------------------------------------

    def web_kill(self) -> bool:
        workers = self.stack.web_workers()
        if not workers:
            return False
        os.kill(self.rng.choice(workers), signal.SIGKILL)
        started = time.monotonic()
        self.recorder.fault("web-kill")
        with self.recorder.lock:
            self.recorder.windows.append(("web-kill", started, started + 5.0))
        return True

    def runner_kill(self) -> bool:
        """SIGKILL a worker-started runner whose run has a turn in progress, and its agent's
        process group with it (as when a pod dies)."""
        rows = self.query(
            "SELECT DISTINCT r.id FROM runs_run r JOIN runs_command c ON c.run_id = r.id "
            "WHERE r.status = 'claimed' AND c.type = 'turn' AND c.state = 'acknowledged' "
            "AND r.claimed_by NOT LIKE 'soak-%%'"
        )
        pids = self.stack.runner_pids()
        candidates = [(run_id, pids[run_id]) for (run_id,) in rows if run_id in pids]
        if not candidates:
            return False
        run_id, pid = self.rng.choice(candidates)
        with self.recorder.lock:
            self.recorder.killed_runs.add(run_id)
        for child in _descendants(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child, signal.SIGKILL)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return False
        self.recorder.fault("runner-kill", None)
        return True

    def worker_kill(self) -> bool:
        """SIGKILL the worker between a queue task's claim (the dispatcher made its attempt and
        run) and the run's start (the runner's claim); start it again a second later."""
        ids = []
        api = httpx.Client(
            base_url=f"{self.stack.url}/api/v1", timeout=20, headers={"Authorization": f"Bearer {self.client_key}"}
        )
        try:
            for index in range(2):
                response = api.post(
                    "/queue-tasks",
                    json={
                        "queue": "soak-worker-kill",
                        "backendProfile": "echo",
                        "priority": 10,
                        "payload": {"prompt": f"sleep: 1\nrun: echo worker-kill {index}"},
                        "executionPolicy": {"maxAttempts": 3, "backoffSeconds": 0},
                        "idempotencyKey": f"soak-worker-kill-{time.monotonic_ns()}-{index}",
                    },
                )
                if response.status_code == 201:
                    ids.append(response.json()["id"])
                    self.recorder.acked_record("task", ids[-1])
        except httpx.HTTPError:
            pass
        finally:
            api.close()
        if not ids:
            return False
        deadline = time.monotonic() + 10
        window = None
        while time.monotonic() < deadline and window is None:
            rows = self.query(
                "SELECT r.id, EXISTS (SELECT 1 FROM runs_runnerjob j WHERE j.run_id = r.id) "
                "FROM queues_queueattempt a JOIN runs_run r ON r.id = a.run_id "
                "WHERE a.task_id = ANY(%s) AND r.status = 'pending' LIMIT 1",
                [ids],
            )
            if rows:
                window = "after its runner was launched" if rows[0][1] else "before its runner was launched"
            else:
                time.sleep(0.005)
        worker = self.stack.worker
        worker.kill()
        worker.wait()
        self.recorder.fault("worker-kill", f"task claimed, run pending, {window}" if window else "window missed")
        time.sleep(1.0)
        self.stack.start_worker()
        return True

    client_key = ""  # set by the soak: worker_kill puts queue tasks of its own

    def pg_restart(self) -> bool:
        if not self.server.restart:
            return True
        started = time.monotonic()
        with self.recorder.lock:
            index = len(self.recorder.windows)
            self.recorder.windows.append(("pg-restart", started, started + 120.0))  # narrowed below
        # Its output to a file: a restarted server can inherit a pipe and keep it open forever.
        with tempfile.TemporaryFile("w+") as output:
            try:
                done = subprocess.run(
                    self.server.restart, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, timeout=120
                )
                output.seek(0)
                note = "" if done.returncode == 0 else f"exit {done.returncode}: {output.read()[-300:]}"
            except subprocess.TimeoutExpired:
                note = "restart command timed out"
        ended = time.monotonic()
        with self.recorder.lock:
            self.recorder.windows[index] = ("pg-restart", started, ended + PG_RESTART_SETTLE_SECONDS)
        self.recorder.fault("pg-restart", f"{ended - started:.1f} s {note}".strip())
        if self.conn is not None:
            self.conn.close()
        return True
