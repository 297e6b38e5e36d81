"""Every write to sessions, by what it owns:

- `records`: the session API's writes (PUT a session, mark it read);
- `storage`: what runners report of a session's storage, its eviction and its collection;
- `run_steps`: what a run's writes do to its session, steps of runs' own transactions;
- `refs` and `locks`: a session's ref and boundary, and its row lock, which the others share.

The transactions (agentrun.transactions): a public service is `@write_transaction(durable=True)`;
a step that runs inside another service's transaction is `@in_transaction`.
"""

from sessions.services.locks import lock_inserted_session, lock_scoped_session, lock_session, lock_session_or_claim_id
from sessions.services.records import session_mark_read, session_upsert
from sessions.services.refs import (
    check_boundary,
    session_ref_from_record,
    summarize_session_ref,
    title_from_metadata,
    title_from_prompt,
)
from sessions.services.run_steps import (
    TOUCH_VERSION,
    TOUCH_VERSION_FUNCTION,
    session_event_touch_sql,
    session_resolve_for_run,
    session_thread_update,
    session_touch_claimed,
    session_touch_command_created,
    session_touch_run_ended,
    session_touch_turn_ended,
)
from sessions.services.storage import (
    STORAGE_FIELDS,
    UNRESTRICTED,
    StorageOutcome,
    session_storage_collect,
    session_storage_evict,
    session_storage_refresh,
)

__all__ = [
    "STORAGE_FIELDS",
    "TOUCH_VERSION",
    "TOUCH_VERSION_FUNCTION",
    "UNRESTRICTED",
    "StorageOutcome",
    "check_boundary",
    "lock_inserted_session",
    "lock_scoped_session",
    "lock_session",
    "lock_session_or_claim_id",
    "session_event_touch_sql",
    "session_mark_read",
    "session_ref_from_record",
    "session_resolve_for_run",
    "session_storage_collect",
    "session_storage_evict",
    "session_storage_refresh",
    "session_thread_update",
    "session_touch_claimed",
    "session_touch_command_created",
    "session_touch_run_ended",
    "session_touch_turn_ended",
    "session_upsert",
    "summarize_session_ref",
    "title_from_metadata",
    "title_from_prompt",
]
