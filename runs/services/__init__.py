"""Every write to runs, commands, events, runners and runner jobs.

Each public service is one durable transaction (`@write_transaction(durable=True)`); a service
another one composes in its own transaction has a `<service>_in_transaction` step for it (the
queue's dispatcher and cancel, the launcher). Locks are taken in one order: queue task, run,
command, session, the session version counter, the queue version counter. Runner writes are
fenced: they carry the `leaseEpoch` of their claim and change nothing when it is no longer the
run's.

The rooms: `_write` (the write core: the run's lock, an operation's events in one round trip,
a run's end), `runs`, `events`, `commands`, `runners` (runners and runner jobs). The JSON checks
that need no database live in `runs.validation` and are re-exported here.
"""

from runs.services._write import DEFAULT_CANCEL_REASON, RUN_FINISHED_MESSAGE, UNRESTRICTED, NewEvent
from runs.services.commands import (
    command_ack,
    command_cancel,
    command_cancel_in_transaction,
    command_create,
    command_create_in_transaction,
    command_finish,
)
from runs.services.events import event_append
from runs.services.runners import (
    runner_job_save,
    runner_job_save_in_transaction,
    runner_job_update,
    runner_register,
)
from runs.services.runs import (
    run_cancel,
    run_cancel_in_transaction,
    run_claim,
    run_create,
    run_create_in_transaction,
    run_expire,
    run_expire_in_transaction,
    run_finish,
    run_heartbeat,
)
from runs.validation import (
    summarize_resource_bundle_ref,
    validate_event,
    validate_resource_bundle_ref,
    validate_session_ref,
    validate_workspace_ref,
)

__all__ = [
    "DEFAULT_CANCEL_REASON",
    "RUN_FINISHED_MESSAGE",
    "UNRESTRICTED",
    "NewEvent",
    "command_ack",
    "command_cancel",
    "command_cancel_in_transaction",
    "command_create",
    "command_create_in_transaction",
    "command_finish",
    "event_append",
    "run_cancel",
    "run_cancel_in_transaction",
    "run_claim",
    "run_create",
    "run_create_in_transaction",
    "run_expire",
    "run_expire_in_transaction",
    "run_finish",
    "run_heartbeat",
    "runner_job_save",
    "runner_job_save_in_transaction",
    "runner_job_update",
    "runner_register",
    "summarize_resource_bundle_ref",
    "validate_event",
    "validate_resource_bundle_ref",
    "validate_session_ref",
    "validate_workspace_ref",
]
