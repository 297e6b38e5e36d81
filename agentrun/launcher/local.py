"""The local launcher: the reference runner as a subprocess per run, in its own session, its
output in `var/runners/<run>.log`. What `make run` uses."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from django.conf import settings

from agentrun.launcher import Launched, Launcher, LaunchSpec


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class LocalLauncher(Launcher):
    name = "local"

    def __init__(self, *, log_dir: Path | None = None, extra_args: list[str] | None = None):
        self.log_dir = log_dir or Path(settings.VAR_DIR) / "runners"
        self.extra_args = extra_args if extra_args is not None else os.environ.get("AGENTRUN_RUNNER_ARGS", "").split()
        self.children: dict[int, subprocess.Popen] = {}

    def launch(self, spec: LaunchSpec) -> Launched:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{spec.run_id}.log", "ab")  # noqa: SIM115 - the child owns it
        workdir = Path(settings.VAR_DIR) / "workspaces" / (spec.session_id or spec.run_id)
        workdir.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, *spec.runner_args(str(workdir)), *self.extra_args]
        env = {
            **os.environ,
            "AGENTRUN_RUNNER_KEY": spec.runner_key,
            "PYTHONPATH": os.pathsep.join([str(settings.BASE_DIR), os.environ.get("PYTHONPATH", "")]).rstrip(
                os.pathsep
            ),
        }
        env.pop("DATABASE_URL", None)  # a runner talks HTTP only
        try:
            child = subprocess.Popen(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=settings.BASE_DIR,
            )
        finally:
            log.close()
        self.children[child.pid] = child
        return Launched(
            namespace="local",
            job_name=f"pid-{child.pid}",
            image=sys.executable,
            details={"pid": child.pid, "log": str(self.log_dir / f"{spec.run_id}.log")},
        )

    def alive(self, job: dict) -> bool:
        pid = (job.get("details") or {}).get("pid")
        if not pid:
            return False
        self.poll()
        child = self.children.get(pid)
        if child is not None:
            return child.poll() is None
        # Started by another worker process (or before a restart): trust /proc, not a reused pid.
        return job.get("runId", "") in _cmdline(pid)

    def stop(self, job: dict) -> None:
        pid = (job.get("details") or {}).get("pid")
        if pid and self.alive(job):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)

    def poll(self) -> None:
        for pid, child in list(self.children.items()):
            if child.poll() is not None:
                del self.children[pid]

    def close(self) -> None:
        for pid, child in list(self.children.items()):
            if child.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGTERM)
        for child in list(self.children.values()):
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
        self.children.clear()
