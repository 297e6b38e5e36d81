"""Strict JSON input fields shared by every app's serializers."""

from __future__ import annotations

from typing import Any

from rest_framework import serializers

from agentrun.text import UNSTORABLE_MESSAGE, is_unstorable

# Longest identifier (any id, key, runner, reader, queue, lane, tenant, project).
IDENTIFIER_MAX_LENGTH = 200
# A session id is chosen by the client (`owner/repo#42`) and may be longer.
SESSION_ID_MAX_LENGTH = 255
# The largest value a bigint column holds.
BIGINT_MAX = 2**63 - 1


class StrictIntegerField(serializers.IntegerField):
    """An integer that is a JSON number, not a string or a bool."""

    def to_internal_value(self, data):
        if (
            isinstance(data, bool)
            or not isinstance(data, (int, float))
            or (isinstance(data, float) and not data.is_integer())
        ):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictCharField(serializers.CharField):
    """A JSON string, kept as sent: numbers are not turned into strings, and whitespace is not
    trimmed (a message is stored as the client wrote it; an id is the id it names)."""

    def __init__(self, **kwargs):
        kwargs.setdefault("trim_whitespace", False)
        super().__init__(**kwargs)

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class IdentifierField(StrictCharField):
    """An identifier: a JSON string of at most 200 characters (unless told otherwise) with no
    character PostgreSQL cannot store. Such a character is refused, not replaced: an id that
    silently became another id would address the wrong thing."""

    default_error_messages = {"unstorable": UNSTORABLE_MESSAGE}

    def __init__(self, **kwargs):
        kwargs.setdefault("max_length", IDENTIFIER_MAX_LENGTH)
        super().__init__(**kwargs)

    def to_internal_value(self, data):
        if isinstance(data, str) and is_unstorable(data):
            self.fail("unstorable")
        return super().to_internal_value(data)


def check_identifier(
    value: object, *, field: str, max_length: int = IDENTIFIER_MAX_LENGTH, required: bool = True
) -> None:
    """The `IdentifierField` rule for a value that did not come through a serializer (a path
    segment, a query parameter, a hand-parsed body): 400 `schema-invalid` naming the field."""
    from agentrun.errors import invalid

    if value is None or value == "":
        if required:
            raise invalid(f"{field} is required", field=field)
        return
    if not isinstance(value, str):
        raise invalid(f"{field} must be a string", field=field)
    if is_unstorable(value):
        raise invalid(f"{field} {UNSTORABLE_MESSAGE}", field=field)
    if len(value) > max_length:
        raise invalid(f"{field} must be at most {max_length} characters", field=field, maxLength=max_length)


class JSONObjectField(serializers.JSONField):
    def to_internal_value(self, data):
        if not isinstance(data, dict):
            raise serializers.ValidationError("must be a JSON object")
        return data


def validated(serializer_class: type[serializers.Serializer], data: object) -> dict[str, Any]:
    """The body, validated by `serializer_class` (a 400 in the envelope when it is not valid)."""
    serializer = serializer_class(data=data)
    serializer.is_valid(raise_exception=True)
    return serializer.validated_data
