"""What every admin page shows the same way: JSON pretty-printed in a collapsible block, and a
link to an object's admin page."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from django.contrib.admin.utils import quote
from django.urls import NoReverseMatch, reverse
from django.utils.html import format_html
from django.utils.safestring import SafeString

# A block longer than this many lines starts folded.
OPEN_LINES = 12


def pretty_json(value: Any, *, summary: str | None = None) -> SafeString | str:
    """`value` as indented JSON in a <details> block (open when short), escaped."""
    if value is None:
        return "-"
    if isinstance(value, str):  # JSON text (a webhook's body), shown as sent when it is not JSON
        try:
            value = json.loads(value)
        except ValueError:
            text = value
        else:
            text = json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True)
    else:
        text = json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True)
    lines = text.count("\n") + 1
    label = summary or (f"{lines} lines" if lines > 1 else text[:80])
    return format_html(
        '<details class="agentrun-json"{}><summary>{}</summary><pre style="white-space: pre-wrap">{}</pre></details>',
        " open" if lines <= OPEN_LINES else "",
        label,
        text,
    )


def admin_link(view: str, object_id: str | None, text: str | None = None) -> SafeString | str:
    """A link to `admin:<view>` for the object (its id quoted as admin quotes it), or "-"."""
    if not object_id:
        return "-"
    try:
        url = reverse(f"admin:{view}", args=[quote(object_id)])
    except NoReverseMatch:
        return text or object_id
    return format_html('<a href="{}">{}</a>', url, text or object_id)


def changelist_link(view: str, query: str, text: str) -> SafeString:
    return format_html('<a href="{}?{}">{}</a>', reverse(f"admin:{view}"), query, text)


def json_display(name: str) -> Callable[[Any, Any], SafeString | str]:
    """A read-only admin column or field showing attribute `name` as pretty_json."""

    def show(_admin: Any, obj: Any) -> SafeString | str:
        return pretty_json(getattr(obj, name))

    show.short_description = name.replace("_", " ")  # type: ignore[attr-defined]  # what admin.display sets
    return show


# A change page whose every field is read-only: no save buttons (its actions work on the list).
READ_ONLY_PAGE = {"show_save": False, "show_save_and_continue": False, "show_save_and_add_another": False}
