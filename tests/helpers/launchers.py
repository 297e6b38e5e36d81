"""Launchers that start nothing: they record what the worker asks of them."""

from __future__ import annotations

from agentrun.launcher import Launched, Launcher


class RecordingLauncher(Launcher):
    """Records every LaunchSpec and reports its runners `alive` (or dead: what a crash-looping
    image looks like)."""

    name = "test"

    def __init__(self, *, alive: bool):
        self.specs: list = []
        self.runners_alive = alive

    def launch(self, spec):
        self.specs.append(spec)
        return Launched(namespace="test", job_name=f"job-{spec.attempt}", image="none", details={})

    def alive(self, job):
        return self.runners_alive
