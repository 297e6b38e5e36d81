"""A run's commands (turns and steers): created for the runner, acknowledged and finished by it,
or cancelled.

A command's writes lock its run first, then the command (the house's lock order). Its end emits
`command-terminal` (built by `command_terminal_payload`, as the run's cascade builds it).
`command_create` and `command_cancel` are also steps of the queue's own transactions
(`*_in_transaction`).
"""

from __future__ import annotations

from typing import Any

from agentrun import backends
from agentrun.auth import Scope
from agentrun.errors import CANCELLED, SCHEMA_INVALID, conflict, invalid, not_found
from agentrun.ids import new_id, stable_hash
from agentrun.transactions import durable_service, in_transaction, write_transaction
from agentrun.vocabulary import COMMAND_TYPES, command_state_for
from runs.models import Command, CommandState, Run
from runs.services._write import (
    DEFAULT_CANCEL_REASON,
    UNRESTRICTED,
    _check_holder,
    _lock_run,
    _RunWrite,
    _terminal_run_error,
    _thread_update,
    command_terminal_payload,
)
from sessions import services as session_services


@in_transaction
def command_create_in_transaction(
    *,
    run_id: str,
    command_type: str,
    payload: dict,
    idempotency_key: str | None = None,
    scope: Scope = UNRESTRICTED,
) -> tuple[Command, bool]:
    """Queue a command for the run's runner. Returns (command, created).

    A known idempotency key replays first, even after the run ended (A6); the hash covers
    {type, payload}. Errors: 400 for an unknown type, a non-object payload, or a steer to a
    backend that cannot steer; 404; 409 (the run's failure kind) on a terminal run; 409
    `schema-invalid` for a key reused with another command.

    A step of the caller's transaction (the queue's dispatcher); `command_create` opens its own.
    """
    if command_type not in COMMAND_TYPES:
        raise invalid(f"unknown command type {command_type!r}", field="type", allowed=sorted(COMMAND_TYPES))
    if not isinstance(payload, dict):
        raise invalid("command payload must be an object", field="payload")
    idempotency_key = idempotency_key or None
    run = _lock_run(run_id, scope)
    payload_hash = stable_hash({"type": command_type, "payload": payload})
    if idempotency_key:
        existing = Command.objects.filter(run_id=run.id, idempotency_key=idempotency_key).first()
        if existing is not None:
            if existing.payload_hash != payload_hash:
                raise conflict(
                    SCHEMA_INVALID, "idempotency key reused with a different command", idempotencyKey=idempotency_key
                )
            return existing, False
    if run.is_terminal:
        raise _terminal_run_error(run)
    if command_type == "steer" and not backends.can(run.backend_profile, "steer"):
        raise invalid(f"backend {run.backend_profile} cannot steer", field="type", backendProfile=run.backend_profile)
    at = run.db_now
    command = Command(
        id=new_id("cmd"),
        run_id=run.id,
        seq=run.last_command_seq + 1,
        type=command_type,
        payload=payload,
        idempotency_key=idempotency_key,
        payload_hash=payload_hash,
        state=CommandState.PENDING,
        created_at=at,
        updated_at=at,
    )
    command.save(force_insert=True)
    if run.session_id:
        session_services.session_touch_command_created(
            session_id=run.session_id,
            run_id=run.id,
            command_id=command.id,
            command_type=command_type,
            payload=payload,
            at=at,
        )
    write = _RunWrite(run)
    write.emit("backend_status", {"phase": "command-created", "commandId": command.id, "commandType": command_type})
    # The seq counter is bookkeeping, not a change of the run: updatedAt stays.
    write.save(bookkeeping={"last_command_seq": command.seq})
    return command, True


command_create = durable_service(command_create_in_transaction)


def _lock_command(command_id: str, scope: Scope) -> tuple[Run, Command]:
    run_id = (
        Command.objects.filter(scope.q(tenant="run__tenant_id", project="run__project_id", run="run_id"), pk=command_id)
        .values_list("run_id", flat=True)
        .first()
    )
    if run_id is None:
        raise not_found("command", command_id)
    run = _lock_run(run_id, UNRESTRICTED)
    command = Command.objects.select_for_update(no_key=True).get(pk=command_id)
    return run, command


@write_transaction(durable=True)
def command_ack(*, command_id: str, runner_id: str, lease_epoch: int, scope: Scope = UNRESTRICTED) -> Command:
    """The runner took the command. A terminal or acknowledged command is returned unchanged.
    Errors: 404; 409 `runner-lease-conflict` for a stale holder or epoch."""
    run, command = _lock_command(command_id, scope)
    if command.is_terminal:
        return command
    _check_holder(run, runner_id, lease_epoch)
    if command.state == CommandState.ACKNOWLEDGED:
        return command
    at = run.db_now
    Command.objects.filter(pk=command.pk).update(state=CommandState.ACKNOWLEDGED, acknowledged_at=at, updated_at=at)
    command.state, command.acknowledged_at, command.updated_at = CommandState.ACKNOWLEDGED, at, at
    return command


@write_transaction(durable=True)
def command_finish(
    *,
    command_id: str,
    runner_id: str,
    lease_epoch: int,
    terminal_status: str,
    failure_kind: str | None = None,
    failure_message: str | None = None,
    thread_id: str | None = None,
    turn_id: str | None = None,
    scope: Scope = UNRESTRICTED,
) -> Command:
    """The runner ends the command; a terminal command is returned unchanged. A thread id is
    recorded on the session (`session-updated`), a turn's end ends the session's turn, then
    `command-terminal` is emitted. Errors: 404; 409 `runner-lease-conflict`."""
    run, command = _lock_command(command_id, scope)
    if command.is_terminal:
        return command
    _check_holder(run, runner_id, lease_epoch)
    write = _RunWrite(run)
    state = command_state_for(terminal_status)
    fields = {
        "state": state,
        "terminal_status": terminal_status,
        "failure_kind": failure_kind,
        "failure_message": failure_message,
        "thread_id": thread_id or None,
        "turn_id": turn_id or None,
        "updated_at": write.at,
    }
    Command.objects.filter(pk=command.pk).update(**fields)
    for name, value in fields.items():
        setattr(command, name, value)
    run_fields: dict[str, Any] = {}
    if thread_id and run.session_id:
        run_fields["session_ref"] = _thread_update(write, thread_id=thread_id, turn_id=turn_id or None)
    if command.type == "turn" and run.session_id:
        session_services.session_touch_turn_ended(
            session_id=run.session_id,
            run_id=run.id,
            command_id=command.id,
            terminal_status=terminal_status,
            failure_kind=failure_kind,
            at=write.at,
        )
    write.emit(
        "backend_status",
        command_terminal_payload(
            command_id=command.id,
            state=state,
            terminal_status=terminal_status,
            failure_kind=failure_kind,
            message=failure_message,
            turn=(thread_id or None, turn_id or None),
        ),
    )
    write.save(**run_fields)
    return command


@in_transaction
def command_cancel_in_transaction(
    *, command_id: str, reason: str | None = None, scope: Scope = UNRESTRICTED
) -> Command:
    """Cancel one command (the run goes on). A terminal command is returned unchanged. Error: 404.
    A step of the caller's transaction (a queue task's cancel); `command_cancel` opens its own."""
    run, command = _lock_command(command_id, scope)
    if command.is_terminal:
        return command
    reason = reason or DEFAULT_CANCEL_REASON
    write = _RunWrite(run)
    fields = {
        "state": CommandState.CANCELLED,
        "terminal_status": CANCELLED,
        "failure_kind": CANCELLED,
        "failure_message": reason,
        "updated_at": write.at,
    }
    Command.objects.filter(pk=command.pk).update(**fields)
    for name, value in fields.items():
        setattr(command, name, value)
    write.emit(
        "backend_status",
        command_terminal_payload(
            command_id=command.id,
            state=CommandState.CANCELLED,
            terminal_status=CANCELLED,
            failure_kind=CANCELLED,
            message=reason,
        ),
    )
    if command.type == "turn" and run.session_id:
        session_services.session_touch_turn_ended(
            session_id=run.session_id,
            run_id=run.id,
            command_id=command.id,
            terminal_status=CANCELLED,
            failure_kind=CANCELLED,
            at=write.at,
        )
    write.save()
    return command


command_cancel = durable_service(command_cancel_in_transaction)
