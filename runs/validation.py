"""The JSON a run is created or fed with, checked and summarized without the database.

What the API, the queue and the runs services share about the shape of a `sessionRef`, a
`resourceBundleRef` and a runner's event: 400 `schema-invalid` naming the field, and the summary
of a resource bundle an event may carry (names and refs, never values). Nothing here reads or
writes a table.
"""

from __future__ import annotations

from agentrun.errors import invalid
from agentrun.fields import SESSION_ID_MAX_LENGTH, check_identifier
from agentrun.vocabulary import EVENT_TYPES
from agentrun.wire import parse_iso


def validate_session_ref(session_ref: object) -> dict | None:
    if session_ref is None:
        return None
    if not isinstance(session_ref, dict):
        raise invalid("sessionRef must be an object", field="sessionRef")
    session_id = session_ref.get("sessionId")
    if isinstance(session_id, str) and not session_id.strip():
        session_id = None
    # Any text an identifier may hold, '/' included (`owner/repo#42`): paths percent-encode it.
    check_identifier(session_id, field="sessionRef.sessionId", max_length=SESSION_ID_MAX_LENGTH)
    for key in ("conversationId", "threadId"):
        check_identifier(session_ref.get(key), field=f"sessionRef.{key}", max_length=500, required=False)
    if session_ref.get("metadata") is not None and not isinstance(session_ref["metadata"], dict):
        raise invalid("sessionRef.metadata must be an object", field="sessionRef.metadata")
    parse_iso(session_ref.get("expiresAt"), field="sessionRef.expiresAt")
    return session_ref


def validate_resource_bundle_ref(ref: object) -> dict | None:
    if ref is None:
        return None
    if not isinstance(ref, dict):
        raise invalid("resourceBundleRef must be an object", field="resourceBundleRef")
    for key in ("kind", "repoUrl"):
        if not isinstance(ref.get(key), str) or not ref[key]:
            raise invalid(f"resourceBundleRef.{key} must be a non-empty string", field=f"resourceBundleRef.{key}")
    bundles = ref.get("bundles")
    if not isinstance(bundles, list) or not all(isinstance(item, dict) for item in bundles):
        raise invalid("resourceBundleRef.bundles must be a list of objects", field="resourceBundleRef.bundles")
    for index, item in enumerate(bundles):
        for key in ("subpath", "targetPath"):
            if not isinstance(item.get(key), str):
                raise invalid(
                    f"resourceBundleRef.bundles[{index}].{key} must be a string",
                    field=f"resourceBundleRef.bundles.{index}.{key}",
                )
    for key in ("promptRefs", "requiredSkills"):
        items = ref.get(key)
        if items is not None and (
            not isinstance(items, list)
            or not all(isinstance(i, dict) and isinstance(i.get("name"), str) for i in items)
        ):
            raise invalid(
                f"resourceBundleRef.{key} must be a list of objects with a name", field=f"resourceBundleRef.{key}"
            )
    credential = ref.get("credentialRef")
    if credential is not None and (not isinstance(credential, dict) or not isinstance(credential.get("name"), str)):
        raise invalid(
            "resourceBundleRef.credentialRef must be an object with a name", field="resourceBundleRef.credentialRef"
        )
    return ref


def summarize_resource_bundle_ref(ref: dict | None) -> dict | None:
    """SPEC §4.11: what an event may say of a resource bundle (names and refs, no values)."""
    if not ref:
        return None
    root_commit = ref.get("commitId")
    root_ref = ref.get("ref")
    bundles = ref.get("bundles") or []
    prompt_refs = ref.get("promptRefs")
    skills = ref.get("requiredSkills")
    credential = ref.get("credentialRef")
    return {
        "kind": ref["kind"],
        "repoUrl": ref["repoUrl"],
        "commitId": root_commit,
        "ref": root_ref,
        "bundles": {
            "count": len(bundles),
            "items": [
                {
                    "name": item.get("name"),
                    "repoUrl": item.get("repoUrl") or ref["repoUrl"],
                    "commitId": item.get("commitId") or root_commit,
                    "ref": item.get("ref") or root_ref,
                    "subpath": item.get("subpath"),
                    "targetPath": item.get("targetPath"),
                    "valuesPrinted": False,
                }
                for item in bundles
            ],
            "valuesPrinted": False,
        },
        "promptRefs": {
            "count": len(prompt_refs or []),
            "names": [item["name"] for item in prompt_refs or []],
            "required": [item["name"] for item in prompt_refs or [] if item.get("required") is True],
            "valuesPrinted": False,
        },
        "requiredSkills": {
            "count": len(skills or []),
            "names": [item["name"] for item in skills or []],
            "valuesPrinted": False,
        },
        "submodules": ref.get("submodules", False),
        "lfs": ref.get("lfs", False),
        "credentialRef": (
            {
                "name": credential["name"],
                "namespace": credential.get("namespace"),
                "keys": credential.get("keys") or [],
                "valuesPrinted": False,
            }
            if credential
            else None
        ),
    }


def validate_event(event_type: object, payload: object) -> None:
    if event_type not in EVENT_TYPES:
        raise invalid(
            f"unknown event type {event_type!r}" if isinstance(event_type, str) else "event type must be a string",
            field="type",
            allowed=sorted(EVENT_TYPES),
        )
    if not isinstance(payload, dict):
        raise invalid("event payload must be an object", field="payload")
