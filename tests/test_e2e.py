"""End to end, as deployed on one machine: gunicorn on a free loopback port, `manage.py worker`
with the local launcher, the reference runner it starts, and the client CLI, all real processes
on the test database."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
from django.conf import settings
from django.db import connection

from agentrun.auth import api_key_create
from queues.models import QueueAttempt, QueueTask
from runner.client import AgentRunClient
from runs.models import Run, RunnerJob
from tests.helpers import PROJECT, TENANT, free_port, live_database_url, wait_for

pytestmark = pytest.mark.django_db(transaction=True)
ROOT = Path(settings.BASE_DIR)


def pids_matching(text: str) -> list[int]:
    done = subprocess.run(["pgrep", "-f", text], capture_output=True, text=True)
    return [int(pid) for pid in done.stdout.split()]


class Stack:
    def __init__(self, tmp_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.tmp = tmp_path
        self.env = {
            **os.environ,
            "DATABASE_URL": live_database_url(),
            "AGENTRUN_DATABASE_ADAPTER": connection.settings_dict.get("AGENTRUN_ADAPTER", "postgres"),
            "DJANGO_SETTINGS_MODULE": "settings.dev",
            "AGENTRUN_BIND": f"127.0.0.1:{self.port}",
            "AGENTRUN_WEB_WORKERS": "1",
            "AGENTRUN_URL": self.url,
            "AGENTRUN_LAUNCHER": "local",
            "AGENTRUN_VAR_DIR": str(tmp_path / "var"),
            "AGENTRUN_RUNNER_ARGS": "--idle-seconds 0.5 --lease-ms 2000 --grace-seconds 1",
            "AGENTRUN_REAP_GRACE_SECONDS": "1",
            "AGENTRUN_REAP_INTERVAL_SECONDS": "0.5",
            "AGENTRUN_DB_POOL_SIZE": "8",
        }
        self.logs = {}
        self.processes = []

    def start(self, name, argv):
        log = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop()
        self.logs[name] = log
        self.processes.append(subprocess.Popen(argv, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT))

    def __enter__(self):
        self.start("web", [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py")])
        self.start("worker", [sys.executable, str(ROOT / "manage.py"), "worker", "--gc-interval", "0"])

        def healthy():
            try:
                return httpx.get(f"{self.url}/api/v1/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_for(healthy, 60), self.log("web")
        return self

    def log(self, name) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")[-3000:]

    def runner_logs(self) -> str:
        logs = sorted((self.tmp / "var" / "runners").glob("*.log"))
        return "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-2000:]}" for log in logs)

    def __exit__(self, *exc):
        for process in reversed(self.processes):  # the worker first: it stops its runners
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                process.kill()
        for log in self.logs.values():
            log.close()

    def cli(self, key, *args, timeout=60) -> subprocess.CompletedProcess:
        env = {**os.environ, "AGENTRUN_URL": self.url, "AGENTRUN_KEY": key}
        return subprocess.run(
            [sys.executable, "-m", "runner.cli", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


@pytest.fixture
def stack(tmp_path):
    with Stack(tmp_path) as running:
        yield running


@pytest.fixture
def client_key():
    return api_key_create(tenant_id=TENANT, project_id=PROJECT, role="client")[1]


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_a_turn_sent_through_the_cli_is_answered(stack, client_key):
    done = stack.cli(
        client_key, "--json", "run", "--backend", "echo", "--session", "e2e-1", "hello from the e2e test", "--follow"
    )
    assert done.returncode == 0, (done.stderr, stack.log("worker"), stack.runner_logs())
    events = json_lines(done.stdout)
    assert any(e["type"] == "assistant_message" and e["payload"]["text"] == "hello from the e2e test" for e in events)
    run_id = events[0]["runId"]
    follow = stack.cli(client_key, "--json", "events", run_id, "--follow", timeout=30)
    assert follow.returncode == 0, follow.stderr
    everything = json_lines(follow.stdout)
    assert everything[-1]["type"] == "terminal_status"
    assert everything[-1]["payload"]["terminalStatus"] == "completed"
    assert Run.objects.get(pk=run_id).status == "completed"
    human = stack.cli(client_key, "sessions", "--state", "all")
    assert "e2e-1" in human.stdout


def test_cancelling_mid_turn_stops_the_backend_process(stack, client_key):
    marker = f"cancel-me-{uuid.uuid4().hex}"
    done = stack.cli(client_key, "--json", "run", "--backend", "echo", f"{marker}\nsleep: 120")
    assert done.returncode == 0, done.stderr
    run_id = json_lines(done.stdout)[0]["run"]["id"]
    assert wait_for(lambda: pids_matching(marker), 30), (stack.log("worker"), stack.runner_logs())
    cancelled = stack.cli(client_key, "cancel", run_id, "--reason", "changed my mind")
    assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout
    assert wait_for(lambda: not pids_matching(marker), 15), "the echo agent outlived the cancel"
    assert Run.objects.get(pk=run_id).status == "cancelled"
    job = RunnerJob.objects.get(run_id=run_id)
    assert wait_for(
        lambda: (
            not Path(f"/proc/{job.result['pid']}").exists()
            or b"zombie" in Path(f"/proc/{job.result['pid']}/status").read_bytes().lower()
        ),
        15,
    )


def test_a_killed_runner_is_reaped_and_the_task_retried_by_a_second_run(stack, client_key, tmp_path):
    flag = tmp_path / "second-attempt-may-pass"
    marker = f"retry-me-{uuid.uuid4().hex}"
    with AgentRunClient(stack.url, client_key) as client:
        task = client.create_queue_task(
            queue="e2e",
            backendProfile="echo",
            title="retry me",
            payload={"prompt": f"{marker}\nrun: test -f {flag} || sleep 120"},
            executionPolicy={"maxAttempts": 2, "backoffSeconds": 0},
        )
    assert wait_for(lambda: pids_matching(marker), 30), (stack.log("worker"), stack.runner_logs())
    first_run = QueueTask.objects.get(pk=task["id"]).latest_attempt["runId"]
    job = RunnerJob.objects.get(run_id=first_run)
    wait_for(lambda: Run.objects.get(pk=first_run).status == "claimed", 10)
    os.kill(job.result["pid"], signal.SIGKILL)  # the runner dies without a word
    for pid in pids_matching(marker):
        os.killpg(pid, signal.SIGKILL)  # and its agent with it, as in a pod
    flag.write_text("go")
    assert wait_for(lambda: Run.objects.get(pk=first_run).status == "failed", 30), stack.log("worker")
    assert Run.objects.get(pk=first_run).failure_kind == "runner-lost"
    assert wait_for(lambda: QueueTask.objects.get(pk=task["id"]).state == "completed", 60), (
        stack.log("worker"),
        stack.runner_logs(),
    )
    attempts = list(QueueAttempt.objects.filter(task_id=task["id"]).order_by("number"))
    assert [(a.number, a.state, a.failure_kind) for a in attempts] == [
        (1, "failed", "runner-lost"),
        (2, "completed", None),
    ]
    assert Run.objects.get(pk=attempts[1].run_id).status == "completed"
