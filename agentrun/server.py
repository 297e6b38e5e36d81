"""The gunicorn worker (gunicorn.conf.py): uvicorn's, on uvloop and httptools, serving
`agentrun.asgi`. gunicorn keeps what it is good at (the master, its signals, restarting workers);
uvicorn serves every connection of a worker from one event loop, so a waiting request costs a few
kilobytes, not a thread.

Open files: every open connection is a file descriptor. The worker raises its soft limit to the
hard one (deploy/README.md says how to raise that).
"""

from __future__ import annotations

import logging
import os
import resource
import sys
from typing import Any

from uvicorn_worker import UvicornWorker

from agentrun.live import closed_on_purpose


class _ExpectedIncomplete(logging.Filter):
    """A stream agentrun closed on purpose (a client that stopped reading) is not an error."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (closed_on_purpose.get() and "without completing response" in record.getMessage())


def raise_open_files_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


class Worker(UvicornWorker):
    CONFIG_KWARGS = {
        "loop": "uvloop",
        "http": "httptools",
        "lifespan": "on",
        # Connections are not capped: waiting ones cost next to nothing (`limit_concurrency` None).
        "limit_concurrency": None,
        # On shutdown, open streams are cut after this long; their clients resume from their last id.
        "timeout_graceful_shutdown": float(os.environ.get("AGENTRUN_SHUTDOWN_GRACE_SECONDS", "3")),
        # Request lines and headers up to 8 KiB reach the API (long query strings), as before.
        "h11_max_incomplete_event_size": 64 * 1024,
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        logging.getLogger("uvicorn.error").addFilter(_ExpectedIncomplete())
        # The access log (AGENTRUN_ACCESS_LOG): uvicorn's lines, in agentrun.logs' format with the
        # request's fields (gunicorn.conf.py's logconfig_dict).
        self.config.access_log = bool(self.cfg.accesslog)

    def init_process(self) -> None:
        raise_open_files_limit()
        # The loop hands every request to a web thread and takes its answer back: when a busy
        # thread holds the GIL, the loop waits for it up to this long (5 ms by default).
        sys.setswitchinterval(float(os.environ.get("AGENTRUN_SWITCH_INTERVAL_SECONDS", "0.001")))
        super().init_process()
