"""A run's git workspace (`workspaceRef` of kind `git`): checked out before the first turn,
reported against its base commit after each, committed and pushed when the run asks.

- The runner's workdir is the workspace root and lives on the session's storage, so a session's
  later runs find it. Without `.git`, the ref (else the remote's HEAD) is fetched, `depth` commits
  deep (default 1; 0 is the whole history), and checked out on the branch `agentrun/<session or
  run>`; its commit is the base, kept as `agentrun.base` in the repository's config. Files already
  in the directory are kept: a checkout that would overwrite one fails, and the `.git` it made is
  removed. With `.git` (a later run of the session), the ref is fetched and nothing else changes:
  the working tree, the index and the branch are left as the last run, or anyone since, left them.
- A token (`credentialsRef`: the name of an environment variable holding it) reaches git only
  through the environment, as the `http.<origin>/.extraHeader` of HTTP(S) remotes: never in
  argv, `.git/config`, an event or a log. Whatever git says is redacted before it goes anywhere
  (userinfo stripped from URLs, the token in any of its forms replaced).
- A turn's report diffs the working tree, untracked files included, against the base through a
  copy of the index: the user's own index is untouched (unless the run commits).
- Every git call has a timeout and never prompts (GIT_TERMINAL_PROMPT=0).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO
from urllib.parse import urlsplit

from runner.payloads import cut_marker
from runner.records import JsonObject

logger = logging.getLogger("agentrun.runner")

LOCAL_TIMEOUT_SECONDS = 120.0  # git on the workspace alone
NETWORK_TIMEOUT_SECONDS = 600.0  # fetch and push
MAX_FILES = 1000  # files listed in a summary; the counts cover them all
# Bytes of a patch read from git, its head and tail (the event sink shortens it further): an agent
# that wrote a gigabyte of text costs the runner no more memory than this.
MAX_PATCH_READ = 4 << 20
MESSAGE_LINES = 8  # of git's stderr, in an error
STOP_POLL_SECONDS = 0.2  # how soon a git call notices that it is to stop
AUTHOR = {"NAME": "agentrun", "EMAIL": "agentrun@localhost"}
REDACTED = "[REDACTED]"
# A scheme starts where no scheme character precedes it and is short: the search stays linear
# in a long run of letters (a patch can be megabytes of them).
_USERINFO = re.compile(r"(?<![A-Za-z0-9+.-])([A-Za-z][A-Za-z0-9+.-]{0,31}://)[^/?#\s@]*@")

WorkspaceEvent = tuple[str, JsonObject]  # (event type, payload)


class WorkspaceError(Exception):
    """The workspace could not be prepared or reported; the message is already redacted."""


@dataclass(frozen=True)
class GitWorkspace:
    """What a run's `workspaceRef` asks for (the server validated it at create)."""

    url: str
    ref: str | None = None
    path: str | None = None
    depth: int = 1
    credentials_ref: str | None = None
    commit: bool = False
    push: bool = False

    @classmethod
    def from_ref(cls, value: object) -> GitWorkspace | None:
        """The git workspace `value` describes; None when it is not one (no workspace, another
        kind). Raises WorkspaceError for a git one the runner cannot use."""
        if not isinstance(value, dict) or value.get("kind") != "git":
            return None
        url, ref, path, depth = value.get("url"), value.get("ref"), value.get("path"), value.get("depth", 1)
        credentials_ref = value.get("credentialsRef")
        if not isinstance(url, str) or not url:
            raise WorkspaceError("workspaceRef.url must be a non-empty string")
        if ref is not None and (not isinstance(ref, str) or not ref or ref.startswith("-")):
            raise WorkspaceError("workspaceRef.ref must be a ref name or a commit")
        if path is not None and (not isinstance(path, str) or not _relative(path)):
            raise WorkspaceError("workspaceRef.path must be a relative path inside the repository")
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
            raise WorkspaceError("workspaceRef.depth must be an integer from 0 (the whole history)")
        if credentials_ref is not None and (not isinstance(credentials_ref, str) or not credentials_ref):
            raise WorkspaceError("workspaceRef.credentialsRef must name an environment variable")
        return cls(
            url=url,
            ref=ref,
            path=path or None,
            depth=depth,
            credentials_ref=credentials_ref,
            commit=value.get("commit") is True,
            push=value.get("push") is True,
        )


def _relative(path: str) -> bool:
    parts = PurePosixPath(path).parts
    return bool(parts) and not PurePosixPath(path).is_absolute() and ".." not in parts and "\0" not in path


def branch_name(owner: str) -> str:
    """`agentrun/<owner>` (a session id, else the run id) as a valid branch name: characters git
    refuses, and `/`, become `-`, with a hash of the id when anything was changed, so that two ids
    never share a branch."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", owner).replace("..", "-").strip("-.")[:100]
    if name.endswith(".lock"):
        name = name[: -len(".lock")]
    if name != owner:
        name = f"{name}-{hashlib.sha256(owner.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}".lstrip("-")
    return f"agentrun/{name}"


def strip_userinfo(text: str) -> str:
    """`text` with the `user:password@` of every URL in it removed."""
    return _USERINFO.sub(r"\1", text)


@dataclass
class Git:
    """git in one workspace: argv without secrets, an environment that carries them, a timeout on
    every call, and every message redacted."""

    root: Path
    env: dict[str, str]
    secrets: list[str] = field(default_factory=list)
    stop: threading.Event | None = None

    def redact(self, text: str) -> str:
        text = strip_userinfo(text)
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        return text

    def run(
        self,
        *args: str,
        timeout: float = LOCAL_TIMEOUT_SECONDS,
        env: Mapping[str, str] | None = None,
        check: bool = True,
        stdout: IO[bytes] | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        """`git <args>` in the workspace root. Raises WorkspaceError when it fails (with `check`),
        cannot start, times out or is stopped (`stop`: the run ended or the runner is leaving);
        the message names the subcommand, never the whole argv. A git stopped takes the helpers
        it started (git-remote-https, ssh) with it: it runs in a process group of its own."""
        what = "git " + next(
            arg for index, arg in enumerate(args) if not arg.startswith("-") and args[index - 1 : index] != ("-c",)
        )
        deadline = time.monotonic() + timeout
        try:
            process = subprocess.Popen(  # noqa: S603 - an argument list of our own, never a shell
                ["git", *args],  # noqa: S607 - git as the PATH finds it, like the agent CLIs
                cwd=self.root,
                env={**self.env, **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=stdout if stdout is not None else subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as error:
            raise WorkspaceError(self.redact(f"{what} could not run: {error}")) from None
        while True:
            try:
                output, stderr = process.communicate(timeout=STOP_POLL_SECONDS)
                break
            except subprocess.TimeoutExpired:
                stopped = self.stop is not None and self.stop.is_set()
                if not stopped and time.monotonic() < deadline:
                    continue
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.communicate()
                raise WorkspaceError(
                    f"{what} was stopped: the run ended" if stopped else f"{what} timed out after {timeout:.0f} s"
                ) from None
        done = subprocess.CompletedProcess(process.args, process.returncode, output or b"", stderr)
        if check and done.returncode != 0:
            raise WorkspaceError(self.failure(what, done))
        return done

    def text(self, *args: str, check: bool = True) -> str:
        """`git <args>`'s output as text, without its final newline (a local call)."""
        return self.run(*args, check=check).stdout.decode("utf-8", "replace").rstrip("\n")

    def failure(self, what: str, done: subprocess.CompletedProcess[bytes]) -> str:
        lines = done.stderr.decode("utf-8", "replace").strip().splitlines()[-MESSAGE_LINES:]
        said = "\n".join(lines) or f"exit status {done.returncode}"
        return self.redact(f"{what} failed: {said}")


def git_environment(url: str, token: str | None, environ: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """The environment git runs with, and the secrets to redact from what it says. The token goes
    as an Authorization header scoped to the remote's origin, added after any configuration the
    environment already passes (GIT_CONFIG_COUNT)."""
    env = {**environ, "GIT_TERMINAL_PROMPT": "0"}
    for name in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"):  # the workspace's own, and the report's copy
        env.pop(name, None)
    if not token:
        return env, []
    basic = base64.b64encode(f"x-access-token:{token}".encode()).decode()
    secrets = sorted({token, basic, f"x-access-token:{token}"}, key=len, reverse=True)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return env, secrets  # ssh, git, file: the token has no use there
    origin = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}/"
    try:
        count = int(env.get("GIT_CONFIG_COUNT") or 0)
    except ValueError:
        count = 0
    env[f"GIT_CONFIG_KEY_{count}"] = f"http.{origin}.extraHeader"
    env[f"GIT_CONFIG_VALUE_{count}"] = f"Authorization: Basic {basic}"
    env["GIT_CONFIG_COUNT"] = str(count + 1)
    return env, secrets


@dataclass(frozen=True)
class Ready:
    """A prepared workspace: where the agent works, and the `workspace-ready` event."""

    cwd: Path
    payload: JsonObject


class Workspace:
    def __init__(
        self,
        spec: GitWorkspace,
        root: str | Path,
        *,
        branch: str,
        run_id: str,
        environ: Mapping[str, str] | None = None,
        stop: threading.Event | None = None,
    ):
        environ = os.environ if environ is None else environ
        self.spec, self.root, self.branch, self.run_id = spec, Path(root), branch, run_id
        token = environ.get(spec.credentials_ref) if spec.credentials_ref else None
        if spec.credentials_ref and not token:
            logger.warning("run %s: %s is not set; git goes without credentials", run_id, spec.credentials_ref)
        env, secrets = git_environment(spec.url, token, environ)
        # git never looks above the workspace for a repository: one whose .git is gone must not
        # be taken for an enclosing one (the local launcher's workspaces are inside a checkout).
        env["GIT_CEILING_DIRECTORIES"] = str(self.root.resolve().parent)
        self.git = Git(self.root, env, secrets, stop)

    def redact(self, text: str) -> str:
        return self.git.redact(text)

    # --- before the first turn ----------------------------------------------------------------

    def prepare(self) -> Ready:
        """Check the ref out (a new workspace) or fetch it (a later run's); raises WorkspaceError."""
        self.root.mkdir(parents=True, exist_ok=True)
        fresh = not (self.root / ".git").exists()
        upstream = self._check_out() if fresh else self._refresh()
        git = self.git
        head = git.text("rev-parse", "HEAD")
        base = self.base() or head
        cwd = self.root
        if self.spec.path:
            cwd = (self.root / self.spec.path).resolve()
            if not cwd.is_dir() or not cwd.is_relative_to(self.root.resolve()):
                raise WorkspaceError(f"path {self.spec.path!r} is not a directory of the checkout")
        payload: JsonObject = {
            "phase": "workspace-ready",
            "url": strip_userinfo(self.spec.url),
            "ref": self.spec.ref,
            "commit": head,
            "base": base,
            "upstream": upstream,
            "branch": git.text("symbolic-ref", "--quiet", "--short", "HEAD", check=False) or None,
            "path": self.spec.path,
            "fresh": fresh,
        }
        return Ready(cwd, payload)

    def _check_out(self) -> str:
        git = self.git
        try:
            git.run("init", "--quiet")
            git.run("remote", "add", "origin", self.spec.url)
            upstream = self._fetch()
            # No --force: a file already in the directory that the checkout would overwrite
            # makes it fail, and the file stays.
            git.run("checkout", "--quiet", "-B", self.branch, upstream)
            git.run("config", "agentrun.base", upstream)
            # A volume's own directory (ext4 makes one at its root) is not the agent's work.
            try:
                (self.root / ".git" / "info").mkdir(exist_ok=True)
                with open(self.root / ".git" / "info" / "exclude", "a") as exclude:
                    exclude.write("/lost+found/\n")
            except OSError as error:
                raise WorkspaceError(f"the checkout's exclude file could not be written: {error}") from None
        except WorkspaceError:
            shutil.rmtree(self.root / ".git", ignore_errors=True)  # made here: the directory is as it was
            raise
        return upstream

    def _refresh(self) -> str:
        """A later run's fetch: the remote made current, the rest untouched. The base is kept;
        a repository that has none (not made by agentrun) takes its HEAD."""
        git = self.git
        remote = git.run("remote", "get-url", "origin", check=False)
        if remote.returncode != 0:
            git.run("remote", "add", "origin", self.spec.url)
        elif remote.stdout.decode("utf-8", "replace").strip() != self.spec.url:
            git.run("remote", "set-url", "origin", self.spec.url)
        upstream = self._fetch()
        if not self.base():
            git.run("config", "agentrun.base", git.text("rev-parse", "HEAD"))
        return upstream

    def _fetch(self) -> str:
        """Fetch the ref (else the remote's HEAD) from origin; the commit fetched."""
        depth = ["--depth", str(self.spec.depth)] if self.spec.depth else []
        self.git.run(
            "fetch", "--quiet", "--no-tags", *depth, "origin", self.spec.ref or "HEAD", timeout=NETWORK_TIMEOUT_SECONDS
        )
        return self.git.text("rev-parse", "--verify", "FETCH_HEAD^{commit}")

    def base(self) -> str | None:
        return self.git.text("config", "--get", "agentrun.base", check=False) or None

    # --- after each turn ----------------------------------------------------------------------

    def report(self, *, message: str) -> list[WorkspaceEvent]:
        """The turn's `diff` (scope workspace) and `workspace-summary` events: the working tree
        against the base, committed (and pushed) first when the run asks."""
        git = self.git
        base = self.base()
        if base is None:
            raise WorkspaceError("the workspace has no base commit (agentrun.base)")
        outcome: JsonObject = {}
        if self.spec.commit:
            outcome.update(self._commit(message))
        if self.spec.push:
            outcome.update(self._push())
        head = git.text("rev-parse", "HEAD")
        with self._index() as index:
            options = ("--cached", "--no-color", "--no-ext-diff", "--no-renames", "--no-textconv")
            with tempfile.TemporaryFile() as written:
                git.run("diff", *options, "--src-prefix=a/", "--dst-prefix=b/", base, env=index, stdout=written)
                patch, cut = _head_and_tail(written, MAX_PATCH_READ)
            numstat = git.run("diff", *options, "--numstat", "-z", base, env=index).stdout
        files, insertions, deletions = _numstat(numstat)
        summary: JsonObject = {
            "phase": "workspace-summary",
            "filesChanged": len(files),
            "insertions": insertions,
            "deletions": deletions,
            "head": head,
            "base": base,
            "files": [{**item, "path": self.redact(item["path"])} for item in files[:MAX_FILES]],
        }
        if len(files) > MAX_FILES:
            summary["filesTruncated"] = True
        summary.update(outcome)
        diff: JsonObject = {
            "scope": "workspace",
            "base": base,
            "head": head,
            "patch": self.redact(patch),
        }
        if cut:
            diff["truncatedBytes"] = cut
        return [("diff", diff), ("backend_status", summary)]

    @contextlib.contextmanager
    def _index(self) -> Iterator[dict[str, str]]:
        """A copy of the index with the whole working tree added to it, untracked files included:
        yields the environment that points git at the copy, which is removed afterwards."""
        git_dir = Path(self.git.text("rev-parse", "--absolute-git-dir"))
        copy = git_dir / f"agentrun-index-{uuid.uuid4().hex}"
        try:
            if (git_dir / "index").exists():
                shutil.copyfile(git_dir / "index", copy)
            env = {"GIT_INDEX_FILE": str(copy)}
            self.git.run("add", "--all", env=env)
            yield env
        finally:
            copy.unlink(missing_ok=True)

    def _commit(self, message: str) -> JsonObject:
        """Commit everything in the working tree on the run's branch: `committed` (absent when
        there was nothing to commit), or `commitError` when HEAD is not on that branch."""
        git = self.git
        current = git.text("symbolic-ref", "--quiet", "--short", "HEAD", check=False)
        if current != self.branch:
            return {"commitError": f"HEAD is on {current or 'no branch'}, not {self.branch}: nothing committed"}
        git.run("add", "--all")
        if git.run("diff", "--cached", "--quiet", "HEAD", check=False).returncode == 0:
            return {}
        identity = {
            f"GIT_{role}_{part}": self.git.env.get(f"GIT_{role}_{part}") or value
            for role in ("AUTHOR", "COMMITTER")
            for part, value in AUTHOR.items()
        }
        git.run("-c", "commit.gpgsign=false", "commit", "--quiet", "--no-verify", "-m", message, env=identity)
        return {"committed": git.text("rev-parse", "HEAD")}

    def _push(self) -> JsonObject:
        """Push the run's branch to origin: `pushed`, or `pushError` (the turn goes on either way)."""
        if self.git.run("rev-parse", "--verify", "--quiet", f"refs/heads/{self.branch}", check=False).returncode:
            return {"pushError": f"there is no branch {self.branch} to push"}
        refspec = f"refs/heads/{self.branch}:refs/heads/{self.branch}"
        try:
            self.git.run("push", "--quiet", "--no-verify", "origin", refspec, timeout=NETWORK_TIMEOUT_SECONDS)
        except WorkspaceError as error:
            logger.warning("run %s: %s", self.run_id, error)
            return {"pushError": str(error)}
        return {"pushed": True}


def _head_and_tail(written: IO[bytes], limit: int) -> tuple[str, int]:
    """What a file holds as text, or when it is over `limit` bytes its head and tail around the
    sink's cut marker; and the bytes cut (a character split at a cut is replaced)."""
    size = written.seek(0, os.SEEK_END)
    written.seek(0)
    if size <= limit:
        return written.read().decode("utf-8", "replace"), 0
    half = limit // 2
    head = written.read(half)
    written.seek(size - half)
    tail = written.read(half)
    cut = size - 2 * half
    return head.decode("utf-8", "replace") + cut_marker(cut) + tail.decode("utf-8", "replace"), cut


def _numstat(output: bytes) -> tuple[list[JsonObject], int, int]:
    """`git diff --numstat -z`'s files (path, insertions, deletions; a binary file counts 0 and
    says `binary`) and the totals."""
    files: list[JsonObject] = []
    insertions = deletions = 0
    for entry in output.split(b"\0"):
        added, _, rest = entry.partition(b"\t")
        removed, _, path = rest.partition(b"\t")
        if not path:
            continue
        item: JsonObject = {"path": path.decode("utf-8", "replace")}
        if added == b"-" or removed == b"-":
            item.update(insertions=0, deletions=0, binary=True)
        else:
            item.update(insertions=int(added), deletions=int(removed))
            insertions, deletions = insertions + int(added), deletions + int(removed)
        files.append(item)
    return files, insertions, deletions
