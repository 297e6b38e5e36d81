"""A session's row lock, taken inside the writing transaction (after the run's and the
command's, before the session version counter: the one lock order every app keeps)."""

from __future__ import annotations

from django.db import connection

from agentrun.auth import Scope
from agentrun.errors import not_found
from sessions.models import Session


def lock_session(session_id: str) -> Session | None:
    return Session.objects.select_for_update(no_key=True).filter(pk=session_id).first()


def lock_inserted_session(session_id: str) -> Session:
    """The row an insert-or-ignore of `session_id` has just left: ours, or the one a concurrent
    creator committed first."""
    return Session.objects.select_for_update(no_key=True).get(pk=session_id)


def lock_session_or_claim_id(session_id: str) -> Session | None:
    """The session, row-locked; or None, and then this transaction alone may create it.

    Creators of one new id queue on an advisory lock of the id before they take the version
    counter. Without it, a creator holding the counter could wait for the row lock of a session
    another creator had just committed, while that row's new holder waits for the counter."""
    session = lock_session(session_id)
    if session is not None:
        return session
    with connection.cursor() as cursor:
        # Raw: the ORM has no advisory locks.
        cursor.execute("SELECT pg_advisory_xact_lock(hashtext('agentrun-session'), hashtext(%s))", [session_id])
    return lock_session(session_id)


def lock_scoped_session(session_id: str, scope: Scope) -> Session:
    """The session, row-locked, if the key may see it (another tenant's or project's is 404). A
    run-scoped key reaches only the session its run is the current or last run of."""
    session = Session.objects.select_for_update(no_key=True).filter(scope.q(), pk=session_id).first()
    if session is None or (
        scope.run_id is not None and scope.run_id not in (session.active_run_id, session.last_run_id)
    ):
        raise not_found("session", session_id)
    return session
