"""A small deterministic agent for tests and demos, run as `python -m runner.backends.echo_agent`.

It answers with the prompt, and obeys a few words in it, one per line:
  `run: CMD`    runs CMD in a shell and reports its output;
  `edit: PATH`  appends a line to PATH (in the working directory) and reports the diff;
  `sleep: N`    works for N seconds (a turn to cancel), answering steers meanwhile;
  `fail`        ends the turn failed.
It writes JSON lines: {"type": "thread"|"message"|"output"|"diff"|"failed"|"done", ...}.
Steers arrive on stdin as {"type": "steer", "text": ...} lines.
"""

from __future__ import annotations

import argparse
import difflib
import json
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path


def say(record: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def listen_for_steers() -> None:
    for line in sys.stdin:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("type") == "steer":
            say({"type": "message", "text": f"steered: {record.get('text', '')}"})


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("prompt")
    parser.add_argument("--thread")
    args = parser.parse_args()
    say({"type": "thread", "id": args.thread or str(uuid.uuid4())})
    threading.Thread(target=listen_for_steers, daemon=True).start()
    say({"type": "message", "text": args.prompt})
    for line in args.prompt.splitlines():
        word, _, rest = line.partition(":")
        word, rest = word.strip().lower(), rest.strip()
        if word == "run" and rest:
            # Command output is whatever the command printed: invalid UTF-8 is replaced, not fatal.
            done = subprocess.run(  # noqa: S602 - "run <command>" is a shell command line, by design of the echo agent
                rest, shell=True, capture_output=True, encoding="utf-8", errors="replace"
            )
            say({"type": "output", "command": rest, "output": done.stdout + done.stderr, "exitCode": done.returncode})
        elif word == "edit" and rest:
            path = Path(rest)
            before = path.read_text() if path.exists() else ""
            after = before + f"edited by echo at turn {uuid.uuid4().hex[:8]}\n"
            path.write_text(after)
            patch = "".join(
                difflib.unified_diff(before.splitlines(True), after.splitlines(True), f"a/{rest}", f"b/{rest}")
            )
            say({"type": "diff", "path": rest, "patch": patch})
        elif word == "sleep" and rest:
            time.sleep(float(rest))
        elif line.strip().lower() == "fail":
            say({"type": "failed", "message": "the prompt asked to fail"})
            return 1
    say({"type": "done"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
