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

from agentrun.launcher import ENV_NAME, Bundle, Launched, Launcher, LaunchSpec


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def bundle_environment(bundle: Bundle, secrets_dir: Path) -> dict[str, str]:
    """The variables a bundle gives the runner, read from the local secret store: each key of
    an `env_from` secret (a file of `<secrets_dir>/<secret>/`), then each `env` reference (the
    file `<secrets_dir>/<secret>/<key>`, else the worker's own variable of that name). A value's
    one trailing newline is dropped. LookupError naming what is missing (never a value)."""
    values: dict[str, str] = {}
    for secret in bundle.env_from:
        folder = secrets_dir / secret
        if not folder.is_dir():
            raise LookupError(f"resource bundle {bundle.name!r}: secret {secret!r} is not in {secrets_dir}")
        for path in sorted(folder.iterdir()):
            if path.is_file() and ENV_NAME.match(path.name):
                values[path.name] = _secret_text(path)
    for ref in bundle.env:
        path = secrets_dir / ref.secret / ref.key
        if path.is_file():
            values[ref.name] = _secret_text(path)
        elif ref.name in os.environ:
            values[ref.name] = os.environ[ref.name]
        else:
            raise LookupError(
                f"resource bundle {bundle.name!r}: {ref.name} needs {path} (key {ref.key!r} of secret "
                f"{ref.secret!r}) or {ref.name} in the worker's environment"
            )
    return values


def _secret_text(path: Path) -> str:
    text = path.read_text(encoding="utf-8", errors="replace")
    return text[:-1] if text.endswith("\n") else text


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
        if spec.bundle is not None:
            env.update(bundle_environment(spec.bundle, Path(settings.AGENTRUN_SECRETS_DIR)))
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
