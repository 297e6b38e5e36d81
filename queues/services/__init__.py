"""Every write to queue tasks: by clients and operators (`tasks`: create, attempt updates,
cancel, read, retry), and the dispatcher's two moves (`dispatch`): turn a pending task into a
run and follow the run to its end (settle). Callers import from here.

Locks, in the one order every app keeps: queue task, then (through runs' services) run,
command, session, the session version counter; then the queue version counter last. The
dispatcher also takes two advisory locks after the task (its queue's, then its tenant's), so
dispatchers count running attempts one at a time per queue and per tenant.
"""

from queues.services.dispatch import (
    Dispatched,
    EndedAttempt,
    attempts_to_settle,
    dispatch_one,
    ended_attempts,
    next_retry_at,
    settle,
    settle_attempt,
)
from queues.services.tasks import (
    HASHED_FIELDS,
    WIRE_NAMES,
    session_path_for,
    task_attempt_update,
    task_cancel,
    task_create,
    task_mark_read,
    task_retry,
)

__all__ = [
    "HASHED_FIELDS",
    "WIRE_NAMES",
    "Dispatched",
    "EndedAttempt",
    "attempts_to_settle",
    "dispatch_one",
    "ended_attempts",
    "next_retry_at",
    "session_path_for",
    "settle",
    "settle_attempt",
    "task_attempt_update",
    "task_cancel",
    "task_create",
    "task_mark_read",
    "task_retry",
]
