"""The real agent CLIs, installed from the npm registry, and scripted model servers on
127.0.0.1 for them to talk to (FORMATS.md §5): the test fixes what the model says; the CLI
itself runs the tools and writes the JSON lines the adapters parse."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

CODEX_PACKAGE = "@openai/codex@0.171.0-linux-x64"
CLAUDE_PACKAGE = "@anthropic-ai/claude-code-linux-x64@2.1.332"
CACHE = Path(os.environ.get("AGENTRUN_AGENT_CLI_CACHE", Path.home() / ".cache" / "agentrun" / "agent-clis"))


def install() -> tuple[Path, Path]:
    """Both CLIs, installed once into the cache. Skips (saying why) when npm cannot get them."""
    codex = CACHE / "node_modules/@openai/codex/vendor/x86_64-unknown-linux-musl/bin/codex"
    claude = CACHE / "node_modules/@anthropic-ai/claude-code-linux-x64/claude"
    if not (codex.exists() and claude.exists()):
        CACHE.mkdir(parents=True, exist_ok=True)
        try:
            done = subprocess.run(
                ["npm", "install", "--no-audit", "--no-fund", "--prefix", str(CACHE), CODEX_PACKAGE, CLAUDE_PACKAGE],
                capture_output=True,
                text=True,
                timeout=600,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            pytest.skip(f"the agent CLIs could not be installed from npm: {exc}")
        if done.returncode != 0 or not (codex.exists() and claude.exists()):
            pytest.skip(f"the npm registry could not be reached for the agent CLIs: {done.stderr.strip()[-300:]}")
    return codex, claude


def claude_environment(model_url: str, claude_bin: Path) -> dict[str, str]:
    """What Claude Code needs to talk to a scripted model and nothing else (no update checks,
    telemetry or retries), and the backend to run it (its API key is the caller's to give)."""
    return {
        "ANTHROPIC_BASE_URL": model_url,
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_AUTOUPDATER": "1",
        "DISABLE_TELEMETRY": "1",
        "DISABLE_ERROR_REPORTING": "1",
        "CLAUDE_CODE_MAX_RETRIES": "0",
        "AGENTRUN_CLAUDE_BIN": str(claude_bin),
        "AGENTRUN_CLAUDE_ARGS": "--permission-mode acceptEdits --allowedTools Bash Read Edit",
    }


class ScriptedModel:
    """A model API on a free loopback port answering each main-loop request with the next step
    of `script`: {"text": ...}, {"tool": (name, input)}, or {"status": code} (an API error;
    with "sticky", every later request gets it too)."""

    def __init__(self, script: list[dict]):
        self.script, self.requests, self.lock = list(script), [], threading.Lock()
        self.keys: list[str | None] = []  # each request's API key header, as the CLI sent it
        model = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
                with model.lock:
                    model.requests.append((self.path, body))
                    model.keys.append(self.headers.get("authorization") or self.headers.get("x-api-key"))
                model.answer(self, body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def next_step(self, main: bool) -> dict:
        with self.lock:
            if main and self.script and self.script[0].get("sticky"):
                return self.script[0]  # answered to every request, retries included
            return self.script.pop(0) if main and self.script else {"text": "ok"}

    @staticmethod
    def send(handler, status: int, body: bytes, content_type: str) -> None:
        handler.send_response(status)
        handler.send_header("content-type", content_type)
        handler.send_header("content-length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    @staticmethod
    def sse(events: list[dict]) -> bytes:
        return "".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in events).encode()

    def close(self) -> None:
        self.server.shutdown()


class Anthropic(ScriptedModel):
    """The Anthropic Messages API (streamed), as Claude Code calls it."""

    def answer(self, handler, body):
        if "count_tokens" in handler.path:
            return self.send(handler, 200, b'{"input_tokens": 10}', "application/json")
        step = self.next_step(bool(body.get("tools")))
        if "status" in step:
            error = {"type": "error", "error": {"type": "api_error", "message": "scripted failure"}}
            return self.send(handler, step["status"], json.dumps(error).encode(), "application/json")
        if "tool" in step:
            name, tool_input = step["tool"]
            block = {"type": "tool_use", "id": f"toolu_{len(self.requests)}", "name": name, "input": {}}
            delta, stop = {"type": "input_json_delta", "partial_json": json.dumps(tool_input)}, "tool_use"
        else:
            block, delta, stop = {"type": "text", "text": ""}, {"type": "text_delta", "text": step["text"]}, "end_turn"
        if not body.get("stream"):
            message = {
                "id": "msg_mock",
                "type": "message",
                "role": "assistant",
                "model": body.get("model"),
                "content": [{"type": "text", "text": step.get("text", "ok")}],
                "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": {"input_tokens": 5, "output_tokens": 2},
            }
            return self.send(handler, 200, json.dumps(message).encode(), "application/json")
        events = [
            {
                "type": "message_start",
                "message": {
                    "id": f"msg_{len(self.requests)}",
                    "type": "message",
                    "role": "assistant",
                    "model": body.get("model"),
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {"input_tokens": 20, "output_tokens": 1},
                },
            },
            {"type": "content_block_start", "index": 0, "content_block": block},
            {"type": "content_block_delta", "index": 0, "delta": delta},
            {"type": "content_block_stop", "index": 0},
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop, "stop_sequence": None},
                "usage": {"output_tokens": 9},
            },
            {"type": "message_stop"},
        ]
        self.send(handler, 200, self.sse(events), "text/event-stream")


class Responses(ScriptedModel):
    """The OpenAI Responses API (streamed), as `codex exec` calls it. Tools: exec_command."""

    def answer(self, handler, body):
        step = self.next_step(True)
        if "status" in step:
            error = {
                "error": {
                    "message": "scripted failure",
                    "type": "invalid_request_error",
                    "code": "context_length_exceeded",
                }
            }
            return self.send(handler, step["status"], json.dumps(error).encode(), "application/json")
        if "tool" in step:
            name, arguments = step["tool"]
            item = {
                "type": "function_call",
                "id": f"fc_{len(self.requests)}",
                "call_id": f"call_{len(self.requests)}",
                "name": name,
                "arguments": json.dumps(arguments),
            }
        else:
            item = {
                "type": "message",
                "role": "assistant",
                "id": f"msg_{len(self.requests)}",
                "content": [{"type": "output_text", "text": step["text"]}],
            }
        events = [
            {"type": "response.created", "response": {"id": f"resp_{len(self.requests)}"}},
            {"type": "response.output_item.added", "output_index": 0, "item": item},
            {"type": "response.output_item.done", "output_index": 0, "item": item},
            {
                "type": "response.completed",
                "response": {
                    "id": f"resp_{len(self.requests)}",
                    "usage": {
                        "input_tokens": 100,
                        "input_tokens_details": {"cached_tokens": 0},
                        "output_tokens": 10,
                        "output_tokens_details": {"reasoning_tokens": 0},
                        "total_tokens": 110,
                    },
                },
            },
        ]
        self.send(handler, 200, self.sse(events), "text/event-stream")
