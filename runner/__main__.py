"""`python -m runner --manager URL --run ID`: run one agentrun run to its end.

The key comes from `AGENTRUN_RUNNER_KEY` (a runner key, best scoped to the run). Exit codes:
0 the run was finished (or ended elsewhere, e.g. cancelled), 3 the lease was lost to another
runner, 2 bad arguments or no key, 1 anything else.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
from types import FrameType

from runner.client import AgentRunClient, ApiError
from runner.runner import Runner


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runner", description="The agentrun reference runner.")
    parser.add_argument(
        "--manager",
        default=os.environ.get("AGENTRUN_URL", "http://127.0.0.1:8000"),
        help="the manager's URL (default: $AGENTRUN_URL)",
    )
    parser.add_argument("--run", required=True, help="the run to claim")
    parser.add_argument("--runner-id", default=os.environ.get("AGENTRUN_RUNNER_ID"))
    parser.add_argument("--lease-ms", type=int, default=int(os.environ.get("AGENTRUN_LEASE_MS", "60000")))
    parser.add_argument(
        "--workdir",
        default=os.environ.get("AGENTRUN_WORKDIR"),
        help="where the agent works (default: a new temporary directory)",
    )
    parser.add_argument(
        "--idle-seconds",
        type=float,
        default=float(os.environ.get("AGENTRUN_RUNNER_IDLE_SECONDS", "10")),
        help="after the last turn, wait this long for another command before finishing the run",
    )
    parser.add_argument(
        "--grace-seconds", type=float, default=5.0, help="how long a cancelled agent has to stop before it is killed"
    )
    args = parser.parse_args(argv)
    key = os.environ.get("AGENTRUN_RUNNER_KEY")
    if not key:
        parser.error("set AGENTRUN_RUNNER_KEY to a runner key")
    logging.basicConfig(
        level=os.environ.get("AGENTRUN_LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    workdir = args.workdir or tempfile.mkdtemp(prefix=f"agentrun-{args.run}-")
    os.makedirs(workdir, exist_ok=True)
    with AgentRunClient(args.manager, key) as client:
        runner = Runner(
            client,
            args.run,
            runner_id=args.runner_id,
            lease_ms=args.lease_ms,
            workdir=workdir,
            idle_seconds=args.idle_seconds,
            grace_seconds=args.grace_seconds,
        )

        def shut_down(signum: int, frame: FrameType | None) -> None:
            runner.leave()
            client.retries = 1  # the manager may be going away too: do not linger on retries

        signal.signal(signal.SIGTERM, shut_down)
        signal.signal(signal.SIGINT, shut_down)
        try:
            return runner.run()
        except ApiError as error:
            logging.getLogger("agentrun.runner").error("run %s: %s", args.run, error)
            return 1


if __name__ == "__main__":
    sys.exit(main())
