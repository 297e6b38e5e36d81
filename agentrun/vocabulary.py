"""The seed's closed vocabularies: event types, terminal statuses, failure kinds (SPEC §7 A20)."""

EVENT_TYPES = frozenset(
    {
        "backend_status",
        "terminal_status",
        "assistant_message",
        "command_output",
        "diff",
        "error",
        "reasoning",
        "tool_call",
        "usage",
    }
)
OUTPUT_EVENT_TYPES = frozenset({"assistant_message", "command_output", "diff", "error", "terminal_status"})

TERMINAL_STATUSES = frozenset({"completed", "failed", "blocked", "cancelled", "timeout"})

FAILURE_KINDS = frozenset(
    {
        "schema-invalid",
        "tenant-policy-denied",
        "runner-lease-conflict",
        "infra-failed",
        "cancelled",
        "runner-lost",
        "timeout",
        "agent-failed",
        "backend-unavailable",
        "auth-required",
        "forbidden",
    }
)

COMMAND_TYPES = frozenset({"turn", "steer"})


def run_status_for(terminal_status: str) -> str:
    """SPEC §3.7: the run status a terminal status maps to."""
    if terminal_status in {"completed", "cancelled", "blocked"}:
        return terminal_status
    return "failed"


def command_state_for(terminal_status: str) -> str:
    """SPEC §3.7: the command state a terminal status maps to (blocked is a failed command)."""
    if terminal_status in {"completed", "cancelled"}:
        return terminal_status
    return "failed"
