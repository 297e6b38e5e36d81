"""Launchers start a runner for a run: `local` (a subprocess per run), `kubernetes` (a Job per
run) or `none` (runners are started elsewhere). Chosen by `AGENTRUN_LAUNCHER`.

A launcher knows nothing of the database: the worker hands it a `LaunchSpec` and records what
it returns (a `Launched`) as the run's RunnerJob.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

# An environment variable's name, as a bundle's references and a secret's keys name them.
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


def egress_target(entry: str) -> tuple[str, int | None]:
    """A bundle's egress allowlist entry as (CIDR, port or None): a CIDR or an address
    (`10.0.0.0/8`, `203.0.113.7`), with `:port` after an IPv4 one or after a bracketed IPv6 one
    (`[2001:db8::/32]:443`). A ValueError when it is neither."""
    ipv4_port = entry.count(":") == 1
    address, _, port_text = entry.rpartition(":") if ipv4_port or "]:" in entry else (entry, "", "")
    try:
        cidr = str(ipaddress.ip_network(address.strip("[]"), strict=False))
        if port_text and not (port_text.isdigit() and 1 <= int(port_text) <= 65535):
            raise ValueError(f"port {port_text!r}")
    except ValueError as exc:
        raise ValueError(f"egress allowlist entry {entry!r} is not a CIDR with an optional port ({exc})") from None
    return cidr, int(port_text) if port_text else None


@dataclass(frozen=True)
class SecretEnv:
    """An environment variable whose value is one key of a secret: a Kubernetes Secret's key
    (`secretKeyRef`), or locally the file `var/secrets/<secret>/<key>`, else the worker's own
    environment variable `name`. Only the reference travels; the value never leaves the secret
    store but into the runner's environment."""

    name: str
    secret: str
    key: str


@dataclass(frozen=True)
class Bundle:
    """The operator's resource bundle a run starts with (runs.models.ResourceBundle): what the
    runner's environment and sandbox get. Empty fields take the launcher's defaults."""

    name: str
    env: tuple[SecretEnv, ...] = ()
    # Secrets whose every key becomes an environment variable (`envFrom`; locally, the files
    # of `var/secrets/<secret>/`).
    env_from: tuple[str, ...] = ()
    image: str = ""
    cpu: str = ""
    memory: str = ""
    runtime_class_name: str = ""
    node_selector: tuple[tuple[str, str], ...] = ()
    # Where the runner may connect besides the manager and DNS: CIDRs, each with an optional
    # port (`10.0.0.0/8`, `203.0.113.7/32:443`).
    egress_allowlist: tuple[str, ...] = ()


@dataclass(frozen=True)
class LaunchSpec:
    run_id: str
    attempt: int
    runner_id: str
    runner_key: str
    manager_url: str
    backend_profile: str
    tenant_id: str
    project_id: str
    session_id: str | None = None
    # The session's volume, if it has one (kubernetes), and whether the backend needs one.
    pvc_name: str | None = None
    pvc_namespace: str | None = None
    needs_storage: bool = False
    bundle: Bundle | None = None
    # executionPolicy.timeoutSeconds: the runner's sandbox is ended after it plus a grace.
    timeout_seconds: float | None = None

    def runner_args(self, workdir: str) -> list[str]:
        """`python` then these: the reference runner for this run, whichever launcher starts it."""
        args = ["-m", "runner", "--manager", self.manager_url, "--run", self.run_id, "--runner-id", self.runner_id]
        return [*args, "--workdir", workdir]


@dataclass
class Launched:
    namespace: str
    job_name: str
    image: str
    details: dict = field(default_factory=dict)  # pid (local), uid and pvc (kubernetes)


class Launcher:
    name = "none"

    def launch(self, spec: LaunchSpec) -> Launched | None:
        """Start a runner for the run; None when this launcher starts nothing."""
        return None

    def alive(self, job: dict) -> bool:
        """Whether the runner recorded as `job` (namespace, jobName, details) may still be running."""
        return False

    def stop(self, job: dict) -> None:
        """Stop that runner (its run ended or was deleted)."""

    def poll(self) -> None:
        """Housekeeping between passes (the local launcher reaps exited children)."""

    def close(self) -> None:
        """The worker is stopping (the local launcher stops the runners it started)."""


def launcher_from_settings(name: str | None = None) -> Launcher:
    from django.conf import settings

    name = name or settings.AGENTRUN_LAUNCHER
    if name == "local":
        from agentrun.launcher.local import LocalLauncher

        return LocalLauncher()
    if name == "kubernetes":
        from agentrun.launcher.kubernetes import KubernetesLauncher

        return KubernetesLauncher()
    if name == "none":
        return Launcher()
    raise ValueError(f"AGENTRUN_LAUNCHER must be local, kubernetes or none, not {name!r}")
