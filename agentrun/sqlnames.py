"""Names for the few hand-written statements: a model's table and columns as psycopg.sql
identifiers, taken from its `_meta`, so a statement follows a renamed table or column and no name
is ever pasted into SQL text. Values go in as parameters; fixed vocabulary (a status) as
`sql.Literal`."""

from __future__ import annotations

from django.db import models
from psycopg import sql


def table(model: type[models.Model]) -> sql.Identifier:
    return sql.Identifier(model._meta.db_table)


def column(model: type[models.Model], name: str, alias: str | None = None) -> sql.Identifier:
    """The column of field `name`, qualified by the statement's `alias` for the table if given."""
    field = model._meta.get_field(name)
    if not isinstance(field, models.Field) or not field.column:
        raise LookupError(f"{model.__name__}.{name} is not a column")
    return sql.Identifier(alias, field.column) if alias else sql.Identifier(field.column)
