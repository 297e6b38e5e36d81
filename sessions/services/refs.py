"""What a session says of itself to a run: its ref (SPEC §4.8), a summary of it for events
(§4.11), its title (§4.9), and the boundary a ref may not cross (§4.3). No writes."""

from __future__ import annotations

import re
from typing import Any

from agentrun.errors import SCHEMA_INVALID, TENANT_POLICY_DENIED, AgentRunError
from agentrun.wire import iso
from sessions.models import Session

_WHITESPACE = re.compile(r"\s+")


def title_from_metadata(metadata: object) -> str | None:
    """SPEC §4.9: metadata.title trimmed, at most 200 characters; else None."""
    title = metadata.get("title") if isinstance(metadata, dict) else None
    if isinstance(title, str) and title.strip():
        return title.strip()[:200]
    return None


def title_from_prompt(payload: object) -> str | None:
    """SPEC §4.9: the prompt trimmed, whitespace runs folded, at most 120 characters; else None."""
    prompt = payload.get("prompt") if isinstance(payload, dict) else None
    if not isinstance(prompt, str):
        return None
    return _WHITESPACE.sub(" ", prompt.strip())[:120] or None


def session_ref_from_record(session: Session, fallback: dict[str, Any] | None) -> dict[str, Any]:
    """SPEC §4.8: the record's values, gaps filled from the fallback ref, absent keys left out."""
    fallback = fallback or {}
    ref: dict[str, Any] = {"sessionId": session.session_id}
    for key, value in (
        ("conversationId", session.conversation_id),
        ("threadId", session.thread_id),
        ("expiresAt", iso(session.expires_at)),
    ):
        if value:
            ref[key] = value
        elif fallback.get(key):
            ref[key] = fallback[key]
    if session.metadata:
        ref["metadata"] = session.metadata
    elif "metadata" in fallback and fallback["metadata"] is not None:
        ref["metadata"] = fallback["metadata"]
    return ref


def summarize_session_ref(ref: dict[str, Any] | None) -> dict[str, Any] | None:
    """SPEC §4.11: what an event may say of a session ref (metadata keys, never values)."""
    if not ref:
        return None
    metadata = ref.get("metadata") or {}
    return {
        "sessionId": ref["sessionId"],
        "conversationId": ref.get("conversationId"),
        "threadId": ref.get("threadId"),
        "expiresAt": ref.get("expiresAt"),
        "metadataKeys": sorted(metadata) if isinstance(metadata, dict) else [],
        "valuesPrinted": False,
    }


def check_boundary(session: Session, *, tenant_id: str, project_id: str, backend_profile: str) -> None:
    """SPEC §4.3: another tenant or project is 403; another backend is 400. Tenant first."""
    if session.tenant_id != tenant_id or session.project_id != project_id:
        raise AgentRunError(
            TENANT_POLICY_DENIED,
            "sessionRef cannot be reused across tenant or project boundary",
            status=403,
            details={"sessionId": session.session_id, "valuesPrinted": False},
        )
    if session.backend_profile != backend_profile:
        raise AgentRunError(
            SCHEMA_INVALID,
            "sessionRef cannot be reused across backendProfile boundary",
            status=400,
            details={
                "sessionId": session.session_id,
                "existingBackendProfile": session.backend_profile,
                "requestedBackendProfile": backend_profile,
                "valuesPrinted": False,
            },
        )
