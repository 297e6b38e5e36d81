"""Backend profiles and what each can do."""

from __future__ import annotations

from agentrun.errors import invalid

CAPABILITIES = {
    "echo": {"steer": True, "threads": True, "resume": True, "diffs": True, "sandbox": False},
    "codex": {"steer": False, "threads": True, "resume": True, "diffs": True, "sandbox": True},
    "claude-code": {"steer": False, "threads": True, "resume": True, "diffs": True, "sandbox": False},
}
PROFILES = tuple(CAPABILITIES)


def backend_list() -> list[dict]:
    return [{"profile": profile, "capabilities": dict(caps)} for profile, caps in CAPABILITIES.items()]


def require_profile(profile: object) -> str:
    if profile not in CAPABILITIES:
        raise invalid(
            f"backendProfile must be one of {', '.join(PROFILES)}",
            field="backendProfile",
            allowed=list(PROFILES),
        )
    return profile


def can(profile: str, capability: str) -> bool:
    return bool(CAPABILITIES.get(profile, {}).get(capability))
