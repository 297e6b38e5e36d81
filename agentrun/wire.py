"""Wire formats shared by every app: timestamps, output records and query parameters.

An output serializer (`RecordSerializer`) declares each field of its record once, with its
source; the OpenAPI schema is generated from those declarations and the record is rendered from
them too, by an encoder written once per class from them (`_compile`), so a page of 500 events
does not pay DRF's per-field machinery. Query parameters are parsed by input
serializers of the fields below, and a bad one is the same 400 whichever view it reached.
"""

from __future__ import annotations

import keyword
import math
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, overload

from django.conf import settings
from rest_framework import serializers
from rest_framework.fields import empty

from agentrun.errors import AgentRunError, invalid
from agentrun.fields import BIGINT_MAX, IDENTIFIER_MAX_LENGTH, check_identifier

_DIGITS = re.compile(r"^[0-9]+$")
# An integer query parameter's text, leading zeros included: longer is not a number we take.
MAX_INTEGER_TEXT = 32
# `wait`'s documented limit (API.md); AGENTRUN_MAX_WAIT_SECONDS may clamp lower.
MAX_WAIT_SECONDS = 30


# --- timestamps ---------------------------------------------------------------------------


@overload
def iso(value: datetime) -> str: ...
@overload
def iso(value: None) -> None: ...
def iso(value: datetime | None) -> str | None:
    """ISO-8601 UTC with milliseconds and `Z`; microseconds are stored, milliseconds sent.
    Every timestamp on the wire is written by this function."""
    if value is None:
        return None
    # `+00:00` becomes `Z`; isoformat pads the year to four digits (strftime's %Y does not).
    return value.astimezone(UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def iso_text(text: str) -> str:
    """A timestamp a JSON column holds as text (a queue attempt's `startedAt`), written as `iso`
    writes it; text that is not an ISO-8601 time is returned as it is."""
    if "T" not in text:
        return text
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return text
    try:
        return iso(parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC))
    except OverflowError:  # year 1 minus an offset, or year 9999 plus one
        return text


def parse_iso(value: object, *, field: str) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise invalid(f"{field} must be an ISO-8601 timestamp", field=field)
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise invalid(f"{field} must be an ISO-8601 timestamp", field=field) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    try:
        return parsed.astimezone(UTC)
    except OverflowError:  # year 1 minus an offset, or year 9999 plus one
        raise invalid(f"{field} is out of range", field=field) from None


class TimestampField(serializers.DateTimeField):
    """A timestamp on the wire: `iso`'s format, whatever DRF's DATETIME_FORMAT says."""

    def to_representation(self, value: datetime) -> str:
        return iso(value)


# --- output records -----------------------------------------------------------------------

# Fields whose `to_representation` hands back a value of the field's type unchanged (a str to a
# CharField, an int to an IntegerField, JSON to a JSONField): the encoder copies those values.
_VERBATIM = frozenset(
    {
        serializers.CharField.to_representation,
        serializers.IntegerField.to_representation,
        serializers.BooleanField.to_representation,
        serializers.ChoiceField.to_representation,
        serializers.JSONField.to_representation,
    }
)


Encoder = Callable[[serializers.Serializer, Any], dict[str, Any]]


def _compile(serializer: serializers.Serializer) -> Encoder:
    """A RecordSerializer class's encoder, written from its declarations as the dict display one
    would write by hand (as `dataclasses` writes `__init__`): each field's source read, a
    timestamp through `iso`, a nested record through its own encoder (`_record`; any other
    nested serializer through its bound field), a field that is not verbatim through its
    `to_representation` (a null stays null), a computed field through its method."""
    cls = type(serializer)
    namespace: dict[str, Any] = {"_iso": iso, "_record": _record, "_bound": _bound}
    by_attribute, by_key = [], []
    for index, (name, field) in enumerate(serializer.fields.items()):
        if field.write_only:
            continue
        if isinstance(field, serializers.SerializerMethodField):
            namespace[f"_f{index}"] = getattr(cls, field.method_name)
            by_attribute.append(f"{name!r}: _f{index}(serializer, instance)")
            by_key.append(by_attribute[-1])
            continue
        source = field.source
        if not isinstance(source, str) or source == "*" or len(field.source_attrs) != 1:
            raise TypeError(f"{cls.__name__}.{name}: a record field reads one attribute or key")
        reads = [
            f"instance.{source}"
            if source.isidentifier() and not keyword.iskeyword(source)
            else f"getattr(instance, {source!r})",
            f"instance[{source!r}]",
        ]
        for read, entries in zip(reads, (by_attribute, by_key), strict=True):
            record_class, many = _record_class(field)
            if record_class is not None:
                namespace[f"_c{index}"] = record_class
                value = f"None if (_v := {read}) is None else _record(serializer, _c{index}, {many}, _v)"
            elif isinstance(field, serializers.BaseSerializer):
                # Bound per serializer: a nested serializer may read the context.
                value = f"None if (_v := {read}) is None else _bound(serializer, {name!r}, _v)"
            elif isinstance(field, TimestampField):
                value = f"_iso({read})"
            elif type(field).to_representation not in _VERBATIM or getattr(field, "binary", False):
                namespace[f"_f{index}"] = field.to_representation
                value = f"None if (_v := {read}) is None else _f{index}(_v)"
            else:
                value = read
            entries.append(f"{name!r}: ({value})")
    lines = [
        "def encode(serializer, instance):",
        "    if isinstance(instance, dict):",
        f"        record = {{{', '.join(by_key)}}}",
        "    else:",
        f"        record = {{{', '.join(by_attribute)}}}",
    ]
    extra_keys_from = getattr(cls, "extra_keys_from", None)
    if extra_keys_from is not None:
        lines += [
            f"    extra = getattr(instance, {extra_keys_from!r})",
            "    if extra:",
            "        record = {**extra, **record}",
        ]
    lines.append("    return record")
    # The source is built from the class's own declarations (field names and sources), never
    # from anything a request holds.
    exec("\n".join(lines), namespace)  # noqa: S102 - code written from declarations, see above
    return namespace["encode"]


_ENCODERS: dict[type, Encoder] = {}


def _encoder(cls: type[serializers.Serializer]) -> Encoder:
    encode = _ENCODERS.get(cls)
    if encode is None:
        encode = _ENCODERS[cls] = _compile(cls())
    return encode


def _record_class(field: serializers.Field) -> tuple[type[RecordSerializer] | None, bool]:
    """The record class of a nested record field (`Out()` or `Out(many=True)`), and whether it
    is a list; (None, False) for any other field."""
    if isinstance(field, serializers.ListSerializer) and isinstance(field.child, RecordSerializer):
        return type(field.child), True
    if isinstance(field, RecordSerializer):
        return type(field), False
    return None, False


def _record(serializer: serializers.Serializer, record_class: type[RecordSerializer], many: bool, value: Any) -> Any:
    """A nested record (or list of records), each through its class's encoder (a page of 500
    events is one call per event). The records are rendered by one instance of their class per
    rendering serializer, holding its context as DRF's nested fields see it (the root's), so a
    page renders without copying its fields."""
    children = serializer.__dict__.setdefault("_records", {})
    child = children.get(record_class)
    if child is None:
        child = children[record_class] = record_class(context=serializer.context)
    encode = _encoder(record_class)
    if many:
        return [encode(child, item) for item in value]
    return encode(child, value)


def _bound(serializer: serializers.Serializer, name: str, value: Any) -> Any:
    return serializer.fields[name].to_representation(value)


# An output serializer: its declared fields are the record, on the wire and in the schema. (A
# comment, not a docstring: the schema would show a base class's docstring on every record.)
#
# Each field reads one attribute of the instance (a key, of a dict), its `source`; a field
# whose value is computed is a `SerializerMethodField` (typed for the schema with
# `extend_schema_field`). Rendering is DRF's, field for field (tests/test_wire_declarations.py
# holds the two equal), without its per-field cost: a null is null, a timestamp goes through
# `iso`, a nested record through its serializer and any other field that is not verbatim
# through its own `to_representation`. Each class's encoder is written on its first record.
class RecordSerializer(serializers.Serializer):
    # An attribute holding a JSON object whose keys the record carries under the declared ones
    # (the keys a run's create body held that no field names).
    extra_keys_from: str | None = None

    def to_representation(self, instance: Any) -> dict[str, Any]:
        return _encoder(type(self))(self, instance)


def page(items: list, *, cursor: str | None, **more: Any) -> dict[str, Any]:
    """A list page's record (`{items, count, cursor, ...}`), for its page serializer to render."""
    return {"items": items, "count": len(items), "cursor": cursor, **more}


# --- query parameters ---------------------------------------------------------------------


class QueryParameter(serializers.Field):
    """A query parameter, for a query serializer: absent or empty is `default`; a bad one is
    400 `schema-invalid` naming it (`details.parameter`), raised as it is found (the first bad
    parameter in declaration order). Of a repeated parameter the last is taken. `alias_of`: the
    parameter this one is another name for, which wins when both are given."""

    def __init__(self, *, default: Any = None, alias_of: str | None = None, **kwargs: Any):
        kwargs.setdefault("required", False)
        super().__init__(**kwargs)
        self.absent, self.alias_of = default, alias_of

    def get_value(self, dictionary: Mapping) -> Any:
        # An alias is not read at all when the parameter it stands for is given.
        if self.alias_of is not None and dictionary.get(self.alias_of):
            return empty
        return dictionary.get(self.field_name, empty)

    def validate_empty_values(self, data: Any) -> tuple[bool, Any]:
        if data is empty or data is None or data == "":
            return True, self.absent
        return False, data

    def to_representation(self, value: Any) -> Any:
        return value


class QueryText(QueryParameter):
    """Text passed on as it is sent, for the selector to check (a `state` filter)."""

    def to_internal_value(self, data: Any) -> str:
        return str(data)


class QueryIdentifier(QueryParameter):
    """An id, a reader, a queue, a page token: the identifier rule (`check_identifier`)."""

    def __init__(self, *, max_length: int = IDENTIFIER_MAX_LENGTH, **kwargs: Any):
        super().__init__(**kwargs)
        self.max_length = max_length

    def to_internal_value(self, data: Any) -> str:
        name = str(self.field_name)
        try:
            check_identifier(data, field=name, max_length=self.max_length, required=False)
        except AgentRunError as exc:
            exc.details["parameter"] = name
            raise
        return data


class QueryInteger(QueryParameter):
    """Decimal digits only, at least `minimum`; above `at_most` (a seq or version past what a
    column holds) refused, above `clamp` taken as `clamp` (a page size)."""

    # The schema says the default; a cursor's (where a walk starts) is said in its description.
    documents_default = True

    def __init__(self, *, minimum: int, at_most: int | None = None, clamp: int | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.minimum, self.at_most, self.clamp = minimum, at_most, clamp

    def to_internal_value(self, data: Any) -> int:
        name, minimum = self.field_name, self.minimum
        text = data.strip()
        if text.startswith("-") and _DIGITS.match(text[1:]):
            raise invalid(f"{name} must be an integer of at least {minimum}", parameter=name)
        if len(data) > MAX_INTEGER_TEXT or not _DIGITS.match(text):
            raise invalid(f"{name} must be an integer", parameter=name)
        value = int(text)
        if value < minimum:
            raise invalid(f"{name} must be an integer of at least {minimum}", parameter=name)
        if self.at_most is not None and value > self.at_most:
            raise invalid(f"{name} must be an integer of at most {self.at_most}", parameter=name, maximum=self.at_most)
        if self.clamp is not None:
            value = min(value, self.clamp)
        return value


class QueryCursor(QueryInteger):
    """A seq or version to continue after: 0 up to what a bigint column holds."""

    documents_default = False

    def __init__(self, **kwargs: Any):
        super().__init__(minimum=0, at_most=BIGINT_MAX, **kwargs)


class QueryWait(QueryParameter):
    """`wait`: seconds, 0 to 30 (AGENTRUN_MAX_WAIT_SECONDS), decimals allowed, larger values clamped."""

    def __init__(self, **kwargs: Any):
        kwargs.setdefault("default", 0.0)
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> float:
        try:
            value = float(data)
        except ValueError:
            raise invalid("wait must be a number of seconds", parameter="wait") from None
        if math.isnan(value) or value < 0:
            raise invalid(f"wait must be a number of seconds from 0 to {MAX_WAIT_SECONDS}", parameter="wait")
        return min(value, settings.AGENTRUN_MAX_WAIT_SECONDS)
