"""The JSON a run is created or fed with, checked and summarized without the database.

What the API, the queue and the runs services share about the shape of a `sessionRef`, a
`resourceBundleRef` and a runner's event: 400 `schema-invalid` naming the field, and the summary
of a resource bundle an event may carry (names and refs, never values). Nothing here reads or
writes a table.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from urllib.parse import urlsplit

from django.conf import settings

from agentrun.errors import invalid
from agentrun.fields import SESSION_ID_MAX_LENGTH, check_identifier
from agentrun.launcher import ENV_NAME, egress_target
from agentrun.text import is_unstorable
from agentrun.vocabulary import EVENT_TYPES
from agentrun.wire import parse_iso

# `resourceBundleRef.kind` of a ref that names an operator's resource bundle.
NAMED_BUNDLE = "bundle"


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
    """SPEC §1.6's bundle of repository files, or `{kind: "bundle", name}`: the operator's
    resource bundle of that name (runs.models.ResourceBundle), looked up by `run_create`."""
    if ref is None:
        return None
    if not isinstance(ref, dict):
        raise invalid("resourceBundleRef must be an object", field="resourceBundleRef")
    if ref.get("kind") == NAMED_BUNDLE:
        check_identifier(ref.get("name"), field="resourceBundleRef.name")
        unknown = sorted(set(ref) - {"kind", "name"})
        if unknown:
            raise invalid(
                f"resourceBundleRef of kind bundle takes only kind and name, not {', '.join(unknown)}",
                field=f"resourceBundleRef.{unknown[0]}",
            )
        return ref
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


def bundle_name(ref: dict | None) -> str | None:
    """The operator's bundle a validated `resourceBundleRef` names, or None."""
    return ref["name"] if ref is not None and ref.get("kind") == NAMED_BUNDLE else None


def summarize_resource_bundle_ref(ref: dict | None) -> dict | None:
    """SPEC §4.11: what an event may say of a resource bundle (names and refs, no values)."""
    if not ref:
        return None
    if ref.get("kind") == NAMED_BUNDLE:
        return {"kind": NAMED_BUNDLE, "name": ref["name"], "valuesPrinted": False}
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


# --- workspaces -----------------------------------------------------------------------------

WORKSPACE_KEYS = frozenset({"kind", "url", "ref", "path", "depth", "credentialsRef", "commit", "push"})
GIT_SCHEMES = ("https", "http", "ssh", "git", "file")
URL_MAX_LENGTH, GIT_REF_MAX_LENGTH, PATH_MAX_LENGTH, MAX_DEPTH = 2048, 255, 1024, 1000
_SCP_LIKE = re.compile(r"^[A-Za-z0-9._-]+@[A-Za-z0-9.-]+:(?!//)")
# What `git check-ref-format` refuses in a ref name, less the rules that need the whole name.
_BAD_REF = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|//|/\.|\.lock(/|$)")


def validate_workspace_ref(ref: object) -> object:
    """A `workspaceRef` of kind `git` (the runner checks it out before the first turn):
    `{kind: "git", url, ref?, path?, depth?, credentialsRef?, commit?, push?}`, each checked,
    400 naming the first bad key. Any other value is copied verbatim (SPEC §1.1)."""
    if not isinstance(ref, dict) or ref.get("kind") != "git":
        return ref
    unknown = sorted(set(ref) - WORKSPACE_KEYS)
    if unknown:
        raise invalid(f"workspaceRef has no key {unknown[0]!r}", field=f"workspaceRef.{unknown[0]}")
    _check_git_url(ref.get("url"))
    git_ref = ref.get("ref")
    if git_ref is not None and not _is_git_ref(git_ref):
        raise invalid("workspaceRef.ref must be a branch, tag or commit name", field="workspaceRef.ref")
    path = ref.get("path")
    if path is not None and not _is_relative_path(path):
        raise invalid(
            "workspaceRef.path must be a relative path inside the repository, without '..'", field="workspaceRef.path"
        )
    depth = ref.get("depth")
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int) or not 0 <= depth <= MAX_DEPTH):
        raise invalid(
            f"workspaceRef.depth must be an integer from 0 (all history) to {MAX_DEPTH}", field="workspaceRef.depth"
        )
    credentials = ref.get("credentialsRef")
    if credentials is not None and (not isinstance(credentials, str) or not ENV_NAME.match(credentials)):
        raise invalid(
            "workspaceRef.credentialsRef must name an environment variable of the run's resource bundle",
            field="workspaceRef.credentialsRef",
        )
    for key in ("commit", "push"):
        if ref.get(key) is not None and not isinstance(ref[key], bool):
            raise invalid(f"workspaceRef.{key} must be a boolean", field=f"workspaceRef.{key}")
    if ref.get("push") and not ref.get("commit"):
        raise invalid("workspaceRef.push needs commit: true (it pushes the turns' commits)", field="workspaceRef.push")
    return ref


def _check_git_url(url: object) -> None:
    message = f"workspaceRef.url must be a git URL ({', '.join(GIT_SCHEMES)}, or user@host:path)"
    if not isinstance(url, str) or not url or len(url) > URL_MAX_LENGTH or is_unstorable(url):
        raise invalid(message, field="workspaceRef.url")
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in url):
        raise invalid(message, field="workspaceRef.url")
    if _SCP_LIKE.match(url):
        return
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise invalid(message, field="workspaceRef.url") from None
    if parts.scheme not in GIT_SCHEMES or (parts.scheme != "file" and not parts.hostname):
        raise invalid(message, field="workspaceRef.url")
    if parts.scheme == "file" and (parts.netloc or not parts.path.startswith("/")):
        raise invalid("workspaceRef.url: a file URL is file:///absolute/path", field="workspaceRef.url")
    if parts.scheme == "file" and not settings.AGENTRUN_GIT_FILE_URLS:
        raise invalid(
            "workspaceRef.url: file:// repositories are not allowed here (AGENTRUN_GIT_FILE_URLS)",
            field="workspaceRef.url",
        )
    if parts.password is not None or (parts.username is not None and parts.scheme in ("https", "http")):
        raise invalid(
            "workspaceRef.url must not carry credentials: name them with credentialsRef", field="workspaceRef.url"
        )


def _is_git_ref(value: object) -> bool:
    if not isinstance(value, str) or not value or len(value) > GIT_REF_MAX_LENGTH:
        return False
    if value.startswith(("-", "/")) or value.endswith(("/", ".")) or value == "@":
        return False
    return not _BAD_REF.search(value) and not any(part.startswith(".") for part in value.split("/"))


def _is_relative_path(value: object) -> bool:
    if not isinstance(value, str) or not value or len(value) > PATH_MAX_LENGTH or is_unstorable(value):
        return False
    if value.startswith("/") or "\\" in value or any(ord(ch) < 32 for ch in value):
        return False
    return ".." not in PurePosixPath(value).parts


# --- resource bundles -----------------------------------------------------------------------

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]{1,253}$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_LABEL_NAME = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$")


def _secret_name(value: object) -> bool:
    return isinstance(value, str) and len(value) <= 253 and bool(_DNS_SUBDOMAIN.match(value))


def bundle_problems(
    *,
    name: object,
    env: object,
    env_from: object,
    cpu: str,
    memory: str,
    runtime_class_name: str,
    node_selector: object,
    egress_allowlist: object,
) -> dict[str, str]:
    """What is wrong with a resource bundle's fields, by field (empty when nothing is). A
    bundle holds references: an env entry with a value is refused."""
    problems: dict[str, str] = {}
    if not isinstance(name, str) or not name or is_unstorable(name) or len(name) > 200:
        problems["name"] = "a name of 1 to 200 characters"
    if not isinstance(env, list) or not all(
        isinstance(item, dict)
        and set(item) == {"name", "secret", "key"}
        and isinstance(item["name"], str)
        and ENV_NAME.match(item["name"])
        and _secret_name(item["secret"])
        and isinstance(item["key"], str)
        and _SECRET_KEY.match(item["key"])
        for item in env
    ):
        problems["env"] = (
            'a list of {"name": VARIABLE, "secret": secret-name, "key": key}: references to secret keys, never values'
        )
    elif len({item["name"] for item in env}) != len(env):
        problems["env"] = "each variable once"
    if not isinstance(env_from, list) or not all(_secret_name(item) for item in env_from):
        problems["env_from"] = "a list of secret names"
    for field, value in (("cpu", cpu), ("memory", memory)):
        if value and not _QUANTITY.match(value):
            problems[field] = "a Kubernetes quantity such as 500m, 2, 512Mi or 4Gi"
    if runtime_class_name and not (len(runtime_class_name) <= 253 and _DNS_SUBDOMAIN.match(runtime_class_name)):
        problems["runtime_class_name"] = "a RuntimeClass name (gvisor, kata-qemu)"
    if not isinstance(node_selector, dict) or not all(
        isinstance(key, str) and _LABEL_NAME.match(key) and isinstance(value, str) and _LABEL_VALUE.match(value)
        for key, value in node_selector.items()
    ):
        problems["node_selector"] = "an object of node label names to values"
    if not isinstance(egress_allowlist, list) or not all(egress_entry(item) is not None for item in egress_allowlist):
        problems["egress_allowlist"] = "a list of CIDRs, each with an optional port: 10.0.0.0/8, 203.0.113.7/32:443"
    return problems


def egress_entry(value: object) -> tuple[str, int | None] | None:
    """An allowlist entry as (CIDR, port or None), as the launchers read it; None when it is not one."""
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        return egress_target(value)
    except ValueError:
        return None
