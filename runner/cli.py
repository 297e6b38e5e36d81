"""`python -m runner.cli`: the agentrun client on the command line.

  python -m runner.cli run --backend echo --session hello "write a haiku" --follow
  python -m runner.cli run --repo https://github.com/o/r --ref main --commit "fix the typo" --follow
  python -m runner.cli diff RUN
  python -m runner.cli turn RUN "and another" --follow
  python -m runner.cli events RUN --follow
  python -m runner.cli cancel RUN
  python -m runner.cli sessions --reader ana
  python -m runner.cli tasks --queue fixes
  python -m runner.cli task --queue fixes "fix issue 42"

The manager is `--url` (or $AGENTRUN_URL, default http://127.0.0.1:8000); the key is `--key`
(or $AGENTRUN_KEY). Output is for people in a terminal (colours when it is one); `--json`
prints JSON instead: one object per line when following events.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TextIO

from runner.client import AgentRunClient, ApiError
from runner.records import Event, JsonObject

COLOURS = {"dim": "2", "bold": "1", "red": "31", "green": "32", "yellow": "33", "blue": "34", "cyan": "36"}


class Out:
    def __init__(self, as_json: bool, stream: TextIO | None = None):
        self.as_json, self.stream = as_json, stream or sys.stdout  # sys.stdout as it is now, not at import
        self.colour = self.stream.isatty() and not os.environ.get("NO_COLOR")

    def paint(self, text: str, style: str) -> str:
        return f"\033[{COLOURS[style]}m{text}\033[0m" if self.colour else text

    def line(self, text: str = "") -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def record(self, record: object) -> None:
        self.line(json.dumps(record, ensure_ascii=False))

    def event(self, event: Event) -> None:
        if self.as_json:
            self.record(event)
            return
        kind, payload = event["type"], event.get("payload") or {}
        seq = self.paint(f"{event['seq']:>4}", "dim")
        if kind == "assistant_message":
            self.line(f"{seq} {self.paint('assistant', 'bold')}: {payload.get('text', '')}")
        elif kind == "reasoning":
            self.line(f"{seq} {self.paint('thinking: ' + str(payload.get('text', '')), 'dim')}")
        elif kind == "command_output":
            status = payload.get("exitCode")
            self.line(
                f"{seq} {self.paint('$ ' + str(payload.get('command')), 'cyan')}"
                + (f" {self.paint(f'(exit {status})', 'dim')}" if status is not None else "")
            )
            for text in str(payload.get("output") or "").rstrip("\n").splitlines():
                self.line(f"     {text}")
        elif kind == "diff":
            if payload.get("scope") == "workspace":
                title = f"workspace diff {short(payload.get('base'))}..{short(payload.get('head'))}"
            else:
                title = "diff " + str(payload.get("path") or "")
            self.line(f"{seq} {self.paint(title, 'blue')}")
            for text in str(payload.get("patch") or "").rstrip("\n").splitlines():
                style = "green" if text.startswith("+") else "red" if text.startswith("-") else "dim"
                self.line(f"     {self.paint(text, style)}")
        elif kind == "tool_call":
            self.line(f"{seq} {self.paint('tool ' + str(payload.get('tool')), 'cyan')} {payload.get('status', '')}")
        elif kind == "error":
            self.line(f"{seq} {self.paint('error', 'red')}: {payload.get('message')}")
        elif kind == "terminal_status":
            status = payload.get("terminalStatus")
            style = "green" if status == "completed" else "red"
            detail = f" ({payload['failureKind']}: {payload.get('message')})" if payload.get("failureKind") else ""
            self.line(f"{seq} {self.paint('== ' + str(status), style)}{detail}")
        elif kind == "usage":
            self.line(f"{seq} {self.paint('usage ' + json.dumps(payload), 'dim')}")
        elif kind == "backend_status" and payload.get("phase") == "event-rejected":
            # The runner could not deliver an event and sent this instead: say what was lost.
            size, what = payload.get("bytes"), str(payload.get("eventType"))
            if isinstance(size, int) and not isinstance(size, bool):
                what += f" of {size_text(size)}"
            self.line(f"{seq} " + self.paint(f"event rejected: {what} ({payload.get('errorKind')})", "yellow"))
            if payload.get("message"):
                self.line("     " + self.paint(f"HTTP {payload.get('status')}: {payload['message']}", "dim"))
        elif kind == "backend_status" and payload.get("phase") == "workspace-ready":
            ref = payload.get("ref") or "default branch"
            where = f" ({payload['path']})" if payload.get("path") else ""
            fresh = "checked out" if payload.get("fresh") else "fetched, kept"
            self.line(
                f"{seq} "
                + self.paint(f"workspace {payload.get('url')} @ {ref}: {short(payload.get('commit'))}{where}", "cyan")
                + " "
                + self.paint(f"({fresh})", "dim")
            )
        elif kind == "backend_status" and payload.get("phase") == "workspace-summary":
            self.line(f"{seq} {self.paint(summary_text(payload), 'cyan')}")
            for key in ("commitError", "pushError"):
                if payload.get(key):
                    self.line("     " + self.paint(str(payload[key]), "yellow"))
        elif kind == "backend_status" and payload.get("phase") == "workspace-report-failed":
            self.line(f"{seq} " + self.paint(f"workspace report failed: {payload.get('message')}", "yellow"))
        else:
            self.line(f"{seq} {self.paint(str(payload.get('phase') or kind), 'dim')}")
        for note in notes(payload):
            self.line(f"     {self.paint(note, 'yellow')}")


def short(sha: object) -> str:
    return str(sha)[:12] if sha else "?"


def summary_text(payload: JsonObject) -> str:
    """`2 files changed, +3 -1, head 0123456789ab[, committed 0123456789ab][, pushed]`."""
    count = payload.get("filesChanged")
    text = f"{count} file{'' if count == 1 else 's'} changed, +{payload.get('insertions')} -{payload.get('deletions')}"
    text += f", head {short(payload.get('head'))}"
    if payload.get("committed"):
        text += f", committed {short(payload['committed'])}"
    if payload.get("pushed"):
        text += ", pushed"
    return text


def workspace_patch(client: AgentRunClient, run_id: str) -> Event | None:
    """The run's last `diff` event of scope workspace (None when it has none)."""
    latest, after_seq = None, 0
    while True:
        page = client.events(run_id, after_seq=after_seq)
        for event in page["items"]:
            if event["type"] == "diff" and (event.get("payload") or {}).get("scope") == "workspace":
                latest = event
        if not page["items"]:
            return latest
        after_seq = int(page["cursor"])


def size_text(size: int) -> str:
    """A byte count for people: 1.5 MB, 262.1 kB, 900 bytes (decimal units, as `ls -h --si`)."""
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


def notes(payload: JsonObject) -> list[str]:
    """What was done to an event's payload on its way, said plainly: shortened by the runner to
    the API's size limit, text the database cannot store replaced, secrets redacted."""
    said = []
    cut = payload.get("truncatedBytes")
    if isinstance(cut, int) and not isinstance(cut, bool) and cut > 0:
        said.append(f"(output truncated: {cut:,} bytes cut)")
    for key, what in (
        ("sanitizedPaths", "characters the database cannot store replaced with U+FFFD"),
        ("redactedPaths", "secrets redacted"),
    ):
        paths = payload.get(key)
        if isinstance(paths, list) and paths:
            said.append(f"({what} in {', '.join(str(path) for path in paths)})")
    return said


def follow(
    client: AgentRunClient,
    out: Out,
    run_id: str,
    after_seq: int = 0,
    command_id: str | None = None,
    *,
    from_start: bool = False,
) -> int:
    """Print the run's events as they come, until the run ends (or, given `command_id`, until
    that command ends: printing starts at its creation, or at once `from_start`). Exit status 0
    when it completed."""
    printing = command_id is None or from_start
    stream = client.stream_events(run_id, after_seq=after_seq)  # SSE, resumed by itself after a drop
    for event in stream:
        payload = event.get("payload") or {}
        mine = command_id is not None and payload.get("commandId") == command_id
        printing = printing or (mine and payload.get("phase") == "command-created")
        if printing:
            out.event(event)
        if mine and payload.get("phase") == "command-terminal":
            if payload.get("terminalStatus") != "completed" and payload.get("message") == "run finished":
                continue  # the run ended before the turn (a checkout that failed): its end says why
            stream.close()
            return 0 if payload.get("terminalStatus") == "completed" else 1
        if event["type"] == "terminal_status":
            return 0 if payload.get("terminalStatus") == "completed" else 1
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runner.cli", description="The agentrun client.")
    parser.add_argument("--url", default=os.environ.get("AGENTRUN_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--key", default=os.environ.get("AGENTRUN_KEY"))
    parser.add_argument("--json", action="store_true", help="JSON output")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="create a run and send it a turn")
    run.add_argument("prompt")
    run.add_argument("--backend", default="echo")
    run.add_argument("--session", help="the session (created if new)")
    run.add_argument("--follow", action="store_true", help="print the events until the run ends")
    run.add_argument("--repo", metavar="URL", help="check this git repository out for the agent to work in")
    run.add_argument("--ref", help="the branch, tag or commit to check out (default: the remote's HEAD)")
    run.add_argument("--path", help="the agent works in this directory of the repository")
    run.add_argument("--depth", type=int, help="commits of history to fetch (default 1; 0: all)")
    run.add_argument(
        "--credentials-ref", metavar="NAME", help="the environment variable (of the runner) holding a git token"
    )
    run.add_argument("--commit", action="store_true", help="commit each turn's changes on the run's branch")
    run.add_argument("--push", action="store_true", help="push the run's branch after each turn")

    turn = commands.add_parser("turn", help="send a turn to a run")
    turn.add_argument("run")
    turn.add_argument("prompt")
    turn.add_argument("--follow", action="store_true")

    events = commands.add_parser("events", help="print a run's events")
    events.add_argument("run")
    events.add_argument("--after", type=int, default=0)
    events.add_argument("--follow", action="store_true", help="keep printing until the run ends")

    diff = commands.add_parser("diff", help="print a run's latest workspace patch")
    diff.add_argument("run")

    cancel = commands.add_parser("cancel", help="cancel a run")
    cancel.add_argument("run")
    cancel.add_argument("--reason")

    sessions = commands.add_parser("sessions", help="list sessions (the inbox)")
    sessions.add_argument("--state", default="default")
    sessions.add_argument("--reader")
    sessions.add_argument("--limit", type=int, default=50)

    tasks = commands.add_parser("tasks", help="list queue tasks")
    tasks.add_argument("--queue")
    tasks.add_argument("--state")
    tasks.add_argument("--limit", type=int, default=50)

    task = commands.add_parser("task", help="put a task in a queue")
    task.add_argument("prompt")
    task.add_argument("--queue", required=True)
    task.add_argument("--backend", default="echo")
    task.add_argument("--priority", type=int, default=0)
    task.add_argument("--session")
    task.add_argument("--max-attempts", type=int)

    args = parser.parse_args(argv)
    if args.command == "run" and not args.repo:
        given = [
            f"--{name.replace('_', '-')}" for name in WORKSPACE_OPTIONS if getattr(args, name) not in (None, False)
        ]
        if given:
            parser.error(f"{', '.join(given)} need --repo")
    if args.command == "run" and args.push and not args.commit:
        parser.error("--push needs --commit (it pushes the turns' commits)")
    if not args.key:
        parser.error("set AGENTRUN_KEY (or pass --key) to a client key")
    out = Out(args.json)
    with AgentRunClient(args.url, args.key) as client:
        try:
            return _dispatch(client, out, args)
        except ApiError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return 130


WORKSPACE_OPTIONS = ("ref", "path", "depth", "credentials_ref", "commit", "push")


def workspace_ref(args: argparse.Namespace) -> JsonObject | None:
    """The run's `workspaceRef` from `run --repo URL` and its options (None without --repo)."""
    if not args.repo:
        return None
    ref: JsonObject = {"kind": "git", "url": args.repo}
    for name, key in zip(WORKSPACE_OPTIONS, ("ref", "path", "depth", "credentialsRef", "commit", "push"), strict=True):
        value = getattr(args, name)
        if value is not None and value is not False:
            ref[key] = value
    return ref


def _dispatch(client: AgentRunClient, out: Out, args: argparse.Namespace) -> int:
    if args.command == "run":
        fields: JsonObject = {"workspaceRef": workspace} if (workspace := workspace_ref(args)) else {}
        run = client.create_run(backend_profile=args.backend, session_id=args.session, **fields)
        command = client.send_turn(run["id"], args.prompt)
        if args.json and not args.follow:
            out.record({"run": run, "command": command})
        elif not args.json:
            out.line(f"run {out.paint(run['id'], 'bold')}, turn {command['id']}")
        # A new run: its first events (the workspace prepared) may come before the turn's.
        return follow(client, out, run["id"], command_id=command["id"], from_start=True) if args.follow else 0
    if args.command == "turn":
        command = client.send_turn(args.run, args.prompt)
        if not args.follow:
            out.record(command) if args.json else out.line(f"turn {command['id']}")
            return 0
        return follow(client, out, args.run, command_id=command["id"])
    if args.command == "events":
        if args.follow:
            return follow(client, out, args.run, after_seq=args.after)
        page = client.events(args.run, after_seq=args.after)
        if args.json:
            out.record(page)
        else:
            for event in page["items"]:
                out.event(event)
        return 0
    if args.command == "diff":
        latest = workspace_patch(client, args.run)
        if latest is None:
            print(f"run {args.run} has no workspace diff (yet)", file=sys.stderr)
            return 1
        if args.json:
            out.record(latest)
        else:
            out.stream.write(str(latest["payload"].get("patch") or ""))
            out.stream.flush()
            for note in notes(latest["payload"]):
                print(note, file=sys.stderr)
        return 0
    if args.command == "cancel":
        run = client.cancel_run(args.run, args.reason)
        out.record(run) if args.json else out.line(f"run {run['id']}: {run['status']}")
        return 0
    if args.command == "sessions":
        inbox = client.sessions(state=args.state, readerId=args.reader, limit=args.limit)
        if args.json:
            out.record(inbox)
            return 0
        for item in inbox["items"]:
            mark = {"active": out.paint("●", "green"), "unread": out.paint("●", "blue")}.get(
                item["attentionState"], " "
            )
            out.line(f"{mark} {item['sessionId']:<28} {item['executionState']:<9} {item.get('title') or ''}")
        out.line(out.paint(f"{inbox['count']} session(s)", "dim"))
        return 0
    if args.command == "tasks":
        tasks = client.queue_tasks(queue=args.queue, state=args.state, limit=args.limit)
        if args.json:
            out.record(tasks)
            return 0
        for item in tasks["items"]:
            out.line(f"{item['id']:<38} {item['queue']:<12} {item['state']:<10} p{item['priority']:<4} {item['title']}")
        out.line(out.paint(f"{tasks['count']} task(s)", "dim"))
        return 0
    if args.command == "task":
        body = {
            "queue": args.queue,
            "backendProfile": args.backend,
            "priority": args.priority,
            "title": args.prompt[:120],
            "payload": {"prompt": args.prompt},
        }
        if args.session:
            body["sessionRef"] = {"sessionId": args.session}
        if args.max_attempts:
            body["executionPolicy"] = {"maxAttempts": args.max_attempts}
        task = client.create_queue_task(**body)
        out.record(task) if args.json else out.line(f"task {task['id']} in {task['queue']}: {task['state']}")
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
