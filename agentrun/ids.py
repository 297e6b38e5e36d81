"""Generated ids (`<prefix>_<uuid4 hex>`) and the stable hash of JSON values."""

from __future__ import annotations

import hashlib
import json
import uuid


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def stable_hash(value: object) -> str:
    """SHA-256 hex of canonical JSON: sorted keys, compact separators, UTF-8 (SPEC A17)."""
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
